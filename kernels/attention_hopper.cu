// attention_hopper.cu: causal grouped-query attention, forward and backward, on Hopper's wgmma (sm_90a).
//
// The same functions as attention_forward.cu and attention_backward.cu (FlashAttention-2's algorithm:
// online softmax forward saving L = logsumexp per row; backward recomputing P tile by tile from L, with
// the Δ = rowsum(dO ∘ out) pre-pass of attention_backward.cu), for head dims D = 64 and 128 (one template
// each, D a parameter) and bf16/fp16, written for the warpgroup matrix instructions
// (kernels/attention_hopper.cuh explains wgmma, the swizzled shared-memory tiles and the register
// layouts). They must match the NumPy op tinygrad_llm.ops.attention.CausalAttention (forward: out and the
// saved lse; backward: dq, dk, dv).
//
//     S = q kᵀ / sqrt(D),  S[i, j] = −inf where j > i + (Tk − Tq)  (causal, aligned bottom-right)
//     out = softmax(S) v,  L = logsumexp(S)  (fp32, natural log)
//     P = exp(S − L),  dv = Pᵀ dO,  dS = P ∘ (dO vᵀ − Δ),  dq = dS k / sqrt(D),  dk = dSᵀ q / sqrt(D)
// (dk, dv summed over the G = H / Hkv query heads of a kv head).
//
// Shapes: q, out, dO: (B, H, Tq, D); k, v, dk, dv: (B, Hkv, Tk, D); L, Δ: (B, H, Tq) fp32 and
// dq_accumulator: (B, H, Tq, D) fp32, zeroed by the caller, both contiguous. q, k, v, out, dO, dk and dv
// lie where their layouts say (attention_common.cuh's AttnLayout: batch, head and row strides in
// elements, rows contiguous and 16-byte aligned), as in attention_forward.cu and attention_backward.cu.
//
// attention_forward_{bf16,fp16}_d64_wp{2,3}, attention_forward_{bf16,fp16}_d128_wp2(q, k, v, out, lse, H, Hkv,
//                                                  Tq, Tk, scale, B, layouts of q, k, v, out)
//   wpC: C compute warpgroups (64 query rows each: a work item is a 64C-row query tile of one (b, h)) and a
//   producer warpgroup that does all the loading. Persistent: grid min(items, multiprocessors), block
//   128 · (C + 1) (384 for wp2, 512 for wp3). Dynamic shared memory: two Q tiles of 64C rows, two buffers
//   of 128-key K tiles and three of V tiles, 14 mbarriers, plus 1 KiB to align the tiles: 230 528 bytes
//   (wp2, D = 128), 115 840 (wp2, D = 64), 132 224 (wp3, D = 64).
//   When there are more items than blocks, block x takes the pairs x, x + grid, … of tiles p and
//   ceil(Tq / 64C) − 1 − p of one (b, h) (equal work in every pair; the blocks at work at one time share
//   few heads, whose K and V stay in L2; see work() below). The tiles are aligned to the end of the
//   queries, so that a partial tile is the first (it sees the fewest keys).
//   The producer copies each item's Q tile and its K and V tiles by cp.async, a buffer ahead of use; each
//   buffer has a "full" mbarrier (the copies arrive on it as they land) and an "empty" one (the compute
//   warps arrive when done with it), so the compute warpgroups never meet at a block-wide barrier.
//   Warpgroup w owns query rows 64w … 64w + 63 of the item. Per K/V tile t, software-pipelined inside the
//   warpgroup as in FlashAttention-3:
//     issue S = Q Kᵀ  (D / 16 × m64n128k16, B = K K-major; A = Q: with two compute warpgroups register
//       fragments, read again (ldmatrix) before each tile; with three, from shared memory, as their 160
//       registers a thread hold S, P and O but not Q as well)
//     issue O += P V of tile t − 1  (8 × m64nDk16, A = P of tile t − 1 in registers, B = V MN-major)
//     wait for S only; mask (only on tiles that cross the diagonal or the end of the keys) and online
//     softmax in registers (row max and sum over the quad of lanes holding a row, exp2 with the scale
//     folded in); wait for P V; rescale O; P = S converted to bf16/fp16 for tile t + 1's product.
//   After the last tile, its P V.
//   The source waits for P V after the softmax, but ptxas places that wait before the row maxima (nothing
//   ties the register-only softmax to it), so P V runs beside the mask, not the exponentials.
//   The compute warpgroups take turns issuing a tile's products, round robin (warpgroup w after w − 1,
//   warpgroup 0 after the last one's previous tile: named barriers 1 … C), so that one warpgroup's
//   softmax runs while the tensor cores work on the others' products.
//   Tiles that need no mask run a copy of the tile's code without it (see the loop).
//   O takes D / 2 float registers a thread (64 at D = 128).
//   out = O / l, L = m · scale + ln l.
//   tinygrad_llm.gpu.attention picks the build: wp2 at D = 128; at D = 64 wp3 where a replay of work()'s
//   assignment predicts its busiest block done sooner (wp3 is faster per row, but its larger items can
//   leave the blocks less evenly loaded), wp2 otherwise.
//
// attention_backward_{bf16,fp16}_d{64,128}_wk(q, k, v, dO, L, Δ, dq_accumulator, dk, dv, H, Hkv, Tq, Tk,
//                                              scale, chunk, layouts of q, k, v, dO, dq (unread), dk, dv)
//   Launch: grid B·Hkv·ceil(Tk / 128) (one dimension), block 384 = 3 warpgroups (two compute
//   warpgroups and one that adds dQ), 171 008 (D = 64) or 184 320 (D = 128) bytes of dynamic shared
//   memory (listed above the function below). One block a (b, kv head, 128-key block), in chunks of
//   `chunk` (b, kv head) pairs; inside a chunk key block 0 of every pair first, then key block 1, …
//   (AttnBackwardWork). Key block j is seen by the queries from its diagonal on, so the blocks that start
//   first have the most work and the last wave is short ones, which keeps the multiprocessors evenly
//   busy to the end (with a head's key blocks side by side instead, a GQA backward at D = 128 took 25 %
//   longer, the last wave ragged); a chunk's Q, dO and dq_accumulator stay in L2, so the dq reductions
//   resolve there, not in DRAM (with no chunks, all heads' key blocks 0 first, the D = 128 backward took
//   a third longer). setmaxnreg gives the compute warpgroups more registers and the dQ warpgroup fewer. The
//   block loops over the G query heads of its group and the query steps (128 rows at D = 64, 64 at
//   D = 128) that can see its keys (Q, dO, L, Δ of step s + 1 are copied while step s computes); the
//   per-step work is described above attention_backward_wk. The dQ warpgroup (2) takes each full stage
//   of dQ · scale and adds it to dq_accumulator with red.global.add.v4.f32, whole rows an instruction
//   (two at D = 64, one at D = 128), then hands the stage back (named barriers 2 and 4; the compute
//   warpgroups sync among themselves on barrier 1): issued by the compute warps themselves, the same
//   reductions stall them on a full load/store queue.
//   dk = dK · scale and dv = dV are written once, in the input dtype. dq's summation order varies
//   between runs (reductions across key blocks); dk and dv are deterministic.

// Attention dropout: both kernels also exist as NAME_dropout, taking five more arguments (seed_base,
// row_seed, column_seed, threshold, keep_scale; attention_common.cuh's ATTN_DROPOUT_PARAMETERS), with the
// mask and formulas of attention_forward.cu's and attention_backward.cu's dropout kernels: the forward
// zeroes the dropped P in registers after the row sum has taken it, before O += P V, and scales out by
// keep_scale; the backward writes the kept P to the P tile (dV = Pᵀ dO, scaled by keep_scale at the store) and forms
// dS = P ∘ (keep_scale · M ∘ dP − Δ). The plain kernels are the DROPOUT = false builds.
//
// The kernels exist only for sm_90a (compiled with NVRTC's -arch=sm_90a by tinygrad_llm.gpu.attention,
// or nvcc -gencode=arch=compute_90a,code=sm_90a); built for anything else they trap.

