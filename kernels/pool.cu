// Pooling on FP16 NHWC, f32 math inside.
//   maxpool2: MaxPool2d(2, 2), floor; 8 channels (16 bytes) per thread when c % 8 == 0 and the
//     pointers are aligned, else one channel per thread.
//   adaptive_avgpool: AdaptiveAvgPool2d((oh, ow)) with PyTorch's bins
//     [floor(i·H/oh), ceil((i+1)·H/oh)); one output element per thread, channel fastest
//     (coalesced); f32 sum divided by the bin size.
// Index math runs in 32 bits when the element count allows (I = int), else 64 bits.
#include "common.cuh"

__device__ __forceinline__ u32 max2(u32 a, u32 b) {
    return pack2(fmaxf(lo_f(a), lo_f(b)), fmaxf(hi_f(a), hi_f(b)));
}

template <typename I>
__device__ __forceinline__ void maxpool2_body(const f16raw* __restrict__ x, int n, int h, int w,
                                              int c, f16raw* __restrict__ y) {
    const int oh = h / 2, ow = w / 2;
    const bool vec = (c % 8) == 0 && is_aligned(x, 16) && is_aligned(y, 16);
    const int cv = vec ? c / 8 : c;  // channel groups per pixel
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
            const uint4* p00 = reinterpret_cast<const uint4*>(x + base) + g;
            const uint4 a = p00[0];
            const uint4 b = *(reinterpret_cast<const uint4*>(x + base + c) + g);
            const uint4 d = *(reinterpret_cast<const uint4*>(x + base + row) + g);
            const uint4 e = *(reinterpret_cast<const uint4*>(x + base + row + c) + g);
            uint4 m;
            m.x = max2(max2(a.x, b.x), max2(d.x, e.x));
            m.y = max2(max2(a.y, b.y), max2(d.y, e.y));
            m.z = max2(max2(a.z, b.z), max2(d.z, e.z));
            m.w = max2(max2(a.w, b.w), max2(d.w, e.w));
            reinterpret_cast<uint4*>(y)[i] = m;
        } else {
            const i64 q = base + g;
            const float v = fmaxf(fmaxf(h2f(x[q]), h2f(x[q + c])),
                                  fmaxf(h2f(x[q + row]), h2f(x[q + row + c])));
            y[i] = f2h(v);
        }
    }
}

extern "C" __global__ void maxpool2(const f16raw* __restrict__ x, int n, int h, int w, int c,
                                    f16raw* __restrict__ y) {
    if ((i64)n * (h / 2) * (w / 2) * c <= 0x7fffffffLL) maxpool2_body<int>(x, n, h, w, c, y);
    else maxpool2_body<i64>(x, n, h, w, c, y);
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
