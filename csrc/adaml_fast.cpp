// The Python module adaml_kernels._C and the optimizer's steady-state step.
//
// In steady state a step changes only the gradients (zero_grad() + backward() hand over new
// tensors). The optimizer then does no per-tensor work in Python: refresh_grads() checks every
// parameter and gradient against the plan in C++ (as strictly as the Python checks: any
// difference sends the step back to the Python path, which re-checks, re-plans or raises) and
// repoints the tables' gradient column; prologue() decides whether the step is taken, records
// f_1, counts a skip and advances the step counts, in one call (one kernel on a GPU); launch()
// runs one bucket's kernel from its table, without the op's per-tensor argument lists.
// The registered op adaml_kernels::fused_step_ (adaml_ops.cpp) stays the path for
// torch.compile, opcheck and the functional form.
#include <torch/extension.h>

#include <optional>
#include <vector>

#include "adaml_update.h"

namespace adaml {
namespace {

int64_t address(const at::Tensor& t) {
  return static_cast<int64_t>(reinterpret_cast<intptr_t>(t.data_ptr()));
}

// Layout record of a parameter: address, dtype, device, dim, sizes, strides, and the dtype its
// bucket reads gradients in (the parameter's, or float32 for fp16/bf16 parameters).
void append_layout(std::vector<int64_t>& out, const at::Tensor& p, const at::Tensor& g) {
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
  if (at + 5 > end) return false;
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

}  // namespace

// The layout record of the planned parameters and their gradients, in order (refresh_grads
// compares with it).
at::Tensor layout_record(const std::vector<at::Tensor>& params,
                         const std::vector<at::Tensor>& grads) {
  std::vector<int64_t> out;
  for (size_t i = 0; i < params.size(); ++i) append_layout(out, params[i], grads[i]);
  return at::tensor(out, at::kLong);
}

enum Refresh : int64_t { kSame = 0, kMoved = 1, kChanged = 2 };

// Checks a param group against its plan and points the tables at the new gradients.
// slots[i]: -1 if params[i] is not planned (it must have no gradient), else
// (bucket << 32) | row. Returns kSame, kMoved (a gradient moved: the tables were repointed and
// copied to the device) or kChanged (anything else: the Python path takes over).
int64_t refresh_grads(const std::vector<at::Tensor>& params, const at::Tensor& slots,
                      const at::Tensor& record, const std::vector<at::Tensor>& rows_hosts,
                      const std::vector<at::Tensor>& rows_devices) {
  const int64_t n = static_cast<int64_t>(params.size());
  if (slots.numel() != n) return kChanged;
  const int64_t* slot = slots.const_data_ptr<int64_t>();
  const int64_t* rec = record.const_data_ptr<int64_t>();
  const int64_t end = record.numel();
  int64_t at = 0;
  std::vector<bool> moved(rows_hosts.size(), false);
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
    const size_t bucket = static_cast<size_t>(slot[i] >> 32);
    const int64_t row = slot[i] & 0xFFFFFFFF;
    int64_t* cell = rows_hosts[bucket].data_ptr<int64_t>() + row * kColumns + kGradAddr;
    const int64_t grad = address(g);
    if (*cell != grad) {
      *cell = grad;
      moved[bucket] = true;
    }
  }
  bool any = false;
  for (size_t b = 0; b < moved.size(); ++b) {
    if (!moved[b]) continue;
    any = true;
    // A CPU bucket's rows are its host rows; a GPU's get them by a non-blocking copy (staged
    // by the driver before the call returns, so the host rows may change afterwards).
    if (!rows_devices[b].is_same(rows_hosts[b])) rows_devices[b].copy_(rows_hosts[b], true);
  }
  return any ? kMoved : kSame;
}

// Before the buckets run: take = 1 if the loss is finite and found_inf is 0 (else 0);
// f_1 = loss if it is unset and the step is taken; skipped += 1 - take; and, if taken, every
// step count named by the tables ([num_tables, 2] int64: address of a table's rows on the
// device, row count) advances by one. All tensors are on one device.
void prologue(const at::Tensor& loss, const std::optional<at::Tensor>& found_inf,
              const at::Tensor& initial_loss, const at::Tensor& skipped, const at::Tensor& take,
              const at::Tensor& tables, int64_t num_tables) {
  if (take.is_cuda()) {
    TORCH_CHECK(cuda_entry_points().prologue != nullptr, "adaml_kernels._C has no CUDA kernel");
    cuda_entry_points().prologue(loss, found_inf, initial_loss, skipped, take, tables,
                                 num_tables);
    return;
  }
  const bool ok = decide_step(load_scalar(loss.const_data_ptr(), scalar_type_code(loss)),
                              found_inf ? found_inf->const_data_ptr<float>() : nullptr,
                              initial_loss.data_ptr<double>(), skipped.data_ptr<double>(),
                              take.data_ptr<float>());
  if (!ok) return;
  const int64_t* t = tables.const_data_ptr<int64_t>();
  for (int64_t b = 0; b < num_tables; ++b) {
    const int64_t* rows = reinterpret_cast<const int64_t*>(t[2 * b]);
    for (int64_t r = 0; r < t[2 * b + 1]; ++r) {
      *reinterpret_cast<float*>(rows[r * kColumns + kStepAddr]) += 1.0f;
    }
  }
}

// One bucket's update from its table (checked by refresh_grads or at plan time).
// `types`: the parameter, gradient and moment dtype codes (ScalarType) and 1 if the bucket has
// master weights.
void launch(const at::Tensor& rows, const at::Tensor& rows_host, const at::Tensor& chunk_tensor,
            int64_t num_tensors, const std::vector<int64_t>& types, const at::Tensor& loss,
            const at::Tensor& take, const std::optional<at::Tensor>& lr_tensor,
            const std::optional<at::Tensor>& grad_scale,
            const std::optional<at::Tensor>& initial_loss, double lr, double beta1, double beta2,
            double eps, double gamma, double phi, double loss_offset, double weight_decay,
            bool normalize_loss, bool decoupled_weight_decay, bool maximize,
            bool stochastic_rounding, int64_t seed) {
  TORCH_CHECK(types.size() == 4, "launch: types must be (param, grad, moment, master)");
  KernelTable table;
  table.rows = rows;
  table.chunk_tensor = chunk_tensor;
  table.num_chunks = chunk_tensor.numel();
  const int64_t* r = rows_host.const_data_ptr<int64_t>();
  bool aligned = true;
  for (int64_t i = 0; i < num_tensors; ++i) {
    for (int c : {kParamAddr, kGradAddr, kExpAvgAddr, kExpAvgSqAddr, kMasterAddr}) {
      aligned = aligned && r[i * kColumns + c] % kVectorBytes == 0;
    }
  }
  table.aligned = aligned;
  StepTypes t;
  t.param = static_cast<int>(types[0]);
  t.grad = static_cast<int>(types[1]);
  t.moment = static_cast<int>(types[2]);
  t.master = types[3] != 0;
  const StepLaunch s = make_launch(
      table, num_tensors, t, loss, take, lr_tensor, grad_scale, initial_loss, lr, beta1, beta2,
      eps, gamma, phi, loss_offset, weight_decay, normalize_loss, decoupled_weight_decay,
      maximize, stochastic_rounding, seed);
  if (rows.is_cuda()) {
    TORCH_CHECK(cuda_entry_points().run_step != nullptr, "adaml_kernels._C has no CUDA kernel");
    cuda_entry_points().run_step(s);
  } else {
    run_cpu_step(s);
  }
}

}  // namespace adaml

// Importing adaml_kernels._C also runs the static initializers that register the ops.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "adaml_kernels' compiled kernels; the ops are registered as adaml_kernels::*";
  m.def("layout_record", &adaml::layout_record);
  m.def("refresh_grads", &adaml::refresh_grads);
  m.def("prologue", &adaml::prologue);
  m.def("launch", &adaml::launch);
}
