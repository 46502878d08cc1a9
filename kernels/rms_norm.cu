// rms_norm.cu: RMSNorm forward and backward over the last axis (ops/norm.py's RMSNorm).
//
// Forward:  r[n] = 1 / sqrt(mean_c x[n, c]² + eps);  y[n, c] = (x[n, c] · r[n]) · w[c]
// Backward: x̂ = x · r;  g = dy · w
//           dx[n, c] = r[n] · (g[n, c] − x̂[n, c] · mean_c(g · x̂)[n])
//           partial[b, c] = Σ over the rows of block b of dy[n, c] · x̂[n, c]   (dw = Σ_b partial[b, c],
//                           summed by the caller in a fixed order, so dw is deterministic)
// Must match the NumPy path of RMSNorm (rms_norm_reference is the composed oracle).
//
// Shapes:  x, y, dy, dx: (N, C) row-major in X = float / bf16 / fp16; w: (C,) in W = X or float;
//          r: (N,) float32 (the op's (..., 1)); partial: (gridDim.x, C) float32. y and dx are in X.
// Launch:  one warp per row, WARPS warps per block (blockDim.x = 32 · WARPS).
//          forward:  grid (ceil(N / WARPS),).
//          backward: grid (min(ceil(N / WARPS), 4 · SMs),), rows visited grid-stride; dynamic shared
//                    memory WARPS · C floats (each warp accumulates its own dw row, no atomics).
//          16-byte packs of x / dy / y / dx when C is a multiple of the pack and the base pointers are
//          16-byte aligned (rows are then aligned too); scalar otherwise.
#include "common.cuh"

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

template <typename X, typename W>
__device__ __forceinline__ void rms_norm_backward(const X* dy, const X* x, const W* w, const float* r, X* dx,
                                                  float* partial, int rows, int channels) {
    constexpr int P = Pack<X>::size;
    extern __shared__ float warp_dw[];                     // (WARPS, C)
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    float* my_dw = warp_dw + warp * channels;
    for (int c = lane; c < channels; c += 32) my_dw[c] = 0.0f;
    const bool vectorised = packs_fit<X>(channels, dy, x, dx);

    for (int row = blockIdx.x * warps + warp; row < rows; row += gridDim.x * warps) {
        const X* dyr = dy + (int64)row * channels;
        const X* xr = x + (int64)row * channels;
        X* dxr = dx + (int64)row * channels;
        const float rstd = r[row];
        // forward was y = x̂·w, so dx̂ = dy·w = g; first the row's mean of g·x̂
        float dot = 0.0f;
        if (vectorised) {
            for (int c = lane * P; c < channels; c += 32 * P) {
                float a[P], b[P];
                load_pack<X>(dyr + c, a);
                load_pack<X>(xr + c, b);
#pragma unroll
                for (int k = 0; k < P; ++k) dot = fmaf(a[k] * to_float(w[c + k]), b[k] * rstd, dot);
            }
        } else {
            for (int c = lane; c < channels; c += 32)
                dot = fmaf(to_float(dyr[c]) * to_float(w[c]), to_float(xr[c]) * rstd, dot);
        }
        const float mean_dot = warp_sum(dot) / channels;
        if (vectorised) {
            for (int c = lane * P; c < channels; c += 32 * P) {
                float a[P], b[P], d[P];
                load_pack<X>(dyr + c, a);
                load_pack<X>(xr + c, b);
#pragma unroll
                for (int k = 0; k < P; ++k) {
                    const float xhat = b[k] * rstd;
                    d[k] = rstd * (a[k] * to_float(w[c + k]) - xhat * mean_dot);
                    my_dw[c + k] += a[k] * xhat;
                }
                store_pack<X>(dxr + c, d);
            }
        } else {
            for (int c = lane; c < channels; c += 32) {
                const float a = to_float(dyr[c]), xhat = to_float(xr[c]) * rstd;
                dxr[c] = from_float<X>(rstd * (a * to_float(w[c]) - xhat * mean_dot));
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

#define RMS_NORM_KERNELS(X, W, SUFFIX)                                                                    \
    extern "C" __global__ void rms_norm_forward_##SUFFIX(const X* x, const W* w, X* y, float* r, int rows,   \
                                                        int channels, float eps) {                          \
        rms_norm_forward<X, W>(x, w, y, r, rows, channels, eps);                                            \
    }                                                                                                       \
    extern "C" __global__ void rms_norm_backward_##SUFFIX(const X* dy, const X* x, const W* w, const float* r, \
                                                         X* dx, float* partial, int rows, int channels) {    \
        rms_norm_backward<X, W>(dy, x, w, r, dx, partial, rows, channels);                                  \
    }

RMS_NORM_KERNELS(float, float, f32_f32)
RMS_NORM_KERNELS(__nv_bfloat16, __nv_bfloat16, bf16_bf16)
RMS_NORM_KERNELS(__half, __half, f16_f16)
RMS_NORM_KERNELS(__nv_bfloat16, float, bf16_f32)
RMS_NORM_KERNELS(__half, float, f16_f32)
