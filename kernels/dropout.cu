// dropout.cu: inverted dropout with a counter-based random stream (ops/dropout.py's Dropout forward).
//
// For element i of x (n elements) and a 64-bit seed (the sum, modulo 2⁶⁴, of the host's seed argument and
// the value at seed_base in device memory: a captured training step rewrites that value between replays,
// a launch with a host seed points it at a zero):
//     u_i  = the top 32 bits of splitmix64(seed + (i + 1) · 0x9E3779B97F4A7C15), uniform on [0, 2³²)
//     m_i  = (u_i ≥ threshold) · scale       with threshold = ⌊p · 2³²⌋, scale = 1 / (1 − p)
//     y_i  = x_i · m_i
// Stateless: no generator to create or advance (CuPy's default_rng builds and seeds 100 k cuRAND states
// per call), and the same (seed, i) always gives the same mask. It matches the NumPy path's
// distribution and scaling, not its bits: NumPy draws from its own generator, so the tests compare
// statistics (drop rate, survivors = x / (1 − p), y = x · m) rather than masks.
//
// Shapes:  x, y, mask: n contiguous elements of T (float / bf16 / fp16); the mask holds m_i (0 or scale)
//          in T, what the op saves for its backward (dx = dy · m).
// Launch:  1-D grid-stride over 16-byte packs of P elements (blockDim 256, grid ≤ 32 · SMs) when the three
//          pointers are 16-byte aligned, the tail and unaligned arrays one element at a time.
#include "common.cuh"

__device__ __forceinline__ unsigned int uniform_bits(unsigned long long seed, int64 i) {
    unsigned long long z = seed + (unsigned long long)(i + 1) * 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    z ^= z >> 31;
    return (unsigned int)(z >> 32);
}

template <typename T>
__device__ __forceinline__ void dropout_forward(const T* x, T* y, T* mask, int64 n, unsigned long long seed,
                                                unsigned int threshold, float scale) {
    constexpr int P = Pack<T>::size;
    const int64 stride = (int64)gridDim.x * blockDim.x;
    const int64 first = (int64)blockIdx.x * blockDim.x + threadIdx.x;
    int64 done = 0;
    if (((reinterpret_cast<unsigned long long>(x) | reinterpret_cast<unsigned long long>(y) |
          reinterpret_cast<unsigned long long>(mask)) & 15) == 0) {
        const int64 packs = n / P;
        for (int64 k = first; k < packs; k += stride) {
            float v[P], m[P];
            load_pack<T, true>(x + k * P, v);
#pragma unroll
            for (int j = 0; j < P; ++j) {
                m[j] = uniform_bits(seed, k * P + j) >= threshold ? scale : 0.0f;
                v[j] *= m[j];
            }
            store_pack<T>(y + k * P, v);
            store_pack<T>(mask + k * P, m);
        }
        done = packs * P;
    }
    for (int64 i = done + first; i < n; i += stride) {
        const float m = uniform_bits(seed, i) >= threshold ? scale : 0.0f;
        y[i] = from_float<T>(to_float(x[i]) * m);
        mask[i] = from_float<T>(m);
    }
}

#define DROPOUT_KERNEL(T, SUFFIX)                                                                         \
    extern "C" __global__ void dropout_forward_##SUFFIX(const T* x, T* y, T* mask, int64 n,              \
                                                       const unsigned long long* seed_base,              \
                                                       unsigned long long seed, unsigned int threshold,  \
                                                       float scale) {                                    \
        dropout_forward<T>(x, y, mask, n, *seed_base + seed, threshold, scale);                          \
    }

DROPOUT_KERNEL(float, f32)
DROPOUT_KERNEL(__nv_bfloat16, bf16)
DROPOUT_KERNEL(__half, f16)
