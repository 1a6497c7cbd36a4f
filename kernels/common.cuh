// Shared helpers for every kernel in kernels/*.cu: FP16 storage helpers, block reductions and the
// bilinear sampling used by both masks.cu and combine.cu (one definition, so the two cannot drift).
//
// Header-free on purpose: NVRTC provides the builtin vector types (uint2, uint4, float4) and the
// math functions (floorf, expf, fminf, ...), and FP16 is handled here with the same PTX `cvt`
// instructions that cuda_fp16.hpp uses. So the kernels compile with libnvrtc alone, with no CUDA
// headers on the machine. FP16 values are passed around as their raw 16-bit pattern (`f16raw`).
//
// build.rs embeds the files; src/backend/cuda/kernels.rs inlines this file once at the top of the
// single NVRTC program and drops the `#include "common.cuh"` lines of the .cu files. The guard
// keeps the files valid for a plain `nvcc -I kernels masks.cu` as well.
#ifndef SCORECAM_COMMON_CUH
#define SCORECAM_COMMON_CUH

typedef unsigned short f16raw;
typedef unsigned int u32;
typedef long long i64;
typedef unsigned long long u64;

// ---------------------------------------------------------------------------------------------
// FP16 <-> f32 (round to nearest even, like __float2half / half::f16::from_f32). The CPU
// emulation of the tests (tests/kernel_host) has no PTX: it converts with _Float16.
#ifdef SCORECAM_HOST_EMULATION
__device__ __forceinline__ float h2f(f16raw h) { return scorecam_host_h2f(h); }
__device__ __forceinline__ f16raw f2h(float f) { return scorecam_host_f2h(f); }
#else
__device__ __forceinline__ float h2f(f16raw h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}
__device__ __forceinline__ f16raw f2h(float f) {
    f16raw h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
}
#endif
// Two halves packed in a u32 (low half = lower address).
__device__ __forceinline__ float lo_f(u32 v) { return h2f((f16raw)(v & 0xffffu)); }
__device__ __forceinline__ float hi_f(u32 v) { return h2f((f16raw)(v >> 16)); }
__device__ __forceinline__ u32 pack2(float lo, float hi) {
    return (u32)f2h(lo) | ((u32)f2h(hi) << 16);
}

// ---------------------------------------------------------------------------------------------
// One warp-wide tensor-core step, d += A·B: A 16×16 FP16 (row-major), B 16×8 FP16 (column-major),
// d 16×8 f32, in PTX's m16n8k16 fragment layout. With lane = 4·g + t:
//   a[0] = A[g][2t..2t+1], a[1] = A[g+8][2t..2t+1], a[2] = A[g][2t+8..2t+9], a[3] = A[g+8][2t+8..];
//   b[0] = B[2t..2t+1][g], b[1] = B[2t+8..2t+9][g];
//   d[0..1] = D[g][2t..2t+1], d[2..3] = D[g+8][2t..2t+1]
// (two FP16 per u32, the lower index in the low half). Every lane of the warp must call it.
// Needs sm_80+: older GPUs get a trap (the launchers of its kernels refuse them first). The CPU
// emulation (tests/kernel_host) exchanges the fragments at a warp barrier and sums in f32.
#ifdef SCORECAM_HOST_EMULATION
__device__ __forceinline__ void mma_16816(float* d, const u32* a, const u32* b) {
    scorecam_host_mma_16816(d, a, b);
}
#elif __CUDA_ARCH__ >= 800
__device__ __forceinline__ void mma_16816(float* d, const u32* a, const u32* b) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}
#else
__device__ __forceinline__ void mma_16816(float*, const u32*, const u32*) { asm volatile("trap;"); }
#endif

// Two FP16 at element offset `i` (even) of `p` as one u32: a 32-bit load when `p` is 4-byte
// aligned, else two 16-bit ones.
__device__ __forceinline__ u32 load_pair(const f16raw* __restrict__ p, i64 i, bool aligned4) {
    if (aligned4) return *reinterpret_cast<const u32*>(p + i);
    return (u32)p[i] | ((u32)p[i + 1] << 16);
}

// 16 bytes from shared memory `src` (16-byte aligned) to global `dst`: one vector store when
// `dst_aligned16`, else byte by byte (the kernels' staged, coalesced output rows).
__device__ __forceinline__ void store16(unsigned char* dst, const unsigned char* src,
                                        bool dst_aligned16) {
    if (dst_aligned16) {
        *reinterpret_cast<uint4*>(dst) = *reinterpret_cast<const uint4*>(src);
    } else {
#pragma unroll
        for (int b = 0; b < 16; ++b) dst[b] = src[b];
    }
}

