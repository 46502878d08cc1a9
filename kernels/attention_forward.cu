// attention_forward.cu: causal grouped-query attention, forward (the FlashAttention-2 algorithm).
//
// Computes, for every batch b, query head h and query row i:
//     S[i, j] = q[b, h, i] · k[b, h // G, j] / sqrt(D)          (G = H / Hkv query heads per kv head)
//     S[i, j] = -inf where j > i + (Tk - Tq)                    (causal, aligned bottom-right)
//     L[b, h, i] = logsumexp_j S[i, j]                          (natural log, fp32)
//     out[b, h, i] = sum_j exp(S[i, j] - L[b, h, i]) v[b, h // G, j]
// without ever writing S to global memory. It must match the NumPy op
// tinygrad_llm.ops.attention.CausalAttention.forward (out, and the saved lse).
//
// Shapes: q, out: (B, H, Tq, D)   k, v: (B, Hkv, Tk, D)   lse: (B, H, Tq) fp32 contiguous
//     Tq <= Tk, D in {64, 128}. q, k, v and out lie anywhere their layouts say (attention_common.cuh's
//     AttnLayout: batch, head and row strides, rows contiguous and 16-byte aligned): e.g. q and k in a
//     token-major (B, T, H + Hkv, D) buffer of rotated heads, v a slice of the packed (B, T, H + 2Hkv, D)
//     projection, out the (B, T, H·D) input of the output projection; contiguous (B, H, T, D) is one case.
//
// Kernels (extern "C", one per dtype, head dim and build):
//   attention_forward_{bf16,fp16}_d64_w4m2, attention_forward_{bf16,fp16}_d128_w8
//     Tensor cores (mma.sync.m16n8k16, fp32 accumulators).
//     Algorithm: one block owns a tile of BLOCK_Q query rows of one (b, h); warp w owns 16·M_TILES
//     consecutive rows and keeps their Q as A fragments in registers. The block walks the key/value
//     tiles of BLOCK_K = 64 keys from key 0 up to the last key its bottom row can see (causality skips
//     the rest; a warp also skips a tile whose keys all come after its rows), and for each tile computes
//     S = Q Kᵀ on tensor cores, masks it (only tiles that cross the diagonal or the end of the keys),
//     updates the running row max m and row sum l (online softmax, ex2.approx with the scale folded
//     into log2 e), rescales the O accumulator and adds P V, with P converted in registers from the S
//     accumulator layout to the A operand layout (no trip through shared memory). Each K/V fragment read
//     from shared memory (ldmatrix) feeds the warp's M_TILES m-tiles. out = O / l,
//     L = (m + log2 l) · ln 2.
//     Builds: _w4m2 = 4 warps × 32 rows (BLOCK_Q 128; half the shared-memory reads per mma), _w8 =
//     8 warps × 16 rows (BLOCK_Q 128). tinygrad_llm.gpu.attention picks one per head dim. The template
//     also takes BLOCK_K and whether Q stays in registers; both builds use 64-key tiles and register Q.
//     Launch: grid (ceil(Tq / BLOCK_Q), B·H), block 32·warps threads. Query tiles are handed out
//     last-first (the longest rows start first).
//     Shared memory (dynamic): Q tile BLOCK_Q × (D + 8) plus two buffers each of K and V, BLOCK_K × (D + 8),
//     all 2-byte: (BLOCK_Q + 4·BLOCK_K)·(D + 8)·2 bytes, e.g. 54 KiB for _w4m2 at D = 64,
//     102 KiB for _w8 at D = 128. Rows are padded by 16 bytes so that ldmatrix reads hit 8 different bank
//     groups. K/V tiles are double-buffered with cp.async: tile t + 1 is in flight while tile t is
//     multiplied. Rows past Tq / Tk are zero-filled, never read from global memory.
//     out is written in the input dtype, lse in fp32.
//   attention_forward_fp32_d{64,128}   plain fp32, for checking: one warp per query row, the online
//     softmax over keys one at a time; lane l holds dims l, l + 32, … Grid (ceil(Tq / 4), B·H),
//     block 128 (4 warps = 4 rows). No shared memory.
//
// Arguments of every kernel: q, k, v, out, lse, H, Hkv, Tq, Tk, scale (= 1/sqrt(D)), then the layouts of
// q, k, v and out, three long long strides each (batch, head, row, in elements).
//
// Attention dropout: every kernel above also exists as NAME_dropout, taking five more arguments
// (seed_base, row_seed, column_seed, threshold, keep_scale; attention_common.cuh's
// ATTN_DROPOUT_PARAMETERS). It computes
//     out[b, h, i] = keep_scale · sum_j M[i, j] exp(S[i, j] - L[b, h, i]) v[b, h // G, j]
// with M the hashed keep mask of attention_common.cuh (row = (b·H + h)·Tq + i, the key j), L still the
// log-sum-exp of the undropped scores: P is normalised before the mask, as in the NumPy op. The mask
// decision is made in registers on the tile of P; the plain kernels are the DROPOUT = false builds of
// the same templates, so their code is what it was.

