// attention_decode.cu: one decoding step's attention over a batched KV cache (ops/attention.py's
// `_cached_forward` with one new position per row; `_attend_decode` is the NumPy path it must match).
//
// Batch row b is the sequence kept in cache row slots[b]; its new position is starts[b], already written
// into the stores, so it attends to keys 0 … starts[b] (length L_b = starts[b] + 1) of that row:
//     s_j = q · k_j / √D          (q of query head h, k_j of its kv head h / (H / Hkv))
//     o   = Σ_j softmax(s)_j v_j
// Everything the step varies (which cache rows, how long each is) is read from device memory, so the
// launch itself is the same at every step and can be replayed from a CUDA graph.
//
// Shapes:  q: (B, H, D) float32 with strides q_stride_b, q_stride_h (elements) and a contiguous last
//          axis; k_store, v_store: (S, Hkv, max_len, D) float32, C-contiguous; slots, starts: (B,) int64;
//          out: (B, H·D) float32, C-contiguous. D a multiple of 4, at most 2 · THREADS.
// Launch:  grid (H, B), THREADS threads, shared memory (D + THREADS + 32) floats. Keys go in chunks of
//          THREADS: thread t scores key c0 + t (a whole-row dot product in 16-byte loads), the block
//          folds the chunk into a running max m and sum l (online softmax), then the threads, as
//          THREADS / D groups of D lanes (lane = one output element), accumulate p_j · v_j over the chunk's
//          keys, each group a share of them. The groups' sums are added at the end and divided by l.
#include "common.cuh"

#define THREADS 128

extern "C" __global__ void __launch_bounds__(THREADS)
decode_attention_f32(const float* q, const float* k_store, const float* v_store, const int64* slots,
                     const int64* starts, float* out, int heads, int kv_heads, int max_len, int head_dim,
                     int64 q_stride_b, int64 q_stride_h, float scale) {
    extern __shared__ float shared[];
    float* q_row = shared;                          // (D,) the scaled query
    float* p = shared + head_dim;                   // (THREADS,) this chunk's probabilities (unnormalised)
    float* scratch = p + THREADS;                   // (32,) block reductions; reused for the group sums
    const int h = blockIdx.x, b = blockIdx.y, t = threadIdx.x;
    const int group = heads / kv_heads;
    const int64 slot = slots[b];
    const int length = (int)starts[b] + 1;
    const int64 row_offset = ((slot * kv_heads + h / group) * (int64)max_len) * head_dim;
    const float* keys = k_store + row_offset;
    const float* values = v_store + row_offset;

    for (int d = t; d < head_dim; d += THREADS) q_row[d] = q[b * q_stride_b + h * q_stride_h + d] * scale;
    __syncthreads();

    // The P·V work: `groups` groups of head_dim lanes when D <= THREADS (a group per share of the keys),
    // else one group whose threads hold two output elements each (lanes t and t + THREADS).
    const int groups = head_dim <= THREADS ? THREADS / head_dim : 1;
    const int lane = head_dim <= THREADS ? t % head_dim : t;
    const int member = head_dim <= THREADS ? t / head_dim : 0;
    const bool active = member < groups && lane < head_dim;
    const bool second = head_dim > THREADS && lane + THREADS < head_dim;
    float acc0 = 0.0f, acc1 = 0.0f;
    float m = NEGATIVE_INFINITY, l = 0.0f;

    for (int c0 = 0; c0 < length; c0 += THREADS) {
        const int j = c0 + t;
        float s = NEGATIVE_INFINITY;
        if (j < length) {
            const float* key = keys + (int64)j * head_dim;
            float dot = 0.0f;
            for (int d = 0; d < head_dim; d += 4) {
                const float4 k4 = __ldg(reinterpret_cast<const float4*>(key + d));
                dot += k4.x * q_row[d] + k4.y * q_row[d + 1] + k4.z * q_row[d + 2] + k4.w * q_row[d + 3];
            }
            s = dot;
        }
        const float m_new = fmaxf(m, block_max(s, scratch));          // finite: key c0 is always valid
        const float e = j < length ? expf(s - m_new) : 0.0f;
        p[t] = e;
        const float chunk_sum = block_sum(e, scratch);                 // its barriers also publish p
        const float correction = expf(m - m_new);                      // 0 on the first chunk
        l = l * correction + chunk_sum;
        m = m_new;
        acc0 *= correction;
        acc1 *= correction;
        const int count = min(THREADS, length - c0);
        if (active) {
            for (int jj = member; jj < count; jj += groups) {
                const float* value = values + (int64)(c0 + jj) * head_dim;
                acc0 += p[jj] * value[lane];
                if (second) acc1 += p[jj] * value[lane + THREADS];
            }
        }
        __syncthreads();                                               // p is rewritten by the next chunk
    }

    // Add the groups' partial sums (each group saw every chunk, a share of its keys): through shared memory.
    float* sums = shared + head_dim;                                   // reuse p and scratch: THREADS floats
    if (active) sums[member * head_dim + lane] = acc0;
    __syncthreads();
    if (member == 0 && lane < head_dim) {
        float total = 0.0f;
        for (int g = 0; g < groups; ++g) total += sums[g * head_dim + lane];
        float* o = out + (int64)b * heads * head_dim + (int64)h * head_dim;
        o[lane] = total / l;
        if (second) o[lane + THREADS] = acc1 / l;
    }
}
