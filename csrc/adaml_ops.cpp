// adaml_kernels._C: every op's schema (the one kernel ABI), the host-side checks shared with the
// CUDA launcher, and the CPU kernel (one call per bucket, OpenMP across cores, SIMD in the inner
// loop). The steady-state path's host ops are in adaml_fast_path.cpp; the Python module, empty,
// in adaml_module.cpp.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/csrc/autograd/variable.h>
#include <torch/library.h>

#include <algorithm>
#include <cctype>
#include <cstdlib>
#include <string>
#include <vector>

#include "adaml_quant8.h"
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

int moment_type_code(const at::Tensor& t) {
  return t.scalar_type() == at::kByte ? kUInt8 : scalar_type_code(t);
}

void bump_versions(std::initializer_list<at::TensorList> written) {
  for (at::TensorList tensors : written) {
    for (const at::Tensor& t : tensors) {
      if (t.defined() && !t.is_inference()) torch::autograd::impl::bump_version(t);
    }
  }
}

namespace {

constexpr const char* kOp = "adaml_kernels: ";

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

void check_launch_values(c10::ArrayRef<double> hyper, c10::ArrayRef<int64_t> config) {
  TORCH_CHECK(hyper.size() == kHyperFields, kOp, "hyper must have ", kHyperFields,
              " values (layout.Hyper), got ", hyper.size());
  TORCH_CHECK(config.size() == kConfigFields, kOp, "config must have ", kConfigFields,
              " values (layout.Config), got ", config.size());
  for (int f : {kConfigParamDtype, kConfigGradDtype, kConfigMomentDtype}) {
    const int64_t top = f == kConfigMomentDtype ? kUInt8 : kBFloat16;
    TORCH_CHECK(config[f] >= kFloat32 && config[f] <= top, kOp, "config[", f,
                "] is not a dtype code: ", config[f]);
  }
  const int64_t param = config[kConfigParamDtype], grad = config[kConfigGradDtype];
  const int64_t moment = config[kConfigMomentDtype];
  const bool half = param == kFloat16 || param == kBFloat16;
  TORCH_CHECK(grad == param || (half && grad == kFloat32), kOp,
              "gradients must have the params' dtype, or float32 for float16/bfloat16 params");
  TORCH_CHECK(param == kFloat64 ? moment == kFloat64
                                : (moment == kFloat32 || moment == kBFloat16 || moment == kUInt8),
              kOp, "moments must be float64 for float64 params, else float32, bfloat16 or uint8 "
              "(8-bit codes)");
  TORCH_CHECK(config[kConfigMaster] == 0 || half, kOp,
              "master weights are for float16/bfloat16 params");
}

void check_step_args(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                     at::TensorList exp_avg_sqs, at::TensorList steps,
                     at::TensorList master_params, at::TensorList moment_scales,
                     const at::Tensor& rows,
                     const at::Tensor& rows_host, const at::Tensor& chunk_tensor,
                     c10::ArrayRef<double> hyper, c10::ArrayRef<int64_t> config,
                     const at::Tensor& loss, const at::Tensor& take,
                     const std::optional<at::Tensor>& lr_tensor,
                     const std::optional<at::Tensor>& grad_scale,
                     const std::optional<at::Tensor>& initial_loss,
                     c10::DeviceType device_type) {
  check_launch_values(hyper, config);
  const size_t n = params.size();
  const std::pair<at::TensorList, const char*> lists[] = {
      {grads, "grads"}, {exp_avgs, "exp_avgs"}, {exp_avg_sqs, "exp_avg_sqs"}, {steps, "steps"}};
  for (const auto& [list, name] : lists) {
    TORCH_CHECK(list.size() == n, kOp, name, " has ", list.size(), " tensors, params has ", n);
  }
  TORCH_CHECK(master_params.size() == (config[kConfigMaster] ? n : 0), kOp,
              "master_params has ", master_params.size(), " tensors; config says ",
              config[kConfigMaster] ? "one per param" : "none");
  const bool quantized = config[kConfigMomentDtype] == kUInt8;
  TORCH_CHECK(moment_scales.size() == (quantized ? 2 * n : 0), kOp, "moment_scales has ",
              moment_scales.size(), " tensors; config says ",
              quantized ? "two per param (8-bit moments)" : "none");
  TORCH_CHECK(initial_loss.has_value() || hyper[kHyperNormalizeLoss] == 0.0, kOp,
              "normalize_loss needs initial_loss (f_1)");

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
  if (n == 0) return;

  const at::ScalarType dtype = params[0].scalar_type();
  const bool supported = dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16 ||
                         (dtype == at::kDouble && device_type == c10::DeviceType::CPU);
  TORCH_CHECK(supported, kOp, "the ", device_type, " kernel does not support ", dtype,
              " params (it supports float32, float16, bfloat16",
              device_type == c10::DeviceType::CPU ? ", float64)" : ")");
  const at::ScalarType grad_dtype = grads[0].scalar_type();
  const at::ScalarType moment = exp_avgs[0].scalar_type();
  TORCH_CHECK(scalar_type_code(params[0]) == config[kConfigParamDtype] &&
                  scalar_type_code(grads[0]) == config[kConfigGradDtype] &&
                  moment_type_code(exp_avgs[0]) == config[kConfigMomentDtype],
              kOp, "config names other dtypes than the tensors' (", dtype, " params, ",
              grad_dtype, " grads, ", moment, " moments)");
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
    if (quantized) {
      TORCH_CHECK(dtype != at::kDouble, kOp, "float64 params have float64 moments, not 8-bit");
      const int64_t blocks = (p.numel() + kQuantBlock - 1) / kQuantBlock;
      for (size_t k : {i, i + n}) {
        const at::Tensor& sc = moment_scales[k];
        TORCH_CHECK(sc.scalar_type() == at::kFloat && sc.device() == device && sc.dim() == 1 &&
                        sc.numel() == blocks && sc.is_contiguous(),
                    kOp, "moment_scales[", k, "] must be a contiguous float32 tensor of ",
                    blocks, " block scales on ", device);
      }
    }
  }
}