#include "attention_common.cuh"

// ---------------------------------------------------------------------------------------------------
// Tensor-core forward.

template <typename T, int D, int WARPS, int M_TILES, int BLOCK_K, bool Q_IN_REGISTERS, bool DROPOUT>
__device__ __forceinline__ void attention_forward_mma(const T* __restrict__ q, const T* __restrict__ k,
                                                      const T* __restrict__ v, T* __restrict__ out,
                                                      float* __restrict__ lse, int heads, int kv_heads,
                                                      int query_len, int key_len, float scale,
                                                      AttnLayout q_layout, AttnLayout k_layout,
                                                      AttnLayout v_layout, AttnLayout out_layout,
                                                      AttnDropout dropout) {
    constexpr int WARP_ROWS = 16 * M_TILES;                    // query rows of one warp (M_TILES m-tiles)
    constexpr int BLOCK_Q = WARP_ROWS * WARPS, THREADS = 32 * WARPS, STRIDE = D + 8;
    extern __shared__ __align__(16) unsigned char attn_shared[];
    T* q_tile = reinterpret_cast<T*>(attn_shared);          // (BLOCK_Q, STRIDE)
    T* k_tiles = q_tile + BLOCK_Q * STRIDE;                   // 2 × (BLOCK_K, STRIDE)
    T* v_tiles = k_tiles + 2 * BLOCK_K * STRIDE;              // 2 × (BLOCK_K, STRIDE)

    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int query_tile = gridDim.x - 1 - blockIdx.x;       // longest rows first
    const int batch_head = blockIdx.y;
    const int batch = batch_head / heads, head = batch_head % heads;
    const int kv_head = head / (heads / kv_heads);
    const int query0 = query_tile * BLOCK_Q;
    const int warp_row0 = query0 + warp * WARP_ROWS;          // first query row of this warp
    const int offset = key_len - query_len;                   // query i sits at absolute position i + offset
    const float scale_log2 = scale * ATTN_LOG2E;

    const T* q_rows = q_layout.rows(q, batch, head);
    const T* k_rows = k_layout.rows(k, batch, kv_head);
    const T* v_rows = v_layout.rows(v, batch, kv_head);

    const int key_end = min(key_len, query0 + BLOCK_Q + offset);   // keys this tile can see: [0, key_end)
    const int key_tiles = (key_end + BLOCK_K - 1) / BLOCK_K;

    attn_load_tile<T, BLOCK_Q, D, STRIDE, THREADS>(q_tile, q_rows, q_layout.row, query0, query_len);
    attn_load_tile<T, BLOCK_K, D, STRIDE, THREADS>(k_tiles, k_rows, k_layout.row, 0, key_len);
    attn_load_tile<T, BLOCK_K, D, STRIDE, THREADS>(v_tiles, v_rows, v_layout.row, 0, key_len);
    attn_copy_commit();

    // Q as A fragments: kept in registers for the whole loop, or (Q_IN_REGISTERS false: 32 fewer live
    // registers at M_TILES 2) read again from the Q tile in shared memory for every K tile
    unsigned q_fragments[Q_IN_REGISTERS ? M_TILES : 1][Q_IN_REGISTERS ? D / 16 : 1][4];
    float o[M_TILES][D / 8][4];
    float row_max[M_TILES][2], row_sum[M_TILES][2];   // max in log2 units (score·scale·log2 e); partial sums
#pragma unroll
    for (int m = 0; m < M_TILES; ++m) {
#pragma unroll
        for (int d = 0; d < D / 8; ++d) o[m][d][0] = o[m][d][1] = o[m][d][2] = o[m][d][3] = 0.f;
        row_max[m][0] = row_max[m][1] = ATTN_NEG_INF;
        row_sum[m][0] = row_sum[m][1] = 0.f;
    }
    unsigned row_keys[DROPOUT ? M_TILES : 1][2];   // dropout: key(row) of this thread's rows, for every tile
    if constexpr (DROPOUT) {
#pragma unroll
        for (int m = 0; m < M_TILES; ++m)
#pragma unroll
            for (int r = 0; r < 2; ++r)
                row_keys[m][r] = attn_dropout_row_key(
                    dropout, (long long)batch_head * query_len + warp_row0 + m * 16 + lane / 4 + r * 8);
    }

    for (int tile = 0; tile < key_tiles; ++tile) {
        attn_copy_wait_all();
        __syncthreads();                       // tile `tile` is in shared memory; buffer tile+1 is free
        if (Q_IN_REGISTERS && tile == 0) {
#pragma unroll
            for (int m = 0; m < M_TILES; ++m)
#pragma unroll
                for (int kk = 0; kk < D / 16; ++kk) {
                    const int row = warp * WARP_ROWS + m * 16 + (lane % 8) + ((lane >> 3) & 1) * 8;
                    const int col = kk * 16 + (lane >> 4) * 8;
                    attn_ldmatrix_x4(q_fragments[Q_IN_REGISTERS ? m : 0][Q_IN_REGISTERS ? kk : 0],
                                     q_tile + row * STRIDE + col);
                }
        }
        if (tile + 1 < key_tiles) {
            const int next = (tile + 1) & 1;
            attn_load_tile<T, BLOCK_K, D, STRIDE, THREADS>(k_tiles + next * BLOCK_K * STRIDE, k_rows,
                                                           k_layout.row, (tile + 1) * BLOCK_K, key_len);
            attn_load_tile<T, BLOCK_K, D, STRIDE, THREADS>(v_tiles + next * BLOCK_K * STRIDE, v_rows,
                                                           v_layout.row, (tile + 1) * BLOCK_K, key_len);
        }
        attn_copy_commit();
        const T* k_tile = k_tiles + (tile & 1) * BLOCK_K * STRIDE;
        const T* v_tile = v_tiles + (tile & 1) * BLOCK_K * STRIDE;
        const int key0 = tile * BLOCK_K;
        if (key0 > warp_row0 + WARP_ROWS - 1 + offset) continue;   // every key of the tile is after this warp's rows

        // S = Q Kᵀ: (WARP_ROWS rows of this warp) × BLOCK_K, fp32; each K fragment serves M_TILES m-tiles
        float s[M_TILES][BLOCK_K / 8][4];
#pragma unroll
        for (int m = 0; m < M_TILES; ++m)
#pragma unroll
            for (int n = 0; n < BLOCK_K / 8; ++n) s[m][n][0] = s[m][n][1] = s[m][n][2] = s[m][n][3] = 0.f;
#pragma unroll
        for (int kk = 0; kk < D / 16; ++kk) {
            unsigned q_now[M_TILES][4];
#pragma unroll
            for (int m = 0; m < M_TILES; ++m) {
                if constexpr (Q_IN_REGISTERS) {
#pragma unroll
                    for (int e = 0; e < 4; ++e) q_now[m][e] = q_fragments[m][kk][e];
                } else {
                    const int row = warp * WARP_ROWS + m * 16 + (lane % 8) + ((lane >> 3) & 1) * 8;
                    attn_ldmatrix_x4(q_now[m], q_tile + row * STRIDE + kk * 16 + (lane >> 4) * 8);
                }
            }
#pragma unroll
            for (int nn = 0; nn < BLOCK_K / 16; ++nn) {
                unsigned b[4];   // Kᵀ as the B operand: K rows are n, contiguous in k
                const int row = nn * 16 + (lane % 8) + (lane >> 4) * 8;
                const int col = kk * 16 + ((lane >> 3) & 1) * 8;
                attn_ldmatrix_x4(b, k_tile + row * STRIDE + col);
#pragma unroll
                for (int m = 0; m < M_TILES; ++m) {
                    AttnType<T>::mma(s[m][2 * nn], q_now[m], b[0], b[1]);
                    AttnType<T>::mma(s[m][2 * nn + 1], q_now[m], b[2], b[3]);
                }
            }
        }

        // causal mask and end of keys, only on tiles that need it
        if (key0 + BLOCK_K - 1 > warp_row0 + offset || key0 + BLOCK_K > key_len) {
#pragma unroll
            for (int m = 0; m < M_TILES; ++m)
#pragma unroll
                for (int n = 0; n < BLOCK_K / 8; ++n)
#pragma unroll
                    for (int e = 0; e < 4; ++e) {
                        const int key = key0 + n * 8 + (lane % 4) * 2 + (e & 1);
                        const int query = warp_row0 + m * 16 + lane / 4 + (e >> 1) * 8;
                        if (key > query + offset || key >= key_len) s[m][n][e] = ATTN_NEG_INF;
                    }
        }

        // online softmax: new row max, rescale O and the row sum, P = exp2(S·scale·log2e − m)
#pragma unroll
        for (int m = 0; m < M_TILES; ++m)
#pragma unroll
            for (int r = 0; r < 2; ++r) {
                float tile_max = ATTN_NEG_INF;
#pragma unroll
                for (int n = 0; n < BLOCK_K / 8; ++n) tile_max = fmaxf(tile_max, fmaxf(s[m][n][2 * r], s[m][n][2 * r + 1]));
                tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, 1));
                tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, 2));
                // finite: key 0 is in tile 0 and visible to every row, so row_max is finite after tile 0
                const float new_max = fmaxf(row_max[m][r], tile_max * scale_log2);
                const float alpha = attn_exp2(row_max[m][r] - new_max);
                row_max[m][r] = new_max;
                float tile_sum = 0.f;
