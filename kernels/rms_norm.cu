// rms_norm.cu: RMSNorm forward and backward over the last axis (ops/norm.py's RMSNorm).
//
// Forward:  r[n] = 1 / sqrt(mean_c x[n, c]² + eps);  y[n, c] = (x[n, c] · r[n]) · w[c]
// Backward: x̂ = x · r;  g = dy · w
//           dx[n, c] = r[n] · (g[n, c] − x̂[n, c] · mean_c(g · x̂)[n])
//           partial[b, c] = Σ over the rows of block b of dy[n, c] · x̂[n, c]   (dw = Σ_b partial[b, c],
//                           summed in a fixed order by rms_norm_backward_dw, so dw is deterministic)
//           With `pending` (not null): dx = pending + the above, in one pass (the gradient the rest of a
//           residual stream has already sent to x, which the autograd would otherwise add after);
//           with `low` (not null): dx also written in dy's dtype D (what the residual add hands its
//           16-bit branch).
// rms_norm_backward_dw_<w>: dw[c] = Σ_b partial[b, c], b in order, one thread a column, written in W.
// Must match the NumPy path of RMSNorm (rms_norm_reference is the composed oracle).
//
// Residual form (ops/norm.py's ResidualAdd feeding RMSNorm, one pass over the rows):
//   s[n, c] = x[n, c] + b[n, c]  (b, the branch, rounded to x's dtype first, as a cast then an add would)
//   then the forward above on s, y written in its own dtype Y (the residual's, or the branch's low dtype
//   that the next Linear reads). The backward may take dy in a dtype D other than x's.
//
// Shapes:  x, y, dy, dx: (N, C) row-major in X = float / bf16 / fp16; w: (C,) in W = X or float;
//          r: (N,) float32 (the op's (..., 1)); partial: (gridDim.x, C) float32. y and dx are in X.
// Launch:  one warp per row, WARPS warps per block (blockDim.x = 32 · WARPS).
//          forward:  grid (ceil(N / WARPS),).
//          backward: grid (min(ceil(N / WARPS), 4 · SMs),), rows visited grid-stride; dynamic shared
//                    memory WARPS · C floats (each warp accumulates its own dw row, no atomics).
//          The forward reads and writes 16-byte packs when C is a multiple of the pack and the base
//          pointers are 16-byte aligned (rows are then aligned too); the backward and the residual form
//          take 8 elements at a time when C is a multiple of 8 and the pointers are 16-byte aligned;
//          scalar otherwise.
#include "common.cuh"
#include "select.cuh"

// 8 consecutive elements as floats / from floats: one 16-byte access for 16-bit types, two for float.
// p must be 16-byte aligned.
template <typename T>
__device__ __forceinline__ void load8(const T* p, float (&v)[8]) {
    constexpr int P = Pack<T>::size;
#pragma unroll
    for (int part = 0; part < 8 / P; ++part) {
        float chunk[P];
        load_pack<T>(p + part * P, chunk);
#pragma unroll
        for (int k = 0; k < P; ++k) v[part * P + k] = chunk[k];
    }
}

template <typename T>
__device__ __forceinline__ void store8(T* p, const float (&v)[8]) {
    constexpr int P = Pack<T>::size;
#pragma unroll
    for (int part = 0; part < 8 / P; ++part) {
        float chunk[P];
#pragma unroll
        for (int k = 0; k < P; ++k) chunk[k] = v[part * P + k];
        store_pack<T>(p + part * P, chunk);
    }
}

__device__ __forceinline__ bool aligned16(const void* a, const void* b, const void* c, const void* d) {
    return ((reinterpret_cast<unsigned long long>(a) | reinterpret_cast<unsigned long long>(b) |
             reinterpret_cast<unsigned long long>(c) | reinterpret_cast<unsigned long long>(d)) & 15) == 0;
}

template <typename X>
__device__ __forceinline__ bool packs_fit(int channels, const void* a, const void* b, const void* c) {
    return channels % Pack<X>::size == 0 && ((reinterpret_cast<unsigned long long>(a) |
                                              reinterpret_cast<unsigned long long>(b) |
                                              reinterpret_cast<unsigned long long>(c)) & 15) == 0;
}

