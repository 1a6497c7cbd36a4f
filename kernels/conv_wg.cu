// conv3x3_wg_n128 / _n256: a 3×3 convolution (stride 1, padding 1) + f32 bias (+ ReLU) as an
// implicit GEMM on Hopper's warpgroup MMA (sm_90a `wgmma`, both operands in shared memory), for
// VGG's deeper layers: FP16 NHWC in and out, f32 accumulation, any cin a multiple of 32 and cout
// a multiple of the build's N (128 or 256). x [n, h, w, cin], y [n, h, w, cout].
// conv3x3_wg_pool_n128 / _n256: the same followed by the 2×2 max-pool (VGG's block ends), only
// the pooled quarter written, [n, h/2, w/2, cout].
// conv3x3_wg_e4m3_n128 (and _pair): the same on FP8 E4M3 input and filter (cin a multiple of 64;
// N = 128 only: its partial sums are promoted to f32 registers of their own, 128 more at N = 256;
// `--precision fp8`), the sums times the layer's descale (sx·sw) before the bias, out FP16 or,
// given the next FP8 conv's multiplier, E4M3 codes of the output times it.
// conv3x3_wg_e4m3_pool_n128 (and _pair): that, pooled (a block's last conv when it runs FP8).
// Everything below is in bytes, and a stage is 64 bytes per pixel either way: 32 FP16
// channels, or 64 E4M3 ones.
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
// Two warpgroups, each 64 pixels × N by wgmma_ss_64xNx16. The tall builds (`_m256n128`, FP16)
// take items of 256 pixels × 128 channels instead, each warpgroup 2 × 64 pixels: per operation
// half the filter bytes of 128 × 256 (every block reads each stage's filter block from L2; at
// the full FP16 rate that is about 7 TB/s on 132 SMs, near what an H100's L2 is reported to
// give) for twice the A bytes, which the L1 serves after the first tap. K goes in stages of one tap × 32 input
// channels (64 bytes per pixel): slice s of the channels, its 9 taps, then the next slice, so
// that the 9 shifted copies of a slice's input rows are read from L1 (cp_async16_l1) after the
// first.
//
// Shared memory: a ring of STAGES stages, each
//   - A: the item's pixels' 64 input bytes at the stage's tap (zeros where the tap falls outside
//     the image, or past the last pixel), as 4 planes of 16-byte chunks [chunk][pixel][16 B],
//     planes A_PLANE bytes apart: a K-major, unswizzled operand whose 8×8 core matrices are 8
//     consecutive pixels of one chunk (LBO = A_PLANE, SBO = 128). The 32 bytes of padding per
//     plane make the copies of a quarter-warp (2 pixels × 4 chunks) hit 8 distinct bank groups;
//   - B: the stage's filter block, N rows (output channels) × 64 bytes, [chunk][n][16 B] (LBO =
//     16·N, SBO = 128), copied as is from the filter the host packed in that order
//     (`conv3x3_wg_pack_filter` in conv_wg.rs).
// Every thread copies (cp.async) and every warpgroup computes. At stage i: wait for stage i's
// copies (issued STAGES − 2 stages earlier), fence them to the async proxy, one block barrier
// (also: every warpgroup has finished stage i − 2's wgmma, whose buffer the copies issued next
// refill), issue stage i's wgmma group (2 k-steps of 32 bytes), then queue the copies of stage
// i + STAGES − 2, then wait until only stage i's group is in flight. So one group always runs on
// the tensor cores while the next is prepared, and copies STAGES − 2 stages ahead are in flight.
// After an item's last stage: wait for all, + bias, ReLU, FP16 (or the pool, or E4M3), stores
// from the accumulators.
#include "common.cuh"