#pragma unroll
                for (int n = 0; n < BLOCK_K / 8; ++n) {
                    s[m][n][2 * r] = attn_exp2(fmaf(s[m][n][2 * r], scale_log2, -new_max));
                    s[m][n][2 * r + 1] = attn_exp2(fmaf(s[m][n][2 * r + 1], scale_log2, -new_max));
                    tile_sum += s[m][n][2 * r] + s[m][n][2 * r + 1];
                }
                row_sum[m][r] = row_sum[m][r] * alpha + tile_sum;
                if constexpr (DROPOUT) {   // the row sum took every P; P V takes only the kept ones
#pragma unroll
                    for (int n = 0; n < BLOCK_K / 8; ++n)
#pragma unroll
                        for (int c = 0; c < 2; ++c)
                            if (!attn_dropout_kept(dropout, row_keys[m][r], key0 + n * 8 + (lane % 4) * 2 + c))
                                s[m][n][2 * r + c] = 0.f;
                }
#pragma unroll
                for (int d = 0; d < D / 8; ++d) {
                    o[m][d][2 * r] *= alpha;
                    o[m][d][2 * r + 1] *= alpha;
                }
            }

        // O += P V: P from the S accumulators (two n-tiles of 8 keys = one A fragment of 16 keys)
#pragma unroll
        for (int kk = 0; kk < BLOCK_K / 16; ++kk) {
            unsigned p[M_TILES][4];
#pragma unroll
            for (int m = 0; m < M_TILES; ++m) {
                p[m][0] = AttnType<T>::pack(s[m][2 * kk][0], s[m][2 * kk][1]);
                p[m][1] = AttnType<T>::pack(s[m][2 * kk][2], s[m][2 * kk][3]);
                p[m][2] = AttnType<T>::pack(s[m][2 * kk + 1][0], s[m][2 * kk + 1][1]);
                p[m][3] = AttnType<T>::pack(s[m][2 * kk + 1][2], s[m][2 * kk + 1][3]);
            }
#pragma unroll
            for (int dd = 0; dd < D / 16; ++dd) {
                unsigned b[4];   // V as the B operand: rows are k (keys), contiguous in n (dims): transpose
                const int row = kk * 16 + (lane % 8) + ((lane >> 3) & 1) * 8;
                const int col = dd * 16 + (lane >> 4) * 8;
                attn_ldmatrix_x4_trans(b, v_tile + row * STRIDE + col);
#pragma unroll
                for (int m = 0; m < M_TILES; ++m) {
                    AttnType<T>::mma(o[m][2 * dd], p[m], b[0], b[1]);
                    AttnType<T>::mma(o[m][2 * dd + 1], p[m], b[2], b[3]);
                }
            }
        }
    }
    attn_copy_wait_all();

    // out = O / l, L = (m + log2 l) · ln 2