void check_telemetry(const std::optional<at::Tensor>& telemetry, int64_t num_chunks,
                     const at::Device& device) {
  if (!telemetry) return;
  TORCH_CHECK(telemetry->scalar_type() == at::kDouble && telemetry->dim() == 2 &&
                  telemetry->size(0) == num_chunks && telemetry->size(1) == kFigures &&
                  telemetry->is_contiguous() && telemetry->device() == device,
              kOp, "telemetry must be a contiguous float64 tensor of shape [", num_chunks, ", ",
              kFigures, "] (a row per chunk, layout.Figure) on ", device);
}

KernelTable given_table(const at::Tensor& rows, const at::Tensor& rows_host,
                        const at::Tensor& chunk_tensor) {
  KernelTable table;
  table.rows = rows;
  table.chunk_tensor = chunk_tensor;
  table.num_chunks = chunk_tensor.numel();
  const int64_t* r = rows_host.const_data_ptr<int64_t>();
  bool aligned = true;
  for (int64_t i = 0; i < rows_host.size(0); ++i) {
    for (int c : {kParamAddr, kGradAddr, kExpAvgAddr, kExpAvgSqAddr, kMasterAddr}) {
      aligned = aligned && r[i * kColumns + c] % kVectorBytes == 0;
    }
  }
  table.aligned = aligned;
  return table;
}

KernelTable resolve_table(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                          at::TensorList exp_avg_sqs, at::TensorList steps,
                          at::TensorList master_params, at::TensorList moment_scales,
                          const at::Tensor& rows,
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
    row[kExpAvgScaleAddr] = moment_scales.empty() ? 0 : address(moment_scales[i]);
    row[kExpAvgSqScaleAddr] = moment_scales.empty() ? 0 : address(moment_scales[i + n]);
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
  double* telemetry;  // kTelemetry: [num_chunks, kFigures], a row per chunk
};

#if defined(__GNUC__)
#define ADAML_INLINE inline __attribute__((always_inline))
#else
#define ADAML_INLINE inline
#endif

// Whether lost updates can occur (fp16/bf16 parameters): the loops add them up only then.
template <typename Cfg>
constexpr bool kHalfParam = Cfg::PT == kFloat16 || Cfg::PT == kBFloat16;

// The figures of a span, summed (kTelemetry).
template <typename C> struct SpanFigures {
  C sgd_like = C(0), squared_change = C(0), lost = C(0), saturated = C(0);
};

