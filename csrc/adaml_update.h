// The AdamL update (SPEC.md), written once for the C++ CPU kernel and the CUDA kernel.
//
// Both kernels call step_scalars() once per tensor (in double) and update_element() once per
// element (in float, or double for float64 parameters), so the CPU tests also check the math
// that runs on the GPU. The build turns off floating-point contraction for both compilers
// (-ffp-contract=off, nvcc --fmad=false) and every operation here is IEEE-rounded (division and
// square root included): the CPU kernel on any instruction set and the CUDA kernel compute
// bitwise the same parameters from the same inputs.
//
// The second part of this file declares the host-side argument checks and pointer-table helpers
// that adaml_ops.cpp implements and both kernels' launchers use.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define ADAML_HD __host__ __device__ __forceinline__
#elif defined(__GNUC__)
#define ADAML_HD inline __attribute__((always_inline))
#else
#define ADAML_HD inline
#endif

namespace adaml {

// ----------------------------------------------------------------------------- table layout
// Mirrors adaml_kernels/buckets.py: one row of kColumns int64 per tensor, chunks of kChunk.
constexpr int64_t kChunk = 2048;
constexpr int kColumns = 8;
enum Column : int {
  kParamAddr = 0,
  kGradAddr = 1,
  kExpAvgAddr = 2,
  kExpAvgSqAddr = 3,
  kStepAddr = 4,         // float32, 0-dim: the step count k, already advanced
  kUnused = 5,           // 0 (f_1 is one value per optimizer, passed to the op on its own)
  kNumel = 6,
  kFirstChunk = 7,
};
constexpr int64_t kVectorBytes = 16;

constexpr double kLMin = 1e-12;  // floor of the scaled loss l and of the normalisation scale

enum DecayMode : int { kNoDecay = 0, kL2Decay = 1, kDecoupledDecay = 2 };

// dtype codes of the tensors the kernels read element by element or as 0-dim scalars.
enum ScalarType : int { kFloat32 = 0, kFloat64 = 1, kFloat16 = 2, kBFloat16 = 3 };

// ----------------------------------------------------------------------------- conversions
ADAML_HD float bits_to_float(uint32_t b) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(b);
#else
  float f;
  std::memcpy(&f, &b, sizeof f);
  return f;
#endif
}

ADAML_HD uint32_t float_to_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t b;
  std::memcpy(&b, &f, sizeof b);
  return b;
#endif
}

ADAML_HD float bf16_to_float(uint16_t h) { return bits_to_float(static_cast<uint32_t>(h) << 16); }

// Round to nearest even; NaN becomes the quiet NaN 0x7FC0 (as torch and the Triton kernel do).
ADAML_HD uint16_t float_to_bf16(float f) {
  const uint32_t b = float_to_bits(f);
  const uint32_t rounded = (b + 0x7FFFu + ((b >> 16) & 1u)) >> 16;
  return f != f ? static_cast<uint16_t>(0x7FC0u) : static_cast<uint16_t>(rounded);
}

// IEEE half <-> float without branches or F16C, so that every instruction set vectorizes it
// and rounds the same way (to nearest even). The float arithmetic in both is exact.
ADAML_HD float half_to_float(uint16_t h) {
  const uint32_t w = static_cast<uint32_t>(h) << 16;
  const uint32_t sign = w & 0x80000000u;
  const uint32_t two_w = w + w;
  // Normal (and inf/NaN): move exponent and mantissa into place, rebias by 2^-112.
  const float normalized = bits_to_float((two_w >> 4) + (0xE0u << 23)) * 0x1.0p-112f;
  // Subnormal: mantissa as the low bits of 0.5 * 2^x, minus the 0.5.
  const float denormalized = bits_to_float((two_w >> 17) | (126u << 23)) - 0.5f;
  const uint32_t bits =
      two_w < (1u << 27) ? float_to_bits(denormalized) : float_to_bits(normalized);
  return bits_to_float(sign | bits);
}

ADAML_HD uint16_t float_to_half(float f) {
  // Scaling to the half range lets the float adder do the rounding to nearest even.
  float base = (::fabsf(f) * 0x1.0p+112f) * 0x1.0p-110f;
  const uint32_t w = float_to_bits(f);
  const uint32_t shl1_w = w + w;
  const uint32_t sign = w & 0x80000000u;
  uint32_t bias = shl1_w & 0xFF000000u;
  bias = bias < 0x71000000u ? 0x71000000u : bias;
  base = bits_to_float((bias >> 1) + 0x07800000u) + base;
  const uint32_t bits = float_to_bits(base);
  const uint32_t exp_bits = (bits >> 13) & 0x00007C00u;
  const uint32_t mantissa_bits = bits & 0x00000FFFu;
  const uint32_t nonsign = exp_bits + mantissa_bits;
  return static_cast<uint16_t>((sign >> 16) | (shl1_w > 0xFF000000u ? 0x7E00u : nonsign));
}

