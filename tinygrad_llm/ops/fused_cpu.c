/* Fused CPU loops of the training ops' NumPy paths (tinygrad_llm/ops/fused_cpu.py loads them).

   Each function is one pass over its rows that NumPy would make in several: SwiGLU forward and backward,
   RMSNorm forward (with the residual add) and backward, the causal softmax of one block of attention
   scores and its backward, the embedding's backward and the AdamW update. Every function exists twice, for float (suffix _f32)
   and double (_f64): this file includes itself once per type (the part after #else). Besides them, for
   decoding: the packed SwiGLU and the cached attention of one new position a row (whose float32 products
   have an AVX-512 form, head_scores_avx512 / head_values_avx512), and Linear's float32 product for a few
   rows of x (few_rows_linear_f32, AVX-512 only: elsewhere it declines and the op takes BLAS).

   Shapes: every array is contiguous, rows of `cols` (or `channels`, `keys`) elements, rows given as a
   count; a caller hands row ranges to several threads (ctypes releases the GIL during a call).
   Formulas: those of the op's docstring in ops/ (activation.SwiGLU, norm.RMSNorm, attention.CausalAttention,
   optim.AdamW), which the tests hold these loops to.
   exp: float uses exp_f32 below (range reduction to 2^k · e^r, |r| ≤ ln2/2, and Cephes' degree-7
   polynomial: within 2 ulp of expf, 0 below −87.34 and inf above 88.72; written so that the compiler
   vectorises the loops around it);
   double uses libm's exp (the float64 paths are the tests' gradient checks, not a speed path).
   Built with -O3 -march=native and the flags that let the compiler reassociate the row sums. */
#ifndef FUSED_TYPE
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

static inline float exp_f32(float x)
{
    const float high = 88.0f, low = -87.33654f;            /* e^low = FLT_MIN; below it the result is 0 */
    const float overflow = 88.72284f;                      /* e^x > FLT_MAX above it: the result is inf */
    float clamped = x > high ? high : x;
    clamped = clamped < low ? low : clamped;
    float k = floorf(clamped * 1.44269504088896341f + 0.5f);
    float r = clamped - k * 0.693359375f;                  /* ln 2 in two parts: r exact to float rounding */
    r = r + k * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    uint32_t bits = (uint32_t)((int32_t)k + 127) << 23;    /* 2^k */
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    float result = p * scale;
    result = x > overflow ? INFINITY : result;
    return x < low ? 0.0f : result;                        /* NaN stays NaN: every comparison is false */
}

/* Decoding attention's two products for one head of one row, float32 with AVX-512 and a head size that is a
   multiple of 16 (the compiler's own vectorisation of the plain loops below spends more on each key's
   horizontal sum and on reloading the output row than on the products):
     head_scores_avx512:  scores[j] = Σ_d k[j, d] · q[d]  for j < keys  (k rows of dim floats, contiguous)
     head_values_avx512:  o[d] = inverse · Σ_j scores[j] · v[j, d]
   Scores 16 keys at a time: each key's 16 lane-wise products, then the 16 vectors summed into one vector of
   16 sums by a tree of unpacks and adds (three instructions a key, against a horizontal sum's eight
   dependent ones for a key on its own); the last keys % 16 one at a time. Values: two sets of accumulators
   (even and odd keys) so that consecutive fmas do not wait on each other, 64 outputs a pass; the scale by
   `inverse` once at the end. */
#if defined(__AVX512F__)
#include <immintrin.h>
#define ATTENTION_SIMD 1
/* lane-wise Σ_d k[d] · q[d] over 16-element slices of one key (q in registers) */
static inline __attribute__((always_inline)) __m512 key_products(const float *k, const __m512 *q, const int64_t slices)
{
    __m512 even = _mm512_mul_ps(_mm512_loadu_ps(k), q[0]), odd = _mm512_setzero_ps();
    for (int64_t c = 1; c + 1 < slices; c += 2) {
        odd = _mm512_fmadd_ps(_mm512_loadu_ps(k + 16 * c), q[c], odd);
        even = _mm512_fmadd_ps(_mm512_loadu_ps(k + 16 * c + 16), q[c + 1], even);
    }
    if (slices % 2 == 0) odd = _mm512_fmadd_ps(_mm512_loadu_ps(k + 16 * (slices - 1)), q[slices - 1], odd);
    return _mm512_add_ps(even, odd);
}

/* a, b -> per 128-bit lane [a0 + a2, b0 + b2, a1 + a3, b1 + b3] */
static inline __m512 sum_pairs(__m512 a, __m512 b)
{
    return _mm512_add_ps(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b));
}

/* two sum_pairs results (keys a, b and c, d) -> per 128-bit lane the four keys' sums over that lane */
static inline __m512 sum_quads(__m512 ab, __m512 cd)
{
    const __m512d x = _mm512_castps_pd(ab), y = _mm512_castps_pd(cd);
    return _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(x, y)), _mm512_castpd_ps(_mm512_unpackhi_pd(x, y)));
}

/* two vectors of 128-bit lanes -> [a's lanes 0 + 1, a's 2 + 3, b's 0 + 1, b's 2 + 3] */
static inline __m512 sum_lanes(__m512 a, __m512 b)
{
    return _mm512_add_ps(_mm512_shuffle_f32x4(a, b, _MM_SHUFFLE(2, 0, 2, 0)),
                         _mm512_shuffle_f32x4(a, b, _MM_SHUFFLE(3, 1, 3, 1)));
}

/* head_scores_avx512 for a head size of 16 · slices, slices ≤ 8 (a constant where it is inlined) */
static inline __attribute__((always_inline)) void head_scores_slices(const float *k, const float *q, float *scores,
                                                                     int64_t keys, const int64_t slices)
{
    const int64_t dim = 16 * slices;
    __m512 qs[8];
    for (int64_t c = 0; c < slices; c++) qs[c] = _mm512_loadu_ps(q + 16 * c);
    int64_t j = 0;
    for (; j + 16 <= keys; j += 16) {
        const float *kj = k + j * dim;
        __m512 quads[4];
        for (int g = 0; g < 4; g++) {                   /* keys 4g … 4g + 3 */
            const float *kg = kj + 4 * g * dim;
            quads[g] = sum_quads(sum_pairs(key_products(kg, qs, slices), key_products(kg + dim, qs, slices)),
                                 sum_pairs(key_products(kg + 2 * dim, qs, slices),
                                           key_products(kg + 3 * dim, qs, slices)));
        }
        _mm512_storeu_ps(scores + j, sum_lanes(sum_lanes(quads[0], quads[1]), sum_lanes(quads[2], quads[3])));
    }
    for (; j < keys; j++) scores[j] = _mm512_reduce_add_ps(key_products(k + j * dim, qs, slices));
}

