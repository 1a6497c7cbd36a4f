// Fused Score-CAM masking: bilinear upsample of one activation channel → min-max normalize →
// multiply the input image, for every (image, channel) item of a batch in one launch.
//
// Organisation (Kernels::masks picks the launch shape):
//   * `blocks_per_item` blocks share one item: virtual block vb = item·blocks_per_item + part,
//     grid-strided, so any grid covers any batch.
//   * Each block stages the item's h×w source plane (f32) in shared memory and, in the separable
//     mode (MODE_SEPARABLE), the horizontally interpolated rows H[r][x] (h×S floats): then
//     U[y][x] = wy0·H[y0][x] + wy1·H[y1][x] — the same products and sums as PyTorch's
//     h0·(w0·v00 + w1·v01) + h1·(w0·v10 + w1·v11) — costs two shared loads and two flops.
//   * Min and max of U over ALL S×S pixels (exactly over U: its extremes need not be at source
//     pixels), one warp per output row, lanes along x; a block-wide reduction. Every block of an
//     item does this redundantly (cheap in the separable mode; saves a second launch).
//   * Write pass: the item's rows are spread over the item's blocks and their warps, lanes along
//     x: per pixel one 16-byte load of the image and one 16-byte store for cpad 8 (8 bytes for
//     cpad 4), so a warp writes 512 contiguous bytes; other cpad (3, 5..7) or unaligned pointers
//     store half by half.
//   * `masks` is the separable mode only. Planes whose h×S rows do not fit in shared memory go
//     to `masks_direct`: the direct bilinear formula, with the plane in shared memory
//     (MODE_SMEM_PLANE) or read from the NHWC activations (MODE_GLOBAL).
//   * Variants (torchcam's SS-CAM / IS-CAM): `lowres_stats` takes min and max over the h×w source
//     plane instead of U (normalizing then upsampling is the same linear map); the normalized
//     mask is multiplied by `scale`; with `sigma` > 0, Gaussian noise from counter-based stream
//     `sample` (the item's third word) is added at element k·S² + y·S + x — the same numbers as
//     the host's `normal_noise` (SplitMix64 keys, Box-Muller), computed in f32 here.
// Items whose image slot or channel is out of range write zeros (the host cannot see `items`).
#include "common.cuh"

#define MODE_GLOBAL 0
#define MODE_SMEM_PLANE 1
#define MODE_SEPARABLE 2

// Row sources: `row(y)` hoists the per-row work, `at(x)` gives U[y][x].
struct SepRow {
    const float* h0;
    const float* h1;
    float wy0, wy1;
    __device__ __forceinline__ float at(int x) const { return wy0 * h0[x] + wy1 * h1[x]; }
};
struct SepSrc {
    const float* H;  // [h][s]
    int s, h;
    float sy;
    bool ac;
    __device__ __forceinline__ SepRow row(int y) const {
        const Tap t = bilinear_tap(y, h, sy, ac);
        SepRow r;
        r.h0 = H + t.i0 * s;
        r.h1 = H + t.i1 * s;
        r.wy0 = 1.0f - t.l1;
        r.wy1 = t.l1;
        return r;
    }
};
template <typename Load>
struct DirectRow {
    Load ld;
    Tap ty;
    int w;
    float sx;
    bool ac;
    __device__ __forceinline__ float at(int x) const {
        return bilinear_value(ld, ty, bilinear_tap(x, w, sx, ac));
    }
};
template <typename Load>
struct DirectSrc {
    Load ld;
    int h, w;
    float sy, sx;
    bool ac;
    __device__ __forceinline__ DirectRow<Load> row(int y) const {
        DirectRow<Load> r;
        r.ld = ld;
        r.ty = bilinear_tap(y, h, sy, ac);
        r.w = w;
        r.sx = sx;
        r.ac = ac;
        return r;
    }
};