// A parameter dtype: how it is stored and in which type the update is computed.
template <int T> struct Param;
template <> struct Param<kFloat32> {
  using storage = float;
  using compute = float;
  static ADAML_HD float load(float x) { return x; }
  static ADAML_HD float store(float x) { return x; }
};
template <> struct Param<kFloat64> {
  using storage = double;
  using compute = double;
  static ADAML_HD double load(double x) { return x; }
  static ADAML_HD double store(double x) { return x; }
};
template <> struct Param<kFloat16> {
  using storage = uint16_t;
  using compute = float;
  static ADAML_HD float load(uint16_t x) { return half_to_float(x); }
  static ADAML_HD uint16_t store(float x) { return float_to_half(x); }  // rounded once, here
};
template <> struct Param<kBFloat16> {
  using storage = uint16_t;
  using compute = float;
  static ADAML_HD float load(uint16_t x) { return bf16_to_float(x); }
  static ADAML_HD uint16_t store(float x) { return float_to_bf16(x); }  // rounded once, here
};

// A 0-dim tensor's value (loss, lr, grad_scale), read where the tensor lives.
ADAML_HD double load_scalar(const void* ptr, int type) {
  switch (type) {
    case kFloat64: return *static_cast<const double*>(ptr);
    case kFloat16: return half_to_float(*static_cast<const uint16_t*>(ptr));
    case kBFloat16: return bf16_to_float(*static_cast<const uint16_t*>(ptr));
    default: return *static_cast<const float*>(ptr);
  }
}

// ----------------------------------------------------------------------------- the update
struct Hyper {
  double lr;  // used when no lr tensor is given
  double beta1, beta2, eps, gamma, phi, loss_offset, weight_decay;
  bool normalize_loss;
};

// What one tensor's elements need of the step, computed once per tensor in double.
template <typename C> ADAML_HD constexpr C max_finite();
template <> ADAML_HD constexpr float max_finite<float>() { return 3.40282346638528859812e+38F; }
template <> ADAML_HD constexpr double max_finite<double>() { return 1.79769313486231570815e+308; }

template <typename C> struct StepScalars {
  C beta1, one_minus_beta1, beta2;
  // The adaptive term (1 - b2) g^2 / (gamma * l^phi). Its coefficient can exceed C's range
  // (phi = 4 with l at its floor gives 1e45): then the term is (g * root)^2, root = sqrt(coef).
  C coef_g2;
  C root_g2;
  bool split_g2;
  C coef_eps;   // eps * l
  C step_size;  // lr * sqrt(1 - b2^k) / (1 - b1^k):  m_hat / sqrt(w_hat) = m / sqrt(w) * this / lr
  C weight_decay;
  C decay;      // 1 - lr * weight_decay
  C grad_scale;
};

// SPEC.md steps 1 and 6, for one tensor: k is its (advanced) step count, f1 the optimizer's f_1
// (ignored unless normalize_loss), lr the learning rate of this step.
template <typename C>
ADAML_HD StepScalars<C> step_scalars(const Hyper& h, double loss, double f1, double k, double lr,
                                     double grad_scale) {
  double l;
  if (h.normalize_loss) {
    const double scale = ::fmax(f1 - h.loss_offset, kLMin);
    l = ::fmax((loss - h.loss_offset) / scale, kLMin);
  } else {
    l = ::fmax(loss - h.loss_offset, kLMin);
  }
  const double bias1 = 1.0 - ::pow(h.beta1, k);
  const double bias2 = 1.0 - ::pow(h.beta2, k);
  StepScalars<C> s;
  s.beta1 = static_cast<C>(h.beta1);
  s.one_minus_beta1 = static_cast<C>(1.0 - h.beta1);
  s.beta2 = static_cast<C>(h.beta2);
  const double big = static_cast<double>(max_finite<C>());
  const double coef = (1.0 - h.beta2) / (h.gamma * ::pow(l, h.phi));  // may be inf
  s.split_g2 = !(coef <= big);
  s.coef_g2 = static_cast<C>(s.split_g2 ? big : coef);
  s.root_g2 = static_cast<C>(::fmin(::sqrt(coef), big));
  s.coef_eps = static_cast<C>(::fmin(h.eps * l, big));
  s.step_size = static_cast<C>(lr * ::sqrt(bias2) / bias1);
  s.weight_decay = static_cast<C>(h.weight_decay);
  s.decay = static_cast<C>(1.0 - lr * h.weight_decay);
  s.grad_scale = static_cast<C>(grad_scale);
  return s;
}

ADAML_HD float ieee_sqrt(float x) {
#if defined(__CUDA_ARCH__)
  return __fsqrt_rn(x);
#else
  return std::sqrt(x);
#endif
}
ADAML_HD double ieee_sqrt(double x) {
#if defined(__CUDA_ARCH__)
  return __dsqrt_rn(x);
#else
  return std::sqrt(x);
#endif
}
ADAML_HD float ieee_div(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fdiv_rn(a, b);
#else
  return a / b;
#endif
}
ADAML_HD double ieee_div(double a, double b) {
#if defined(__CUDA_ARCH__)
  return __ddiv_rn(a, b);
#else
  return a / b;
#endif
}

