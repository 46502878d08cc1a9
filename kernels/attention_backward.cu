// attention_backward.cu: causal grouped-query attention, backward (the FlashAttention-2 algorithm).
//
// Given the forward's q, k, v, out and L (log-sum-exp per row) and the upstream gradient dO, computes
//     Δ[i]   = Σ_d dO[i, d] · out[i, d]                               (pre-pass, fp32)
//     P[i,j] = exp(S[i, j] − L[i]),  S = q kᵀ / sqrt(D), P = 0 where j > i + (Tk − Tq)
//     dv[j]  = Σ_{h in group} Σ_i P[i, j] dO[i]
//     dS     = P ∘ (dO vᵀ − Δ)
//     dq[i]  = Σ_j dS[i, j] k[j] / sqrt(D)
//     dk[j]  = Σ_{h in group} Σ_i dS[i, j] q[i] / sqrt(D)
// recomputing P tile by tile, never writing a Tq × Tk array to global memory. It must match the NumPy op
// tinygrad_llm.ops.attention.CausalAttention.backward (dq, dk, dv).
//
// Shapes: q, out, dO, dq: (B, H, Tq, D)   k, v, dk, dv: (B, Hkv, Tk, D)
//     L, Δ: (B, H, Tq) fp32   dq_accumulator: (B, H, Tq, D) fp32, zeroed by the caller (both contiguous).
//     q, k, v, out, dO, dq, dk and dv lie where their layouts say (attention_common.cuh's AttnLayout:
//     batch, head and row strides in elements, rows contiguous and 16-byte aligned), e.g. dO read in
//     place from the (B, T, H·D) gradient of the output projection's input, dk and dv written straight
//     into the packed (B, T, H + 2Hkv, D) gradient of the projection; contiguous (B, H, T, D) is one case.
//     "layouts" below: the layouts of q, k, v, dO, dq, dk, dv, three long long strides each (a kernel
//     reads those of the arrays it takes).
//
// Kernels (extern "C"), in launch order for bf16/fp16:
//   attention_backward_prepare_{bf16,fp16}_d{64,128}(dO, out, Δ, dq_accumulator, rows, H, Tq,
//                                                     layout of dO, layout of out)
//     Δ = rowsum(dO ∘ out) in fp32 and the row of dq_accumulator set to 0, in one pass: D / 8 threads
//     a row, 16-byte loads and stores. Grid ceil(rows · D / 8 / 256), block 256.
//   attention_backward_{bf16,fp16}_d64_w4m2q32p, attention_backward_{bf16,fp16}_d128_w4
//       (q, k, v, dO, L, Δ, dq_accumulator, dk, dv, H, Hkv, Tq, Tk, scale, layouts)
//     Tensor cores (mma.sync.m16n8k16, fp32 accumulators). One block owns BLOCK_K keys of one
//     (b, kv head); warp w owns 16·M_TILES consecutive keys and keeps their dk, dv accumulators in
//     registers. The block loops over the G query heads of its group and, in each, over the query
//     steps of BLOCK_Q rows that can see its keys (causality skips the earlier ones), so dk and dv are
//     summed over the group in registers: no atomics and no second pass for them.
//     Per step, on tensor cores:  Sᵀ = K Qᵀ;  Pᵀ = exp2((Sᵀ·scale − L)·log2 e) (masked only on steps
//     that cross the diagonal or the end of the keys);  dV += Pᵀ dO;  dPᵀ = V dOᵀ;
//     dSᵀ = Pᵀ ∘ (dPᵀ − Δ);  dK += dSᵀ Q  (Pᵀ and dSᵀ go from the accumulator layout to the A operand
//     in registers); dSᵀ is written to shared memory as 16-bit, and the warps then compute
//     dQ_step = dS K (BLOCK_Q × D, split over the warps in 16-row × D/(warps·16/BLOCK_Q)-column pieces)
//     and add it, times scale, into the fp32 dq_accumulator with red.global.add.v2.f32 (atomicAdd
//     before sm_90). Query tiles are shared by every key block, so dq needs the atomics: the price of
//     keeping dk/dv in registers, as in FlashAttention-2. dq's summation order (hence its last bits)
//     can vary between runs; dk and dv are deterministic.
//     Q, dO, L and Δ of step s + 1 are copied (cp.async) while step s computes: two buffers.
//     Builds (warps × 16·M_TILES keys, BLOCK_Q): _w4m2q32p 4 × 32 (128 keys), 32 rows, each Q/dO
//     fragment read from shared memory feeding two m-tiles, Pᵀ held only as 16-bit A fragments once dV
//     is done and dSᵀ formed from that rounded P (as dV uses it); _w4 4 × 16 (64 keys), 32 rows at
//     D = 128. tinygrad_llm.gpu.attention picks one per head dim.
//     Launch: grid (ceil(Tk / BLOCK_K), B·Hkv), block 32·warps threads.
//     Shared memory (dynamic): K, V tiles BLOCK_K × (D + 8); Q and dO, two buffers each, BLOCK_Q × (D + 8);
//     dSᵀ BLOCK_K × (BLOCK_Q + 8), all 2-byte; L and Δ, two buffers each, BLOCK_Q fp32: 64.5 KiB for
//     _w4m2q32p at D = 64, 73.5 KiB for _w4 at D = 128. Padding rows by 16
//     bytes keeps ldmatrix conflict-free. Rows past Tq / Tk are zero-filled (there Q = dO = Δ = 0, so
//     they add nothing). dk, dv are written in the input dtype.
//   attention_backward_convert8_{bf16,fp16}(dq_accumulator, dq, n / 8, H, Tq, D, layout of dq):
//     dq = dtype(dq_accumulator), 8 elements a thread (two 16-byte loads, one 16-byte store).
//   fp32 path, for checking: attention_backward_delta_fp32(dO, out, Δ, rows, D, H, Tq, layout of dO,
//     layout of out) (one warp per row),
//   then attention_backward_dq_fp32_d{64,128} and attention_backward_dkdv_fp32_d{64,128}: one warp per
//     query row (dq) or per key row (dk, dv, looping over the group's heads and the query rows that see
//     the key); grid (ceil(T / 4), B·H or B·Hkv), block 128. No atomics; dq is written directly.
//
// Attention dropout: the tensor-core and fp32 kernels (not the pre-passes, whose Δ = rowsum(dO ∘ out)
// already reads the dropped forward's out) also exist as NAME_dropout, taking five more arguments
// (seed_base, row_seed, column_seed, threshold, keep_scale; attention_common.cuh's ATTN_DROPOUT_PARAMETERS). With M the
// hashed keep mask (row = (b·H + h)·Tq + i, the key j) and s = keep_scale they compute
//     dv[j] = Σ_{h in group} Σ_i s · M[i, j] P[i, j] dO[i]
//     dS    = P ∘ (s · M ∘ (dO vᵀ) − Δ)
// and dq, dk from dS as above: the mask is made again in registers from the indices, never loaded.
// The plain kernels are the DROPOUT = false builds of the same templates, so their code is what it was.