static void head_scores_avx512(const float *k, const float *q, float *scores, int64_t keys, int64_t dim)
{
    switch (dim / 16) {
    case 1: head_scores_slices(k, q, scores, keys, 1); return;
    case 2: head_scores_slices(k, q, scores, keys, 2); return;
    case 3: head_scores_slices(k, q, scores, keys, 3); return;
    case 4: head_scores_slices(k, q, scores, keys, 4); return;
    case 5: head_scores_slices(k, q, scores, keys, 5); return;
    case 6: head_scores_slices(k, q, scores, keys, 6); return;
    case 7: head_scores_slices(k, q, scores, keys, 7); return;
    case 8: head_scores_slices(k, q, scores, keys, 8); return;
    }
    for (int64_t j = 0; j < keys; j++) {                /* head sizes above 128: a key at a time */
        const float *kj = k + j * dim;
        __m512 sum = _mm512_mul_ps(_mm512_loadu_ps(kj), _mm512_loadu_ps(q));
        for (int64_t d = 16; d < dim; d += 16)
            sum = _mm512_fmadd_ps(_mm512_loadu_ps(kj + d), _mm512_loadu_ps(q + d), sum);
        scores[j] = _mm512_reduce_add_ps(sum);
    }
}

static void head_values_avx512(const float *v, const float *scores, float inverse, float *o, int64_t keys,
                               int64_t dim)
{
    for (int64_t d = 0; d < dim; d += 64) {             /* 64 outputs (4 registers, twice) a pass over the keys */
        const int64_t width = dim - d < 64 ? dim - d : 64;
        __m512 even[4], odd[4];
        for (int c = 0; c < 4; c++) even[c] = odd[c] = _mm512_setzero_ps();
        int64_t j = 0;
        for (; j + 2 <= keys; j += 2) {
            const __m512 p = _mm512_set1_ps(scores[j]), r = _mm512_set1_ps(scores[j + 1]);
            const float *vj = v + j * dim + d;
            for (int c = 0; c < 4; c++)
                if (16 * c < width) {
                    even[c] = _mm512_fmadd_ps(p, _mm512_loadu_ps(vj + 16 * c), even[c]);
                    odd[c] = _mm512_fmadd_ps(r, _mm512_loadu_ps(vj + dim + 16 * c), odd[c]);
                }
        }
        if (j < keys) {
            const __m512 p = _mm512_set1_ps(scores[j]);
            for (int c = 0; c < 4; c++)
                if (16 * c < width) even[c] = _mm512_fmadd_ps(p, _mm512_loadu_ps(v + j * dim + d + 16 * c), even[c]);
        }
        const __m512 scale = _mm512_set1_ps(inverse);
        for (int c = 0; c < 4; c++)
            if (16 * c < width) _mm512_storeu_ps(o + d + 16 * c, _mm512_mul_ps(_mm512_add_ps(even[c], odd[c]), scale));
    }
}
#else
#define ATTENTION_SIMD 0
#endif

/* Linear's product for a few rows of x (batched decoding), float32: y[n, o] = Σ_i w[o, i] · x[n, i] for the
   output rows o in [start, end), n < rows ≤ FEW_ROWS_MAX; w (out, in), x (rows, in), y (rows, out), all
   contiguous. OpenBLAS first copies (packs) panels of w, a pass over memory that nothing overlaps, then
   multiplies; for a thin x the weights are read once either way, so this loop multiplies them where they
   lie: x transposed once into a buffer (in, 16 V) that stays in L2 (V = 1 or 2 vectors of rows), then for
   FEW_GROUP output rows at a time, one element of each row broadcast against x's column i, the FEW_GROUP · V
   sums in registers from i = 0 to in − 1 (one fma a step, in that order), the next group's rows fetched
   ahead. Returns 0, or −1 where it does not run (no AVX-512 in the build, more rows, no memory): the
   caller then takes BLAS. rows = 0 computes nothing and says whether the build has the loop (0) or not. */
#define FEW_ROWS_MAX 32
#if ATTENTION_SIMD
#define FEW_GROUP 8
static inline __attribute__((always_inline)) void few_rows_group(const int R, const int V, const float *w,
        const float *xt, float *y, int64_t rows, int64_t in, int64_t out, int64_t o, const float *next)
{
    __m512 acc[FEW_GROUP][2];
    for (int r = 0; r < R; r++) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
    const float *row = w + o * in;
    for (int64_t i = 0; i < in; i++) {
        if ((i & 15) == 0 && next != NULL)
            for (int r = 0; r < R; r++) _mm_prefetch((const char *)(next + r * in + i), _MM_HINT_T0);
        const __m512 x0 = _mm512_loadu_ps(xt + i * 16 * V);
        const __m512 x1 = V > 1 ? _mm512_loadu_ps(xt + i * 16 * V + 16) : x0;
        for (int r = 0; r < R; r++) {
            const __m512 b = _mm512_set1_ps(row[r * in + i]);
            acc[r][0] = _mm512_fmadd_ps(b, x0, acc[r][0]);
            if (V > 1) acc[r][1] = _mm512_fmadd_ps(b, x1, acc[r][1]);
        }
    }
    float lanes[2 * 16];
    for (int r = 0; r < R; r++) {
        _mm512_storeu_ps(lanes, acc[r][0]);
        if (V > 1) _mm512_storeu_ps(lanes + 16, acc[r][1]);
        for (int64_t n = 0; n < rows; n++) y[n * out + o + r] = lanes[n];
    }
}

static void few_rows_groups(const int V, const float *w, const float *xt, float *y, int64_t rows, int64_t in,
                            int64_t out, int64_t start, int64_t end)
{
    int64_t o = start;
    for (; o + FEW_GROUP <= end; o += FEW_GROUP) {
        const float *next = o + 2 * FEW_GROUP <= end ? w + (o + FEW_GROUP) * in : NULL;
        if (V > 1) few_rows_group(FEW_GROUP, 2, w, xt, y, rows, in, out, o, next);
        else few_rows_group(FEW_GROUP, 1, w, xt, y, rows, in, out, o, next);
    }
    for (; o < end; o++) {
        if (V > 1) few_rows_group(1, 2, w, xt, y, rows, in, out, o, NULL);
        else few_rows_group(1, 1, w, xt, y, rows, in, out, o, NULL);
    }
}
#endif

int few_rows_linear_f32(const float *w, const float *x, float *y, int64_t rows, int64_t in, int64_t out,
                        int64_t start, int64_t end)
{
#if ATTENTION_SIMD
    if (rows == 0) return 0;                            /* the build's answer: this loop runs here */
    if (rows < 0 || rows > FEW_ROWS_MAX) return -1;
    const int V = rows > 16 ? 2 : 1;
    float *xt = (float *)malloc((size_t)(in * 16 * V) * sizeof(float));
    if (xt == NULL) return -1;
    for (int64_t i = 0; i < in; i++)                    /* x transposed: (in, 16 V), rows past `rows` zero */
        for (int64_t n = 0; n < 16 * V; n++) xt[i * 16 * V + n] = n < rows ? x[n * in + i] : 0.0f;
    few_rows_groups(V, w, xt, y, rows, in, out, start, end);
    free(xt);
    return 0;
#else
    (void)w; (void)x; (void)y; (void)rows; (void)in; (void)out; (void)start; (void)end;
    return -1;
#endif
}