// SPEC.md steps 3-5 and 7 for one element: p, m, w are updated in place, in the compute type C.
template <typename C, int kDecay, bool kMaximize, bool kHasGradScale>
ADAML_HD void update_element(C& p, C g, C& m, C& w, const StepScalars<C>& s) {
  if (kMaximize) g = -g;
  if (kHasGradScale) g = ieee_div(g, s.grad_scale);
  if (kDecay == kL2Decay) g = g + s.weight_decay * p;
  if (kDecay == kDecoupledDecay) p = p * s.decay;
  m = s.beta1 * m + s.one_minus_beta1 * g;
  // Finite inputs never give NaN (SPEC.md, Precision): g*g is capped so that a zero
  // coefficient cannot meet inf, and w saturates at C's largest value. `x > big ? big : x`
  // keeps a NaN that came in as NaN.
  constexpr C big = max_finite<C>();
  const C g2 = g * g;
  const C split = (g * s.root_g2) * (g * s.root_g2);
  const C term = s.split_g2 ? split : s.coef_g2 * (g2 > big ? big : g2);
  w = s.beta2 * w + term + s.coef_eps;
  w = w > big ? big : w;
  // Computed unconditionally and then selected, so that the loop stays branch-free (SIMD).
  const C quotient = ieee_div(m, ieee_sqrt(w));
  p = p - s.step_size * (w == C(0) ? C(0) : quotient);
}

}  // namespace adaml

// --------------------------------------------------------------------------------- host side
// Argument checks and pointer tables shared by the CPU and CUDA launchers (adaml_ops.cpp).
#include <ATen/core/Tensor.h>

#include <optional>

namespace adaml {

// The table a launch reads: the bucket's own, or one built for the tensors actually passed.
struct KernelTable {
  at::Tensor rows;          // int64 [T, kColumns] on the tensors' device
  at::Tensor chunk_tensor;  // int32 [num_chunks] on the tensors' device
  int64_t num_chunks = 0;
  bool aligned = false;  // every param/grad/moment address is kVectorBytes-aligned
  bool rebuilt = false;  // true when the given table did not point at the given tensors
};

// Throws (TORCH_CHECK) unless the arguments of fused_step_ are consistent and of supported
// dtypes on one device of `device_type`. Returns the parameters' dtype code.
int check_step_args(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                    at::TensorList exp_avg_sqs, at::TensorList steps,
                    const std::optional<at::Tensor>& initial_loss, const at::Tensor& rows,
                    const at::Tensor& rows_host, const at::Tensor& chunk_tensor,
                    const at::Tensor& loss, const at::Tensor& take,
                    const std::optional<at::Tensor>& lr_tensor,
                    const std::optional<at::Tensor>& grad_scale, bool normalize_loss,
                    c10::DeviceType device_type);

// The given table if rows_host points at exactly these tensors, else a fresh one for them
// (torch.compile's functionalization passes copies of the mutated tensors). `allow_rebuild`
// false turns the rebuild into an error (a CUDA graph being captured must not copy from the
// host).
KernelTable resolve_table(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                          at::TensorList exp_avg_sqs, at::TensorList steps, const at::Tensor& rows,
                          const at::Tensor& rows_host, const at::Tensor& chunk_tensor,
                          bool allow_rebuild);

int scalar_type_code(const at::Tensor& t);

// One bucket's launch, once its table and tensors are known to be consistent (checked by the
// op, or by the optimizer's steady-state path in adaml_fast.cpp): the table, the parameters'
// dtype, and this step's 0-dim inputs, read on the device where they live.
struct StepLaunch {
  KernelTable table;
  int64_t num_tensors = 0;
  int param_type = kFloat32;
  at::Tensor loss, take;
  std::optional<at::Tensor> lr_tensor, grad_scale, initial_loss;
  Hyper hyper;
  int decay_mode = kNoDecay;
  bool maximize = false;
};

StepLaunch make_launch(KernelTable table, int64_t num_tensors, int param_type,
                       const at::Tensor& loss, const at::Tensor& take,
                       const std::optional<at::Tensor>& lr_tensor,
                       const std::optional<at::Tensor>& grad_scale,
                       const std::optional<at::Tensor>& initial_loss, double lr, double beta1,
                       double beta2, double eps, double gamma, double phi, double loss_offset,
                       double weight_decay, bool normalize_loss, bool decoupled_weight_decay,
                       bool maximize);

void run_cpu_step(const StepLaunch& s);  // adaml_ops.cpp

// What the CUDA build adds (adaml_cuda.cu sets these when it is compiled in).
struct CudaEntryPoints {
  void (*run_step)(const StepLaunch&) = nullptr;
  // The step's prologue on the GPU (see adaml_fast.cpp): take, f_1, the skip count, step counts.
  void (*prologue)(const at::Tensor& loss, const std::optional<at::Tensor>& found_inf,
                   const at::Tensor& initial_loss, const at::Tensor& skipped,
                   const at::Tensor& take, const at::Tensor& tables, int64_t num_tables) = nullptr;
};
CudaEntryPoints& cuda_entry_points();

}  // namespace adaml
