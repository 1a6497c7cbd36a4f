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