#include "attention_hopper.cuh"


#ifdef ATTN_HOPPER

// The dynamic shared memory, rounded up to a 1024-byte boundary (the swizzle needs it; callers ask for
// 1 KiB more than they use).
__device__ __forceinline__ unsigned char* attn_aligned_shared() {
    extern __shared__ __align__(16) unsigned char attn_hopper_shared[];
    const unsigned address = attn_smem_address(attn_hopper_shared);
    return attn_hopper_shared + (((address + 1023u) & ~1023u) - address);
}

// ---------------------------------------------------------------------------------------------------
// Forward.

// out = O / l and L = m · scale + ln l for this thread's two rows (row, row + 8) inside the sequence;
// row_sum holds the thread's partial sums (its quad of lanes adds them up here). `out` points at the
// (b, h)'s first row, its rows out_row_stride elements apart.
template <typename T, bool DROPOUT, int D>
__device__ __forceinline__ void attn_forward_store(const float (&o)[D / 2], const float (&row_max)[2],
                                                   float (&row_sum)[2], T* __restrict__ out, float* __restrict__ lse,
                                                   int batch_head, int row, int query_len, float scale_log2,
                                                   float keep_scale, int out_row_stride) {
    const int t = threadIdx.x & 3;
    #pragma unroll
    for (int r = 0; r < 2; ++r) {
        row_sum[r] += __shfl_xor_sync(0xffffffffu, row_sum[r], 1);
        row_sum[r] += __shfl_xor_sync(0xffffffffu, row_sum[r], 2);
        const int out_row = row + 8 * r;
        if (out_row >= query_len || out_row < 0) continue;   // (wp's first item may start before row 0)
        const float inverse = (DROPOUT ? keep_scale : 1.f) / row_sum[r];
        T* out_line = out + out_row * out_row_stride;
        #pragma unroll
        for (int j = 0; j < D / 8; ++j)
            *reinterpret_cast<unsigned*>(out_line + 8 * j + 2 * t) =
                AttnType<T>::pack(o[4 * j + 2 * r] * inverse, o[4 * j + 2 * r + 1] * inverse);
        if (t == 0)
            lse[(long long)batch_head * query_len + out_row] = (row_max[r] * scale_log2 + __log2f(row_sum[r])) * ATTN_LN2;
    }
}

// mbarrier helpers (shared::cta): init with an arrival count; arrive; wait for the phase of the given
// parity to complete; an arrival when all of this thread's earlier cp.async copies have landed.
__device__ __forceinline__ void attn_barrier_init(unsigned long long* barrier, unsigned count) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" :: "r"(attn_smem_address(barrier)), "r"(count) : "memory");
}
__device__ __forceinline__ void attn_barrier_arrive(unsigned long long* barrier) {
    asm volatile("{\n .reg .b64 state;\n mbarrier.arrive.shared::cta.b64 state, [%0];\n}\n"
                 :: "r"(attn_smem_address(barrier)) : "memory");
}
__device__ __forceinline__ void attn_barrier_wait(unsigned long long* barrier, unsigned parity) {
    unsigned done;
    do {
        asm volatile("{\n .reg .pred p;\n mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n selp.u32 %0, 1, 0, p;\n}\n"
                     : "=r"(done) : "r"(attn_smem_address(barrier)), "r"(parity) : "memory");
    } while (!done);
}
__device__ __forceinline__ void attn_barrier_arrive_copies(unsigned long long* barrier) {
    asm volatile("cp.async.mbarrier.arrive.noinc.shared::cta.b64 [%0];\n" :: "r"(attn_smem_address(barrier)) : "memory");
}

