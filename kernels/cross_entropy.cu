// cross_entropy.cu: fused cross-entropy forward and backward, one pass of work per row.
//
// Computes, for logits x (N, V) and integer targets t (N,), with K = number of rows whose target is not
// ignore_index (read from the device scalar keep_count, so the host never waits):
//     m = max_v x[n, v];  lse = m + log Σ_v exp(x[n, v] − m)
//     row_loss[n] = lse − x[n, t[n]]                      (0 for an ignored row)
//     dlogits[n, v] = (exp(x[n, v] − lse) − [v == t[n]]) / max(K, 1)   (a zero row for an ignored row)
// The caller forms loss = Σ_n row_loss[n] / K. This is ops/loss.py's CrossEntropy forward (which already
// produces the finished gradient) and must match its NumPy path.
//
// Shapes:  logits, dlogits: (N, V) row-major, float / bf16 / fp16 (the math is float32 throughout);
//          targets: (N,) int64; row_loss: (N,) float32; keep_count: one float32.
//          dlogits may be the logits buffer itself (in place): each element is read before it is written,
//          by the same thread.
// Launch:  block (THREADS,) with THREADS ≤ 1024 (1024 for float32, 512 for bf16/fp16: the fastest on an
//          H200, benchmarks/RESULTS.md), one block per row. Pass 1 streams the row from HBM keeping a
//          per-thread online (max, sum), 8 16-byte loads in flight per thread; block reductions give lse;
//          pass 2 reads the row again (an L2 hit: the rows in flight fit in L2) and writes dlogits with
//          streaming stores. Kernel names cross_entropy_<f32|bf16|f16>.
//          vectorised = 1 when V is a multiple of the 16-byte pack and both buffers are 16-byte aligned.
#include "common.cuh"

constexpr int CE_UNROLL = 8;    // 16-byte loads in flight per thread

template <typename T>
__device__ __forceinline__ void cross_entropy_row(const T* logits, const int64* targets, T* dlogits,
                                                  float* row_loss, const float* keep_count, int64 vocab,
                                                  int64 ignore_index, int vectorised, int64 row) {
    constexpr int P = Pack<T>::size;
    __shared__ float scratch[32];

    const T* x = logits + row * vocab;
    T* dx = dlogits + row * vocab;
    const int64 target = targets[row];
    const bool keep = target != ignore_index;
    const bool target_in_row = keep && target >= 0 && target < vocab;
    // read x[target] before any thread writes (in-place): the reductions below hold barriers
    const float target_logit = target_in_row ? to_float(x[target]) : 0.0f;

    // pass 1: per-thread online max and sum of exp, in base 2: exp(a − m) = 2^((a − m)·log2 e)
    float thread_max = NEGATIVE_INFINITY, thread_sum = 0.0f;
    if (vectorised) {
        const int64 packs = vocab / P;
        for (int64 base = threadIdx.x; base < packs; base += (int64)blockDim.x * CE_UNROLL) {
            uint4 raw[CE_UNROLL];
#pragma unroll
            for (int u = 0; u < CE_UNROLL; ++u) {           // all loads issued before any use
                const int64 pack = base + (int64)u * blockDim.x;
                if (pack < packs) raw[u] = load_raw(x + pack * P);
            }
#pragma unroll
            for (int u = 0; u < CE_UNROLL; ++u) {
                const int64 pack = base + (int64)u * blockDim.x;
                if (pack >= packs) break;
                float v[P];
                unpack<T>(raw[u], v);
                float local_max = v[0];
#pragma unroll
                for (int k = 1; k < P; ++k) local_max = fmaxf(local_max, v[k]);
                if (local_max > thread_max) {
                    thread_sum *= exp2f((thread_max - local_max) * LOG2E);   // 0 when thread_max = −inf
                    thread_max = local_max;
                }
                if (thread_max != NEGATIVE_INFINITY) {
                    const float shift = thread_max * LOG2E;
#pragma unroll
                    for (int k = 0; k < P; ++k) thread_sum += exp2f(fmaf(v[k], LOG2E, -shift));
                }
            }
        }
    } else {
        for (int64 i = threadIdx.x; i < vocab; i += blockDim.x) {
            const float a = to_float(x[i]);
            if (a > thread_max) {
                thread_sum *= exp2f((thread_max - a) * LOG2E);
                thread_max = a;
            }
            if (thread_max != NEGATIVE_INFINITY) thread_sum += exp2f((a - thread_max) * LOG2E);
        }
    }
    const float row_max = block_max(thread_max, scratch);
    const float scaled = thread_max == NEGATIVE_INFINITY ? 0.0f : thread_sum * exp2f((thread_max - row_max) * LOG2E);
    const float row_sum = block_sum(scaled, scratch);
    const float lse = row_max + logf(row_sum);

    const float count = fmaxf(*keep_count, 1.0f);
    const float scale = keep ? 1.0f / count : 0.0f;
    if (threadIdx.x == 0) row_loss[row] = keep ? lse - target_logit : 0.0f;

    // pass 2: dlogits = (softmax − onehot) · scale
    const float lse2 = lse * LOG2E;
    if (vectorised) {
        const int64 packs = vocab / P;
        for (int64 base = threadIdx.x; base < packs; base += (int64)blockDim.x * CE_UNROLL) {
            uint4 raw[CE_UNROLL];
#pragma unroll
            for (int u = 0; u < CE_UNROLL; ++u) {
                const int64 pack = base + (int64)u * blockDim.x;
                if (pack < packs) raw[u] = load_raw<true>(x + pack * P);      // last use: evict first
            }
#pragma unroll
            for (int u = 0; u < CE_UNROLL; ++u) {
                const int64 pack = base + (int64)u * blockDim.x;
                if (pack < packs) {
                    float v[P], d[P];
                    unpack<T>(raw[u], v);
#pragma unroll
                    for (int k = 0; k < P; ++k) {
                        d[k] = exp2f(fmaf(v[k], LOG2E, -lse2)) * scale;
                        if (pack * P + k == target) d[k] -= scale;
                    }
                    store_pack<T, true>(dx + pack * P, d);
                }
            }
        }
    } else {
        for (int64 i = threadIdx.x; i < vocab; i += blockDim.x) {
            const float a = to_float(x[i]);
            float d = exp2f((a - row_max) * LOG2E) / row_sum * scale;
            if (i == target) d -= scale;
            dx[i] = from_float<T>(d);
        }
    }
}

