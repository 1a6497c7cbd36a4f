// Pooling on FP16 NHWC, f32 math inside.
//   maxpool2: MaxPool2d(2, 2), floor; 8 channels (16 bytes) per thread when c % 8 == 0 and the
//     pointers are aligned, else one channel per thread.
//   maxpool2_e4m3: the same on E4M3 bytes (`--precision fp8`, between two FP8 convs whose
//     activations stay E4M3): for values ≥ 0 the E4M3 codes 0x00..0x7E order like the values,
//     so the max of the codes is the code of the max, and pooling after the quantization equals
//     quantizing after the pooling. Inputs are post-ReLU; a code with the sign bit (−0, or a
//     negative a ReLU would have zeroed) counts as 0. 16 channels per thread when c % 16 == 0
//     and the pointers are aligned, else one.
//   adaptive_avgpool: AdaptiveAvgPool2d((oh, ow)) with PyTorch's bins
//     [floor(i·H/oh), ceil((i+1)·H/oh)); one output element per thread, channel fastest
//     (coalesced); f32 sum divided by the bin size.
// Index math runs in 32 bits when the element count allows (I = int), else 64 bits.
#include "common.cuh"

// The larger of two E4M3 codes of non-negative values; a code with the sign bit counts as 0.
__device__ __forceinline__ u32 max_e4m3(u32 a, u32 b) {
    a = (a & 0x80u) ? 0u : a;
    b = (b & 0x80u) ? 0u : b;
    return a > b ? a : b;
}

// How the max-pool body takes the max of its element type: `word` on two 32-bit words of
// packed elements, `one` on two elements.
struct MaxF16 {
    typedef f16raw T;
    __device__ __forceinline__ static u32 word(u32 a, u32 b) {
        return pack2(fmaxf(lo_f(a), lo_f(b)), fmaxf(hi_f(a), hi_f(b)));
    }
    __device__ __forceinline__ static T one(T a, T b) { return f2h(fmaxf(h2f(a), h2f(b))); }
};

// Four E4M3 codes per word, SIMD within the register (no byte-by-byte loop: the pool was bound
// by its arithmetic, 2.7 TB/s against the FP16 pool's 4.2 on the H200): a code with the sign bit
// becomes 0, then per byte max(a, b) of codes ≤ 0x7F, from the sign of (0x80 + a) − b, which no
// byte can borrow across.
__device__ __forceinline__ u32 e4m3_nonneg4(u32 v) {
    return v & ~(((v >> 7) & 0x01010101u) * 0xFFu);
}
__device__ __forceinline__ u32 max_u7x4(u32 a, u32 b) {
    const u32 ge = (((a | 0x80808080u) - b) & 0x80808080u) >> 7;  // 1 where a ≥ b
    const u32 mask = ge * 0xFFu;
    return (a & mask) | (b & ~mask);
}

struct MaxE4m3 {
    typedef unsigned char T;
    __device__ __forceinline__ static u32 word(u32 a, u32 b) {
        return max_u7x4(e4m3_nonneg4(a), e4m3_nonneg4(b));
    }
    __device__ __forceinline__ static T one(T a, T b) { return (T)max_e4m3(a, b); }
};

template <typename M>
__device__ __forceinline__ u32 max_of4(u32 a, u32 b, u32 d, u32 e) {
    return M::word(M::word(a, b), M::word(d, e));
}