#include "attention_common.cuh"


// Add two consecutive floats into global memory (one vector reduction on sm_90, two atomics before).
__device__ __forceinline__ void attn_atomic_add2(float* address, float first, float second) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("red.global.add.v2.f32 [%0], {%1, %2};\n" :: "l"(address), "f"(first), "f"(second) : "memory");
#else
    atomicAdd(address, first);
    atomicAdd(address + 1, second);
#endif
}

// ---------------------------------------------------------------------------------------------------
// Where row `row` of the flat (B, H, T) order starts in an array of layout `layout`.
template <typename T>
__device__ __forceinline__ T* attn_flat_row(T* base, const AttnLayout& layout, long long row, int heads, int length) {
    const long long batch_head = row / length;
    return layout.rows(base, (int)(batch_head / heads), (int)(batch_head % heads)) + (row % length) * layout.row;
}

// Pre-pass of the fp32 path: Δ = rowsum(dO ∘ out), one warp per row.

template <typename T>
__device__ __forceinline__ void attention_backward_delta(const T* __restrict__ dout, const T* __restrict__ out,
                                                         float* __restrict__ delta, int rows, int head_dim,
                                                         int heads, int length, AttnLayout dout_layout,
                                                         AttnLayout out_layout) {
    const int row = blockIdx.x * 8 + threadIdx.x / 32, lane = threadIdx.x % 32;
    if (row >= rows) return;
    const T* dout_row = attn_flat_row(dout, dout_layout, row, heads, length);
    const T* out_row = attn_flat_row(out, out_layout, row, heads, length);
    float total = 0.f;
    for (int d = lane; d < head_dim; d += 32) total += static_cast<float>(dout_row[d]) * static_cast<float>(out_row[d]);
#pragma unroll
    for (int width = 16; width > 0; width /= 2) total += __shfl_xor_sync(0xffffffffu, total, width);
    if (lane == 0) delta[row] = total;
}

// Pre-pass of the tensor-core path, fused: Δ = rowsum(dO ∘ out) and the row of dq_accumulator set to
// zero, D / 8 threads a row (8 at D = 64, 16 at D = 128), each one 16-byte load of dO and of out and two
// 16-byte stores of zeros (more threads a row, fewer loads each: the faster of the two on an H100).
template <typename T, int D>
__device__ __forceinline__ void attention_backward_prepare(const T* __restrict__ dout, const T* __restrict__ out,
                                                           float* __restrict__ delta,
                                                           float* __restrict__ dq_accumulator, int rows,
                                                           int heads, int length, AttnLayout dout_layout,
                                                           AttnLayout out_layout) {
    constexpr int THREADS_PER_ROW = D / 8, PER_THREAD = 8;   // 8 elements: one 16-byte load of dO, one of out
    const int row = (blockIdx.x * blockDim.x + threadIdx.x) / THREADS_PER_ROW;
    const int part = threadIdx.x % THREADS_PER_ROW;
    if (row >= rows) return;                      // a row's threads leave together
    const long long first = (long long)row * D + part * PER_THREAD;
    const T* dout_part = attn_flat_row(dout, dout_layout, row, heads, length) + part * PER_THREAD;
    const T* out_part = attn_flat_row(out, out_layout, row, heads, length) + part * PER_THREAD;
    const uint4 dout_bits = *reinterpret_cast<const uint4*>(dout_part);
    const uint4 out_bits = *reinterpret_cast<const uint4*>(out_part);
    const T* dout_values = reinterpret_cast<const T*>(&dout_bits);
    const T* out_values = reinterpret_cast<const T*>(&out_bits);
    float total = 0.f;
#pragma unroll
    for (int i = 0; i < PER_THREAD; ++i) total += static_cast<float>(dout_values[i]) * static_cast<float>(out_values[i]);
    const unsigned group_mask = ((1u << THREADS_PER_ROW) - 1u)
                                << (threadIdx.x % 32 / THREADS_PER_ROW * THREADS_PER_ROW);
#pragma unroll
    for (int width = THREADS_PER_ROW / 2; width > 0; width /= 2) total += __shfl_xor_sync(group_mask, total, width);
    if (part == 0) delta[row] = total;
    float4* zero_target = reinterpret_cast<float4*>(dq_accumulator + first);
#pragma unroll
    for (int i = 0; i < PER_THREAD / 4; ++i) zero_target[i] = make_float4(0.f, 0.f, 0.f, 0.f);
}

// dq = dtype(dq_accumulator), 8 elements a thread (count8 = element count / 8; D makes it whole); the
// accumulator is contiguous (B, H, Tq, D), dq lies where its layout says.
template <typename T>
__device__ __forceinline__ void attention_backward_convert8(const float* __restrict__ source, T* __restrict__ target,
                                                            long long count8, int heads, int length, int head_dim,
                                                            AttnLayout target_layout) {
    const int row_chunks = head_dim / 8;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < count8; i += (long long)gridDim.x * blockDim.x) {
        const float4 low = reinterpret_cast<const float4*>(source)[2 * i];
        const float4 high = reinterpret_cast<const float4*>(source)[2 * i + 1];
        uint4 packed;
        packed.x = AttnType<T>::pack(low.x, low.y);
        packed.y = AttnType<T>::pack(low.z, low.w);
        packed.z = AttnType<T>::pack(high.x, high.y);
        packed.w = AttnType<T>::pack(high.z, high.w);
        const long long row = i / row_chunks;
        *reinterpret_cast<uint4*>(attn_flat_row(target, target_layout, row, heads, length) + (i - row * row_chunks) * 8) =
            packed;
    }
}