#pragma unroll
    for (int m = 0; m < M_TILES; ++m)
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            float total = row_sum[m][r];
            total += __shfl_xor_sync(0xffffffffu, total, 1);
            total += __shfl_xor_sync(0xffffffffu, total, 2);
            const int query = warp_row0 + m * 16 + lane / 4 + r * 8;
            if (query < query_len) {
                const float inverse = (DROPOUT ? dropout.scale : 1.f) / total;
                T* out_row = out_layout.rows(out, batch, head) + query * out_layout.row;
#pragma unroll
                for (int d = 0; d < D / 8; ++d) {
                    const unsigned packed = AttnType<T>::pack(o[m][d][2 * r] * inverse, o[m][d][2 * r + 1] * inverse);
                    *reinterpret_cast<unsigned*>(out_row + d * 8 + (lane % 4) * 2) = packed;
                }
                if (lane % 4 == 0)
                    lse[(long long)batch_head * query_len + query] = (row_max[m][r] + log2f(total)) * ATTN_LN2;
            }
        }
}

// ---------------------------------------------------------------------------------------------------
// fp32 forward, for checking: one warp per query row.

template <int D, bool DROPOUT>
__device__ __forceinline__ void attention_forward_fp32(const float* __restrict__ q, const float* __restrict__ k,
                                                       const float* __restrict__ v, float* __restrict__ out,
                                                       float* __restrict__ lse, int heads, int kv_heads,
                                                       int query_len, int key_len, float scale,
                                                       AttnLayout q_layout, AttnLayout k_layout,
                                                       AttnLayout v_layout, AttnLayout out_layout,
                                                       AttnDropout dropout) {
    constexpr int PER_LANE = D / 32;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int query = blockIdx.x * 4 + warp;
    const int batch_head = blockIdx.y;
    if (query >= query_len) return;
    const int batch = batch_head / heads, head = batch_head % heads;
    const int kv_head = head / (heads / kv_heads);
    const float* q_row = q_layout.rows(q, batch, head) + query * q_layout.row;
    const float* k_rows = k_layout.rows(k, batch, kv_head);
    const float* v_rows = v_layout.rows(v, batch, kv_head);

    float q_values[PER_LANE], o[PER_LANE];
#pragma unroll
    for (int i = 0; i < PER_LANE; ++i) { q_values[i] = q_row[lane + 32 * i]; o[i] = 0.f; }
    float row_max = ATTN_NEG_INF, row_sum = 0.f;
    const int last_key = query + key_len - query_len;          // inclusive
    const unsigned row_key = DROPOUT ? attn_dropout_row_key(dropout, (long long)batch_head * query_len + query) : 0u;
    for (int key = 0; key <= last_key; ++key) {
        float score = 0.f;
#pragma unroll
        for (int i = 0; i < PER_LANE; ++i) score += q_values[i] * k_rows[key * k_layout.row + lane + 32 * i];
#pragma unroll
        for (int width = 16; width > 0; width /= 2) score += __shfl_xor_sync(0xffffffffu, score, width);
        score *= scale;
        const float new_max = fmaxf(row_max, score);
        const float alpha = expf(row_max - new_max);
        const float p = expf(score - new_max);
        row_sum = row_sum * alpha + p;
        const float p_kept = DROPOUT && !attn_dropout_kept(dropout, row_key, key) ? 0.f : p;
#pragma unroll
        for (int i = 0; i < PER_LANE; ++i) o[i] = o[i] * alpha + p_kept * v_rows[key * v_layout.row + lane + 32 * i];
        row_max = new_max;
    }
    float* out_row = out_layout.rows(out, batch, head) + query * out_layout.row;
#pragma unroll
    for (int i = 0; i < PER_LANE; ++i) out_row[lane + 32 * i] = DROPOUT ? o[i] * dropout.scale / row_sum : o[i] / row_sum;
    if (lane == 0) lse[(long long)batch_head * query_len + query] = row_max + logf(row_sum);
}

