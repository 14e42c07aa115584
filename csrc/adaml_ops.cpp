// adaml_kernels._C: the op schema, the host-side checks shared with the CUDA launcher, and the
// CPU kernel (one call per bucket, OpenMP across cores, SIMD in the inner loop). The Python
// module itself, with the optimizer's steady-state entry points, is in adaml_fast.cpp.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cctype>
#include <cstdlib>
#include <string>
#include <vector>

#include "adaml_update.h"

namespace adaml {

// ============================================================================ host helpers

int scalar_type_code(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return kFloat32;
    case at::kDouble: return kFloat64;
    case at::kHalf: return kFloat16;
    case at::kBFloat16: return kBFloat16;
    default: TORCH_CHECK(false, "adaml_kernels: unsupported dtype ", t.scalar_type());
  }
}

Hyper make_hyper(double lr, double beta1, double beta2, double eps, double gamma, double phi,
                 double loss_offset, double weight_decay, bool normalize_loss) {
  return Hyper{lr, beta1, beta2, eps, gamma, phi, loss_offset, weight_decay, normalize_loss};
}

namespace {

constexpr const char* kOp = "adaml_kernels::fused_step_: ";

int64_t address(const at::Tensor& t) {
  return static_cast<int64_t>(reinterpret_cast<intptr_t>(t.data_ptr()));
}

// At least one chunk per tensor, as in buckets.py (the chunk map has a row for every tensor).
int64_t chunks_of(int64_t numel) { return std::max<int64_t>(1, (numel + kChunk - 1) / kChunk); }

// The kernels walk each tensor as one flat array from its data pointer: every tensor must be
// dense, and element i in memory must belong to the same logical element in all four.
void check_like_param(const at::Tensor& t, const at::Tensor& p, const char* name, size_t i) {
  TORCH_CHECK(t.sizes() == p.sizes(), kOp, name, "[", i, "] has shape ", t.sizes(),
              ", its param ", p.sizes());
  TORCH_CHECK(t.is_non_overlapping_and_dense(), kOp, name, "[", i,
              "] must be dense (no gaps, no overlap)");
  for (int64_t d = 0; d < p.dim(); ++d) {
    TORCH_CHECK(p.size(d) == 1 || t.stride(d) == p.stride(d), kOp, name, "[", i, "] has strides ",
                t.strides(), ", its param ", p.strides(), "; they must be laid out alike");
  }
}

void check_zero_dim(const at::Tensor& t, const char* name, const at::Device& device) {
  TORCH_CHECK(t.numel() == 1, kOp, name, " must have one element, got shape ", t.sizes());
  TORCH_CHECK(t.device() == device, kOp, name, " is on ", t.device(), ", the params on ", device);
  const at::ScalarType dtype = t.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf ||
                  dtype == at::kBFloat16,
              kOp, name, " must be float32, float64, float16 or bfloat16, got ", dtype);
}

}  // namespace

