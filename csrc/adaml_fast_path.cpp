// The host-side ops of the optimizer's steady-state step (adaml_kernels/fast_path.py).
//
// In steady state a step changes only the gradients (zero_grad() + backward() hand over new
// tensors). The optimizer then does no per-tensor work in Python, and makes two op calls:
// refresh_grads_ checks every parameter and gradient against the plan (as strictly as the
// Python checks: any difference changes nothing and sends the step back to the general path,
// which re-checks, re-plans or raises) and repoints the tables' gradient column; then (the
// loss being settled in between, e.g. averaged over the ranks) fast_step_ runs the prologue
// (whether the step is taken, f_1, the skip count, the step counts; one kernel on a GPU) and
// launches every bucket from its table.
#include <ATen/ATen.h>
#include <torch/csrc/autograd/variable.h>
#include <torch/library.h>

#include <optional>
#include <vector>

#include "adaml_update.h"

namespace adaml {
namespace {

int64_t address(const at::Tensor& t) {
  return static_cast<int64_t>(reinterpret_cast<intptr_t>(t.data_ptr()));
}

// The tensor object itself: a new Parameter over the same storage has the same address but is
// another parameter, with a state of its own. (fast_path.py keeps the planned ones alive.)
int64_t identity(const at::Tensor& t) {
  return static_cast<int64_t>(reinterpret_cast<intptr_t>(t.unsafeGetTensorImpl()));
}

// Layout record of a parameter: identity, address, dtype, device, dim, sizes, strides, and the
// dtype its bucket reads gradients in (the parameter's, or float32 for fp16/bf16 parameters).
void append_layout(std::vector<int64_t>& out, const at::Tensor& p, const at::Tensor& g) {
  out.push_back(identity(p));
  out.push_back(address(p));
  out.push_back(static_cast<int64_t>(p.scalar_type()));
  out.push_back(static_cast<int64_t>(p.device().type()));
  out.push_back(static_cast<int64_t>(p.device().index()));
  out.push_back(p.dim());
  for (int64_t d = 0; d < p.dim(); ++d) out.push_back(p.size(d));
  for (int64_t d = 0; d < p.dim(); ++d) out.push_back(p.stride(d));
  out.push_back(static_cast<int64_t>(g.scalar_type()));
}

bool layout_matches(const at::Tensor& p, const int64_t* rec, int64_t& at, int64_t end) {
  if (at + 6 > end || rec[at] != identity(p)) return false;
  ++at;
  if (rec[at] != address(p) || rec[at + 1] != static_cast<int64_t>(p.scalar_type()) ||
      rec[at + 2] != static_cast<int64_t>(p.device().type()) ||
      rec[at + 3] != static_cast<int64_t>(p.device().index()) || rec[at + 4] != p.dim()) {
    return false;
  }
  const int64_t dim = p.dim();
  if (at + 6 + 2 * dim > end) return false;
  for (int64_t d = 0; d < dim; ++d) {
    if (rec[at + 5 + d] != p.size(d) || rec[at + 5 + dim + d] != p.stride(d)) return false;
  }
  at += 5 + 2 * dim;
  return true;
}

// What the fused kernels need of a gradient (tensor_checks.check_grad + fits_fused_kernels),
// its dtype being the one the bucket reads (`grad_dtype`, from the layout record).
bool grad_fits(const at::Tensor& p, const at::Tensor& g, int64_t grad_dtype) {
  if (g.layout() != at::kStrided || static_cast<int64_t>(g.scalar_type()) != grad_dtype ||
      g.device() != p.device() || g.sizes() != p.sizes()) {
    return false;
  }
  for (int64_t d = 0; d < p.dim(); ++d) {
    if (p.size(d) != 1 && g.stride(d) != p.stride(d)) return false;
  }
  return true;
}

// The layout record of the planned parameters and their gradients, in order.
at::Tensor layout_record(at::TensorList params, at::TensorList grads) {
  TORCH_CHECK(params.size() == grads.size(), "layout_record: one gradient per parameter");
  std::vector<int64_t> out;
  for (size_t i = 0; i < params.size(); ++i) append_layout(out, params[i], grads[i]);
  return at::tensor(out, at::kLong);
}

enum Refresh : int64_t { kSame = 0, kMoved = 1, kChanged = 2 };

// slots[i]: -1 if params[i] is not planned (it must have no gradient), else
// (bucket << 32) | row. status[0] (int64, CPU) is set to kSame, kMoved (a gradient moved: the
// tables were repointed and copied to the device) or kChanged (anything else: nothing was
// changed, and the general path takes over). Unless kChanged, the planned parameters' versions
// are bumped: the launches that follow write them in place.
int64_t refresh(at::TensorList params, const at::Tensor& slots, const at::Tensor& record,
                at::TensorList rows_hosts, at::TensorList rows_devices) {
  const int64_t n = static_cast<int64_t>(params.size());
  if (slots.numel() != n) return kChanged;
  const int64_t* slot = slots.const_data_ptr<int64_t>();
  const int64_t* rec = record.const_data_ptr<int64_t>();
  const int64_t end = record.numel();
  int64_t at = 0;
  std::vector<int64_t> grads(n, 0);
  for (int64_t i = 0; i < n; ++i) {
    const at::Tensor& p = params[i];
    const at::Tensor& g = p.grad();
    if (slot[i] < 0) {
      if (g.defined()) return kChanged;
      continue;
    }
    if (!g.defined() || !layout_matches(p, rec, at, end) || !grad_fits(p, g, rec[at++])) {
      return kChanged;
    }
    grads[i] = address(g);
  }
  // Everything checked: only now is anything written.
  std::vector<bool> moved(rows_hosts.size(), false);
  for (int64_t i = 0; i < n; ++i) {
    if (slot[i] < 0) continue;
    const size_t bucket = static_cast<size_t>(slot[i] >> 32);
    const int64_t row = slot[i] & 0xFFFFFFFF;
    int64_t* cell = rows_hosts[bucket].data_ptr<int64_t>() + row * kColumns + kGradAddr;
    if (*cell != grads[i]) {
      *cell = grads[i];
      moved[bucket] = true;
    }
    if (!params[i].is_inference()) torch::autograd::impl::bump_version(params[i]);
  }
  bool any = false;
  for (size_t b = 0; b < moved.size(); ++b) {
    if (!moved[b]) continue;
    any = true;
    // A CPU bucket's rows are its host rows; a GPU's get them by a non-blocking copy (staged
    // by the driver before the call returns, so the host rows may change afterwards).
    at::Tensor device_rows = rows_devices[b];
    if (!device_rows.is_same(rows_hosts[b])) device_rows.copy_(rows_hosts[b], true);
  }
  return any ? kMoved : kSame;
}

void refresh_grads(at::TensorList params, const at::Tensor& slots, const at::Tensor& record,
                   at::TensorList rows_hosts, at::TensorList rows, const at::Tensor& status) {
  TORCH_CHECK(status.device().is_cpu() && status.scalar_type() == at::kLong &&
                  status.numel() == 1,
              "adaml_kernels::refresh_grads_: status must be a one-element int64 CPU tensor");
  *status.data_ptr<int64_t>() = refresh(params, slots, record, rows_hosts, rows);
}

// take = 1 if the loss is finite and found_inf is 0 (else 0); f_1 = loss if it is unset and
// the step is taken; skipped += 1 - take; and, if taken, every step count named by the tables
// ([num_tables, 2] int64: address of a table's rows, row count) advances by one.
void step_prologue_cpu(const at::Tensor& loss, const std::optional<at::Tensor>& found_inf,
                       const at::Tensor& initial_loss, const at::Tensor& skipped,
                       const at::Tensor& take, const at::Tensor& tables) {
  const bool ok = decide_step(load_scalar(loss.const_data_ptr(), scalar_type_code(loss)),
                              found_inf ? found_inf->const_data_ptr<float>() : nullptr,
                              initial_loss.data_ptr<double>(), skipped.data_ptr<double>(),
                              take.data_ptr<float>());
  if (!ok) return;
  const int64_t* t = tables.const_data_ptr<int64_t>();
  for (int64_t b = 0; b < tables.size(0); ++b) {
    const int64_t* rows = reinterpret_cast<const int64_t*>(t[2 * b]);
    for (int64_t r = 0; r < t[2 * b + 1]; ++r) {
      *reinterpret_cast<float*>(rows[r * kColumns + kStepAddr]) += 1.0f;
    }
  }
}

}  // namespace

void fast_step(at::TensorList params, const at::Tensor& slots, const at::Tensor& record,
               const at::Tensor& status, at::TensorList rows, at::TensorList rows_hosts,
               at::TensorList chunks, c10::ArrayRef<int64_t> configs,
               c10::ArrayRef<int64_t> bucket_groups, c10::ArrayRef<double> hypers,
               const c10::List<std::optional<at::Tensor>>& lr_tensors, const at::Tensor& loss,
               const std::optional<at::Tensor>& found_inf,
               const std::optional<at::Tensor>& grad_scale, const at::Tensor& initial_loss,
               const at::Tensor& skipped, const at::Tensor& take, const at::Tensor& tables,
               at::TensorList telemetry, PrologueFn prologue, RunFn run) {
  constexpr const char* kOp = "adaml_kernels::fast_step_: ";
  const size_t buckets = rows.size();
  const size_t groups = lr_tensors.size();
  TORCH_CHECK(rows_hosts.size() == buckets && chunks.size() == buckets &&
                  bucket_groups.size() == buckets && configs.size() == buckets * kConfigFields &&
                  hypers.size() == groups * kHyperFields && tables.size(0) == int64_t(buckets) &&
                  (telemetry.empty() || telemetry.size() == buckets),
              kOp, "per bucket: rows, rows_hosts, chunks, a group and ", kConfigFields,
              " config values (and a telemetry buffer, or none for all); per group: ",
              kHyperFields, " hyper values and an lr tensor");
  for (size_t b = 0; b < telemetry.size(); ++b) {
    check_telemetry(telemetry[b], chunks[b].numel(), take.device());
  }
  refresh_grads(params, slots, record, rows_hosts, rows, status);
  if (*status.const_data_ptr<int64_t>() == kChanged) return;
  prologue(loss, found_inf, initial_loss, skipped, take, tables);
  for (size_t b = 0; b < buckets; ++b) {
    const int64_t g = bucket_groups[b];
    TORCH_CHECK(g >= 0 && static_cast<size_t>(g) < groups, kOp, "bucket ", b, " has no group");
    StepLaunch launch = make_launch(given_table(rows[b], rows_hosts[b], chunks[b]),
                                    hypers.slice(g * kHyperFields, kHyperFields),
                                    configs.slice(b * kConfigFields, kConfigFields), loss, take,
                                    lr_tensors.get(g), grad_scale, initial_loss);
    if (!telemetry.empty()) launch.telemetry = telemetry[b];
    run(launch);
  }
}

namespace {

void fast_step_cpu(at::TensorList params, const at::Tensor& slots, const at::Tensor& record,
                   const at::Tensor& status, at::TensorList rows, at::TensorList rows_hosts,
                   at::TensorList chunks, c10::ArrayRef<int64_t> configs,
                   c10::ArrayRef<int64_t> bucket_groups,
                   c10::ArrayRef<double> hypers,
                   const c10::List<std::optional<at::Tensor>>& lr_tensors,
                   const at::Tensor& loss, const std::optional<at::Tensor>& found_inf,
                   const std::optional<at::Tensor>& grad_scale, const at::Tensor& initial_loss,
                   const at::Tensor& skipped, const at::Tensor& take, const at::Tensor& tables,
                   at::TensorList telemetry) {
  fast_step(params, slots, record, status, rows, rows_hosts, chunks, configs, bucket_groups,
            hypers, lr_tensors, loss, found_inf, grad_scale, initial_loss, skipped, take, tables,
            telemetry, &step_prologue_cpu, &run_cpu_step);
}

}  // namespace
}  // namespace adaml

// Host code for parameters on either device (the CUDA fast_step_ is adaml_cuda.cu's).
TORCH_LIBRARY_IMPL(adaml_kernels, CPU, m) {
  m.impl("layout_record", &adaml::layout_record);
  m.impl("refresh_grads_", &adaml::refresh_grads);
  m.impl("fast_step_", &adaml::fast_step_cpu);
}

TORCH_LIBRARY_IMPL(adaml_kernels, CUDA, m) {
  m.impl("layout_record", &adaml::layout_record);
  m.impl("refresh_grads_", &adaml::refresh_grads);
}

// The steady-state ops run inside a step, where autograd records nothing (torch.optim steps
// under no_grad): skipping the autograd fallback saves its per-tensor work.
TORCH_LIBRARY_IMPL(adaml_kernels, Autograd, m) {
  m.impl("refresh_grads_", torch::CppFunction::makeFallthrough());
  m.impl("fast_step_", torch::CppFunction::makeFallthrough());
  m.impl("layout_record", torch::CppFunction::makeFallthrough());
}
