// attention_common.cuh: the PTX helpers and element types both attention kernels use (cp.async,
// ldmatrix, mma.sync m16n8k16 for bf16 and fp16, exp2 on the special-function unit, tile loads).
// Included by attention_forward.cu and attention_backward.cu; tinygrad_llm.gpu.load_module inlines
// it for NVRTC, and nvcc finds it through -I kernels.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include "select.cuh"

#define ATTN_NEG_INF (-__int_as_float(0x7f800000))
#define ATTN_LOG2E 1.4426950408889634f
#define ATTN_LN2 0.6931471805599453f

// ---------------------------------------------------------------------------------------------------
// Small PTX helpers (shared-memory addresses, cp.async, ldmatrix, mma), sm_80 and later.

__device__ __forceinline__ unsigned attn_smem_address(const void* pointer) {
    return static_cast<unsigned>(__cvta_generic_to_shared(pointer));
}

// 16-byte asynchronous copy global -> shared; copies zeros when `valid` is false, and then reads nothing
// from `global` (a source size of 0), which may point anywhere.
__device__ __forceinline__ void attn_copy16(void* shared, const void* global, bool valid) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n"
                 :: "r"(attn_smem_address(shared)), "l"(global), "r"(valid ? 16 : 0));
}
__device__ __forceinline__ void attn_copy_commit() { asm volatile("cp.async.commit_group;\n" ::); }
__device__ __forceinline__ void attn_copy_wait_all() { asm volatile("cp.async.wait_group 0;\n" ::); }

__device__ __forceinline__ void attn_ldmatrix_x4(unsigned (&r)[4], const void* shared) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(attn_smem_address(shared)));
}
__device__ __forceinline__ void attn_ldmatrix_x4_trans(unsigned (&r)[4], const void* shared) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(attn_smem_address(shared)));
}

// 2^x on the special-function unit (exp2(−inf) = 0), without exp2f's denormal handling.
__device__ __forceinline__ float attn_exp2(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
    return y;
}

// The 16-bit element types: the mma instruction, packing two floats, and conversions.
template <typename T> struct AttnType;

template <> struct AttnType<__nv_bfloat16> {
    static __device__ __forceinline__ void mma(float (&c)[4], const unsigned (&a)[4], unsigned b0, unsigned b1) {
        asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
                     "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
                     : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                     : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
    }
    static __device__ __forceinline__ unsigned pack(float low, float high) {
        __nv_bfloat162 pair = __floats2bfloat162_rn(low, high);
        return *reinterpret_cast<unsigned*>(&pair);
    }
    // the two halves of a packed pair back to float (bf16 is the top half of an fp32)
    static __device__ __forceinline__ float low(unsigned pair) { return __uint_as_float(pair << 16); }
    static __device__ __forceinline__ float high(unsigned pair) { return __uint_as_float(pair & 0xffff0000u); }
};

template <> struct AttnType<__half> {
    static __device__ __forceinline__ void mma(float (&c)[4], const unsigned (&a)[4], unsigned b0, unsigned b1) {
        asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
                     "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
                     : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                     : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
    }
    static __device__ __forceinline__ unsigned pack(float low, float high) {
        __half2 pair = __floats2half2_rn(low, high);
        return *reinterpret_cast<unsigned*>(&pair);
    }
    static __device__ __forceinline__ float low(unsigned pair) {
        return __half2float(__ushort_as_half(static_cast<unsigned short>(pair & 0xffffu)));
    }
    static __device__ __forceinline__ float high(unsigned pair) {
        return __half2float(__ushort_as_half(static_cast<unsigned short>(pair >> 16)));
    }
};

// ---------------------------------------------------------------------------------------------------
// Attention dropout: the keep/drop decision of score (row, key) from a counter-based hash, recomputed
// wherever it is needed (forward, backward, any tile order), never stored. It must give the bits of
// tinygrad_llm.rng.hash_bits:
//     key(row)       = fmix32(row · 0x9E3779B9 + row_seed)          (once per query row)
//     bits(row, j)   = fmix32(key(row) ^ (j · 0x7FEB352D + column_seed))
//     kept(row, j)   = bits(row, j) < threshold                      (threshold = ⌊keep · 2³²⌋)
// with row the query's index in the flat (B, H, Tq) order and j the key (all arithmetic modulo 2³²).
// Kernels built with dropout take (row_seed, column_seed, threshold, scale = 1 / keep) as AttnDropout.

struct AttnDropout {
    unsigned row_seed, column_seed, threshold;
    float scale;
};

// The arguments of every NAME_dropout entry point: a pointer to a 64-bit seed in device memory, whose low
// and high words are added to row_seed and column_seed (a captured training step rewrites it between
// replays; a launch with a host seed points it at a zero), then the host's words, threshold and 1 / keep.
#define ATTN_DROPOUT_PARAMETERS                                                                            \
    const unsigned long long *seed_base, unsigned row_seed, unsigned column_seed, unsigned threshold,     \
        float keep_scale