// `index` is the whole parameter's index of p[0] (stochastic rounding only). The storage types,
// stochastic rounding and whether there is a grad scale (a division per element) are compiled in
// (Cfg, kScale); the decay mode and maximize are bit masks (SwitchMasks): one branch-free SIMD
// loop per Cfg, kScale and instruction set serves them all. kTelemetry: the loop also sums the
// elements' figures (SIMD reductions), returned; otherwise it is the plain update.
template <typename Cfg, int kScale, bool kTelemetry>
ADAML_INLINE SpanFigures<typename Cfg::C> update_span(typename Cfg::P* __restrict p, const typename Cfg::G* __restrict g,
                              typename Cfg::M* __restrict m, typename Cfg::M* __restrict w,
                              typename Cfg::C* __restrict master, int64_t n, uint32_t key,
                              uint64_t index, const StepScalars<typename Cfg::C>& scalars,
                              int decay, bool maximize, bool has_grad_scale) {
  using C = typename Cfg::C;
  const StepScalars<C> s = scalars;  // a local copy: provably not aliased by the stores
  const SwitchMasks<C> on(decay, maximize, has_grad_scale);
  SpanFigures<C> out;
  if constexpr (kTelemetry) {
    C sgd_like = 0, squared_change = 0, lost = 0, saturated = 0;
#pragma omp simd reduction(+ : sgd_like, squared_change, lost, saturated)
    for (int64_t i = 0; i < n; ++i) {
      ElementFigures<C> f;
      step_element<Cfg, kScale, true>(p, master, Param<Cfg::GT>::load(g[i]), m, w, i, key,
                                      index + static_cast<uint64_t>(i), s, on, Cfg::kSR, &f);
      sgd_like += f.sgd_like;
      squared_change += f.squared_change;
      if constexpr (kHalfParam<Cfg>) lost += f.lost;  // (always 0 for float32/float64)
      saturated += f.saturated;
    }
    out = SpanFigures<C>{sgd_like, squared_change, lost, saturated};
  } else {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) {
      step_element<Cfg, kScale>(p, master, Param<Cfg::GT>::load(g[i]), m, w, i, key,
                                index + static_cast<uint64_t>(i), s, on, Cfg::kSR);
    }
  }
  return out;
}

// One block of len float values as 8-bit codes and the block's scale (adaml_quant8.h): the
// integer maximum of their magnitude bits gives the scale, then each value is encoded, rounded
// stochastically with `random` (kRandomBits each) under kSR.
template <int kMap, bool kSR = false>
ADAML_INLINE void encode_block(const float* __restrict values, int64_t len,
                               uint8_t* __restrict codes, float* scale,
                               const uint32_t* __restrict random = nullptr) {
  uint32_t absmax = 0;
#pragma omp simd reduction(max : absmax)
  for (int64_t i = 0; i < len; ++i) {
    const uint32_t b = magnitude_bits(float_to_bits(values[i]));
    absmax = b > absmax ? b : absmax;
  }
  const int exponent = scale_exponent<kMap>(absmax);
  *scale = scale_of(exponent);
#pragma omp simd
  for (int64_t i = 0; i < len; ++i) {
    codes[i] = kSR ? encode8_stochastic<kMap>(float_to_bits(values[i]), exponent, random[i])
                   : encode8<kMap>(float_to_bits(values[i]), exponent);
  }
}

