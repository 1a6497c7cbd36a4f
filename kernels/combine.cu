// The final map. Bilinear upsampling is linear, so upsample(Σ_k w_k A_k) = Σ_k w_k upsample(A_k):
// the official map is recomputed from the low-resolution weighted sum, never materializing U_k.
//   weighted_channel_sum: out[y, x] = Σ_k w[k]·acts[y, x, k] (optional ReLU); one warp per pixel
//     (lanes stride over k with packed half2 loads when aligned), warp-shuffle sum.
//   upsample_relu_normalize: one block: stage the low-res map in shared memory, upsample (the same
//     bilinear helpers as masks.cu), ReLU, write, block min/max, then normalize in place to
//     [0, 1] (all zeros and flat = 1 when max == min).
#include "common.cuh"

extern "C" __global__ void weighted_channel_sum(const f16raw* __restrict__ acts,
                                                const float* __restrict__ weights, int h, int w,
                                                int k, int relu, float* __restrict__ out) {
    const int lane = threadIdx.x & 31;
    const i64 hw = (i64)h * w;
    const bool pairs = (k % 2) == 0 && is_aligned(acts, 4);
    for (i64 p = global_tid() >> 5; p < hw; p += global_stride() >> 5) {  // warp-uniform loop
        const f16raw* a = acts + p * k;
        float acc = 0.0f;
        if (pairs) {
            const u32* a2 = reinterpret_cast<const u32*>(a);
            for (int i = lane; i < k / 2; i += 32) {
                const u32 v = a2[i];
                acc += weights[2 * i] * lo_f(v) + weights[2 * i + 1] * hi_f(v);
            }
        } else {
            for (int i = lane; i < k; i += 32) acc += weights[i] * h2f(a[i]);
        }
        acc = warp_sum(acc);
        if (lane == 0) out[p] = relu ? fmaxf(acc, 0.0f) : acc;
    }
}

template <typename Load>
__device__ __forceinline__ void upsample_relu_pass(const Load& at, int h, int w, int s, bool ac,
                                                   float* __restrict__ out, float& mn,
                                                   float& mx) {
    const float sy = bilinear_scale(h, s, ac);
    const float sx = bilinear_scale(w, s, ac);
    const int ss = s * s;
    for (int p = threadIdx.x; p < ss; p += blockDim.x) {
        const int y = p / s;
        const int x = p - y * s;
        float u = bilinear_value(at, bilinear_tap(y, h, sy, ac), bilinear_tap(x, w, sx, ac));
        u = fmaxf(u, 0.0f);
        out[p] = u;
        mn = fminf(mn, u);
        mx = fmaxf(mx, u);
    }
}

// low [h, w] f32 → out [s, s] f32, flat [1] u32. Launch with exactly one block; dynamic shared
// memory: h·w floats when low_in_smem.
extern "C" __global__ void upsample_relu_normalize(const float* __restrict__ low, int h, int w,
                                                   int s, int align_corners, int low_in_smem,
                                                   float* __restrict__ out,
                                                   u32* __restrict__ flat) {
    extern __shared__ float s_low[];
    if (blockIdx.x != 0) return;  // block-uniform
    const bool ac = align_corners != 0;
    const i64 hw = (i64)h * w;
    if (low_in_smem) {
        for (int i = threadIdx.x; i < hw; i += blockDim.x) s_low[i] = low[i];
    }
    __syncthreads();
    float mn = f32_inf(), mx = -f32_inf();
    if (low_in_smem) upsample_relu_pass(SmemPlane{s_low, w}, h, w, s, ac, out, mn, mx);
    else upsample_relu_pass(GlobalPlaneF32{low, w}, h, w, s, ac, out, mn, mx);
    block_min_max(mn, mx);  // also orders each thread's writes before its own re-reads below
    const bool is_flat = !(mx > mn);
    const float range = mx - mn;
    const int ss = s * s;
    for (int p = threadIdx.x; p < ss; p += blockDim.x) {
        out[p] = is_flat ? 0.0f : (out[p] - mn) / range;  // each thread re-reads what it wrote
    }
    if (threadIdx.x == 0) flat[0] = is_flat ? 1u : 0u;
}
