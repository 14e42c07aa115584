// 8-bit moments (state_dtype=torch.uint8): the block quantizer, written once for the C++ CPU
// kernel and the CUDA kernel. adaml_kernels/quant8.py defines it and holds the torch copy;
// the Triton kernel holds the third. Only integer operations and exact power-of-two scales:
// every backend and instruction set gives the same codes and scales from the same floats.
//
// A block of kQuantBlock consecutive elements has the scale 2^S, S = clamp(ceil(log2(absmax)),
// S_min, 127). exp_avg codes: sign, 4 exponent bits (bias 15), 3 mantissa bits, 0x7F is NaN.
// Codes round to nearest even, or stochastically (encode8_stochastic) under kSR.
// exp_avg_sq codes: 5 exponent bits (bias 31), 3 mantissa bits, 0xFF is NaN, and a w > 0
// never gets code 0.
#pragma once

#include <cstdint>

#include "adaml_update.h"

namespace adaml {

constexpr int64_t kQuantBlock = 256;
constexpr int64_t kMin8BitNumel = 4096;
static_assert(kChunk % kQuantBlock == 0, "every chunk starts on a block boundary");
enum QuantMap : int { kExpAvgMap = 0, kExpAvgSqMap = 1 };

template <int kMap> struct QuantFormat;
template <> struct QuantFormat<kExpAvgMap> {
  static constexpr bool kSigned = true;
  static constexpr int kBias = 15, kScaleMin = -109;
  static constexpr uint32_t kTop = 0x7E, kNaN = 0x7F;  // largest finite code (1.75), NaN
};
template <> struct QuantFormat<kExpAvgSqMap> {
  static constexpr bool kSigned = false;
  static constexpr int kBias = 31, kScaleMin = -93;
  static constexpr uint32_t kTop = 0xFE, kNaN = 0xFF;
};
constexpr int kScaleExponentMax = 127;
constexpr int kMantissaBits = 3;
constexpr int kRandomBits = 23 - kMantissaBits;  // stochastic rounding's bits per code

// Stochastic rounding's bits of an element's two codes, from its random bits (precision.py
// code_bits): the high kRandomBits of exp_avg_sq_bits(bits), and of that hashed again.
ADAML_HD uint32_t exp_avg_code_bits(uint32_t bits) { return exp_avg_sq_bits(bits) >> 12; }
ADAML_HD uint32_t exp_avg_sq_code_bits(uint32_t bits) {
  return exp_avg_sq_bits(exp_avg_sq_bits(bits)) >> 12;
}

// |x|'s bits, a NaN as 0: the integer maximum of these over a block is the bits of its absmax.
ADAML_HD uint32_t magnitude_bits(uint32_t b) {
  const uint32_t mag = b & 0x7FFFFFFFu;
  return mag > 0x7F800000u ? 0u : mag;
}

// S of a block from the bits of its absmax.
template <int kMap> ADAML_HD int scale_exponent(uint32_t absmax) {
  const int ceil_log2 = static_cast<int>(absmax >> 23) - 127 + ((absmax & 0x7FFFFFu) != 0u);
  const int lo = QuantFormat<kMap>::kScaleMin;
  return ceil_log2 < lo ? lo : (ceil_log2 > kScaleExponentMax ? kScaleExponentMax : ceil_log2);
}

ADAML_HD float scale_of(int s) { return bits_to_float(static_cast<uint32_t>(s + 127) << 23); }
ADAML_HD int exponent_of_scale(float scale) {
  return static_cast<int>(float_to_bits(scale) >> 23) - 127;
}

// A code's magnitude (before saturation) made the code of the float with bits b: saturated
// (and inf), signed, never 0 for a w > 0, NaN for NaN.
template <int kMap> ADAML_HD uint8_t finish_code(uint32_t code, uint32_t b) {
  using F = QuantFormat<kMap>;
  const uint32_t mag = b & 0x7FFFFFFFu;
  code = code > F::kTop || mag >= 0x7F800000u ? F::kTop : code;
  if constexpr (F::kSigned) {
    code = (code != 0u && (b >> 31)) ? (code | 0x80u) : code;
  } else {
    code = (code == 0u && mag != 0u) ? 1u : code;  // a w > 0 never decodes to 0
  }
  return static_cast<uint8_t>(mag > 0x7F800000u ? F::kNaN : code);
}

// The code of the float with bits b in a block of scale 2^s, rounded to nearest even, from bit
// operations and exact products of normal floats only (flush-to-zero modes change nothing).
template <int kMap> ADAML_HD uint8_t encode8(uint32_t b, int s) {
  using F = QuantFormat<kMap>;
  const uint32_t mag = b & 0x7FFFFFFFu;
  const int field = static_cast<int>(mag >> 23);
  // y = |x| / 2^s >= 2^(1 - bias): y's bits are x's with s taken off the exponent field; drop 20
  // mantissa bits, rounding to nearest even, and rebias.
  const uint32_t y = mag - (static_cast<uint32_t>(s) << 23);
  const uint32_t normal =
      ((y + 0x7FFFFu + ((y >> 20) & 1u)) >> 20) - (static_cast<uint32_t>(127 - F::kBias) << 3);
  // Below: y in steps of 2^(-bias - 2), i.e. x's significand times 2^k; adding 2^23 rounds that
  // (< 8) to an integer, to nearest even. k < -126: far below half a step.
  const uint32_t significand = field > 0 ? ((mag & 0x7FFFFFu) | 0x800000u) : mag;
  const int k = (field > 0 ? field : 1) - 150 - s + F::kBias + 2;
  const float steps = static_cast<float>(static_cast<int32_t>(significand)) *
                      bits_to_float(static_cast<uint32_t>((k < -126 ? -126 : k) + 127) << 23);
  uint32_t code = float_to_bits(steps + 8388608.0f) - 0x4B000000u;
  code = k < -126 ? 0u : code;
  code = field - s >= 128 - F::kBias ? normal : code;
  return finish_code<kMap>(code, b);
}

// The same, rounded stochastically with r, kRandomBits random bits: the kRandomBits bits of
// |x| / 2^s below the code's last one, truncated, plus r, carry into the code (quant8.encode).
template <int kMap> ADAML_HD uint8_t encode8_stochastic(uint32_t b, int s, uint32_t r) {
  using F = QuantFormat<kMap>;
  const uint32_t mag = b & 0x7FFFFFFFu;
  const int field = static_cast<int>(mag >> 23);
  const uint32_t significand = field > 0 ? ((mag & 0x7FFFFFu) | 0x800000u) : mag;
  // The exponent of |x| / 2^s, and the code's: at least the smallest normal code's.
  const int relative = (field > 0 ? field : 1) - 127 - s;
  const int target = relative > 1 - F::kBias ? relative : 1 - F::kBias;
  const int below = target - relative;  // the significand's bits below a normal code's
  const uint32_t kept = significand >> (below < 31 ? below : 31);
  const uint32_t code = (static_cast<uint32_t>(target + F::kBias - 1) << kMantissaBits) +
                        ((kept + r) >> kRandomBits);
  return finish_code<kMap>(code, b);
}

// The value of code c in a block of scale 2^s (exact: a normal float32 or 0).
template <int kMap> ADAML_HD float decode8(uint8_t c, int s) {
  using F = QuantFormat<kMap>;
  const uint32_t code = c;
  const uint32_t mag = F::kSigned ? (code & 0x7Fu) : code;
  // e > 0: exponent and mantissa moved into place, rebiased by s.
  const uint32_t normal = (mag << 20) + (static_cast<uint32_t>(s + 127 - F::kBias) << 23);
  // e = 0: f steps of 2^(s - bias - 2).
  const float small = static_cast<float>(mag) *
                      bits_to_float(static_cast<uint32_t>(s - F::kBias - 2 + 127) << 23);
  float value = mag >= 8u ? bits_to_float(normal) : small;
  if constexpr (F::kSigned) value = code >= 0x80u ? -value : value;
  return mag == F::kNaN ? bits_to_float(0x7FC00000u) : value;
}

}  // namespace adaml