// The same for 8-bit moments, a block of kQuantBlock elements at a time (n counts from a block
// boundary), in four short loops that each vectorize on their own: decode the block's moments
// into float arrays, update them (the float update of every other moment dtype), and encode
// each moment's block with its new scale (encode_block).
template <typename Cfg, int kScale, bool kTelemetry>
ADAML_INLINE SpanFigures<float> update_span_8bit(typename Cfg::P* __restrict p,
                                   const typename Cfg::G* __restrict g, uint8_t* __restrict m,
                                   uint8_t* __restrict w, float* __restrict master,
                                   float* __restrict m_scales, float* __restrict w_scales,
                                   int64_t n, uint32_t key, uint64_t index,
                                   const StepScalars<float>& scalars, int decay, bool maximize,
                                   bool has_grad_scale) {
  const StepScalars<float> s = scalars;
  const SwitchMasks<float> on(decay, maximize, has_grad_scale);
  alignas(64) float mf[kQuantBlock];
  alignas(64) float wf[kQuantBlock];
  alignas(64) uint32_t m_random[Cfg::kSR ? kQuantBlock : 1];
  alignas(64) uint32_t w_random[Cfg::kSR ? kQuantBlock : 1];
  SpanFigures<float> out;
  for (int64_t start = 0; start < n; start += kQuantBlock) {
    const int64_t len = std::min<int64_t>(kQuantBlock, n - start);
    const int64_t block = start / kQuantBlock;
    uint8_t* __restrict mb = m + start;
    uint8_t* __restrict wb = w + start;
    const int m_exp = exponent_of_scale(m_scales[block]);
    const int w_exp = exponent_of_scale(w_scales[block]);
#pragma omp simd
    for (int64_t i = 0; i < len; ++i) {
      mf[i] = decode8<kExpAvgMap>(mb[i], m_exp);
      wf[i] = decode8<kExpAvgSqMap>(wb[i], w_exp);
    }
    typename Cfg::P* __restrict pb = p + start;
    const typename Cfg::G* __restrict gb = g + start;
    float* __restrict xb = Cfg::kMaster ? master + start : nullptr;
    if constexpr (kTelemetry) {
      float sgd_like = 0, squared_change = 0, lost = 0, saturated = 0;
#pragma omp simd reduction(+ : sgd_like, squared_change, lost, saturated)
      for (int64_t i = 0; i < len; ++i) {
        const typename Cfg::P old = pb[i];
        float pc = Cfg::kMaster ? xb[i] : Param<Cfg::PT>::load(old);
        const float before = pc;
        ElementFigures<float> f;
        update_element<float, kScale, true>(pc, Param<Cfg::GT>::load(gb[i]), mf[i], wf[i], s,
                                            on, &f);
        const uint32_t bits =
            Cfg::kSR ? element_bits(key, index + static_cast<uint64_t>(start + i)) : 0u;
        if (Cfg::kMaster) xb[i] = pc;
        const typename Cfg::P stored = Param<Cfg::PT>::store(pc, bits, Cfg::kSR);
        pb[i] = stored;
        if constexpr (Cfg::kSR) {
          m_random[i] = exp_avg_code_bits(bits);
          w_random[i] = exp_avg_sq_code_bits(bits);
        }
        measure_store<Cfg>(f, old, stored, before, pc, wf[i]);
        sgd_like += f.sgd_like;
        squared_change += f.squared_change;
        if constexpr (kHalfParam<Cfg>) lost += f.lost;
        saturated += f.saturated;
      }
      out.sgd_like += sgd_like;
      out.squared_change += squared_change;
      out.lost += lost;
      out.saturated += saturated;
    } else {
#pragma omp simd
      for (int64_t i = 0; i < len; ++i) {
        float pc = Cfg::kMaster ? xb[i] : Param<Cfg::PT>::load(pb[i]);
        update_element<float, kScale>(pc, Param<Cfg::GT>::load(gb[i]), mf[i], wf[i], s, on);
        const uint32_t bits =
            Cfg::kSR ? element_bits(key, index + static_cast<uint64_t>(start + i)) : 0u;
        if (Cfg::kMaster) xb[i] = pc;
        pb[i] = Param<Cfg::PT>::store(pc, bits, Cfg::kSR);
        if constexpr (Cfg::kSR) {
          m_random[i] = exp_avg_code_bits(bits);
          w_random[i] = exp_avg_sq_code_bits(bits);
        }
      }
    }
    encode_block<kExpAvgMap, Cfg::kSR>(mf, len, mb, m_scales + block, m_random);
    encode_block<kExpAvgSqMap, Cfg::kSR>(wf, len, wb, w_scales + block, w_random);
  }
  return out;
}

// Chunks [c0, c1) of the bucket; consecutive chunks of one tensor are done as one span (under
// kTelemetry, each chunk is a span, whose figures fill its row of plan.telemetry).
template <typename Cfg, int kScale, bool kTelemetry>
ADAML_INLINE void run_range(const CpuPlan<typename Cfg::C>& plan, int64_t c0, int64_t c1) {
  using C = typename Cfg::C;
  int64_t c = c0;
  while (c < c1) {
    const int64_t t = plan.chunk_tensor[c];
    const int64_t* row = plan.rows + t * kColumns;
    const int64_t first = row[kFirstChunk];
    const int64_t numel = row[kNumel];
    const int64_t last = kTelemetry ? c + 1 : std::min(c1, first + chunks_of(numel));
    const int64_t begin = (c - first) * kChunk;
    const int64_t end = std::min((last - first) * kChunk, numel);
    C* master = Cfg::kMaster ? reinterpret_cast<C*>(row[kMasterAddr]) + begin : nullptr;
    SpanFigures<C> figures;
    if constexpr (Cfg::MT == kUInt8) {
      const int64_t first_block = begin / kQuantBlock;  // chunks start on block boundaries
      figures = update_span_8bit<Cfg, kScale, kTelemetry>(
          reinterpret_cast<typename Cfg::P*>(row[kParamAddr]) + begin,
          reinterpret_cast<const typename Cfg::G*>(row[kGradAddr]) + begin,
          reinterpret_cast<uint8_t*>(row[kExpAvgAddr]) + begin,
          reinterpret_cast<uint8_t*>(row[kExpAvgSqAddr]) + begin, master,
          reinterpret_cast<float*>(row[kExpAvgScaleAddr]) + first_block,
          reinterpret_cast<float*>(row[kExpAvgSqScaleAddr]) + first_block, end - begin,
          Cfg::kSR ? plan.keys[t] : 0u,
          static_cast<uint64_t>(row[kElementOffset]) + static_cast<uint64_t>(begin),
          plan.scalars[t], plan.decay, plan.maximize, plan.has_grad_scale);
    } else {
      figures = update_span<Cfg, kScale, kTelemetry>(
          reinterpret_cast<typename Cfg::P*>(row[kParamAddr]) + begin,
          reinterpret_cast<const typename Cfg::G*>(row[kGradAddr]) + begin,
          reinterpret_cast<typename Cfg::M*>(row[kExpAvgAddr]) + begin,
          reinterpret_cast<typename Cfg::M*>(row[kExpAvgSqAddr]) + begin, master, end - begin,
          Cfg::kSR ? plan.keys[t] : 0u,
          static_cast<uint64_t>(row[kElementOffset]) + static_cast<uint64_t>(begin),
          plan.scalars[t], plan.decay, plan.maximize, plan.has_grad_scale);
    }
    if constexpr (kTelemetry) {
      double* out = plan.telemetry + c * kFigures;
      out[kFigureSgdLike] = static_cast<double>(figures.sgd_like);
      out[kFigureSquaredChange] = static_cast<double>(figures.squared_change);
      out[kFigureLost] = static_cast<double>(figures.lost);
      out[kFigureSaturated] = static_cast<double>(figures.saturated);
    }
    c = last;
  }
}