// wpC (the comment at the top of the file has the outline). Block 128 · (C + 1): warpgroups 0 … C − 1
// compute (warpgroup w takes rows 64w … 64w + 63 of a 64C-row item), warpgroup C only loads: each item's
// Q tile (2 buffers) and its K and V tiles (2 and 3 buffers), by cp.async. Each buffer has a "full"
// mbarrier (128 producer arrivals, made by the copies themselves as they land) and an "empty" one (4C
// arrivals, lane 0 of each compute warp once its warpgroup is done with the buffer: K after S, V after
// P V, Q after the item's last S or fragments). setmaxnreg: 240 (C = 2) or 160 (C = 3) registers for the
// compute warpgroups, 24 or 32 for the producer, which is exactly what the block launched with
// (2 · 128 · 240 + 128 · 24 = 384 · 168, 3 · 128 · 160 + 128 · 32 = 512 · 128): setmaxnreg.inc waits
// for as long as the pool lacks the registers it asks for.
template <typename T, bool DROPOUT, int D, int CONSUMERS>
__device__ __forceinline__ void attention_forward_wp(const T* __restrict__ q, const T* __restrict__ k,
                                                     const T* __restrict__ v, T* __restrict__ out,
                                                     float* __restrict__ lse, int heads, int kv_heads,
                                                     int query_len, int key_len, float scale, int batches,
                                                     AttnLayout q_layout, AttnLayout k_layout,
                                                     AttnLayout v_layout, AttnLayout out_layout,
                                                     AttnDropout dropout) {
    static_assert(CONSUMERS == 2 || CONSUMERS == 3, "two or three compute warpgroups");
    constexpr int BLOCK_Q = 64 * CONSUMERS, BLOCK_K = 128, STEPS = D / 16;
    constexpr int BLOCK = 128 * 128;                          // bytes of a 64-column block of a 128-row tile
    constexpr int TILE = BLOCK * D / 64;                      // bytes of a 128-row K or V tile
    constexpr int Q_BLOCK = BLOCK_Q * 128, Q_TILE = Q_BLOCK * D / 64;   // the same for the Q tile
    constexpr unsigned LEADING = D == 64 ? 1024 : BLOCK;      // V's leading byte offset (unused at D = 64)
    // S = Q Kᵀ takes Q from shared memory with three compute warpgroups (their 160 registers hold S, P, O
    // but not Q's fragments as well), from registers (read before each tile) with two
    constexpr bool Q_SHARED = CONSUMERS == 3;
    unsigned char* q_tiles = attn_aligned_shared();           // 2 buffers
    unsigned char* k_tiles = q_tiles + 2 * Q_TILE;            // 2 buffers
    unsigned char* v_tiles = k_tiles + 2 * TILE;              // 3 buffers
    unsigned long long* barriers = reinterpret_cast<unsigned long long*>(v_tiles + 3 * TILE);
    unsigned long long* q_full = barriers;                    // [2]
    unsigned long long* q_empty = barriers + 2;               // [2]
    unsigned long long* k_full = barriers + 4;                // [2]
    unsigned long long* k_empty = barriers + 6;               // [2]
    unsigned long long* v_full = barriers + 8;                // [3]
    unsigned long long* v_empty = barriers + 11;              // [3]

    const int tid = threadIdx.x, warp = (tid >> 5) & 3, lane = tid & 31;
    const int group = __shfl_sync(0xffffffffu, tid >> 7, 0);   // the warpgroup, known warp-uniform
    const int g = lane >> 2, t = lane & 3;
    const int q_blocks = (query_len + BLOCK_Q - 1) / BLOCK_Q, items = batches * heads * q_blocks;
    const int offset = key_len - query_len;
    const float scale_log2 = scale * ATTN_LOG2E;

    if (tid == 0) {
        for (int i = 0; i < 2; ++i) {
            attn_barrier_init(q_full + i, 128);
            attn_barrier_init(q_empty + i, 4 * CONSUMERS);
            attn_barrier_init(k_full + i, 128);
            attn_barrier_init(k_empty + i, 4 * CONSUMERS);
        }
        for (int i = 0; i < 3; ++i) {
            attn_barrier_init(v_full + i, 128);
            attn_barrier_init(v_empty + i, 4 * CONSUMERS);
        }
    }
    __syncthreads();

    // The block's work: pairs of tiles p and q_blocks − 1 − p, the long one first. The tiles are aligned to
    // the end of the queries: tile p starts at row p · BLOCK_Q − pad, so that when BLOCK_Q does
    // not divide Tq the partial tile is the first (the one that sees the fewest keys), not the last. Its rows
    // before 0 are zero-filled, never stored, and see no key (their softmax is garbage, in their own rows).
    const int pad = q_blocks * BLOCK_Q - query_len;
    const int pairs_per_head = (q_blocks + 1) / 2, pairs = batches * heads * pairs_per_head;
    const bool paired = items > (int)gridDim.x;
    struct Work { int batch_head, q0, tiles; bool valid; const T* k_head; const T* v_head; };
    auto work = [&](int index) {
        Work w;
        int tile;
        if (paired) {
            const int pair = (index >> 1) * (int)gridDim.x + (int)blockIdx.x, p = pair % pairs_per_head;
            w.valid = pair < pairs && !((index & 1) && 2 * p + 1 == q_blocks);
            w.batch_head = w.valid ? pair / pairs_per_head : 0;
            tile = (index & 1) ? p : q_blocks - 1 - p;
        } else {
            w.valid = index == 0;
            w.batch_head = blockIdx.x / q_blocks;
            tile = q_blocks - 1 - blockIdx.x % q_blocks;
        }
        w.q0 = tile * BLOCK_Q - pad;
        const int head = w.batch_head % heads, batch = w.batch_head / heads, kv_head = head / (heads / kv_heads);
        w.k_head = k_layout.rows(k, batch, kv_head);
        w.v_head = v_layout.rows(v, batch, kv_head);
        const int key_end = min(key_len, w.q0 + BLOCK_Q + offset);
        w.tiles = (key_end + BLOCK_K - 1) / BLOCK_K;
        return w;
    };
    // the item after item `item` (a middle tile has no short half), and its index
    auto following = [&](int item, int& next_item) {
        next_item = item + 1;
        Work next = work(next_item);
        if (!next.valid && !(item & 1)) next = work(next_item = item + 2);
        return next;
    };

    if (group == CONSUMERS) {                                 // the producer
        attn_set_max_registers_dec<CONSUMERS == 2 ? 24 : 32>();
        int item = 0, q_buffer = 0, k_buffer = 0, v_buffer = 0;
        unsigned q_uses = 0, k_uses = 0, v_uses = 0;          // bit b: parity of buffer b's fills so far
        Work current = work(0);
        while (current.valid) {
            // an empty barrier's first wait (parity 1 on a fresh barrier) passes at once
            attn_barrier_wait(q_empty + q_buffer, ((q_uses >> q_buffer) & 1) ^ 1);
            attn_load_swizzled<T, BLOCK_Q, 128, D>(q_tiles + q_buffer * Q_TILE,
                                                   q_layout.rows(q, current.batch_head / heads, current.batch_head % heads),
                                                   q_layout.row, current.q0, query_len);
            attn_barrier_arrive_copies(q_full + q_buffer);
            q_uses ^= 1u << q_buffer;
            q_buffer ^= 1;
            for (int tile = 0; tile < current.tiles; ++tile) {
                attn_barrier_wait(k_empty + k_buffer, ((k_uses >> k_buffer) & 1) ^ 1);
                attn_load_swizzled<T, BLOCK_K, 128, D>(k_tiles + k_buffer * TILE, current.k_head, k_layout.row,
                                                       tile * BLOCK_K, key_len);
                attn_barrier_arrive_copies(k_full + k_buffer);
                k_uses ^= 1u << k_buffer;
                k_buffer ^= 1;
                attn_barrier_wait(v_empty + v_buffer, ((v_uses >> v_buffer) & 1) ^ 1);
                attn_load_swizzled<T, BLOCK_K, 128, D>(v_tiles + v_buffer * TILE, current.v_head, v_layout.row,
                                                       tile * BLOCK_K, key_len);
                attn_barrier_arrive_copies(v_full + v_buffer);
                v_uses ^= 1u << v_buffer;
                v_buffer = v_buffer == 2 ? 0 : v_buffer + 1;
            }
            int next_item;
            current = following(item, next_item);
            item = next_item;
        }
        asm volatile("cp.async.wait_all;\n" ::: "memory");   // the last copies land before the warps leave
        return;
    }
    attn_set_max_registers_inc<CONSUMERS == 2 ? 240 : 160>();

    int q_buffer = 0, k_buffer = 0, v_buffer = 0;            // the buffers of the current Q, K and V tiles
    unsigned q_uses = 0, k_uses = 0, v_uses = 0;              // bit b: parity of buffer b's fills consumed
    int v_before = 2;                                         // the V buffer of the tile before the current one
    int item = 0, turns = 0;
    Work current = work(0);
    if (!current.valid) return;
    // lane 0 of each warp releases a buffer for its warpgroup, after the warp's own uses
    auto release = [&](unsigned long long* barrier) {
        __syncwarp();
        if (lane == 0) attn_barrier_arrive(barrier);
    };
    while (true) {
        int next_item;
        const Work next = following(item, next_item);
        const bool has_next = next.valid;
        const int row = current.q0 + 64 * group + 16 * warp + g;   // this thread's rows: row and row + 8
        const int unmasked_end = min(current.q0 + offset + 1, key_len);
        unsigned q_fragments[STEPS][4];
        unsigned p_fragments[BLOCK_K / 16][4];
        float s[64], o[D / 2], row_max[2] = {ATTN_NEG_INF, ATTN_NEG_INF}, row_sum[2] = {0.f, 0.f};
        #pragma unroll
        for (int i = 0; i < D / 2; ++i) o[i] = 0.f;
        unsigned row_keys[2];
        if constexpr (DROPOUT) {
            #pragma unroll
            for (int r = 0; r < 2; ++r)
                row_keys[r] = attn_dropout_row_key(dropout, (long long)current.batch_head * query_len + row + 8 * r);
        }
        attn_barrier_wait(q_full + q_buffer, (q_uses >> q_buffer) & 1);
        q_uses ^= 1u << q_buffer;

        auto step = [&](int tile, const bool FIRST, const bool MASKED) {
            const int k0 = tile * BLOCK_K;
            attn_barrier_wait(k_full + k_buffer, (k_uses >> k_buffer) & 1);
            k_uses ^= 1u << k_buffer;
            if (!FIRST) {
                attn_barrier_wait(v_full + v_before, (v_uses >> v_before) & 1);
                v_uses ^= 1u << v_before;
            }
            attn_fence_async();                               // the copies, seen here, before wgmma reads them
            if constexpr (!Q_SHARED) {
                attn_load_fragments(q_fragments, q_tiles + q_buffer * Q_TILE, 64 * group + 16 * warp, Q_BLOCK);
                if (tile + 1 == current.tiles) release(q_empty + q_buffer);   // the item's last read of its Q
            }
            // this warpgroup's 64 rows of Q as the A operand (Q_SHARED)
            const AttnOperand q_operand = attn_operand(attn_smem_address(q_tiles + q_buffer * Q_TILE) + 64 * group * 128);

            const AttnOperand k_operand = attn_operand(attn_smem_address(k_tiles + k_buffer * TILE));
            const AttnOperand v_operand = attn_operand(attn_smem_address(v_tiles + v_before * TILE), LEADING);
            // turns, round robin: warpgroup w > 0 issues after warpgroup w − 1 has issued this tile (named
            // barrier w), warpgroup 0 after the last one has issued the tile before (barrier CONSUMERS)
            if (group > 0) attn_named_sync(group, 256);
            else if (turns > 0) attn_named_sync(CONSUMERS, 256);
            ++turns;
            wgmma_fence();
            #pragma unroll
            for (int c = 0; c < STEPS; ++c) {                 // S = Q Kᵀ
                if constexpr (Q_SHARED)
                    wgmma_ss<T, 0, 0>(s, q_operand.at((c >> 2) * Q_BLOCK + 32 * (c & 3)),
                                      k_operand.at((c >> 2) * BLOCK + 32 * (c & 3)), c);
                else
                    Wgmma<T>::template rs_n128<0>(s, q_fragments[c], k_operand.at((c >> 2) * BLOCK + 32 * (c & 3)), c);
            }
            wgmma_commit();
            if (!FIRST) {                                     // O += P V of tile − 1
                #pragma unroll
                for (int c = 0; c < BLOCK_K / 16; ++c)
                    wgmma_rs<T, 1>(o, p_fragments[c], v_operand.at(2048 * c), 1);
                wgmma_commit();
            }
            attn_named_arrive(group + 1, 256);                // the next warpgroup's turn
            if (FIRST) wgmma_wait<0>();
            else wgmma_wait<1>();
            wgmma_hold(s);
            if constexpr (!Q_SHARED) wgmma_hold(q_fragments);
            release(k_empty + k_buffer);                      // S is done: K's buffer is free
            if (Q_SHARED && tile + 1 == current.tiles) release(q_empty + q_buffer);   // and Q's, after the last

            if (MASKED) {
                const bool crosses = k0 + BLOCK_K > unmasked_end;
                int last[2];
                #pragma unroll
                for (int r = 0; r < 2; ++r)
                    last[r] = crosses ? min(row + 8 * r + offset, key_len - 1) - k0 - 2 * t : BLOCK_K;
                #pragma unroll
                for (int j = 0; j < 16; ++j)
                    #pragma unroll
                    for (int e = 0; e < 4; ++e)
                        if (8 * j + (e & 1) > last[e >> 1]) s[4 * j + e] = ATTN_NEG_INF;
            }
            float part[4][2];
            #pragma unroll
            for (int i = 0; i < 4; ++i)
                #pragma unroll
                for (int r = 0; r < 2; ++r) part[i][r] = fmaxf(s[4 * i + 2 * r], s[4 * i + 2 * r + 1]);
            #pragma unroll
            for (int j = 4; j < 16; ++j)
                #pragma unroll
                for (int r = 0; r < 2; ++r)
                    part[j & 3][r] = fmaxf(part[j & 3][r], fmaxf(s[4 * j + 2 * r], s[4 * j + 2 * r + 1]));
            float alpha[2], shift[2];
            #pragma unroll
            for (int r = 0; r < 2; ++r) {
                float new_max = fmaxf(fmaxf(part[0][r], part[1][r]), fmaxf(part[2][r], part[3][r]));
                new_max = fmaxf(new_max, row_max[r]);
                new_max = fmaxf(new_max, __shfl_xor_sync(0xffffffffu, new_max, 1));
                new_max = fmaxf(new_max, __shfl_xor_sync(0xffffffffu, new_max, 2));
                alpha[r] = attn_exp2((row_max[r] - new_max) * scale_log2);
                row_max[r] = new_max;
                shift[r] = new_max * scale_log2;
            }
            float sums[2][2] = {{0.f, 0.f}, {0.f, 0.f}};
            #pragma unroll
            for (int j = 0; j < 16; ++j)
                #pragma unroll
                for (int e = 0; e < 4; ++e) {
                    s[4 * j + e] = attn_exp2(fmaf(s[4 * j + e], scale_log2, -shift[e >> 1]));
                    sums[e >> 1][j & 1] += s[4 * j + e];
                }
            #pragma unroll
            for (int r = 0; r < 2; ++r) row_sum[r] = fmaf(row_sum[r], alpha[r], sums[r][0] + sums[r][1]);

            if (!FIRST) {
                wgmma_wait<0>();                              // P V of tile − 1 is done: O, P and its V are free
                wgmma_hold(o);
                wgmma_hold(p_fragments);
                release(v_empty + v_before);
                #pragma unroll
                for (int j = 0; j < D / 8; ++j)
                    #pragma unroll
                    for (int r = 0; r < 2; ++r) {
                        o[4 * j + 2 * r] *= alpha[r];
                        o[4 * j + 2 * r + 1] *= alpha[r];
                    }
            }
            if constexpr (DROPOUT) {
                #pragma unroll
                for (int j = 0; j < 16; ++j)
                    #pragma unroll
                    for (int e = 0; e < 4; ++e)
                        if (!attn_dropout_kept(dropout, row_keys[e >> 1], k0 + 8 * j + 2 * t + (e & 1)))
                            s[4 * j + e] = 0.f;
            }
            #pragma unroll
            for (int c = 0; c < BLOCK_K / 16; ++c) attn_fragment<T>(p_fragments[c], s, c);
            k_buffer ^= 1;
            v_before = v_buffer;
            v_buffer = v_buffer == 2 ? 0 : v_buffer + 1;
        };
        const int middle_end = max(1, min(unmasked_end / BLOCK_K, current.tiles));
        step(0, true, true);
        for (int tile = 1; tile < middle_end; ++tile) step(tile, false, false);
        for (int tile = middle_end; tile < current.tiles; ++tile) step(tile, false, true);
        // the last tile's O += P V (its V is the buffer of the tile before the next one)
        attn_barrier_wait(v_full + v_before, (v_uses >> v_before) & 1);
        v_uses ^= 1u << v_before;
        attn_fence_async();
        const AttnOperand v_last = attn_operand(attn_smem_address(v_tiles + v_before * TILE), LEADING);
        wgmma_fence();
        #pragma unroll
        for (int c = 0; c < BLOCK_K / 16; ++c)
            wgmma_rs<T, 1>(o, p_fragments[c], v_last.at(2048 * c), 1);
        wgmma_commit();
        wgmma_wait<0>();
        wgmma_hold(o);
        wgmma_hold(p_fragments);
        release(v_empty + v_before);
        attn_forward_store<T, DROPOUT, D>(o, row_max, row_sum,
                                          out_layout.rows(out, current.batch_head / heads, current.batch_head % heads),
                                          lse, current.batch_head, row, query_len, scale_log2, dropout.scale,
                                          out_layout.row);
        if (!has_next) break;
        item = next_item;
        current = next;
        q_buffer ^= 1;
    }
    if (group == 0) attn_named_sync(CONSUMERS, 256);          // the last warpgroup's turn after the last tile
}