StepTypes check_step_args(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                          at::TensorList exp_avg_sqs, at::TensorList steps,
                          const std::optional<at::Tensor>& initial_loss, const at::Tensor& rows,
                          const at::Tensor& rows_host, const at::Tensor& chunk_tensor,
                          const at::Tensor& loss, const at::Tensor& take,
                          const std::optional<at::Tensor>& lr_tensor,
                          const std::optional<at::Tensor>& grad_scale, bool normalize_loss,
                          at::TensorList master_params, c10::DeviceType device_type) {
  const size_t n = params.size();
  const std::pair<at::TensorList, const char*> lists[] = {
      {grads, "grads"}, {exp_avgs, "exp_avgs"}, {exp_avg_sqs, "exp_avg_sqs"}, {steps, "steps"}};
  for (const auto& [list, name] : lists) {
    TORCH_CHECK(list.size() == n, kOp, name, " has ", list.size(), " tensors, params has ", n);
  }
  TORCH_CHECK(master_params.empty() || master_params.size() == n, kOp, "master_params has ",
              master_params.size(), " tensors, params has ", n, " (give one per param, or none)");
  TORCH_CHECK(initial_loss.has_value() || !normalize_loss, kOp,
              "normalize_loss=True needs initial_loss (f_1)");

  const at::Device device = n > 0 ? params[0].device() : take.device();
  TORCH_CHECK(device.type() == device_type, kOp, "this is the ", device_type,
              " kernel, but the tensors are on ", device);
  check_zero_dim(loss, "loss", device);
  check_zero_dim(take, "take", device);
  TORCH_CHECK(take.scalar_type() == at::kFloat, kOp, "take must be float32");
  if (lr_tensor.has_value()) check_zero_dim(*lr_tensor, "lr_tensor", device);
  if (grad_scale.has_value()) check_zero_dim(*grad_scale, "grad_scale", device);
  if (initial_loss.has_value()) {
    check_zero_dim(*initial_loss, "initial_loss", device);
    TORCH_CHECK(initial_loss->scalar_type() == at::kDouble, kOp,
                "initial_loss must be float64");
  }

  const int64_t rows_n = static_cast<int64_t>(n);
  TORCH_CHECK(rows.scalar_type() == at::kLong && rows.dim() == 2 && rows.size(0) == rows_n &&
                  rows.size(1) == kColumns && rows.is_contiguous(),
              kOp, "rows must be a contiguous int64 tensor of shape [", n, ", ", kColumns, "]");
  TORCH_CHECK(rows.device() == device, kOp, "rows is on ", rows.device(), ", the params on ",
              device);
  TORCH_CHECK(rows_host.scalar_type() == at::kLong && rows_host.sizes() == rows.sizes() &&
                  rows_host.is_contiguous() && rows_host.device().is_cpu(),
              kOp, "rows_host must be a contiguous int64 CPU tensor of shape [", n, ", ",
              kColumns, "]");
  TORCH_CHECK(chunk_tensor.scalar_type() == at::kInt && chunk_tensor.dim() == 1 &&
                  chunk_tensor.is_contiguous() && chunk_tensor.device() == device,
              kOp, "chunk_tensor must be a contiguous 1-d int32 tensor on ", device);
  StepTypes types;
  if (n == 0) return types;

  const at::ScalarType dtype = params[0].scalar_type();
  const bool supported = dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16 ||
                         (dtype == at::kDouble && device_type == c10::DeviceType::CPU);
  TORCH_CHECK(supported, kOp, "the ", device_type, " kernel does not support ", dtype,
              " params (it supports float32, float16, bfloat16",
              device_type == c10::DeviceType::CPU ? ", float64)" : ")");
  const bool half = dtype == at::kHalf || dtype == at::kBFloat16;
  // The bucket's gradient and moment dtypes are those of its first tensor; every tensor must
  // share them (the kernel is compiled per combination).
  const at::ScalarType grad_dtype = grads[0].scalar_type();
  TORCH_CHECK(grad_dtype == dtype || (half && grad_dtype == at::kFloat), kOp, "grads[0] is ",
              grad_dtype, " for ", dtype, " params: gradients must have the params' dtype, or "
              "float32 for float16/bfloat16 params");
  const at::ScalarType moment = exp_avgs[0].scalar_type();
  const bool moment_ok = dtype == at::kDouble ? moment == at::kDouble
                                              : (moment == at::kFloat || moment == at::kBFloat16);
  TORCH_CHECK(moment_ok, kOp, "exp_avgs[0] must be ",
              dtype == at::kDouble ? "Double" : "Float or BFloat16", " for ", dtype,
              " params, got ", moment);
  TORCH_CHECK(master_params.empty() || half, kOp,
              "master_params are for float16/bfloat16 params, not ", dtype);
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& p = params[i];
    TORCH_CHECK(p.scalar_type() == dtype && p.device() == device, kOp, "params[", i, "] is ",
                p.scalar_type(), " on ", p.device(), "; a bucket holds ", dtype, " on ", device);
    TORCH_CHECK(p.is_non_overlapping_and_dense(), kOp, "params[", i, "] must be dense");
    const std::tuple<const at::Tensor&, const char*, at::ScalarType> like[] = {
        {grads[i], "grads", grad_dtype}, {exp_avgs[i], "exp_avgs", moment},
        {exp_avg_sqs[i], "exp_avg_sqs", moment}};
    for (const auto& [t, name, want] : like) {
      TORCH_CHECK(t.scalar_type() == want && t.device() == device, kOp, name, "[", i,
                  "] must be ", want, " on ", device, ", got ", t.scalar_type(), " on ",
                  t.device());
      check_like_param(t, p, name, i);
    }
    if (!master_params.empty()) {
      const at::Tensor& mp = master_params[i];
      TORCH_CHECK(mp.scalar_type() == at::kFloat && mp.device() == device, kOp,
                  "master_params[", i, "] must be Float on ", device, ", got ",
                  mp.scalar_type(), " on ", mp.device());
      check_like_param(mp, p, "master_params", i);
    }
    TORCH_CHECK(steps[i].numel() == 1 && steps[i].scalar_type() == at::kFloat &&
                    steps[i].device() == device,
                kOp, "steps[", i, "] must be a one-element float32 tensor on ", device);
  }
  types.param = scalar_type_code(params[0]);
  types.grad = scalar_type_code(grads[0]);
  types.moment = scalar_type_code(exp_avgs[0]);
  types.master = !master_params.empty();
  return types;
}