// ---------------------------------------------------------------------------------------------------
// Tensor-core backward: one block per (key tile, b, kv head).

// 4-byte asynchronous copy global -> shared (zeros when `valid` is false), for L and Δ.
__device__ __forceinline__ void attn_copy4(void* shared, const void* global, bool valid) {
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n"
                 :: "r"(attn_smem_address(shared)), "l"(global), "r"(valid ? 4 : 0));
}

// Convert a pair of 16-row accumulator tiles (two n-tiles of 8 columns) to an A-operand fragment.
template <typename T>
__device__ __forceinline__ void attn_accumulator_to_a(unsigned (&a)[4], const float (&left)[4], const float (&right)[4]) {
    a[0] = AttnType<T>::pack(left[0], left[1]);
    a[1] = AttnType<T>::pack(left[2], left[3]);
    a[2] = AttnType<T>::pack(right[0], right[1]);
    a[3] = AttnType<T>::pack(right[2], right[3]);
}

// acc += A Bᵀ for one warp: A is the warp's 16·M_TILES rows (from warp_row0) of a (rows, D) shared tile,
// B all BLOCK_Q rows of a (BLOCK_Q, D) shared tile; both row-major with row stride STRIDE. Used for
// Sᵀ = K Qᵀ and dPᵀ = V dOᵀ, whose m16n8k16 fragments are laid out the same way.
template <typename T, int D, int BLOCK_Q, int M_TILES, int STRIDE>
__device__ __forceinline__ void attn_warp_product_abt(float (&acc)[M_TILES][BLOCK_Q / 8][4], const T* a_tile,
                                                      const T* b_tile, int warp_row0, int lane) {
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
        unsigned a[M_TILES][4];
#pragma unroll
        for (int m = 0; m < M_TILES; ++m)
            attn_ldmatrix_x4(a[m], a_tile + (warp_row0 + m * 16 + (lane % 8) + ((lane >> 3) & 1) * 8) * STRIDE
                                       + kk * 16 + (lane >> 4) * 8);
#pragma unroll
        for (int nn = 0; nn < BLOCK_Q / 16; ++nn) {
            unsigned b[4];
            attn_ldmatrix_x4(b, b_tile + (nn * 16 + (lane % 8) + (lane >> 4) * 8) * STRIDE
                                    + kk * 16 + ((lane >> 3) & 1) * 8);
#pragma unroll
            for (int m = 0; m < M_TILES; ++m) {
                AttnType<T>::mma(acc[m][2 * nn], a[m], b[0], b[1]);
                AttnType<T>::mma(acc[m][2 * nn + 1], a[m], b[2], b[3]);
            }
        }
    }
}

