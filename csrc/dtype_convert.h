// Conversions between a storage dtype (dtypes.def) and the compute type T.
#pragma once
#include "float16.h"  // (and the fixed-width integer types)

namespace fg {

// Tag types, so that float16 and bfloat16 (both 16 raw bits) overload apart.
struct half_t { uint16_t bits; };
struct bf16_t { uint16_t bits; };

template <class T> FG_HD inline T from_storage(float v) { return T(v); }
template <class T> FG_HD inline T from_storage(double v) { return T(v); }
template <class T> FG_HD inline T from_storage(half_t v) { return T(half_to_float(v.bits)); }
template <class T> FG_HD inline T from_storage(bf16_t v) { return T(bf16_to_float(v.bits)); }
template <class T> FG_HD inline T from_storage(int64_t v) { return T(v); }
template <class T> FG_HD inline T from_storage(int32_t v) { return T(v); }
template <class T> FG_HD inline T from_storage(uint8_t v) { return v != 0 ? T(1) : T(0); }  // bool

template <class S> struct to_storage_impl;
template <> struct to_storage_impl<float> {
  template <class T> FG_HD static float cvt(T v) { return float(v); }
};
template <> struct to_storage_impl<double> {
  template <class T> FG_HD static double cvt(T v) { return double(v); }
};
template <> struct to_storage_impl<half_t> {
  template <class T> FG_HD static half_t cvt(T v) { return half_t{float_to_half(float(v))}; }
};
template <> struct to_storage_impl<bf16_t> {
  template <class T> FG_HD static bf16_t cvt(T v) { return bf16_t{float_to_bf16(float(v))}; }
};
// Float -> integer casts that are out of range (or NaN) are undefined in C++;
// give x86's "integer indefinite" value instead, which is what PyTorch's
// casts produce on this hardware.
template <> struct to_storage_impl<int64_t> {
  template <class T> FG_HD static int64_t cvt(T v) {
    const double d = double(v);
    return (d > -9223372036854775808.0 && d < 9223372036854775808.0) ? int64_t(d) : INT64_MIN;
  }
};
template <> struct to_storage_impl<int32_t> {
  template <class T> FG_HD static int32_t cvt(T v) {
    const double d = double(v);
    return (d > -2147483649.0 && d < 2147483648.0) ? int32_t(d) : INT32_MIN;
  }
};
template <> struct to_storage_impl<uint8_t> {  // bool: any nonzero (NaN too) is true
  template <class T> FG_HD static uint8_t cvt(T v) { return v != T(0) ? 1 : 0; }
};
template <class S, class T> FG_HD inline S to_storage(T v) { return to_storage_impl<S>::template cvt<T>(v); }

}  // namespace fg