KernelTable resolve_table(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                          at::TensorList exp_avg_sqs, at::TensorList steps,
                          at::TensorList master_params, const at::Tensor& rows,
                          const at::Tensor& rows_host, const at::Tensor& chunk_tensor,
                          bool allow_rebuild) {
  const int64_t n = static_cast<int64_t>(params.size());
  const int64_t* given = rows_host.const_data_ptr<int64_t>();
  std::vector<int64_t> expected(n * kColumns);
  int64_t num_chunks = 0;
  bool aligned = true;
  for (int64_t i = 0; i < n; ++i) {
    int64_t* row = expected.data() + i * kColumns;
    row[kParamAddr] = address(params[i]);
    row[kGradAddr] = address(grads[i]);
    row[kExpAvgAddr] = address(exp_avgs[i]);
    row[kExpAvgSqAddr] = address(exp_avg_sqs[i]);
    row[kStepAddr] = address(steps[i]);
    row[kMasterAddr] = master_params.empty() ? 0 : address(master_params[i]);
    row[kNumel] = params[i].numel();
    row[kFirstChunk] = num_chunks;
    // Not addresses: what the table says (the bucket's parameter indices and offsets).
    row[kParamIndex] = given[i * kColumns + kParamIndex];
    row[kElementOffset] = given[i * kColumns + kElementOffset];
    num_chunks += chunks_of(row[kNumel]);
    for (int c : {kParamAddr, kGradAddr, kExpAvgAddr, kExpAvgSqAddr, kMasterAddr}) {
      aligned = aligned && row[c] % kVectorBytes == 0;
    }
  }

  KernelTable table;
  table.num_chunks = num_chunks;
  table.aligned = aligned;
  const bool matches = chunk_tensor.numel() == num_chunks &&
                       std::equal(expected.begin(), expected.end(), given);
  if (matches) {
    table.rows = rows;
    table.chunk_tensor = chunk_tensor;
    return table;
  }
  TORCH_CHECK(allow_rebuild, kOp,
              "the pointer table does not point at the tensors passed, and a new one cannot be "
              "copied to the device while a CUDA graph is being captured; capture a step whose "
              "tensors match their bucket's table");
  // Copies of the tensors (torch.compile): never write through the stale addresses.
  const at::Device device = params[0].device();
  const auto host = at::TensorOptions().pinned_memory(device.is_cuda());
  at::Tensor rows_new = at::empty({n, kColumns}, host.dtype(at::kLong));
  std::copy(expected.begin(), expected.end(), rows_new.data_ptr<int64_t>());
  at::Tensor chunks_new = at::empty({num_chunks}, host.dtype(at::kInt));
  int32_t* chunk_out = chunks_new.data_ptr<int32_t>();
  for (int64_t i = 0; i < n; ++i) {
    const int64_t first = expected[i * kColumns + kFirstChunk];
    std::fill(chunk_out + first, chunk_out + first + chunks_of(params[i].numel()),
              static_cast<int32_t>(i));
  }
  // Pinned memory: the copies are asynchronous and the caching host allocator keeps the
  // buffers alive until they are done.
  table.rows = rows_new.to(device, /*non_blocking=*/true);
  table.chunk_tensor = chunks_new.to(device, /*non_blocking=*/true);
  table.rebuilt = true;
  return table;
}

// ============================================================================ CPU kernel
namespace {

// Instruction sets the CPU kernel is compiled for; the best one the processor runs is picked at
// the first call. ADAML_CPU_CAPABILITY=default|avx2|avx512 caps it (e.g. to test the others).
enum class Isa : int { kDefault = 0, kAvx2 = 1, kAvx512 = 2 };

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::kAvx512: return "avx512";
    case Isa::kAvx2: return "avx2";
    default: return "default";
  }
}

#if defined(__x86_64__) && defined(__GNUC__)
#define ADAML_X86_VARIANTS 1
#define ADAML_TARGET_AVX2 __attribute__((target("avx2,fma")))
#define ADAML_TARGET_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma")))
#else
#define ADAML_X86_VARIANTS 0
#endif