template <typename T, int D, int BLOCK_Q, int WARPS, int M_TILES, bool PACKED_P, bool DROPOUT>
__device__ __forceinline__ void attention_backward_mma(
    const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v, const T* __restrict__ dout,
    const float* __restrict__ lse, const float* __restrict__ delta, float* __restrict__ dq_accumulator,
    T* __restrict__ dk, T* __restrict__ dv, int heads, int kv_heads, int query_len, int key_len, float scale,
    AttnLayout q_layout, AttnLayout k_layout, AttnLayout v_layout, AttnLayout dout_layout, AttnLayout dk_layout,
    AttnLayout dv_layout, AttnDropout dropout) {
    constexpr int WARP_KEYS = 16 * M_TILES;                   // keys of one warp (M_TILES m-tiles)
    constexpr int BLOCK_K = WARP_KEYS * WARPS, THREADS = 32 * WARPS, STRIDE = D + 8, DS_STRIDE = BLOCK_Q + 8;
    constexpr int ROW_GROUPS = BLOCK_Q / 16;          // dQ tile: warps split its rows into groups of 16 …
    constexpr int COL_GROUPS = WARPS / ROW_GROUPS;    // … and its columns into COL_GROUPS groups
    constexpr int DQ_COLS = D / COL_GROUPS;
    static_assert(WARPS % ROW_GROUPS == 0 && DQ_COLS % 16 == 0, "dQ tile does not split over the warps");
    extern __shared__ __align__(16) unsigned char attn_shared[];
    T* k_tile = reinterpret_cast<T*>(attn_shared);   // (BLOCK_K, STRIDE)
    T* v_tile = k_tile + BLOCK_K * STRIDE;            // (BLOCK_K, STRIDE)
    T* q_tiles = v_tile + BLOCK_K * STRIDE;           // 2 × (BLOCK_Q, STRIDE), double-buffered
    T* dout_tiles = q_tiles + 2 * BLOCK_Q * STRIDE;   // 2 × (BLOCK_Q, STRIDE)
    T* ds_tile = dout_tiles + 2 * BLOCK_Q * STRIDE;   // dSᵀ: (BLOCK_K, DS_STRIDE)
    float* lse_tiles = reinterpret_cast<float*>(ds_tile + BLOCK_K * DS_STRIDE);   // 2 × (BLOCK_Q,)
    float* delta_tiles = lse_tiles + 2 * BLOCK_Q;                                 // 2 × (BLOCK_Q,)

    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int key0 = blockIdx.x * BLOCK_K;
    const int batch_kv_head = blockIdx.y;
    const int batch = batch_kv_head / kv_heads, kv_head = batch_kv_head % kv_heads;
    const int group = heads / kv_heads;
    const int offset = key_len - query_len;
    attn_load_tile<T, BLOCK_K, D, STRIDE, THREADS>(k_tile, k_layout.rows(k, batch, kv_head), k_layout.row, key0,
                                                   key_len);
    attn_load_tile<T, BLOCK_K, D, STRIDE, THREADS>(v_tile, v_layout.rows(v, batch, kv_head), v_layout.row, key0,
                                                   key_len);

    float dk_acc[M_TILES][D / 8][4], dv_acc[M_TILES][D / 8][4];
#pragma unroll
    for (int m = 0; m < M_TILES; ++m)
#pragma unroll
        for (int d = 0; d < D / 8; ++d)
#pragma unroll
            for (int e = 0; e < 4; ++e) dk_acc[m][d][e] = dv_acc[m][d][e] = 0.f;

    const int warp_key0 = warp * WARP_KEYS;                     // this warp's first key, within the tile
    const int my_key0 = key0 + warp_key0 + lane / 4;            // accumulator rows: my_key0 + 16m (+ 8)
    const int first_tile = max(0, key0 - offset) / BLOCK_Q;     // earlier query tiles see none of these keys
    const int query_tiles = (query_len + BLOCK_Q - 1) / BLOCK_Q;
    const int tiles_per_head = query_tiles - first_tile;
    const int steps = group * tiles_per_head;                   // (query head of the group, query tile) pairs
    const bool keys_run_out = key0 + BLOCK_K > key_len;
    const int row_group = warp % ROW_GROUPS, col_group = warp / ROW_GROUPS;

    // Issue the copies of step `step`'s Q, dO, L, Δ into buffer `buffer`. Rows past Tq are zero-filled:
    // there Q = dO = 0 and Δ = 0, so whatever P is, they add nothing to dk, dv (and dq is not stored).
    auto load_step = [&](int step, int buffer) {
        const int head = kv_head * group + step / tiles_per_head, batch_head = batch * heads + head;
        const int query0 = (first_tile + step % tiles_per_head) * BLOCK_Q;
        unsigned step_batch = batch;
        attn_opaque(step_batch);   // the rows' addresses made here, at each step, not kept across the loop
        attn_load_tile<T, BLOCK_Q, D, STRIDE, THREADS>(q_tiles + buffer * BLOCK_Q * STRIDE,
                                                       q_layout.rows(q, step_batch, head), q_layout.row, query0,
                                                       query_len);
        attn_load_tile<T, BLOCK_Q, D, STRIDE, THREADS>(dout_tiles + buffer * BLOCK_Q * STRIDE,
                                                       dout_layout.rows(dout, step_batch, head), dout_layout.row,
                                                       query0, query_len);
        for (int i = threadIdx.x; i < 2 * BLOCK_Q; i += THREADS) {
            const int row = i % BLOCK_Q;
            const bool valid = query0 + row < query_len;
            const float* source = (i < BLOCK_Q ? lse : delta) + (long long)batch_head * query_len + (valid ? query0 + row : 0);
            attn_copy4((i < BLOCK_Q ? lse_tiles : delta_tiles) + buffer * BLOCK_Q + row, source, valid);
        }
    };
    load_step(0, 0);
    attn_copy_commit();

    for (int step = 0; step < steps; ++step) {
        const int buffer = step & 1;
        const int batch_head = batch * heads + kv_head * group + step / tiles_per_head;
        const int query0 = (first_tile + step % tiles_per_head) * BLOCK_Q;
        attn_copy_wait_all();
        __syncthreads();        // this step's tiles have landed; every warp is done with the previous step
        if (step + 1 < steps) load_step(step + 1, buffer ^ 1);
        attn_copy_commit();
        const T* q_tile = q_tiles + buffer * BLOCK_Q * STRIDE;
        const T* dout_tile = dout_tiles + buffer * BLOCK_Q * STRIDE;
        const float* lse_tile = lse_tiles + buffer * BLOCK_Q;
        const float* delta_tile = delta_tiles + buffer * BLOCK_Q;

        // Sᵀ = K Qᵀ and dPᵀ = V dOᵀ: (WARP_KEYS keys of this warp) × BLOCK_Q; each B fragment read from
        // shared memory serves the warp's M_TILES m-tiles
        float st[M_TILES][BLOCK_Q / 8][4], dpt[M_TILES][BLOCK_Q / 8][4];
#pragma unroll
        for (int m = 0; m < M_TILES; ++m)
#pragma unroll
            for (int n = 0; n < BLOCK_Q / 8; ++n)
#pragma unroll
                for (int e = 0; e < 4; ++e) st[m][n][e] = dpt[m][n][e] = 0.f;
        attn_warp_product_abt<T, D, BLOCK_Q, M_TILES, STRIDE>(st, k_tile, q_tile, warp_key0, lane);

        // Pᵀ = exp2((Sᵀ·scale − L)·log2 e), zero where the key is after the query or past Tk
        const bool need_mask = keys_run_out || key0 + warp_key0 + WARP_KEYS - 1 > query0 + offset;
#pragma unroll
        for (int m = 0; m < M_TILES; ++m)
#pragma unroll
            for (int n = 0; n < BLOCK_Q / 8; ++n)
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const int query_local = n * 8 + (lane % 4) * 2 + (e & 1);
                    const int key = my_key0 + m * 16 + (e >> 1) * 8;
                    float p = attn_exp2(fmaf(st[m][n][e], scale, -lse_tile[query_local]) * ATTN_LOG2E);
                    if (need_mask && (key > query0 + query_local + offset || key >= key_len)) p = 0.f;
                    st[m][n][e] = p;
                }
        // dropout: bit 4n + e of kept[m] says whether st[m][n][e] survives (the rows' keys made once a step)
        static_assert(BLOCK_Q / 2 <= 32, "the kept bits of an m-tile fit one word");
        unsigned kept[DROPOUT ? M_TILES : 1];
        if constexpr (DROPOUT) {
            unsigned row_keys[BLOCK_Q / 8][2];
#pragma unroll
            for (int n = 0; n < BLOCK_Q / 8; ++n)
#pragma unroll
                for (int c = 0; c < 2; ++c)
                    row_keys[n][c] = attn_dropout_row_key(
                        dropout, (long long)batch_head * query_len + query0 + n * 8 + (lane % 4) * 2 + c);
#pragma unroll
            for (int m = 0; m < M_TILES; ++m) {
                kept[m] = 0u;
#pragma unroll
                for (int n = 0; n < BLOCK_Q / 8; ++n)
#pragma unroll
                    for (int e = 0; e < 4; ++e)
                        if (attn_dropout_kept(dropout, row_keys[n][e & 1], my_key0 + m * 16 + (e >> 1) * 8))
                            kept[m] |= 1u << (4 * n + e);
                attn_opaque(kept[m]);   // one word, not the comparisons that made it
            }
        }

        // dV += Pᵀ dO   (dO as the B operand: rows are k = queries, contiguous in n = dims: transpose).
        // PACKED_P keeps Pᵀ from here on only as these 16-bit A fragments (half the registers of st), and
        // dSᵀ below multiplies by the rounded P, as dV does.
        unsigned p_packed[PACKED_P ? M_TILES : 1][PACKED_P ? BLOCK_Q / 16 : 1][4];
#pragma unroll
        for (int kk = 0; kk < BLOCK_Q / 16; ++kk) {
            unsigned a[M_TILES][4];
#pragma unroll
            for (int m = 0; m < M_TILES; ++m) {
                if constexpr (DROPOUT) {   // dV takes the kept P (keep_scale comes at the end); dS all of P
                    float left[4], right[4];
#pragma unroll
                    for (int e = 0; e < 4; ++e) {
                        left[e] = (kept[m] >> (8 * kk + e)) & 1u ? st[m][2 * kk][e] : 0.f;
                        right[e] = (kept[m] >> (8 * kk + 4 + e)) & 1u ? st[m][2 * kk + 1][e] : 0.f;
                    }
                    attn_accumulator_to_a<T>(a[m], left, right);
                    if constexpr (PACKED_P) attn_accumulator_to_a<T>(p_packed[m][kk], st[m][2 * kk], st[m][2 * kk + 1]);
                } else {
                    attn_accumulator_to_a<T>(a[m], st[m][2 * kk], st[m][2 * kk + 1]);
                    if constexpr (PACKED_P) {
#pragma unroll
                        for (int e = 0; e < 4; ++e) p_packed[m][kk][e] = a[m][e];
                    }
                }
            }
#pragma unroll
            for (int dd = 0; dd < D / 16; ++dd) {
                unsigned b[4];
                attn_ldmatrix_x4_trans(b, dout_tile + (kk * 16 + (lane % 8) + ((lane >> 3) & 1) * 8) * STRIDE
                                              + dd * 16 + (lane >> 4) * 8);
#pragma unroll
                for (int m = 0; m < M_TILES; ++m) {
                    AttnType<T>::mma(dv_acc[m][2 * dd], a[m], b[0], b[1]);
                    AttnType<T>::mma(dv_acc[m][2 * dd + 1], a[m], b[2], b[3]);
                }
            }
        }

        // dPᵀ = V dOᵀ
        attn_warp_product_abt<T, D, BLOCK_Q, M_TILES, STRIDE>(dpt, v_tile, dout_tile, warp_key0, lane);

        // dSᵀ = Pᵀ ∘ (dPᵀ − Δ), kept in dpt
#pragma unroll
        for (int m = 0; m < M_TILES; ++m)
#pragma unroll
            for (int n = 0; n < BLOCK_Q / 8; ++n)
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    float p;
                    if constexpr (PACKED_P) {   // st[m][n][e] sits in fragment (n / 2, (n % 2)·2 + e / 2), half e % 2
                        const unsigned pair = p_packed[m][n / 2][(n % 2) * 2 + (e >> 1)];
                        p = (e & 1) ? AttnType<T>::high(pair) : AttnType<T>::low(pair);
                    } else {
                        p = st[m][n][e];
                    }
                    float dp = dpt[m][n][e];
                    if constexpr (DROPOUT) dp = (kept[m] >> (4 * n + e)) & 1u ? dp * dropout.scale : 0.f;
                    dpt[m][n][e] = p * (dp - delta_tile[n * 8 + (lane % 4) * 2 + (e & 1)]);
                }

        // dK += dSᵀ Q, and dSᵀ to shared memory for dQ