#define FUSED_TYPE float
#define FUSED_NAME(name) name##_f32
#define FUSED_EXP exp_f32
#define FUSED_SQRT sqrtf
#define FUSED_INT int32_t
#include __FILE__
#undef FUSED_TYPE
#undef FUSED_NAME
#undef FUSED_EXP
#undef FUSED_SQRT
#undef FUSED_INT
#undef real

#define FUSED_TYPE double
#define FUSED_NAME(name) name##_f64
#define FUSED_EXP exp
#define FUSED_SQRT sqrt
#define FUSED_INT int64_t
#include __FILE__

#else
#define real FUSED_TYPE

/* max of row[0 … n − 1], n ≥ 1: 16 lanes as one vector (GCC/Clang vector types, each lane kept where the
   new element is not larger, so NaN elements are passed over as by the scalar tail), then the lanes and the
   tail; the same value as a scalar loop over the row */
typedef real FUSED_NAME(lanes16) __attribute__((vector_size(16 * sizeof(real))));
typedef FUSED_INT FUSED_NAME(mask16) __attribute__((vector_size(16 * sizeof(real))));

static inline real FUSED_NAME(row_max)(const real *restrict row, int64_t n)
{
    real top = row[0];
    int64_t j = 0;
    if (n >= 16) {
        FUSED_NAME(lanes16) lanes, x;
        memcpy(&lanes, row, sizeof lanes);
        for (j = 16; j + 16 <= n; j += 16) {
            memcpy(&x, row + j, sizeof x);
            FUSED_NAME(mask16) larger = x > lanes;
            lanes = (FUSED_NAME(lanes16))((larger & (FUSED_NAME(mask16))x) | (~larger & (FUSED_NAME(mask16))lanes));
        }
        for (int k = 0; k < 16; k++)
            top = lanes[k] > top ? lanes[k] : top;
    }
    for (; j < n; j++)
        top = row[j] > top ? row[j] : top;
    return top;
}

// row[j] <- exp(row[j] - top) for j < n, returning their sum (the shifted exponentials of a softmax row).
static inline real FUSED_NAME(exp_shifted)(real *restrict row, int64_t n, real top)
{
    real total = 0;
    for (int64_t j = 0; j < n; j++) {
        real e = FUSED_EXP(row[j] - top);
        row[j] = e;
        total += e;
    }
    return total;
}

/* y = silu(g) · u = g · σ(g) · u, σ(g) = 1 / (1 + e^−g)  (e^−g overflowing to inf gives σ = 0) */
void FUSED_NAME(swiglu_forward)(const real *restrict g, const real *restrict u, real *restrict y, int64_t n)
{
    for (int64_t i = 0; i < n; i++) {
        real s = (real)1 / ((real)1 + FUSED_EXP(-g[i]));
        y[i] = g[i] * s * u[i];
    }
}

/* a = dy · σ(g);  du = a · g;  b = a · u;  dg = b · (1 + g · (1 − σ(g))) */
void FUSED_NAME(swiglu_backward)(const real *restrict dy, const real *restrict g, const real *restrict u,
                                 real *restrict dg, real *restrict du, int64_t n)
{
    for (int64_t i = 0; i < n; i++) {
        real s = (real)1 / ((real)1 + FUSED_EXP(-g[i]));
        real a = dy[i] * s;
        du[i] = a * g[i];
        real b = a * u[i];
        dg[i] = b + b * g[i] * ((real)1 - s);
    }
}

/* Per row: t = x (+ branch, written to total when branch is given);  r = 1/√(Σ t² / C + eps);  y = t · r · w */
void FUSED_NAME(rms_norm_forward)(const real *restrict x, const real *restrict branch, real *restrict total,
                                  const real *restrict w, real *restrict y, real *restrict r, int64_t rows,
                                  int64_t channels, real eps)
{
    for (int64_t row = 0; row < rows; row++) {
        const real *xr = x + row * channels;
        real *yr = y + row * channels;
        real squares = 0;
        if (branch) {
            const real *br = branch + row * channels;
            real *tr = total + row * channels;
            for (int64_t c = 0; c < channels; c++) {
                real t = xr[c] + br[c];
                tr[c] = t;
                squares += t * t;
            }
            xr = tr;
        } else {
            for (int64_t c = 0; c < channels; c++)
                squares += xr[c] * xr[c];
        }
        real scale = (real)1 / FUSED_SQRT(squares / (real)channels + eps);
        r[row] = scale;
        for (int64_t c = 0; c < channels; c++)
            yr[c] = xr[c] * scale * w[c];
    }
}

/* Per row, with g = dy · w and p = Σ g · x:  dx = r · g − x · r³ · p / C;  and for dw, per block of `block`
   rows (the first row of the call starts one), partial[block] = Σ over its rows of dy · x · r */
void FUSED_NAME(rms_norm_backward)(const real *restrict dy, const real *restrict x, const real *restrict r,
                                   const real *restrict w, real *restrict dx, real *restrict partial,
                                   int64_t rows, int64_t channels, int64_t block)
{
    for (int64_t row = 0; row < rows; row++) {
        const real *dyr = dy + row * channels, *xr = x + row * channels;
        real *dxr = dx + row * channels, *pr = partial + row / block * channels;
        real p = 0;
        for (int64_t c = 0; c < channels; c++)
            p += dyr[c] * w[c] * xr[c];
        real scale = r[row];
        real coefficient = scale * scale * scale * p / (real)channels;
        if (row % block == 0)
            for (int64_t c = 0; c < channels; c++)
                pr[c] = 0;
        for (int64_t c = 0; c < channels; c++) {
            dxr[c] = scale * dyr[c] * w[c] - xr[c] * coefficient;
            pr[c] += dyr[c] * xr[c] * scale;
        }
    }
}

/* Causal softmax of score blocks in place: s is (blocks, n, keys); row i of a block sees keys
   0 … start + i (its query sits at position start + i), later keys get probability 0. Each row is shifted
   by its own maximum over the keys it sees. */
void FUSED_NAME(causal_softmax)(real *restrict s, int64_t blocks, int64_t n, int64_t keys, int64_t start)
{
    for (int64_t b = 0; b < blocks; b++) {
        for (int64_t i = 0; i < n; i++) {
            real *row = s + (b * n + i) * keys;
            int64_t seen = start + i + 1 < keys ? start + i + 1 : keys;
            real total = FUSED_NAME(exp_shifted)(row, seen, FUSED_NAME(row_max)(row, seen));
            real inverse = (real)1 / total;
            for (int64_t j = 0; j < seen; j++)
                row[j] *= inverse;
            for (int64_t j = seen; j < keys; j++)
                row[j] = 0;
        }
    }
}

/* The softmax's backward in place: ds = p · (ds − Δ) for ds, p (blocks, n, keys); Δ of block b's row i
   is delta[b · delta_stride + i] */
