// attention_hopper.cuh: the Hopper (sm_90a) building blocks of kernels/attention_hopper.cu.
//
// wgmma: a warpgroup (4 consecutive warps, 128 threads) multiplies a 64 × N tile by an N-wide B
// operand 16 deep per instruction (m64nNk16), asynchronously, with float32 accumulators in registers.
// B is read by the tensor cores straight from shared memory, once for the whole warpgroup (mma.sync
// made each warp read its own copy through ldmatrix); A comes from shared memory too, or from registers.
//
// Shared-memory tiles. Every tile here is R rows of 64 two-byte elements (128 bytes a row, D = 64) in
// the 128-byte swizzle that wgmma reads: the 16-byte chunk c of row r sits at byte
//     r · 128 + ((c ^ (r mod 8)) · 16)
// of a tile that starts on a 1024-byte boundary (the swizzle works on address bits 4–6 and 7–9, so an
// unaligned tile would read the wrong chunks). The XOR spreads the 8 rows of a 1 KiB group over all 32
// banks, so the row-wise cp.async fills and the column-wise reads are both conflict-free. At head dim
// 128 a tile of R rows is two such 64-column blocks, one after the other (block b, R · 128 bytes from
// the first, holds columns 64b … 64b + 63).
//
// One physical layout serves both ways wgmma reads an operand:
//   - "K-major" (transpose flag 0): the tile's rows are the M (or N) index and its 64 columns the K
//     index: e.g. K (keys × d) as the B operand of S = Q Kᵀ. Step k16 of the product starts 32 bytes
//     further along the row: descriptor + 2 (the start address field counts 16-byte units).
//   - "MN-major" (transpose flag 1): the tile's rows are the K index and its columns the M (or N)
//     index: e.g. V (keys × d) as the B operand of O = P V. Step k16 starts 16 rows further down:
//     descriptor + 128 (2048 bytes). An operand narrower than 64 columns starts inside the row
//     (descriptor + column · 2 / 16).
// The descriptor (PTX ISA, "matrix descriptor" of wgmma): start address / 16 in bits 0–13, leading
// byte offset / 16 in bits 16–29, stride byte offset / 16 in bits 32–45, swizzle mode in bits 62–63
// (1 = 128 bytes). The stride byte offset is the distance between 8-row groups, 1024 bytes here. The
// leading byte offset is the distance between 64-column blocks of an MN-major operand: at head dim 64
// no operand crosses one (every operand is at most 64 two-byte elements wide along its contiguous
// dimension), so it is set to 1024 as well, unused; at head dim 128 an MN-major operand 128 wide (V in
// O = P V, dO and Q in dV and dK) spans both blocks of its tile and the leading byte offset is R · 128.
// A K-major operand at head dim 128 never crosses a block either: its k16 step c (c < 8) starts in
// block c / 4, 32 · (c mod 4) bytes along the row.
//
// Accumulator layout of m64nNk16 (float32, N/2 registers a thread), the mma.sync m16n8 layout per warp:
// warp w of the warpgroup holds rows 16w + g and 16w + g + 8 (g = lane / 4, t = lane % 4), and
//     d[4j + 0], d[4j + 1]: row 16w + g,     columns 8j + 2t, 8j + 2t + 1
//     d[4j + 2], d[4j + 3]: row 16w + g + 8, the same columns                        (j < N / 8)
// An A operand from registers (4 × 32 bits, two 16-bit values each) for the k16 step c is the same
// rows with columns 16c … 16c + 15, so accumulators turn into A fragments in place:
//     a[0] = pack(d[8c], d[8c+1])  a[1] = pack(d[8c+2], d[8c+3])  a[2] = pack(d[8c+4], d[8c+5])
//     a[3] = pack(d[8c+6], d[8c+7])                       (attn_fragment below)
//
// Ordering rules the kernels follow: wgmma_fence() before a batch of wgmma whose accumulator or A
// registers ordinary code touched; wgmma_commit() closes a group and wgmma_wait<N>() waits until at
// most N groups are in flight (groups finish in order); wgmma_hold() after a wait keeps the compiler
// from moving ordinary uses of the accumulators above it. Shared memory written by the threads (cp.async
// or st.shared) that wgmma reads next needs fence.proxy.async (attn_fence_async) in each writing
// thread before the barrier.
//
// Compiled only for sm_90a (ATTN_HOPPER set below); the kernels of attention_hopper.cu trap elsewhere.
// The wgmma wrappers (struct Wgmma) are written out per shape because inline PTX needs each register
// named; one macro defines them for both element types.
#pragma once

#include "attention_common.cuh"

#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define ATTN_HOPPER 1
#endif