// ---------------------------------------------------------------------------------------------------
// Backward.

// address[0 … 3] += (x, y, z, w): one 16-byte float reduction in L2 (address 16-byte aligned).
__device__ __forceinline__ void attn_atomic_add4(float* address, float x, float y, float z, float w) {
    asm volatile("red.global.add.v4.f32 [%0], {%1, %2, %3, %4};\n"
                 :: "l"(address), "f"(x), "f"(y), "f"(z), "f"(w) : "memory");
}

// dk = dK · scale and dv = dV, in the input dtype, for this thread's two keys (key, key + 8) inside the
// sequence (all D columns); dk_rows, dv_rows point at the (b, kv head)'s first row, their rows
// dk_stride and dv_stride elements apart.
template <typename T, bool DROPOUT, int D>
__device__ __forceinline__ void attn_backward_store(const float (&dk_acc)[D / 2], const float (&dv_acc)[D / 2],
                                                    T* __restrict__ dk_rows, T* __restrict__ dv_rows, int key,
                                                    int key_len, float scale, float keep_scale, int dk_stride,
                                                    int dv_stride) {
    const int t = threadIdx.x & 3;
    #pragma unroll
    for (int r = 0; r < 2; ++r) {
        if (key + 8 * r >= key_len) continue;
        T* dk_line = dk_rows + (key + 8 * r) * dk_stride + 2 * t;
        T* dv_line = dv_rows + (key + 8 * r) * dv_stride + 2 * t;
        #pragma unroll
        for (int j = 0; j < D / 8; ++j) {
            *reinterpret_cast<unsigned*>(dk_line + 8 * j) =
                AttnType<T>::pack(dk_acc[4 * j + 2 * r] * scale, dk_acc[4 * j + 2 * r + 1] * scale);
            if constexpr (DROPOUT)
                *reinterpret_cast<unsigned*>(dv_line + 8 * j) =
                    AttnType<T>::pack(dv_acc[4 * j + 2 * r] * keep_scale, dv_acc[4 * j + 2 * r + 1] * keep_scale);
            else
                *reinterpret_cast<unsigned*>(dv_line + 8 * j) = AttnType<T>::pack(dv_acc[4 * j + 2 * r], dv_acc[4 * j + 2 * r + 1]);
        }
    }
}