// ---------------------------------------------------------------------------------------------------
// Entry points.

#define ATTN_FORWARD_LAYOUT_PARAMETERS                                                                 \
    ATTN_LAYOUT_PARAMETERS(q), ATTN_LAYOUT_PARAMETERS(k), ATTN_LAYOUT_PARAMETERS(v),                  \
        ATTN_LAYOUT_PARAMETERS(out)
#define ATTN_FORWARD_LAYOUTS ATTN_LAYOUT(q), ATTN_LAYOUT(k), ATTN_LAYOUT(v), ATTN_LAYOUT(out)

#define ATTN_FORWARD_MMA_BUILD(NAME, TYPE, DIM, WARPS, M_TILES, BLOCK_K, Q_IN_REGISTERS, MIN_BLOCKS)   \
    extern "C" __global__ void __launch_bounds__(32 * WARPS, MIN_BLOCKS) NAME(                         \
        const TYPE* q, const TYPE* k, const TYPE* v, TYPE* out, float* lse, int heads, int kv_heads,   \
        int query_len, int key_len, float scale, ATTN_FORWARD_LAYOUT_PARAMETERS) {                     \
        attention_forward_mma<TYPE, DIM, WARPS, M_TILES, BLOCK_K, Q_IN_REGISTERS, false>(              \
            q, k, v, out, lse, heads, kv_heads, query_len, key_len, scale, ATTN_FORWARD_LAYOUTS,       \
            AttnDropout{});                                                                            \
    }                                                                                                  \
    extern "C" __global__ void __launch_bounds__(32 * WARPS, MIN_BLOCKS) NAME##_dropout(               \
        const TYPE* q, const TYPE* k, const TYPE* v, TYPE* out, float* lse, int heads, int kv_heads,   \
        int query_len, int key_len, float scale, ATTN_FORWARD_LAYOUT_PARAMETERS,                       \
        ATTN_DROPOUT_PARAMETERS) {                                                                     \
        attention_forward_mma<TYPE, DIM, WARPS, M_TILES, BLOCK_K, Q_IN_REGISTERS, true>(               \
            q, k, v, out, lse, heads, kv_heads, query_len, key_len, scale, ATTN_FORWARD_LAYOUTS,       \
            ATTN_DROPOUT_ARGUMENT);                                                                    \
    }
