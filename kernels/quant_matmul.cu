// quant_matmul.cu: linear layers on quantized weights, y = x @ Ŵᵀ (ops/quantized.py's QuantizedLinear).
//
// Weights in tinygrad_llm.quant.QuantizedMatrix's block-major layout, nb = in / 32 blocks a row:
//   Q8_0: values int8  (nb, out, 32), scale half (nb, out)     Ŵ[o, 32b + j] = scale[b, o] · values[b, o, j]
//   Q4_0: values uint8 (nb, out, 16), scale half (nb, out)     byte j of block (b, o): element 32b + j in the low
//                                                              nibble, 32b + 16 + j in the high; Ŵ = scale · (n − 8)
//   INT8: values int8  (out, in),     scale float (out,)       Ŵ[o, i] = scale[o] · values[o, i]
// x: float (rows, in), y: float (rows, out), both C-contiguous. Math in float32.
//
// Decode, `quant_gemv_<format>`: fused dequantise + GEMV for up to GEMV_ROWS rows of x. One warp per
//   output row o; for Q8_0 / Q4_0 lane l takes blocks l, l + 32, ... (one 32- or 16-byte load each), for
//   INT8 4 consecutive weights at a time; partial dot products for every row of x are summed over the
//   warp with shuffles (common.cuh's warp_sum). Launch: blockDim 256 (8 warps), grid ceil(out / 8).
// Prefill, `dequantize_<format>`: Ŵ written out as float (out, in) for a cuBLAS GEMM (tinygrad_llm
//   .gpu.quantized calls cupy's matmul); one thread per weight, grid-stride. Launch: blockDim 256.
// Must match: ops/quantized.py's linear_forward on the CPU (tests/test_quant_ops.py compares them).
#include "common.cuh"

#define GEMV_ROWS 8
#define WARPS_PER_BLOCK 8

// Σ over one 32-weight Q8_0 block of codes · x, for each of `rows` rows of x starting at column `column`.
template <int ROWS>
__device__ __forceinline__ void q8_0_block(const signed char* codes, const float* x, long long in, long long column,
                                           int rows, float scale, float (&sum)[ROWS]) {
    const int4* raw = reinterpret_cast<const int4*>(codes);            // 32 bytes: two 16-byte loads
    int4 part[2] = {raw[0], raw[1]};
    const signed char* q = reinterpret_cast<const signed char*>(part);
#pragma unroll
    for (int r = 0; r < ROWS; ++r) {
        if (r >= rows) break;
        const float* xr = x + r * in + column;
        float dot = 0.0f;
#pragma unroll
        for (int j = 0; j < 32; ++j) dot += (float)q[j] * xr[j];
        sum[r] += scale * dot;
    }
}

// The same for a Q4_0 block: 16 bytes of nibbles, codes n − 8.
template <int ROWS>
__device__ __forceinline__ void q4_0_block(const unsigned char* packed, const float* x, long long in,
                                           long long column, int rows, float scale, float (&sum)[ROWS]) {
    int4 raw = *reinterpret_cast<const int4*>(packed);
    const unsigned char* p = reinterpret_cast<const unsigned char*>(&raw);
#pragma unroll
    for (int r = 0; r < ROWS; ++r) {
        if (r >= rows) break;
        const float* xr = x + r * in + column;
        float dot = 0.0f;
#pragma unroll
        for (int j = 0; j < 16; ++j) {
            dot += (float)((int)(p[j] & 0x0F) - 8) * xr[j];
            dot += (float)((int)(p[j] >> 4) - 8) * xr[16 + j];
        }
        sum[r] += scale * dot;
    }
}

