// conv3x3_cin8: a VGG's first convolution as one tensor-core kernel. 3×3, stride 1, padding 1,
// input channels stored as 8 (3 real, the rest zero: CPAD), 64 output channels, + f32 bias,
// + ReLU unless `relu` is 0; FP16 NHWC in and out, f32 accumulation, filters KRSC [64][3][3][8].
// conv3x3_cin8_e4m3: the same with an E4M3 output, each value times `*multiplier` (the next FP8
// conv's input scale, read from device memory like the FP8 graphs' scales), saturating at ±448:
// under `--precision fp8` the next conv reads it as is, with no quantize pass between.
//
// Why: cuDNN's kernels for an 8-channel input write the 64-channel output far below HBM speed
// (2.0 ms per mask batch of 256 at 224² on an H200, 22 TFLOP/s; the write alone is 1.6 GB). This
// one is built to be bound by that write. The tuning at prepare times it against cuDNN's and keeps
// the faster (conv.rs), after checking it against the CPU on the device.
//
// As a GEMM: M = output pixels (n·h·w flattened, so a tile of 16 consecutive pixels owns 2 KiB of
// contiguous output, row breaks or not), N = 64 channels (8 n-tiles of 8), K = 9 taps × 8
// channels padded to 80 (k-step s covers taps 2s and 2s + 1; the tenth tap is zero). Each warp
// loads the filter's B fragments into registers once and keeps them for its grid-stride loop over
// tiles; A fragments are 32-bit loads of two channels straight from the input (L1/L2 serve the
// ninefold reuse), zero outside the image; the bias is the accumulators' start. The 16×64 result
// goes through the warp's staging rows in shared memory, so that each store is 16 coalesced bytes.
#include "common.cuh"

// Warps per block (the launcher's block is 32 × this) and u32 words per staged output row: 64
// FP16 + 8 of padding, so the fragment writes (row g, word 4j + t) hit 32 distinct banks.
#define CONV8_WARPS 4
#define CONV8_ROW 36
// Bytes per staged E4M3 output row: 64 + 16 of padding (the 16-bit fragment writes, row g at
// word 20g + 2j + t/2, hit distinct banks).
#define CONV8_ROW8 80

// One output pixel of a lane's A fragments: where its channels 2t, 2t + 1 are in the input, and
// which of its neighbours are inside the image (false for a pixel past the end).
struct Conv8Pixel {
    const f16raw* at;
    bool live, up, down, left, right;
};

__device__ __forceinline__ Conv8Pixel conv8_pixel(const f16raw* __restrict__ x, i64 p, i64 pixels,
                                                  int h, int w, int t) {
    Conv8Pixel q;
    q.live = p < pixels;
    const i64 i = q.live ? p : 0;
    int px, py;
    if (pixels <= 0x7fffffff) {  // 32-bit division where it suffices
        const u32 i32 = (u32)i;
        px = (int)(i32 % (u32)w);
        py = (int)((i32 / (u32)w) % (u32)h);
    } else {
        px = (int)(i % w);
        py = (int)((i / w) % h);
    }
    q.at = x + i * 8 + 2 * t;
    q.up = py > 0;
    q.down = py < h - 1;
    q.left = px > 0;
    q.right = px < w - 1;
    return q;
}

// The A fragment half of one pixel and tap (row tap / 3, column tap % 3 of the 3×3 window): zero
// outside the image, past the end and for the padding tap 9. `row` is one input row, in elements.
__device__ __forceinline__ u32 tap_pair(const Conv8Pixel& q, int tap, i64 row, bool aligned4) {
    const int ty = tap / 3, tx = tap % 3;
    if (tap >= 9 || !q.live || (ty == 0 && !q.up) || (ty == 2 && !q.down) || (tx == 0 && !q.left) ||
        (tx == 2 && !q.right))
        return 0u;
    return load_pair(q.at, (ty - 1) * row + (tx - 1) * 8, aligned4);
}

