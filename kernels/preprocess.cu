// u8 RGB HWC image → normalized FP16 NHWC with `cpad` channels: (x/255 − mean[c])/std[c] for the 3
// colour channels, zeros in the padding channels. One thread per pixel; a pixel's cpad halves are
// written with one 16-byte (cpad 8) or 8-byte (cpad 4) store when aligned, else half by half.
#include "common.cuh"

extern "C" __global__ void preprocess(const unsigned char* __restrict__ rgb, int s, float mean0,
                                      float mean1, float mean2, float std0, float std1,
                                      float std2, int cpad, f16raw* __restrict__ out) {
    const i64 n = (i64)s * s;
    const bool vec16 = cpad == 8 && is_aligned(out, 16);
    const bool vec8 = cpad == 4 && is_aligned(out, 8);
    for (i64 p = global_tid(); p < n; p += global_stride()) {
        const float r = ((float)rgb[3 * p + 0] / 255.0f - mean0) / std0;
        const float g = ((float)rgb[3 * p + 1] / 255.0f - mean1) / std1;
        const float b = ((float)rgb[3 * p + 2] / 255.0f - mean2) / std2;
        f16raw* o = out + p * cpad;
        if (vec16) {
            *reinterpret_cast<uint4*>(o) = make_uint4(pack2(r, g), pack2(b, 0.0f), 0u, 0u);
        } else if (vec8) {
            *reinterpret_cast<uint2*>(o) = make_uint2(pack2(r, g), pack2(b, 0.0f));
        } else {
            o[0] = f2h(r);
            o[1] = f2h(g);
            o[2] = f2h(b);
            for (int c = 3; c < cpad; ++c) o[c] = 0;
        }
    }
}