Isa detect_isa() {
#if ADAML_X86_VARIANTS
  __builtin_cpu_init();
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  if (avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq")) {
    return Isa::kAvx512;
  }
  if (avx2) return Isa::kAvx2;
#endif
  return Isa::kDefault;
}

Isa active_isa() {
  static const Isa isa = [] {
    const Isa best = detect_isa();
    const char* env = std::getenv("ADAML_CPU_CAPABILITY");
    if (env == nullptr || *env == '\0') return best;
    std::string want(env);
    std::transform(want.begin(), want.end(), want.begin(),
                   [](unsigned char c) { return static_cast<char>(std::tolower(c)); });
    Isa cap;
    if (want == "default") cap = Isa::kDefault;
    else if (want == "avx2") cap = Isa::kAvx2;
    else if (want == "avx512") cap = Isa::kAvx512;
    else TORCH_CHECK(false, "ADAML_CPU_CAPABILITY must be default, avx2 or avx512, got ", env);
    return std::min(best, cap);
  }();
  return isa;
}

template <typename C> struct CpuPlan {
  const int64_t* rows;
  const int32_t* chunk_tensor;
  const StepScalars<C>* scalars;  // one per tensor
  const uint32_t* keys;           // tensor_key() per tensor (stochastic rounding only)
  int decay;
  bool maximize;
  bool has_grad_scale;
};

#if defined(__GNUC__)
#define ADAML_INLINE inline __attribute__((always_inline))
#else
#define ADAML_INLINE inline
#endif

// `index` is the whole parameter's index of p[0] (stochastic rounding only). The storage types,
// stochastic rounding and whether there is a grad scale (a division per element) are compiled in
// (Cfg, kScale); the decay mode and maximize are bit masks (SwitchMasks): one branch-free SIMD
// loop per Cfg, kScale and instruction set serves them all.
template <typename Cfg, int kScale>
ADAML_INLINE void update_span(typename Cfg::P* __restrict p, const typename Cfg::G* __restrict g,
                              typename Cfg::M* __restrict m, typename Cfg::M* __restrict w,
                              typename Cfg::C* __restrict master, int64_t n, uint32_t key,
                              uint64_t index, const StepScalars<typename Cfg::C>& scalars,
                              int decay, bool maximize, bool has_grad_scale) {
  using C = typename Cfg::C;
  const StepScalars<C> s = scalars;  // a local copy: provably not aliased by the stores
  const SwitchMasks<C> on(decay, maximize, has_grad_scale);
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    step_element<Cfg, kScale>(p, master, Param<Cfg::GT>::load(g[i]), m, w, i, key,
                              index + static_cast<uint64_t>(i), s, on, Cfg::kSR);
  }
}

// Chunks [c0, c1) of the bucket; consecutive chunks of one tensor are done as one span.
template <typename Cfg, int kScale>
ADAML_INLINE void run_range(const CpuPlan<typename Cfg::C>& plan, int64_t c0, int64_t c1) {
  using C = typename Cfg::C;
  int64_t c = c0;
  while (c < c1) {
    const int64_t t = plan.chunk_tensor[c];
    const int64_t* row = plan.rows + t * kColumns;
    const int64_t first = row[kFirstChunk];
    const int64_t numel = row[kNumel];
    const int64_t last = std::min(c1, first + chunks_of(numel));
    const int64_t begin = (c - first) * kChunk;
    const int64_t end = std::min((last - first) * kChunk, numel);
    C* master = Cfg::kMaster ? reinterpret_cast<C*>(row[kMasterAddr]) + begin : nullptr;
    update_span<Cfg, kScale>(
        reinterpret_cast<typename Cfg::P*>(row[kParamAddr]) + begin,
        reinterpret_cast<const typename Cfg::G*>(row[kGradAddr]) + begin,
        reinterpret_cast<typename Cfg::M*>(row[kExpAvgAddr]) + begin,
        reinterpret_cast<typename Cfg::M*>(row[kExpAvgSqAddr]) + begin, master, end - begin,
        Cfg::kSR ? plan.keys[t] : 0u,
        static_cast<uint64_t>(row[kElementOffset]) + static_cast<uint64_t>(begin),
        plan.scalars[t], plan.decay, plan.maximize, plan.has_grad_scale);
    c = last;
  }
}

template <typename Cfg>
using RangeFn = void (*)(const CpuPlan<typename Cfg::C>&, int64_t, int64_t);

