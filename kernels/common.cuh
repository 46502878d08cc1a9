// common.cuh: helpers shared by the kernels of tinygrad_llm (included by the *.cu files).
//
// - element conversion between float and the storage types float / __nv_bfloat16 / __half
//   (every kernel does its arithmetic in float32 whatever the storage type);
// - 16-byte vector loads and stores ("packs": 4 floats or 8 bf16/fp16 values) with optional
//   cache hints: `streaming` loads/stores (ld.global.cs / st.global.cs) mark data used once so it
//   is evicted from L2 first;
// - warp and block reductions (sum, max) with shuffles.
//
// Under NVRTC, gpu.load_module inlines this file in place of the #include line; under nvcc the kernels
// are compiled with -I kernels. Only CUDA headers are used (no C++ standard library), so both work.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

typedef long long int64;

#define NEGATIVE_INFINITY (-__int_as_float(0x7f800000))
#define LOG2E 1.4426950408889634f

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }

template <typename T> __device__ __forceinline__ T from_float(float x);
template <> __device__ __forceinline__ float from_float<float>(float x) { return x; }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16(x); }
template <> __device__ __forceinline__ __half from_float<__half>(float x) { return __float2half(x); }

// A pack: the number of T elements in one 16-byte access.
template <typename T> struct Pack { static constexpr int size = 16 / sizeof(T); };

// The Pack<T>::size elements held in 16 raw bytes, as floats.
template <typename T>
__device__ __forceinline__ void unpack(const uint4& raw, float (&out)[Pack<T>::size]) {
    const T* element = reinterpret_cast<const T*>(&raw);
#pragma unroll
    for (int i = 0; i < Pack<T>::size; ++i) out[i] = to_float(element[i]);
}

// 16 raw bytes at p (16-byte aligned): read-only path by default, streaming (last use) if asked.
template <bool streaming = false>
__device__ __forceinline__ uint4 load_raw(const void* p) {
    return streaming ? __ldcs(reinterpret_cast<const uint4*>(p)) : __ldg(reinterpret_cast<const uint4*>(p));
}

// Load 16 bytes at p (16-byte aligned) as Pack<T>::size floats.
template <typename T, bool streaming = false>
__device__ __forceinline__ void load_pack(const T* p, float (&out)[Pack<T>::size]) {
    unpack<T>(load_raw<streaming>(p), out);
}

// Store Pack<T>::size floats as 16 bytes of T at p (16-byte aligned).
template <typename T, bool streaming = false>
__device__ __forceinline__ void store_pack(T* p, const float (&in)[Pack<T>::size]) {
    uint4 raw;
    T* element = reinterpret_cast<T*>(&raw);
#pragma unroll
    for (int i = 0; i < Pack<T>::size; ++i) element[i] = from_float<T>(in[i]);
    if (streaming) __stcs(reinterpret_cast<uint4*>(p), raw);
    else *reinterpret_cast<uint4*>(p) = raw;
}

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) x += __shfl_xor_sync(0xffffffffu, x, offset);
    return x;
}

__device__ __forceinline__ float warp_max(float x) {
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, offset));
    return x;
}

// Sum over the block; every thread gets the result. `scratch` holds >= 32 floats of shared memory, and
// the call must be reached by every thread of the block (it contains barriers).
__device__ __forceinline__ float block_sum(float x, float* scratch) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = (blockDim.x + 31) >> 5;
    x = warp_sum(x);
    __syncthreads();                       // scratch may still be read by a previous reduction
    if (lane == 0) scratch[warp] = x;
    __syncthreads();
    x = lane < warps ? scratch[lane] : 0.0f;
    return warp_sum(x);
}

__device__ __forceinline__ float block_max(float x, float* scratch) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = (blockDim.x + 31) >> 5;
    x = warp_max(x);
    __syncthreads();
    if (lane == 0) scratch[warp] = x;
    __syncthreads();
    x = lane < warps ? scratch[lane] : NEGATIVE_INFINITY;
    return warp_max(x);
}