template <typename X, typename W>
__device__ __forceinline__ void rms_norm_forward(const X* x, const W* w, X* y, float* r, int rows, int channels,
                                                 float eps) {
    constexpr int P = Pack<X>::size;
    const int lane = threadIdx.x & 31;
    const int row = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (row >= rows) return;                               // whole warps leave together
    const X* xr = x + (int64)row * channels;
    X* yr = y + (int64)row * channels;
    const bool vectorised = packs_fit<X>(channels, x, y, y);

    float sum_squares = 0.0f;
    if (vectorised) {
        for (int c = lane * P; c < channels; c += 32 * P) {
            float v[P];
            load_pack<X>(xr + c, v);
#pragma unroll
            for (int k = 0; k < P; ++k) sum_squares = fmaf(v[k], v[k], sum_squares);
        }
    } else {
        for (int c = lane; c < channels; c += 32) {
            const float v = to_float(xr[c]);
            sum_squares = fmaf(v, v, sum_squares);
        }
    }
    sum_squares = warp_sum(sum_squares);
    const float rstd = 1.0f / sqrtf(sum_squares / channels + eps);
    if (lane == 0) r[row] = rstd;

    if (vectorised) {
        for (int c = lane * P; c < channels; c += 32 * P) {
            float v[P];
            load_pack<X>(xr + c, v);                      // an L1/L2 hit: read just above
#pragma unroll
            for (int k = 0; k < P; ++k) v[k] = (v[k] * rstd) * to_float(w[c + k]);
            store_pack<X>(yr + c, v);
        }
    } else {
        for (int c = lane; c < channels; c += 32) yr[c] = from_float<X>((to_float(xr[c]) * rstd) * to_float(w[c]));
    }
}

template <typename X, typename B, typename Y, typename W>
__device__ __forceinline__ void add_rms_norm_forward(const X* x, const B* branch, const W* w, X* total, Y* y,
                                                     float* r, int rows, int channels, float eps) {
    const int lane = threadIdx.x & 31;
    const int row = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (row >= rows) return;                               // whole warps leave together
    const int64 offset = (int64)row * channels;
    const X* xr = x + offset;
    const B* br = branch + offset;
    X* sr = total + offset;
    Y* yr = y + offset;
    const bool vectorised = channels % 8 == 0 && aligned16(x, branch, total, y);

    float sum_squares = 0.0f;
    if (vectorised) {
#pragma unroll 4
        for (int c = lane * 8; c < channels; c += 32 * 8) {
            float a[8], b[8];
            load8<X>(xr + c, a);
            load8<B>(br + c, b);
#pragma unroll
            for (int k = 0; k < 8; ++k) {
                a[k] = to_float(from_float<X>(a[k] + to_float(from_float<X>(b[k]))));   // s in x's dtype
                sum_squares = fmaf(a[k], a[k], sum_squares);
            }
            store8<X>(sr + c, a);
        }
    } else {
        for (int c = lane; c < channels; c += 32) {
            const float v = to_float(from_float<X>(to_float(xr[c]) + to_float(from_float<X>(to_float(br[c])))));
            sr[c] = from_float<X>(v);
            sum_squares = fmaf(v, v, sum_squares);
        }
    }
    sum_squares = warp_sum(sum_squares);
    const float rstd = 1.0f / sqrtf(sum_squares / channels + eps);
    if (lane == 0) r[row] = rstd;

    if (vectorised) {
#pragma unroll 4
        for (int c = lane * 8; c < channels; c += 32 * 8) {
            float v[8];
            load8<X>(sr + c, v);                           // this thread's own stores, still in cache
#pragma unroll
            for (int k = 0; k < 8; ++k) v[k] = (v[k] * rstd) * to_float(w[c + k]);
            store8<Y>(yr + c, v);
        }
    } else {
        for (int c = lane; c < channels; c += 32) yr[c] = from_float<Y>((to_float(sr[c]) * rstd) * to_float(w[c]));
    }
}

