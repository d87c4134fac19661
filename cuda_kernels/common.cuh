// Shared device helpers for the TinyServe kernels (prepended to every .cu by runtime.py).
//
// NOTE: header-free on purpose (no cuda_fp16.h / cuda_bf16.h): NVRTC include paths differ
// between CuPy builds, and the kernels only need loads, fp32 math and one rounding store.
// 16-bit values travel as raw bits; these tags pick the conversion at compile time.

struct bf16_t { unsigned short bits; };
struct f16_t { unsigned short bits; };

typedef long long i64;

#define NEG_INF __uint_as_float(0xff800000u)

__device__ __forceinline__ int imin(int a, int b) { return a < b ? a : b; }

__device__ __forceinline__ uint4 zero_uint4() {
  uint4 z;
  z.x = z.y = z.z = z.w = 0u;
  return z;
}

// Two packed 16-bit values (one 32-bit word, low half first) -> two floats.
template <typename T> struct Packed;

template <> struct Packed<bf16_t> {
  static __device__ __forceinline__ void unpack(unsigned int w, float& lo, float& hi) {
    lo = __uint_as_float(w << 16);
    hi = __uint_as_float(w & 0xffff0000u);
  }
  static __device__ __forceinline__ unsigned short from_float(float f) {
    unsigned int u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;  // NaN stays NaN
    u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest even
    return (unsigned short)(u >> 16);
  }
};

template <> struct Packed<f16_t> {
  static __device__ __forceinline__ void unpack(unsigned int w, float& lo, float& hi) {
    asm("{.reg .b16 l, h;\n\tmov.b32 {l, h}, %2;\n\tcvt.f32.f16 %0, l;\n\tcvt.f32.f16 %1, h;}"
        : "=f"(lo), "=f"(hi) : "r"(w));
  }
  static __device__ __forceinline__ unsigned short from_float(float f) {
    unsigned short h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
  }
};

// 8 packed 16-bit values (one 16-byte load) -> 8 floats.
template <typename T>
__device__ __forceinline__ void unpack8(const uint4& v, float* out) {
  Packed<T>::unpack(v.x, out[0], out[1]);
  Packed<T>::unpack(v.y, out[2], out[3]);
  Packed<T>::unpack(v.z, out[4], out[5]);
  Packed<T>::unpack(v.w, out[6], out[7]);
}

__device__ __forceinline__ float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