// The shared-memory address (the `.shared` window's 32-bit offset) of a generic pointer into
// shared memory, as the PTX of cp.async and ldmatrix takes it.
#ifndef SCORECAM_HOST_EMULATION
__device__ __forceinline__ u32 smem_addr(const void* p) {
    return (u32)__cvta_generic_to_shared(p);
}
#endif

// Four 8×8 FP16 matrices from shared memory (sm_75+ `ldmatrix .x4`), warp-wide: lane L gives the
// address of row L % 8 of matrix L / 8 (16 bytes, 16-byte aligned); r[m] of lane 4g + t is then
// row g, columns 2t, 2t + 1 of matrix m. With the matrices (rows 0–7, k 0–7), (rows 8–15,
// k 0–7), (rows 0–7, k 8–15), (rows 8–15, k 8–15) that is mma_16816's A fragment. Every lane of
// the warp must call it. The CPU emulation exchanges the addresses at a warp barrier.
#ifdef SCORECAM_HOST_EMULATION
__device__ __forceinline__ void ldmatrix_x4(u32* r, const void* row) {
    scorecam_host_ldmatrix_x4(r, row);
}
#elif __CUDA_ARCH__ >= 750
__device__ __forceinline__ void ldmatrix_x4(u32* r, const void* row) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_addr(row)));
}
#else
__device__ __forceinline__ void ldmatrix_x4(u32*, const void*) { asm volatile("trap;"); }
#endif

// Asynchronous 16-byte copies global → shared (sm_80+ `cp.async`), in groups: `cp_async16`
// queues one (16 zero bytes instead when `valid` is false; `src` must still be a readable
// address) through L2 only, `cp_async16_l1` the same also cached in L1 (for data read again
// soon by the same block), `cp_async_commit` closes the calling thread's group,
// `cp_async_wait<N>` waits until at most N of its committed groups are still in flight
// (`cp_async_wait_0`: all have landed). Only the calling thread's copies are waited for: a
// __syncthreads after the wait makes the whole block's visible. Both addresses 16-byte aligned.
// The CPU emulation (tests/kernel_host) lands a copy at its wait in one run and at its issue in
// others, so a kernel that relies on either (a read before the wait, a refill of memory another
// warp still reads) gives results that differ between runs.
#ifdef SCORECAM_HOST_EMULATION
__device__ __forceinline__ void cp_async16(void* dst, const void* src, bool valid) {
    scorecam_host_cp_async16(dst, src, valid);
}
__device__ __forceinline__ void cp_async16_l1(void* dst, const void* src, bool valid) {
    scorecam_host_cp_async16(dst, src, valid);
}
__device__ __forceinline__ void cp_async_commit() { scorecam_host_cp_async_commit(); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
    scorecam_host_cp_async_wait(N);
}
#elif __CUDA_ARCH__ >= 800
__device__ __forceinline__ void cp_async16(void* dst, const void* src, bool valid) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;"
                 :
                 : "r"(smem_addr(dst)), "l"(src), "r"(valid ? 16 : 0)
                 : "memory");
}
__device__ __forceinline__ void cp_async16_l1(void* dst, const void* src, bool valid) {
    asm volatile("cp.async.ca.shared.global [%0], [%1], 16, %2;"
                 :
                 : "r"(smem_addr(dst)), "l"(src), "r"(valid ? 16 : 0)
                 : "memory");
}
__device__ __forceinline__ void cp_async_commit() {
    asm volatile("cp.async.commit_group;" ::: "memory");
}
template <int N>
__device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;" ::"n"(N) : "memory");
}
#else
__device__ __forceinline__ void cp_async16(void*, const void*, bool) { asm volatile("trap;"); }
__device__ __forceinline__ void cp_async16_l1(void*, const void*, bool) { asm volatile("trap;"); }
__device__ __forceinline__ void cp_async_commit() { asm volatile("trap;"); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
    asm volatile("trap;");
}
#endif
__device__ __forceinline__ void cp_async_wait_0() { cp_async_wait<0>(); }

// A barrier for the 128 threads of the calling thread's warpgroup only (named barrier `id`,
// 1..15: 0 is __syncthreads'), so that the warpgroups of a block go at their own pace. The CPU
// emulation releases it when every thread of the warpgroup waits at one.
#ifdef SCORECAM_HOST_EMULATION
__device__ __forceinline__ void warpgroup_sync(int id) { scorecam_host_warpgroup_sync(id); }
#else
__device__ __forceinline__ void warpgroup_sync(int id) {
    asm volatile("bar.sync %0, 128;" ::"r"(id) : "memory");
}
#endif