// N(0, 1) element `index` of the stream whose base key is `base` = splitmix64(splitmix64(seed) ^
// stream) (see backend::normal_noise).
__device__ __forceinline__ float normal_at(u64 base, u64 index) {
    const u64 k1 = splitmix64(base ^ (index * 2ull));
    const u64 k2 = splitmix64(base ^ (index * 2ull + 1ull));
    const float inv53 = 1.1102230246251565e-16f;  // 2^-53
    const float u1 = (float)((k1 >> 11) + 1ull) * inv53;
    const float u2 = (float)(k2 >> 11) * inv53;
    return sqrtf(-2.0f * logf(u1)) * cospif(2.0f * u2);
}

// Min and max of the item's h×w source plane (low-resolution statistics).
template <typename Load>
__device__ __forceinline__ void plane_minmax(const Load& ld, int h, int w, float& mn, float& mx) {
    for (int i = threadIdx.x; i < h * w; i += blockDim.x) {
        const int r = i / w;
        const float v = ld(r, i - r * w);
        mn = fminf(mn, v);
        mx = fmaxf(mx, v);
    }
}

// The per-launch mask variant.
struct MaskVariant {
    int lowres_stats;
    float scale;
    float sigma;
    u64 seed_key;  // splitmix64(seed)
};

template <typename Src>
__device__ __forceinline__ void masks_minmax(const Src& src, int s, float& mn, float& mx) {
    const int lane = threadIdx.x & 31;
    const int nwarps = blockDim.x >> 5;
    for (int y = threadIdx.x >> 5; y < s; y += nwarps) {
        const auto r = src.row(y);
        for (int x = lane; x < s; x += 32) {
            const float u = r.at(x);
            mn = fminf(mn, u);
            mx = fmaxf(mx, u);
        }
    }
}

// Write pass. VEC = 8 or 4: cpad is VEC and the pointers are aligned to one pixel (16 or 8
// bytes): one vector load and store per pixel. VEC = 0: any cpad, half by half.
template <int VEC, typename Src>
__device__ __forceinline__ void masks_write(const Src& src, const f16raw* __restrict__ im,
                                            f16raw* __restrict__ o, int s, int cpad, float mn,
                                            float inv_den, bool zero, bool degenerate,
                                            int part, int parts, float scale, float sigma,
                                            u64 noise_base, u64 noise_offset) {
    const int lane = threadIdx.x & 31;
    const int nwarps = blockDim.x >> 5;
    const int step = parts * nwarps;
    for (int y = part * nwarps + (threadIdx.x >> 5); y < s; y += step) {
        const i64 row_base = (i64)y * s;
        if (zero) {
            for (int x = lane; x < s; x += 32) {
                const i64 p = row_base + x;
                if (VEC == 8) reinterpret_cast<uint4*>(o)[p] = make_uint4(0u, 0u, 0u, 0u);
                else if (VEC == 4) reinterpret_cast<uint2*>(o)[p] = make_uint2(0u, 0u);
                else for (int c = 0; c < cpad; ++c) o[p * cpad + c] = 0;
            }
            continue;
        }
        const auto r = src.row(y);
        for (int x = lane; x < s; x += 32) {
            const i64 p = row_base + x;
            float m = degenerate ? 0.0f : (r.at(x) - mn) * inv_den * scale;
            if (sigma != 0.0f) m += sigma * normal_at(noise_base, noise_offset + (u64)p);
            if (VEC == 8) {
                const uint4 v = reinterpret_cast<const uint4*>(im)[p];
                reinterpret_cast<uint4*>(o)[p] =
                    make_uint4(pack2(lo_f(v.x) * m, hi_f(v.x) * m), pack2(lo_f(v.y) * m, 0.0f), 0u, 0u);
            } else if (VEC == 4) {
                const uint2 v = reinterpret_cast<const uint2*>(im)[p];
                reinterpret_cast<uint2*>(o)[p] =
                    make_uint2(pack2(lo_f(v.x) * m, hi_f(v.x) * m), pack2(lo_f(v.y) * m, 0.0f));
            } else {
                const f16raw* ip = im + p * cpad;
                f16raw* op = o + p * cpad;
                op[0] = f2h(h2f(ip[0]) * m);
                op[1] = f2h(h2f(ip[1]) * m);
                op[2] = f2h(h2f(ip[2]) * m);
                for (int c = 3; c < cpad; ++c) op[c] = 0;
            }
        }
    }
}

