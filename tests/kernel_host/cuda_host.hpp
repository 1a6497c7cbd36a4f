// CUDA on the CPU, for testing kernels/*.cu without a GPU (tests/kernel_host/mod.rs builds it).
//
// The kernel sources are compiled by the host C++ compiler after this header, which supplies
// what NVRTC would: the qualifiers, threadIdx & co., the vector types, the intrinsics the kernels
// use, __syncthreads and the warp shuffles. A launch runs its blocks one after another on the
// calling OS thread; the threads of a block are fibers (ucontext), switched only at barriers:
//   * __syncthreads releases when every thread of the block that has not exited waits at it;
//   * a warp shuffle is a warp barrier around an exchange (full mask only): it releases when
//     every lane of the warp that has not exited waits at one; reading an exited lane gives NaN;
//   * a block where no barrier can release (divergent __syncthreads, a shuffle that part of
//     the warp never reaches) fails the launch with a message naming who waits where, instead of
//     hanging like a GPU would;
//   * a launch runs its blocks and threads in order, or (schedule != 0) blocks in a random order
//     and warps by a random priority, the first that can run always next, so warps drift apart
//     by as many barriers as the kernel allows. The Rust side compares the results: a value read
//     across a missing barrier shows as a difference. What cannot show: races between threads
//     with no barrier between them at all (a non-atomic read-modify-write by many threads runs
//     each thread's stretch whole, so it always "works"), and overlapping blocks.
// Shared memory: `__shared__` arrays are thread_local statics registered on first use (one block
// runs at a time per OS thread), dynamic shared memory a per-block buffer with guard bytes on
// both sides (a write outside it fails the launch). Both are filled before every block with
// 0xFF bytes (schedule 0) or random bytes (other schedules), so a read before a write differs
// between schedules even where a NaN would vanish in fminf/fmaxf. Bytes a cp.async wrote are
// visible to wgmma (the async proxy) only after the copying thread's fence.proxy.async that
// follows the copy's landing: a wgmma reading others fails the launch. (Ordinary stores are not
// tracked: a missing fence after them does not show, and one over a copy's unfenced bytes does
// not clear their mark.)
// Numbers: the FP16 conversions are _Float16's (round to nearest even, like cvt.rn.f16.f32),
// with NaNs made canonical both ways (0x7FFFFFFF, 0x7FFF) as cuda_fp16.hpp's host fallbacks,
// written to match the device, do. Floating-point contraction is off, so results can differ from
// the GPU's in the last bits where nvcc would fuse a multiply-add: tests compare with tolerances
// where the kernels do arithmetic beyond one rounding.
// Each fiber has a 128 KiB stack with a PROT_NONE page below it (an overflow crashes loudly).
//
// Entry point: `scorecam_host_launch` (below), over the table of kernels that the generated
// translation unit appends (`SCORECAM_HOST_KERNEL(name)` entries).
#ifndef SCORECAM_CUDA_HOST_HPP
#define SCORECAM_CUDA_HOST_HPP

#define SCORECAM_HOST_EMULATION 1

#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#include <array>
#include <exception>
#include <memory>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

// ---------------------------------------------------------------------------------------------
// Qualifiers and built-in variables.
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
// Arrays are rewritten by the builder to `SCORECAM_SHARED_ARRAY(T, name, N)` (registered and
// poisoned per block); anything else declared __shared__ is a plain thread_local static.
#define __shared__ static thread_local

struct uint3 {
    unsigned x, y, z;
};
struct dim3 {
    unsigned x = 1, y = 1, z = 1;
};
struct alignas(8) uint2 {
    unsigned x, y;
};
struct alignas(16) uint4 {
    unsigned x, y, z, w;
};
struct alignas(8) float2 {
    float x, y;
};
inline float2 make_float2(float x, float y) { return float2{x, y}; }
struct alignas(16) float4 {
    float x, y, z, w;
};
inline uint2 make_uint2(unsigned x, unsigned y) { return uint2{x, y}; }
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) {
    return uint4{x, y, z, w};
}

inline thread_local uint3 threadIdx;
inline thread_local uint3 blockIdx;
inline thread_local dim3 blockDim;
inline thread_local dim3 gridDim;

// ---------------------------------------------------------------------------------------------
// Intrinsics.
template <typename To, typename From>
inline To scorecam_bits(From v) {
    static_assert(sizeof(To) == sizeof(From), "bit cast of unequal sizes");
    To t;
    memcpy(&t, &v, sizeof(To));
    return t;
}
inline unsigned __float_as_uint(float f) { return scorecam_bits<unsigned>(f); }
inline int __float_as_int(float f) { return scorecam_bits<int>(f); }
inline float __int_as_float(int i) { return scorecam_bits<float>(i); }
inline float __uint_as_float(unsigned u) { return scorecam_bits<float>(u); }
// The default rounding mode is round to nearest even, as the _rn suffix asks.
inline int __float2int_rn(float f) { return (int)nearbyintf(f); }
inline float cospif(float x) { return (float)cos(M_PI * (double)x); }
inline float sinpif(float x) { return (float)sin(M_PI * (double)x); }
// Blocks run one at a time and their threads only switch at barriers: plain read-modify-writes
// are atomic here.
inline int atomicMax(int* p, int v) {
    const int old = *p;
    if (v > old) *p = v;
    return old;
}
inline unsigned atomicMax(unsigned* p, unsigned v) {
    const unsigned old = *p;
    if (v > old) *p = v;
    return old;
}
inline float atomicAdd(float* p, float v) {
    const float old = *p;
    *p = old + v;
    return old;
}
inline unsigned atomicAdd(unsigned* p, unsigned v) {
    const unsigned old = *p;
    *p = old + v;
    return old;
}

// FP16 <-> f32 for common.cuh's h2f / f2h under SCORECAM_HOST_EMULATION: round to nearest even,
// NaNs canonical (sign and payload dropped), as cuda_fp16.hpp's host fallbacks of the device
// conversions give them.
inline float scorecam_host_h2f(unsigned short h) {
    if ((h & 0x7C00u) == 0x7C00u && (h & 0x03FFu)) return scorecam_bits<float>(0x7FFFFFFFu);
    return (float)scorecam_bits<_Float16>(h);
}
inline unsigned short scorecam_host_f2h(float f) {
    if (f != f) return 0x7FFFu;
    return scorecam_bits<unsigned short>((_Float16)f);
}

