// conv3x3_c64_pool_w4 / _w8 / _wg / _wg2: a VGG block's last convolution and its max-pool as one
// tensor-core kernel. 3×3, stride 1, padding 1, 64 → 64 channels, + f32 bias, ReLU, then
// MaxPool2d(2, 2) (floor: an odd last row or column of the conv is never computed); FP16 NHWC in
// and out, f32 accumulation, filters KRSC [64][3][3][64]. x [n, h, w, 64], y [n, h/2, w/2, 64].
//
// Why: on an H200, cuDNN ran VGG16's conv1_2 (64 → 64 at 224², batch 256) at 48 % of the FP16
// peak, 2.0 ms, and its 1.6 GB output was then read again by a separate max-pool (0.5 ms). Here the
// pool happens in registers and only the pooled quarter is written. The tuning at prepare times
// it (each build the device runs) against cuDNN's conv plus the pool and keeps the fastest, after
// checking it against the CPU on the device (conv.rs, conv_direct.rs).
//
// Builds: _w4 and _w8 by mma.sync (sm_80+), 4 warps of 4 conv rows or 8 of 2; _wg by Hopper's
// wgmma (sm_90a), one warpgroup whose warps own 4 conv rows each, as _w4's do; _wg2, two such
// warpgroups per block on tiles of their own, sharing the filter. On Hopper mma.sync is the
// slower path to the tensor cores, and every warp of _w4 reads the whole filter from shared
// memory each k-step; wgmma reads it once per warpgroup instruction through a descriptor (the
// filter is then stored as K-major 8×8 core matrices, cp_filter_load), and _wg loads each A
// fragment once for the three taps of a column (cp_tile_wgmma). _wg leaves the tensor cores idle
// while it pools, stores and waits for its next halo; in _wg2 the other group's MMAs fill that.
//
// Blocks are persistent (one per SM: the launcher's grid) and loop over tiles of 16×16 conv
// outputs (8×8 pooled), all 64 output channels. Shared memory (dynamic, CONV_POOL_SMEM bytes):
//   - the whole filter, stored once per block (36 × 2048 bytes): for mma.sync as B fragments in
//     mma order, 36 k-steps × 4 pairs of n-tiles × 32 lanes × 16 bytes, so a lane reads the
//     fragments of two n-tiles with one 16-byte load and a warp's load is 512 contiguous bytes;
//     for wgmma as the descriptor's K-major blocks (cp_filter_load);
//   - two 18×18-pixel input halos (the tile and its 1-pixel border, zeros outside the image),
//     filled by cp.async: the next tile's lands while this one is computed;
//   - per warp, staging rows for its pooled output (16-byte coalesced stores), and the bias.
// As a GEMM per tile: M = 256 conv pixels (warp w owns conv rows (16/WARPS)·w.., one m-tile of
// 16 pixels per row), N = 64 (8 n-tiles), K = 9 taps × 64 channels = 36 k-steps of 16 (k-step
// 4·tap + kc: channels 16·kc ..). A fragments come straight from the halo by ldmatrix (the
// registers it fills are the fragment, so no moves feed the mma): its four 8×8 matrices are
// pixels 0–7 and 8–15 of the m-tile's row, channel chunks 2kc and 2kc + 1. The halo's 16-byte
// chunks are swizzled (chunk c of pixel q at c ^ (q & 7)): the 8 rows of one matrix are 8
// neighbouring pixels at one chunk, which then fall in 8 distinct bank groups.
// After the last tap: max over the two rows of each pooled row (two m-tiles of the same lane),
// then over the two columns (lanes g and g ^ 1: a shuffle), + bias, ReLU (max commutes with the
// monotone bias add, ReLU and FP16 rounding, so this equals conv → round → pool exactly).
#include "common.cuh"

#define CP_HALO 18
#define CP_HALO_BYTES (CP_HALO * CP_HALO * 128)
#define CP_W_BYTES (36 * 4 * 32 * 16)
// u32 words per staged pooled pixel: 64 FP16 + 8 of padding (the fragment writes, rows g/2 at
// word 4j + t, hit 16 distinct banks).
#define CP_STAGE_ROW 36
// 8 pooled rows × 8 pixels of the tile, split between the warps.
#define CP_STAGE_BYTES (64 * CP_STAGE_ROW * 4)
#define CP_SMEM (CP_W_BYTES + 2 * CP_HALO_BYTES + CP_STAGE_BYTES + 64 * 4)

// Where a tile is: image, tile row, tile column.
struct CpTile {
    i64 img;
    int ty, tx;
};