#define ATTN_FORWARD_MMA(NAME, TYPE, DIM, WARPS, M_TILES) \
    ATTN_FORWARD_MMA_BUILD(NAME, TYPE, DIM, WARPS, M_TILES, 64, true, 1)

// _w4m2 (head dim 64, and the forward of GPUs without wgmma): 4 warps × 32 rows, each K/V fragment read
// from shared memory feeding two m-tiles; _w8 (head dim 128): 8 warps × 16 rows.
#if SELECTED(64, 2, 1)
ATTN_FORWARD_MMA(attention_forward_bf16_d64_w4m2, __nv_bfloat16, 64, 4, 2)
#endif
#if SELECTED(128, 2, 1)
ATTN_FORWARD_MMA(attention_forward_bf16_d128_w8, __nv_bfloat16, 128, 8, 1)
#endif
#if SELECTED(64, 3, 1)
ATTN_FORWARD_MMA(attention_forward_fp16_d64_w4m2, __half, 64, 4, 2)
#endif
#if SELECTED(128, 3, 1)
ATTN_FORWARD_MMA(attention_forward_fp16_d128_w8, __half, 128, 8, 1)
#endif

#define ATTN_FORWARD_FP32(NAME, DIM)                                                                   \
    extern "C" __global__ void __launch_bounds__(128) NAME(                                            \
        const float* q, const float* k, const float* v, float* out, float* lse, int heads,             \
        int kv_heads, int query_len, int key_len, float scale, ATTN_FORWARD_LAYOUT_PARAMETERS) {       \
        attention_forward_fp32<DIM, false>(q, k, v, out, lse, heads, kv_heads, query_len, key_len,     \
                                           scale, ATTN_FORWARD_LAYOUTS, AttnDropout{});                \
    }                                                                                                  \
    extern "C" __global__ void __launch_bounds__(128) NAME##_dropout(                                  \
        const float* q, const float* k, const float* v, float* out, float* lse, int heads,             \
        int kv_heads, int query_len, int key_len, float scale, ATTN_FORWARD_LAYOUT_PARAMETERS,         \
        ATTN_DROPOUT_PARAMETERS) {                                                                     \
        attention_forward_fp32<DIM, true>(q, k, v, out, lse, heads, kv_heads, query_len, key_len,      \
                                          scale, ATTN_FORWARD_LAYOUTS, ATTN_DROPOUT_ARGUMENT);         \
    }

#if SELECTED(64, 1, 1)
ATTN_FORWARD_FP32(attention_forward_fp32_d64, 64)
#endif
#if SELECTED(128, 1, 1)
ATTN_FORWARD_FP32(attention_forward_fp32_d128, 128)
#endif