// A build's sizes: BM pixels × BN output channels per item, its stage and ring in bytes. The
// A planes are BM pixels × 16 bytes + 32 bytes of padding (2080 bytes at BM = 128).
template <int BM, int BN>
struct CwShape {
    static constexpr int A_PLANE = BM * 16 + 32;
    static constexpr int A_BYTES = 4 * A_PLANE;
    static constexpr int B_BYTES = BN * 64;
    static constexpr int STAGE = A_BYTES + B_BYTES;
    // About 195 KiB of ring either way: 8 stages of 24,704 bytes (128 × 256 or 256 × 128) or 12
    // of 16,512 (128 × 128).
    static constexpr int STAGES = BM * BN >= 128 * 256 ? 8 : 12;
    static constexpr int SMEM = STAGES * STAGE;
    static constexpr int RG = BM / 128;  // groups of 64 rows per warpgroup
    static constexpr int ACC = BN / 2;   // accumulators per thread and row group
};

// One k-step of 32 bytes (16 FP16 or 32 E4M3 k): the wgmma shapes the kernel issues.
template <int BN, bool E8>
__device__ __forceinline__ void cw_wgmma(float (&d)[BN / 2], u64 desc_a, u64 desc_b) {
    static_assert(!E8 || BN == 128, "the E4M3 build is N = 128 only");
    if constexpr (E8) wgmma_ss_e4m3_64x128x32(d, desc_a, desc_b);
    if constexpr (!E8 && BN == 128) wgmma_ss_64x128x16(d, desc_a, desc_b);
    if constexpr (!E8 && BN == 256) wgmma_ss_64x256x16(d, desc_a, desc_b);
}

// The work of one launch: items of BM pixels × BN channels, and the stages of each; a pixel's
// input channels are `pix_bytes` bytes. With `pool`, an item's BM rows are the 2×2 windows of
// BM / 4 pooled pixels (`units` counts pooled pixels, ph × pw each image; else pixels): row m of
// the block, in warp-row w = m / 16, r = m % 16, is window position (r / 8, r % 2) of pooled
// pixel 4w + (r % 8) / 2, so that a thread's two accumulator rows (g, g + 8) are a window's
// column and the lane g ^ 1 holds the other column (cw_store pools them by one shuffle).
// `pack_n`: the output channels per block of the packed filter (BN, or 256 for the tall build
// reading a 256-channel layer's packing: each item then takes half of a block's rows).
template <int BM>
struct CwWork {
    i64 units, items;
    int h, w, cout, ntiles, kst, pix_bytes, pack_n;
    bool pool;
    int ph, pw;
    // Output units per item.
    __device__ __forceinline__ int per_item() const { return pool ? BM / 4 : BM; }
};

// Queues the copies of the calling block's stages in order, one stage per `issue`, each into the
// ring slot the caller names. Thread `tid` copies A chunk tid % 4 of pixels tid / 4 + 64·e
// (e < BM / 64), and B's 16-byte units tid + 256·q.
template <int BM, int BN>
struct CwLoader {
    static constexpr int PIX = BM / 64;  // A pixels per thread
    using S = CwShape<BM, BN>;
    const unsigned char* x;
    const unsigned char* wpack;
    CwWork<BM> wk;
    i64 item;  // the next stage's item (≥ wk.items: no more stages)
    int kk;    // and its stage within the item
    int nt;    // the item's block of output channels
    // The thread's A pixels in the item: byte offset of the pixel's channels in x, its row and
    // column; row −1: past the last pixel (zeros).
    i64 base[PIX];
    int row[PIX], col[PIX];

    __device__ __forceinline__ void locate() {
        if (item >= wk.items) return;
        const i64 mt = item / wk.ntiles;
        nt = (int)(item - mt * wk.ntiles);
#pragma unroll
        for (int e = 0; e < PIX; ++e) {
            const int m = (threadIdx.x >> 2) + 64 * e;  // the block's row
            if (wk.pool) {
                const int r = m & 15;
                const i64 q = mt * (BM / 4) + 4 * (m >> 4) + ((r & 7) >> 1);
                const i64 per_img = (i64)wk.ph * wk.pw;
                const i64 img = q / per_img;
                const int rem = (int)(q - img * per_img), py = rem / wk.pw;
                row[e] = q < wk.units ? 2 * py + (r >> 3) : -1;
                col[e] = 2 * (rem - py * wk.pw) + (r & 1);
                base[e] = ((img * wk.h + row[e]) * wk.w + col[e]) * wk.pix_bytes;
            } else {
                const i64 hw = (i64)wk.h * wk.w;
                const i64 p = mt * BM + m;
                const i64 img = p / hw;
                const int rem = (int)(p - img * hw);
                row[e] = p < wk.units ? rem / wk.w : -1;
                col[e] = rem - (rem / wk.w) * wk.w;
                base[e] = p * wk.pix_bytes;
            }
        }
    }