// The dQ warpgroup's share of one staged step: warp `warp` adds rows ROWS·warp … ROWS·warp + ROWS − 1 of
// `staged` (rows of stride floats, D used) to dq_rows with 16-byte reductions, whole rows an instruction
// (two 256-byte rows at D = 64, one 512-byte row at D = 128); rows at or past `valid_rows` (outside the
// sequence) are left out.
template <int ROWS, int D = 64>
__device__ __forceinline__ void attn_add_staged_dq(float* dq_rows, const float* staged, int stride, int warp,
                                                   int valid_rows) {
    constexpr int LANES = D / 4, LANE_BITS = D == 64 ? 4 : 5;   // lanes a row (16 bytes each)
    constexpr int ROWS_AT_ONCE = 32 / LANES;                    // rows an instruction
    const int lane = threadIdx.x & 31, column = 4 * (lane & (LANES - 1));
    #pragma unroll 4
    for (int pass = 0; pass < ROWS / ROWS_AT_ONCE; ++pass) {
        const int row = ROWS * warp + ROWS_AT_ONCE * pass + (lane >> LANE_BITS);
        const float4 sum = *reinterpret_cast<const float4*>(staged + row * stride + column);
        if (row < valid_rows) attn_atomic_add4(dq_rows + row * D + column, sum.x, sum.y, sum.z, sum.w);
    }
}

// The work of one backward block: one key block of one (b, kv head), and its iterations: for each query
// head of the kv head's group, the BLOCK_Q-row query steps that can see the block's keys (the earlier
// steps see none of them). The grid has one block per (b, kv head, key block), in chunks of `chunk`
// (b, kv head) pairs (the last chunk may be smaller); inside a chunk, key block 0 of each of its heads
// first, then key block 1 of each, …: the blocks that see the most queries start first, so the blocks'
// ends do not trail off over the last wave, and a chunk's Q, dO and dq_accumulator can stay in L2 (the
// launcher's chunk, 16, was the fastest measured; any chunk ≥ 1 covers every block once).
template <int BLOCK_Q, int BLOCK_K, int D = 64>
struct AttnBackwardWork {
    int k0, first_step, steps, iterations, query_len, batch, kv_head, first_head;
    long long head_base;   // row of the kv head's first query head in L, Δ (and / D, in dq_accumulator)

    __device__ AttnBackwardWork(int heads, int kv_heads, int query_len_, int key_len, int chunk)
        : query_len(query_len_) {
        const int key_blocks = (key_len + BLOCK_K - 1) / BLOCK_K, pairs = (int)gridDim.x / key_blocks;
        const int chunk_start = (int)blockIdx.x / (chunk * key_blocks) * chunk;
        const int in_chunk = (int)blockIdx.x - chunk_start * key_blocks, size = min(chunk, pairs - chunk_start);
        const int batch_kv = chunk_start + in_chunk % size;
        const int group_size = heads / kv_heads;
        batch = batch_kv / kv_heads;
        kv_head = batch_kv % kv_heads;
        first_head = kv_head * group_size;
        k0 = in_chunk / size * BLOCK_K;
        first_step = max(0, k0 - (key_len - query_len)) / BLOCK_Q;
        steps = (query_len + BLOCK_Q - 1) / BLOCK_Q - first_step;
        iterations = group_size * steps;
        head_base = ((long long)batch * heads + first_head) * query_len;
    }
    // first row of iteration it's (b, h) in L, Δ, its query head, and the iteration's first query row
    __device__ long long row_base(int it) const { return head_base + (long long)(it / steps) * query_len; }
    __device__ int head(int it) const { return first_head + it / steps; }
    __device__ int query_start(int it) const { return (first_step + it % steps) * BLOCK_Q; }
};

// Warpgroup 2 of a backward block (threads 256 … 383): adds each step's staged dQ · scale (BLOCK_Q rows
// of `stride` floats) to dq_accumulator, warp w rows BLOCK_Q / 4 · w …, whole rows an instruction, then
// hands the stage back (named barrier 2: the stage is full; 4: empty again).
template <int BLOCK_Q, int BLOCK_K, int D>
__device__ __forceinline__ void attn_backward_dq_warpgroup(const AttnBackwardWork<BLOCK_Q, BLOCK_K, D>& work,
                                                           float* __restrict__ dq_accumulator, const float* dq_stage,
                                                           int stride) {
    attn_set_max_registers_dec<40>();
    const int writer_warp = (threadIdx.x - 256) >> 5, iterations = work.iterations;
    for (int it = 0; it < iterations; ++it) {
        attn_named_sync(2, 256 + 128);
        const int q0 = work.query_start(it);
        float* dq_rows = dq_accumulator + (work.row_base(it) + q0) * D;
        attn_add_staged_dq<BLOCK_Q / 4, D>(dq_rows, dq_stage, stride, writer_warp, work.query_len - q0);
        if (it + 1 < iterations) attn_named_arrive(4, 256 + 128);
    }
}

// Q and dO rows, L and Δ of step `it` into one buffer of their tiles, by THREADS threads (cp.async).
template <typename T, int BLOCK_Q, int BLOCK_K, int THREADS, int D>
__device__ __forceinline__ void attn_backward_prefetch(const AttnBackwardWork<BLOCK_Q, BLOCK_K, D>& work, int it,
                                                       const T* q, const T* dout, const float* lse,
                                                       const float* delta, unsigned char* q_tile,
                                                       unsigned char* dout_tile, float* l_tile, float* delta_tile,
                                                       const AttnLayout& q_layout, const AttnLayout& dout_layout) {
    const long long base = work.row_base(it);
    const int q0 = work.query_start(it), tid = threadIdx.x, query_len = work.query_len, head = work.head(it);
    unsigned batch = work.batch;
    attn_opaque(batch);        // the rows' addresses made here, at each step, not kept across the loop
    attn_load_swizzled<T, BLOCK_Q, THREADS, D>(q_tile, q_layout.rows(q, batch, head), q_layout.row, q0, query_len);
    attn_load_swizzled<T, BLOCK_Q, THREADS, D>(dout_tile, dout_layout.rows(dout, batch, head), dout_layout.row, q0,
                                               query_len);
    if (tid < 2 * BLOCK_Q) {
        const int i = tid % BLOCK_Q;
        const float* source = (tid < BLOCK_Q ? lse : delta) + base + q0 + i;
        float* target = (tid < BLOCK_Q ? l_tile : delta_tile) + i;
        attn_copy4(target, q0 + i < query_len ? source : lse, q0 + i < query_len);
    }
}