// Byte offset of the 16-byte chunk `chunk` (0–7) of row `row` in a swizzled 128-byte-row tile.
__device__ __forceinline__ int attn_swizzle(int row, int chunk) { return row * 128 + ((chunk ^ (row & 7)) << 4); }

// attn_operand(address, leading).at(offset): the wgmma shared-memory descriptor of the swizzled tile
// operand starting at shared address address + offset;
// `leading` is the leading byte offset: the distance between the 64-column blocks of an MN-major operand
// wider than 64 (head dim 128), unused by every other operand. The low word holds address / 16 (bits
// 0–13) and leading / 16 (bits 16–29); the high word is the same for every operand (stride 1024 bytes,
// 128-byte swizzle).
struct AttnOperand {
    unsigned low;
    // the descriptor of the operand `offset` bytes further on (a multiple of 16): shared addresses stay
    // below 2^18 bytes, so the address field takes the offset without a carry, and a product's k16 steps
    // cost one add each instead of rebuilding the descriptor
    __device__ __forceinline__ unsigned long long at(unsigned offset = 0) const {
        return (1ull << 62) | (static_cast<unsigned long long>(1024 >> 4) << 32) | (low + (offset >> 4));
    }
};
__device__ __forceinline__ AttnOperand attn_operand(unsigned address, unsigned leading = 1024) {
    return AttnOperand{((address & 0x3FFFF) >> 4) | ((leading >> 4) << 16)};
}

// Copy rows [row0, row0 + ROWS) of a (rows, D) two-byte matrix whose rows lie `row_stride` elements
// apart into a swizzled tile, zero-filling rows at or past `limit` and rows before 0 (row0 may be
// negative). D = 128 fills two 64-column blocks
// of ROWS × 128 bytes, one after the other. Every one of the THREADS threads takes part; each copy is
// 16 bytes (cp.async).
template <typename T, int ROWS, int THREADS, int D = 64>
__device__ __forceinline__ void attn_load_swizzled(unsigned char* tile, const T* global, int row_stride, int row0,
                                                   int limit) {
    // THREADS = 256: the block's first 256 threads load the tile; fewer (a power of two): each group of
    // THREADS consecutive threads loads a tile of its own (the thread index taken mod THREADS)
    constexpr int CHUNKS = D / 8, CHUNK_BITS = D == 64 ? 3 : 4;     // 16-byte chunks a row
    static_assert(D == 64 || D == 128, "head dim 64 or 128");
    static_assert(ROWS * CHUNKS % THREADS == 0 && THREADS % CHUNKS == 0, "every thread copies the same chunks");
    static_assert((THREADS & (THREADS - 1)) == 0, "a power of two of threads");
    constexpr int ROWS_A_STEP = THREADS / CHUNKS;
    // a thread copies chunk `chunk` of rows first, first + ROWS_A_STEP, …: one source pointer, stepped
    const int index = attn_thread_index(), thread = THREADS < 256 ? index & (THREADS - 1) : index;
    const int first = thread >> CHUNK_BITS, chunk = thread & (CHUNKS - 1);
    const T* source = global + ((row0 + first) * row_stride + chunk * 8);
    #pragma unroll
    for (int step = 0; step < ROWS * CHUNKS / THREADS; ++step) {
        const int row = first + step * ROWS_A_STEP;
        const bool valid = row0 + row < limit && row0 + row >= 0;   // a row outside reads nothing (zero-filled)
        attn_copy16(tile + (chunk >> 3) * (ROWS * 128) + attn_swizzle(row, chunk & 7), source, valid);
        source += ROWS_A_STEP * row_stride;
    }
}

// 4-byte asynchronous copy global -> shared (a float of L or Δ); copies a zero when `valid` is false.
__device__ __forceinline__ void attn_copy4(void* shared, const void* global, bool valid) {
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n"
                 :: "r"(attn_smem_address(shared)), "l"(global), "r"(valid ? 4 : 0));
}

// Named barriers (ids 1–15; __syncthreads is id 0): sync waits until `threads` threads have arrived
// (itself included); arrive counts the caller and goes on.
__device__ __forceinline__ void attn_named_sync(int id, int threads) {
    asm volatile("bar.sync %0, %1;\n" :: "r"(id), "r"(threads) : "memory");
}
__device__ __forceinline__ void attn_named_arrive(int id, int threads) {
    asm volatile("bar.arrive %0, %1;\n" :: "r"(id), "r"(threads) : "memory");
}