extern "C" __global__ void quant_gemv_q8_0(const signed char* values, const __half* scale, const float* x,
                                           float* y, long long out, long long in, int rows) {
    const long long o = (long long)blockIdx.x * WARPS_PER_BLOCK + threadIdx.x / 32;
    const int lane = threadIdx.x % 32;
    if (o >= out) return;
    const long long blocks = in / 32;
    float sum[GEMV_ROWS] = {0.0f};
    for (long long b = lane; b < blocks; b += 32)
        q8_0_block<GEMV_ROWS>(values + (b * out + o) * 32, x, in, b * 32, rows, __half2float(scale[b * out + o]), sum);
#pragma unroll
    for (int r = 0; r < GEMV_ROWS; ++r) {
        if (r >= rows) break;
        const float total = warp_sum(sum[r]);
        if (lane == 0) y[r * out + o] = total;
    }
}

extern "C" __global__ void quant_gemv_q4_0(const unsigned char* values, const __half* scale, const float* x,
                                           float* y, long long out, long long in, int rows) {
    const long long o = (long long)blockIdx.x * WARPS_PER_BLOCK + threadIdx.x / 32;
    const int lane = threadIdx.x % 32;
    if (o >= out) return;
    const long long blocks = in / 32;
    float sum[GEMV_ROWS] = {0.0f};
    for (long long b = lane; b < blocks; b += 32)
        q4_0_block<GEMV_ROWS>(values + (b * out + o) * 16, x, in, b * 32, rows, __half2float(scale[b * out + o]), sum);
#pragma unroll
    for (int r = 0; r < GEMV_ROWS; ++r) {
        if (r >= rows) break;
        const float total = warp_sum(sum[r]);
        if (lane == 0) y[r * out + o] = total;
    }
}

extern "C" __global__ void quant_gemv_int8(const signed char* values, const float* scale, const float* x,
                                           float* y, long long out, long long in, int rows) {
    const long long o = (long long)blockIdx.x * WARPS_PER_BLOCK + threadIdx.x / 32;
    const int lane = threadIdx.x % 32;
    if (o >= out) return;
    const signed char* row = values + o * in;
    float sum[GEMV_ROWS] = {0.0f};
    for (long long i = lane; i < in; i += 32) {
        const float w = (float)row[i];
#pragma unroll
        for (int r = 0; r < GEMV_ROWS; ++r) {
            if (r >= rows) break;
            sum[r] += w * x[r * in + i];
        }
    }
#pragma unroll
    for (int r = 0; r < GEMV_ROWS; ++r) {
        if (r >= rows) break;
        const float total = warp_sum(sum[r]);
        if (lane == 0) y[r * out + o] = total * scale[o];
    }
}

// Ŵ as float (out, in), one weight per thread-iteration.
extern "C" __global__ void dequantize_q8_0(const signed char* values, const __half* scale, float* w,
                                           long long out, long long in) {
    const long long total = out * in;
    for (long long k = (long long)blockIdx.x * blockDim.x + threadIdx.x; k < total;
         k += (long long)gridDim.x * blockDim.x) {
        const long long o = k / in, i = k - o * in, b = i / 32, j = i % 32;
        w[k] = __half2float(scale[b * out + o]) * (float)values[(b * out + o) * 32 + j];
    }
}

extern "C" __global__ void dequantize_q4_0(const unsigned char* values, const __half* scale, float* w,
                                           long long out, long long in) {
    const long long total = out * in;
    for (long long k = (long long)blockIdx.x * blockDim.x + threadIdx.x; k < total;
         k += (long long)gridDim.x * blockDim.x) {
        const long long o = k / in, i = k - o * in, b = i / 32, j = i % 32;
        const unsigned char byte = values[(b * out + o) * 16 + (j % 16)];
        const int code = j < 16 ? (byte & 0x0F) : (byte >> 4);
        w[k] = __half2float(scale[b * out + o]) * (float)(code - 8);
    }
}

extern "C" __global__ void dequantize_int8(const signed char* values, const float* scale, float* w,
                                           long long out, long long in) {
    const long long total = out * in;
    for (long long k = (long long)blockIdx.x * blockDim.x + threadIdx.x; k < total;
         k += (long long)gridDim.x * blockDim.x)
        w[k] = scale[k / in] * (float)values[k];
}