void FUSED_NAME(softmax_backward)(real *restrict ds, const real *restrict p, const real *restrict delta,
                                  int64_t blocks, int64_t n, int64_t keys, int64_t delta_stride)
{
    for (int64_t b = 0; b < blocks; b++) {
        for (int64_t i = 0; i < n; i++) {
            real d = delta[b * delta_stride + i];
            real *row = ds + (b * n + i) * keys;
            const real *pr = p + (b * n + i) * keys;
            for (int64_t j = 0; j < keys; j++)
                row[j] = pr[j] * (row[j] - d);
        }
    }
}

static inline __attribute__((always_inline)) void FUSED_NAME(rope_row)(
    const real *restrict xr, real *restrict o, const real *restrict c, const real *restrict s, int64_t width,
    int64_t half)
{
    for (int64_t head = 0; head < width; head += 2 * half) {
        for (int64_t i = head; i < head + half; i++) {
            real x1 = xr[i], x2 = xr[i + half];
            o[i] = x1 * c[i] + x2 * s[i];
            o[i + half] = x2 * c[i + half] + x1 * s[i + half];
        }
    }
}

/* RoPE of token-major heads: x, out (batch, time, width) with width = heads · D, rows of `width` contiguous
   elements at the strides given (in elements); per head, with halves x₁, x₂ of D/2 and the tables
   cos (time, width) = [c, c] and sin (time, width) = [−s, s] (per head, any scale folded in):
   out₁ = x₁ · cos₁ + x₂ · sin₁;  out₂ = x₂ · cos₂ + x₁ · sin₂ */
void FUSED_NAME(rope_heads)(const real *x, int64_t x_batch, int64_t x_token, real *out, int64_t out_batch,
                            int64_t out_token, const real *restrict cos, const real *restrict sin,
                            int64_t batch, int64_t time, int64_t width, int64_t half)
{
    for (int64_t b = 0; b < batch; b++) {
        for (int64_t t = 0; t < time; t++) {
            const real *restrict xr = x + b * x_batch + t * x_token;
            real *restrict o = out + b * out_batch + t * out_token;
            const real *restrict c = cos + t * width, *restrict s = sin + t * width;
            switch (half) {            /* the usual head sizes with a constant trip count: no loop overhead */
            case 16: FUSED_NAME(rope_row)(xr, o, c, s, width, 16); break;
            case 32: FUSED_NAME(rope_row)(xr, o, c, s, width, 32); break;
            case 64: FUSED_NAME(rope_row)(xr, o, c, s, width, 64); break;
            default: FUSED_NAME(rope_row)(xr, o, c, s, width, half);
            }
        }
    }
}

/* Per-head views of token-major arrays, element (b, h, t, d) at b · sb + h · sh + t · st + d:
   heads_transposed writes out (batch, heads, dim, time) contiguous (kᵀ, vᵀ for the batched products);
   row_dots writes out[(b · heads + h) · time + t] = Σ_d x[b, h, t, d] · y[b, h, t, d]  (attention's Δ). */
void FUSED_NAME(heads_transposed)(const real *x, int64_t sb, int64_t sh, int64_t st, real *restrict out,
                                  int64_t batch, int64_t heads, int64_t time, int64_t dim)
{
    for (int64_t b = 0; b < batch; b++)
        for (int64_t h = 0; h < heads; h++) {
            real *restrict o = out + (b * heads + h) * dim * time;
            const real *xh = x + b * sb + h * sh;
            for (int64_t t0 = 0; t0 < time; t0 += 16) {      /* 16 tokens at a time: whole runs of each out row */
                int64_t t1 = t0 + 16 < time ? t0 + 16 : time;
                for (int64_t d = 0; d < dim; d++)
                    for (int64_t t = t0; t < t1; t++)
                        o[d * time + t] = xh[t * st + d];
            }
        }
}

void FUSED_NAME(row_dots)(const real *x, int64_t x_sb, int64_t x_sh, int64_t x_st, const real *y, int64_t y_sb,
                          int64_t y_sh, int64_t y_st, real *restrict out, int64_t batch, int64_t heads,
                          int64_t time, int64_t dim)
{
    for (int64_t b = 0; b < batch; b++)
        for (int64_t h = 0; h < heads; h++)
            for (int64_t t = 0; t < time; t++) {
                const real *restrict xr = x + b * x_sb + h * x_sh + t * x_st;
                const real *restrict yr = y + b * y_sb + h * y_sh + t * y_st;
                real total = 0;
                for (int64_t d = 0; d < dim; d++)
                    total += xr[d] * yr[d];
                out[(b * heads + h) * time + t] = total;
            }
}

/* The embedding's backward: dw (vocab, channels) = 0, then dw[ids[row]] += dy[row] for every row in order
   (repeated ids add up in the order of their positions); ids must lie in [0, vocab) (the forward checked) */
void FUSED_NAME(embedding_backward)(const int64_t *restrict ids, const real *restrict dy, real *restrict dw,
                                    int64_t rows, int64_t vocab, int64_t channels)
{
    memset(dw, 0, sizeof(real) * vocab * channels);
    for (int64_t row = 0; row < rows; row++) {
        real *target = dw + ids[row] * channels;
        const real *source = dy + row * channels;
        for (int64_t c = 0; c < channels; c++)
            target[c] += source[c];
    }
}

/* Cross-entropy rows in place: z (rows, vocab) becomes the gradient (softmax(z) − onehot(target)) · scale
   and losses[row] = logsumexp(z) − z[target] (in double); a row whose target is `ignore` becomes 0 with
   loss 0. Targets must lie in [0, vocab) otherwise (the caller checks). */
void FUSED_NAME(cross_entropy_rows)(real *restrict z, const int64_t *restrict targets, double *restrict losses,
                                    int64_t rows, int64_t vocab, real scale, int64_t ignore)
{
    for (int64_t row = 0; row < rows; row++) {
        real *zr = z + row * vocab;
        int64_t target = targets[row];
        if (target == ignore) {
            for (int64_t j = 0; j < vocab; j++)
                zr[j] = 0;
            losses[row] = 0;
            continue;
        }
        real picked = zr[target];
        real top = FUSED_NAME(row_max)(zr, vocab);
        real total = FUSED_NAME(exp_shifted)(zr, vocab, top);
        losses[row] = (double)top + log((double)total) - (double)picked;
        real factor = scale / total;
        for (int64_t j = 0; j < vocab; j++)
            zr[j] *= factor;
        zr[target] -= scale;
    }
}

/* AdamW on n elements: g ← g · grad_scale (written back);
   m ← β₁ m + (1 − β₁) g;  v ← β₂ v + (1 − β₂) g²;
   θ ← θ · decay − step_size · m / (√v · inverse_correction + eps) */
void FUSED_NAME(adamw)(real *restrict param, real *restrict grad, real *restrict m, real *restrict v, int64_t n,
                       real grad_scale, real beta1, real beta2, real decay, real step_size,
                       real inverse_correction, real eps)
{
    for (int64_t i = 0; i < n; i++) {
        real g = grad[i] * grad_scale;
        grad[i] = g;
        real mi = beta1 * m[i] + ((real)1 - beta1) * g;
        real vi = beta2 * v[i] + ((real)1 - beta2) * g * g;
        m[i] = mi;
        v[i] = vi;
        param[i] = param[i] * decay - step_size * mi / (FUSED_SQRT(vi) * inverse_correction + eps);
    }
}