// Hopper's warpgroup MMA (sm_90a `wgmma`), register-A form: 4 consecutive warps (a warpgroup,
// the first a multiple of 4) issue together d[64×64] += A[64×16]·B[16×64], FP16 in, f32 out.
//   - A in registers: warp w of the group holds rows 16w.. in mma_16816's A layout (an
//     ldmatrix_x4 fills it), so a warp's 16 rows are its own.
//   - B in shared memory, named by a descriptor (`wgmma_desc_kmajor`): K-major, no swizzle, in
//     8×8 "core matrices" of 8 rows (n) × 16 bytes (8 k), 128 contiguous bytes each; the two
//     core matrices of a row group along k are `lbo` bytes apart, row groups `sbo` bytes apart.
//     Stores into it by ordinary instructions need fence_proxy_async() and then a barrier before
//     a wgmma reads them (the tensor cores read shared memory through the async proxy).
//   - d: warp w's rows 16w + g and 16w + g + 8 in mma_16816's C layout per 8 columns:
//     d[4j + 0..1] = D[16w + g][8j + 2t..], d[4j + 2..3] = D[16w + g + 8][8j + 2t..].
// The operation is asynchronous: wgmma_fence() before the first one and after any other write
// to its A or d registers; wgmma_commit() closes a group; wgmma_wait<N>() waits until at most N
// groups are in flight. Until then its A and d registers may be neither read nor written.
// The shared-memory form wgmma_ss_64xNx16 (N = 128, 256): d[64×N] += A[64×16]·B[16×N] with A
// also named by a descriptor of the same K-major layout (rows of A in place of n), the calling
// warpgroup's 64 rows; d has N / 2 registers, d[4j + 0..3] as above for columns 8j...
// wgmma_ss_e4m3_64x128x32: the same with FP8 E4M3 operands, K = 32 (a core matrix's row of 16
// bytes holds 16 k), f32 accumulation (of about 14 bits on Hopper: see conv_wg.cu).
// Other architectures get a trap (the launcher refuses them first: Kernels::has_wgmma). The CPU
// emulation (tests/kernel_host) reads the operands at the wait in one run, at the issue in others.
#ifdef SCORECAM_HOST_EMULATION
__device__ __forceinline__ u32 smem_desc_addr(const void* p) { return scorecam_host_smem_offset(p); }
__device__ __forceinline__ void fence_proxy_async() { scorecam_host_fence_proxy_async(); }
__device__ __forceinline__ void wgmma_fence() {}
__device__ __forceinline__ void wgmma_commit() { scorecam_host_wgmma_commit(); }
template <int N>
__device__ __forceinline__ void wgmma_wait() {
    scorecam_host_wgmma_wait(N);
}
__device__ __forceinline__ void wgmma_64x64x16(float (&d)[32], const u32 (&a)[4], u64 desc) {
    scorecam_host_wgmma_64x64x16(d, a, desc);
}
__device__ __forceinline__ void wgmma_ss_64x128x16(float (&d)[64], u64 desc_a, u64 desc_b) {
    scorecam_host_wgmma_ss(d, desc_a, desc_b, 128);
}
__device__ __forceinline__ void wgmma_ss_64x256x16(float (&d)[128], u64 desc_a, u64 desc_b) {
    scorecam_host_wgmma_ss(d, desc_a, desc_b, 256);
}
__device__ __forceinline__ void wgmma_ss_e4m3_64x128x32(float (&d)[64], u64 desc_a, u64 desc_b) {
    scorecam_host_wgmma_ss(d, desc_a, desc_b, 128, true);
}
#elif defined(__CUDA_ARCH_FEAT_SM90_ALL)
__device__ __forceinline__ u32 smem_desc_addr(const void* p) { return smem_addr(p); }
__device__ __forceinline__ void fence_proxy_async() {
    asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
}
__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() {
    asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory");
}
template <int N>
__device__ __forceinline__ void wgmma_wait() {
    asm volatile("wgmma.wait_group.sync.aligned %0;" ::"n"(N) : "memory");
}
__device__ __forceinline__ void wgmma_64x64x16(float (&d)[32], const u32 (&a)[4], u64 desc) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n64k16.f32.f16.f16 "
        "{%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,"
        "%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31}, "
        "{%32,%33,%34,%35}, %36, p, 1, 1, 0;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]),
          "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]),
          "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]),
          "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]),
          "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]),
          "+f"(d[31])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc), "r"(1)
        : "memory");
}
// The shared-memory wgmma's operands: N / 2 accumulators "+f"(d[..]) and the text naming them
// %0 … %(N/2 − 1); the descriptors and the scale-d predicate's input come after them.
#define WGMMA_D8(i)                                                                         \
    "+f"(d[i]), "+f"(d[i + 1]), "+f"(d[i + 2]), "+f"(d[i + 3]), "+f"(d[i + 4]), "+f"(d[i + 5]), \
        "+f"(d[i + 6]), "+f"(d[i + 7])