// The backward, dy in dtype D: x's own, or the forward's y dtype when that differs (the residual form); dx in X.
template <typename X, typename D, typename W>
__device__ __forceinline__ void rms_norm_backward(const D* dy, const X* x, const W* w, const float* r, X* dx,
                                                  float* partial, int rows, int channels, const X* pending,
                                                  D* low) {
    extern __shared__ float warp_dw[];                     // (WARPS, C)
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    float* my_dw = warp_dw + warp * channels;
    for (int c = lane; c < channels; c += 32) my_dw[c] = 0.0f;
    const bool vectorised = channels % 8 == 0 && aligned16(dy, x, dx, pending) && aligned16(low, low, low, low);

    for (int row = blockIdx.x * warps + warp; row < rows; row += gridDim.x * warps) {
        const int64 offset = (int64)row * channels;
        const D* dyr = dy + offset;
        const X* xr = x + offset;
        X* dxr = dx + offset;
        const float rstd = r[row];
        float dot = 0.0f;
        if (vectorised) {
#pragma unroll 4
            for (int c = lane * 8; c < channels; c += 32 * 8) {
                float a[8], b[8];
                load8<D>(dyr + c, a);
                load8<X>(xr + c, b);
#pragma unroll
                for (int k = 0; k < 8; ++k) dot = fmaf(a[k] * to_float(w[c + k]), b[k] * rstd, dot);
            }
        } else {
            for (int c = lane; c < channels; c += 32)
                dot = fmaf(to_float(dyr[c]) * to_float(w[c]), to_float(xr[c]) * rstd, dot);
        }
        const float mean_dot = warp_sum(dot) / channels;
        if (vectorised) {
#pragma unroll 4
            for (int c = lane * 8; c < channels; c += 32 * 8) {
                float a[8], b[8], d[8];
                load8<D>(dyr + c, a);
                load8<X>(xr + c, b);
#pragma unroll
                for (int k = 0; k < 8; ++k) {
                    const float xhat = b[k] * rstd;
                    d[k] = rstd * (a[k] * to_float(w[c + k]) - xhat * mean_dot);
                    my_dw[c + k] += a[k] * xhat;
                }
                if (pending != nullptr) {
                    float p[8];
                    load8<X>(pending + offset + c, p);
#pragma unroll
                    for (int k = 0; k < 8; ++k) d[k] = to_float(from_float<X>(__fadd_rn(d[k], p[k])));   // no FMA contraction
                }
                store8<X>(dxr + c, d);
                if (low != nullptr) store8<D>(low + offset + c, d);
            }
        } else {
            for (int c = lane; c < channels; c += 32) {
                const float a = to_float(dyr[c]), xhat = to_float(xr[c]) * rstd;
                float d = rstd * (a * to_float(w[c]) - xhat * mean_dot);
                if (pending != nullptr) d = to_float(from_float<X>(__fadd_rn(d, to_float(pending[offset + c]))));
                dxr[c] = from_float<X>(d);
                if (low != nullptr) low[offset + c] = from_float<D>(d);
                my_dw[c] += a * xhat;
            }
        }
    }
    __syncthreads();
    for (int c = threadIdx.x; c < channels; c += blockDim.x) {
        float total = 0.0f;
        for (int k = 0; k < warps; ++k) total += warp_dw[k * channels + c];
        partial[(int64)blockIdx.x * channels + c] = total;
    }
}

template <typename W>
__device__ __forceinline__ void rms_norm_backward_dw(const float* partial, W* dw, int blocks, int channels) {
    const int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= channels) return;
    float total = 0.0f;
    for (int b = 0; b < blocks; ++b) total += partial[(int64)b * channels + c];
    dw[c] = from_float<W>(total);
}

// Names: add_rms_norm_forward_<x>_<branch>_<y>_<w>, rms_norm_backward_<x>_<dy>_<w>.
#define ADD_RMS_NORM_KERNEL(X, B, Y, W, SUFFIX)                                                            \
    extern "C" __global__ void add_rms_norm_forward_##SUFFIX(const X* x, const B* branch, const W* w,       \
                                                            X* total, Y* y, float* r, int rows,             \
                                                            int channels, float eps) {                      \
        add_rms_norm_forward<X, B, Y, W>(x, branch, w, total, y, r, rows, channels, eps);                   \
    }