template <typename Src, typename Load>
__device__ __forceinline__ void masks_item(const Src& src, const Load& plane, int h, int w,
                                           const f16raw* im, f16raw* o, int s, int cpad,
                                           float eps, bool valid, int part, int parts,
                                           const MaskVariant& v, u32 ch, u32 sample) {
    float mn = f32_inf(), mx = -f32_inf();
    if (valid) {
        if (v.lowres_stats) plane_minmax(plane, h, w, mn, mx);
        else masks_minmax(src, s, mn, mx);
    }
    block_min_max(mn, mx);
    // (U − min)/((max − min) + eps), the references' order of operations.
    const float den = (mx - mn) + eps;
    const bool degenerate = !valid || !(den > 0.0f);
    const float inv_den = degenerate ? 0.0f : 1.0f / den;
    const float sigma = valid ? v.sigma : 0.0f;
    const u64 noise_base = splitmix64(v.seed_key ^ (u64)sample);
    const u64 noise_offset = (u64)ch * (u64)s * (u64)s;
    // All-zero output: an invalid item, or a degenerate mask with no noise to add.
    const bool zero = !valid || (degenerate && sigma == 0.0f);
    if (cpad == 8 && is_aligned(o, 16) && (zero || is_aligned(im, 16)))
        masks_write<8>(src, im, o, s, cpad, mn, inv_den, zero, degenerate, part, parts, v.scale,
                       sigma, noise_base, noise_offset);
    else if (cpad == 4 && is_aligned(o, 8) && (zero || is_aligned(im, 8)))
        masks_write<4>(src, im, o, s, cpad, mn, inv_den, zero, degenerate, part, parts, v.scale,
                       sigma, noise_base, noise_offset);
    else
        masks_write<0>(src, im, o, s, cpad, mn, inv_den, zero, degenerate, part, parts, v.scale,
                       sigma, noise_base, noise_offset);
}