// One copy of the loop per instruction set: the compiler vectorizes each for its own ISA.
template <typename Cfg, int kScale>
void range_default(const CpuPlan<typename Cfg::C>& plan, int64_t c0, int64_t c1) {
  run_range<Cfg, kScale>(plan, c0, c1);
}
#if ADAML_X86_VARIANTS
template <typename Cfg, int kScale>
ADAML_TARGET_AVX2 void range_avx2(const CpuPlan<typename Cfg::C>& plan, int64_t c0, int64_t c1) {
  run_range<Cfg, kScale>(plan, c0, c1);
}
template <typename Cfg, int kScale>
ADAML_TARGET_AVX512 void range_avx512(const CpuPlan<typename Cfg::C>& plan, int64_t c0,
                                      int64_t c1) {
  run_range<Cfg, kScale>(plan, c0, c1);
}
#endif

template <typename Cfg, int kScale> RangeFn<Cfg> range_fn(Isa isa) {
#if ADAML_X86_VARIANTS
  if (isa == Isa::kAvx512) return &range_avx512<Cfg, kScale>;
  if (isa == Isa::kAvx2) return &range_avx2<Cfg, kScale>;
#endif
  (void)isa;
  return &range_default<Cfg, kScale>;
}

// Chunks per task: a task moves at least ~230 KB, which outweighs waking a thread.
constexpr int64_t kGrainChunks = 4;

struct CpuStep {
  const KernelTable* table;
  int64_t num_tensors;
  Hyper hyper;
  double loss, f1, lr, grad_scale;
  int decay_mode;
  bool maximize, has_grad_scale, stochastic_rounding;
  uint64_t seed;
};

template <typename Cfg> void run_cpu(const CpuStep& a) {
  using C = typename Cfg::C;
  const int64_t* rows = a.table->rows.const_data_ptr<int64_t>();
  std::vector<StepScalars<C>> scalars(a.num_tensors);
  std::vector<uint32_t> keys(Cfg::kSR ? a.num_tensors : 0);
  for (int64_t i = 0; i < a.num_tensors; ++i) {
    const int64_t* row = rows + i * kColumns;
    const float k = *reinterpret_cast<const float*>(row[kStepAddr]);
    scalars[i] = step_scalars<C>(a.hyper, a.loss, a.f1, k, a.lr, a.grad_scale);
    if (Cfg::kSR) {
      keys[i] = tensor_key(a.seed, static_cast<uint32_t>(k),
                           static_cast<uint32_t>(row[kParamIndex]));
    }
  }
  if (a.table->num_chunks == 0) return;

  const RangeFn<Cfg> fn = a.has_grad_scale ? range_fn<Cfg, kGradScale>(active_isa())
                                           : range_fn<Cfg, kNoGradScale>(active_isa());
  const CpuPlan<C> plan{rows, a.table->chunk_tensor.const_data_ptr<int32_t>(), scalars.data(),
                        keys.data(), a.decay_mode, a.maximize, a.has_grad_scale};
  // ATen's parallel_for is OpenMP here (the extension is built with -fopenmp) and follows
  // torch.set_num_threads. Each element is computed alone, so the split never changes results.
  at::parallel_for(0, a.table->num_chunks, kGrainChunks,
                   [&](int64_t c0, int64_t c1) { fn(plan, c0, c1); });
}

void fused_step_cpu(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                    at::TensorList exp_avg_sqs, at::TensorList steps,
                    const std::optional<at::Tensor>& initial_loss, const at::Tensor& rows,
                    const at::Tensor& rows_host, const at::Tensor& chunk_tensor,
                    const at::Tensor& loss, const at::Tensor& take,
                    const std::optional<at::Tensor>& lr_tensor,
                    const std::optional<at::Tensor>& grad_scale, double lr, double beta1,
                    double beta2, double eps, double gamma, double phi, double loss_offset,
                    double weight_decay, bool normalize_loss, bool decoupled_weight_decay,
                    bool maximize, at::TensorList master_params, bool stochastic_rounding,
                    int64_t seed) {
  const StepTypes types = check_step_args(
      params, grads, exp_avgs, exp_avg_sqs, steps, initial_loss, rows, rows_host, chunk_tensor,
      loss, take, lr_tensor, grad_scale, normalize_loss, master_params, c10::DeviceType::CPU);
  if (params.empty()) return;
  // A skipped step reads and writes nothing else.
  if (*take.const_data_ptr<float>() == 0.0f) return;
  const KernelTable table = resolve_table(params, grads, exp_avgs, exp_avg_sqs, steps,
                                          master_params, rows, rows_host, chunk_tensor,
                                          /*allow_rebuild=*/true);
  run_cpu_step(make_launch(table, static_cast<int64_t>(params.size()), types, loss, take,
                           lr_tensor, grad_scale, initial_loss, lr, beta1, beta2, eps, gamma,
                           phi, loss_offset, weight_decay, normalize_loss,
                           decoupled_weight_decay, maximize, stochastic_rounding, seed));
}