#define RMS_NORM_MIXED_BACKWARD(X, D, W, SUFFIX)                                                           \
    extern "C" __global__ void rms_norm_backward_##SUFFIX(const D* dy, const X* x, const W* w, const float* r, \
                                                         X* dx, float* partial, int rows, int channels,      \
                                                         const X* pending, D* low) {                          \
        rms_norm_backward<X, D, W>(dy, x, w, r, dx, partial, rows, channels, pending, low);                   \
    }

#define RMS_NORM_FORWARD(X, W, SUFFIX)                                                                    \
    extern "C" __global__ void rms_norm_forward_##SUFFIX(const X* x, const W* w, X* y, float* r, int rows,   \
                                                        int channels, float eps) {                          \
        rms_norm_forward<X, W>(x, w, y, r, rows, channels, eps);                                            \
    }

#define RMS_NORM_BACKWARD(X, W, SUFFIX)                                                                   \
    extern "C" __global__ void rms_norm_backward_##SUFFIX(const X* dy, const X* x, const W* w, const float* r, \
                                                         X* dx, float* partial, int rows, int channels,      \
                                                         const X* pending, X* low) {                          \
        rms_norm_backward<X, X, W>(dy, x, w, r, dx, partial, rows, channels, pending, low);                   \
    }

#define RMS_NORM_DW(W, SUFFIX)                                                                             \
    extern "C" __global__ void rms_norm_backward_dw_##SUFFIX(const float* partial, W* dw, int blocks, int channels) { \
        rms_norm_backward_dw<W>(partial, dw, blocks, channels);                                                        \
    }

// Each line is tagged with its 16-bit dtype (1 for the all-float32 kernels) and its pass (1 forward,
// 2 backward): a run compiles the forward and the backward modules of its dtype on two threads.
#if SELECTED(0, 1, 1)
RMS_NORM_FORWARD(float, float, f32_f32)
ADD_RMS_NORM_KERNEL(float, float, float, float, f32_f32_f32_f32)
#endif
#if SELECTED(0, 1, 2)
RMS_NORM_BACKWARD(float, float, f32_f32)
#endif
#if SELECTED(0, 0, 2)
RMS_NORM_DW(float, f32)
#endif
#if SELECTED(0, 2, 1)
RMS_NORM_FORWARD(__nv_bfloat16, __nv_bfloat16, bf16_bf16)
RMS_NORM_FORWARD(__nv_bfloat16, float, bf16_f32)
ADD_RMS_NORM_KERNEL(float, __nv_bfloat16, float, float, f32_bf16_f32_f32)
ADD_RMS_NORM_KERNEL(float, __nv_bfloat16, __nv_bfloat16, float, f32_bf16_bf16_f32)
ADD_RMS_NORM_KERNEL(__nv_bfloat16, __nv_bfloat16, __nv_bfloat16, __nv_bfloat16, bf16_bf16_bf16_bf16)
ADD_RMS_NORM_KERNEL(__nv_bfloat16, __nv_bfloat16, __nv_bfloat16, float, bf16_bf16_bf16_f32)
#endif
#if SELECTED(0, 2, 2)
RMS_NORM_BACKWARD(__nv_bfloat16, __nv_bfloat16, bf16_bf16)
RMS_NORM_BACKWARD(__nv_bfloat16, float, bf16_f32)
RMS_NORM_MIXED_BACKWARD(float, __nv_bfloat16, float, f32_bf16_f32)
RMS_NORM_DW(__nv_bfloat16, bf16)
#endif
#if SELECTED(0, 3, 1)
RMS_NORM_FORWARD(__half, __half, f16_f16)
RMS_NORM_FORWARD(__half, float, f16_f32)
ADD_RMS_NORM_KERNEL(float, __half, float, float, f32_f16_f32_f32)
ADD_RMS_NORM_KERNEL(float, __half, __half, float, f32_f16_f16_f32)
ADD_RMS_NORM_KERNEL(__half, __half, __half, __half, f16_f16_f16_f16)
ADD_RMS_NORM_KERNEL(__half, __half, __half, float, f16_f16_f16_f32)
#endif
#if SELECTED(0, 3, 2)
RMS_NORM_BACKWARD(__half, __half, f16_f16)
RMS_NORM_BACKWARD(__half, float, f16_f32)
RMS_NORM_MIXED_BACKWARD(float, __half, float, f32_f16_f32)
RMS_NORM_DW(__half, f16)
#endif
