// conv3x3_wg_n128 / _n256: a 3×3 convolution (stride 1, padding 1) + f32 bias (+ ReLU) as an
// implicit GEMM on Hopper's warpgroup MMA (sm_90a `wgmma`, both operands in shared memory), for
// VGG's deeper layers: FP16 NHWC in and out, f32 accumulation, any cin a multiple of 32 and cout
// a multiple of the build's N (128 or 256). x [n, h, w, cin], y [n, h, w, cout].
//
// Why: cuDNN ran VGG16's conv2_1 … conv5_3 at 62–77 % of the H200's dense FP16 peak (graph API
// or legacy, `gpu-check-2026-11-29.json`), and they are two thirds of a masked forward. The
// tuning at prepare checks this kernel against the CPU on the device, times it against cuDNN's
// plans per layer and keeps it only where it is faster (conv.rs, conv_direct.rs).
//
// As a GEMM: M = n·h·w output pixels, N = cout, K = 9 taps × cin. A block takes work items of
// 128 consecutive pixels (flattened over images, so no pixel is wasted on padding) × N output
// channels, persistently (one block per SM: the launcher's grid; item = block + j·grid, pixels
// outer, so the blocks at work at one time share their input rows and the whole filter in L2).
// Two warpgroups, each 64 pixels × N by wgmma_ss_64xNx16. K goes in stages of one tap × 32 input
// channels (64 bytes per pixel): slice s of the channels, its 9 taps, then the next slice, so
// that the 9 shifted copies of a slice's input rows are read from L1 (cp_async16_l1) after the
// first.
//
// Shared memory: a ring of STAGES stages, each
//   - A: the 128 pixels' 64 input bytes at the stage's tap (zeros where the tap falls outside the
//     image, or past the last pixel), as 4 planes of 16-byte chunks [chunk][pixel][16 B], planes
//     CW_A_PLANE bytes apart: a K-major, unswizzled operand whose 8×8 core matrices are 8
//     consecutive pixels of one chunk (LBO = CW_A_PLANE, SBO = 128). The 32 bytes of padding per
//     plane make the copies of a quarter-warp (2 pixels × 4 chunks) hit 8 distinct bank groups;
//   - B: the stage's filter block, N rows (output channels) × 64 bytes, [chunk][n][16 B] (LBO =
//     16·N, SBO = 128), copied as is from the filter the host packed in that order
//     (`conv3x3_wg_pack_filter` in conv_wg.rs).
// Every thread copies (cp.async) and every warpgroup computes. At stage i: wait for stage i's
// copies (issued STAGES − 2 stages earlier), fence them to the async proxy, one block barrier
// (also: every warpgroup has finished stage i − 2's wgmma, whose buffer the copies issued next
// refill), issue stage i's wgmma group (2 k-steps of 16), then queue the copies of stage
// i + STAGES − 2, then wait until only stage i's group is in flight. So one group always runs on
// the tensor cores while the next is prepared, and copies STAGES − 2 stages ahead are in flight.
// After an item's last stage: wait for all, + bias, ReLU, FP16, stores from the accumulators.
#include "common.cuh"

#define CW_BM 128
#define CW_A_PLANE 2080
#define CW_A_BYTES (4 * CW_A_PLANE)

// A build's sizes: N output channels per item, its stage and ring in bytes.
template <int BN>
struct CwShape {
    static constexpr int B_BYTES = BN * 64;
    static constexpr int STAGE = CW_A_BYTES + B_BYTES;
    // About 195 KiB of ring either way: 8 stages of 24,704 bytes or 12 of 16,512.
    static constexpr int STAGES = BN == 256 ? 8 : 12;
    static constexpr int SMEM = STAGES * STAGE;
    static constexpr int ACC = BN / 2;  // accumulators per thread
};

// N = 128 and 256: the two wgmma shapes the kernel issues.
template <int BN>
__device__ __forceinline__ void cw_wgmma(float (&d)[BN / 2], u64 desc_a, u64 desc_b);
template <>
__device__ __forceinline__ void cw_wgmma<128>(float (&d)[64], u64 desc_a, u64 desc_b) {
    wgmma_ss_64x128x16(d, desc_a, desc_b);
}
template <>
__device__ __forceinline__ void cw_wgmma<256>(float (&d)[128], u64 desc_a, u64 desc_b) {
    wgmma_ss_64x256x16(d, desc_a, desc_b);
}