// MaxPool2d(2, 2) of elements M::T: 16 bytes of channels per thread (8 FP16, 16 E4M3) when
// they divide c and the pointers are aligned, else one channel per thread.
template <typename I, typename M>
__device__ __forceinline__ void maxpool2_body(const typename M::T* __restrict__ x, int n, int h,
                                              int w, int c, typename M::T* __restrict__ y) {
    const int lanes = 16 / (int)sizeof(typename M::T);
    const int oh = h / 2, ow = w / 2;
    const bool vec = (c % lanes) == 0 && is_aligned(x, 16) && is_aligned(y, 16);
    const int cv = vec ? c / lanes : c;  // channel groups per pixel
    const i64 total = (i64)n * oh * ow * cv;
    for (i64 i = global_tid(); i < total; i += global_stride()) {
        I r = (I)i;
        const I g = r % cv;
        r /= cv;
        const I ox = r % ow;
        r /= ow;
        const I oy = r % oh;
        const I img = r / oh;
        // element offset of (img, 2oy, 2ox, group g)
        const i64 base = (((i64)img * h + 2 * (i64)oy) * w + 2 * (i64)ox) * c;
        const i64 row = (i64)w * c;
        if (vec) {
            const uint4 a = *(reinterpret_cast<const uint4*>(x + base) + g);
            const uint4 b = *(reinterpret_cast<const uint4*>(x + base + c) + g);
            const uint4 d = *(reinterpret_cast<const uint4*>(x + base + row) + g);
            const uint4 e = *(reinterpret_cast<const uint4*>(x + base + row + c) + g);
            uint4 m;
            m.x = max_of4<M>(a.x, b.x, d.x, e.x);
            m.y = max_of4<M>(a.y, b.y, d.y, e.y);
            m.z = max_of4<M>(a.z, b.z, d.z, e.z);
            m.w = max_of4<M>(a.w, b.w, d.w, e.w);
            reinterpret_cast<uint4*>(y)[i] = m;
        } else {
            const i64 q = base + g;
            y[i] = M::one(M::one(x[q], x[q + c]), M::one(x[q + row], x[q + row + c]));
        }
    }
}

template <typename M>
__device__ __forceinline__ void maxpool2_any(const typename M::T* __restrict__ x, int n, int h,
                                             int w, int c, typename M::T* __restrict__ y) {
    if ((i64)n * (h / 2) * (w / 2) * c <= 0x7fffffffLL) maxpool2_body<int, M>(x, n, h, w, c, y);
    else maxpool2_body<i64, M>(x, n, h, w, c, y);
}

extern "C" __global__ void maxpool2(const f16raw* __restrict__ x, int n, int h, int w, int c,
                                    f16raw* __restrict__ y) {
    maxpool2_any<MaxF16>(x, n, h, w, c, y);
}

extern "C" __global__ void maxpool2_e4m3(const unsigned char* __restrict__ x, int n, int h, int w,
                                         int c, unsigned char* __restrict__ y) {
    maxpool2_any<MaxE4m3>(x, n, h, w, c, y);
}

template <typename I>
__device__ __forceinline__ void adaptive_avgpool_body(const f16raw* __restrict__ x, int n, int h,
                                                      int w, int c, int oh, int ow,
                                                      f16raw* __restrict__ y) {
    const i64 total = (i64)n * oh * ow * c;
    for (i64 i = global_tid(); i < total; i += global_stride()) {
        I r = (I)i;
        const I ch = r % c;
        r /= c;
        const I ox = r % ow;
        r /= ow;
        const I oy = r % oh;
        const I img = r / oh;
        const int y0 = (int)(((i64)oy * h) / oh);
        const int y1 = (int)((((i64)oy + 1) * h + oh - 1) / oh);
        const int x0 = (int)(((i64)ox * w) / ow);
        const int x1 = (int)((((i64)ox + 1) * w + ow - 1) / ow);
        const f16raw* src = x + (i64)img * h * w * c + ch;
        float sum = 0.0f;
        for (int yy = y0; yy < y1; ++yy) {
            float rs = 0.0f;
            for (int xx = x0; xx < x1; ++xx) rs += h2f(src[((i64)yy * w + xx) * c]);
            sum += rs;
        }
        y[i] = f2h(sum / (float)((y1 - y0) * (x1 - x0)));
    }
}

extern "C" __global__ void adaptive_avgpool(const f16raw* __restrict__ x, int n, int h, int w,
                                            int c, int oh, int ow, f16raw* __restrict__ y) {
    if ((i64)n * h * w * c <= 0x7fffffffLL && (i64)n * oh * ow * c <= 0x7fffffffLL)
        adaptive_avgpool_body<int>(x, n, h, w, c, oh, ow, y);
    else
        adaptive_avgpool_body<i64>(x, n, h, w, c, oh, ow, y);
}