    __device__ __forceinline__ void issue(unsigned char* stage) {
        if (item >= wk.items) return;
        const int slice = kk / 9, tap = kk - 9 * slice;
        const int dy = tap / 3 - 1, dx = tap - 3 * (tap / 3) - 1;
        const int chunk = threadIdx.x & 3;
#pragma unroll
        for (int e = 0; e < PIX; ++e) {
            const int r = row[e] + dy, c = col[e] + dx;
            const bool inside = row[e] >= 0 && (unsigned)r < (unsigned)wk.h &&
                                (unsigned)c < (unsigned)wk.w;
            const unsigned char* src =
                inside ? x + base[e] + ((i64)dy * wk.w + dx) * wk.pix_bytes + 64 * slice + 16 * chunk
                       : x;
            cp_async16_l1(stage + chunk * S::A_PLANE + ((threadIdx.x >> 2) + 64 * e) * 16, src,
                          inside);
        }
        // The item's BN filter rows: packed block nt >> shift, its rows (nt & halves − 1)·BN on,
        // per chunk. Only the tall build (BM 256, BN 128) may read blocks of 256 rows (pack_n 256:
        // two halves); for the others pack_n is BN, a constant.
        const int pack_n = BM == 256 ? wk.pack_n : BN;
        const int shift = pack_n == 2 * BN ? 1 : 0;
        const int half = nt & ((1 << shift) - 1);
        const unsigned char* b =
            wpack + ((i64)(nt >> shift) * wk.kst + kk) * (pack_n * 64) + half * BN * 16;
#pragma unroll
        for (int q = 0; q < BN / 64; ++q) {
            const int u = threadIdx.x + 256 * q;  // chunk u / BN, row u % BN
            const int src = (u / BN) * pack_n + u % BN;
            cp_async16(stage + S::A_BYTES + u * 16, b + src * 16, true);
        }
        if (++kk == wk.kst) {
            kk = 0;
            item += gridDim.x;
            locate();
        }
    }
};

// What an item's epilogue does: the sums times `descale` (1 for FP16 input), + bias, ReLU when
// `relu`, then FP16, or (`e4m3`) E4M3 codes of the value times `mult`.
struct CwOut {
    const float* __restrict__ bias;
    float descale;
    bool e4m3;
    float mult;
    int relu;
    bool y4;  // FP16 pairs as one 32-bit store (y 4-byte aligned)
    void* y;
};

// One output value: the sum times the descale, + bias, ReLU when asked.
__device__ __forceinline__ float cw_value(float sum, float bias, const CwOut& out) {
    const float v = sum * out.descale + bias;
    return out.relu ? fmaxf(v, 0.0f) : v;
}

// The output values of channels c and c + 1 at element `at` of y, as `out` says.
__device__ __forceinline__ void cw_put(const CwOut& out, i64 at, float v0, float v1) {
    if (out.e4m3) {
        unsigned char* dst = static_cast<unsigned char*>(out.y) + at;
        dst[0] = e4m3_bits(v0 * out.mult);
        dst[1] = e4m3_bits(v1 * out.mult);
    } else if (out.y4) {
        *reinterpret_cast<u32*>(static_cast<f16raw*>(out.y) + at) = pack2(v0, v1);
    } else {
        f16raw* dst = static_cast<f16raw*>(out.y) + at;
        dst[0] = f2h(v0);
        dst[1] = f2h(v1);
    }
}