// The work of one launch: items of 128 pixels × BN channels, and the stages of each.
struct CwWork {
    i64 pixels, items;
    int h, w, cin, cout, ntiles, kst;
};

// Queues the copies of the calling block's stages in order, one stage per `issue`, each into the
// ring slot the caller names. Thread `tid` copies A chunk tid % 4 of pixels tid / 4 and
// tid / 4 + 64, and B's 16-byte units tid + 256·q.
template <int BN>
struct CwLoader {
    const f16raw* x;
    const f16raw* wpack;
    CwWork wk;
    i64 item;  // the next stage's item (≥ wk.items: no more stages)
    int kk;    // and its stage within the item
    int nt;    // the item's block of output channels
    // The thread's two A pixels in the item: element offset of the pixel's channels in x, its
    // row and column; row −1: past the last pixel (zeros).
    i64 base[2];
    int row[2], col[2];

    __device__ __forceinline__ void locate() {
        if (item >= wk.items) return;
        const i64 mt = item / wk.ntiles;
        nt = (int)(item - mt * wk.ntiles);
        const i64 hw = (i64)wk.h * wk.w;
#pragma unroll
        for (int e = 0; e < 2; ++e) {
            const i64 p = mt * CW_BM + (threadIdx.x >> 2) + 64 * e;
            const i64 img = p / hw;
            const int rem = (int)(p - img * hw);
            row[e] = p < wk.pixels ? rem / wk.w : -1;
            col[e] = rem - (rem / wk.w) * wk.w;
            base[e] = p * wk.cin;
        }
    }

    __device__ __forceinline__ void issue(unsigned char* stage) {
        if (item >= wk.items) return;
        const int slice = kk / 9, tap = kk - 9 * slice;
        const int dy = tap / 3 - 1, dx = tap - 3 * (tap / 3) - 1;
        const int chunk = threadIdx.x & 3;
#pragma unroll
        for (int e = 0; e < 2; ++e) {
            const int r = row[e] + dy, c = col[e] + dx;
            const bool inside = row[e] >= 0 && (unsigned)r < (unsigned)wk.h &&
                                (unsigned)c < (unsigned)wk.w;
            const f16raw* src =
                inside ? x + base[e] + ((i64)dy * wk.w + dx) * wk.cin + 32 * slice + 8 * chunk : x;
            cp_async16_l1(stage + chunk * CW_A_PLANE + ((threadIdx.x >> 2) + 64 * e) * 16, src,
                          inside);
        }
        const f16raw* b = wpack + ((i64)nt * wk.kst + kk) * (BN * 32);
#pragma unroll
        for (int q = 0; q < BN / 64; ++q) {
            const int u = threadIdx.x + 256 * q;
            cp_async16(stage + CW_A_BYTES + u * 16, b + u * 8, true);
        }
        if (++kk == wk.kst) {
            kk = 0;
            item += gridDim.x;
            locate();
        }
    }
};

// After an item's last stage: the calling thread's rows 16·warp + g and + 8 of its group's 64
// pixels, columns 8j + 2t, + 1 of the item's BN: + bias, ReLU when `relu`, FP16, into y.
template <int BN>
__device__ __forceinline__ void cw_store(const float (&acc)[BN / 2], const CwWork& wk, i64 item,
                                         const float* __restrict__ bias, int relu, bool y4,
                                         f16raw* __restrict__ y) {
    const i64 mt = item / wk.ntiles;
    const int nt = (int)(item - mt * wk.ntiles);
    const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    const i64 p0 = mt * CW_BM + 64 * (threadIdx.x >> 7) + 16 * ((threadIdx.x >> 5) & 3) + g;
#pragma unroll  // (the accumulators are registers: every index a constant)
    for (int j = 0; j < BN / 8; ++j) {
        const int ch = nt * BN + 8 * j + 2 * t;
        const float b0 = bias[ch], b1 = bias[ch + 1];
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            const i64 p = p0 + 8 * r;
            if (p >= wk.pixels) continue;
            float v0 = acc[4 * j + 2 * r] + b0, v1 = acc[4 * j + 2 * r + 1] + b1;
            if (relu) {
                v0 = fmaxf(v0, 0.0f);
                v1 = fmaxf(v1, 0.0f);
            }
            f16raw* dst = y + p * wk.cout + ch;
            if (y4) {
                *reinterpret_cast<u32*>(dst) = pack2(v0, v1);
            } else {
                dst[0] = f2h(v0);
                dst[1] = f2h(v1);
            }
        }
    }
}