// The tiles of an input [n, h, w, 64]: 8×8 pooled pixels each, of a pooled output ph × pw.
struct CpGrid {
    int ph, pw, tiles_y, tiles_x;
    i64 tiles;
    __device__ __forceinline__ CpGrid(int n, int h, int w)
        : ph(h >> 1), pw(w >> 1), tiles_y(((h >> 1) + 7) >> 3), tiles_x(((w >> 1) + 7) >> 3),
          tiles((i64)n * tiles_y * tiles_x) {}
    // Where tile `tile` is.
    __device__ __forceinline__ CpTile at(i64 tile) const {
        const i64 per_img = (i64)tiles_y * tiles_x;
        CpTile t;
        t.img = tile / per_img;
        const int rem = (int)(tile - t.img * per_img);
        t.ty = rem / tiles_x;
        t.tx = rem - t.ty * tiles_x;
        return t;
    }
};

// Queue the copies of `tile`'s 18×18 input pixels (rows 16·ty − 1 .., columns 16·tx − 1 ..) into
// `halo`, 8 chunks of 16 bytes per pixel, swizzled; zeros outside the image. Thread `tid` of the
// `threads` that share the work; of its rounds, part `part` of `parts`.
__device__ __forceinline__ void cp_halo_load(unsigned char* halo, const f16raw* __restrict__ x,
                                             CpTile t, int h, int w, int tid, int threads,
                                             int part = 0, int parts = 1) {
    constexpr int CHUNKS = CP_HALO * CP_HALO * 8;
    const int rounds = (CHUNKS + threads - 1) / threads, per = (rounds + parts - 1) / parts;
    const int y0 = 16 * t.ty - 1, x0 = 16 * t.tx - 1;
    const int last = tid + (part + 1) * per * threads, end = last < CHUNKS ? last : CHUNKS;
    for (int c = tid + part * per * threads; c < end; c += threads) {
        const int q = c >> 3, chunk = c & 7;
        const int r = q / CP_HALO, col = q - r * CP_HALO;
        const int gy = y0 + r, gx = x0 + col;
        const bool inside = gy >= 0 && gy < h && gx >= 0 && gx < w;
        const f16raw* src = inside ? x + (((t.img * h + gy) * w + gx) << 6) + (chunk << 3) : x;
        cp_async16(halo + (q << 7) + ((chunk ^ (q & 7)) << 4), src, inside);
    }
}

// The next tile's halo copies, queued part by part between this tile's MMA steps, so that issuing
// them (address arithmetic for 2592 chunks of 16 bytes) overlaps tensor work instead of coming
// before it. `live` false: no next tile.
struct CpNextHalo {
    unsigned char* halo;
    const f16raw* x;
    CpTile t;
    int h, w;
    bool live;
    __device__ __forceinline__ void part(int p, int parts) const {
        if (live) cp_halo_load(halo, x, t, h, w, threadIdx.x, blockDim.x, p, parts);
    }
};

// No copies to interleave (a group whose next halo must wait until this tile's MMAs are done).
struct CpNoCopies {
    __device__ __forceinline__ void part(int, int) const {}
};

// After a tile's last k-step: pool, + bias, ReLU, FP16, through the calling warp's staging rows
// (16-byte coalesced stores) into `y`. `acc` holds the warp's 2·PROWS conv rows (m-tiles) of
// 16 pixels × 64 channels in mma_16816's C layout per n-tile: acc[i][4j ..] is n-tile j of row i.
// The two rows of a pooled row are two m-tiles of the same lane, the two columns lanes g and
// g ^ 1 (a shuffle). `staged` is the warp's own; the warp's previous stores have read it.
// `warp`: the calling warp's place among the tile's warps (its pooled rows PROWS·warp ..).
template <int PROWS>
__device__ __forceinline__ void cp_pool_store(const float (&acc)[2 * PROWS][32],
                                              const float* bias_s, u32* staged,
                                              f16raw* __restrict__ y, const CpGrid& grid,
                                              CpTile tc, bool y16, int warp) {
    const int ph = grid.ph, pw = grid.pw;
    const int lane = threadIdx.x & 31;
    const int g = lane >> 2, t = lane & 3;
    __syncwarp();
#pragma unroll
    for (int ip = 0; ip < PROWS; ++ip)
#pragma unroll
        for (int j = 0; j < 8; ++j) {
            float v[4];
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const float m = fmaxf(acc[2 * ip][4 * j + e], acc[2 * ip + 1][4 * j + e]);
                v[e] = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, 4));
            }
            if ((g & 1) == 0) {
                const float b0 = bias_s[8 * j + 2 * t], b1 = bias_s[8 * j + 2 * t + 1];
                // Pixel g's pooled column is g / 2, pixel g + 8's is g / 2 + 4.
                u32* row = staged + (ip * 8 + (g >> 1)) * CP_STAGE_ROW + 4 * j + t;
                row[0] = pack2(fmaxf(v[0] + b0, 0.0f), fmaxf(v[1] + b1, 0.0f));
                row[4 * CP_STAGE_ROW] = pack2(fmaxf(v[2] + b0, 0.0f), fmaxf(v[3] + b1, 0.0f));
            }
        }
    __syncwarp();
    // PROWS·8 pooled pixels of 128 bytes, 8 chunks of 16 each.