// After an item's last stage: the calling thread's rows 64·rg + 16·warp + g and + 8 of its
// group's BM / 2 pixels (row group rg < BM / 128), columns 8j + 2t, + 1 of the item's BN, into
// y as `out` says. With `wk.pool`, the max of each window first (its rows g, g + 8 here, lane
// g ^ 1 the other column; max commutes with the positive descale, the bias, ReLU and the
// rounding, so this equals conv → round → pool), stored by the even g.
template <int BM, int BN>
__device__ __forceinline__ void cw_store(const float (&acc)[BM / 128][BN / 2],
                                         const CwWork<BM>& wk, i64 item, const CwOut& out) {
    const i64 mt = item / wk.ntiles;
    const int nt = (int)(item - mt * wk.ntiles);
    const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    const int group = threadIdx.x >> 7, warp = (threadIdx.x >> 5) & 3;
#pragma unroll
    for (int rg = 0; rg < BM / 128; ++rg) {
        // The block's warp-row of these 16 rows.
        const int wrow = (BM / 32) * group + 4 * rg + warp;
        const float(&a)[BN / 2] = acc[rg];
        if (wk.pool) {
            const i64 q = mt * (BM / 4) + 4 * wrow + (g >> 1);
            const bool stores = (g & 1) == 0 && q < wk.units;
#pragma unroll
            for (int j = 0; j < BN / 8; ++j) {
                float v[2];
#pragma unroll
                for (int c = 0; c < 2; ++c) {
                    const float rows = fmaxf(a[4 * j + c], a[4 * j + 2 + c]);
                    v[c] = fmaxf(rows, __shfl_xor_sync(0xffffffffu, rows, 4));
                }
                const int ch = nt * BN + 8 * j + 2 * t;
                if (!stores) continue;
                const float v0 = cw_value(v[0], out.bias[ch], out);
                cw_put(out, q * wk.cout + ch, v0, cw_value(v[1], out.bias[ch + 1], out));
            }
            continue;
        }
        const i64 p0 = mt * BM + 16 * wrow + g;
#pragma unroll  // (the accumulators are registers: every index a constant)
        for (int j = 0; j < BN / 8; ++j) {
            const int ch = nt * BN + 8 * j + 2 * t;
            const float b0 = out.bias[ch], b1 = out.bias[ch + 1];
#pragma unroll
            for (int r = 0; r < 2; ++r) {
                const i64 p = p0 + 8 * r;
                if (p >= wk.units) continue;
                const float v0 = cw_value(a[4 * j + 2 * r], b0, out);
                cw_put(out, p * wk.cout + ch, v0, cw_value(a[4 * j + 2 * r + 1], b1, out));
            }
        }
    }
}

// A step of P stages (a type, so that the stage lambda's waits take it as a constant).
template <int P>
struct CwSteps {
    static constexpr int value = P;
};

