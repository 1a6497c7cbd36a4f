// In-place elementwise ops, 16 bytes per thread where the pointers and row length allow:
//   bias_act_f16: y[r, col] = act(y[r, col] + bias[col]) (f16, f32 math, optional ReLU)
//   bias_f32:     y[r, col] += bias[col] (f32 logits)
//   relu_f16:     x = max(x, 0)
//   fill_uniform_f16: x[i] = lo + (hi - lo)·u_i, u_i ∈ [0, 1) from a hash of (seed, i): the
//                 random data convolution algorithms are timed on (zeros draw less power)
// Index math runs in 32 bits when the element count allows (I = int), else 64 bits.
#include "common.cuh"

__device__ __forceinline__ float act(float v, bool relu) { return relu ? fmaxf(v, 0.0f) : v; }

__device__ __forceinline__ u32 bias_act2(u32 y, u32 b, bool relu) {
    return pack2(act(lo_f(y) + lo_f(b), relu), act(hi_f(y) + hi_f(b), relu));
}

template <typename I>
__device__ __forceinline__ void bias_act_f16_body(f16raw* __restrict__ y,
                                                  const f16raw* __restrict__ bias, int rows,
                                                  int cols, bool relu) {
    const bool vec = (cols % 8) == 0 && is_aligned(y, 16) && is_aligned(bias, 16);
    if (vec) {
        const int cv = cols / 8;
        const i64 total = (i64)rows * cv;
        uint4* y4 = reinterpret_cast<uint4*>(y);
        const uint4* b4 = reinterpret_cast<const uint4*>(bias);
        for (i64 i = global_tid(); i < total; i += global_stride()) {
            const uint4 b = b4[(I)i % cv];
            uint4 v = y4[i];
            v.x = bias_act2(v.x, b.x, relu);
            v.y = bias_act2(v.y, b.y, relu);
            v.z = bias_act2(v.z, b.z, relu);
            v.w = bias_act2(v.w, b.w, relu);
            y4[i] = v;
        }
    } else {
        const i64 total = (i64)rows * cols;
        for (i64 i = global_tid(); i < total; i += global_stride()) {
            y[i] = f2h(act(h2f(y[i]) + h2f(bias[(I)i % cols]), relu));
        }
    }
}

extern "C" __global__ void bias_act_f16(f16raw* __restrict__ y, const f16raw* __restrict__ bias,
                                        int rows, int cols, int relu) {
    if ((i64)rows * cols <= 0x7fffffffLL) bias_act_f16_body<int>(y, bias, rows, cols, relu != 0);
    else bias_act_f16_body<i64>(y, bias, rows, cols, relu != 0);
}

extern "C" __global__ void bias_f32(float* __restrict__ y, const float* __restrict__ bias,
                                    int rows, int cols) {
    const bool vec = (cols % 4) == 0 && is_aligned(y, 16) && is_aligned(bias, 16);
    if (vec) {
        const int cv = cols / 4;
        const i64 total = (i64)rows * cv;
        float4* y4 = reinterpret_cast<float4*>(y);
        const float4* b4 = reinterpret_cast<const float4*>(bias);
        for (i64 i = global_tid(); i < total; i += global_stride()) {
            const float4 b = b4[i % cv];
            float4 v = y4[i];
            v.x += b.x;
            v.y += b.y;
            v.z += b.z;
            v.w += b.w;
            y4[i] = v;
        }
    } else {
        const i64 total = (i64)rows * cols;
        for (i64 i = global_tid(); i < total; i += global_stride()) y[i] += bias[i % cols];
    }
}

__device__ __forceinline__ u32 relu2(u32 v) {
    return pack2(fmaxf(lo_f(v), 0.0f), fmaxf(hi_f(v), 0.0f));
}

extern "C" __global__ void relu_f16(f16raw* __restrict__ x, long long n) {
    // Vector part: the first n/8 chunks of 8 halves when x is 16-byte aligned; scalar tail.
    const i64 chunks = is_aligned(x, 16) ? n / 8 : 0;
    uint4* x4 = reinterpret_cast<uint4*>(x);
    for (i64 i = global_tid(); i < chunks; i += global_stride()) {
        uint4 v = x4[i];
        v.x = relu2(v.x);
        v.y = relu2(v.y);
        v.z = relu2(v.z);
        v.w = relu2(v.w);
        x4[i] = v;
    }
    for (i64 i = chunks * 8 + global_tid(); i < n; i += global_stride()) {
        x[i] = f2h(fmaxf(h2f(x[i]), 0.0f));
    }
}

extern "C" __global__ void fill_uniform_f16(f16raw* __restrict__ x, long long n, u64 seed_key,
                                            float lo, float hi) {
    for (i64 i = global_tid(); i < n; i += global_stride()) {
        const float u = (float)(splitmix64(seed_key ^ (u64)i) >> 40) * (1.0f / 16777216.0f);
        x[i] = f2h(lo + (hi - lo) * u);
    }
}