#pragma unroll
    for (int c = lane; c < PROWS * 64; c += 32) {
        const int px = c >> 3, chunk = c & 7;
        const int prow = 8 * tc.ty + PROWS * warp + (px >> 3), pcol = 8 * tc.tx + (px & 7);
        if (prow >= ph || pcol >= pw) continue;
        const unsigned char* src =
            reinterpret_cast<const unsigned char*>(staged) + px * CP_STAGE_ROW * 4 + 16 * chunk;
        unsigned char* dst = reinterpret_cast<unsigned char*>(
                                 y + (((tc.img * ph + prow) * pw + pcol) << 6)) +
                             16 * chunk;
        store16(dst, src, y16);
    }
}

// The filter in shared memory for mma_16816 (`WG` false): entry e = (s·4 + jp)·32 + L holds lane
// L's B fragments of k-step s for n-tiles 2jp and 2jp + 1: filter row 8·(2jp) + g (and
// 8·(2jp + 1) + g), tap s / 4, channels c0, c0 + 1 (b[0]) and c0 + 8, c0 + 9 (b[1]) with
// c0 = 16·(s % 4) + 2t.
// For wgmma (`WG` true): k-step s is a 16 (k) × 64 (n) K-major block of 2048 bytes at 2048·s,
// row group ng (filter rows 8·ng ..) at 256·ng, its k half kh at + 128·kh, row r at + 16·r:
// 16-byte row e of the whole is (s, ng, kh, r) = (e / 128, e / 16 % 8, e / 8 % 2, e % 8), filter
// row 8·ng + r, tap s / 4, channels 16·(s % 4) + 8·kh ... + 7. Both are 36 × 2048 bytes.
template <bool WG>
__device__ __forceinline__ void cp_filter_load(unsigned char* smem,
                                               const f16raw* __restrict__ filter) {
    const bool f4 = is_aligned(filter, 4);
    uint4* dst = reinterpret_cast<uint4*>(smem);
#pragma unroll 4
    for (int e = threadIdx.x; e < 36 * 4 * 32; e += blockDim.x) {
        if (WG) {
            const int r = e & 7, kh = (e >> 3) & 1, ng = (e >> 4) & 7, s = e >> 7;
            const f16raw* p = filter + ((i64)(8 * ng + r) * 9 + (s >> 2)) * 64 + 16 * (s & 3) +
                              8 * kh;
            dst[e] = make_uint4(load_pair(p, 0, f4), load_pair(p, 2, f4), load_pair(p, 4, f4),
                                load_pair(p, 6, f4));
        } else {
            const int el = e & 31, jp = (e >> 5) & 3, s = e >> 7;
            const int tap = s >> 2, c0 = 16 * (s & 3) + 2 * (el & 3);
            const f16raw* lo = filter + ((i64)(16 * jp + (el >> 2)) * 9 + tap) * 64 + c0;
            const f16raw* hi = lo + 8 * 9 * 64;  // filter row + 8
            dst[e] = make_uint4(load_pair(lo, 0, f4), load_pair(lo, 8, f4), load_pair(hi, 0, f4),
                                load_pair(hi, 8, f4));
        }
    }
    // wgmma reads the filter through the async proxy: order these stores before it (with the
    // barrier at the top of the tile loop).
    if (WG) fence_proxy_async();
}

// The halo address lane `lane` gives ldmatrix_x4 for the m-tile of halo row `hrow` (pixels
// 0–15 shifted by `dx`) and k-step chunk pair `kc`: pixel (L % 8) + 8·(L / 8 % 2), channel chunk
// 2·kc + L / 16 (swizzled).
__device__ __forceinline__ const unsigned char* cp_a_row(const unsigned char* hb, int hrow, int dx,
                                                        int kc, int lane) {
    const int q = hrow * CP_HALO + (lane & 7) + 8 * ((lane >> 3) & 1) + dx;
    const int chunk = 2 * kc + (lane >> 4);
    return hb + (q << 7) + ((chunk ^ (q & 7)) << 4);
}

// Zeros in a tile's accumulators.
template <int ROWS>
__device__ __forceinline__ void cp_zero(float (&acc)[ROWS][32]) {
#pragma unroll
    for (int i = 0; i < ROWS; ++i)
#pragma unroll
        for (int e = 0; e < 32; ++e) acc[i][e] = 0.0f;
}