// `E8`: E4M3 input and filter (else FP16). `descale`, `mult`: see CwOut (null: 1, FP16 out).
// `POOL`: y is the 2×2 max-pool of the output (FP16, or E4M3 with `mult`; floor: an odd last row
// or column of the conv is never computed), [n, h/2, w/2, cout].
// `PAIR`: stages two at a time, so that the wait, the proxy fence and the block barrier come once
// per 4 MMAs instead of 2; the copies then run STAGES − 4 stages ahead instead of STAGES − 2.
// FP16: an even number of stages per item. E4M3: each slice's 9 stages as 4 pairs and a single
// one, so that the partial sums are still promoted after every 9. The tuning times both builds
// and keeps the faster.
// `BM`: pixels per item, 128 or (FP16, N = 128: the tall build) 256, each warpgroup then 2 row
// groups of 64: half the filter bytes per operation of 128 × 256. `pack_n`: see CwWork.
template <int BN, bool E8, bool POOL = false, bool PAIR = false, int BM = 128>
__device__ __forceinline__ void conv3x3_wg_body(const unsigned char* __restrict__ x,
                                                const unsigned char* __restrict__ wpack,
                                                const float* __restrict__ bias,
                                                const float* __restrict__ descale,
                                                const float* __restrict__ mult, int n, int h,
                                                int w, int cin, int cout, int relu, int pack_n,
                                                void* y) {
    using S = CwShape<BM, BN>;
    static_assert(BM == 128 || (BM == 256 && BN == 128 && !E8), "the tall build is FP16 N = 128");
    constexpr int AHEAD = PAIR ? S::STAGES - 4 : S::STAGES - 2;  // stages the copies run ahead
    extern __shared__ uint4 cw_smem[];
    unsigned char* smem = reinterpret_cast<unsigned char*>(cw_smem);
    // The group through a shuffle: the compiler then knows it uniform in the warp (ptxas C7519).
    const int group = __shfl_sync(0xffffffffu, (int)(threadIdx.x >> 7), 0);

    CwWork<BM> wk;
    wk.h = h;
    wk.w = w;
    wk.cout = cout;
    wk.ntiles = cout / BN;
    wk.pix_bytes = E8 ? cin : 2 * cin;
    wk.kst = 9 * (wk.pix_bytes >> 6);
    wk.pack_n = pack_n;
    wk.pool = POOL;
    wk.ph = h >> 1;
    wk.pw = w >> 1;
    wk.units = POOL ? (i64)n * wk.ph * wk.pw : (i64)n * h * w;
    wk.items = (wk.units + wk.per_item() - 1) / wk.per_item() * wk.ntiles;

    CwLoader<BM, BN> ld{x, wpack, wk, (i64)blockIdx.x, 0, 0, {}, {}, {}};
    ld.locate();
    // The first AHEAD stages (an empty group for each stage past the block's last).
#pragma unroll 1
    for (int s = 0; s < AHEAD; ++s) {
        ld.issue(smem + s * S::STAGE);
        cp_async_commit();
    }

    const CwOut out{bias, descale ? *descale : 1.0f, mult != nullptr, mult ? *mult : 1.0f,
                    relu, is_aligned(y, 4), y};
    int slot = 0, fill = AHEAD;  // ring slots of this stage and of the next copies
    constexpr int PER = PAIR ? 2 : 1;  // stages per step
    // One step (`steps` a CwSteps<P>: P stages, PER but for the E4M3 pair's single ones): wait
    // for their copies, issue their wgmma as one group into `acc`, queue the copies of the
    // stages AHEAD on (into the slots STAGES − AHEAD stages back, which neither this step's
    // group nor the one before reads: two steps take at most STAGES − AHEAD stages), leave only
    // this group in flight.
    // Copies are committed one group per stage either way.
    const auto stage = [&](auto steps, float(&acc)[S::RG][S::ACC]) {
        constexpr int P = decltype(steps)::value;
        cp_async_wait<AHEAD - P>();  // this thread's copies of this step's stages
        fence_proxy_async();           // visible to the wgmma (async proxy) …
        __syncthreads();               // … of every thread; the step before last's wgmma are done
        wgmma_fence();
#pragma unroll
        for (int p = 0; p < P; ++p) {
            unsigned char* st = smem + slot * S::STAGE;
            const u64 db = wgmma_desc_kmajor(st + S::A_BYTES, BN * 16, 128);
#pragma unroll
            for (int rg = 0; rg < S::RG; ++rg) {
                // The group's rows (BM / 2 of them), 64 per row group.
                const u64 da =
                    wgmma_desc_kmajor(st + (group * (BM / 2) + 64 * rg) * 16, S::A_PLANE, 128);
#pragma unroll
                for (int ks = 0; ks < 2; ++ks)  // chunks 2ks, 2ks + 1 (32 bytes of k)
                    cw_wgmma<BN, E8>(acc[rg], da + (u64)((2 * ks * S::A_PLANE) >> 4),
                                     db + (u64)((2 * ks * BN * 16) >> 4));
            }
            slot = slot + 1 == S::STAGES ? 0 : slot + 1;
        }
        wgmma_commit();
#pragma unroll
        for (int p = 0; p < P; ++p) {
            ld.issue(smem + fill * S::STAGE);
            cp_async_commit();
            fill = fill + 1 == S::STAGES ? 0 : fill + 1;
        }
        wgmma_wait<1>();  // the step before's group
    };
    // The item loop outside, the stage loops inside, so that the accumulators are zeroed and
    // read only outside the loop whose back edge carries them in flight (else ptxas waits,
    // C7517).
#pragma unroll 1
    for (i64 item = blockIdx.x; item < wk.items; item += gridDim.x) {  // block-uniform
        float acc[S::RG][S::ACC];
#pragma unroll
        for (int rg = 0; rg < S::RG; ++rg) {
#pragma unroll
            for (int i = 0; i < S::ACC; ++i) acc[rg][i] = 0.0f;
            wgmma_fence_operands(acc[rg]);
        }
        if constexpr (E8) {
            // Hopper's FP8 MMAs keep about 14 bits of their running sum (CUTLASS promotes every
            // 4 MMAs; DeepSeek-V3's report measured it): after each slice of the channels (9
            // stages, 18 MMAs, K = 576) the partial sums move into f32 registers of their own.
            float total[1][S::ACC];
#pragma unroll
            for (int i = 0; i < S::ACC; ++i) total[0][i] = 0.0f;
#pragma unroll 1
            for (int s0 = 0; s0 < wk.kst; s0 += 9) {
                if constexpr (PAIR) {
#pragma unroll 1
                    for (int step = 0; step < 4; ++step) stage(CwSteps<2>{}, acc);
                    stage(CwSteps<1>{}, acc);
                } else {
#pragma unroll 1
                    for (int tap = 0; tap < 9; ++tap) stage(CwSteps<1>{}, acc);
                }
                wgmma_wait<0>();
                wgmma_fence_operands(acc[0]);
#pragma unroll
                for (int i = 0; i < S::ACC; ++i) {
                    total[0][i] += acc[0][i];
                    acc[0][i] = 0.0f;
                }
                wgmma_fence_operands(acc[0]);
            }
            cw_store<BM, BN>(total, wk, item, out);
        } else {
#pragma unroll 1
            for (int kk = 0; kk < wk.kst; kk += PER) stage(CwSteps<PER>{}, acc);
            wgmma_wait<0>();
#pragma unroll
            for (int rg = 0; rg < S::RG; ++rg) wgmma_fence_operands(acc[rg]);
            cw_store<BM, BN>(acc, wk, item, out);
        }
    }
    cp_async_wait_0();  // nothing in flight at exit (only empty groups remain)
}