template <typename Cfg>
using RangeFn = void (*)(const CpuPlan<typename Cfg::C>&, int64_t, int64_t);

// One copy of the loop per instruction set: the compiler vectorizes each for its own ISA.
template <typename Cfg, int kScale, bool kTelemetry>
void range_default(const CpuPlan<typename Cfg::C>& plan, int64_t c0, int64_t c1) {
  run_range<Cfg, kScale, kTelemetry>(plan, c0, c1);
}
#if ADAML_X86_VARIANTS
template <typename Cfg, int kScale, bool kTelemetry>
ADAML_TARGET_AVX2 void range_avx2(const CpuPlan<typename Cfg::C>& plan, int64_t c0, int64_t c1) {
  run_range<Cfg, kScale, kTelemetry>(plan, c0, c1);
}
template <typename Cfg, int kScale, bool kTelemetry>
ADAML_TARGET_AVX512 void range_avx512(const CpuPlan<typename Cfg::C>& plan, int64_t c0,
                                      int64_t c1) {
  run_range<Cfg, kScale, kTelemetry>(plan, c0, c1);
}
#endif

template <typename Cfg, int kScale, bool kTelemetry> RangeFn<Cfg> range_fn(Isa isa) {
#if ADAML_X86_VARIANTS
  if (isa == Isa::kAvx512) return &range_avx512<Cfg, kScale, kTelemetry>;
  if (isa == Isa::kAvx2) return &range_avx2<Cfg, kScale, kTelemetry>;
#endif
  (void)isa;
  return &range_default<Cfg, kScale, kTelemetry>;
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
  double* telemetry;  // nullptr: no telemetry (the loops without it run)
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

  const Isa isa = active_isa();
  const RangeFn<Cfg> fn =
      a.telemetry ? (a.has_grad_scale ? range_fn<Cfg, kGradScale, true>(isa)
                                      : range_fn<Cfg, kNoGradScale, true>(isa))
                  : (a.has_grad_scale ? range_fn<Cfg, kGradScale, false>(isa)
                                      : range_fn<Cfg, kNoGradScale, false>(isa));
  const CpuPlan<C> plan{rows, a.table->chunk_tensor.const_data_ptr<int32_t>(), scalars.data(),
                        keys.data(), a.decay_mode, a.maximize, a.has_grad_scale, a.telemetry};
  // ATen's parallel_for is OpenMP here (the extension is built with -fopenmp) and follows
  // torch.set_num_threads. Each element is computed alone, so the split never changes results.
  at::parallel_for(0, a.table->num_chunks, kGrainChunks,
                   [&](int64_t c0, int64_t c1) { fn(plan, c0, c1); });
}