#pragma unroll
        for (int kk = 0; kk < BLOCK_Q / 16; ++kk) {
            unsigned a[M_TILES][4];
#pragma unroll
            for (int m = 0; m < M_TILES; ++m) {
                attn_accumulator_to_a<T>(a[m], dpt[m][2 * kk], dpt[m][2 * kk + 1]);
                const int row = warp_key0 + m * 16 + lane / 4;
                const int col = kk * 16 + (lane % 4) * 2;
                *reinterpret_cast<unsigned*>(ds_tile + row * DS_STRIDE + col) = a[m][0];
                *reinterpret_cast<unsigned*>(ds_tile + (row + 8) * DS_STRIDE + col) = a[m][1];
                *reinterpret_cast<unsigned*>(ds_tile + row * DS_STRIDE + col + 8) = a[m][2];
                *reinterpret_cast<unsigned*>(ds_tile + (row + 8) * DS_STRIDE + col + 8) = a[m][3];
            }
#pragma unroll
            for (int dd = 0; dd < D / 16; ++dd) {
                unsigned b[4];
                attn_ldmatrix_x4_trans(b, q_tile + (kk * 16 + (lane % 8) + ((lane >> 3) & 1) * 8) * STRIDE
                                              + dd * 16 + (lane >> 4) * 8);
#pragma unroll
                for (int m = 0; m < M_TILES; ++m) {
                    AttnType<T>::mma(dk_acc[m][2 * dd], a[m], b[0], b[1]);
                    AttnType<T>::mma(dk_acc[m][2 * dd + 1], a[m], b[2], b[3]);
                }
            }
        }
        __syncthreads();        // dSᵀ complete

        // dQ_tile = dS K: warp takes rows 16·row_group … and columns DQ_COLS·col_group …
        // (dS as the A operand comes from dSᵀ in shared memory, transposed by ldmatrix)
        float dq_part[DQ_COLS / 8][4];
#pragma unroll
        for (int d = 0; d < DQ_COLS / 8; ++d) dq_part[d][0] = dq_part[d][1] = dq_part[d][2] = dq_part[d][3] = 0.f;
