// Kernels that test the CPU emulation itself (tests/kernels_host.rs, `emulation_*`): appended
// after kernels/common.cuh in the generated unit, so its helpers are in scope.

// For every thread t of block b: out[2·(b·blockDim.x + t)] = Σ of the block's x with
// common.cuh's block_sum (warp shuffles, static shared memory, three barriers per call), and the
// next element the same of the doubled values, from a second call right after the first (which
// must not overwrite the first's result before every warp has read it).
extern "C" __global__ void host_selftest_block_sum(const float* __restrict__ x,
                                                   float* __restrict__ out) {
    const i64 t = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    const float v = x[t];
    const float s = block_sum(v);
    const float s2 = block_sum(2.0f * v);
    out[2 * t] = s;
    out[2 * t + 1] = s2;
}

// out[t] = the value thread (blockDim.x − 1 − t) stored in dynamic shared memory before the
// barrier.
extern "C" __global__ void host_selftest_dynamic_shared(float* __restrict__ out) {
    extern __shared__ float s_selftest[];
    s_selftest[threadIdx.x] = (float)threadIdx.x;
    __syncthreads();
    out[threadIdx.x] = s_selftest[blockDim.x - 1 - threadIdx.x];
}

// Reads shared memory nobody wrote: dynamic (`dynamic` != 0) or static.
extern "C" __global__ void host_selftest_unwritten_shared(float* __restrict__ out, int dynamic) {
    extern __shared__ float s_unwritten[];
    __shared__ float s_static_unwritten[64];
    out[threadIdx.x] = dynamic ? s_unwritten[threadIdx.x] : s_static_unwritten[threadIdx.x];
}

// Writes one float past its dynamic shared memory (blockDim.x floats).
extern "C" __global__ void host_selftest_shared_overflow(float* __restrict__ out) {
    extern __shared__ float s_overflow[];
    s_overflow[threadIdx.x + 1] = 1.0f;
    __syncthreads();
    out[threadIdx.x] = s_overflow[threadIdx.x];
}

// Lanes 20..31 exit; the others meet at a shuffle and read lane 0 and an exited lane (NaN).
extern "C" __global__ void host_selftest_exited_lanes(float* __restrict__ out) {
    if ((threadIdx.x & 31) >= 20) return;
    const float v = (float)threadIdx.x;
    out[2 * threadIdx.x] = __shfl_sync(0xffffffffu, v, 0);
    out[2 * threadIdx.x + 1] = __shfl_sync(0xffffffffu, v, 25);
}

// The same exchange as host_selftest_dynamic_shared without its barrier: a race.
extern "C" __global__ void host_selftest_missing_barrier(float* __restrict__ out) {
    extern __shared__ float s_race[];
    s_race[threadIdx.x] = (float)threadIdx.x;
    out[threadIdx.x] = s_race[blockDim.x - 1 - threadIdx.x];
}

// Thread 0 waits at __syncthreads while the rest of its warp waits at a shuffle: a deadlock.
extern "C" __global__ void host_selftest_divergent_barrier(float* __restrict__ out) {
    float v = (float)threadIdx.x;
    if (threadIdx.x == 0) __syncthreads();
    else v = __shfl_xor_sync(0xffffffffu, v, 1);
    out[threadIdx.x] = v;
}

// Writes one element past the end of its n-element output.
extern "C" __global__ void host_selftest_write_past_end(float* __restrict__ out, int n) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i <= n) out[i] = 1.0f;
}

// Writes into its input.
extern "C" __global__ void host_selftest_write_input(const float* __restrict__ x) {
    if (threadIdx.x == 0) const_cast<float*>(x)[0] = 2.0f;
}

// Declares at most 64 threads per block.
extern "C" __global__ void __launch_bounds__(64) host_selftest_bounded(float* __restrict__ out) {
    out[threadIdx.x] = 1.0f;
}

// One warpgroup: A (64 rows × 16 k) and B (128 rows n × 16 k), FP16 row-major, copied by
// cp.async into shared memory as K-major operands, [k half][row][8 values] (LBO = rows × 16,
// SBO = 128), then out[64·t + i] = thread t's accumulators of one wgmma_ss_64x128x16. With
// `fence` 0 the copies are never fenced to the async proxy, which the emulation must refuse.
extern "C" __global__ void host_selftest_wgmma_fence(const f16raw* __restrict__ a,
                                                    const f16raw* __restrict__ b, int fence,
                                                    float* __restrict__ out) {
    extern __shared__ uint4 s_wgmma[];
    unsigned char* sm = reinterpret_cast<unsigned char*>(s_wgmma);
    for (int c = threadIdx.x; c < 384; c += 128) {  // A's 128 chunks of 16 bytes, then B's 256
        const bool is_a = c < 128;
        const int rows = is_a ? 64 : 128, cc = is_a ? c : c - 128;
        const int half = cc / rows, row = cc % rows;
        const f16raw* src = (is_a ? a : b) + 16 * row + 8 * half;
        cp_async16(sm + (is_a ? 0 : 2048) + half * rows * 16 + row * 16, src, true);
    }
    cp_async_commit();
    cp_async_wait_0();
    if (fence) fence_proxy_async();
    __syncthreads();
    float acc[64];
    for (int i = 0; i < 64; ++i) acc[i] = 0.0f;
    wgmma_fence();
    wgmma_ss_64x128x16(acc, wgmma_desc_kmajor(sm, 64 * 16, 128),
                       wgmma_desc_kmajor(sm + 2048, 128 * 16, 128));
    wgmma_commit();
    wgmma_wait<0>();
    for (int i = 0; i < 64; ++i) out[64 * threadIdx.x + i] = acc[i];
}