/* Decoding-time loops (tinygrad_llm.generate's steps: one new position a row, nothing kept for a backward). */

/* Packed SwiGLU rows: gate_up (rows, 2F) holds g ‖ u per row; y (rows, F) = g · σ(g) · u (swiglu_forward a row) */
void FUSED_NAME(swiglu_packed_forward)(const real *restrict gate_up, real *restrict y, int64_t rows, int64_t hidden)
{
    for (int64_t row = 0; row < rows; row++)
        FUSED_NAME(swiglu_forward)(gate_up + 2 * row * hidden, gate_up + (2 * row + 1) * hidden, y + row * hidden,
                                   hidden);
}

/* Attention of one new position per row over that row's KV cache (ops/attention.CausalAttention's cached
   form with T = 1), rows first … last − 1 of:
     q, k, v: row b's new query (heads · D), key and value (kv_heads · D each) at q + b · q_stride, … (in
       elements; one packed q‖k‖v row, or three arrays);
     slots[b], positions[b]: the store row s and position p of row b; angles[b]: its row of the tables
       cos, sin (·, D/2) (out₁ = x₁ cos − x₂ sin, out₂ = x₂ cos + x₁ sin, halves split at D/2);
     k_store, v_store (·, kv_heads, length, D) contiguous: k rotated and v are written at [s, :, p];
     out (rows, heads · D);  scratch: (rows, heads · D + length) elements, a row's own part only.
   Per head h, with its kv head h / (heads / kv_heads): q̂ = rope(q_h) / √D;  e_j = exp(k_j · q̂ − max);
   P_j = e_j / Σ e  over j ≤ p;  out = Σ_j P_j v_j. */
void FUSED_NAME(decode_attention)(const real *q_new, int64_t q_stride, const real *k_new, int64_t k_stride,
                                  const real *v_new, int64_t v_stride, const int64_t *restrict slots,
                                  const int64_t *restrict positions, const int64_t *restrict angles,
                                  const real *restrict cos, const real *restrict sin, real *restrict k_store,
                                  real *restrict v_store, real *restrict out, real *restrict scratch,
                                  int64_t first, int64_t last, int64_t heads, int64_t kv_heads, int64_t dim,
                                  int64_t length)
{
    const int64_t half = dim / 2, group = heads / kv_heads;
    const real scale = (real)1 / FUSED_SQRT((real)dim);
    for (int64_t b = first; b < last; b++) {
        const int64_t position = positions[b], keys = position + 1;
        const real *c = cos + angles[b] * half, *s = sin + angles[b] * half;
        real *q = scratch + b * (heads * dim + length), *scores = q + heads * dim;
        real *k_row = k_store + slots[b] * kv_heads * length * dim;
        real *v_row = v_store + slots[b] * kv_heads * length * dim;
        for (int64_t h = 0; h < heads + kv_heads; h++) {            /* rotate q (scaled) and k */
            const real *x = h < heads ? q_new + b * q_stride + h * dim : k_new + b * k_stride + (h - heads) * dim;
            real *o = h < heads ? q + h * dim : k_row + ((h - heads) * length + position) * dim;
            const real factor = h < heads ? scale : (real)1;
            for (int64_t i = 0; i < half; i++) {
                real x1 = x[i], x2 = x[i + half];
                o[i] = (x1 * c[i] - x2 * s[i]) * factor;
                o[i + half] = (x2 * c[i] + x1 * s[i]) * factor;
            }
        }
        for (int64_t h = 0; h < kv_heads; h++)
            memcpy(v_row + (h * length + position) * dim, v_new + b * v_stride + h * dim, (size_t)dim * sizeof(real));
        for (int64_t h = 0; h < heads; h++) {
            const real *qh = q + h * dim;
            const real *keys_h = k_row + (h / group) * length * dim, *values_h = v_row + (h / group) * length * dim;
            const char *next_v = NULL;
            int64_t next_bytes = 0;
            if (b + 1 < last && h % group == 0) {
                /* the next row's keys of this head, fetched while this row computes (its values after this
                   head's scores: two smaller bursts, ~5 % faster than one): a row's cache is read once a
                   step, from memory, and the hardware alone keeps too few reads in flight */
                const int64_t offset = (slots[b + 1] * kv_heads + h / group) * length * dim;
                const char *next_k = (const char *)(k_store + offset);
                next_v = (const char *)(v_store + offset);
                next_bytes = (positions[b + 1] + 1) * dim * (int64_t)sizeof(real);
                for (int64_t line = 0; line < next_bytes; line += 64)
                    __builtin_prefetch(next_k + line, 0, 2);
            }
            const int simd = ATTENTION_SIMD && sizeof(real) == sizeof(float) && dim % 16 == 0;
#if ATTENTION_SIMD
            if (simd) head_scores_avx512((const float *)keys_h, (const float *)qh, (float *)scores, keys, dim);
#endif
            for (int64_t j = 0; j < keys && !simd; j++) {
                const real *k = keys_h + j * dim;
                real dot = 0;
                for (int64_t d = 0; d < dim; d++)
                    dot += k[d] * qh[d];
                scores[j] = dot;
            }
            for (int64_t line = 0; line < next_bytes; line += 64)
                __builtin_prefetch(next_v + line, 0, 2);
            real top = FUSED_NAME(row_max)(scores, keys);
            real inverse = (real)1 / FUSED_NAME(exp_shifted)(scores, keys, top);
            real *o = out + b * heads * dim + h * dim;
#if ATTENTION_SIMD
            if (simd) {
                head_values_avx512((const float *)values_h, (const float *)scores, (float)inverse, (float *)o, keys, dim);
                continue;
            }
#endif
            for (int64_t d = 0; d < dim; d++)
                o[d] = 0;
            for (int64_t j = 0; j < keys; j++) {
                const real p = scores[j] * inverse, *v = values_h + j * dim;
                for (int64_t d = 0; d < dim; d++)
                    o[d] += p * v[d];
            }
        }
    }
}