#pragma unroll
        for (int kk = 0; kk < BLOCK_K / 16; ++kk) {
            unsigned a[4];
            attn_ldmatrix_x4_trans(a, ds_tile + (kk * 16 + (lane % 8) + (lane >> 4) * 8) * DS_STRIDE
                                          + row_group * 16 + ((lane >> 3) & 1) * 8);
#pragma unroll
            for (int dd = 0; dd < DQ_COLS / 16; ++dd) {
                unsigned b[4];
                attn_ldmatrix_x4_trans(b, k_tile + (kk * 16 + (lane % 8) + ((lane >> 3) & 1) * 8) * STRIDE
                                              + col_group * DQ_COLS + dd * 16 + (lane >> 4) * 8);
                AttnType<T>::mma(dq_part[2 * dd], a, b[0], b[1]);
                AttnType<T>::mma(dq_part[2 * dd + 1], a, b[2], b[3]);
            }
        }
        float* dq_rows = dq_accumulator + (long long)batch_head * query_len * D;
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            const int query = query0 + row_group * 16 + lane / 4 + r * 8;
            if (query < query_len) {
                float* destination = dq_rows + (long long)query * D + col_group * DQ_COLS + (lane % 4) * 2;
#pragma unroll
                for (int d = 0; d < DQ_COLS / 8; ++d)
                    attn_atomic_add2(destination + d * 8, dq_part[d][2 * r] * scale, dq_part[d][2 * r + 1] * scale);
            }
        }
        // no barrier here: the next step's first __syncthreads comes before anything overwrites ds_tile
        // or this step's Q/dO buffer
    }
    attn_copy_wait_all();

    // dk (times scale) and dv, in the input dtype
#pragma unroll
    for (int m = 0; m < M_TILES; ++m)
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            const int key = my_key0 + m * 16 + r * 8;
            if (key < key_len) {
                T* dk_row = dk_layout.rows(dk, batch, kv_head) + key * dk_layout.row + (lane % 4) * 2;
                T* dv_row = dv_layout.rows(dv, batch, kv_head) + key * dv_layout.row + (lane % 4) * 2;
#pragma unroll
                for (int d = 0; d < D / 8; ++d) {
                    *reinterpret_cast<unsigned*>(dk_row + d * 8) =
                        AttnType<T>::pack(dk_acc[m][d][2 * r] * scale, dk_acc[m][d][2 * r + 1] * scale);
                    if constexpr (DROPOUT)
                        *reinterpret_cast<unsigned*>(dv_row + d * 8) = AttnType<T>::pack(
                            dv_acc[m][d][2 * r] * dropout.scale, dv_acc[m][d][2 * r + 1] * dropout.scale);
                    else
                        *reinterpret_cast<unsigned*>(dv_row + d * 8) = AttnType<T>::pack(dv_acc[m][d][2 * r], dv_acc[m][d][2 * r + 1]);
                }
            }
        }
}

// ---------------------------------------------------------------------------------------------------
// fp32 backward, for checking: dq one warp per query row, dk/dv one warp per key row.

template <int D, bool DROPOUT>
__device__ __forceinline__ void attention_backward_dq_fp32(
    const float* __restrict__ q, const float* __restrict__ k, const float* __restrict__ v,
    const float* __restrict__ dout, const float* __restrict__ lse, const float* __restrict__ delta,
    float* __restrict__ dq, int heads, int kv_heads, int query_len, int key_len, float scale,
    AttnLayout q_layout, AttnLayout k_layout, AttnLayout v_layout, AttnLayout dout_layout, AttnLayout dq_layout,
    AttnDropout dropout) {
    constexpr int PER_LANE = D / 32;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int query = blockIdx.x * 4 + warp;
    const int batch_head = blockIdx.y;
    if (query >= query_len) return;
    const int batch = batch_head / heads, head = batch_head % heads, kv_head = head / (heads / kv_heads);
    const long long row = (long long)batch_head * query_len + query;
    const float* k_rows = k_layout.rows(k, batch, kv_head);
    const float* v_rows = v_layout.rows(v, batch, kv_head);
    const float* q_row = q_layout.rows(q, batch, head) + query * q_layout.row;
    const float* dout_row = dout_layout.rows(dout, batch, head) + query * dout_layout.row;
    float q_values[PER_LANE], dout_values[PER_LANE], dq_values[PER_LANE];
#pragma unroll
    for (int i = 0; i < PER_LANE; ++i) {
        q_values[i] = q_row[lane + 32 * i];
        dout_values[i] = dout_row[lane + 32 * i];
        dq_values[i] = 0.f;
    }
    const float row_lse = lse[row], row_delta = delta[row];
    const int last_key = query + key_len - query_len;
    const unsigned row_key = DROPOUT ? attn_dropout_row_key(dropout, row) : 0u;
    for (int key = 0; key <= last_key; ++key) {
        float score = 0.f, dp = 0.f;
#pragma unroll
        for (int i = 0; i < PER_LANE; ++i) {
            score += q_values[i] * k_rows[key * k_layout.row + lane + 32 * i];
            dp += dout_values[i] * v_rows[key * v_layout.row + lane + 32 * i];
        }
#pragma unroll
        for (int width = 16; width > 0; width /= 2) {
            score += __shfl_xor_sync(0xffffffffu, score, width);
            dp += __shfl_xor_sync(0xffffffffu, dp, width);
        }
        if (DROPOUT) dp = attn_dropout_kept(dropout, row_key, key) ? dp * dropout.scale : 0.f;
        const float ds = expf(score * scale - row_lse) * (dp - row_delta);
#pragma unroll
        for (int i = 0; i < PER_LANE; ++i) dq_values[i] += ds * k_rows[key * k_layout.row + lane + 32 * i];
    }
    float* dq_row = dq_layout.rows(dq, batch, head) + query * dq_layout.row;
#pragma unroll
    for (int i = 0; i < PER_LANE; ++i) dq_row[lane + 32 * i] = dq_values[i] * scale;
}