// One tile's conv by mma_16816: warp `warp` computes its ROWS conv rows into `acc`; after each
// tap, part of `next`'s copies.
template <int ROWS, class Copies>
__device__ __forceinline__ void cp_tile_mma(float (&acc)[ROWS][32], const unsigned char* hb,
                                            const uint4* wfrag, int warp, int lane,
                                            const Copies& next) {
    cp_zero(acc);
#pragma unroll 1
    for (int tap = 0; tap < 9; ++tap) {
        const int dy = tap / 3, dx = tap - 3 * dy;
#pragma unroll
        for (int kc = 0; kc < 4; ++kc) {
            const int s = tap * 4 + kc;
            uint4 bw[4];
#pragma unroll
            for (int jp = 0; jp < 4; ++jp) bw[jp] = wfrag[(s * 4 + jp) * 32 + lane];
            u32 a[ROWS][4];
#pragma unroll
            for (int i = 0; i < ROWS; ++i)
                ldmatrix_x4(a[i], cp_a_row(hb, ROWS * warp + i + dy, dx, kc, lane));
#pragma unroll
            for (int i = 0; i < ROWS; ++i)
#pragma unroll
                for (int j = 0; j < 8; ++j) {
                    u32 b[2];
                    b[0] = (j & 1) ? bw[j >> 1].z : bw[j >> 1].x;
                    b[1] = (j & 1) ? bw[j >> 1].w : bw[j >> 1].y;
                    mma_16816(&acc[i][4 * j], a[i], b);
                }
        }
        next.part(tap, 9);
    }
}

// One tile's conv by wgmma (one warpgroup, warp w owning conv rows 4w .. 4w + 3): wgmma j
// computes conv row 4w + j of every warp w, 16 pixels × 64 channels per warp. Steps go by
// (dx, kc): warp w loads halo rows 4w .. 4w + 5 once (6 ldmatrix) for the three dy, as conv row
// 4w + j at tap row dy reads halo row 4w + j + dy: half the A loads of one load per (row, tap).
// The A registers are double-buffered: the loads of step i + 1 overlap step i's 12 wgmma (one
// group), and step i + 2 reuses step i's registers after waiting for its group. After every
// third step's group, a quarter of `next`'s copies (twelve parts spilled registers).
template <class Copies>
__device__ __forceinline__ void cp_tile_wgmma(float (&acc)[4][32], const unsigned char* hb,
                                              u64 desc0, int warp, int lane, const Copies& next) {
    u32 a[2][6][4];
    cp_zero(acc);
#pragma unroll
    for (int j = 0; j < 4; ++j) wgmma_fence_operands(acc[j]);
    wgmma_fence();  // the zeroed accumulators
#pragma unroll
    for (int step = 0; step < 12; ++step) {
        const int dx = step >> 2, kc = step & 3, buf = step & 1;
        if (step >= 2) wgmma_wait<1>();  // step − 2's group, which read a[buf], is done
#pragma unroll
        for (int r = 0; r < 6; ++r) ldmatrix_x4(a[buf][r], cp_a_row(hb, 4 * warp + r, dx, kc, lane));
        wgmma_fence();
#pragma unroll
        for (int dy = 0; dy < 3; ++dy) {
            // k-step s = 4·tap + kc: its 2048-byte block, in the descriptor's 16-byte units.
            const u64 desc = desc0 + (u64)((4 * (3 * dy + dx) + kc) * (2048 >> 4));
#pragma unroll
            for (int j = 0; j < 4; ++j) wgmma_64x64x16(acc[j], a[buf][j + dy], desc);
        }
        wgmma_commit();
        if (step % 3 == 2) next.part(step / 3, 4);
    }
    wgmma_wait<0>();
#pragma unroll
    for (int j = 0; j < 4; ++j) wgmma_fence_operands(acc[j]);
}

// The kernel body: WARPS warps of 16 / WARPS conv rows each, by mma_16816, or (`WG`) one
// warpgroup by wgmma.
template <int WARPS, bool WG>
__device__ __forceinline__ void conv3x3_c64_pool_body(const f16raw* __restrict__ x,
                                                      const f16raw* __restrict__ filter,
                                                      const float* __restrict__ bias, int n,
                                                      int h, int w, f16raw* __restrict__ y) {
    constexpr int ROWS = 16 / WARPS;  // conv rows (m-tiles) per warp
    constexpr int PROWS = ROWS / 2;   // pooled rows per warp
    static_assert(!WG || WARPS == 4, "the wgmma body is one warpgroup");
    extern __shared__ uint4 cp_smem[];
    unsigned char* smem = reinterpret_cast<unsigned char*>(cp_smem);
    unsigned char* halos = smem + CP_W_BYTES;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    u32* staged = reinterpret_cast<u32*>(halos + 2 * CP_HALO_BYTES) +
                  warp * PROWS * 8 * CP_STAGE_ROW;
    float* bias_s = reinterpret_cast<float*>(halos + 2 * CP_HALO_BYTES + CP_STAGE_BYTES);

    const CpGrid grid(n, h, w);
    const i64 tiles = grid.tiles;

    // The first tile's halo is on its way while the filter is rearranged.
    i64 tile = blockIdx.x;
    if (tile < tiles)
        cp_halo_load(halos, x, grid.at(tile), h, w, threadIdx.x, blockDim.x);
    cp_async_commit();
    cp_filter_load<WG>(smem, filter);
    if (threadIdx.x < 64) bias_s[threadIdx.x] = bias[threadIdx.x];
    // K-major filter blocks: k halves 128 bytes apart, row groups 256.
    const u64 desc0 = WG ? wgmma_desc_kmajor(smem, 128, 256) : 0;

    const bool y16 = is_aligned(y, 16);
    int cur = 0;
    for (; tile < tiles; tile += gridDim.x) {  // block-uniform loop
        const CpTile tc = grid.at(tile);
        cp_async_wait_0();  // this thread's copies of the tile (queued during the last one)
        __syncthreads();    // everyone's, and the filter and bias
        const unsigned char* hb = halos + cur * CP_HALO_BYTES;
        // The next tile's halo goes to the other buffer, read last by the previous tile.
        const i64 next = tile + gridDim.x;
        const CpNextHalo copies{halos + (cur ^ 1) * CP_HALO_BYTES, x,
                                grid.at(next < tiles ? next : tile), h, w,
                                next < tiles};

        float acc[ROWS][32];  // conv row i of the warp, n-tile j at acc[i][4j ..]
        if constexpr (WG) {
            cp_tile_wgmma(acc, hb, desc0, warp, lane, copies);
        } else {
            cp_tile_mma<ROWS>(acc, hb, reinterpret_cast<const uint4*>(smem), warp, lane, copies);
        }
        cp_async_commit();  // the next tile's copies, one group

        cp_pool_store<PROWS>(acc, bias_s, staged, y, grid, tc, y16, warp);
        __syncthreads();  // the halo just read is refilled by the next iteration's copies
        cur ^= 1;
    }
}

