// rope.cu: rotary position embedding, rotate-half pairing (ops/rope.py's RoPE, forward and backward).
//
// With x split at D/2 into (x1, x2) and angle tables cos, sin of shape (T, D/2):
//     y1 = x1 · cos − x2 · sin;   y2 = x2 · cos + x1 · sin
// The backward is the same kernel called with −sin (a rotation's transpose is the rotation by −a).
// With rotate = 0 the kernel is a plain strided copy y = x of the same layouts (cos, sin unread): the
// head-layout changes around attention ((B, T, H, D) <-> (B, H, T, D)) in 16-byte accesses.
// Must match ops/rope.py's `_rotate` (the NumPy path).
//
// Shapes:  x, y: (B, H, T, D), each with any strides for B, H, T (in elements) and a contiguous last
//          axis, so the (B, T, H, D) -> (B, H, T, D) transpose view of a packed projection is read (or, in
//          the backward, written) without a copy; cos, sin: (T, D/2) contiguous; all of one dtype T
//          (float / bf16 / fp16), math in float32. y must not overlap x unless it is x itself.
// Launch:  1-D grid-stride over work items (blockDim 256). With vectorised = 1 (D/2 and the strides are
//          multiples of the 16-byte pack P, x and y 16-byte aligned) one item is P consecutive pairs of one
//          (b, h, t) row, else one pair. `work` = B·H·T·(D/2) / items-per-pair-group.
#include "common.cuh"

template <typename T, int P>
__device__ __forceinline__ void rope_items(const T* x, const T* cos_table, const T* sin_table, T* y, int heads,
                                           int length, int half, int64 stride_b, int64 stride_h,
                                           int64 stride_t, int64 out_b, int64 out_h, int64 out_t, int64 work,
                                           bool rotate) {
    const int groups = half / P;                          // items per (b, h, t) row
    for (int64 item = (int64)blockIdx.x * blockDim.x + threadIdx.x; item < work;
         item += (int64)gridDim.x * blockDim.x) {
        const int64 row = item / groups;                  // (b, h, t) flattened
        const int j = (int)(item - row * groups) * P;     // first pair index in the row
        const int t = (int)(row % length);
        const int64 bh = row / length;
        const int h = (int)(bh % heads);
        const int64 b = bh / heads;
        const T* xr = x + b * stride_b + h * stride_h + t * stride_t;
        T* yr = y + b * out_b + h * out_h + t * out_t;
        const T* cr = cos_table + (int64)t * half;
        const T* sr = sin_table + (int64)t * half;
        float x1[P], x2[P], c[P], s[P], y1[P], y2[P];
        if constexpr (P > 1) {
            load_pack<T>(xr + j, x1);
            load_pack<T>(xr + half + j, x2);
        } else {
            x1[0] = to_float(xr[j]);
            x2[0] = to_float(xr[half + j]);
        }
        if (rotate) {
            if constexpr (P > 1) {
                load_pack<T>(cr + j, c);
                load_pack<T>(sr + j, s);
            } else {
                c[0] = to_float(cr[j]);
                s[0] = to_float(sr[j]);
            }
#pragma unroll
            for (int k = 0; k < P; ++k) {
                y1[k] = x1[k] * c[k] - x2[k] * s[k];
                y2[k] = x2[k] * c[k] + x1[k] * s[k];
            }
        } else {
#pragma unroll
            for (int k = 0; k < P; ++k) {
                y1[k] = x1[k];
                y2[k] = x2[k];
            }
        }
        if constexpr (P > 1) {
            store_pack<T>(yr + j, y1);
            store_pack<T>(yr + half + j, y2);
        } else {
            yr[j] = from_float<T>(y1[0]);
            yr[half + j] = from_float<T>(y2[0]);
        }
    }
}

#define ROPE_KERNEL(T, SUFFIX)                                                                            \
    extern "C" __global__ void rope_##SUFFIX(const T* x, const T* cos_table, const T* sin_table, T* y,     \
                                            int heads, int length, int half, int64 stride_b,              \
                                            int64 stride_h, int64 stride_t, int64 out_b, int64 out_h,     \
                                            int64 out_t, int64 work, int vectorised, int rotate) {        \
        if (vectorised)                                                                                   \
            rope_items<T, Pack<T>::size>(x, cos_table, sin_table, y, heads, length, half, stride_b,       \
                                         stride_h, stride_t, out_b, out_h, out_t, work, rotate != 0);     \
        else                                                                                              \
            rope_items<T, 1>(x, cos_table, sin_table, y, heads, length, half, stride_b, stride_h,         \
                             stride_t, out_b, out_h, out_t, work, rotate != 0);                           \
    }

ROPE_KERNEL(float, f32)
ROPE_KERNEL(__nv_bfloat16, bf16)
ROPE_KERNEL(__half, f16)