std::string cpu_capability() { return isa_name(active_isa()); }

}  // namespace

void run_cpu_step(const StepLaunch& s) {
  if (*s.take.const_data_ptr<float>() == 0.0f) return;  // a skipped step touches nothing
  CpuStep a;
  a.table = &s.table;
  a.num_tensors = s.num_tensors;
  a.hyper = s.hyper;
  a.loss = load_scalar(s.loss.const_data_ptr(), scalar_type_code(s.loss));
  a.f1 = s.initial_loss ? *s.initial_loss->const_data_ptr<double>() : 0.0;
  a.lr = s.lr_tensor ? load_scalar(s.lr_tensor->const_data_ptr(), scalar_type_code(*s.lr_tensor))
                     : s.hyper.lr;
  a.grad_scale = s.grad_scale ? load_scalar(s.grad_scale->const_data_ptr(),
                                            scalar_type_code(*s.grad_scale))
                              : 1.0;
  a.decay_mode = s.decay_mode;
  a.maximize = s.maximize;
  a.has_grad_scale = s.grad_scale.has_value();
  a.stochastic_rounding = s.stochastic_rounding;
  a.seed = s.seed;
  const StepTypes& t = s.types;
  dispatch_config</*kWithFloat64=*/true>(t.param, t.grad, t.moment, t.master,
                                         s.stochastic_rounding,
                                         [&](auto cfg) { run_cpu<decltype(cfg)>(a); });
}

StepLaunch make_launch(KernelTable table, int64_t num_tensors, StepTypes types,
                       const at::Tensor& loss, const at::Tensor& take,
                       const std::optional<at::Tensor>& lr_tensor,
                       const std::optional<at::Tensor>& grad_scale,
                       const std::optional<at::Tensor>& initial_loss, double lr, double beta1,
                       double beta2, double eps, double gamma, double phi, double loss_offset,
                       double weight_decay, bool normalize_loss, bool decoupled_weight_decay,
                       bool maximize, bool stochastic_rounding, int64_t seed) {
  StepLaunch s;
  s.table = std::move(table);
  s.num_tensors = num_tensors;
  s.types = types;
  s.loss = loss;
  s.take = take;
  s.lr_tensor = lr_tensor;
  s.grad_scale = grad_scale;
  s.initial_loss = initial_loss;
  s.hyper = make_hyper(lr, beta1, beta2, eps, gamma, phi, loss_offset, weight_decay,
                       normalize_loss);
  s.decay_mode =
      weight_decay == 0.0 ? kNoDecay : (decoupled_weight_decay ? kDecoupledDecay : kL2Decay);
  s.maximize = maximize;
  s.stochastic_rounding = stochastic_rounding;
  s.seed = static_cast<uint64_t>(seed);
  return s;
}

CudaEntryPoints& cuda_entry_points() {
  static CudaEntryPoints entry_points;
  return entry_points;
}

}  // namespace adaml

TORCH_LIBRARY(adaml_kernels, m) {
  // The fake (meta) implementation is registered from Python, in this module.
  m.set_python_module("adaml_kernels._extension");
  // Same arguments, same order, as adaml_kernels::triton_step_ (Bucket.fused_op_args).
  m.def(
      "fused_step_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, "
      "Tensor(c!)[] exp_avg_sqs, Tensor[] steps, Tensor? initial_loss, Tensor rows, "
      "Tensor rows_host, Tensor chunk_tensor, Tensor loss, Tensor take, Tensor? lr_tensor, "
      "Tensor? grad_scale, float lr, float beta1, float beta2, float eps, float gamma, "
      "float phi, float loss_offset, float weight_decay, bool normalize_loss, "
      "bool decoupled_weight_decay, bool maximize, Tensor(d!)[] master_params, "
      "bool stochastic_rounding, int seed) -> ()");
  // The instruction set the CPU kernel runs with: "avx512", "avx2" or "default".
  m.def("cpu_capability() -> str", &adaml::cpu_capability);
}

TORCH_LIBRARY_IMPL(adaml_kernels, CPU, m) { m.impl("fused_step_", &adaml::fused_step_cpu); }