extern "C" __global__ void __launch_bounds__(128, 1)
    conv3x3_c64_pool_w4(const f16raw* __restrict__ x, const f16raw* __restrict__ filter,
                        const float* __restrict__ bias, int n, int h, int w,
                        f16raw* __restrict__ y) {
    conv3x3_c64_pool_body<4, false>(x, filter, bias, n, h, w, y);
}

extern "C" __global__ void __launch_bounds__(256, 1)
    conv3x3_c64_pool_w8(const f16raw* __restrict__ x, const f16raw* __restrict__ filter,
                        const float* __restrict__ bias, int n, int h, int w,
                        f16raw* __restrict__ y) {
    conv3x3_c64_pool_body<8, false>(x, filter, bias, n, h, w, y);
}

// Two warpgroups per block, each on its own tiles (tile 2·block + group, then every 2·grid-th)
// with its own halo and staging rows, sharing the filter: while one drains its last wgmma, pools
// and stores, and waits for its next halo, the other keeps the tensor cores busy. One halo per
// group (shared memory: CONV_POOL_SMEM_WG2), refilled as soon as the group's wgmma have read it
// and landing during its pool and stores. Only the filter load is block-wide; afterwards each
// group syncs its own 128 threads (named barrier 1 + group).
#define CP_SMEM_WG2 (CP_W_BYTES + 2 * CP_HALO_BYTES + 2 * CP_STAGE_BYTES + 64 * 4)

// The calling thread's place in a block of two warpgroups on tiles of their own, and its
// group's part of the shared memory: the filter, one halo per group, one set of staging rows per
// group (2 pooled rows × 8 pixels per warp), the bias.
struct CpGroup {
    int group, gtid, lane, warp;  // warp within the group
    unsigned char* halo;
    u32* staged;
    float* bias_s;
};

__device__ __forceinline__ CpGroup cp_group(unsigned char* smem) {
    CpGroup g;
    // The group read through a shuffle, so that the compiler knows it (and the tile loop) to be
    // uniform in the warp: wgmma in a loop it thinks divergent are serialized (ptxas C7519).
    g.group = __shfl_sync(0xffffffffu, (int)(threadIdx.x >> 7), 0);
    g.gtid = threadIdx.x & 127;
    g.lane = threadIdx.x & 31;
    g.warp = g.gtid >> 5;
    g.halo = smem + CP_W_BYTES + g.group * CP_HALO_BYTES;
    unsigned char* stage_base = smem + CP_W_BYTES + 2 * CP_HALO_BYTES;
    g.staged = reinterpret_cast<u32*>(stage_base + g.group * CP_STAGE_BYTES) +
               g.warp * 2 * 8 * CP_STAGE_ROW;
    g.bias_s = reinterpret_cast<float*>(stage_base + 2 * CP_STAGE_BYTES);
    return g;
}
__device__ __forceinline__ void conv3x3_c64_pool_wg2_body(const f16raw* __restrict__ x,
                                                          const f16raw* __restrict__ filter,
                                                          const float* __restrict__ bias, int n,
                                                          int h, int w, f16raw* __restrict__ y) {
    extern __shared__ uint4 cp_smem[];
    unsigned char* smem = reinterpret_cast<unsigned char*>(cp_smem);
    const CpGroup gr = cp_group(smem);
    const int group = gr.group, gtid = gr.gtid, lane = gr.lane, warp = gr.warp;
    unsigned char* halo = gr.halo;
    u32* staged = gr.staged;
    float* bias_s = gr.bias_s;

    const CpGrid grid(n, h, w);
    const i64 tiles = grid.tiles;
    const i64 stride = 2 * (i64)gridDim.x;

    i64 tile = 2 * (i64)blockIdx.x + group;
    if (tile < tiles) cp_halo_load(halo, x, grid.at(tile), h, w, gtid, 128);
    cp_async_commit();
    cp_filter_load<true>(smem, filter);
    if (threadIdx.x < 64) bias_s[threadIdx.x] = bias[threadIdx.x];
    const u64 desc0 = wgmma_desc_kmajor(smem, 128, 256);
    __syncthreads();  // the filter and bias (the last block-wide barrier: tile counts differ)

    const bool y16 = is_aligned(y, 16);
    for (; tile < tiles; tile += stride) {  // uniform within the group
        const CpTile tc = grid.at(tile);
        cp_async_wait_0();          // this thread's copies of the tile have landed
        warpgroup_sync(1 + group);  // the group's
        float acc[4][32];
        cp_tile_wgmma(acc, halo, desc0, warp, lane, CpNoCopies{});  // all done at its return
        warpgroup_sync(1 + group);  // the group's ldmatrix reads of the halo too
        const i64 next = tile + stride;
        if (next < tiles) cp_halo_load(halo, x, grid.at(next), h, w, gtid, 128);
        cp_async_commit();
        cp_pool_store<2>(acc, bias_s, staged, y, grid, tc, y16, warp);
    }
}