// setmaxnreg (sm_90a): a warpgroup gives registers back to the pool or takes more, so that one with little
// to do (the dQ writer) leaves them to the compute warpgroups. The kernel needs a register cap at entry
// (__launch_bounds__(threads, 1)) and each role in one branch of an if/else.
template <int N> __device__ __forceinline__ void attn_set_max_registers_dec() {
    asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" :: "n"(N));
}
template <int N> __device__ __forceinline__ void attn_set_max_registers_inc() {
    asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" :: "n"(N));
}

__device__ __forceinline__ void attn_fence_async() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int N> __device__ __forceinline__ void wgmma_wait() {
    asm volatile("wgmma.wait_group.sync.aligned %0;\n" :: "n"(N) : "memory");
}
template <int R> __device__ __forceinline__ void wgmma_hold(float (&d)[R]) {
    #pragma unroll
    for (int i = 0; i < R; ++i) asm volatile("" : "+f"(d[i]) :: "memory");
}
template <int R> __device__ __forceinline__ void wgmma_hold(unsigned (&a)[R][4]) {
    #pragma unroll
    for (int i = 0; i < R; ++i) asm volatile("" : "+r"(a[i][0]), "+r"(a[i][1]), "+r"(a[i][2]), "+r"(a[i][3]) :: "memory");
}

// The A fragments (k16 steps c = 0 … STEPS − 1) of rows row0 … row0 + 15 of a swizzled tile, for the
// calling warp (ldmatrix: matrix i of x4 takes its row addresses from lanes 8i … 8i + 7; lanes 0–15
// point at the rows' chunk 2c, lanes 16–31 at chunk 2c + 1), in the register-A layout above. Steps 4 … 7
// (head dim 128) read the second 64-column block, `block_bytes` further on.
template <int STEPS>
__device__ __forceinline__ void attn_load_fragments(unsigned (&a)[STEPS][4], const unsigned char* tile, int row0,
                                                    int block_bytes = 0) {
    const int lane = threadIdx.x & 31;
    #pragma unroll
    for (int c = 0; c < STEPS; ++c)
        attn_ldmatrix_x4(a[c], tile + (c >> 2) * block_bytes +
                                   attn_swizzle(row0 + (lane & 15), 2 * (c & 3) + (lane >> 4)));
}

// Accumulators d (float) to the A fragment of k16 step c (see the layout above), rounded to T.
template <typename T, int R>
__device__ __forceinline__ void attn_fragment(unsigned (&a)[4], const float (&d)[R], int c) {
    a[0] = AttnType<T>::pack(d[8 * c + 0], d[8 * c + 1]);
    a[1] = AttnType<T>::pack(d[8 * c + 2], d[8 * c + 3]);
    a[2] = AttnType<T>::pack(d[8 * c + 4], d[8 * c + 5]);
    a[3] = AttnType<T>::pack(d[8 * c + 6], d[8 * c + 7]);
}

template <typename T> struct Wgmma;

// wgmma.mma_async m64nNk16 with float32 accumulators: ss_n<N><TRANS_A, TRANS_B>(d, a, b, accumulate)
// takes A and B as shared-memory descriptors, rs_n<N><TRANS_B>(d, a, b, accumulate) takes A from
// registers; accumulate = 0 overwrites d, 1 adds to it.

