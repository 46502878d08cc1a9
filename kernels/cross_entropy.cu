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
// Launch:  block (256..1024,) threads; one block per row, or with the persistent variants a grid of
//          ~SMs × blocks-per-SM that strides over the rows. Variants (kernel names <kind>_<t>):
//   cross_entropy_l2u<U>:   pass 1 streams the row from HBM keeping a per-thread online (max, sum), U
//                           16-byte loads in flight per thread; block reductions give lse; pass 2 reads the
//                           row again (an L2 hit: the rows in flight, ~132 × 200 KB, fit in L2) and writes
//                           dlogits with streaming stores.
//   cross_entropy_l2pu4:    persistent; during pass 2 of a row the block prefetches its next row into L2,
//                           so HBM reads of the next row overlap this row's writes.
//   cross_entropy_smemu<U>: pass 1 also copies the row to dynamic shared memory (V · sizeof(T) bytes,
//                           ≤ the opt-in limit), so pass 2 never reads global memory.
//   vectorised = 1 when V is a multiple of the 16-byte pack and both buffers are 16-byte aligned.
#include "common.cuh"

template <typename T, bool CACHE_ROW, int CE_UNROLL>
__device__ __forceinline__ void cross_entropy_row(const T* logits, const int64* targets, T* dlogits,
                                                  float* row_loss, const float* keep_count, int64 vocab,
                                                  int64 ignore_index, int vectorised, int64 row,
                                                  const T* prefetch_row) {
    constexpr int P = Pack<T>::size;
    extern __shared__ __align__(16) unsigned char row_cache_bytes[];
    T* row_cache = reinterpret_cast<T*>(row_cache_bytes);
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
                if (CACHE_ROW) *reinterpret_cast<uint4*>(row_cache + pack * P) = raw[u];
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
            const T raw = x[i];
            if (CACHE_ROW) row_cache[i] = raw;
            const float a = to_float(raw);
            if (a > thread_max) {
                thread_sum *= exp2f((thread_max - a) * LOG2E);
                thread_max = a;
            }
            if (thread_max != NEGATIVE_INFINITY) thread_sum += exp2f((a - thread_max) * LOG2E);
        }
    }
    const float row_max = block_max(thread_max, scratch);
    const float scaled = thread_max == NEGATIVE_INFINITY ? 0.0f : thread_sum * exp2f((thread_max - row_max) * LOG2E);
    const float row_sum = block_sum(scaled, scratch);     // its barriers also publish row_cache
    const float lse = row_max + logf(row_sum);

    const float count = fmaxf(*keep_count, 1.0f);
    const float scale = keep ? 1.0f / count : 0.0f;
    if (threadIdx.x == 0) row_loss[row] = keep ? lse - target_logit : 0.0f;

    // the block's next row starts its way from HBM into L2 while this row is written
    if (prefetch_row != nullptr) {
        const char* bytes = reinterpret_cast<const char*>(prefetch_row);
        for (int64 offset = (int64)threadIdx.x * 128; offset < vocab * (int64)sizeof(T); offset += (int64)blockDim.x * 128)
            asm volatile("prefetch.global.L2 [%0];" ::"l"(bytes + offset));
    }

    // pass 2: dlogits = (softmax − onehot) · scale
    const float lse2 = lse * LOG2E;
    if (vectorised) {
        const int64 packs = vocab / P;
        for (int64 base = threadIdx.x; base < packs; base += (int64)blockDim.x * CE_UNROLL) {
            uint4 raw[CE_UNROLL];
#pragma unroll
            for (int u = 0; u < CE_UNROLL; ++u) {
                const int64 pack = base + (int64)u * blockDim.x;
                if (pack < packs)
                    raw[u] = CACHE_ROW ? *reinterpret_cast<const uint4*>(row_cache + pack * P)
                                       : load_raw<true>(x + pack * P);      // last use: evict first
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
            const float a = to_float(CACHE_ROW ? row_cache[i] : x[i]);
            float d = exp2f((a - row_max) * LOG2E) / row_sum * scale;
            if (i == target) d -= scale;
            dx[i] = from_float<T>(d);
        }
    }
}

template <typename T, bool CACHE_ROW, int UNROLL, bool PERSISTENT>
__device__ __forceinline__ void cross_entropy_rows(const T* logits, const int64* targets, T* dlogits,
                                                   float* row_loss, const float* keep_count, int64 rows,
                                                   int64 vocab, int64 ignore_index, int vectorised) {
    if constexpr (!PERSISTENT) {
        cross_entropy_row<T, CACHE_ROW, UNROLL>(logits, targets, dlogits, row_loss, keep_count, vocab,
                                                ignore_index, vectorised, blockIdx.x, nullptr);
    } else {
        for (int64 row = blockIdx.x; row < rows; row += gridDim.x) {
            const int64 next = row + gridDim.x;
            cross_entropy_row<T, CACHE_ROW, UNROLL>(logits, targets, dlogits, row_loss, keep_count, vocab,
                                                    ignore_index, vectorised, row,
                                                    next < rows ? logits + next * vocab : nullptr);
        }
    }
}

#define CROSS_ENTROPY_KERNEL(T, SUFFIX, KIND, CACHE_ROW, UNROLL, PERSISTENT)                              \
    extern "C" __global__ void __launch_bounds__(1024)                                                    \
    cross_entropy_##KIND##_##SUFFIX(const T* logits, const int64* targets, T* dlogits, float* row_loss,   \
                                    const float* keep_count, int64 rows, int64 vocab, int64 ignore_index, \
                                    int vectorised) {                                                     \
        cross_entropy_rows<T, CACHE_ROW, UNROLL, PERSISTENT>(logits, targets, dlogits, row_loss,          \
                                                             keep_count, rows, vocab, ignore_index,       \
                                                             vectorised);                                 \
    }

#define CROSS_ENTROPY_KERNELS(T, SUFFIX)                                                                  \
    CROSS_ENTROPY_KERNEL(T, SUFFIX, l2u4, false, 4, false)                                                \
    CROSS_ENTROPY_KERNEL(T, SUFFIX, l2u8, false, 8, false)                                                \
    CROSS_ENTROPY_KERNEL(T, SUFFIX, l2pu4, false, 4, true)                                                 \
    CROSS_ENTROPY_KERNEL(T, SUFFIX, smemu4, true, 4, false)                                               \
    CROSS_ENTROPY_KERNEL(T, SUFFIX, smemu8, true, 8, false)

CROSS_ENTROPY_KERNELS(float, f32)
CROSS_ENTROPY_KERNELS(__nv_bfloat16, bf16)
CROSS_ENTROPY_KERNELS(__half, f16)