// sm_90a only (wgmma): elsewhere they trap, and the launcher refuses them first.
extern "C" __global__ void __launch_bounds__(128, 1)
    conv3x3_c64_pool_wg(const f16raw* __restrict__ x, const f16raw* __restrict__ filter,
                        const float* __restrict__ bias, int n, int h, int w,
                        f16raw* __restrict__ y) {
    conv3x3_c64_pool_body<4, true>(x, filter, bias, n, h, w, y);
}

extern "C" __global__ void __launch_bounds__(256, 1)
    conv3x3_c64_pool_wg2(const f16raw* __restrict__ x, const f16raw* __restrict__ filter,
                         const float* __restrict__ bias, int n, int h, int w,
                         f16raw* __restrict__ y) {
    conv3x3_c64_pool_wg2_body(x, filter, bias, n, h, w, y);
}

// conv3x3_block1_pool_wg2: a VGG's whole first block, conv1_1 → ReLU → conv1_2 → ReLU →
// MaxPool2d(2, 2), as one kernel. x [n, h, w, 8] FP16 (3 real channels stored as 8, channel 3
// zero: the masked input), filter1 KRSC [64][3][3][8] (its channels 4–7 are not read: the
// launcher's caller runs it only for a first conv of at most 4 real channels), bias1 [64] f32,
// filter2 KRSC [64][3][3][64], bias2 [64] f32; y [n, h/2, w/2, 64] FP16.
//
// Why: apart, conv1_1 writes 1.64 GB per batch of 256 at 224² (its floor is that write, about
// 0.4 ms at HBM speed) and conv1_2 reads it back. Here each tile's conv1_1 output exists only in
// shared memory: the 18×18 halo that conv3x3_c64_pool_wg2 copies from memory is computed instead,
// from a 20×20-pixel tile of the 8-channel input (6.4 KB), so the block reads 0.21 GB and writes
// the pooled 0.41 GB. The price: conv1_1 is computed on 324 pixels per 256 (the halo overlaps the
// neighbours'), by mma.sync with K = 9 taps × 4 channels = 36 padded to 48 (3 k-steps), about 12 %
// of conv1_2's tensor work per tile.
//
// Two warpgroups per block on tiles of their own, as in _wg2: one group's conv1_1 (mma.sync) and
// epilogue overlap the other's conv1_2 (wgmma). Per group and tile: wait for its input tile (its
// copies were queued during the previous tile's conv1_2), conv1_1 into the halo (zeros where the
// halo is outside the image: conv1_2's padding), queue the next tile's input copies, conv1_2 by
// cp_tile_wgmma, pool and store by cp_pool_store.
//
// conv1_1 as a GEMM per tile: M = 324 halo pixels (21 m-tiles of 16, the last partial; warp w of
// the group takes m-tiles w, w + 4, ..), N = 64 (8 n-tiles), K = 48: k index 16·s + kk is tap
// 4·s + kk / 4, channel kk % 4 (taps past 8 are zero). A lane's A fragment register holds two
// channels of one input pixel: one 32-bit shared load. The B fragments sit in shared memory in
// mma order (CB_W1_BYTES), read into registers once per tile.
#define CB_IN 20
#define CB_IN_BYTES (CB_IN * CB_IN * 16)
#define CB_W1_BYTES (3 * 4 * 32 * 16)
#define CB_HALO_PIXELS (CP_HALO * CP_HALO)
#define CB_SMEM (CP_W_BYTES + 2 * CP_HALO_BYTES + 2 * CP_STAGE_BYTES + 2 * 64 * 4 + CB_W1_BYTES + \
                 2 * CB_IN_BYTES)