template <int D, bool DROPOUT>
__device__ __forceinline__ void attention_backward_dkdv_fp32(
    const float* __restrict__ q, const float* __restrict__ k, const float* __restrict__ v,
    const float* __restrict__ dout, const float* __restrict__ lse, const float* __restrict__ delta,
    float* __restrict__ dk, float* __restrict__ dv, int heads, int kv_heads, int query_len, int key_len,
    float scale, AttnLayout q_layout, AttnLayout k_layout, AttnLayout v_layout, AttnLayout dout_layout,
    AttnLayout dk_layout, AttnLayout dv_layout, AttnDropout dropout) {
    constexpr int PER_LANE = D / 32;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int key = blockIdx.x * 4 + warp;
    const int batch_kv_head = blockIdx.y;
    if (key >= key_len) return;
    const int batch = batch_kv_head / kv_heads, kv_head = batch_kv_head % kv_heads;
    const int group = heads / kv_heads;
    const float* k_row = k_layout.rows(k, batch, kv_head) + key * k_layout.row;
    const float* v_row = v_layout.rows(v, batch, kv_head) + key * v_layout.row;
    float k_values[PER_LANE], v_values[PER_LANE], dk_values[PER_LANE], dv_values[PER_LANE];
#pragma unroll
    for (int i = 0; i < PER_LANE; ++i) {
        k_values[i] = k_row[lane + 32 * i];
        v_values[i] = v_row[lane + 32 * i];
        dk_values[i] = dv_values[i] = 0.f;
    }
    const int first_query = max(0, key - (key_len - query_len));
    for (int member = 0; member < group; ++member) {
        const int head = kv_head * group + member;
        const long long head_rows = (long long)(batch * heads + head) * query_len;
        const float* q_rows = q_layout.rows(q, batch, head);
        const float* dout_rows = dout_layout.rows(dout, batch, head);
        for (int query = first_query; query < query_len; ++query) {
            const long long row = head_rows + query;
            const float* q_row = q_rows + query * q_layout.row;
            const float* dout_row = dout_rows + query * dout_layout.row;
            float score = 0.f, dp = 0.f;
#pragma unroll
            for (int i = 0; i < PER_LANE; ++i) {
                score += q_row[lane + 32 * i] * k_values[i];
                dp += dout_row[lane + 32 * i] * v_values[i];
            }
#pragma unroll
            for (int width = 16; width > 0; width /= 2) {
                score += __shfl_xor_sync(0xffffffffu, score, width);
                dp += __shfl_xor_sync(0xffffffffu, dp, width);
            }
            const float p = expf(score * scale - lse[row]);
            float p_kept = p;
            if (DROPOUT) {
                const bool kept = attn_dropout_kept(dropout, attn_dropout_row_key(dropout, row), key);
                p_kept = kept ? p * dropout.scale : 0.f;
                dp = kept ? dp * dropout.scale : 0.f;
            }
            const float ds = p * (dp - delta[row]);
#pragma unroll
            for (int i = 0; i < PER_LANE; ++i) {
                dv_values[i] += p_kept * dout_row[lane + 32 * i];
                dk_values[i] += ds * q_row[lane + 32 * i];
            }
        }
    }
#pragma unroll
    for (int i = 0; i < PER_LANE; ++i) {
        dk_layout.rows(dk, batch, kv_head)[key * dk_layout.row + lane + 32 * i] = dk_values[i] * scale;
        dv_layout.rows(dv, batch, kv_head)[key * dv_layout.row + lane + 32 * i] = dv_values[i];
    }
}

// ---------------------------------------------------------------------------------------------------
// Entry points.

#define ATTN_BACKWARD_LAYOUT_PARAMETERS                                                                 \
    ATTN_LAYOUT_PARAMETERS(q), ATTN_LAYOUT_PARAMETERS(k), ATTN_LAYOUT_PARAMETERS(v),                  \
        ATTN_LAYOUT_PARAMETERS(dout), ATTN_LAYOUT_PARAMETERS(dq), ATTN_LAYOUT_PARAMETERS(dk),         \
        ATTN_LAYOUT_PARAMETERS(dv)

#define ATTN_BACKWARD_DELTA(NAME, TYPE)                                                                \
    extern "C" __global__ void __launch_bounds__(256) NAME(                                            \
        const TYPE* dout, const TYPE* out, float* delta, int rows, int head_dim, int heads, int length, \
        ATTN_LAYOUT_PARAMETERS(dout), ATTN_LAYOUT_PARAMETERS(out)) {                                   \
        attention_backward_delta<TYPE>(dout, out, delta, rows, head_dim, heads, length,                \
                                       ATTN_LAYOUT(dout), ATTN_LAYOUT(out));                           \
    }
#if SELECTED(0, 1, 3)
ATTN_BACKWARD_DELTA(attention_backward_delta_fp32, float)
#endif

// the layouts the tensor-core kernels read (dq goes to the contiguous accumulator)
#define ATTN_MMA_BACKWARD_LAYOUTS                                                                      \
    ATTN_LAYOUT(q), ATTN_LAYOUT(k), ATTN_LAYOUT(v), ATTN_LAYOUT(dout), ATTN_LAYOUT(dk), ATTN_LAYOUT(dv)
#define ATTN_BACKWARD_MMA(NAME, TYPE, DIM, BLOCK_Q, WARPS, M_TILES, MIN_BLOCKS) \
    ATTN_BACKWARD_MMA_BUILD(NAME, TYPE, DIM, BLOCK_Q, WARPS, M_TILES, MIN_BLOCKS, false)
#define ATTN_BACKWARD_MMA_BUILD(NAME, TYPE, DIM, BLOCK_Q, WARPS, M_TILES, MIN_BLOCKS, PACKED_P)        \
    extern "C" __global__ void __launch_bounds__(32 * WARPS, MIN_BLOCKS) NAME(                         \
        const TYPE* q, const TYPE* k, const TYPE* v, const TYPE* dout, const float* lse,               \
        const float* delta, float* dq_accumulator, TYPE* dk, TYPE* dv, int heads, int kv_heads,        \
        int query_len, int key_len, float scale, ATTN_BACKWARD_LAYOUT_PARAMETERS) {                    \
        attention_backward_mma<TYPE, DIM, BLOCK_Q, WARPS, M_TILES, PACKED_P, false>(                   \
            q, k, v, dout, lse, delta, dq_accumulator, dk, dv, heads, kv_heads, query_len, key_len,    \
            scale, ATTN_MMA_BACKWARD_LAYOUTS, AttnDropout{});                                          \
    }                                                                                                  \
    extern "C" __global__ void __launch_bounds__(32 * WARPS, MIN_BLOCKS) NAME##_dropout(               \
        const TYPE* q, const TYPE* k, const TYPE* v, const TYPE* dout, const float* lse,               \
        const float* delta, float* dq_accumulator, TYPE* dk, TYPE* dv, int heads, int kv_heads,        \
        int query_len, int key_len, float scale, ATTN_BACKWARD_LAYOUT_PARAMETERS,                      \
        ATTN_DROPOUT_PARAMETERS) {                                                                     \
        attention_backward_mma<TYPE, DIM, BLOCK_Q, WARPS, M_TILES, PACKED_P, true>(                    \
            q, k, v, dout, lse, delta, dq_accumulator, dk, dv, heads, kv_heads, query_len, key_len,    \
            scale, ATTN_MMA_BACKWARD_LAYOUTS, ATTN_DROPOUT_ARGUMENT);                                  \
    }
