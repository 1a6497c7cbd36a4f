// Batched scoring of masked-input logits: one block per row (grid-strided over rows). With
// `probability`: a max-subtracted f32 softmax over the C classes (block-wide max, then block-wide
// Σ exp(x − max)), and out[r, j] = exp(logit[target] − max) / Σ for each of the row's t targets;
// else the raw logit. Accurate expf (no fast math). A target ≥ C gives NaN (the host validated
// the targets before uploading them; this only keeps the kernel in bounds).
#include "common.cuh"

extern "C" __global__ void scores(const float* __restrict__ logits, const u32* __restrict__ targets,
                                  int b, int c, int t, int probability, float* __restrict__ out) {
    const float nan = __int_as_float(0x7fffffff);
    for (int r = blockIdx.x; r < b; r += gridDim.x) {  // block-uniform loop
        const float* row = logits + (i64)r * c;
        float mx = 0.0f, sum = 1.0f;
        if (probability) {
            float m = -f32_inf();
            for (int i = threadIdx.x; i < c; i += blockDim.x) m = fmaxf(m, row[i]);
            mx = block_max(m);
            float acc = 0.0f;
            for (int i = threadIdx.x; i < c; i += blockDim.x) acc += expf(row[i] - mx);
            sum = block_sum(acc);
        }
        for (int j = threadIdx.x; j < t; j += blockDim.x) {
            const u32 tg = targets[(i64)r * t + j];
            float v = nan;
            if (tg < (u32)c) v = probability ? expf(row[tg] - mx) / sum : row[tg];
            out[(i64)r * t + j] = v;
        }
    }
}