// Queue the copies of tile `t`'s 20×20 input pixels (rows 16·ty − 2 .., columns 16·tx − 2 ..),
// 16 bytes each, zeros outside the image, by thread `tid` of `threads`.
__device__ __forceinline__ void cb_input_load(unsigned char* in, const f16raw* __restrict__ x,
                                              CpTile t, int h, int w, int tid, int threads) {
    const int y0 = 16 * t.ty - 2, x0 = 16 * t.tx - 2;
    for (int q = tid; q < CB_IN * CB_IN; q += threads) {
        const int r = q / CB_IN, col = q - r * CB_IN;
        const int gy = y0 + r, gx = x0 + col;
        const bool inside = gy >= 0 && gy < h && gx >= 0 && gx < w;
        const f16raw* src = inside ? x + (((t.img * h + gy) * w + gx) << 3) : x;
        cp_async16(in + (q << 4), src, inside);
    }
}

// conv1_1's B fragments for mma_16816: entry (s·4 + jp)·32 + L holds lane L's fragments of
// k-step s for n-tiles 2jp and 2jp + 1 (filter rows 16·jp + g and 16·jp + 8 + g): b[0] is k
// 2t, 2t + 1 (tap 4s + t / 2, channels 2(t % 2), + 1), b[1] the same 2 taps on. Zero past tap 8.
__device__ __forceinline__ void cb_filter1_load(uint4* dst, const f16raw* __restrict__ filter1) {
    const bool f4 = is_aligned(filter1, 4);
    for (int e = threadIdx.x; e < 3 * 4 * 32; e += blockDim.x) {
        const int lane = e & 31, jp = (e >> 5) & 3, s = e >> 7;
        const int g = lane >> 2, t = lane & 3;
        const int tap_lo = 4 * s + (t >> 1), tap_hi = tap_lo + 2, c0 = 2 * (t & 1);
        u32 v[4];
#pragma unroll
        for (int half = 0; half < 2; ++half) {
            const int row = 16 * jp + 8 * half + g;
            const f16raw* base = filter1 + (i64)row * 9 * 8 + c0;
            v[2 * half] = tap_lo < 9 ? load_pair(base, 8 * tap_lo, f4) : 0u;
            v[2 * half + 1] = tap_hi < 9 ? load_pair(base, 8 * tap_hi, f4) : 0u;
        }
        dst[e] = make_uint4(v[0], v[1], v[2], v[3]);
    }
}

__device__ __forceinline__ int opaque_i32(int v) {
#ifndef SCORECAM_HOST_EMULATION
    asm volatile("mov.b32 %0, %0;" : "+r"(v));
#endif
    return v;
}

// conv1_1 of tile `t` into `halo` (the layout cp_a_row reads): + bias1, ReLU, FP16; zeros at halo
// pixels outside the image. `in` holds the tile's 20×20 input pixels; warp `warp` of the group.
__device__ __forceinline__ void cb_conv1(unsigned char* halo, const unsigned char* in,
                                         const uint4* w1, const float* bias1_s, CpTile t, int h,
                                         int w, int warp, int lane_in) {
    // The lane through an opaque move, so that what this phase derives from it (addresses,
    // taps) is recomputed per tile instead of held in registers through conv1_2's wgmma
    // (ptxas spilled there otherwise).
    const int lane = opaque_i32(lane_in);
    const int g = lane >> 2, tq = lane & 3;
    uint4 bw[3][4];
#pragma unroll
    for (int s = 0; s < 3; ++s)
#pragma unroll
        for (int jp = 0; jp < 4; ++jp) bw[s][jp] = w1[(s * 4 + jp) * 32 + lane];
    // This lane's taps per k-step (low and high half of k), as input-pixel offsets; -1 past tap 8.
    int off[3][2];
#pragma unroll
    for (int s = 0; s < 3; ++s)
#pragma unroll
        for (int hi = 0; hi < 2; ++hi) {
            const int tap = 4 * s + 2 * hi + (tq >> 1);
            off[s][hi] = tap < 9 ? (tap / 3) * CB_IN + tap % 3 : -1;
        }
    const u32* in32 = reinterpret_cast<const u32*>(in) + (tq & 1);  // channels 2(t % 2), + 1
    const int y0 = 16 * t.ty - 1, x0 = 16 * t.tx - 1;
#pragma unroll 1
    for (int mt = warp; mt * 16 < CB_HALO_PIXELS; mt += 4) {
        int p[2], base[2];
        bool inside[2];
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            p[r] = 16 * mt + g + 8 * r;
            const int q = p[r] < CB_HALO_PIXELS ? p[r] : 0;
            const int hr = q / CP_HALO, hc = q - hr * CP_HALO;
            base[r] = hr * CB_IN + hc;
            const int gy = y0 + hr, gx = x0 + hc;
            inside[r] = gy >= 0 && gy < h && gx >= 0 && gx < w;
        }
        float acc[32];
#pragma unroll
        for (int j = 0; j < 8; ++j) {
            acc[4 * j] = acc[4 * j + 2] = bias1_s[8 * j + 2 * tq];
            acc[4 * j + 1] = acc[4 * j + 3] = bias1_s[8 * j + 2 * tq + 1];
        }
#pragma unroll
        for (int s = 0; s < 3; ++s) {
            u32 a[4];
#pragma unroll
            for (int hi = 0; hi < 2; ++hi)
#pragma unroll
                for (int r = 0; r < 2; ++r)
                    a[2 * hi + r] = off[s][hi] >= 0 ? in32[4 * (base[r] + off[s][hi])] : 0u;
#pragma unroll
            for (int j = 0; j < 8; ++j) {
                u32 b[2];
                b[0] = (j & 1) ? bw[s][j >> 1].z : bw[s][j >> 1].x;
                b[1] = (j & 1) ? bw[s][j >> 1].w : bw[s][j >> 1].y;
                mma_16816(&acc[4 * j], a, b);
            }
        }
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            if (p[r] >= CB_HALO_PIXELS) continue;
            unsigned char* px = halo + (p[r] << 7) + 4 * tq;
#pragma unroll
            for (int j = 0; j < 8; ++j) {
                const u32 v = inside[r] ? pack2(fmaxf(acc[4 * j + 2 * r], 0.0f),
                                                fmaxf(acc[4 * j + 2 * r + 1], 0.0f))
                                        : 0u;
                *reinterpret_cast<u32*>(px + ((j ^ (p[r] & 7)) << 4)) = v;
            }
        }
    }
}