/* Causal attention of the CPU training path with every product of one head done here, its tiles in cache
   (ops/attention.CausalAttention's packed form with P kept: `tiled_attention_forward/backward`). Per batch
   row b and kv head, kᵀ (or vᵀ) is copied once into scratch (D, T16) (T16 = T rounded up to 16, the
   columns past T zero); then per query head h of the group, 8 query rows at a time:
     forward:   S = q kᵀ (q comes scaled by 1/√D), the causal softmax of each row, O = P v;
     backward:  Δ = rowsum(dO ∘ O);  dS = P ∘ (dO vᵀ − Δ);  dq = dS k;  and per 8 keys, over the rows at
                and after them: dk (+)= dSᵀ q, dv (+)= Pᵀ dO (the group's heads add up; the first writes).
   Kept P (and the backward's dS scratch) hold only the keys a row's tile can see: row i of tile
   t = i / 16 keeps keys 0 … 16(t + 1) − 1, zero after i (tiled_row_offset gives where it starts; a head
   takes tiled_row_offset(T16) elements). The products are register tiles of GCC vector types (8 rows
   × 1 or 2 vectors of keys or of D, an element broadcast against each vector, fma chains): the compiler
   emits AVX-512 where the build has it, else 256-bit vectors. D must be a multiple of the vector's lanes
   (16 float32 / 8 float64 with AVX-512); otherwise the functions return −1 at once and the op takes its
   NumPy-blocked path. q, k, v, O, dO, dq, dk, dv are per-head views: element (b, h, t, d) at
   b · sb + h · sh + t · st + d (in elements), as heads_transposed reads them. */
#ifndef TILED_BYTES
#if defined(__AVX512F__)
#define TILED_BYTES 64
#else
#define TILED_BYTES 32
#endif
#define TILED_ROWS 8                     /* query rows (or keys, for dk and dv) of one register tile */
#endif
typedef real FUSED_NAME(tile_vector) __attribute__((vector_size(TILED_BYTES)));
#define TILED_LANES ((int64_t)(TILED_BYTES / sizeof(real)))

static inline FUSED_NAME(tile_vector) FUSED_NAME(tile_load)(const real *p)
{
    FUSED_NAME(tile_vector) x;
    memcpy(&x, p, sizeof x);
    return x;
}

static inline void FUSED_NAME(tile_store)(real *p, FUSED_NAME(tile_vector) x)
{
    memcpy(p, &x, sizeof x);
}

/* where row i's kept keys start in a head's kept P, and how many it keeps */
static inline int64_t FUSED_NAME(tiled_row_offset)(int64_t i)
{
    const int64_t t = i / 16;
    return 16 * (8 * t * (t + 1) + (i % 16) * (t + 1));
}

static inline int64_t FUSED_NAME(tiled_row_keys)(int64_t i)
{
    return 16 * (i / 16 + 1);
}

/* c[r][column + …] = Σ_{k < inner} a[r][k] · b[k · b_stride + column + …] for the 8 rows r, W vectors of
   columns (b's rows: kᵀ or vᵀ for the scores, v or k's rows for P v and dS k) */
static inline __attribute__((always_inline)) void FUSED_NAME(tile_rows_by_columns)(
    const int W, const real *const a[TILED_ROWS], const real *restrict b, int64_t b_stride, int64_t inner,
    real *const c[TILED_ROWS], int64_t column)
{
    FUSED_NAME(tile_vector) acc[TILED_ROWS][2];
    for (int r = 0; r < TILED_ROWS; r++)
        for (int w = 0; w < W; w++) acc[r][w] = (FUSED_NAME(tile_vector)){0};
    for (int64_t k = 0; k < inner; k++) {
        FUSED_NAME(tile_vector) x[2];
        for (int w = 0; w < W; w++) x[w] = FUSED_NAME(tile_load)(b + k * b_stride + column + w * TILED_LANES);
        for (int r = 0; r < TILED_ROWS; r++) {
            const real e = a[r][k];
            for (int w = 0; w < W; w++) acc[r][w] += e * x[w];
        }
    }
    for (int r = 0; r < TILED_ROWS; r++)
        for (int w = 0; w < W; w++) FUSED_NAME(tile_store)(c[r] + column + w * TILED_LANES, acc[r][w]);
}

/* c[i][column + …] (+)= Σ_{first ≤ r < last} kept[r][key + i] · b[r · b_stride + column + …] for the 8 keys
   key + i, kept a head's kept-layout rows (P or dS): the transposed product, over the rows that see the keys */
static inline __attribute__((always_inline)) void FUSED_NAME(tile_columns_by_rows)(
    const int W, const real *kept, int64_t key, int64_t first, int64_t last, const real *b, int64_t b_stride,
    real *const c[TILED_ROWS], int64_t column, int accumulate)
{
    FUSED_NAME(tile_vector) acc[TILED_ROWS][2];
    for (int i = 0; i < TILED_ROWS; i++)
        for (int w = 0; w < W; w++)
            acc[i][w] = accumulate ? FUSED_NAME(tile_load)(c[i] + column + w * TILED_LANES)
                                   : (FUSED_NAME(tile_vector)){0};
    int64_t offset = FUSED_NAME(tiled_row_offset)(first), keys = FUSED_NAME(tiled_row_keys)(first);
    for (int64_t r = first; r < last; r++) {
        const real *row = kept + offset + key;
        FUSED_NAME(tile_vector) x[2];
        for (int w = 0; w < W; w++) x[w] = FUSED_NAME(tile_load)(b + r * b_stride + column + w * TILED_LANES);
        for (int i = 0; i < TILED_ROWS; i++) {
            const real e = row[i];
            for (int w = 0; w < W; w++) acc[i][w] += e * x[w];
        }
        offset += keys;
        if ((r + 1) % 16 == 0) keys += 16;
    }
    for (int i = 0; i < TILED_ROWS; i++)
        for (int w = 0; w < W; w++) FUSED_NAME(tile_store)(c[i] + column + w * TILED_LANES, acc[i][w]);
}

/* Rows first … first + 7 of one head (those ≥ time point at row time − 1 and write to `spare`): the row
   pointers of x (read) and of the kept layout `kept` and of y (written) */
static inline void FUSED_NAME(tile_pointers)(int64_t first, int64_t time, const real *x, int64_t x_stride,
                                             const real *a[TILED_ROWS], real *kept, real *c[TILED_ROWS],
                                             real *y, int64_t y_stride, real *out[TILED_ROWS], real *spare)
{
    for (int i = 0; i < TILED_ROWS; i++) {
        const int64_t r = first + i;
        const int valid = r < time;
        a[i] = x + (valid ? r : time - 1) * x_stride;
        c[i] = valid ? kept + FUSED_NAME(tiled_row_offset)(r) : spare;
        if (out != NULL) out[i] = valid ? y + r * y_stride : spare;
    }
}

/* The causal softmax of a register tile's score rows in place: row first + i (of rows first … last − 1)
   sees keys 0 … first + i; the later ones (to `keys`, a multiple of the lanes) are set to −∞ in registers
   so that every pass is whole vectors (per-row scalar tails cost more than the row's products), and
   exp(−∞ − max) = 0 gives them probability 0. Each pass runs over all the rows before the next, so that the
   rows' reductions (their maxima, their sums), each a chain of dependent steps, overlap. */
typedef FUSED_INT FUSED_NAME(tile_mask) __attribute__((vector_size(TILED_BYTES)));

/* a where `where`, else b, lane by lane */
static inline FUSED_NAME(tile_vector) FUSED_NAME(tile_select)(FUSED_NAME(tile_mask) where, FUSED_NAME(tile_vector) a,
                                                              FUSED_NAME(tile_vector) b)
{
    return (FUSED_NAME(tile_vector))((where & (FUSED_NAME(tile_mask))a) | (~where & (FUSED_NAME(tile_mask))b));
}