void fused_step_cpu(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                    at::TensorList exp_avg_sqs, at::TensorList steps,
                    at::TensorList master_params, at::TensorList moment_scales,
                    const at::Tensor& rows,
                    const at::Tensor& rows_host, const at::Tensor& chunk_tensor,
                    c10::ArrayRef<double> hyper, c10::ArrayRef<int64_t> config,
                    const at::Tensor& loss, const at::Tensor& take,
                    const std::optional<at::Tensor>& lr_tensor,
                    const std::optional<at::Tensor>& grad_scale,
                    const std::optional<at::Tensor>& initial_loss,
                    const std::optional<at::Tensor>& telemetry) {
  check_step_args(params, grads, exp_avgs, exp_avg_sqs, steps, master_params, moment_scales,
                  rows, rows_host, chunk_tensor, hyper, config, loss, take, lr_tensor,
                  grad_scale, initial_loss, c10::DeviceType::CPU);
  check_telemetry(telemetry, chunk_tensor.numel(), take.device());
  bump_versions({params, exp_avgs, exp_avg_sqs, master_params, moment_scales});
  if (params.empty()) return;
  // A skipped step reads and writes nothing else.
  if (*take.const_data_ptr<float>() == 0.0f) return;
  const KernelTable table = resolve_table(params, grads, exp_avgs, exp_avg_sqs, steps,
                                          master_params, moment_scales, rows, rows_host,
                                          chunk_tensor, /*allow_rebuild=*/true);
  StepLaunch launch = make_launch(table, hyper, config, loss, take, lr_tensor, grad_scale,
                                  initial_loss);
  launch.telemetry = telemetry;
  run_cpu_step(launch);
}

std::string cpu_capability() { return isa_name(active_isa()); }

// The 8-bit quantizer on its own (adaml_quant8.h), for tests against the other backends'.
template <typename F> void for_each_map(int64_t map, F&& f) {
  TORCH_CHECK(map == kExpAvgMap || map == kExpAvgSqMap, kOp, "map must be ", kExpAvgMap,
              " (exp_avg) or ", kExpAvgSqMap, " (exp_avg_sq), got ", map);
  map == kExpAvgMap ? f(std::integral_constant<int, kExpAvgMap>{})
                    : f(std::integral_constant<int, kExpAvgSqMap>{});
}

std::tuple<at::Tensor, at::Tensor> quantize_8bit(const at::Tensor& values, int64_t map,
                                                 const std::optional<at::Tensor>& random) {
  TORCH_CHECK(values.scalar_type() == at::kFloat && values.device().is_cpu() &&
                  values.is_contiguous(),
              kOp, "quantize_8bit takes a contiguous float32 CPU tensor");
  TORCH_CHECK(!random || (random->scalar_type() == at::kInt && random->device().is_cpu() &&
                          random->is_contiguous() && random->sizes() == values.sizes()),
              kOp, "quantize_8bit: random must be a contiguous int32 CPU tensor of the "
              "values' shape");
  const uint32_t* r =
      random ? reinterpret_cast<const uint32_t*>(random->const_data_ptr<int32_t>()) : nullptr;
  if (r) {
    for (int64_t i = 0; i < random->numel(); ++i) {
      TORCH_CHECK(r[i] < (1u << kRandomBits), kOp, "quantize_8bit: random[", i, "] = ", r[i],
                  " is not below 2^", kRandomBits);
    }
  }
  const int64_t n = values.numel();
  const int64_t blocks = (n + kQuantBlock - 1) / kQuantBlock;
  at::Tensor codes = at::empty(values.sizes(), values.options().dtype(at::kByte));
  at::Tensor scales = at::empty({blocks}, values.options());
  const float* x = values.const_data_ptr<float>();
  uint8_t* c = codes.data_ptr<uint8_t>();
  float* sc = scales.data_ptr<float>();
  for_each_map(map, [&](auto mapc) {
    constexpr int M = decltype(mapc)::value;
    at::parallel_for(0, blocks, 64, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t start = b * kQuantBlock;
        const int64_t len = std::min(kQuantBlock, n - start);
        if (r) {
          encode_block<M, true>(x + start, len, c + start, sc + b, r + start);
        } else {
          encode_block<M>(x + start, len, c + start, sc + b);
        }
      }
    });
  });
  return {codes, scales};
}

at::Tensor dequantize_8bit(const at::Tensor& codes, const at::Tensor& scales, int64_t map) {
  const int64_t n = codes.numel();
  const int64_t blocks = (n + kQuantBlock - 1) / kQuantBlock;
  TORCH_CHECK(codes.scalar_type() == at::kByte && codes.device().is_cpu() &&
                  codes.is_contiguous() && scales.scalar_type() == at::kFloat &&
                  scales.device().is_cpu() && scales.is_contiguous() &&
                  scales.numel() == blocks,
              kOp, "dequantize_8bit takes contiguous uint8 codes and ", blocks,
              " float32 block scales on the CPU");
  at::Tensor out = at::empty(codes.sizes(), scales.options());
  const uint8_t* c = codes.const_data_ptr<uint8_t>();
  const float* sc = scales.const_data_ptr<float>();
  float* y = out.data_ptr<float>();
  for_each_map(map, [&](auto mapc) {
    constexpr int M = decltype(mapc)::value;
    at::parallel_for(0, n, 1 << 16, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) y[i] = decode8<M>(c[i], exponent_of_scale(sc[i / kQuantBlock]));
    });
  });
  return out;
}