// The FP16 builds' entry: FP16 in and out, no descale; the filter packed in blocks of
// `pack_n` output channels (BN but for the tall build).
template <int BN, bool POOL, bool PAIR, int BM = 128>
__device__ __forceinline__ void conv3x3_wg_f16(const f16raw* x, const f16raw* wpack,
                                               const float* bias, int n, int h, int w, int cin,
                                               int cout, int relu, f16raw* y, int pack_n = BN) {
    conv3x3_wg_body<BN, false, POOL, PAIR, BM>(reinterpret_cast<const unsigned char*>(x),
                                               reinterpret_cast<const unsigned char*>(wpack),
                                               bias, nullptr, nullptr, n, h, w, cin, cout, relu,
                                               pack_n, y);
}

// The E4M3 builds' entry: the multiplier read only for an E4M3 output.
template <bool POOL, bool PAIR>
__device__ __forceinline__ void conv3x3_wg_e8(const unsigned char* x, const unsigned char* wpack,
                                              const float* bias, const float* descale,
                                              const float* mult, int n, int h, int w, int cin,
                                              int cout, int relu, int e4m3_out,
                                              unsigned char* y) {
    conv3x3_wg_body<128, true, POOL, PAIR>(x, wpack, bias, descale, e4m3_out ? mult : nullptr, n,
                                           h, w, cin, cout, relu, 128, y);
}

// sm_90a only (wgmma): elsewhere they trap, and the launcher refuses them first.
extern "C" __global__ void __launch_bounds__(256, 1)
    conv3x3_wg_n128(const f16raw* __restrict__ x, const f16raw* __restrict__ wpack,
                    const float* __restrict__ bias, int n, int h, int w, int cin, int cout,
                    int relu, f16raw* __restrict__ y) {
    conv3x3_wg_f16<128, false, false>(x, wpack, bias, n, h, w, cin, cout, relu, y);
}

