// FP8 (E4M3) support for the `--precision fp8` masked forwards:
//   amax_abs_f16:  amax = max(amax, max |x|) over n f16 values (a layer's input in the base forward)
//   fp8_scales:    per layer l from amax (then reset): scales[8l] = descale = (amax·margin / 448)
//                  · w_scale, the conv output's scale back, and scales[8l+4] = multiplier =
//                  448 / (amax·margin), the quantization of its input (both read from device
//                  memory by the launches after it, so captured CUDA graphs stay valid when the
//                  scales change; 8 floats per layer keep both 16-byte aligned, as the cuDNN
//                  graphs' tensors declare: an FP8 conv with an E4M3 output reads the next FP8
//                  layer's multiplier as its output scale)
//   quantize_e4m3: out = E4M3(x · multiplier), saturating at ±448, round to nearest even
//   dequantize_e4m3: out = f16(value(x) / multiplier): E4M3 codes an FP8 conv wrote for the next
//                  conv, when that one runs FP16
// The conversion is common.cuh's e4m3_bits.
#include "common.cuh"

extern "C" __global__ void amax_abs_f16(const f16raw* __restrict__ x, long long n,
                                        float* __restrict__ amax) {
    float m = 0.0f;
    for (i64 i = global_tid(); i < n; i += global_stride()) m = fmaxf(m, fabsf(h2f(x[i])));
    m = block_max(m);
    // Non-negative floats order like their bit patterns as ints.
    if (threadIdx.x == 0) atomicMax(reinterpret_cast<int*>(amax), __float_as_int(m));
}

// `stride`, `descale_at`, `multiplier_at`: the layout above (SCALE_STRIDE, DESCALE_AT and
// MULTIPLIER_AT in kernels/fp8.rs, passed so the two cannot drift apart).
extern "C" __global__ void fp8_scales(float* __restrict__ amax, const float* __restrict__ w_scale,
                                      int layers, float margin, int stride, int descale_at,
                                      int multiplier_at, float* __restrict__ scales) {
    const int l = blockIdx.x * blockDim.x + threadIdx.x;
    if (l >= layers) return;
    // An amax beyond FP16's range (an overflowed base forward) is capped at it, so the scales
    // stay finite; an all-zero input gets the smallest scale.
    const float sx = fmaxf(fminf(amax[l], 65504.0f) * margin, 1e-30f) / 448.0f;
    scales[(i64)stride * l + descale_at] = sx * w_scale[l];
    scales[(i64)stride * l + multiplier_at] = 1.0f / sx;
    amax[l] = 0.0f;
}

extern "C" __global__ void quantize_e4m3(const f16raw* __restrict__ x, long long n,
                                         const float* __restrict__ multiplier,
                                         unsigned char* __restrict__ out) {
    const float s = *multiplier;
    for (i64 i = global_tid(); i < n; i += global_stride()) out[i] = e4m3_bits(h2f(x[i]) * s);
}

// The value of an E4M3 code (0x7F and 0xFF are NaN; there is no infinity).
__device__ __forceinline__ float e4m3_value(u32 bits) {
    const u32 e = (bits >> 3) & 0xFu, m = bits & 0x7u;
    float a;
    if ((bits & 0x7Fu) == 0x7Fu) a = __int_as_float(0x7FC00000);
    else if (e == 0) a = (float)m * 0.001953125f;  // subnormal: m · 2^-9
    else a = __int_as_float((int)(((e + 120u) << 23) | (m << 20)));  // (1 + m/8) · 2^(e-7)
    return (bits & 0x80u) ? -a : a;
}

extern "C" __global__ void dequantize_e4m3(const unsigned char* __restrict__ x, long long n,
                                           const float* __restrict__ multiplier,
                                           f16raw* __restrict__ out) {
    const float s = *multiplier;
    for (i64 i = global_tid(); i < n; i += global_stride()) out[i] = f2h(e4m3_value(x[i]) / s);
}