// ---------------------------------------------------------------------------------------------
// Blocks of fibers.
namespace scorecam_host {

enum class Wait { None, Block, Warp, Group, Named, Done, Failed };

// One queued `cp.async` (common.cuh's cp_async16): performed at its thread's wait.
struct PendingCopy {
    void* dst;
    const void* src;
    bool valid;
};

// One issued wgmma (common.cuh's wgmma_64x64x16 and wgmma_ss_64xNx16): where its accumulators
// and A registers live (the issuing thread's stack; no registers: A is named by `a_desc`), its
// B descriptor and its N. Performed at the wait that covers it, or at its issue in random
// schedules.
struct PendingWgmma {
    float* d;
    const unsigned* a;
    unsigned long long desc;
    unsigned long long a_desc = 0;
    unsigned n = 64;
    // FP8 E4M3 operands (K = 32), else FP16 (K = 16).
    bool e4m3 = false;
};

struct Fiber {
    ucontext_t ctx;
    Wait wait = Wait::None;
    // The thread's queued copies, oldest first, and where each committed group ends in them.
    std::vector<PendingCopy> copies;
    std::vector<size_t> group_ends;
    // Its issued wgmma operations, oldest first, and where each committed group ends in them.
    std::vector<PendingWgmma> wgmmas;
    std::vector<size_t> wgmma_group_ends;
    // The 16-byte chunks of dynamic shared memory its copies wrote since its last
    // fence.proxy.async (see BlockRun::unfenced).
    std::vector<size_t> unfenced;
};

using AnyFn = void (*)();

// One block being run: its fibers, the scheduler's context, the exchange slots of the shuffles.
struct BlockRun {
    std::vector<Fiber> fibers;
    char* stacks = nullptr;  // the calling OS thread's stack area (`stack_area`)
    ucontext_t scheduler;
    unsigned current = 0;
    std::vector<unsigned long long> exchange;  // one slot per thread
    // The warpgroup (its first thread) that uses each named barrier (warpgroup_sync), or -1:
    // one barrier id serving two warpgroups would mix their arrivals on a GPU.
    std::array<long, 16> named_owner;
    // The mma fragments each thread offers its warp (a[0..3], b[0..1]).
    std::vector<std::array<unsigned, 6>> mma_slots;
    // cp.async copies land when issued (random schedules) instead of at the wait (in order);
    // wgmma operations read their operands when issued too, except in the random schedules
    // with LATE_WGMMA set (copies early, MMAs late: an MMA still in flight when its operand's
    // memory is refilled reads the new bytes).
    bool eager_copies = false;
    bool eager_wgmma = false;
    // The launch's buffer arguments, [start, end): what a cp.async may copy from.
    std::vector<std::pair<uintptr_t, uintptr_t>> buffers;
    std::string error;
    AnyFn fn = nullptr;
    void (*invoke)(AnyFn, void**) = nullptr;
    void** args = nullptr;
    // Dynamic shared memory: SMEM_GUARD bytes, the block's bytes, SMEM_GUARD bytes.
    std::vector<unsigned char> dynamic_shared;
    size_t dynamic_shared_bytes = 0;
    // Per 16-byte chunk of dynamic shared memory: 0, or 1 + the thread whose cp.async wrote it
    // and which has not executed fence.proxy.async since. cp.async writes through the generic
    // proxy and wgmma reads through the async proxy: a wgmma reading such a chunk would read
    // what it held before on a GPU (PTX ISA, memory consistency: proxies), so it fails here.
    std::vector<unsigned> unfenced;
};

inline thread_local BlockRun* run = nullptr;

constexpr size_t STACK_BYTES = 128 * 1024;
constexpr size_t SMEM_GUARD = 64;
constexpr unsigned char SMEM_CANARY = 0xA5;
// The bit of a random schedule's seed that asks for wgmma operations performed at their wait
// (`BlockRun::eager_wgmma`); tests/kernel_host/mod.rs sets it in every second schedule.
constexpr unsigned long long LATE_WGMMA = 2;

// Fiber stacks of this OS thread, grown when a launch needs more: slot i is a PROT_NONE page
// then STACK_BYTES of stack. Kept for the thread's life (launches reuse them).
struct StackArea {
    char* base = nullptr;
    size_t slots = 0;
    static size_t page() { return (size_t)sysconf(_SC_PAGESIZE); }
    static size_t slot_bytes() { return page() + STACK_BYTES; }
    ~StackArea() {
        if (base) munmap(base, slots * slot_bytes());
    }
    // The stacks of `n` fibers (nullptr if the memory cannot be had).
    char* reserve(size_t n) {
        if (n <= slots) return base;
        if (base) munmap(base, slots * slot_bytes());
        base = nullptr;
        slots = 0;
        void* p = mmap(nullptr, n * slot_bytes(), PROT_READ | PROT_WRITE,
                       MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
        if (p == MAP_FAILED) return nullptr;
        base = static_cast<char*>(p);
        slots = n;
        for (size_t i = 0; i < n; ++i) mprotect(base + i * slot_bytes(), page(), PROT_NONE);
        return base;
    }
    static char* stack(char* base, size_t i) { return base + i * slot_bytes() + page(); }
};
inline thread_local StackArea stack_area;

// The static __shared__ arrays this OS thread has met: poisoned before every block.
inline thread_local std::vector<std::pair<void*, size_t>> static_shared;

inline void register_shared(void* p, size_t n) {
    for (const auto& e : static_shared)
        if (e.first == p) return;
    static_shared.emplace_back(p, n);
    memset(p, 0xFF, n);  // its first block: read-before-write shows as NaN here too
}

inline unsigned threads_per_block() { return blockDim.x * blockDim.y * blockDim.z; }

inline void set_thread_index(unsigned tid) {
    threadIdx.x = tid % blockDim.x;
    threadIdx.y = (tid / blockDim.x) % blockDim.y;
    threadIdx.z = tid / (blockDim.x * blockDim.y);
}

// "block (x,y,z)" of the running block, for messages.
inline std::string block_name() {
    return "block (" + std::to_string(blockIdx.x) + "," + std::to_string(blockIdx.y) + "," +
           std::to_string(blockIdx.z) + ")";
}

// Leave the running fiber for the scheduler, marked `w`.
inline void yield(Wait w) {
    Fiber& f = run->fibers[run->current];
    f.wait = w;
    swapcontext(&f.ctx, &run->scheduler);
}

// Stop the block with `msg` (the first failure is kept); the fiber is never resumed.
[[noreturn]] inline void fail(const std::string& msg) {
    if (run->error.empty()) {
        run->error = block_name() + " thread " + std::to_string(run->current) + ": " + msg;
    }
    yield(Wait::Failed);
    __builtin_unreachable();
}

inline void fiber_main() {
    run->invoke(run->fn, run->args);
    // A lane that has exited gives NaN to a shuffle or an mma that reads it.
    run->exchange[run->current] = ~0ull;
    run->mma_slots[run->current].fill(0x7FFF7FFFu);
    if (!run->fibers[run->current].wgmmas.empty())
        fail("ended with wgmma operations not waited for");
    run->fibers[run->current].wait = Wait::Done;
    // returning resumes uc_link: the scheduler
}

// The first thread of the calling thread's warp, for a warp-wide operation `what` (which fails
// the launch in a warp of fewer than 32 threads).
inline unsigned full_warp0(const char* what) {
    const unsigned warp0 = run->current & ~31u;
    if (warp0 + 32 > threads_per_block())
        fail(std::string(what) + " in a warp with fewer than 32 threads");
    return warp0;
}

// The value of lane `src_lane` of the calling thread's warp, exchanged as 64-bit slots.
template <typename T>
inline T shuffle(unsigned mask, T v, unsigned src_lane, const char* what) {
    static_assert(sizeof(T) <= 8, "shuffles move at most 64 bits");
    if (mask != 0xffffffffu) fail(std::string(what) + " with a partial mask is not emulated");
    const unsigned tid = run->current;
    const unsigned warp0 = full_warp0(what);
    unsigned long long slot = 0;
    memcpy(&slot, &v, sizeof(T));
    run->exchange[tid] = slot;
    yield(Wait::Warp);  // every lane has written
    const unsigned long long got = run->exchange[warp0 + (src_lane & 31u)];
    yield(Wait::Warp);  // every lane has read
    T r;
    memcpy(&r, &got, sizeof(T));
    return r;
}

inline std::string describe_waits(const BlockRun& r) {
    std::string s;
    const char* names[] = {"running",
                           "__syncthreads",
                           "a warp shuffle",
                           "a warpgroup's wgmma",
                           "a warpgroup barrier",
                           "exited",
                           "failed"};
    size_t i = 0;
    while (i < r.fibers.size()) {
        size_t j = i;
        while (j + 1 < r.fibers.size() && r.fibers[j + 1].wait == r.fibers[i].wait) ++j;
        if (!s.empty()) s += ", ";
        s += "threads " + std::to_string(i) + ".." + std::to_string(j) + " " +
             names[(int)r.fibers[i].wait];
        i = j + 1;
    }
    return s;
}

// Release the threads waiting at `kind` in each span of `size` threads (warp, warpgroup or
// block; the last may be shorter) where every thread waits there or has exited (CUDA: exited
// threads count as arrived). Whether any span was released.
inline bool release_spans(BlockRun& r, size_t size, Wait kind) {
    const size_t n = r.fibers.size();
    bool released = false;
    for (size_t s0 = 0; s0 < n; s0 += size) {
        const size_t s1 = s0 + size < n ? s0 + size : n;
        bool all = true, any = false;
        for (size_t i = s0; i < s1; ++i) {
            any = any || r.fibers[i].wait == kind;
            all = all && (r.fibers[i].wait == kind || r.fibers[i].wait == Wait::Done);
        }
        if (any && all) {
            for (size_t i = s0; i < s1; ++i)
                if (r.fibers[i].wait == kind) r.fibers[i].wait = Wait::None;
            released = true;
        }
    }
    return released;
}

// Release whatever barrier can be released; false when none can (a deadlock) or all are done.
inline bool release(BlockRun& r) {
    const size_t n = r.fibers.size();
    if (release_spans(r, 32, Wait::Warp)) return true;
    // Warpgroups (128 threads from a multiple of 128) at a wgmma step, or at their barrier.
    const bool group = release_spans(r, 128, Wait::Group);
    if (release_spans(r, 128, Wait::Named) || group) return true;
    return release_spans(r, n, Wait::Block);
}

// xorshift64 (state never 0).
inline unsigned long long next_random(unsigned long long& state) {
    state ^= state << 13;
    state ^= state >> 7;
    state ^= state << 17;
    return state;
}

// A new random order of `order` (Fisher-Yates).
inline void shuffle_order(std::vector<unsigned>& order, unsigned long long& state) {
    for (size_t i = order.size(); i > 1; --i) std::swap(order[i - 1], order[next_random(state) % i]);
}

// The guard bytes around the block's dynamic shared memory are untouched (else r.error).
inline bool dynamic_shared_intact(BlockRun& r) {
    const unsigned char* d = r.dynamic_shared.data();
    const size_t n = r.dynamic_shared_bytes;
    for (size_t i = 0; i < SMEM_GUARD; ++i) {
        if (d[i] != SMEM_CANARY || d[SMEM_GUARD + n + i] != SMEM_CANARY) {
            r.error = block_name() + ": wrote " +
                      (d[i] != SMEM_CANARY ? "before" : "past") + " its " + std::to_string(n) +
                      " bytes of dynamic shared memory";
            return false;
        }
    }
    return true;
}

// Run fiber `i` to its next barrier (or its end). False when it failed.
inline bool resume(BlockRun& r, unsigned i) {
    r.current = i;
    set_thread_index(i);
    swapcontext(&r.scheduler, &r.fibers[i].ctx);
    return r.error.empty();
}

// Run every thread of the current block (blockIdx set) to its end. Schedule 0: passes over the
// threads that can run, in thread order, each to its next barrier. Else (xorshift state
// `schedule`) the warps get a random priority and the first warp that can run always runs next
// (its threads in a random order), so fast warps get as far ahead as barriers let them while
// slow ones wait: a value read after a barrier, overwritten by a fast warp before a slow one
// read it, shows.
// Fill `n` bytes at `p`: 0xFF in order, random bytes in a random schedule.
inline void poison(void* p, size_t n, unsigned long long& schedule) {
    unsigned char* b = static_cast<unsigned char*>(p);
    if (!schedule) {
        memset(b, 0xFF, n);
        return;
    }
    for (size_t i = 0; i < n; i += 8) {
        const unsigned long long v = next_random(schedule);
        memcpy(b + i, &v, n - i < 8 ? n - i : 8);
    }
}

inline bool run_block(BlockRun& r, unsigned long long& schedule) {
    const unsigned n = threads_per_block();
    r.eager_copies = schedule != 0;
    r.named_owner.fill(-1);
    poison(r.dynamic_shared.data() + SMEM_GUARD, r.dynamic_shared_bytes, schedule);
    for (const auto& e : static_shared) poison(e.first, e.second, schedule);
    r.unfenced.assign((r.dynamic_shared_bytes + 15) / 16, 0);
    for (unsigned i = 0; i < n; ++i) {
        Fiber& f = r.fibers[i];
        f.unfenced.clear();
        getcontext(&f.ctx);
        f.ctx.uc_stack.ss_sp = StackArea::stack(r.stacks, i);
        f.ctx.uc_stack.ss_size = STACK_BYTES;
        f.ctx.uc_link = &r.scheduler;
        makecontext(&f.ctx, fiber_main, 0);
        f.wait = Wait::None;
        f.copies.clear();
        f.group_ends.clear();
        f.wgmmas.clear();
        f.wgmma_group_ends.clear();
    }
    const unsigned warps = (n + 31) / 32;
    std::vector<unsigned> warp_order(warps), lanes;
    for (unsigned w = 0; w < warps; ++w) warp_order[w] = w;
    if (schedule) shuffle_order(warp_order, schedule);
    for (;;) {
        bool ran = false;
        if (schedule) {
            for (const unsigned w : warp_order) {
                lanes.clear();
                for (unsigned i = 32 * w; i < n && i < 32 * w + 32; ++i)
                    if (r.fibers[i].wait == Wait::None) lanes.push_back(i);
                if (lanes.empty()) continue;
                shuffle_order(lanes, schedule);
                for (const unsigned i : lanes)
                    if (!resume(r, i)) return false;
                ran = true;
                break;
            }
        } else {
            for (unsigned i = 0; i < n; ++i) {
                if (r.fibers[i].wait != Wait::None) continue;
                if (!resume(r, i)) return false;
                ran = true;
            }
        }
        bool done = true;
        for (const Fiber& f : r.fibers) done = done && f.wait == Wait::Done;
        if (done) return dynamic_shared_intact(r);
        if (!release(r) && !ran) {
            r.error = block_name() + ": deadlock, no barrier can release: " + describe_waits(r);
            return false;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The kernel table and its argument kinds: 'p' pointer, 'i' int, 'I' unsigned, 'l' long long,
// 'u' unsigned long long, 'f' float (the Rust side passes the same letters).
template <typename T>
constexpr char kind() {
    using U = std::remove_cv_t<T>;
    if constexpr (std::is_pointer_v<U>) return 'p';
    else if constexpr (std::is_same_v<U, int>) return 'i';
    else if constexpr (std::is_same_v<U, unsigned>) return 'I';
    else if constexpr (std::is_same_v<U, long long>) return 'l';
    else if constexpr (std::is_same_v<U, unsigned long long>) return 'u';
    else if constexpr (std::is_same_v<U, float>) return 'f';
    else return '?';
}

template <typename... A>
struct Invoker {
    static constexpr char kinds[] = {kind<A>()..., '\0'};
    template <size_t... I>
    static void call_with(void (*f)(A...), void** args, std::index_sequence<I...>) {
        f(*static_cast<std::remove_cv_t<A>*>(args[I])...);
    }
    static void call(AnyFn f, void** args) {
        call_with(reinterpret_cast<void (*)(A...)>(f), args, std::index_sequence_for<A...>{});
    }
};

struct Kernel {
    const char* name;
    AnyFn fn;
    void (*invoke)(AnyFn, void**);
    const char* kinds;
};

template <typename... A>
constexpr Kernel kernel(const char* name, void (*f)(A...)) {
    return Kernel{name, reinterpret_cast<AnyFn>(f), &Invoker<A...>::call, Invoker<A...>::kinds};
}

}  // namespace scorecam_host

// Dynamic shared memory: `extern __shared__ T name[];` is rewritten by the builder to
// `T* name = reinterpret_cast<T*>(scorecam_dynamic_shared());`.
inline void* scorecam_dynamic_shared() {
    return scorecam_host::run->dynamic_shared.data() + scorecam_host::SMEM_GUARD;
}

// `__shared__ T name[N];` is rewritten by the builder to `SCORECAM_SHARED_ARRAY(T, name, N)`.
#define SCORECAM_SHARED_ARRAY(T, name, N) \
    static thread_local T name[N];        \
    scorecam_host::register_shared(name, sizeof(name))

inline void __syncthreads() { scorecam_host::yield(scorecam_host::Wait::Block); }
inline void __syncwarp(unsigned mask = 0xffffffffu) {
    scorecam_host::shuffle(mask, 0, 0, "__syncwarp");
}
template <typename T>
inline T __shfl_xor_sync(unsigned mask, T v, int lane_mask) {
    const unsigned lane = scorecam_host::run->current & 31u;
    return scorecam_host::shuffle(mask, v, lane ^ (unsigned)lane_mask, "__shfl_xor_sync");
}
template <typename T>
inline T __shfl_down_sync(unsigned mask, T v, unsigned delta) {
    const unsigned lane = scorecam_host::run->current & 31u;
    return scorecam_host::shuffle(mask, v, lane + delta < 32 ? lane + delta : lane,
                                  "__shfl_down_sync");
}
template <typename T>
inline T __shfl_sync(unsigned mask, T v, int src_lane) {
    return scorecam_host::shuffle(mask, v, (unsigned)src_lane, "__shfl_sync");
}

namespace scorecam_host {

// Rows g and g + 8 of a 16×16 FP16 A operand in mma_16816's fragment layout, spread over a warp:
// `reg(l, r)` is register r of the warp's lane l (lane 4g + j holds in its register r row
// g + 8·(r & 1), columns 2j + 8·(r >> 1) + {0, 1}). mma_16816 and wgmma share the layout.
template <class Reg>
inline void a_rows(float (&A)[2][16], unsigned g, Reg reg) {
    for (unsigned j = 0; j < 4; ++j)
        for (unsigned r = 0; r < 4; ++r) {
            const unsigned v = reg(4 * g + j, r);
            const unsigned col = 2 * j + 8 * (r >> 1);
            A[r & 1][col] = scorecam_host_h2f((unsigned short)(v & 0xffffu));
            A[r & 1][col + 1] = scorecam_host_h2f((unsigned short)(v >> 16));
        }
}

}  // namespace scorecam_host

// common.cuh's mma_16816 (PTX mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32) for the warp
// of the calling thread: every lane offers its fragments at a warp barrier (so every lane must
// call it, as on a GPU, and a lane that has exited offers NaN), gathers the A rows and B columns
// of its four results from the lanes that hold them, and adds the products to d in f32, in k
// order. A GPU's tensor core sums in another order and precision: tests compare with tolerances.
inline void scorecam_host_mma_16816(float* d, const unsigned* a, const unsigned* b) {
    using namespace scorecam_host;
    const unsigned tid = run->current;
    const unsigned warp0 = full_warp0("mma_16816");
    run->mma_slots[tid] = {a[0], a[1], a[2], a[3], b[0], b[1]};
    yield(Wait::Warp);  // every lane has offered its fragments
    const unsigned lane = tid & 31u;
    const unsigned g = lane >> 2, t = lane & 3u;
    const auto* slots = &run->mma_slots[warp0];
    float A[2][16];  // rows g and g + 8
    a_rows(A, g, [&](unsigned l, unsigned r) { return slots[l][r]; });
    float B[2][16];  // columns 2t and 2t + 1
    for (unsigned c = 0; c < 2; ++c)
        for (unsigned j = 0; j < 4; ++j)
            for (unsigned r = 0; r < 2; ++r) {
                // lane 4n + j holds in b[r]: column n, rows 2j + 8·r + {0, 1}
                const unsigned v = slots[4 * (2 * t + c) + j][4 + r];
                const unsigned k = 2 * j + 8 * r;
                B[c][k] = scorecam_host_h2f((unsigned short)(v & 0xffffu));
                B[c][k + 1] = scorecam_host_h2f((unsigned short)(v >> 16));
            }
    yield(Wait::Warp);  // every lane has read
    for (unsigned row = 0; row < 2; ++row)
        for (unsigned c = 0; c < 2; ++c) {
            float s = d[2 * row + c];
            for (unsigned k = 0; k < 16; ++k) s += A[row][k] * B[c][k];
            d[2 * row + c] = s;
        }
}

// common.cuh's ldmatrix_x4 (PTX ldmatrix.sync.aligned.m8n8.x4.shared.b16) for the warp of the
// calling thread: every lane offers its row address at a warp barrier, then reads its four words
// from the rows it is given (every lane must call it; an exited lane's address fails the launch).
inline void scorecam_host_ldmatrix_x4(unsigned* r, const void* row) {
    using namespace scorecam_host;
    const unsigned tid = run->current;
    const unsigned warp0 = full_warp0("ldmatrix_x4");
    if (reinterpret_cast<uintptr_t>(row) & 15u) fail("ldmatrix_x4 with a row not 16-byte aligned");
    run->exchange[tid] = reinterpret_cast<uintptr_t>(row);
    yield(Wait::Warp);  // every lane has offered its row
    const unsigned lane = tid & 31u;
    const unsigned g = lane >> 2, t = lane & 3u;
    unsigned got[4];
    for (unsigned m = 0; m < 4; ++m) {
        const unsigned long long a = run->exchange[warp0 + 8 * m + g];
        if (a == ~0ull) fail("ldmatrix_x4 reading the row of a lane that has exited");
        memcpy(&got[m], reinterpret_cast<const unsigned char*>(a) + 4 * t, 4);
    }
    yield(Wait::Warp);  // every lane has read
    memcpy(r, got, sizeof got);
}

// The offset of `p` in the block's dynamic shared memory: what common.cuh's wgmma descriptors
// hold here in place of a `.shared` address (the emulation decodes them against the same base).
inline unsigned scorecam_host_smem_offset(const void* p) {
    using namespace scorecam_host;
    const auto* b = static_cast<const unsigned char*>(p);
    const auto* base = static_cast<const unsigned char*>(scorecam_dynamic_shared());
    if (b < base || b >= base + run->dynamic_shared_bytes)
        fail("a wgmma descriptor of an address outside the dynamic shared memory");
    return (unsigned)(b - base);
}

namespace scorecam_host {

// The first thread of the calling thread's warpgroup, for a warpgroup-wide `what`.
inline unsigned full_group0(const char* what) {
    const unsigned group0 = run->current & ~127u;
    if (group0 + 128 > threads_per_block())
        fail(std::string(what) + " in a warpgroup with fewer than 128 threads");
    return group0;
}

// A wgmma reads byte `at` of dynamic shared memory: it must not hold a copy's bytes that the
// copying thread has not fenced to the async proxy (see BlockRun::unfenced).
inline void check_async_visible(size_t at) {
    const unsigned writer = run->unfenced[at >> 4];
    if (writer)
        fail("a wgmma reading shared memory (byte " + std::to_string(at) + ") that thread " +
             std::to_string(writer - 1) +
             " wrote by cp.async with no fence.proxy.async after the copy landed");
}

// Element [row][k] (k < 16) of a K-major, unswizzled FP16 operand named by a wgmma descriptor:
// 8-row groups `sbo` bytes apart, the two 8-wide halves of k `lbo` bytes apart, 16 bytes per row
// of a group (B: row = n; A: row = m).
inline float wgmma_kmajor(unsigned long long desc, unsigned k, unsigned row) {
    const size_t start = (size_t)(desc & 0x3FFFu) << 4;
    const size_t lbo = (size_t)((desc >> 16) & 0x3FFFu) << 4;
    const size_t sbo = (size_t)((desc >> 32) & 0x3FFFu) << 4;
    const size_t at = start + (row >> 3) * sbo + (row & 7u) * 16 + (k >> 3) * lbo + (k & 7u) * 2;
    if (at + 2 > run->dynamic_shared_bytes)
        fail("a wgmma operand reaching past the dynamic shared memory");
    check_async_visible(at);
    unsigned short h;
    memcpy(&h, static_cast<const unsigned char*>(scorecam_dynamic_shared()) + at, 2);
    return scorecam_host_h2f(h);
}

// The value of an FP8 E4M3 code (bias 7, no infinities, 0x7F/0xFF NaN).
inline float e4m3_value(unsigned char b) {
    const float sign = (b & 0x80u) ? -1.0f : 1.0f;
    const unsigned e = (b >> 3) & 0xFu, m = b & 7u;
    if (e == 0xFu && m == 7u) return NAN;
    if (e == 0) return sign * ldexpf((float)m, -9);
    return sign * ldexpf((float)(8u + m), (int)e - 10);
}

// Element [row][k] (k < 32) of a K-major, unswizzled E4M3 operand: as wgmma_kmajor, with 16
// codes of k per 16-byte row of a core matrix.
inline float wgmma_kmajor_e4m3(unsigned long long desc, unsigned k, unsigned row) {
    const size_t start = (size_t)(desc & 0x3FFFu) << 4;
    const size_t lbo = (size_t)((desc >> 16) & 0x3FFFu) << 4;
    const size_t sbo = (size_t)((desc >> 32) & 0x3FFFu) << 4;
    const size_t at = start + (row >> 3) * sbo + (row & 7u) * 16 + (k >> 4) * lbo + (k & 15u);
    if (at + 1 > run->dynamic_shared_bytes)
        fail("a wgmma operand reaching past the dynamic shared memory");
    check_async_visible(at);
    return e4m3_value(static_cast<const unsigned char*>(scorecam_dynamic_shared())[at]);
}

// Hopper's FP8 MMAs keep about 14 significant bits of their running sum (DeepSeek-V3's report
// measured it on H800; CUTLASS's FP8 GEMM promotes its sums to f32 every 4 MMAs). Modeled as
// the sum after each MMA truncated toward zero to 14 bits, so that a kernel that never promotes
// drifts here as on the GPU.
inline float fp8_accumulate(float acc, double dot) {
    float s = (float)((double)acc + dot);
    uint32_t bits;
    memcpy(&bits, &s, 4);
    bits &= ~((1u << 10) - 1u);
    memcpy(&s, &bits, 4);
    return s;
}

// The checks every descriptor of a wgmma must pass here.
inline void check_desc(unsigned long long desc) {
    if (desc >> 46) fail("a wgmma descriptor with a swizzle or base offset (not emulated)");
    if (desc & 0xC000C000ull) fail("a wgmma descriptor with reserved bits set");
}

// Perform the calling thread's wgmma number `i` (every thread of the warpgroup has one at `i`,
// the same descriptors and N in all): its N / 2 accumulators += its rows of A (the A registers
// of the lanes of its warp, as they are now, or the descriptor's rows 16w + g and 16w + g + 8
// for warp w of the group) times B, in f32, in k order.
inline void wgmma_perform(size_t i) {
    const unsigned tid = run->current;
    const unsigned group0 = tid & ~127u, warp0 = tid & ~31u;
    const PendingWgmma& op = run->fibers[tid].wgmmas[i];
    check_desc(op.desc);
    if (!op.a) check_desc(op.a_desc);
    for (unsigned j = group0; j < group0 + 128; ++j) {
        const Fiber& f = run->fibers[j];
        if (f.wait == Wait::Done || f.wgmmas.size() <= i)
            fail("a wgmma that not every thread of the warpgroup issued");
        const PendingWgmma& o = f.wgmmas[i];
        if (o.desc != op.desc || o.n != op.n || o.e4m3 != op.e4m3 ||
            (o.a == nullptr) != (op.a == nullptr) || (!op.a && o.a_desc != op.a_desc))
            fail("a wgmma whose descriptors or shape differ between threads of the warpgroup");
    }
    const unsigned lane = tid & 31u;
    const unsigned g = lane >> 2, t = lane & 3u;
    const unsigned K = op.e4m3 ? 32 : 16;
    const auto element = [&](unsigned long long desc, unsigned k, unsigned row) {
        return op.e4m3 ? wgmma_kmajor_e4m3(desc, k, row) : wgmma_kmajor(desc, k, row);
    };
    float A[2][32];  // rows g and g + 8 of the warp's 16
    if (op.a) {
        float A16[2][16];
        a_rows(A16, g,
               [&](unsigned l, unsigned r) { return run->fibers[warp0 + l].wgmmas[i].a[r]; });
        for (unsigned row = 0; row < 2; ++row)
            for (unsigned k = 0; k < 16; ++k) A[row][k] = A16[row][k];
    } else {
        const unsigned m0 = 16 * ((tid - group0) >> 5) + g;
        for (unsigned row = 0; row < 2; ++row)
            for (unsigned k = 0; k < K; ++k) A[row][k] = element(op.a_desc, k, m0 + 8 * row);
    }
    std::vector<float> d(op.n / 2);
    for (unsigned nt = 0; nt < op.n / 8; ++nt)
        for (unsigned c = 0; c < 2; ++c) {
            const unsigned n = 8 * nt + 2 * t + c;
            float B[32];
            for (unsigned k = 0; k < K; ++k) B[k] = element(op.desc, k, n);
            for (unsigned row = 0; row < 2; ++row) {
                float s = op.d[4 * nt + 2 * row + c];
                if (op.e4m3) {
                    double dot = 0.0;
                    for (unsigned k = 0; k < K; ++k) dot += (double)A[row][k] * B[k];
                    d[4 * nt + 2 * row + c] = fp8_accumulate(s, dot);
                    continue;
                }
                for (unsigned k = 0; k < K; ++k) s += A[row][k] * B[k];
                d[4 * nt + 2 * row + c] = s;
            }
        }
    memcpy(op.d, d.data(), d.size() * sizeof(float));
}

// Perform the calling thread's oldest `count` wgmma operations, the warpgroup in step: all have
// arrived before any reads, all have read before any goes on (and may write its registers).
inline void wgmma_perform_oldest(size_t count) {
    yield(Wait::Group);
    for (size_t i = 0; i < count; ++i) wgmma_perform(i);
    yield(Wait::Group);
    auto& f = run->fibers[run->current];
    f.wgmmas.erase(f.wgmmas.begin(), f.wgmmas.begin() + (ptrdiff_t)count);
    // (At issue, in random schedules, no group end lies past the performed ones: they stay 0.)
    for (auto& e : f.wgmma_group_ends) e = e > count ? e - count : 0;
}

}  // namespace scorecam_host

// common.cuh's warpgroup_sync (PTX bar.sync id, 128): every thread of the calling thread's
// warpgroup waits for the others (the named barrier is taken to be the warpgroup's own).
inline void scorecam_host_warpgroup_sync(int id) {
    using namespace scorecam_host;
    const unsigned group0 = full_group0("warpgroup_sync");
    if (id < 1 || id > 15) fail("warpgroup_sync with a barrier id outside 1..15");
    long& owner = run->named_owner[(size_t)id];
    if (owner == -1) owner = (long)group0;
    if (owner != (long)group0)
        fail("named barrier " + std::to_string(id) + " used by two warpgroups");
    yield(Wait::Named);
}

// common.cuh's wgmma_64x64x16 (PTX wgmma.mma_async.sync.aligned.m64n64k16.f32.f16.f16, A from
// registers): queued on the calling thread with the addresses of its accumulators and A
// registers. In order (schedule 0) it is performed at the wait that covers it, reading the A
// registers as they are then: a kernel that rewrites them, or reads its accumulators, before
// that wait gets other results than in random schedules, where it is performed at its issue.
inline void scorecam_host_wgmma_64x64x16(float* d, const unsigned* a, unsigned long long desc) {
    using namespace scorecam_host;
    full_group0("wgmma_64x64x16");
    auto& f = run->fibers[run->current];
    f.wgmmas.push_back(PendingWgmma{d, a, desc});
    if (run->eager_wgmma) wgmma_perform_oldest(f.wgmmas.size());
}
// common.cuh's wgmma_ss_64xNx16 and wgmma_ss_e4m3_64xNx32 (PTX wgmma.mma_async.sync.aligned
// .m64nNk16.f32.f16.f16 and .m64nNk32.f32.e4m3.e4m3, A and B in shared memory): queued as
// wgmma_64x64x16 is, A named by its descriptor.
inline void scorecam_host_wgmma_ss(float* d, unsigned long long desc_a, unsigned long long desc_b,
                                   unsigned n, bool e4m3 = false) {
    using namespace scorecam_host;
    full_group0("wgmma_ss");
    auto& f = run->fibers[run->current];
    f.wgmmas.push_back(PendingWgmma{d, nullptr, desc_b, desc_a, n, e4m3});
    if (run->eager_wgmma) wgmma_perform_oldest(f.wgmmas.size());
}
inline void scorecam_host_wgmma_commit() {
    using namespace scorecam_host;
    full_group0("wgmma_commit");
    auto& f = run->fibers[run->current];
    f.wgmma_group_ends.push_back(f.wgmmas.size());
}
// Wait until at most `keep` committed groups are pending: perform the others.
inline void scorecam_host_wgmma_wait(size_t keep) {
    using namespace scorecam_host;
    full_group0("wgmma_wait");
    auto& f = run->fibers[run->current];
    size_t count = 0;
    if (f.wgmma_group_ends.size() > keep) {
        const size_t groups = f.wgmma_group_ends.size() - keep;
        count = f.wgmma_group_ends[groups - 1];
        f.wgmma_group_ends.erase(f.wgmma_group_ends.begin(),
                                 f.wgmma_group_ends.begin() + (ptrdiff_t)groups);
    }
    // Every thread steps the same barriers, also with nothing to perform.
    wgmma_perform_oldest(count);
}

namespace scorecam_host {

// Land the calling thread's copy `c`; bytes of dynamic shared memory it writes are marked
// unfenced by it (BlockRun::unfenced).
inline void land_copy(const PendingCopy& c) {
    if (c.valid) memcpy(c.dst, c.src, 16);
    else memset(c.dst, 0, 16);
    const auto* b = static_cast<const unsigned char*>(c.dst);
    const auto* base = static_cast<const unsigned char*>(scorecam_dynamic_shared());
    if (b < base || b >= base + run->dynamic_shared_bytes) return;
    const size_t at = (size_t)(b - base);
    auto& mine = run->fibers[run->current].unfenced;
    for (size_t chunk = at >> 4; chunk <= (at + 15) >> 4 && chunk < run->unfenced.size(); ++chunk) {
        // (Listed once while marked: a kernel that never fences keeps a bounded list.)
        if (run->unfenced[chunk] == run->current + 1) continue;
        run->unfenced[chunk] = run->current + 1;
        mine.push_back(chunk);
    }
}

}  // namespace scorecam_host

// common.cuh's fence_proxy_async (PTX fence.proxy.async.shared::cta): the calling thread's
// landed copies become visible to wgmma. (A copy still in flight is not covered.)
inline void scorecam_host_fence_proxy_async() {
    using namespace scorecam_host;
    auto& mine = run->fibers[run->current].unfenced;
    for (const size_t chunk : mine)
        if (run->unfenced[chunk] == run->current + 1) run->unfenced[chunk] = 0;
    mine.clear();
}

// common.cuh's cp.async helpers. A GPU lands a copy (16 bytes, or 16 zeros when not `valid`)
// at any time between its issue and the wait that covers it; the emulation takes both ends, so
// that results differ between schedules where a kernel relies on either:
//   * in order (schedule 0) a copy is queued on the calling thread and performed only when a
//     wait covers its group: shared memory read before the wait (or, for another thread's
//     copies, before the barrier after it) is stale;
//   * in random schedules it lands when issued: a copy into memory that a slower warp still
//     reads (no barrier between its reads and the issue) changes what that warp reads.
// Copies still queued when a thread ends are dropped.
inline void scorecam_host_cp_async16(void* dst, const void* src, bool valid) {
    using namespace scorecam_host;
    if ((reinterpret_cast<uintptr_t>(dst) | reinterpret_cast<uintptr_t>(src)) & 15u)
        fail("cp_async16 with an address not 16-byte aligned");
    if (valid) {
        const uintptr_t a = reinterpret_cast<uintptr_t>(src);
        bool inside = false;
        for (const auto& b : run->buffers) inside = inside || (a >= b.first && a + 16 <= b.second);
        if (!inside) fail("cp_async16 reading outside every buffer argument");
    }
    if (run->eager_copies) {
        land_copy(PendingCopy{dst, src, valid});
        return;
    }
    run->fibers[run->current].copies.push_back(PendingCopy{dst, src, valid});
}
inline void scorecam_host_cp_async_commit() {
    auto& f = scorecam_host::run->fibers[scorecam_host::run->current];
    f.group_ends.push_back(f.copies.size());
}
// Perform the copies of every committed group but the newest `keep`.
inline void scorecam_host_cp_async_wait(size_t keep) {
    auto& f = scorecam_host::run->fibers[scorecam_host::run->current];
    if (f.group_ends.size() <= keep) return;
    const size_t groups = f.group_ends.size() - keep;
    const size_t done = f.group_ends[groups - 1];
    for (size_t i = 0; i < done; ++i) scorecam_host::land_copy(f.copies[i]);
    f.copies.erase(f.copies.begin(), f.copies.begin() + (ptrdiff_t)done);
    f.group_ends.erase(f.group_ends.begin(), f.group_ends.begin() + (ptrdiff_t)groups);
    for (auto& e : f.group_ends) e -= done;
}

#define SCORECAM_HOST_KERNEL(f) scorecam_host::kernel(#f, &f)

// The kernels, ended by an entry with a null name: the generated unit defines it after the
// kernel sources, as `{SCORECAM_HOST_KERNEL(name), ..., {}}`.
extern const scorecam_host::Kernel scorecam_host_kernels[];

// The launch entry point: runs `name` over grid × block threads with `dynamic_shared` bytes of
// dynamic shared memory; `args` point at the arguments, whose kinds must equal `kinds`.
// `schedule` 0 runs blocks and threads in order, else in random orders drawn from it. 0 on
// success, else 1 with a message in `err` (NUL-terminated, cut at err_len).
extern "C" __attribute__((visibility("default"))) int scorecam_host_launch(
    const char* name, const unsigned* grid, const unsigned* block,
    unsigned long long dynamic_shared, void** args, const unsigned long long* arg_bytes,
    const char* kinds, unsigned long long schedule, char* err, unsigned long long err_len) {
    using namespace scorecam_host;
    auto failed = [&](const std::string& msg) {
        if (err_len) {
            const size_t n = msg.size() < err_len - 1 ? msg.size() : (size_t)err_len - 1;
            memcpy(err, msg.data(), n);
            err[n] = 0;
        }
        return 1;
    };
    // No C++ exception may unwind into the Rust caller.
    try {
        const Kernel* k = scorecam_host_kernels;
        while (k->name && strcmp(k->name, name) != 0) ++k;
        if (!k->name) return failed(std::string("no kernel named `") + name + "`");
        if (strcmp(k->kinds, kinds) != 0)
            return failed(std::string(name) + ": arguments of kinds \"" + kinds +
                          "\" passed, the kernel takes \"" + k->kinds + "\"");
        const unsigned long long threads = (unsigned long long)block[0] * block[1] * block[2];
        if (threads == 0 || threads > 1024)
            return failed(std::string(name) + ": " + std::to_string(threads) +
                          " threads per block (1..=1024)");
        if ((unsigned long long)grid[0] * grid[1] * grid[2] == 0)
            return failed(std::string(name) + ": an empty grid");
        // The most any launch may ask (H100/H200 opt-in); the Rust side checks each kernel's.
        if (dynamic_shared > 232448)
            return failed(std::string(name) + ": " + std::to_string(dynamic_shared) +
                          " bytes of dynamic shared memory (at most 227 KiB per block)");

        BlockRun r;
        r.fibers.resize(threads);
        r.stacks = stack_area.reserve(threads);
        if (!r.stacks) return failed(std::string(name) + ": no memory for the fiber stacks");
        r.exchange.assign(threads, 0);
        r.mma_slots.assign(threads, {});
        r.fn = k->fn;
        r.invoke = k->invoke;
        r.args = args;
        r.eager_wgmma = schedule != 0 && !(schedule & LATE_WGMMA);
        for (size_t i = 0; kinds[i]; ++i)
            if (kinds[i] == 'p') {
                uintptr_t p;
                memcpy(&p, args[i], sizeof p);
                r.buffers.emplace_back(p, p + arg_bytes[i]);
            }
        r.dynamic_shared.assign(dynamic_shared + 2 * SMEM_GUARD, SMEM_CANARY);
        r.dynamic_shared_bytes = dynamic_shared;
        BlockRun* const outer = run;
        run = &r;
        gridDim = dim3{grid[0], grid[1], grid[2]};
        blockDim = dim3{block[0], block[1], block[2]};
        // Blocks in order, or (schedule != 0) in a random order: no kernel may depend on it.
        std::vector<unsigned> blocks((size_t)grid[0] * grid[1] * grid[2]);
        for (size_t i = 0; i < blocks.size(); ++i) blocks[i] = (unsigned)i;
        if (schedule) shuffle_order(blocks, schedule);
        bool ok = true;
        for (size_t i = 0; ok && i < blocks.size(); ++i) {
            const unsigned b = blocks[i];
            blockIdx = uint3{b % grid[0], (b / grid[0]) % grid[1], b / (grid[0] * grid[1])};
            ok = run_block(r, schedule);
        }
        run = outer;
        return ok ? 0 : failed(std::string(name) + ": " + r.error);
    } catch (const std::exception& e) {
        return failed(std::string(name) + ": " + e.what());
    } catch (...) {
        return failed(std::string(name) + ": an exception");
    }
}

#endif  // SCORECAM_CUDA_HOST_HPP