#define WGMMA_D64 \
    WGMMA_D8(0), WGMMA_D8(8), WGMMA_D8(16), WGMMA_D8(24), WGMMA_D8(32), WGMMA_D8(40), \
        WGMMA_D8(48), WGMMA_D8(56)
#define WGMMA_D128 \
    WGMMA_D64, WGMMA_D8(64), WGMMA_D8(72), WGMMA_D8(80), WGMMA_D8(88), WGMMA_D8(96), \
        WGMMA_D8(104), WGMMA_D8(112), WGMMA_D8(120)
#define WGMMA_OPS64 \
    "%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15," \
    "%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31," \
    "%32,%33,%34,%35,%36,%37,%38,%39,%40,%41,%42,%43,%44,%45,%46,%47," \
    "%48,%49,%50,%51,%52,%53,%54,%55,%56,%57,%58,%59,%60,%61,%62,%63"
#define WGMMA_OPS128 \
    WGMMA_OPS64 "," \
    "%64,%65,%66,%67,%68,%69,%70,%71,%72,%73,%74,%75,%76,%77,%78,%79," \
    "%80,%81,%82,%83,%84,%85,%86,%87,%88,%89,%90,%91,%92,%93,%94,%95," \
    "%96,%97,%98,%99,%100,%101,%102,%103,%104,%105,%106,%107,%108,%109,%110,%111," \
    "%112,%113,%114,%115,%116,%117,%118,%119,%120,%121,%122,%123,%124,%125,%126,%127"
// One wgmma.mma_async of `shape` (A and B by descriptor), scale-d from the predicate (1:
// accumulate), then `tail`: the immediates after scale-a and scale-b (the transposes for FP16).
#define WGMMA_SS(shape, OPS, D, desc_ops, pred_op, tail)                                     \
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, " pred_op ", 0;\n"                        \
                 "wgmma.mma_async.sync.aligned." shape " {" OPS "}, " desc_ops ", p, 1, 1" tail \
                 ";\n}\n"                                                                     \
                 : D                                                                          \
                 : "l"(desc_a), "l"(desc_b), "r"(1)                                           \
                 : "memory")