extern "C" __global__ void __launch_bounds__(256, 1)
    conv3x3_wg_n256(const f16raw* __restrict__ x, const f16raw* __restrict__ wpack,
                    const float* __restrict__ bias, int n, int h, int w, int cin, int cout,
                    int relu, f16raw* __restrict__ y) {
    conv3x3_wg_f16<256, false, false>(x, wpack, bias, n, h, w, cin, cout, relu, y);
}

// FP16 in; y the 2×2 max-pool of ReLU(conv + bias), [n, h/2, w/2, cout] (VGG's last conv of a
// block with its pool: the pooled quarter is all that is written).
extern "C" __global__ void __launch_bounds__(256, 1)
    conv3x3_wg_pool_n128(const f16raw* __restrict__ x, const f16raw* __restrict__ wpack,
                         const float* __restrict__ bias, int n, int h, int w, int cin, int cout,
                         f16raw* __restrict__ y) {
    conv3x3_wg_f16<128, true, false>(x, wpack, bias, n, h, w, cin, cout, 1, y);
}

extern "C" __global__ void __launch_bounds__(256, 1)
    conv3x3_wg_pool_n256(const f16raw* __restrict__ x, const f16raw* __restrict__ wpack,
                         const float* __restrict__ bias, int n, int h, int w, int cin, int cout,
                         f16raw* __restrict__ y) {
    conv3x3_wg_f16<256, true, false>(x, wpack, bias, n, h, w, cin, cout, 1, y);
}

// The paired builds (`PAIR`): the same arguments; cin a multiple of 64.
extern "C" __global__ void __launch_bounds__(256, 1)
    conv3x3_wg_n128_pair(const f16raw* __restrict__ x, const f16raw* __restrict__ wpack,
                         const float* __restrict__ bias, int n, int h, int w, int cin, int cout,
                         int relu, f16raw* __restrict__ y) {
    conv3x3_wg_f16<128, false, true>(x, wpack, bias, n, h, w, cin, cout, relu, y);
}

extern "C" __global__ void __launch_bounds__(256, 1)
    conv3x3_wg_n256_pair(const f16raw* __restrict__ x, const f16raw* __restrict__ wpack,
                         const float* __restrict__ bias, int n, int h, int w, int cin, int cout,
                         int relu, f16raw* __restrict__ y) {
    conv3x3_wg_f16<256, false, true>(x, wpack, bias, n, h, w, cin, cout, relu, y);
}

extern "C" __global__ void __launch_bounds__(256, 1)
    conv3x3_wg_pool_n128_pair(const f16raw* __restrict__ x, const f16raw* __restrict__ wpack,
                              const float* __restrict__ bias, int n, int h, int w, int cin,
                              int cout, f16raw* __restrict__ y) {
    conv3x3_wg_f16<128, true, true>(x, wpack, bias, n, h, w, cin, cout, 1, y);
}

extern "C" __global__ void __launch_bounds__(256, 1)
    conv3x3_wg_pool_n256_pair(const f16raw* __restrict__ x, const f16raw* __restrict__ wpack,
                              const float* __restrict__ bias, int n, int h, int w, int cin,
                              int cout, f16raw* __restrict__ y) {
    conv3x3_wg_f16<256, true, true>(x, wpack, bias, n, h, w, cin, cout, 1, y);
}

// The tall builds: items of 256 pixels × 128 output channels (FP16), the same arguments and
// `pack_n`, the output channels per block of the packed filter they read (the layer's own
// packing: 128, or 256 for a layer of 256·k outputs, whose blocks they read by halves).
extern "C" __global__ void __launch_bounds__(256, 1)
    conv3x3_wg_m256n128(const f16raw* __restrict__ x, const f16raw* __restrict__ wpack,
                        const float* __restrict__ bias, int n, int h, int w, int cin, int cout,
                        int relu, int pack_n, f16raw* __restrict__ y) {
    conv3x3_wg_f16<128, false, false, 256>(x, wpack, bias, n, h, w, cin, cout, relu, y, pack_n);
}