template <int BN>
__device__ __forceinline__ void conv3x3_wg_body(const f16raw* __restrict__ x,
                                                const f16raw* __restrict__ wpack,
                                                const float* __restrict__ bias, int n, int h,
                                                int w, int cin, int cout, int relu,
                                                f16raw* __restrict__ y) {
    using S = CwShape<BN>;
    extern __shared__ uint4 cw_smem[];
    unsigned char* smem = reinterpret_cast<unsigned char*>(cw_smem);
    // The group through a shuffle: the compiler then knows it uniform in the warp (ptxas C7519).
    const int group = __shfl_sync(0xffffffffu, (int)(threadIdx.x >> 7), 0);

    CwWork wk;
    wk.pixels = (i64)n * h * w;
    wk.h = h;
    wk.w = w;
    wk.cin = cin;
    wk.cout = cout;
    wk.ntiles = cout / BN;
    wk.kst = 9 * (cin >> 5);
    wk.items = (wk.pixels + CW_BM - 1) / CW_BM * wk.ntiles;

    CwLoader<BN> ld{x, wpack, wk, (i64)blockIdx.x, 0, 0, {0, 0}, {0, 0}, {0, 0}};
    ld.locate();
    // The first STAGES − 2 stages (an empty group for each stage past the block's last).
#pragma unroll 1
    for (int s = 0; s < S::STAGES - 2; ++s) {
        ld.issue(smem + s * S::STAGE);
        cp_async_commit();
    }

    const bool y4 = is_aligned(y, 4);
    int slot = 0, fill = S::STAGES - 2;  // ring slots of this stage and of the next copies
    // The item loop outside, the stage loop inside, so that the accumulators are zeroed and read
    // only outside the loop whose back edge carries them in flight (else ptxas waits, C7517).
#pragma unroll 1
    for (i64 item = blockIdx.x; item < wk.items; item += gridDim.x) {  // block-uniform
        float acc[S::ACC];
#pragma unroll
        for (int i = 0; i < S::ACC; ++i) acc[i] = 0.0f;
        wgmma_fence_operands(acc);
#pragma unroll 1
        for (int kk = 0; kk < wk.kst; ++kk) {
            cp_async_wait<S::STAGES - 3>();  // this thread's copies of stage `slot`
            fence_proxy_async();             // visible to the wgmma (async proxy) …
            __syncthreads();                 // … of every thread; stage i − 2's wgmma are done
            unsigned char* st = smem + slot * S::STAGE;
            const u64 da = wgmma_desc_kmajor(st + group * 64 * 16, CW_A_PLANE, 128);
            const u64 db = wgmma_desc_kmajor(st + CW_A_BYTES, BN * 16, 128);
            wgmma_fence();
#pragma unroll
            for (int ks = 0; ks < 2; ++ks)  // chunks 2ks, 2ks + 1 (16 channels)
                cw_wgmma<BN>(acc, da + (u64)((2 * ks * CW_A_PLANE) >> 4),
                             db + (u64)((2 * ks * BN * 16) >> 4));
            wgmma_commit();
            ld.issue(smem + fill * S::STAGE);  // into stage i − 2's slot
            cp_async_commit();
            slot = slot + 1 == S::STAGES ? 0 : slot + 1;
            fill = fill + 1 == S::STAGES ? 0 : fill + 1;
            wgmma_wait<1>();  // stage i − 1's group
        }
        wgmma_wait<0>();
        wgmma_fence_operands(acc);
        cw_store<BN>(acc, wk, item, bias, relu, y4, y);
    }
    cp_async_wait_0();  // nothing in flight at exit (only empty groups remain)
}

// sm_90a only (wgmma): elsewhere they trap, and the launcher refuses them first.
extern "C" __global__ void __launch_bounds__(256, 1)
    conv3x3_wg_n128(const f16raw* __restrict__ x, const f16raw* __restrict__ wpack,
                    const float* __restrict__ bias, int n, int h, int w, int cin, int cout,
                    int relu, f16raw* __restrict__ y) {
    conv3x3_wg_body<128>(x, wpack, bias, n, h, w, cin, cout, relu, y);
}

extern "C" __global__ void __launch_bounds__(256, 1)
    conv3x3_wg_n256(const f16raw* __restrict__ x, const f16raw* __restrict__ wpack,
                    const float* __restrict__ bias, int n, int h, int w, int cin, int cout,
                    int relu, f16raw* __restrict__ y) {
    conv3x3_wg_body<256>(x, wpack, bias, n, h, w, cin, cout, relu, y);
}
