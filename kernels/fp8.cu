// FP8 (E4M3) support for the `--precision fp8` masked forwards:
//   amax_abs_f16:  amax = max(amax, max |x|) over n f16 values (a layer's input in the base forward)
//   fp8_scales:    per layer l from amax (then reset): scales[4l] = descale = (amax·margin / 448)
//                  · w_scale, the conv output's scale back, and scales[4l+1] = multiplier =
//                  448 / (amax·margin), the quantization of its input (both read from device
//                  memory by the launches after it, so captured CUDA graphs stay valid when the
//                  scales change; 4 floats per layer keep each descale 16-byte aligned, as the
//                  cuDNN graph's tensor declares)
//   quantize_e4m3: out = E4M3(x · multiplier), saturating at ±448, round to nearest even
// The conversion is done in software (the same result as cuda_fp8.hpp's __nv_cvt_float_to_fp8
// with __NV_SATFINITE for |x| ≤ 448, clamped above), so it compiles for every architecture.
#include "common.cuh"

__device__ __forceinline__ unsigned char e4m3_bits(float x) {
    const u32 sign = (__float_as_uint(x) >> 24) & 0x80u;
    float a = fabsf(x);
    if (a != a) return (unsigned char)(sign | 0x7Fu);  // NaN stays NaN, sign kept
    a = fminf(a, 448.0f);
    if (a < 0.015625f) {
        // Below 2^-6: subnormals k·2^-9 (k = 8 is 2^-6, the smallest normal, bits 0x08).
        return (unsigned char)(sign | (u32)__float2int_rn(a * 512.0f));
    }
    const u32 bits = __float_as_uint(a);
    const int e = (int)((bits >> 23) & 0xFFu) - 127;  // -6..8
    const u32 m = bits & 0x7FFFFFu;
    u32 r = ((u32)(e + 7) << 3) | (m >> 20);
    const u32 rem = m & 0xFFFFFu;
    if (rem > 0x80000u || (rem == 0x80000u && (r & 1u))) r += 1;  // a carry moves the exponent
    return (unsigned char)(sign | r);
}

extern "C" __global__ void amax_abs_f16(const f16raw* __restrict__ x, long long n,
                                        float* __restrict__ amax) {
    float m = 0.0f;
    for (i64 i = global_tid(); i < n; i += global_stride()) m = fmaxf(m, fabsf(h2f(x[i])));
    m = block_max(m);
    // Non-negative floats order like their bit patterns as ints.
    if (threadIdx.x == 0) atomicMax(reinterpret_cast<int*>(amax), __float_as_int(m));
}

extern "C" __global__ void fp8_scales(float* __restrict__ amax, const float* __restrict__ w_scale,
                                      int layers, float margin, float* __restrict__ scales) {
    const int l = blockIdx.x * blockDim.x + threadIdx.x;
    if (l >= layers) return;
    // An amax beyond FP16's range (an overflowed base forward) is capped at it, so the scales
    // stay finite; an all-zero input gets the smallest scale.
    const float sx = fmaxf(fminf(amax[l], 65504.0f) * margin, 1e-30f) / 448.0f;
    scales[4 * l] = sx * w_scale[l];
    scales[4 * l + 1] = 1.0f / sx;
    amax[l] = 0.0f;
}

extern "C" __global__ void quantize_e4m3(const f16raw* __restrict__ x, long long n,
                                         const float* __restrict__ multiplier,
                                         unsigned char* __restrict__ out) {
    const float s = *multiplier;
    for (i64 i = global_tid(); i < n; i += global_stride()) out[i] = e4m3_bits(h2f(x[i]) * s);
}