__device__ __forceinline__ void wgmma_ss_64x128x16(float (&d)[64], u64 desc_a, u64 desc_b) {
    WGMMA_SS("m64n128k16.f32.f16.f16", WGMMA_OPS64, WGMMA_D64, "%64, %65", "%66", ", 0, 0");
}
__device__ __forceinline__ void wgmma_ss_64x256x16(float (&d)[128], u64 desc_a, u64 desc_b) {
    WGMMA_SS("m64n256k16.f32.f16.f16", WGMMA_OPS128, WGMMA_D128, "%128, %129", "%130", ", 0, 0");
}
__device__ __forceinline__ void wgmma_ss_e4m3_64x128x32(float (&d)[64], u64 desc_a, u64 desc_b) {
    WGMMA_SS("m64n128k32.f32.e4m3.e4m3", WGMMA_OPS64, WGMMA_D64, "%64, %65", "%66", "");
}
#else
__device__ __forceinline__ u32 smem_desc_addr(const void*) { return 0; }
__device__ __forceinline__ void fence_proxy_async() { asm volatile("trap;"); }
__device__ __forceinline__ void wgmma_fence() { asm volatile("trap;"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("trap;"); }
template <int N>
__device__ __forceinline__ void wgmma_wait() {
    asm volatile("trap;");
}
__device__ __forceinline__ void wgmma_64x64x16(float (&)[32], const u32 (&)[4], u64) {
    asm volatile("trap;");
}
__device__ __forceinline__ void wgmma_ss_64x128x16(float (&)[64], u64, u64) { asm volatile("trap;"); }
__device__ __forceinline__ void wgmma_ss_64x256x16(float (&)[128], u64, u64) { asm volatile("trap;"); }
__device__ __forceinline__ void wgmma_ss_e4m3_64x128x32(float (&)[64], u64, u64) {
    asm volatile("trap;");
}
#endif

// Pins the accumulators' values at this point of the program (an empty asm that reads and writes
// each): the compiler may not move their zeroing past the wgmma_fence that follows, nor their
// reads before the wgmma_wait that precedes (else ptxas inserts waits of its own, C7517).
template <int N>
__device__ __forceinline__ void wgmma_fence_operands(float (&d)[N]) {
#ifndef SCORECAM_HOST_EMULATION
#pragma unroll
    for (int i = 0; i < N; ++i) asm volatile("" : "+f"(d[i])::"memory");
#endif
}

// The descriptor of a K-major, unswizzled operand (A or B) at shared-memory `p` (16-byte aligned):
// start address, leading (k) and stride (row group) byte offsets, each in 16-byte units.
__device__ __forceinline__ u64 wgmma_desc_kmajor(const void* p, u32 lbo, u32 sbo) {
    return (u64)((smem_desc_addr(p) & 0x3FFFFu) >> 4) | ((u64)((lbo & 0x3FFFFu) >> 4) << 16) |
           ((u64)((sbo & 0x3FFFFu) >> 4) << 32);
}

// f32 → FP8 E4M3 bits, in software (the same result as cuda_fp8.hpp's __nv_cvt_float_to_fp8
// with __NV_SATFINITE for |x| ≤ 448, clamped above), so it compiles for every architecture:
// round to nearest even, saturating at ±448, NaN kept (sign too).
__device__ __forceinline__ unsigned char e4m3_bits(float x) {
    const u32 sign = (__float_as_uint(x) >> 24) & 0x80u;
    float a = fabsf(x);
    if (a != a) return (unsigned char)(sign | 0x7Fu);  // NaN stays NaN, sign kept
    a = fminf(a, 448.0f);
    if (a < 0.015625f) {
        // Below 2^-6: subnormals k·2^-9 (k = 8 is 2^-6, the smallest normal, bits 0x08).
        return (unsigned char)(sign | (u32)__float2int_rn(a * 512.0f));
    }
    const u32 bits = __float_as_uint(a);
    const int e = (int)((bits >> 23) & 0xFFu) - 127;  // -6..8
    const u32 m = bits & 0x7FFFFFu;
    u32 r = ((u32)(e + 7) << 3) | (m >> 20);
    const u32 rem = m & 0xFFFFFu;
    if (rem > 0x80000u || (rem == 0x80000u && (r & 1u))) r += 1;  // a carry moves the exponent
    return (unsigned char)(sign | r);
}

__device__ __forceinline__ float f32_inf() { return __int_as_float(0x7f800000); }

// True when `p` is aligned to `bytes` (a power of two).
__device__ __forceinline__ bool is_aligned(const void* p, u64 bytes) {
    return (reinterpret_cast<u64>(p) & (bytes - 1)) == 0;
}

// SplitMix64's finalizer (the host twin is backend::splitmix64): noise and random fills.
__device__ __forceinline__ u64 splitmix64(u64 x) {
    u64 z = x + 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

// Grid-stride helpers (64-bit: element counts may exceed 2^31).
__device__ __forceinline__ i64 global_tid() { return (i64)blockIdx.x * blockDim.x + threadIdx.x; }
__device__ __forceinline__ i64 global_stride() { return (i64)gridDim.x * blockDim.x; }

// ---------------------------------------------------------------------------------------------
// Reductions. Every block that uses them has blockDim.x a multiple of 32 (the launchers guarantee
// it), all threads of the block must call them (block-uniform control flow), and each call
// returns the result to every thread.
__device__ __forceinline__ float warp_min(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fminf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}
__device__ __forceinline__ float warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}
__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

// Block-wide min and max together (one pair of barriers for both).
__device__ __forceinline__ void block_min_max(float& mn, float& mx) {
    __shared__ float s_min[32];
    __shared__ float s_max[32];
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    const int nwarps = (blockDim.x + 31) >> 5;
    mn = warp_min(mn);
    mx = warp_max(mx);
    __syncthreads();  // a previous call may still be reading s_min[0] / s_max[0]
    if (lane == 0) {
        s_min[warp] = mn;
        s_max[warp] = mx;
    }
    __syncthreads();
    if (warp == 0) {
        float a = lane < nwarps ? s_min[lane] : f32_inf();
        float b = lane < nwarps ? s_max[lane] : -f32_inf();
        a = warp_min(a);
        b = warp_max(b);
        if (lane == 0) {
            s_min[0] = a;
            s_max[0] = b;
        }
    }
    __syncthreads();
    mn = s_min[0];
    mx = s_max[0];
}

__device__ __forceinline__ float block_max(float v) {
    __shared__ float s_red[32];
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    const int nwarps = (blockDim.x + 31) >> 5;
    v = warp_max(v);
    __syncthreads();
    if (lane == 0) s_red[warp] = v;
    __syncthreads();
    if (warp == 0) {
        float a = lane < nwarps ? s_red[lane] : -f32_inf();
        a = warp_max(a);
        if (lane == 0) s_red[0] = a;
    }
    __syncthreads();
    return s_red[0];
}

__device__ __forceinline__ float block_sum(float v) {
    __shared__ float s_sum[32];
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    const int nwarps = (blockDim.x + 31) >> 5;
    v = warp_sum(v);
    __syncthreads();
    if (lane == 0) s_sum[warp] = v;
    __syncthreads();
    if (warp == 0) {
        float a = lane < nwarps ? s_sum[lane] : 0.0f;
        a = warp_sum(a);
        if (lane == 0) s_sum[0] = a;
    }
    __syncthreads();
    return s_sum[0];
}

// ---------------------------------------------------------------------------------------------
// Bilinear sampling, exactly as PyTorch's upsample_bilinear2d with an output size:
//   align_corners=False: scale = in/out, src = scale·(dst + 0.5) − 0.5, clamped at 0;
//   align_corners=True:  scale = (in − 1)/(out − 1) (0 when out == 1), src = scale·dst.
//   i0 = floor(src) (≤ in − 1), i1 = min(i0 + 1, in − 1), lambda = src − i0.
// and the value h0·(w0·v00 + w1·v01) + h1·(w0·v10 + w1·v11) with h0 = 1 − lambda_y etc.
struct Tap {
    int i0;
    int i1;
    float l1;  // weight of i1; i0 gets 1 - l1
};

__device__ __forceinline__ float bilinear_scale(int in, int out, bool align_corners) {
    if (align_corners) return out > 1 ? (float)(in - 1) / (float)(out - 1) : 0.0f;
    return (float)in / (float)out;
}

__device__ __forceinline__ Tap bilinear_tap(int dst, int in, float scale, bool align_corners) {
    float src;
    if (align_corners) {
        src = scale * (float)dst;
    } else {
        src = scale * ((float)dst + 0.5f) - 0.5f;
        src = src < 0.0f ? 0.0f : src;
    }
    Tap t;
    int i0 = (int)src;  // src >= 0: truncation is floor
    i0 = i0 < in - 1 ? i0 : in - 1;
    t.i0 = i0;
    t.i1 = i0 + 1 < in ? i0 + 1 : in - 1;
    t.l1 = src - (float)i0;
    return t;
}

// One value of the upsampled plane from the taps of its row and column. `plane` is row-major
// [h][w] with element (y, x) at plane[(y·w + x)·stride] (stride 1 in shared memory, K when
// reading straight from NHWC activations).
template <typename Load>
__device__ __forceinline__ float bilinear_value(const Load& at, Tap ty, Tap tx) {
    const float wx1 = tx.l1, wx0 = 1.0f - tx.l1;
    const float wy1 = ty.l1, wy0 = 1.0f - ty.l1;
    const float top = wx0 * at(ty.i0, tx.i0) + wx1 * at(ty.i0, tx.i1);
    const float bot = wx0 * at(ty.i1, tx.i0) + wx1 * at(ty.i1, tx.i1);
    return wy0 * top + wy1 * bot;
}

// A [h][w] f32 plane in shared memory.
struct SmemPlane {
    const float* p;
    int w;
    __device__ __forceinline__ float operator()(int y, int x) const { return p[y * w + x]; }
};
// A [h][w] f32 plane in global memory.
struct GlobalPlaneF32 {
    const float* p;
    int w;
    __device__ __forceinline__ float operator()(int y, int x) const { return p[(i64)y * w + x]; }
};
// Channel `c` of one NHWC FP16 image [h][w][k] in global memory.
struct GlobalPlaneF16 {
    const f16raw* p;  // already offset to the image and channel
    int w;
    int k;
    __device__ __forceinline__ float operator()(int y, int x) const {
        return h2f(p[((i64)y * w + x) * k]);
    }
};

#endif  // SCORECAM_COMMON_CUH
