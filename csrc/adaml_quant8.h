// 8-bit moments (state_dtype=torch.uint8): the block quantizer, written once for the C++ CPU
// kernel and the CUDA kernel. adaml_kernels/quant8.py defines it and holds the torch copy;
// the Triton kernel holds the third. Only integer operations and exact power-of-two scales:
// every backend and instruction set gives the same codes and scales from the same floats.
//
// A block of kQuantBlock consecutive elements has the scale 2^S, S = clamp(ceil(log2(absmax)),
// S_min, 127). exp_avg codes: sign, 4 exponent bits (bias 15), 3 mantissa bits, 0x7F is NaN.
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

// The code of the float with bits b in a block of scale 2^s, rounded to nearest even.
template <int kMap> ADAML_HD uint8_t encode8(uint32_t b, int s) {
  using F = QuantFormat<kMap>;
  const uint32_t mag = b & 0x7FFFFFFFu;
  const int field = static_cast<int>(mag >> 23);
  const uint32_t significand = field > 0 ? ((mag & 0x7FFFFFu) | 0x800000u) : (mag & 0x7FFFFFu);
  const int exponent = (field > 0 ? field : 1) - 127;
  int target = exponent - s;
  target = target < 1 - F::kBias ? 1 - F::kBias : target;
  int shift = 23 + s + target - 3 - exponent;  // >= 20
  shift = shift > 25 ? 25 : shift;
  uint32_t q = significand >> shift;
  const uint32_t rest = significand - (q << shift);
  const uint32_t half = 1u << (shift - 1);
  q += (rest > half || (rest == half && (q & 1u))) ? 1u : 0u;
  const int32_t wide = ((target + F::kBias - 1) << 3) + static_cast<int32_t>(q);  // >= 0
  uint32_t code = wide > static_cast<int32_t>(F::kTop) ? F::kTop : static_cast<uint32_t>(wide);
  if constexpr (F::kSigned) {
    code = (code != 0u && (b >> 31)) ? (code | 0x80u) : code;
  } else {
    code = (code == 0u && mag != 0u) ? 1u : code;  // a w > 0 never decodes to 0
  }
  return static_cast<uint8_t>(mag > 0x7F800000u ? F::kNaN : code);
}

// The value of code c in a block of scale 2^s (exact: a normal float32 or 0).
template <int kMap> ADAML_HD float decode8(uint8_t c, int s) {
  using F = QuantFormat<kMap>;
  const uint32_t code = c;
  const uint32_t mag = F::kSigned ? (code & 0x7Fu) : code;
  const int e = static_cast<int>(mag >> 3);
  const uint32_t f = mag & 7u;
  const int normal_field = e - F::kBias + s + 127;
  const float normal =
      bits_to_float((static_cast<uint32_t>(normal_field < 1 ? 1 : normal_field) << 23) | (f << 20));
  const uint32_t step_field = static_cast<uint32_t>(1 - F::kBias - 3 + s + 127);  // >= 1
  const float small = static_cast<float>(f) * bits_to_float(step_field << 23);
  float value = e > 0 ? normal : small;
  if constexpr (F::kSigned) value = code >= 0x80u ? -value : value;
  return mag == F::kNaN ? bits_to_float(0x7FC00000u) : value;
}

}  // namespace adaml