#define ATTN_DROPOUT_ARGUMENT attn_dropout_from(seed_base, row_seed, column_seed, threshold, keep_scale)

__device__ __forceinline__ AttnDropout attn_dropout_from(const unsigned long long* seed_base, unsigned row_seed,
                                                         unsigned column_seed, unsigned threshold, float scale) {
    const unsigned long long base = *seed_base;
    return AttnDropout{row_seed + static_cast<unsigned>(base), column_seed + static_cast<unsigned>(base >> 32),
                       threshold, scale};
}

// MurmurHash3's 32-bit finaliser.
__device__ __forceinline__ unsigned attn_fmix32(unsigned x) {
    x ^= x >> 16;
    x *= 0x85EBCA6Bu;
    x ^= x >> 13;
    x *= 0xC2B2AE35u;
    x ^= x >> 16;
    return x;
}

// key(row) of the hash, for a row in the flat (B, H, Tq) order.
__device__ __forceinline__ unsigned attn_dropout_row_key(const AttnDropout& dropout, long long row) {
    return attn_fmix32(static_cast<unsigned>(row) * 0x9E3779B9u + dropout.row_seed);
}

// Whether score (row, key) survives, given key(row).
__device__ __forceinline__ bool attn_dropout_kept(const AttnDropout& dropout, unsigned row_key, int key) {
    return attn_fmix32(row_key ^ (static_cast<unsigned>(key) * 0x7FEB352Du + dropout.column_seed)) < dropout.threshold;
}

// Hide a value's origin from the compiler, so that a word of packed flags stays one register instead of
// being unpacked back into the comparisons that made it.
__device__ __forceinline__ void attn_opaque(unsigned& x) { asm volatile("" : "+r"(x)); }

// Where the rows of a (B, heads, T, D) operand lie: element (b, h, t, d) at
//     b · batch + h · head + t · row + d          (strides in elements; each row's D elements contiguous)
// so that q, k, v, dO, out, dq, dk, dv may be views of packed arrays: the token-major (B, T, H, D)
// layout of a projection (row = H · D, head = D), a slice of one along the heads axis, or the plain
// (B, H, T, D) (row = D, head = T · D). Every stride and each array's start are multiples of 16 bytes,
// and offsets inside one (b, h) are 32-bit: T · row < 2³¹ (tinygrad_llm.gpu.attention copies an array
// whose layout breaks either rule). Kernels take a layout as three arguments (ATTN_LAYOUT_PARAMETERS:
// long long batch and head strides, an int row stride) and read it from the parameter bank where they
// need it.
struct AttnLayout {
    long long batch, head;
    int row;
    template <typename T>
    __device__ __forceinline__ T* rows(T* base, int b, int h) const { return base + b * batch + h * head; }
};
#define ATTN_LAYOUT_PARAMETERS(NAME) long long NAME##_batch, long long NAME##_head, int NAME##_row
#define ATTN_LAYOUT(NAME) AttnLayout{NAME##_batch, NAME##_head, NAME##_row}

// threadIdx.x read afresh at each call (volatile: the compiler neither hoists nor reuses it), so that
// what a tile load derives from it is recomputed where the load is, not kept in registers across a loop.
__device__ __forceinline__ int attn_thread_index() {
    int index;
    asm volatile("mov.u32 %0, %%tid.x;\n" : "=r"(index));
    return index;
}

// Copy rows [row0, row0 + ROWS) of a (rows, D) matrix whose rows lie `row_stride` elements apart into
// shared memory with row stride STRIDE, zero-filling rows at or past `limit`. All THREADS threads take
// part; each copy is 16 bytes.
template <typename T, int ROWS, int D, int STRIDE, int THREADS>
__device__ __forceinline__ void attn_load_tile(T* shared, const T* global, int row_stride, int row0, int limit) {
    constexpr int CHUNKS_PER_ROW = D * 2 / 16, ROWS_A_STEP = THREADS / CHUNKS_PER_ROW;
    static_assert(THREADS % CHUNKS_PER_ROW == 0 && ROWS % ROWS_A_STEP == 0, "every thread copies the same chunks");
    // a thread copies column `col` of rows first, first + ROWS_A_STEP, …: one source pointer, stepped
    const int thread = attn_thread_index(), first = thread / CHUNKS_PER_ROW, col = (thread % CHUNKS_PER_ROW) * 8;
    const T* source = global + ((row0 + first) * row_stride + col);
#pragma unroll
    for (int row = first; row < ROWS; row += ROWS_A_STEP) {
        const bool valid = row0 + row < limit;
        attn_copy16(shared + row * STRIDE + col, source, valid);   // a row past `limit` reads nothing
        source += ROWS_A_STEP * row_stride;
    }
}