// The kernel body; E4M3 selects the output: FP16, or E4M3 codes of the value × `*multiplier`.
template <bool E4M3>
__device__ __forceinline__ void conv3x3_cin8_body(const f16raw* __restrict__ x,
                                                  const f16raw* __restrict__ filter,
                                                  const float* __restrict__ bias, int n, int h,
                                                  int w, int relu,
                                                  const float* __restrict__ multiplier,
                                                  void* __restrict__ y) {
    // Staging rows, uint4 for 16-byte alignment: 9 per FP16 row (CONV8_ROW words), 5 per E4M3
    // row (CONV8_ROW8 bytes).
    __shared__ uint4 staged[4 * 16 * 9];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int g = lane >> 2, t = lane & 3;
    u32* rows = reinterpret_cast<u32*>(staged) + warp * 16 * CONV8_ROW;
    const bool x4 = is_aligned(x, 4), f4 = is_aligned(filter, 4), y16 = is_aligned(y, 16);
    const float out_scale = E4M3 ? *multiplier : 1.0f;

    // B fragments: B[k][n] = filter[n][tap][c] with k = 8·(tap − 2s) + c for k-step s; this lane
    // holds rows 2t, 2t + 1 (tap 2s) and 2t + 8, 2t + 9 (tap 2s + 1) of column g of each n-tile.
    u32 b[5][8][2];
#pragma unroll
    for (int s = 0; s < 5; ++s) {
#pragma unroll
        for (int j = 0; j < 8; ++j) {
            const i64 at = (i64)(8 * j + g) * 72 + 2 * t;  // filter row 8j + g, channel 2t
            b[s][j][0] = load_pair(filter, at + 16 * s, f4);
            b[s][j][1] = 2 * s + 1 < 9 ? load_pair(filter, at + 16 * s + 8, f4) : 0u;
        }
    }
    // The bias by pairs of columns (2i, 2i + 1), in shared memory: registers are spoken for.
    __shared__ float2 bias2[32];
    if (threadIdx.x < 32)
        bias2[threadIdx.x] = make_float2(bias[2 * threadIdx.x], bias[2 * threadIdx.x + 1]);
    __syncthreads();

    const i64 pixels = (i64)n * h * w;
    const i64 tiles = (pixels + 15) / 16;
    const i64 in_row = (i64)w * 8;  // one input row, in elements
    for (i64 tile = (i64)blockIdx.x * CONV8_WARPS + warp; tile < tiles;
         tile += (i64)gridDim.x * CONV8_WARPS) {  // warp-uniform loop
        // This lane's two pixels: rows g and g + 8 of the tile.
        const Conv8Pixel q0 = conv8_pixel(x, tile * 16 + g, pixels, h, w, t);
        const Conv8Pixel q1 = conv8_pixel(x, tile * 16 + g + 8, pixels, h, w, t);
        float acc[8][4];
#pragma unroll
        for (int j = 0; j < 8; ++j) {
            const float2 b2 = bias2[4 * j + t];  // columns 8j + 2t, 8j + 2t + 1
            acc[j][0] = b2.x;
            acc[j][1] = b2.y;
            acc[j][2] = b2.x;
            acc[j][3] = b2.y;
        }
#pragma unroll
        for (int s = 0; s < 5; ++s) {
            u32 a[4];
#pragma unroll
            for (int half = 0; half < 2; ++half) {
                a[2 * half] = tap_pair(q0, 2 * s + half, in_row, x4);
                a[2 * half + 1] = tap_pair(q1, 2 * s + half, in_row, x4);
            }
#pragma unroll
            for (int j = 0; j < 8; ++j) mma_16816(acc[j], a, b[s][j]);
        }
        // ReLU, the output format, into the staging rows (the previous tile's were all read).
        __syncwarp();
#pragma unroll
        for (int j = 0; j < 8; ++j) {
#pragma unroll
            for (int r = 0; r < 2; ++r) {
                float v0 = acc[j][2 * r], v1 = acc[j][2 * r + 1];
                if (relu) {
                    v0 = fmaxf(v0, 0.0f);
                    v1 = fmaxf(v1, 0.0f);
                }
                if (E4M3) {
                    const unsigned short codes = (unsigned short)(
                        e4m3_bits(v0 * out_scale) | ((u32)e4m3_bits(v1 * out_scale) << 8));
                    reinterpret_cast<unsigned short*>(
                        rows)[((g + 8 * r) * CONV8_ROW8 + 8 * j + 2 * t) / 2] = codes;
                } else {
                    rows[(g + 8 * r) * CONV8_ROW + 4 * j + t] = pack2(v0, v1);
                }
            }
        }
        __syncwarp();
        // 16 rows of 128 (FP16) or 64 (E4M3) bytes, in chunks of 16 bytes, lane L taking chunks
        // L, L + 32, ...
        const int chunks_per_row = E4M3 ? 4 : 8;
#pragma unroll
        for (int c = lane; c < 16 * chunks_per_row; c += 32) {
            const int row = c / chunks_per_row, q = c % chunks_per_row;
            const i64 pix = tile * 16 + row;
            if (pix >= pixels) continue;
            const unsigned char* src = reinterpret_cast<const unsigned char*>(rows) +
                                       row * (E4M3 ? CONV8_ROW8 : 4 * CONV8_ROW) + 16 * q;
            unsigned char* dst = reinterpret_cast<unsigned char*>(y) + pix * (E4M3 ? 64 : 128) +
                                 16 * q;
            store16(dst, src, y16);
        }
    }
}

extern "C" __global__ void __launch_bounds__(128, 3)
    conv3x3_cin8(const f16raw* __restrict__ x, const f16raw* __restrict__ filter,
                 const float* __restrict__ bias, int n, int h, int w, int relu,
                 f16raw* __restrict__ y) {
    conv3x3_cin8_body<false>(x, filter, bias, n, h, w, relu, nullptr, y);
}

extern "C" __global__ void __launch_bounds__(128, 3)
    conv3x3_cin8_e4m3(const f16raw* __restrict__ x, const f16raw* __restrict__ filter,
                      const float* __restrict__ bias, int n, int h, int w, int relu,
                      const float* __restrict__ multiplier, unsigned char* __restrict__ y) {
    conv3x3_cin8_body<true>(x, filter, bias, n, h, w, relu, multiplier, y);
}
