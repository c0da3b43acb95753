// float16 / bfloat16 <-> float conversions, written out with integer bit
// manipulation so that they behave identically on the CPU and in CUDA code
// and do not depend on the compiler having a native half type.
// Stores round to nearest, ties to even (like PyTorch's casts); NaN stays NaN
// (quiet), overflow rounds to +-inf.
#pragma once
#include "hd.h"
#ifdef __CUDACC_RTC__
// NVRTC (python/fastgrad/cuda_jit.py) has no C library headers: the few names used here.
typedef unsigned char uint8_t;
typedef unsigned short uint16_t;
typedef unsigned int uint32_t;
typedef int int32_t;
typedef long int64_t;
#define INT32_MIN (-2147483647 - 1)
#define INT64_MIN (-9223372036854775807L - 1)
#else
#include <cstdint>
#include <cstring>
#endif


namespace fg {

#ifdef __CUDACC_RTC__
__device__ inline uint32_t float_bits(float f) { return __float_as_uint(f); }
__device__ inline float bits_float(uint32_t u) { return __uint_as_float(u); }
#else
FG_HD inline uint32_t float_bits(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }
FG_HD inline float bits_float(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }
#endif

// IEEE binary16 -> float (exact).
FG_HD inline float half_to_float(uint16_t h) {
  const uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
  const uint32_t expo = (h >> 10) & 0x1fu;
  const uint32_t mant = h & 0x3ffu;
  float mag;
  if (expo == 0x1f) {            // inf / NaN: keep the payload
    mag = bits_float(0x7f800000u | (mant << 13));
  } else if (expo == 0) {        // zero / subnormal: mant * 2^-24 is exact in float
    mag = (float)mant * 5.9604644775390625e-08f;
  } else {                       // normal: rebias the exponent 15 -> 127
    mag = bits_float(((expo + 112u) << 23) | (mant << 13));
  }
  return bits_float(float_bits(mag) | sign);
}

// float -> IEEE binary16, round to nearest even.
FG_HD inline uint16_t float_to_half(float f) {
  uint32_t x = float_bits(f);
  const uint16_t sign = (uint16_t)((x >> 16) & 0x8000u);
  x &= 0x7fffffffu;
  if (x > 0x7f800000u) return sign | 0x7e00u | (uint16_t)((x >> 13) & 0x3ffu);  // NaN (quiet)
  if (x >= 0x477ff000u) return sign | 0x7c00u;  // >= 65520 rounds to inf (and inf itself)
  if (x < 0x38800000u) {
    // Result is subnormal (or zero / the smallest normal after rounding):
    // adding 0.5 puts the half's last bit (2^-24) at the float's last bit,
    // so the FPU's own round-to-nearest-even does the rounding.
    const float r = bits_float(x) + 0.5f;
    return sign | (uint16_t)(float_bits(r) - 0x3f000000u);
  }
  // Normal: rebias (127 -> 15) and round away the 13 low mantissa bits, ties
  // to even; a carry out of the mantissa correctly bumps the exponent.
  const uint32_t odd = (x >> 13) & 1u;
  x += 0xc8000fffu + odd;  // == ((15 - 127) << 23) + 0xfff (mod 2^32)
  return sign | (uint16_t)(x >> 13);
}

// bfloat16 is the top half of a float.
FG_HD inline float bf16_to_float(uint16_t h) { return bits_float((uint32_t)h << 16); }

FG_HD inline uint16_t float_to_bf16(float f) {
  const uint32_t x = float_bits(f);
  if ((x & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((x >> 16) | 0x40u);  // NaN (quiet)
  return (uint16_t)((x + 0x7fffu + ((x >> 16) & 1u)) >> 16);
}

}  // namespace fg