#define CROSS_ENTROPY_KERNEL(T, SUFFIX)                                                                   \
    extern "C" __global__ void __launch_bounds__(1024)                                                    \
    cross_entropy_##SUFFIX(const T* logits, const int64* targets, T* dlogits, float* row_loss,            \
                           const float* keep_count, int64 rows, int64 vocab, int64 ignore_index,          \
                           int vectorised) {                                                              \
        cross_entropy_row<T>(logits, targets, dlogits, row_loss, keep_count, vocab, ignore_index,         \
                             vectorised, blockIdx.x);                                                     \
    }

CROSS_ENTROPY_KERNEL(float, f32)
CROSS_ENTROPY_KERNEL(__nv_bfloat16, bf16)
CROSS_ENTROPY_KERNEL(__half, f16)

// count_kept: keep_count[0] = the number of targets that are not ignore_index, as a float (exact below
// 2^24 rows). Launch: grid (1,), blockDim 1024.
extern "C" __global__ void __launch_bounds__(1024)
count_kept(const int64* targets, int64 rows, int64 ignore_index, float* keep_count) {
    __shared__ float scratch[32];
    float count = 0.0f;
    for (int64 n = threadIdx.x; n < rows; n += blockDim.x) count += targets[n] != ignore_index ? 1.0f : 0.0f;
    count = block_sum(count, scratch);
    if (threadIdx.x == 0) keep_count[0] = count;
}

// mean_loss: loss[0] = Σ_n row_loss[n] / keep_count[0] in float32 whatever the logits' type (NaN when
// every row is ignored: 0 / 0). Launch: grid (1,), blockDim 1024.
extern "C" __global__ void __launch_bounds__(1024)
mean_loss(const float* row_loss, int64 rows, const float* keep_count, float* loss) {
    __shared__ float scratch[32];
    float sum = 0.0f;
    for (int64 n = threadIdx.x; n < rows; n += blockDim.x) sum += row_loss[n];
    sum = block_sum(sum, scratch);
    if (threadIdx.x == 0) loss[0] = sum / keep_count[0];
}