__device__ __forceinline__ void conv3x3_block1_pool_wg2_body(
    const f16raw* __restrict__ x, const f16raw* __restrict__ filter1,
    const float* __restrict__ bias1, const f16raw* __restrict__ filter2,
    const float* __restrict__ bias2, int n, int h, int w, f16raw* __restrict__ y) {
    extern __shared__ uint4 cp_smem[];
    unsigned char* smem = reinterpret_cast<unsigned char*>(cp_smem);
    const CpGroup gr = cp_group(smem);  // _wg2's layout, then the first conv's own
    const int group = gr.group, gtid = gr.gtid, lane = gr.lane, warp = gr.warp;
    unsigned char* halo = gr.halo;
    u32* staged = gr.staged;
    float* bias2_s = gr.bias_s;
    float* bias1_s = bias2_s + 64;
    uint4* w1 = reinterpret_cast<uint4*>(bias1_s + 64);
    unsigned char* in = reinterpret_cast<unsigned char*>(w1) + CB_W1_BYTES + group * CB_IN_BYTES;

    const CpGrid grid(n, h, w);
    const i64 tiles = grid.tiles;
    const i64 stride = 2 * (i64)gridDim.x;

    i64 tile = 2 * (i64)blockIdx.x + group;
    if (tile < tiles) cb_input_load(in, x, grid.at(tile), h, w, gtid, 128);
    cp_async_commit();
    cp_filter_load<true>(smem, filter2);
    cb_filter1_load(w1, filter1);
    if (threadIdx.x < 64) {
        bias2_s[threadIdx.x] = bias2[threadIdx.x];
        bias1_s[threadIdx.x] = bias1[threadIdx.x];
    }
    const u64 desc0 = wgmma_desc_kmajor(smem, 128, 256);
    __syncthreads();  // the filters and biases (the last block-wide barrier)

    const bool y16 = is_aligned(y, 16);
    for (; tile < tiles; tile += stride) {  // uniform within the group
        const CpTile tc = grid.at(tile);
        cp_async_wait_0();          // this thread's copies of the input tile have landed
        warpgroup_sync(1 + group);  // the group's; and its last conv1_2 read the halo
        cb_conv1(halo, in, w1, bias1_s, tc, h, w, warp, lane);
        warpgroup_sync(1 + group);  // the halo is whole; the input tile is read
        const i64 next = tile + stride;
        if (next < tiles) cb_input_load(in, x, grid.at(next), h, w, gtid, 128);
        cp_async_commit();
        float acc[4][32];
        cp_tile_wgmma(acc, halo, desc0, warp, lane, CpNoCopies{});
        cp_pool_store<2>(acc, bias2_s, staged, y, grid, tc, y16, warp);
    }
}

// sm_90a only (wgmma), as the other wgmma builds.
extern "C" __global__ void __launch_bounds__(256, 1)
    conv3x3_block1_pool_wg2(const f16raw* __restrict__ x, const f16raw* __restrict__ filter1,
                            const float* __restrict__ bias1, const f16raw* __restrict__ filter2,
                            const float* __restrict__ bias2, int n, int h, int w,
                            f16raw* __restrict__ y) {
    conv3x3_block1_pool_wg2_body(x, filter1, bias1, filter2, bias2, n, h, w, y);
}