#define ATTN_WGMMA_WRAPPERS(TYPE, PTX)                                                                                             \
template <> struct Wgmma<TYPE> {                                                                                                   \
    template <int TRANS_A, int TRANS_B>                                                                                            \
    static __device__ __forceinline__ void ss_n32(float (&d)[16], unsigned long long a, unsigned long long b,                      \
                                                  int accumulate) {                                                                \
        asm volatile("{ .reg .pred p; setp.ne.b32 p, %18, 0;\n"                                                                    \
                         "wgmma.mma_async.sync.aligned.m64n32k16.f32." PTX "." PTX " {"                                            \
                         "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15"                                    \
                         "}, %16, %17, p, 1, 1, %19, %20; }\n"                                                                     \
                         : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),         \
                           "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15])    \
                         : "l"(a), "l"(b), "r"(accumulate), "n"(TRANS_A), "n"(TRANS_B));                                           \
    }                                                                                                                              \
    template <int TRANS_A, int TRANS_B>                                                                                            \
    static __device__ __forceinline__ void ss_n64(float (&d)[32], unsigned long long a, unsigned long long b,                      \
                                                  int accumulate) {                                                                \
        asm volatile("{ .reg .pred p; setp.ne.b32 p, %34, 0;\n"                                                                    \
                         "wgmma.mma_async.sync.aligned.m64n64k16.f32." PTX "." PTX " {"                                            \
                         "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "                                  \
                         "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31"                          \
                         "}, %32, %33, p, 1, 1, %35, %36; }\n"                                                                     \
                         : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),         \
                           "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),   \
                           "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), \
                           "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])  \
                         : "l"(a), "l"(b), "r"(accumulate), "n"(TRANS_A), "n"(TRANS_B));                                           \
    }                                                                                                                              \
    template <int TRANS_A, int TRANS_B>                                                                                            \
    static __device__ __forceinline__ void ss_n128(float (&d)[64], unsigned long long a, unsigned long long b,                     \
                                                  int accumulate) {                                                                \
        asm volatile("{ .reg .pred p; setp.ne.b32 p, %66, 0;\n"                                                                    \
                         "wgmma.mma_async.sync.aligned.m64n128k16.f32." PTX "." PTX " {"                                           \
                         "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "                                  \
                         "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "                        \
                         "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "                        \
                         "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63"                          \
                         "}, %64, %65, p, 1, 1, %67, %68; }\n"                                                                     \
                         : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),         \
                           "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),   \
                           "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), \
                           "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), \
                           "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), \
                           "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), \
                           "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), \
                           "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])  \
                         : "l"(a), "l"(b), "r"(accumulate), "n"(TRANS_A), "n"(TRANS_B));                                           \
    }                                                                                                                              \
    template <int TRANS_B>                                                                                                         \
    static __device__ __forceinline__ void rs_n64(float (&d)[32], const unsigned (&a)[4], unsigned long long b,                    \
                                                  int accumulate) {                                                                \
        asm volatile("{ .reg .pred p; setp.ne.b32 p, %37, 0;\n"                                                                    \
                         "wgmma.mma_async.sync.aligned.m64n64k16.f32." PTX "." PTX " {"                                            \
                         "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "                                  \
                         "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31"                          \
                         "}, {%32, %33, %34, %35}, %36, p, 1, 1, %38; }\n"                                                         \
                         : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),         \
                           "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),   \
                           "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), \
                           "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])  \
                         : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "r"(accumulate), "n"(TRANS_B));                     \
    }                                                                                                                              \
    template <int TRANS_B>                                                                                                         \
    static __device__ __forceinline__ void rs_n128(float (&d)[64], const unsigned (&a)[4], unsigned long long b,                   \
                                                  int accumulate) {                                                                \
        asm volatile("{ .reg .pred p; setp.ne.b32 p, %69, 0;\n"                                                                    \
                         "wgmma.mma_async.sync.aligned.m64n128k16.f32." PTX "." PTX " {"                                           \
                         "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "                                  \
                         "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "                        \
                         "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "                        \
                         "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63"                          \
                         "}, {%64, %65, %66, %67}, %68, p, 1, 1, %70; }\n"                                                         \
                         : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),         \
                           "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),   \
                           "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), \
                           "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), \
                           "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), \
                           "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), \
                           "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), \
                           "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])  \
                         : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "r"(accumulate), "n"(TRANS_B));                     \
    }                                                                                                                              \
};

ATTN_WGMMA_WRAPPERS(__nv_bfloat16, "bf16")
ATTN_WGMMA_WRAPPERS(__half, "f16")
#undef ATTN_WGMMA_WRAPPERS

// The wgmma of the shape the accumulator array implies (R floats a thread: N = 2R), so that one template
// serves head dims 64 and 128: wgmma_ss<T, TRANS_A, TRANS_B>(d, a, b, accumulate) with both operands in
// shared memory, wgmma_rs<T, TRANS_B>(d, a, b, accumulate) with A from registers.
template <typename T, int TRANS_A, int TRANS_B, int R>
__device__ __forceinline__ void wgmma_ss(float (&d)[R], unsigned long long a, unsigned long long b, int accumulate) {
    static_assert(R == 16 || R == 32 || R == 64, "m64n32, m64n64 or m64n128");
    if constexpr (R == 16) Wgmma<T>::template ss_n32<TRANS_A, TRANS_B>(d, a, b, accumulate);
    else if constexpr (R == 32) Wgmma<T>::template ss_n64<TRANS_A, TRANS_B>(d, a, b, accumulate);
    else Wgmma<T>::template ss_n128<TRANS_A, TRANS_B>(d, a, b, accumulate);
}
template <typename T, int TRANS_B, int R>
__device__ __forceinline__ void wgmma_rs(float (&d)[R], const unsigned (&a)[4], unsigned long long b, int accumulate) {
    static_assert(R == 32 || R == 64, "m64n64 or m64n128");
    if constexpr (R == 32) Wgmma<T>::template rs_n64<TRANS_B>(d, a, b, accumulate);
    else Wgmma<T>::template rs_n128<TRANS_B>(d, a, b, accumulate);
}