// The item loop shared by both kernels. images [n_img, s, s, cpad] f16, acts [n_img, h, w, k] f16,
// items [b, 3] u32 (image, channel, noise stream), out [b, s, s, cpad] f16. Dynamic shared
// memory (floats): MODE_SEPARABLE h·w + h·s, MODE_SMEM_PLANE h·w, MODE_GLOBAL none. blockDim.x:
// a multiple of 32.
template <int MODE>
__device__ __forceinline__ void masks_body(const f16raw* __restrict__ images,
                                           const f16raw* __restrict__ acts,
                                           const u32* __restrict__ items, int b, int n_img, int s,
                                           int h, int w, int k, int cpad, int align_corners,
                                           float eps, const MaskVariant& v, int blocks_per_item,
                                           f16raw* __restrict__ out, float* smem) {
    if (blocks_per_item < 1) return;
    const bool ac = align_corners != 0;
    const float sy = bilinear_scale(h, s, ac);
    const float sx = bilinear_scale(w, s, ac);
    const i64 per_item = (i64)s * s * cpad;
    const i64 hw = (i64)h * w;
    const i64 total = (i64)b * blocks_per_item;
    float* plane_s = smem;       // [h][w]
    float* rows_s = smem + hw;   // [h][s], MODE_SEPARABLE

    for (i64 vb = blockIdx.x; vb < total; vb += gridDim.x) {  // block-uniform loop
        const int item = (int)(vb / blocks_per_item);
        const int part = (int)(vb - (i64)item * blocks_per_item);
        const u32 img = items[3 * (i64)item];
        const u32 ch = items[3 * (i64)item + 1];
        const u32 sample = items[3 * (i64)item + 2];
        const bool valid = img < (u32)n_img && ch < (u32)k;
        const f16raw* plane = acts + (valid ? ((i64)img * hw * k + ch) : 0);
        const f16raw* im = images + (valid ? (i64)img * per_item : 0);
        f16raw* o = out + (i64)item * per_item;

        if (MODE == MODE_GLOBAL) {
            const GlobalPlaneF16 ld{plane, w, k};
            DirectSrc<GlobalPlaneF16> src{ld, h, w, sy, sx, ac};
            masks_item(src, ld, h, w, im, o, s, cpad, eps, valid, part, blocks_per_item, v, ch,
                       sample);
            continue;
        }
        __syncthreads();  // the previous item is done with shared memory
        if (valid) {
            for (int i = threadIdx.x; i < (int)hw; i += blockDim.x) plane_s[i] = h2f(plane[(i64)i * k]);
        }
        __syncthreads();
        const SmemPlane smem_plane{plane_s, w};
        if (MODE == MODE_SMEM_PLANE) {
            DirectSrc<SmemPlane> src{smem_plane, h, w, sy, sx, ac};
            masks_item(src, smem_plane, h, w, im, o, s, cpad, eps, valid, part, blocks_per_item,
                       v, ch, sample);
            continue;
        }
        if (valid) {
            const int n = h * s;
            for (int i = threadIdx.x; i < n; i += blockDim.x) {
                const int r = i / s;
                const int x = i - r * s;
                const Tap t = bilinear_tap(x, w, sx, ac);
                rows_s[i] = (1.0f - t.l1) * plane_s[r * w + t.i0] + t.l1 * plane_s[r * w + t.i1];
            }
        }
        __syncthreads();
        SepSrc src{rows_s, s, h, sy, ac};
        masks_item(src, smem_plane, h, w, im, o, s, cpad, eps, valid, part, blocks_per_item, v,
                   ch, sample);
    }
}

// The hot kernel (separable mode). At most 256 threads per block; at most 64 registers, so at
// least 4 blocks (1024 threads) stay resident per SM.
extern "C" __global__ void __launch_bounds__(256, 4)
    masks(const f16raw* __restrict__ images, const f16raw* __restrict__ acts,
          const u32* __restrict__ items, int b, int n_img, int s, int h, int w, int k, int cpad,
          int align_corners, float eps, int lowres_stats, float scale, float sigma, u64 seed_key,
          int blocks_per_item, f16raw* __restrict__ out) {
    extern __shared__ float s_masks[];
    const MaskVariant v{lowres_stats, scale, sigma, seed_key};
    masks_body<MODE_SEPARABLE>(images, acts, items, b, n_img, s, h, w, k, cpad, align_corners,
                               eps, v, blocks_per_item, out, s_masks);
}

// The fallback for planes whose h×s rows do not fit in shared memory: the direct bilinear
// formula, the plane in shared memory (plane_in_smem) or read from global memory. Same
// arguments as `masks` plus plane_in_smem; a separate kernel so that `masks` keeps few registers.
extern "C" __global__ void __launch_bounds__(256)
    masks_direct(const f16raw* __restrict__ images, const f16raw* __restrict__ acts,
                 const u32* __restrict__ items, int b, int n_img, int s, int h, int w, int k,
                 int cpad, int align_corners, float eps, int lowres_stats, float scale,
                 float sigma, u64 seed_key, int blocks_per_item, int plane_in_smem,
                 f16raw* __restrict__ out) {
    extern __shared__ float s_masks_direct[];
    const MaskVariant v{lowres_stats, scale, sigma, seed_key};
    if (plane_in_smem)
        masks_body<MODE_SMEM_PLANE>(images, acts, items, b, n_img, s, h, w, k, cpad,
                                    align_corners, eps, v, blocks_per_item, out, s_masks_direct);
    else
        masks_body<MODE_GLOBAL>(images, acts, items, b, n_img, s, h, w, k, cpad, align_corners,
                                eps, v, blocks_per_item, out, s_masks_direct);
}
