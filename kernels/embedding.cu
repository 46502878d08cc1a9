// embedding.cu: the embedding table's gradient (ops/embedding.py's Embedding backward).
//
// Computes dW[v, c] += dy[n, c] for every position n with ids[n] == v, by float32 atomic adds into a
// zeroed accumulator, so repeated ids accumulate (the NumPy path's `add.at`; plain `dW[ids] += dy`
// would keep one repeat); it must match that NumPy path. The order of the additions varies between
// runs: the result is exact up to float32 rounding, not bit-for-bit reproducible. Ids outside [0, V)
// are skipped (the op rejects them in its forward).
//
// Shapes:  ids: (N,) int64; dy: (N, C) row-major in T (float / bf16 / fp16); dW: (V, C) float32, zeroed
//          by the caller, which casts it to dy's dtype afterwards.
// Launch:  grid (min(N, 32 · SMs),), blockDim 256: block b handles rows b, b + gridDim.x, ...; the
//          threads of a block stride over the C channels of a row (coalesced reads and atomics).
#include "common.cuh"

template <typename T>
__device__ __forceinline__ void embedding_backward(const int64* ids, const T* dy, float* dweight, int64 rows,
                                                   int64 channels, int64 vocab) {
    for (int64 n = blockIdx.x; n < rows; n += gridDim.x) {
        const int64 id = ids[n];
        if (id < 0 || id >= vocab) continue;
        const T* source = dy + n * channels;
        float* target = dweight + id * channels;
        for (int64 c = threadIdx.x; c < channels; c += blockDim.x) atomicAdd(target + c, to_float(source[c]));
    }
}

#define EMBEDDING_KERNEL(T, SUFFIX)                                                                      \
    extern "C" __global__ void embedding_backward_##SUFFIX(const int64* ids, const T* dy, float* dweight, \
                                                          int64 rows, int64 channels, int64 vocab) {     \
        embedding_backward<T>(ids, dy, dweight, rows, channels, vocab);                                  \
    }

EMBEDDING_KERNEL(float, f32)
EMBEDDING_KERNEL(__nv_bfloat16, bf16)
EMBEDDING_KERNEL(__half, f16)