static inline void FUSED_NAME(tile_softmax)(real *const c[TILED_ROWS], int64_t first, int64_t last, int64_t keys)
{
    FUSED_NAME(tile_mask) lane;
    for (int i = 0; i < TILED_LANES; i++) lane[i] = (FUSED_INT)i;
    const FUSED_NAME(tile_vector) hidden = (FUSED_NAME(tile_vector)){0} - (real)INFINITY;
    const int rows = (int)(last - first);
    real largest[TILED_ROWS], total[TILED_ROWS];
    for (int i = 0; i < rows; i++) {
        real *restrict row = c[i];
        const int64_t seen = first + i + 1;
        FUSED_NAME(tile_vector) top = hidden;
        for (int64_t j = 0; j < keys; j += TILED_LANES) {
            FUSED_NAME(tile_vector) x = FUSED_NAME(tile_load)(row + j);
            if (j + TILED_LANES > seen) {
                x = FUSED_NAME(tile_select)(lane < (FUSED_INT)(seen - j), x, hidden);
                FUSED_NAME(tile_store)(row + j, x);
            }
            top = FUSED_NAME(tile_select)(x > top, x, top);
        }
        largest[i] = top[0];
        for (int l = 1; l < TILED_LANES; l++) largest[i] = top[l] > largest[i] ? top[l] : largest[i];
    }
    for (int i = 0; i < rows; i++)
        total[i] = FUSED_NAME(exp_shifted)(c[i], keys, largest[i]);
    for (int i = 0; i < rows; i++) {
        real *restrict row = c[i];
        const real inverse = (real)1 / total[i];
        for (int64_t j = 0; j < keys; j++) row[j] *= inverse;
    }
}

/* x (time, dim) at row stride `stride` into xt (dim, padded), the columns past time zero */
static void FUSED_NAME(tile_transpose)(const real *x, int64_t stride, real *restrict xt, int64_t time,
                                       int64_t padded, int64_t dim)
{
    const int64_t whole = time / 16 * 16;
    for (int64_t t0 = 0; t0 < whole; t0 += 16)
        for (int64_t d = 0; d < dim; d++)
            for (int64_t t = t0; t < t0 + 16; t++)
                xt[d * padded + t] = x[t * stride + d];
    for (int64_t d = 0; d < dim && whole < padded; d++)
        for (int64_t t = whole; t < padded; t++)
            xt[d * padded + t] = t < time ? x[t * stride + d] : (real)0;
}

/* c rows = a rows (inner values each) · b (inner rows of b_stride), columns 0 … columns − 1, 2 vectors at a
   time, then 1: the scores (a = q or dO rows, b = kᵀ or vᵀ) and the weighted rows (a = P or dS, b = v or k) */
static void FUSED_NAME(tile_rows_times)(const real *const a[TILED_ROWS], int64_t inner, const real *b, int64_t b_stride,
                                        real *const c[TILED_ROWS], int64_t columns)
{
    int64_t column = 0;
    for (; column + 2 * TILED_LANES <= columns; column += 2 * TILED_LANES)
        FUSED_NAME(tile_rows_by_columns)(2, a, b, b_stride, inner, c, column);
    for (; column < columns; column += TILED_LANES)
        FUSED_NAME(tile_rows_by_columns)(1, a, b, b_stride, inner, c, column);
}

/* y[j] (+)= Σ_{r ≥ j} kept[r][j] · b[r] for every key j < time (dk from dS and q, dv from P and dO) */
static void FUSED_NAME(tile_transposed)(const real *kept, const real *b, int64_t b_stride, real *y, int64_t y_stride,
                                        int64_t time, int64_t dim, int accumulate, real *spare)
{
    for (int64_t key = 0; key < time; key += TILED_ROWS) {
        real *c[TILED_ROWS];
        for (int i = 0; i < TILED_ROWS; i++)
            c[i] = key + i < time ? y + (key + i) * y_stride : spare;
        int64_t column = 0;
        for (; column + 2 * TILED_LANES <= dim; column += 2 * TILED_LANES)
            FUSED_NAME(tile_columns_by_rows)(2, kept, key, key, time, b, b_stride, c, column, accumulate);
        for (; column < dim; column += TILED_LANES)
            FUSED_NAME(tile_columns_by_rows)(1, kept, key, key, time, b, b_stride, c, column, accumulate);
    }
}

/* Fetch rows first … first + 7 of x (row stride `stride`, dim elements each) into L2: the next head's rows,
   a group of rows at each group of this head, so that its reads from memory overlap this head's products */
static inline void FUSED_NAME(tile_prefetch)(const real *x, int64_t stride, int64_t first, int64_t time, int64_t dim)
{
    for (int64_t r = first; r < first + TILED_ROWS && r < time; r++)
        for (int64_t d = 0; d < dim; d += 64 / (int64_t)sizeof(real))
            __builtin_prefetch(x + r * stride + d, 0, 2);
}

/* Forward: O and the kept P (batch, heads, tiled_row_offset(T16)) of q (scaled), k, v.
   scratch: dim · T16 + max(T16, dim) elements. Returns 0, or −1 (nothing done) where dim is not a
   multiple of the lanes. */
int FUSED_NAME(tiled_attention_forward)(const real *q, int64_t q_sb, int64_t q_sh, int64_t q_st,
                                        const real *k, int64_t k_sb, int64_t k_sh, int64_t k_st,
                                        const real *v, int64_t v_sb, int64_t v_sh, int64_t v_st,
                                        real *o, int64_t o_sb, int64_t o_sh, int64_t o_st,
                                        real *p, real *scratch, int64_t batch, int64_t heads, int64_t kv_heads,
                                        int64_t time, int64_t dim)
{
    if (dim % TILED_LANES != 0 || time < 1 || kv_heads < 1 || heads % kv_heads != 0) return -1;
    const int64_t padded = (time + 15) / 16 * 16, per_head = FUSED_NAME(tiled_row_offset)(padded);
    const int64_t group = heads / kv_heads;
    real *kt = scratch, *spare = scratch + dim * padded;
    for (int64_t b = 0; b < batch; b++)
        for (int64_t kv = 0; kv < kv_heads; kv++) {
            FUSED_NAME(tile_transpose)(k + b * k_sb + kv * k_sh, k_st, kt, time, padded, dim);
            const real *vh = v + b * v_sb + kv * v_sh;
            for (int64_t h = kv * group; h < (kv + 1) * group; h++) {
                const real *qh = q + b * q_sb + h * q_sh;
                real *oh = o + b * o_sb + h * o_sh, *ph = p + (b * heads + h) * per_head;
                const int64_t next_b = h + 1 < heads ? b : b + 1, next_h = h + 1 < heads ? h + 1 : 0;
                const int next = next_b < batch, next_kv = next && next_h % group == 0;
                const real *next_q = q + next_b * q_sb + next_h * q_sh;
                const real *next_k = k + next_b * k_sb + next_h / group * k_sh;
                const real *next_v = v + next_b * v_sb + next_h / group * v_sh;
                for (int64_t first = 0; first < time; first += TILED_ROWS) {
                    const real *a[TILED_ROWS];
                    real *c[TILED_ROWS], *out[TILED_ROWS];
                    if (next) FUSED_NAME(tile_prefetch)(next_q, q_st, first, time, dim);
                    if (next_kv) {
                        FUSED_NAME(tile_prefetch)(next_k, k_st, first, time, dim);
                        FUSED_NAME(tile_prefetch)(next_v, v_st, first, time, dim);
                    }
                    FUSED_NAME(tile_pointers)(first, time, qh, q_st, a, ph, c, oh, o_st, out, spare);
                    const int64_t keys = FUSED_NAME(tiled_row_keys)(first);
                    FUSED_NAME(tile_rows_times)(a, dim, kt, padded, c, keys);                  /* S rows */
                    const int64_t n = first + TILED_ROWS < time ? first + TILED_ROWS : time;
                    FUSED_NAME(tile_softmax)(c, first, n, keys);                       /* P rows */
                    FUSED_NAME(tile_rows_times)((const real *const *)c, n, vh, v_st, out, dim);   /* O rows = P v */
                }
            }
        }
    return 0;
}