// wk: the backward with the keys as the M dimension of S and dP (FlashAttention-3's choice). A step
// takes BLOCK_Q query rows (128 at D = 64, 64 at D = 128, where dK and dV take 128 registers a thread)
// against the block's 128 keys; compute warpgroup w owns keys 64w … 64w + 63 and keeps Pᵀ and dSᵀ in
// registers, where dV and dK take them as the A operand:
//     Sᵀ = K Qᵀ and dPᵀ = V dOᵀ   (D / 16 × m64nBLOCK_Qk16 each, A = its keys' rows of K or V)
//     Pᵀ = exp2(Sᵀ · scale · log2 e − L · log2 e), dSᵀ = Pᵀ ∘ (dPᵀ − Δ)
//                                 (L and Δ are per column: each thread reads its columns' from their tiles)
//     dSᵀ → the dSᵀ tile (128 keys × BLOCK_Q queries, 16-bit)
//     dV += Pᵀ dO, dK += dSᵀ Q    (BLOCK_Q / 16 × m64nDk16 each, A from registers, B MN-major)
//     barrier: both warpgroups' dSᵀ rows are in the tile
//     dQ = dS K over all 128 keys (8 × m64n64k16, A = dS read transposed from the dSᵀ tile, B = K
//     MN-major): query rows 64w … 64w + 63 at D = 64, columns 64w … 64w + 63 at D = 128
// So there is no P tile, and dV and dK read only their B operand from shared memory (with the queries as
// M, P and dS would go to tiles and come back transposed as their A operand as well).
// dV and dK run beside the barrier; the step waits for all three products (a dK left running into the
// next step would hold dSᵀ's registers across it, and ptxas then serializes the wgmma for lack of
// registers), stages dQ · scale for the dQ warpgroup and goes on. The next step's start barrier
// therefore also means that both warpgroups are done with the step before: its Q and dO buffer takes
// the step after's, and the dSᵀ tile may be written.
// Shared memory: K, V (128 keys); Q, dO (BLOCK_Q rows) two buffers each; the dSᵀ tile; L, Δ two buffers
// each; the dQ stage (BLOCK_Q rows of D + 8 floats); 1 KiB of alignment: 171 008 bytes at D = 64,
// 184 320 at D = 128.
template <typename T, bool DROPOUT, int D>
__device__ __forceinline__ void attention_backward_wk(const T* __restrict__ q, const T* __restrict__ k,
                                                      const T* __restrict__ v, const T* __restrict__ dout,
                                                      const float* __restrict__ lse,
                                                      const float* __restrict__ delta,
                                                      float* __restrict__ dq_accumulator, T* __restrict__ dk,
                                                      T* __restrict__ dv, int heads, int kv_heads,
                                                      int query_len, int key_len, float scale, int chunk,
                                                      AttnLayout q_layout, AttnLayout k_layout, AttnLayout v_layout,
                                                      AttnLayout dout_layout, AttnLayout dk_layout,
                                                      AttnLayout dv_layout, AttnDropout dropout) {
    constexpr int BLOCK_K = 128, BLOCK_Q = D == 64 ? 128 : 64, THREADS = 256;   // THREADS: the compute warpgroups
    constexpr bool ROW_SPLIT = BLOCK_Q == 128;   // dQ split between the warpgroups by query rows (D = 64) or columns
    constexpr int DQ_STRIDE = D + 8;      // floats a staged dQ row
    constexpr int K_BLOCK = BLOCK_K * 128;   // bytes of a 64-column block of the K, V and dSᵀ tiles
    constexpr int Q_BLOCK = BLOCK_Q * 128;   // of the Q, dO tiles
    constexpr int K_TILE = K_BLOCK * D / 64, Q_TILE = Q_BLOCK * D / 64, DS_TILE = K_BLOCK * BLOCK_Q / 64;
    constexpr unsigned LEADING = D == 64 ? 1024 : Q_BLOCK;   // dO's and Q's leading byte offset as D-wide B
    unsigned char* k_tile = attn_aligned_shared();
    unsigned char* v_tile = k_tile + K_TILE;
    unsigned char* q_tiles = v_tile + K_TILE;                 // 2 buffers
    unsigned char* dout_tiles = q_tiles + 2 * Q_TILE;         // 2 buffers
    unsigned char* ds_tile = dout_tiles + 2 * Q_TILE;         // dSᵀ: 128 key rows × BLOCK_Q queries
    float* l_tiles = reinterpret_cast<float*>(ds_tile + DS_TILE);    // 2 buffers of BLOCK_Q
    float* delta_tiles = l_tiles + 2 * BLOCK_Q;                      // 2 buffers of BLOCK_Q
    float* dq_stage = delta_tiles + 2 * BLOCK_Q;                     // BLOCK_Q × DQ_STRIDE

    const int tid = threadIdx.x, group = tid >> 7, warp = (tid >> 5) & 3, lane = tid & 31;
    const int g = lane >> 2, t = lane & 3;
    const AttnBackwardWork<BLOCK_Q, BLOCK_K, D> work(heads, kv_heads, query_len, key_len, chunk);
    const int k0 = work.k0, iterations = work.iterations, offset = key_len - query_len;
    auto prefetch = [&](int it, int buffer) {                 // Q, dO, L, Δ of iteration it
        attn_backward_prefetch<T, BLOCK_Q, BLOCK_K, THREADS, D>(work, it, q, dout, lse, delta,
                                                               q_tiles + buffer * Q_TILE, dout_tiles + buffer * Q_TILE,
                                                               l_tiles + buffer * BLOCK_Q,
                                                               delta_tiles + buffer * BLOCK_Q, q_layout, dout_layout);
    };

    if (tid >= THREADS) {
        attn_backward_dq_warpgroup<BLOCK_Q, BLOCK_K, D>(work, dq_accumulator, dq_stage, DQ_STRIDE);
        return;
    }
    attn_set_max_registers_inc<232>();
    attn_load_swizzled<T, BLOCK_K, THREADS, D>(k_tile, k_layout.rows(k, work.batch, work.kv_head), k_layout.row, k0,
                                               key_len);
    attn_load_swizzled<T, BLOCK_K, THREADS, D>(v_tile, v_layout.rows(v, work.batch, work.kv_head), v_layout.row, k0,
                                               key_len);
    prefetch(0, 0);
    attn_copy_commit();

    // This thread's keys: k0 + key_row, + 8 (rows of Sᵀ, dPᵀ, dV, dK and the dSᵀ tile); its dQ rows:
    // dq_row, + 8 of the step, columns dq_column0 + 8j + 2t, + 1.
    const int key_row = 64 * group + 16 * warp + g;
    const int dq_row = (ROW_SPLIT ? 64 * group : 0) + 16 * warp + g, dq_column0 = ROW_SPLIT ? 0 : 64 * group;
    const float scale_log2 = scale * ATTN_LOG2E;
    const unsigned k_address = attn_smem_address(k_tile), v_address = attn_smem_address(v_tile);
    const unsigned ds_address = attn_smem_address(ds_tile);
    const AttnOperand own_k = attn_operand(k_address + 64 * group * 128);   // this warpgroup's 64 keys
    const AttnOperand own_v = attn_operand(v_address + 64 * group * 128);
    // no zeroing: step 0's products start them (every key block has a step: the last query row sees
    // every key)
    float dk_acc[D / 2], dv_acc[D / 2];

    // One step; EDGE: it may cross the diagonal or an end of the queries or keys (the test below decides),
    // false only where it cannot.
    auto step = [&](int it, const bool EDGE) {
        const int buffer = it & 1, q0 = work.query_start(it);
        attn_copy_wait_all();
        attn_fence_async();
        attn_named_sync(1, THREADS);                          // step it's Q, dO, L, Δ are in; step it − 1 is done

        // dropout: bit 2j + c of kept[r] says whether sT[4j + 2r + c] (key key_row + 8r, query 8j + 2t + c)
        // survives
        unsigned kept[2] = {0u, 0u};
        if constexpr (DROPOUT) {
            #pragma unroll
            for (int j = 0; j < BLOCK_Q / 8; ++j)
                #pragma unroll
                for (int c = 0; c < 2; ++c) {
                    const unsigned row_key =
                        attn_dropout_row_key(dropout, work.row_base(it) + q0 + 8 * j + 2 * t + c);
                    #pragma unroll
                    for (int r = 0; r < 2; ++r)
                        kept[r] |= (unsigned)attn_dropout_kept(dropout, row_key, k0 + key_row + 8 * r)
                                   << (2 * j + c);
                }
            attn_opaque(kept[0]);
            attn_opaque(kept[1]);
        }
        const unsigned q_address = attn_smem_address(q_tiles + buffer * Q_TILE);
        const unsigned dout_address = attn_smem_address(dout_tiles + buffer * Q_TILE);
        const AttnOperand q_rows = attn_operand(q_address), dout_rows = attn_operand(dout_address);
        // Sᵀ = K Qᵀ over D / 16 k16 steps (step c in column block c / 4)
        float s[BLOCK_Q / 2], dp[BLOCK_Q / 2];
        wgmma_fence();
        #pragma unroll
        for (int c = 0; c < D / 16; ++c)
            wgmma_ss<T, 0, 0>(s, own_k.at((c >> 2) * K_BLOCK + 32 * (c & 3)),
                              q_rows.at((c >> 2) * Q_BLOCK + 32 * (c & 3)), c);
        wgmma_commit();
        // dPᵀ = V dOᵀ
        #pragma unroll
        for (int c = 0; c < D / 16; ++c)
            wgmma_ss<T, 0, 0>(dp, own_v.at((c >> 2) * K_BLOCK + 32 * (c & 3)),
                              dout_rows.at((c >> 2) * Q_BLOCK + 32 * (c & 3)), c);
        wgmma_commit();
        // both warpgroups finished step it − 1's products before the barrier above: its Q and dO buffer is
        // free for step it + 1
        if (it + 1 < iterations) prefetch(it + 1, buffer ^ 1);
        attn_copy_commit();
        wgmma_wait<1>();                                      // Sᵀ is done
        wgmma_hold(s);

        // Pᵀ: element (j, e) is key k0 + key_row + 8·(e >> 1), query q0 + 8j + 2t + (e & 1); it is 0 where
        // the query is past the end or before the key's diagonal: where the column 8j + (e & 1) lies
        // outside [first[e >> 1], end) (a step that needs no mask gets bounds no column crosses).
        const float* l_row = l_tiles + buffer * BLOCK_Q + 2 * t;
        const bool masked =
            EDGE && (k0 + BLOCK_K - 1 > q0 + offset || q0 + BLOCK_Q > query_len || k0 + BLOCK_K > key_len);
        const int end = masked ? query_len - q0 - 2 * t : BLOCK_Q;
        int first[2];
        #pragma unroll
        for (int r = 0; r < 2; ++r) first[r] = masked ? k0 + key_row + 8 * r - offset - q0 - 2 * t : 0;
        #pragma unroll
        for (int j = 0; j < BLOCK_Q / 8; ++j) {
            const float2 l = *reinterpret_cast<const float2*>(l_row + 8 * j);
            const float shift[2] = {l.x * ATTN_LOG2E, l.y * ATTN_LOG2E};
            #pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int column = 8 * j + (e & 1);
                const float p = attn_exp2(fmaf(s[4 * j + e], scale_log2, -shift[e & 1]));
                s[4 * j + e] = column < first[e >> 1] || column >= end ? 0.f : p;
            }
        }
        wgmma_wait<0>();                                      // dPᵀ is done
        wgmma_hold(dp);

        // dSᵀ = Pᵀ ∘ (dPᵀ − Δ) (with dropout: Pᵀ ∘ (keep_scale · M ∘ dPᵀ − Δ))
        const float* delta_row = delta_tiles + buffer * BLOCK_Q + 2 * t;
        #pragma unroll
        for (int j = 0; j < BLOCK_Q / 8; ++j) {
            const float2 d = *reinterpret_cast<const float2*>(delta_row + 8 * j);
            #pragma unroll
            for (int e = 0; e < 4; ++e) {
                float value = dp[4 * j + e];
                if constexpr (DROPOUT)
                    value = (kept[e >> 1] >> (2 * j + (e & 1))) & 1u ? value * dropout.scale : 0.f;
                dp[4 * j + e] = s[4 * j + e] * (value - (e & 1 ? d.y : d.x));
            }
        }
        // Pᵀ and dSᵀ as 16-bit A fragments (with dropout only the kept P: dV's; keep_scale comes at the
        // store); dV += Pᵀ dO; dSᵀ to its tile for dQ
        unsigned p_fragments[BLOCK_Q / 16][4], ds_fragments[BLOCK_Q / 16][4];
        #pragma unroll
        for (int c = 0; c < BLOCK_Q / 16; ++c) {
            if constexpr (DROPOUT) {
                #pragma unroll
                for (int w = 0; w < 4; ++w) {     // word w: key key_row + 8·(w & 1), queries 16c + 8·(w >> 1) + 2t
                    const unsigned mask = kept[w & 1] >> (2 * (2 * c + (w >> 1)));
                    const float first_p = mask & 1u ? s[8 * c + 2 * w] : 0.f;
                    const float second_p = mask & 2u ? s[8 * c + 2 * w + 1] : 0.f;
                    p_fragments[c][w] = AttnType<T>::pack(first_p, second_p);
                }
            } else {
                attn_fragment<T>(p_fragments[c], s, c);
            }
            attn_fragment<T>(ds_fragments[c], dp, c);
        }
        #pragma unroll
        for (int c = 0; c < BLOCK_Q / 16; ++c)
            #pragma unroll
            for (int w = 0; w < 4; ++w)       // word w: key row key_row + 8·(w & 1), queries 16c + 8·(w >> 1) + 2t
                *reinterpret_cast<unsigned*>(ds_tile + (c >> 2) * K_BLOCK +
                                             attn_swizzle(key_row + 8 * (w & 1), (2 * c + (w >> 1)) & 7) + 4 * t) =
                    ds_fragments[c][w];
        attn_fence_async();
        // dV += Pᵀ dO and dK += dSᵀ Q (B MN-major), beside the barrier
        const AttnOperand dout_b = attn_operand(dout_address, LEADING), q_b = attn_operand(q_address, LEADING);
        wgmma_fence();
        #pragma unroll
        for (int c = 0; c < BLOCK_Q / 16; ++c)
            wgmma_rs<T, 1>(dv_acc, p_fragments[c], dout_b.at(2048 * c), it > 0 || c > 0);
        #pragma unroll
        for (int c = 0; c < BLOCK_Q / 16; ++c)
            wgmma_rs<T, 1>(dk_acc, ds_fragments[c], q_b.at(2048 * c), it > 0 || c > 0);
        wgmma_commit();
        attn_named_sync(1, THREADS);                          // both warpgroups' dSᵀ rows are written

        // dQ = dS K over the block's 128 keys (dS read transposed from the dSᵀ tile, K MN-major): query
        // rows 64w … 64w + 63 (D = 64) or columns 64w … 64w + 63 (D = 128)
        float dq[32];
        const AttnOperand ds_a = attn_operand(ds_address + (ROW_SPLIT ? group * K_BLOCK : 0));
        const AttnOperand k_b = attn_operand(k_address + (ROW_SPLIT ? 0 : group * K_BLOCK));
        wgmma_fence();
        #pragma unroll
        for (int c = 0; c < BLOCK_K / 16; ++c)
            Wgmma<T>::template ss_n64<1, 1>(dq, ds_a.at(2048 * c), k_b.at(2048 * c), c);
        wgmma_commit();
        wgmma_wait<0>();                                      // dV, dK and dQ are done
        wgmma_hold(dq);
        wgmma_hold(dv_acc);
        wgmma_hold(dk_acc);
        wgmma_hold(p_fragments);
        wgmma_hold(ds_fragments);

        // dQ · scale to the stage for the dQ warpgroup (once it has emptied it)
        if (it >= 1) attn_named_sync(4, THREADS + 128);
        float* staged = dq_stage + dq_column0 + 2 * t;
        #pragma unroll
        for (int r = 0; r < 2; ++r)
            #pragma unroll
            for (int j = 0; j < 8; ++j)
                *reinterpret_cast<float2*>(staged + (dq_row + 8 * r) * DQ_STRIDE + 8 * j) =
                    make_float2(dq[4 * j + 2 * r] * scale, dq[4 * j + 2 * r + 1] * scale);
        attn_named_arrive(2, THREADS + 128);                  // the stage is full
    };
    // Each query head's steps: the first edge_first cross the diagonal (all of them in a last, partial
    // key block), the last one is partial when 64 does not divide Tq; the steps between need no mask and
    // run their own copy of the step without it (ptxas would otherwise turn the mask's branch into
    // predicated code that every step runs; no wgmma sits under a runtime branch).
    const int steps = work.steps, diagonal_end = k0 + BLOCK_K - 1 - offset;   // rows below it cross the diagonal
    const int edge_first = k0 + BLOCK_K > key_len ? steps
                           : diagonal_end <= 0 ? 0
                           : min(steps, (diagonal_end + BLOCK_Q - 1) / BLOCK_Q - work.first_step);
    const int edge_last = query_len % BLOCK_Q != 0 && edge_first < steps ? 1 : 0;
    if constexpr (DROPOUT) {   // one copy
        for (int it = 0; it < iterations; ++it) step(it, true);
    } else {
        for (int head_start = 0; head_start < iterations; head_start += steps) {
            int it = head_start;
            for (; it < head_start + edge_first; ++it) step(it, true);
            for (; it < head_start + steps - edge_last; ++it) step(it, false);
            for (; it < head_start + steps; ++it) step(it, true);
        }
    }
    wgmma_wait<0>();
    wgmma_hold(dk_acc);
    wgmma_hold(dv_acc);
    attn_backward_store<T, DROPOUT, D>(dk_acc, dv_acc, dk_layout.rows(dk, work.batch, work.kv_head),
                                       dv_layout.rows(dv, work.batch, work.kv_head), k0 + key_row, key_len, scale,
                                       dropout.scale, dk_layout.row, dv_layout.row);
}

