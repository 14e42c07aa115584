// The AdamL update (SPEC.md), written once for the C++ CPU kernel and the CUDA kernel.
//
// Both kernels call step_scalars() (and, for stochastic rounding, tensor_key()) once per tensor
// in double, and step_element() once per element (in float, or double for float64 parameters),
// so the CPU tests also check the math that runs on the GPU. The build turns off floating-point
// contraction for both compilers (-ffp-contract=off, nvcc --fmad=false) and every operation here
// is IEEE-rounded (division and square root included): the CPU kernel on any instruction set and
// the CUDA kernel compute bitwise the same parameters from the same inputs.
//
// The second part of this file declares the host-side argument checks and pointer-table helpers
// that adaml_ops.cpp implements and both kernels' launchers use.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#if defined(__CUDACC__)
#define ADAML_HD __host__ __device__ __forceinline__
#elif defined(__GNUC__)
#define ADAML_HD inline __attribute__((always_inline))
#else
#define ADAML_HD inline
#endif

namespace adaml {

// ----------------------------------------------------------------------------- layout
// The C++ copy of adaml_kernels/layout.py (the op layout_constants returns these values, and
// tests/test_layout.py checks that the copies agree): one row of kColumns int64 per tensor,
// chunks of kChunk elements.
constexpr int64_t kChunk = 2048;
enum Column : int {
  kParamAddr = 0,
  kGradAddr = 1,
  kExpAvgAddr = 2,
  kExpAvgSqAddr = 3,
  kStepAddr = 4,         // float32, 0-dim: the step count k, already advanced
  kMasterAddr = 5,       // float32 master weight (master_weights=True); 0: none
  kNumel = 6,
  kFirstChunk = 7,
  kParamIndex = 8,       // the parameter's index in the optimizer (stochastic rounding's j)
  kElementOffset = 9,    // index, in the whole parameter, of this tensor's first element
  kExpAvgScaleAddr = 10,  // 8-bit moments: float32 block scales (adaml_quant8.h); 0: none
  kExpAvgSqScaleAddr = 11,
  kColumns = 12,
};
constexpr int64_t kVectorBytes = 16;

constexpr double kLMin = 1e-12;  // floor of the scaled loss l and of the normalisation scale

// dtype codes of the tensors the kernels read element by element or as 0-dim scalars.
// kUInt8: 8-bit moments (codes with block scales, adaml_quant8.h).
enum ScalarType : int { kFloat32 = 0, kFloat64 = 1, kFloat16 = 2, kBFloat16 = 3, kUInt8 = 4 };

// The stochastic-rounding hash (see mix32 below).
constexpr uint32_t kMix1 = 0x21F0AAADu;
constexpr uint32_t kMix2 = 0x735A2D97u;
constexpr uint32_t kSeedSalt = 0x9E3779B9u;
constexpr uint32_t kSqStream = 0x6A09E667u;

// A launch's values: the ops' `float[] hyper` (flags 0/1; lr unused with an lr tensor) and
// `int[] config` (layout.Hyper and layout.Config).
enum HyperField : int {
  kHyperLr = 0,
  kHyperBeta1,
  kHyperBeta2,
  kHyperEps,
  kHyperGamma,
  kHyperPhi,
  kHyperLossOffset,
  kHyperWeightDecay,
  kHyperNormalizeLoss,
  kHyperDecoupledWeightDecay,
  kHyperMaximize,
  kHyperFields,
};
enum ConfigField : int {
  kConfigParamDtype = 0,
  kConfigGradDtype,
  kConfigMomentDtype,
  kConfigMaster,
  kConfigStochasticRounding,
  kConfigSeed,  // the 64-bit seed's bits
  kConfigFields,
};

// The columns of a telemetry buffer (layout.Figure): float64 [num_chunks, kFigures], one row per
// chunk, written by a launch that measures (the kernels' kTelemetry).
enum FigureField : int {
  kFigureSgdLike = 0,        // elements with eps * l >= (1 - b2) g^2 / (gamma l^phi)
  kFigureSquaredChange = 1,  // sum of (p_new - p_old)^2 of the parameter as stored
  kFigureLost = 2,           // fp16/bf16 elements with a nonzero update and an unchanged value
  kFigureSaturated = 3,      // elements whose w saturated
  kFigures = 4,
};

enum DecayMode : int { kNoDecay = 0, kL2Decay = 1, kDecoupledDecay = 2 };

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

// ----------------------------------------------------------------------------- random bits
// Stochastic rounding (SPEC.md, Precision) draws its bits from a counter-based hash: no state, the
// same bits on every backend (adaml_kernels/triton_kernel.py and adaml_kernels/precision.py hold
// the same function), whatever the chunking, the threads or the sharding:
//
//   key  = H(H(H(H(seed_lo ^ kSeedSalt) ^ seed_hi) ^ k) ^ j)     once per tensor and step
//   bits = H(H(key ^ i_lo) ^ i_hi)                                per element
//
// with k the parameter's step count (already advanced), j its index in the optimizer, i the
// element's index in the whole parameter (64-bit; lo/hi are its 32-bit halves). H is a 32-bit
// bijective mixer (C. Wellons' "lowbias32", improved constants). The parameter takes the low 16
// bits, exp_avg the high 16, exp_avg_sq the low 16 of H(bits ^ kSqStream).
ADAML_HD uint32_t mix32(uint32_t x) {
  x ^= x >> 16;
  x *= kMix1;
  x ^= x >> 15;
  x *= kMix2;
  x ^= x >> 15;
  return x;
}

ADAML_HD uint32_t tensor_key(uint64_t seed, uint32_t k, uint32_t j) {
  uint32_t h = mix32(static_cast<uint32_t>(seed) ^ kSeedSalt);
  h = mix32(h ^ static_cast<uint32_t>(seed >> 32));
  h = mix32(h ^ k);
  return mix32(h ^ j);
}

ADAML_HD uint32_t element_bits(uint32_t key, uint64_t i) {
  return mix32(mix32(key ^ static_cast<uint32_t>(i)) ^ static_cast<uint32_t>(i >> 32));
}

ADAML_HD uint32_t exp_avg_sq_bits(uint32_t bits) { return mix32(bits ^ kSqStream); }

// Stochastic rounding to bf16: add 16 random bits r (< 2^16) to the low half of f's bit pattern
// and truncate. E[result] = f; inf stays inf, NaN becomes 0x7FC0 (as round-to-nearest does).
ADAML_HD uint16_t float_to_bf16_stochastic(float f, uint32_t r) {
  const uint32_t rounded = (float_to_bits(f) + r) >> 16;
  return f != f ? static_cast<uint16_t>(0x7FC0u) : static_cast<uint16_t>(rounded);
}

// A storage dtype (of parameters, gradients or moments): how it is held and in which type the
// update is computed. store(x, r, sr) rounds once; only bf16 rounds stochastically (when sr), with
// the low 16 bits of r; the others round to nearest even and ignore r.
template <int T> struct Param;
template <> struct Param<kFloat32> {
  using storage = float;
  using compute = float;
  static ADAML_HD float load(float x) { return x; }
  static ADAML_HD float store(float x, uint32_t, bool) { return x; }
};
template <> struct Param<kFloat64> {
  using storage = double;
  using compute = double;
  static ADAML_HD double load(double x) { return x; }
  static ADAML_HD double store(double x, uint32_t, bool) { return x; }
};
template <> struct Param<kFloat16> {
  using storage = uint16_t;
  using compute = float;
  static ADAML_HD float load(uint16_t x) { return half_to_float(x); }
  static ADAML_HD uint16_t store(float x, uint32_t, bool) {
    return float_to_half(x);  // rounded once, here, to nearest even
  }
};
template <> struct Param<kBFloat16> {
  using storage = uint16_t;
  using compute = float;
  static ADAML_HD float load(uint16_t x) { return bf16_to_float(x); }
  static ADAML_HD uint16_t store(float x, uint32_t r, bool sr) {  // rounded once, here
    return sr ? float_to_bf16_stochastic(x, r & 0xFFFFu) : float_to_bf16(x);
  }
};

// 8-bit moments: codes, decoded and encoded a block at a time (adaml_quant8.h), not one
// element at a time; the update computes in float.
template <> struct Param<kUInt8> {
  using storage = uint8_t;
  using compute = float;
};

// Largest finite bf16 (0x7F7F): bf16 moments saturate there, so that no rounding reaches inf.
constexpr float kBFloat16Max = 3.38953138925153547590e+38F;

// A moment dtype: float32 (default), float64 (float64 params) or bf16 (state_dtype=bfloat16).
// bf16 moments saturate at +-kBFloat16Max before rounding (a NaN stays NaN).
template <int T> ADAML_HD typename Param<T>::storage store_moment(
    typename Param<T>::compute x, uint32_t r, bool sr) {
  if constexpr (T == kBFloat16) {
    x = x > kBFloat16Max ? kBFloat16Max : (x < -kBFloat16Max ? -kBFloat16Max : x);
  }
  return Param<T>::store(x, r, sr);
}

// A 0-dim tensor's value (loss, lr, grad_scale), read where the tensor lives.
ADAML_HD double load_scalar(const void* ptr, int type) {
  switch (type) {
    case kFloat64: return *static_cast<const double*>(ptr);
    case kFloat16: return half_to_float(*static_cast<const uint16_t*>(ptr));
    case kBFloat16: return bf16_to_float(*static_cast<const uint16_t*>(ptr));
    default: return *static_cast<const float*>(ptr);
  }
}

// Bit patterns of float and double, for branch-free selects.
template <typename C> struct Bits;
template <> struct Bits<float> {
  using type = uint32_t;
  static ADAML_HD uint32_t of(float x) { return float_to_bits(x); }
  static ADAML_HD float to(uint32_t b) { return bits_to_float(b); }
};
template <> struct Bits<double> {
  using type = uint64_t;
  static ADAML_HD uint64_t of(double x) {
#if defined(__CUDA_ARCH__)
    return static_cast<uint64_t>(__double_as_longlong(x));
#else
    uint64_t b;
    std::memcpy(&b, &x, sizeof b);
    return b;
#endif
  }
  static ADAML_HD double to(uint64_t b) {
#if defined(__CUDA_ARCH__)
    return __longlong_as_double(static_cast<long long>(b));
#else
    double x;
    std::memcpy(&x, &b, sizeof x);
    return x;
#endif
  }
};

// `mask` all ones: a, all zeros: b. Exact (bit for bit, NaN payloads too) and branch-free.
template <typename C>
ADAML_HD C select_bits(typename Bits<C>::type mask, C a, C b) {
  return Bits<C>::to((Bits<C>::of(a) & mask) | (Bits<C>::of(b) & ~mask));
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

// The step prologue (fast_step_: adaml_fast_path.cpp; its GPU kernel: adaml_cuda.cu): whether the step
// is taken (a finite loss and no found_inf), f_1 recorded if unset, a skip counted. Returns
// whether the step is taken. `l - l` is 0 only for a finite l (inf - inf and NaN are NaN).
ADAML_HD bool decide_step(double loss, const float* found_inf, double* initial_loss,
                          double* skipped, float* take) {
  const bool ok = (loss - loss) == 0.0 && (found_inf == nullptr || *found_inf == 0.0f);
  *take = ok ? 1.0f : 0.0f;
  if (ok && *initial_loss != *initial_loss) *initial_loss = loss;
  *skipped += ok ? 0.0 : 1.0;
  return ok;
}

template <typename C> struct StepScalars {
  C beta1, one_minus_beta1, beta2;
  // The adaptive term (1 - b2) g^2 / (gamma * l^phi). Its coefficient can exceed C's range
  // (phi = 4 with l at its floor gives 1e45): then the term is (g * root)^2, root = sqrt(coef).
  C coef_g2;
  C root_g2;
  bool split_g2;
  typename Bits<C>::type split_mask;  // split_g2 as a mask (all ones: split), for the SIMD loop
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
  s.split_mask = s.split_g2 ? ~typename Bits<C>::type(0) : typename Bits<C>::type(0);
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

// The switches of one step as bit masks (all ones: on). Run-time values that the CPU loop
// applies with bit operations, so that one SIMD loop serves every combination; the result is
// bitwise what a compiled-in switch gives.
template <typename C> struct SwitchMasks {
  using M = typename Bits<C>::type;
  M l2, decoupled, sign, grad_scale;
  SwitchMasks() = default;
  ADAML_HD SwitchMasks(int decay, bool maximize, bool has_grad_scale)
      : l2(decay == kL2Decay ? ~M(0) : M(0)),
        decoupled(decay == kDecoupledDecay ? ~M(0) : M(0)),
        sign(maximize ? M(1) << (8 * sizeof(M) - 1) : M(0)),
        grad_scale(has_grad_scale ? ~M(0) : M(0)) {}
};

// How the grad scale is applied: compiled out, compiled in, or selected by SwitchMasks (the CPU
// kernel compiles it in or out, which saves a division per element without a grad scale).
enum GradScaleMode : int { kNoGradScale = 0, kGradScale = 1, kGradScaleByMask = 2 };

// What telemetry measures of one element (SPEC.md, Telemetry; layout.Figure): 0/1 flags and the
// squared change, all in C so that a SIMD loop sums them alike (a chunk's counts stay exact).
template <typename C> struct ElementFigures {
  C sgd_like, squared_change, lost, saturated;
};

// SPEC.md steps 3-5 and 7 for one element: p, m, w are updated in place, in the compute type C.
// kTelemetry: also whether the element is SGD-like and whether its w saturated (into *fig).
template <typename C, int kScale = kGradScaleByMask, bool kTelemetry = false>
ADAML_HD void update_element(C& p, C g, C& m, C& w, const StepScalars<C>& s,
                             const SwitchMasks<C>& on, ElementFigures<C>* fig = nullptr) {
  g = Bits<C>::to(Bits<C>::of(g) ^ on.sign);  // -g if maximize
  if constexpr (kScale == kGradScale) g = ieee_div(g, s.grad_scale);
  if constexpr (kScale == kGradScaleByMask) {
    g = select_bits(on.grad_scale, ieee_div(g, s.grad_scale), g);
  }
  g = select_bits(on.l2, g + s.weight_decay * p, g);
  p = select_bits(on.decoupled, p * s.decay, p);
  m = s.beta1 * m + s.one_minus_beta1 * g;
  // Finite inputs never give NaN (SPEC.md, Precision): g*g is capped so that a zero
  // coefficient cannot meet inf, and w saturates at C's largest value. `x > big ? big : x`
  // keeps a NaN that came in as NaN.
  constexpr C big = max_finite<C>();
  const C g2 = g * g;
  const C split = (g * s.root_g2) * (g * s.root_g2);
  const C term = select_bits(s.split_mask, split, s.coef_g2 * (g2 > big ? big : g2));
  if constexpr (kTelemetry) fig->sgd_like = s.coef_eps >= term ? C(1) : C(0);
  w = s.beta2 * w + term + s.coef_eps;
  if constexpr (kTelemetry) fig->saturated = w > big ? C(1) : C(0);
  w = w > big ? big : w;
  // Computed unconditionally and then selected, so that the loop stays branch-free (SIMD).
  const C quotient = ieee_div(m, ieee_sqrt(w));
  p = p - s.step_size * (w == C(0) ? C(0) : quotient);
}

// What a bucket's tensors hold: the CPU kernel is compiled for each valid combination, the CUDA
// kernel for each (PT, MT, kMaster) (it takes GT and kSR at run time).
//   PT  parameter dtype               GT  gradient dtype (PT, or float32 for fp16/bf16 params)
//   MT  moment dtype (float32; bf16; uint8: 8-bit codes; float64 for float64 params)
//   kMaster  a float32 master weight is read instead of p, and written with p (fp16/bf16 PT)
//   kSR      values stored as bf16 (PT, MT) or as 8-bit codes are rounded stochastically
template <int PT_, int GT_, int MT_, bool kMaster_, bool kSR_> struct Config {
  static constexpr int PT = PT_, GT = GT_, MT = MT_;
  static constexpr bool kMaster = kMaster_, kSR = kSR_;
  using P = typename Param<PT_>::storage;
  using G = typename Param<GT_>::storage;
  using M = typename Param<MT_>::storage;
  using C = typename Param<PT_>::compute;
};

// Telemetry of an element once its parameter is stored (SPEC.md, Telemetry): the squared change
// of the stored value (`old` -> `stored`), and for fp16/bf16 parameters whether a nonzero
// update (`before` -> `after`, in C) left it unchanged; with bf16 moments w saturates at
// bf16's largest value (w: the new w, in C, before its rounding on store).
template <typename Cfg>
ADAML_HD void measure_store(ElementFigures<typename Cfg::C>& f, typename Cfg::P old,
                            typename Cfg::P stored, typename Cfg::C before,
                            typename Cfg::C after, typename Cfg::C w) {
  using C = typename Cfg::C;
  const C change = Param<Cfg::PT>::load(stored) - Param<Cfg::PT>::load(old);
  f.squared_change = change * change;
  if constexpr (Cfg::PT == kFloat16 || Cfg::PT == kBFloat16) {
    f.lost = (after != before && stored == old) ? C(1) : C(0);
  } else {
    f.lost = C(0);
  }
  if constexpr (Cfg::MT == kBFloat16) f.saturated = w > kBFloat16Max ? C(1) : C(0);
}

// Element j of the arrays end to end: load, update (in C), store each array rounded once. `g`
// is the loaded gradient, `master` the float32 master weights (read and written only under
// kMaster), `key` the tensor's tensor_key() and `i` the element's index in the whole parameter
// (read only when rounding stochastically). Arrays and an index rather than references: GCC
// vectorizes the CPU loop over them, and the CUDA kernel passes its registers' arrays.
// kTelemetry: the element's figures into *fig (the stored parameter is read first under
// kMaster too).
template <typename Cfg, int kScale = kGradScaleByMask, bool kTelemetry = false>
ADAML_HD void step_element(typename Cfg::P* p, typename Cfg::C* master, typename Cfg::C g,
                           typename Cfg::M* m, typename Cfg::M* w, int64_t j, uint32_t key,
                           uint64_t i, const StepScalars<typename Cfg::C>& s,
                           const SwitchMasks<typename Cfg::C>& on, bool sr,
                           ElementFigures<typename Cfg::C>* fig = nullptr) {
  using C = typename Cfg::C;
  C pc;
  if constexpr (Cfg::kMaster) {
    pc = master[j];
  } else {
    pc = Param<Cfg::PT>::load(p[j]);
  }
  C mc = Param<Cfg::MT>::load(m[j]);
  C wc = Param<Cfg::MT>::load(w[j]);
  if constexpr (kTelemetry) {
    const typename Cfg::P old = p[j];
    const C before = pc;
    update_element<C, kScale, true>(pc, g, mc, wc, s, on, fig);
    const uint32_t bits = sr ? element_bits(key, i) : 0u;
    if constexpr (Cfg::kMaster) master[j] = pc;
    const typename Cfg::P stored = Param<Cfg::PT>::store(pc, bits, sr);
    p[j] = stored;
    m[j] = store_moment<Cfg::MT>(mc, bits >> 16, sr);
    w[j] = store_moment<Cfg::MT>(wc, sr ? exp_avg_sq_bits(bits) : 0u, sr);
    measure_store<Cfg>(*fig, old, stored, before, pc, wc);
  } else {
    update_element<C, kScale>(pc, g, mc, wc, s, on);
    const uint32_t bits = sr ? element_bits(key, i) : 0u;
    if constexpr (Cfg::kMaster) master[j] = pc;
    p[j] = Param<Cfg::PT>::store(pc, bits, sr);
    m[j] = store_moment<Cfg::MT>(mc, bits >> 16, sr);
    w[j] = store_moment<Cfg::MT>(wc, sr ? exp_avg_sq_bits(bits) : 0u, sr);
  }
}

// Calls f(Config<...>{}) with the Config of (pt, gt, mt, master, sr); only valid combinations are
// instantiated (check_step_args has refused the others). sr is dropped where nothing is bf16
// or 8-bit.
template <bool kWithFloat64, typename F>
void dispatch_config(int pt, int gt, int mt, bool master, bool sr, F&& f) {
  auto moments = [&](auto ptc, auto gtc, auto masterc) {
    constexpr int P = decltype(ptc)::value, G = decltype(gtc)::value;
    constexpr bool M = decltype(masterc)::value;
    if (mt == kBFloat16) {
      sr ? f(Config<P, G, kBFloat16, M, true>{}) : f(Config<P, G, kBFloat16, M, false>{});
    } else if (mt == kUInt8) {  // 8-bit codes (and bf16 params) round stochastically
      sr ? f(Config<P, G, kUInt8, M, true>{}) : f(Config<P, G, kUInt8, M, false>{});
    } else if (P == kBFloat16 && sr) {  // bf16 params, float32 moments
      f(Config<P, G, kFloat32, M, P == kBFloat16>{});
    } else {
      f(Config<P, G, kFloat32, M, false>{});
    }
  };
  using F32 = std::integral_constant<int, kFloat32>;
  using Yes = std::true_type;
  using No = std::false_type;
  auto half = [&](auto ptc) {
    if (gt == kFloat32) {
      master ? moments(ptc, F32{}, Yes{}) : moments(ptc, F32{}, No{});
    } else {
      master ? moments(ptc, ptc, Yes{}) : moments(ptc, ptc, No{});
    }
  };
  switch (pt) {
    case kFloat64:
      if constexpr (kWithFloat64) f(Config<kFloat64, kFloat64, kFloat64, false, false>{});
      break;
    case kFloat16: half(std::integral_constant<int, kFloat16>{}); break;
    case kBFloat16: half(std::integral_constant<int, kBFloat16>{}); break;
    default: moments(F32{}, F32{}, No{}); break;
  }
}

}  // namespace adaml

// --------------------------------------------------------------------------------- host side
// Argument checks and launches shared by the CPU and CUDA ops (adaml_ops.cpp, adaml_cuda.cu).
#include <ATen/core/List.h>
#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>

#include <initializer_list>
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

// Throws (TORCH_CHECK) unless the arguments of fused_step_ are consistent, of supported dtypes
// on one device of `device_type`, and what `config` says they are.
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
                     c10::DeviceType device_type);

// Throws unless `telemetry` is none or a contiguous float64 [num_chunks, kFigures] on `device`.
void check_telemetry(const std::optional<at::Tensor>& telemetry, int64_t num_chunks,
                     const at::Device& device);

// The given table if rows_host points at exactly these tensors, else a fresh one for them
// (torch.compile's functionalization passes copies of the mutated tensors); a fresh table takes
// each tensor's parameter index and element offset from rows_host. `allow_rebuild` false turns
// the rebuild into an error (a CUDA graph being captured must not copy from the host).
KernelTable resolve_table(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                          at::TensorList exp_avg_sqs, at::TensorList steps,
                          at::TensorList master_params, at::TensorList moment_scales,
                          const at::Tensor& rows,
                          const at::Tensor& rows_host, const at::Tensor& chunk_tensor,
                          bool allow_rebuild);

// A bucket's table as it is (fast_step_ checked it against the tensors).
KernelTable given_table(const at::Tensor& rows, const at::Tensor& rows_host,
                        const at::Tensor& chunk_tensor);

int scalar_type_code(const at::Tensor& t);
int moment_type_code(const at::Tensor& t);  // scalar_type_code, or kUInt8 for 8-bit codes

// One bucket's launch, once its table and tensors are known to be consistent: the table, the
// config and hyperparameters, and this step's 0-dim inputs, read on the device where they live.
struct StepLaunch {
  KernelTable table;
  int64_t num_tensors = 0;
  int param_type = kFloat32, grad_type = kFloat32, moment_type = kFloat32;
  bool master = false;
  at::Tensor loss, take;
  std::optional<at::Tensor> lr_tensor, grad_scale, initial_loss;
  Hyper hyper;
  int decay_mode = kNoDecay;
  bool maximize = false;
  bool stochastic_rounding = false;
  uint64_t seed = 0;
  std::optional<at::Tensor> telemetry;  // a row per chunk (FigureField); none: not measured
};

StepLaunch make_launch(KernelTable table, c10::ArrayRef<double> hyper,
                       c10::ArrayRef<int64_t> config, const at::Tensor& loss,
                       const at::Tensor& take, const std::optional<at::Tensor>& lr_tensor,
                       const std::optional<at::Tensor>& grad_scale,
                       const std::optional<at::Tensor>& initial_loss);

void run_cpu_step(const StepLaunch& s);  // adaml_ops.cpp

// The steady-state step, fast_step_ (adaml_fast_path.cpp), with the device's prologue and
// launch: the CPU's, or adaml_cuda.cu's. `params` empty: refresh_grads_ was called before.
using PrologueFn = void (*)(const at::Tensor& loss, const std::optional<at::Tensor>& found_inf,
                            const at::Tensor& initial_loss, const at::Tensor& skipped,
                            const at::Tensor& take, const at::Tensor& tables);
using RunFn = void (*)(const StepLaunch& s);
void fast_step(at::TensorList params, const at::Tensor& slots, const at::Tensor& record,
               const at::Tensor& status, at::TensorList rows, at::TensorList rows_hosts,
               at::TensorList chunks, c10::ArrayRef<int64_t> configs,
               c10::ArrayRef<int64_t> bucket_groups, c10::ArrayRef<double> hypers,
               const c10::List<std::optional<at::Tensor>>& lr_tensors, const at::Tensor& loss,
               const std::optional<at::Tensor>& found_inf,
               const std::optional<at::Tensor>& grad_scale, const at::Tensor& initial_loss,
               const at::Tensor& skipped, const at::Tensor& take, const at::Tensor& tables,
               at::TensorList telemetry, PrologueFn prologue, RunFn run);

// The in-place writes of a launch, made known to autograd as torch's own in-place ops do (a
// backward through a graph that saved the old values then raises instead of using new ones).
void bump_versions(std::initializer_list<at::TensorList> written);

}  // namespace adaml