// The C++ copy of adaml_kernels/layout.py's constants, for tests/test_layout.py.
c10::Dict<std::string, int64_t> layout_constants() {
  c10::Dict<std::string, int64_t> out;
  out.insert("chunk", kChunk);
  out.insert("columns", kColumns);
  out.insert("vector_bytes", kVectorBytes);
  out.insert("hyper_fields", kHyperFields);
  out.insert("config_fields", kConfigFields);
  out.insert("mix_1", kMix1);
  out.insert("mix_2", kMix2);
  out.insert("seed_salt", kSeedSalt);
  out.insert("sq_stream", kSqStream);
  out.insert("quant_block", kQuantBlock);
  out.insert("min_8bit_numel", kMin8BitNumel);
  out.insert("quant_mantissa_bits", kMantissaBits);
  out.insert("quant_random_bits", kRandomBits);
  out.insert("figures", kFigures);
  const std::pair<const char*, int64_t> figures[] = {
      {"sgd_like", kFigureSgdLike}, {"squared_change", kFigureSquaredChange},
      {"lost", kFigureLost}, {"saturated", kFigureSaturated}};
  for (const auto& [name, value] : figures) out.insert(std::string("figure_") + name, value);
  const std::pair<const char*, int64_t> columns[] = {
      {"param", kParamAddr}, {"grad", kGradAddr}, {"exp_avg", kExpAvgAddr},
      {"exp_avg_sq", kExpAvgSqAddr}, {"step", kStepAddr}, {"master", kMasterAddr},
      {"numel", kNumel}, {"first_chunk", kFirstChunk}, {"param_index", kParamIndex},
      {"element_offset", kElementOffset}, {"exp_avg_scale", kExpAvgScaleAddr},
      {"exp_avg_sq_scale", kExpAvgSqScaleAddr}};
  for (const auto& [name, value] : columns) out.insert(std::string("column_") + name, value);
  const std::pair<const char*, int64_t> dtypes[] = {
      {"float32", kFloat32}, {"float64", kFloat64}, {"float16", kFloat16},
      {"bfloat16", kBFloat16}, {"uint8", kUInt8}};
  for (const auto& [name, value] : dtypes) out.insert(std::string("dtype_") + name, value);
  const std::pair<const char*, int64_t> hyper[] = {
      {"lr", kHyperLr}, {"beta1", kHyperBeta1}, {"beta2", kHyperBeta2}, {"eps", kHyperEps},
      {"gamma", kHyperGamma}, {"phi", kHyperPhi}, {"loss_offset", kHyperLossOffset},
      {"weight_decay", kHyperWeightDecay}, {"normalize_loss", kHyperNormalizeLoss},
      {"decoupled_weight_decay", kHyperDecoupledWeightDecay}, {"maximize", kHyperMaximize}};
  for (const auto& [name, value] : hyper) out.insert(std::string("hyper_") + name, value);
  const std::pair<const char*, int64_t> config[] = {
      {"param_dtype", kConfigParamDtype}, {"grad_dtype", kConfigGradDtype},
      {"moment_dtype", kConfigMomentDtype}, {"master", kConfigMaster},
      {"stochastic_rounding", kConfigStochasticRounding}, {"seed", kConfigSeed}};
  for (const auto& [name, value] : config) out.insert(std::string("config_") + name, value);
  return out;
}

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
  a.telemetry = s.telemetry ? s.telemetry->data_ptr<double>() : nullptr;
  dispatch_config</*kWithFloat64=*/true>(s.param_type, s.grad_type, s.moment_type, s.master,
                                         s.stochastic_rounding,
                                         [&](auto cfg) { run_cpu<decltype(cfg)>(a); });
}