extern "C" __global__ void __launch_bounds__(256, 1)
    conv3x3_wg_m256n128_pair(const f16raw* __restrict__ x, const f16raw* __restrict__ wpack,
                             const float* __restrict__ bias, int n, int h, int w, int cin,
                             int cout, int relu, int pack_n, f16raw* __restrict__ y) {
    conv3x3_wg_f16<128, false, true, 256>(x, wpack, bias, n, h, w, cin, cout, relu, y, pack_n);
}

extern "C" __global__ void __launch_bounds__(256, 1)
    conv3x3_wg_pool_m256n128(const f16raw* __restrict__ x, const f16raw* __restrict__ wpack,
                             const float* __restrict__ bias, int n, int h, int w, int cin,
                             int cout, int pack_n, f16raw* __restrict__ y) {
    conv3x3_wg_f16<128, true, false, 256>(x, wpack, bias, n, h, w, cin, cout, 1, y, pack_n);
}

extern "C" __global__ void __launch_bounds__(256, 1)
    conv3x3_wg_pool_m256n128_pair(const f16raw* __restrict__ x, const f16raw* __restrict__ wpack,
                                  const float* __restrict__ bias, int n, int h, int w, int cin,
                                  int cout, int pack_n, f16raw* __restrict__ y) {
    conv3x3_wg_f16<128, true, true, 256>(x, wpack, bias, n, h, w, cin, cout, 1, y, pack_n);
}

// E4M3 in; the layer's descale at descale[0] and, when `e4m3_out`, the next FP8 conv's
// multiplier at mult[0] (E4M3 out in y's first bytes); else FP16 out.
extern "C" __global__ void __launch_bounds__(256, 1)
    conv3x3_wg_e4m3_n128(const unsigned char* __restrict__ x,
                         const unsigned char* __restrict__ wpack, const float* __restrict__ bias,
                         const float* __restrict__ descale, const float* __restrict__ mult, int n,
                         int h, int w, int cin, int cout, int relu, int e4m3_out,
                         unsigned char* __restrict__ y) {
    conv3x3_wg_e8<false, false>(x, wpack, bias, descale, mult, n, h, w, cin, cout, relu, e4m3_out,
                                y);
}

extern "C" __global__ void __launch_bounds__(256, 1)
    conv3x3_wg_e4m3_n128_pair(const unsigned char* __restrict__ x,
                              const unsigned char* __restrict__ wpack,
                              const float* __restrict__ bias, const float* __restrict__ descale,
                              const float* __restrict__ mult, int n, int h, int w, int cin,
                              int cout, int relu, int e4m3_out, unsigned char* __restrict__ y) {
    conv3x3_wg_e8<false, true>(x, wpack, bias, descale, mult, n, h, w, cin, cout, relu, e4m3_out,
                               y);
}

// E4M3 in, the conv's 2×2 max-pool out (ReLU always; `--precision fp8`, a block's last conv when
// both run FP8): y [n, h/2, w/2, cout], FP16 or, when `e4m3_out`, E4M3 codes at mult[0].
extern "C" __global__ void __launch_bounds__(256, 1)
    conv3x3_wg_e4m3_pool_n128(const unsigned char* __restrict__ x,
                              const unsigned char* __restrict__ wpack,
                              const float* __restrict__ bias, const float* __restrict__ descale,
                              const float* __restrict__ mult, int n, int h, int w, int cin,
                              int cout, int e4m3_out, unsigned char* __restrict__ y) {
    conv3x3_wg_e8<true, false>(x, wpack, bias, descale, mult, n, h, w, cin, cout, 1, e4m3_out, y);
}

extern "C" __global__ void __launch_bounds__(256, 1)
    conv3x3_wg_e4m3_pool_n128_pair(const unsigned char* __restrict__ x,
                                   const unsigned char* __restrict__ wpack,
                                   const float* __restrict__ bias,
                                   const float* __restrict__ descale,
                                   const float* __restrict__ mult, int n, int h, int w, int cin,
                                   int cout, int e4m3_out, unsigned char* __restrict__ y) {
    conv3x3_wg_e8<true, true>(x, wpack, bias, descale, mult, n, h, w, cin, cout, 1, e4m3_out, y);
}