#endif  // ATTN_HOPPER

#ifdef ATTN_HOPPER
#define ATTN_HOPPER_BODY(CALL) CALL;
#else
#define ATTN_HOPPER_BODY(CALL) __trap();
#endif

#define ATTN_HOPPER_FORWARD_LAYOUT_PARAMETERS                                                                \
    ATTN_LAYOUT_PARAMETERS(q), ATTN_LAYOUT_PARAMETERS(k), ATTN_LAYOUT_PARAMETERS(v), ATTN_LAYOUT_PARAMETERS(out)
#define ATTN_HOPPER_FORWARD_LAYOUTS ATTN_LAYOUT(q), ATTN_LAYOUT(k), ATTN_LAYOUT(v), ATTN_LAYOUT(out)
// the backward takes dq's layout too (the launcher passes one list to every backward build), unread here:
// dq goes to the contiguous accumulator
#define ATTN_HOPPER_BACKWARD_LAYOUT_PARAMETERS                                                               \
    ATTN_LAYOUT_PARAMETERS(q), ATTN_LAYOUT_PARAMETERS(k), ATTN_LAYOUT_PARAMETERS(v),                        \
        ATTN_LAYOUT_PARAMETERS(dout), ATTN_LAYOUT_PARAMETERS(dq), ATTN_LAYOUT_PARAMETERS(dk),               \
        ATTN_LAYOUT_PARAMETERS(dv)