StepLaunch make_launch(KernelTable table, c10::ArrayRef<double> hyper,
                       c10::ArrayRef<int64_t> config, const at::Tensor& loss,
                       const at::Tensor& take, const std::optional<at::Tensor>& lr_tensor,
                       const std::optional<at::Tensor>& grad_scale,
                       const std::optional<at::Tensor>& initial_loss) {
  StepLaunch s;
  s.num_tensors = table.rows.size(0);
  s.table = std::move(table);
  s.param_type = static_cast<int>(config[kConfigParamDtype]);
  s.grad_type = static_cast<int>(config[kConfigGradDtype]);
  s.moment_type = static_cast<int>(config[kConfigMomentDtype]);
  s.master = config[kConfigMaster] != 0;
  s.loss = loss;
  s.take = take;
  s.lr_tensor = lr_tensor;
  s.grad_scale = grad_scale;
  const bool normalize_loss = hyper[kHyperNormalizeLoss] != 0.0;
  s.initial_loss = normalize_loss ? initial_loss : std::nullopt;
  s.hyper = Hyper{hyper[kHyperLr], hyper[kHyperBeta1], hyper[kHyperBeta2], hyper[kHyperEps],
                  hyper[kHyperGamma], hyper[kHyperPhi], hyper[kHyperLossOffset],
                  hyper[kHyperWeightDecay], normalize_loss};
  const double weight_decay = hyper[kHyperWeightDecay];
  s.decay_mode = weight_decay == 0.0
                     ? kNoDecay
                     : (hyper[kHyperDecoupledWeightDecay] != 0.0 ? kDecoupledDecay : kL2Decay);
  s.maximize = hyper[kHyperMaximize] != 0.0;
  s.stochastic_rounding = config[kConfigStochasticRounding] != 0;
  s.seed = static_cast<uint64_t>(config[kConfigSeed]);
  return s;
}

}  // namespace adaml

// The one kernel ABI: every entry point of the compiled kernels is one of these ops. Their fake
// implementations are registered from Python (adaml_kernels/_extension.py).
TORCH_LIBRARY(adaml_kernels, m) {
  m.set_python_module("adaml_kernels._extension");
  // One bucket's step over the tensors passed (the general path, torch.compile, the functional
  // form). Same schema as adaml_kernels::triton_step_ (Bucket.fused_op_args). hyper and config
  // are layout.Hyper and layout.Config; telemetry, if given, gets each chunk's figures
  // (layout.Figure; a skipped step writes none).
  m.def(
      "fused_step_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, "
      "Tensor(c!)[] exp_avg_sqs, Tensor[] steps, Tensor(d!)[] master_params, "
      "Tensor(e!)[] moment_scales, Tensor rows, Tensor rows_host, Tensor chunk_tensor, "
      "float[] hyper, int[] config, Tensor loss, Tensor take, Tensor? lr_tensor, "
      "Tensor? grad_scale, Tensor? initial_loss, Tensor(f!)? telemetry=None) -> ()");
  // The steady-state step (adaml_fast_path.cpp, fast_path.py). refresh_grads_: every param
  // group's parameters and gradients checked against their plan, the tables repointed at the
  // new gradients, the parameters' versions bumped; status[0] = 2 if anything else changed
  // (nothing was done: the general path takes the step). fast_step_: the same refresh (given
  // the parameters; none when refresh_grads_ was called first, as under loss averaging, whose
  // all-reduce must come between), then the prologue (take, f_1, the skip count, the step
  // counts) and every bucket launched from its table (what it writes is reached through the
  // tables); telemetry: none, or each bucket's buffer (as fused_step_'s).
  m.def(
      "refresh_grads_(Tensor[] params, Tensor slots, Tensor record, Tensor(a!)[] rows_hosts, "
      "Tensor(b!)[] rows, Tensor(c!) status) -> ()");
  m.def(
      "fast_step_(Tensor(a!)[] params, Tensor slots, Tensor record, Tensor(b!) status, "
      "Tensor(c!)[] rows, Tensor(d!)[] rows_hosts, Tensor[] chunks, int[] configs, "
      "int[] bucket_groups, float[] hypers, Tensor?[] lr_tensors, Tensor loss, "
      "Tensor? found_inf, Tensor? grad_scale, Tensor(e!) initial_loss, Tensor(f!) skipped, "
      "Tensor(g!) take, Tensor tables, Tensor(h!)[] telemetry) -> ()");
  // What fast_step_ compares a param group with: its planned params' layout.
  m.def("layout_record(Tensor[] params, Tensor[] grads) -> Tensor");
  // The instruction set the CPU kernel runs with: "avx512", "avx2" or "default".
  m.def("cpu_capability() -> str", &adaml::cpu_capability);
  m.def("layout_constants() -> Dict(str, int)", &adaml::layout_constants);
  // The 8-bit moments' quantizer on its own (map 0: exp_avg, 1: exp_avg_sq): codes and block
  // scales of float32 values, and back.
  m.def("quantize_8bit(Tensor values, int map, Tensor? random=None) -> (Tensor, Tensor)");
  m.def("dequantize_8bit(Tensor codes, Tensor scales, int map) -> Tensor");
}

TORCH_LIBRARY_IMPL(adaml_kernels, CPU, m) {
  m.impl("fused_step_", &adaml::fused_step_cpu);
  m.impl("quantize_8bit", &adaml::quantize_8bit);
  m.impl("dequantize_8bit", &adaml::dequantize_8bit);
}