// _w4m2q32p (head dim 64, and the backward of GPUs without wgmma): 4 warps × 32 keys = 128-key tiles,
// 32-row query steps (each Q/dO fragment read from shared memory feeds two m-tiles), Pᵀ held as 16-bit A
// fragments once dV is done; _w4 (head dim 128): 4 warps × 16 keys = 64-key tiles, 32-row query steps.
#if SELECTED(64, 2, 2)
ATTN_BACKWARD_MMA_BUILD(attention_backward_bf16_d64_w4m2q32p, __nv_bfloat16, 64, 32, 4, 2, 2, true)
#endif
#if SELECTED(128, 2, 2)
ATTN_BACKWARD_MMA(attention_backward_bf16_d128_w4, __nv_bfloat16, 128, 32, 4, 1, 2)
#endif
#if SELECTED(64, 3, 2)
ATTN_BACKWARD_MMA_BUILD(attention_backward_fp16_d64_w4m2q32p, __half, 64, 32, 4, 2, 2, true)
#endif
#if SELECTED(128, 3, 2)
ATTN_BACKWARD_MMA(attention_backward_fp16_d128_w4, __half, 128, 32, 4, 1, 2)
#endif

#define ATTN_BACKWARD_PREPARE(NAME, TYPE, DIM)                                                         \
    extern "C" __global__ void __launch_bounds__(256) NAME(                                            \
        const TYPE* dout, const TYPE* out, float* delta, float* dq_accumulator, int rows, int heads,   \
        int length, ATTN_LAYOUT_PARAMETERS(dout), ATTN_LAYOUT_PARAMETERS(out)) {                       \
        attention_backward_prepare<TYPE, DIM>(dout, out, delta, dq_accumulator, rows, heads, length,   \
                                              ATTN_LAYOUT(dout), ATTN_LAYOUT(out));                    \
    }
#if SELECTED(64, 2, 3)
ATTN_BACKWARD_PREPARE(attention_backward_prepare_bf16_d64, __nv_bfloat16, 64)
#endif
#if SELECTED(128, 2, 3)
ATTN_BACKWARD_PREPARE(attention_backward_prepare_bf16_d128, __nv_bfloat16, 128)
#endif
#if SELECTED(64, 3, 3)
ATTN_BACKWARD_PREPARE(attention_backward_prepare_fp16_d64, __half, 64)
#endif
#if SELECTED(128, 3, 3)
ATTN_BACKWARD_PREPARE(attention_backward_prepare_fp16_d128, __half, 128)
#endif

#define ATTN_BACKWARD_CONVERT8(NAME, TYPE)                                                             \
    extern "C" __global__ void __launch_bounds__(256) NAME(                                            \
        const float* source, TYPE* target, long long count8, int heads, int length, int head_dim,      \
        ATTN_LAYOUT_PARAMETERS(target)) {                                                              \
        attention_backward_convert8<TYPE>(source, target, count8, heads, length, head_dim,             \
                                          ATTN_LAYOUT(target));                                        \
    }
#if SELECTED(0, 2, 3)
ATTN_BACKWARD_CONVERT8(attention_backward_convert8_bf16, __nv_bfloat16)
#endif
#if SELECTED(0, 3, 3)
ATTN_BACKWARD_CONVERT8(attention_backward_convert8_fp16, __half)
#endif

#define ATTN_BACKWARD_FP32_PAIR(DQ_NAME, DKDV_NAME, DIM, DROPOUT, EXTRA_PARAMETERS, DROPOUT_VALUE)     \
    extern "C" __global__ void __launch_bounds__(128) DQ_NAME(                                         \
        const float* q, const float* k, const float* v, const float* dout, const float* lse,           \
        const float* delta, float* dq, int heads, int kv_heads, int query_len, int key_len,            \
        float scale, ATTN_BACKWARD_LAYOUT_PARAMETERS EXTRA_PARAMETERS) {                               \
        attention_backward_dq_fp32<DIM, DROPOUT>(q, k, v, dout, lse, delta, dq, heads, kv_heads,       \
                                                 query_len, key_len, scale, ATTN_LAYOUT(q),            \
                                                 ATTN_LAYOUT(k), ATTN_LAYOUT(v), ATTN_LAYOUT(dout),    \
                                                 ATTN_LAYOUT(dq), DROPOUT_VALUE);                      \
    }                                                                                                  \
    extern "C" __global__ void __launch_bounds__(128) DKDV_NAME(                                       \
        const float* q, const float* k, const float* v, const float* dout, const float* lse,           \
        const float* delta, float* dk, float* dv, int heads, int kv_heads, int query_len,              \
        int key_len, float scale, ATTN_BACKWARD_LAYOUT_PARAMETERS EXTRA_PARAMETERS) {                  \
        attention_backward_dkdv_fp32<DIM, DROPOUT>(q, k, v, dout, lse, delta, dk, dv, heads, kv_heads, \
                                                   query_len, key_len, scale, ATTN_MMA_BACKWARD_LAYOUTS, \
                                                   DROPOUT_VALUE);                                     \
    }
#define ATTN_DROPOUT_EXTRA , ATTN_DROPOUT_PARAMETERS
#define ATTN_BACKWARD_FP32(DQ_NAME, DKDV_NAME, DIM)                                                    \
    ATTN_BACKWARD_FP32_PAIR(DQ_NAME, DKDV_NAME, DIM, false, , AttnDropout{})                           \
    ATTN_BACKWARD_FP32_PAIR(DQ_NAME##_dropout, DKDV_NAME##_dropout, DIM, true, ATTN_DROPOUT_EXTRA,      \
                            (ATTN_DROPOUT_ARGUMENT))
#if SELECTED(64, 1, 2)
ATTN_BACKWARD_FP32(attention_backward_dq_fp32_d64, attention_backward_dkdv_fp32_d64, 64)
#endif
#if SELECTED(128, 1, 2)
ATTN_BACKWARD_FP32(attention_backward_dq_fp32_d128, attention_backward_dkdv_fp32_d128, 128)
#endif
