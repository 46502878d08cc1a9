// swiglu.cu: the SwiGLU gate of the Llama MLP, forward and backward (ops/activation.py's SwiGLU, and the
// packed form of model.py's PackedSwiGLU, where gate and up are the two halves of one projection).
//
// Forward:  s = σ(g) = 1 / (1 + e^−g);  y = g · s · u
// Backward: dup = dy · g · s;  dgate = dy · u · s · (1 + g · (1 − s))
// Must match the NumPy path of SwiGLU (which writes σ as ½(1 + tanh(g/2)), the same function).
//
// Shapes:  rows × width matrices, each with its own row stride (in elements), last axis contiguous:
//            gate, up: row stride in_stride (width for separate arrays, 2·width for the packed
//                      gate_up (N, 2F) with up = gate + F);
//            y, dy: row stride out_stride;  dgate, dup: row stride grad_stride (2·width when packed).
//          All of one dtype T (float / bf16 / fp16); math in float32.
// Launch:  1-D grid-stride over work items (blockDim 256, grid ≤ 32 · SMs). With vectorised = 1 (width
//          and every stride multiples of the 16-byte pack P, every pointer 16-byte aligned) an item is P
//          consecutive elements of a row, else one element.
#include "common.cuh"

__device__ __forceinline__ float sigmoid(float g) { return 1.0f / (1.0f + expf(-g)); }

template <typename T, int P>
__device__ __forceinline__ void swiglu_forward_items(const T* gate, const T* up, T* y, int64 rows, int64 width,
                                                     int64 in_stride, int64 out_stride) {
    const int64 groups = width / P, work = rows * groups;
    for (int64 item = (int64)blockIdx.x * blockDim.x + threadIdx.x; item < work;
         item += (int64)gridDim.x * blockDim.x) {
        const int64 row = item / groups, col = (item - row * groups) * P;
        const int64 in = row * in_stride + col, out = row * out_stride + col;
        float g[P], u[P];
        if constexpr (P > 1) {
            load_pack<T>(gate + in, g);
            load_pack<T>(up + in, u);
        } else {
            g[0] = to_float(gate[in]);
            u[0] = to_float(up[in]);
        }
#pragma unroll
        for (int k = 0; k < P; ++k) g[k] = g[k] * sigmoid(g[k]) * u[k];
        if constexpr (P > 1) store_pack<T>(y + out, g);
        else y[out] = from_float<T>(g[0]);
    }
}

template <typename T, int P>
__device__ __forceinline__ void swiglu_backward_items(const T* dy, const T* gate, const T* up, T* dgate, T* dup,
                                                      int64 rows, int64 width, int64 in_stride,
                                                      int64 out_stride, int64 grad_stride) {
    const int64 groups = width / P, work = rows * groups;
    for (int64 item = (int64)blockIdx.x * blockDim.x + threadIdx.x; item < work;
         item += (int64)gridDim.x * blockDim.x) {
        const int64 row = item / groups, col = (item - row * groups) * P;
        const int64 in = row * in_stride + col, out = row * out_stride + col, grad = row * grad_stride + col;
        float d[P], g[P], u[P], dg[P], du[P];
        if constexpr (P > 1) {
            load_pack<T>(dy + out, d);
            load_pack<T>(gate + in, g);
            load_pack<T>(up + in, u);
        } else {
            d[0] = to_float(dy[out]);
            g[0] = to_float(gate[in]);
            u[0] = to_float(up[in]);
        }
#pragma unroll
        for (int k = 0; k < P; ++k) {
            const float s = sigmoid(g[k]);
            du[k] = d[k] * g[k] * s;                              // forward was y = silu(g)·u
            dg[k] = d[k] * u[k] * s * (1.0f + g[k] * (1.0f - s)); // silu'(g) = σ(g)(1 + g(1 − σ(g)))
        }
        if constexpr (P > 1) {
            store_pack<T>(dgate + grad, dg);
            store_pack<T>(dup + grad, du);
        } else {
            dgate[grad] = from_float<T>(dg[0]);
            dup[grad] = from_float<T>(du[0]);
        }
    }
}

#define SWIGLU_KERNELS(T, SUFFIX)                                                                          \
    extern "C" __global__ void swiglu_forward_##SUFFIX(const T* gate, const T* up, T* y, int64 rows,       \
                                                      int64 width, int64 in_stride, int64 out_stride,      \
                                                      int vectorised) {                                    \
        if (vectorised) swiglu_forward_items<T, Pack<T>::size>(gate, up, y, rows, width, in_stride, out_stride); \
        else swiglu_forward_items<T, 1>(gate, up, y, rows, width, in_stride, out_stride);                  \
    }                                                                                                       \
    extern "C" __global__ void swiglu_backward_##SUFFIX(const T* dy, const T* gate, const T* up, T* dgate,  \
                                                       T* dup, int64 rows, int64 width, int64 in_stride,   \
                                                       int64 out_stride, int64 grad_stride, int vectorised) { \
        if (vectorised)                                                                                     \
            swiglu_backward_items<T, Pack<T>::size>(dy, gate, up, dgate, dup, rows, width, in_stride,       \
                                                    out_stride, grad_stride);                               \
        else                                                                                                \
            swiglu_backward_items<T, 1>(dy, gate, up, dgate, dup, rows, width, in_stride, out_stride,       \
                                        grad_stride);                                                       \
    }

SWIGLU_KERNELS(float, f32)
SWIGLU_KERNELS(__nv_bfloat16, bf16)
SWIGLU_KERNELS(__half, f16)