#define ATTN_HOPPER_BACKWARD_LAYOUTS                                                                         \
    ATTN_LAYOUT(q), ATTN_LAYOUT(k), ATTN_LAYOUT(v), ATTN_LAYOUT(dout), ATTN_LAYOUT(dk), ATTN_LAYOUT(dv)

#define ATTN_HOPPER_FORWARD(SUFFIX, TYPE, D, C)                                                              \
    extern "C" __global__ void __launch_bounds__(128 * (C + 1), 1) attention_forward_##SUFFIX##_d##D##_wp##C( \
        const TYPE* q, const TYPE* k, const TYPE* v, TYPE* out, float* lse, int heads, int kv_heads,       \
        int query_len, int key_len, float scale, int batches, ATTN_HOPPER_FORWARD_LAYOUT_PARAMETERS) {     \
        ATTN_HOPPER_BODY((attention_forward_wp<TYPE, false, D, C>(q, k, v, out, lse, heads, kv_heads,        \
                                                                query_len, key_len, scale, batches,        \
                                                                ATTN_HOPPER_FORWARD_LAYOUTS,               \
                                                                AttnDropout{})))                           \
    }                                                                                                      \
    extern "C" __global__ void __launch_bounds__(128 * (C + 1), 1) attention_forward_##SUFFIX##_d##D##_wp##C##_dropout( \
        const TYPE* q, const TYPE* k, const TYPE* v, TYPE* out, float* lse, int heads, int kv_heads,       \
        int query_len, int key_len, float scale, int batches, ATTN_HOPPER_FORWARD_LAYOUT_PARAMETERS,       \
        ATTN_DROPOUT_PARAMETERS) {                                                                         \
        ATTN_HOPPER_BODY((attention_forward_wp<TYPE, true, D, C>(                                           \
            q, k, v, out, lse, heads, kv_heads, query_len, key_len, scale, batches,                        \
            ATTN_HOPPER_FORWARD_LAYOUTS, ATTN_DROPOUT_ARGUMENT)))                                          \
    }

#define ATTN_HOPPER_BACKWARD(SUFFIX, TYPE, BUILD, D)                                                         \
    extern "C" __global__ void __launch_bounds__(384, 1) attention_backward_##SUFFIX##_d##D##_##BUILD(         \
        const TYPE* q, const TYPE* k, const TYPE* v, const TYPE* dout, const float* lse,                   \
        const float* delta, float* dq_accumulator, TYPE* dk, TYPE* dv, int heads, int kv_heads,            \
        int query_len, int key_len, float scale, int chunk, ATTN_HOPPER_BACKWARD_LAYOUT_PARAMETERS) {      \
        ATTN_HOPPER_BODY((attention_backward_##BUILD<TYPE, false, D>(q, k, v, dout, lse, delta,              \
                                                                 dq_accumulator, dk, dv, heads, kv_heads,  \
                                                                 query_len, key_len, scale, chunk,         \
                                                                 ATTN_HOPPER_BACKWARD_LAYOUTS,             \
                                                                 AttnDropout{})))                          \
    }                                                                                                      \
    extern "C" __global__ void __launch_bounds__(384, 1) attention_backward_##SUFFIX##_d##D##_##BUILD##_dropout( \
        const TYPE* q, const TYPE* k, const TYPE* v, const TYPE* dout, const float* lse,                   \
        const float* delta, float* dq_accumulator, TYPE* dk, TYPE* dv, int heads, int kv_heads,            \
        int query_len, int key_len, float scale, int chunk, ATTN_HOPPER_BACKWARD_LAYOUT_PARAMETERS,        \
        ATTN_DROPOUT_PARAMETERS) {                                                                         \
        ATTN_HOPPER_BODY((attention_backward_##BUILD<TYPE, true, D>(                                        \
            q, k, v, dout, lse, delta, dq_accumulator, dk, dv, heads, kv_heads, query_len, key_len, scale, \
            chunk, ATTN_HOPPER_BACKWARD_LAYOUTS, ATTN_DROPOUT_ARGUMENT)))                                  \
    }

#if SELECTED(64, 2, 1)
ATTN_HOPPER_FORWARD(bf16, __nv_bfloat16, 64, 2)
ATTN_HOPPER_FORWARD(bf16, __nv_bfloat16, 64, 3)
#endif
#if SELECTED(64, 3, 1)
ATTN_HOPPER_FORWARD(fp16, __half, 64, 2)
ATTN_HOPPER_FORWARD(fp16, __half, 64, 3)
#endif
#if SELECTED(64, 2, 2)
ATTN_HOPPER_BACKWARD(bf16, __nv_bfloat16, wk, 64)
#endif
#if SELECTED(64, 3, 2)
ATTN_HOPPER_BACKWARD(fp16, __half, wk, 64)
#endif
#if SELECTED(128, 2, 1)
ATTN_HOPPER_FORWARD(bf16, __nv_bfloat16, 128, 2)
#endif
#if SELECTED(128, 3, 1)
ATTN_HOPPER_FORWARD(fp16, __half, 128, 2)
#endif
#if SELECTED(128, 2, 2)
ATTN_HOPPER_BACKWARD(bf16, __nv_bfloat16, wk, 128)
#endif
#if SELECTED(128, 3, 2)
ATTN_HOPPER_BACKWARD(fp16, __half, wk, 128)
#endif