/* Backward of tiled_attention_forward: dq (with respect to the scaled q), dk, dv written (dk, dv summed
   over the group). scratch: dim · T16 + tiled_row_offset(T16) + T16 + max(T16, dim) elements. Returns 0,
   or −1 (nothing done) as the forward. */
int FUSED_NAME(tiled_attention_backward)(const real *d_out, int64_t g_sb, int64_t g_sh, int64_t g_st,
                                         const real *q, int64_t q_sb, int64_t q_sh, int64_t q_st,
                                         const real *k, int64_t k_sb, int64_t k_sh, int64_t k_st,
                                         const real *v, int64_t v_sb, int64_t v_sh, int64_t v_st,
                                         const real *o, int64_t o_sb, int64_t o_sh, int64_t o_st,
                                         const real *p,
                                         real *dq, int64_t dq_sb, int64_t dq_sh, int64_t dq_st,
                                         real *dk, int64_t dk_sb, int64_t dk_sh, int64_t dk_st,
                                         real *dv, int64_t dv_sb, int64_t dv_sh, int64_t dv_st,
                                         real *scratch, int64_t batch, int64_t heads, int64_t kv_heads,
                                         int64_t time, int64_t dim)
{
    if (dim % TILED_LANES != 0 || time < 1 || kv_heads < 1 || heads % kv_heads != 0) return -1;
    const int64_t padded = (time + 15) / 16 * 16, per_head = FUSED_NAME(tiled_row_offset)(padded);
    const int64_t group = heads / kv_heads;
    real *vt = scratch, *ds = vt + dim * padded, *delta = ds + per_head, *spare = delta + padded;
    for (int64_t b = 0; b < batch; b++)
        for (int64_t kv = 0; kv < kv_heads; kv++) {
            const real *kh = k + b * k_sb + kv * k_sh;
            real *dkh = dk + b * dk_sb + kv * dk_sh, *dvh = dv + b * dv_sb + kv * dv_sh;
            FUSED_NAME(tile_transpose)(v + b * v_sb + kv * v_sh, v_st, vt, time, padded, dim);
            for (int64_t h = kv * group; h < (kv + 1) * group; h++) {
                const real *gh = d_out + b * g_sb + h * g_sh, *qh = q + b * q_sb + h * q_sh;
                const real *oh = o + b * o_sb + h * o_sh, *ph = p + (b * heads + h) * per_head;
                real *dqh = dq + b * dq_sb + h * dq_sh;
                const int64_t next_b = h + 1 < heads ? b : b + 1, next_h = h + 1 < heads ? h + 1 : 0;
                const int next = next_b < batch, next_kv = next && next_h % group == 0;
                const real *next_g = d_out + next_b * g_sb + next_h * g_sh, *next_q = q + next_b * q_sb + next_h * q_sh;
                const real *next_o = o + next_b * o_sb + next_h * o_sh;
                const real *next_k = k + next_b * k_sb + next_h / group * k_sh;
                const real *next_v = v + next_b * v_sb + next_h / group * v_sh;
                const char *next_p = (const char *)(p + (next_b * heads + next_h) * per_head);
                for (int64_t t = 0; t < time; t++) {                              /* Δ = rowsum(dO ∘ O) */
                    real total = 0;
                    for (int64_t d = 0; d < dim; d++) total += gh[t * g_st + d] * oh[t * o_st + d];
                    delta[t] = total;
                }
                for (int64_t first = 0; first < time; first += TILED_ROWS) {
                    const real *a[TILED_ROWS];
                    real *c[TILED_ROWS], *out[TILED_ROWS];
                    if (next) {
                        FUSED_NAME(tile_prefetch)(next_g, g_st, first, time, dim);
                        FUSED_NAME(tile_prefetch)(next_q, q_st, first, time, dim);
                        FUSED_NAME(tile_prefetch)(next_o, o_st, first, time, dim);
                        const int64_t last = first + TILED_ROWS < time ? first + TILED_ROWS : time;
                        for (int64_t byte = FUSED_NAME(tiled_row_offset)(first) * (int64_t)sizeof(real);
                             byte < FUSED_NAME(tiled_row_offset)(last) * (int64_t)sizeof(real); byte += 64)
                            __builtin_prefetch(next_p + byte, 0, 2);
                    }
                    if (next_kv) {
                        FUSED_NAME(tile_prefetch)(next_k, k_st, first, time, dim);
                        FUSED_NAME(tile_prefetch)(next_v, v_st, first, time, dim);
                    }
                    FUSED_NAME(tile_pointers)(first, time, gh, g_st, a, ds, c, dqh, dq_st, out, spare);
                    const int64_t keys = FUSED_NAME(tiled_row_keys)(first);
                    FUSED_NAME(tile_rows_times)(a, dim, vt, padded, c, keys);                 /* dP = dO vᵀ */
                    for (int i = 0; i < TILED_ROWS && first + i < time; i++) {     /* dS = P ∘ (dP − Δ) */
                        real *row = c[i];
                        const real *kept = ph + FUSED_NAME(tiled_row_offset)(first + i), shift = delta[first + i];
                        for (int64_t j = 0; j < keys; j++) row[j] = kept[j] * (row[j] - shift);
                    }
                    const int64_t n = first + TILED_ROWS < time ? first + TILED_ROWS : time;
                    FUSED_NAME(tile_rows_times)((const real *const *)c, n, kh, k_st, out, dim);  /* dq = dS k */
                }
                const int accumulate = h > kv * group;
                FUSED_NAME(tile_transposed)(ds, qh, q_st, dkh, dk_st, time, dim, accumulate, spare);  /* dSᵀ q */
                FUSED_NAME(tile_transposed)(ph, gh, g_st, dvh, dv_st, time, dim, accumulate, spare);  /* Pᵀ dO */
            }
        }
    return 0;
}
#endif
