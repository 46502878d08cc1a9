/* The CPU kernels of the quantized linear op (tinygrad_llm/ops/quantized.py): y = x @ Ŵᵀ for a few rows of x,
   read straight from the Q8_0 / Q4_0 codes, without a float32 copy of the weights.

   Computes, for output rows o in [start, end) and every row n of x:
       y[n, o] = Σ_j d[j, o] · Σ_i w[j, o, i] · x[n, 32 j + i]
   with w the codes (Q8_0: int8; Q4_0: nibble − 8) and d the block's float16 scale: the dequantised float
   op's sum, in float32, in another order (the op's tests hold it to the float64 product at rtol 1e-4).

   Shapes (QuantizedMatrix's block-major layout, nb = in / 32 blocks a row):
       values  Q8_0 int8 (nb, out, 32);  Q4_0 uint8 (nb, out, 16): byte i holds element i in its low nibble
               and element i + 16 in its high nibble
       scale   float16 bits (nb, out)
       x       float32 (rows, in), contiguous;  y float32 (rows, out), contiguous; columns [start, end) written
   Loop order: blocks outer, output rows inner, so the codes are read once, front to back, as they lie in
   memory (the SIMD build converts each block's codes to float32 once for all the rows of x); y's rows
   [start, end) stay in cache across the blocks. A caller splits [start, end) across threads (ctypes releases the
   GIL during the call).
   Two builds of the same loops: with AVX2 + FMA + F16C (x86-64 since 2013), 8 output rows a step, their
   codes widened int8 -> int32 -> float32 in registers, 8 × 32 products, and one transposing reduction
   (hadd) for the 8 sums; elsewhere (or with -DTINYGRAD_LLM_PORTABLE, which also converts the float16 scales
   bit by bit instead of through the compiler's _Float16) plain C that the compiler vectorises, given the
   flags that let it reassociate the 32-term sums (tinygrad_llm/quant/cpu_kernels.py builds it).
   The second half of the file: the rounded kernels, the same product on x rounded to 8 bits per block with
   int8 products (llama.cpp's arithmetic, for many rows of x), described where they start. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>

#define BLOCK 32
#define CHUNK 512          /* output rows whose scales are converted at once */

static inline float half_to_float(uint16_t bits)
{
#if defined(__FLT16_MAX__) && !defined(TINYGRAD_LLM_PORTABLE)
    _Float16 h;
    memcpy(&h, &bits, sizeof h);
    return (float)h;
#else
    uint32_t sign = (uint32_t)(bits & 0x8000u) << 16, exponent = (bits >> 10) & 0x1Fu, mantissa = bits & 0x3FFu;
    uint32_t word;
    float f;
    if (exponent == 0x1Fu) {
        word = sign | 0x7F800000u | (mantissa << 13);                     /* inf / nan */
    } else if (exponent != 0) {
        word = sign | ((exponent + 112u) << 23) | (mantissa << 13);       /* normal: rebias 15 -> 127 */
    } else {
        f = (float)mantissa * (1.0f / 16777216.0f);                       /* subnormal: mantissa · 2^-24 */
        return sign ? -f : f;
    }
    memcpy(&f, &word, sizeof f);
    return f;
#endif
}

static void scales(float *d, const uint16_t *bits, int64_t count)
{
    for (int64_t o = 0; o < count; o++) d[o] = half_to_float(bits[o]);
}

static void clear(float *y, int64_t rows, int64_t out, int64_t start, int64_t end)
{
    for (int64_t n = 0; n < rows; n++)
        memset(y + n * out + start, 0, (size_t)(end - start) * sizeof(float));
}

static void q8_0_portable(const int8_t *values, const uint16_t *scale, const float *x, float *y,
                          int64_t blocks, int64_t out, int64_t start, int64_t end, int64_t rows)
{
    const int64_t in = blocks * BLOCK;
    float d[CHUNK];
    clear(y, rows, out, start, end);
    for (int64_t j = 0; j < blocks; j++) {
        const int8_t *slab = values + j * out * BLOCK;
        for (int64_t first = start; first < end; first += CHUNK) {
            const int64_t count = end - first < CHUNK ? end - first : CHUNK;
            scales(d, scale + j * out + first, count);
            for (int64_t n = 0; n < rows; n++) {
                const float *xj = x + n * in + j * BLOCK;
                float *yn = y + n * out + first;
                for (int64_t o = 0; o < count; o++) {
                    const int8_t *q = slab + (first + o) * BLOCK;
                    float sum = 0.0f;
                    for (int i = 0; i < BLOCK; i++) sum += (float)q[i] * xj[i];
                    yn[o] += d[o] * sum;
                }
            }
        }
    }
}

static void q4_0_portable(const uint8_t *values, const uint16_t *scale, const float *x, float *y,
                          int64_t blocks, int64_t out, int64_t start, int64_t end, int64_t rows)
{
    const int64_t in = blocks * BLOCK;
    float d[CHUNK];
    clear(y, rows, out, start, end);
    for (int64_t j = 0; j < blocks; j++) {
        const uint8_t *slab = values + j * out * (BLOCK / 2);
        for (int64_t first = start; first < end; first += CHUNK) {
            const int64_t count = end - first < CHUNK ? end - first : CHUNK;
            scales(d, scale + j * out + first, count);
            for (int64_t n = 0; n < rows; n++) {
                const float *xj = x + n * in + j * BLOCK;
                float *yn = y + n * out + first;
                for (int64_t o = 0; o < count; o++) {
                    const uint8_t *q = slab + (first + o) * (BLOCK / 2);
                    float sum = 0.0f;
                    for (int i = 0; i < BLOCK / 2; i++)
                        sum += (float)((int)(q[i] & 15) - 8) * xj[i] + (float)((int)(q[i] >> 4) - 8) * xj[i + BLOCK / 2];
                    yn[o] += d[o] * sum;
                }
            }
        }
    }
}

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__) && !defined(TINYGRAD_LLM_PORTABLE)
#include <immintrin.h>
#define GROUP 8           /* output rows a step: their 8 sums come out of one transposing reduction */

/* the 8 horizontal sums of a[0..7], as one vector (lane r = Σ a[r]) */
static inline __m256 sums8(const __m256 *a)
{
    const __m256 s0 = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
    const __m256 s1 = _mm256_hadd_ps(_mm256_hadd_ps(a[4], a[5]), _mm256_hadd_ps(a[6], a[7]));
    return _mm256_add_ps(_mm256_permute2f128_ps(s0, s1, 0x20), _mm256_permute2f128_ps(s0, s1, 0x31));
}

static inline __m256 widen_signed(const int8_t *q)        /* 8 int8 codes -> float32 */
{
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)q)));
}

/* a block's 32 codes as float32, w[0..3] = elements 0–7, 8–15, 16–23, 24–31 */
static inline void q8_0_codes(const int8_t *q, __m256 *w)
{
    w[0] = widen_signed(q); w[1] = widen_signed(q + 8); w[2] = widen_signed(q + 16); w[3] = widen_signed(q + 24);
}

/* Q4_0: the nibbles n as float32, without the −8 (the caller subtracts 8 · Σ x once per 8 rows) */
static inline void q4_0_codes(const uint8_t *q, __m256 *w)
{
    const __m256i a = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)q));          /* bytes 0–7 */
    const __m256i b = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(q + 8)));    /* bytes 8–15 */
    const __m256i low = _mm256_set1_epi32(15);
    w[0] = _mm256_cvtepi32_ps(_mm256_and_si256(a, low)); w[1] = _mm256_cvtepi32_ps(_mm256_and_si256(b, low));
    w[2] = _mm256_cvtepi32_ps(_mm256_srli_epi32(a, 4));  w[3] = _mm256_cvtepi32_ps(_mm256_srli_epi32(b, 4));
}

/* factor · Σ x over each block of each row of x: (rows, blocks), malloc'ed (NULL if that fails) */
static float *block_sums(const float *x, int64_t rows, int64_t blocks, float factor)
{
    float *sums = (float *)malloc((size_t)(rows * blocks) * sizeof(float));
    if (sums == NULL) return NULL;
    for (int64_t k = 0; k < rows * blocks; k++) {
        float total = 0.0f;
        for (int i = 0; i < BLOCK; i++) total += x[k * BLOCK + i];
        sums[k] = factor * total;
    }
    return sums;
}

/* OFFSET: what every code was stored above its value (Q4_0: 8), taken off the sums as OFFSET · Σ x */
#define SIMD_LINEAR(NAME, TYPE, BYTES, CODES, OFFSET, PORTABLE)                                                 \
void NAME(const TYPE *values, const uint16_t *scale, const float *x, float *y,                                  \
          int64_t blocks, int64_t out, int64_t start, int64_t end, int64_t rows)                               \
{                                                                                                              \
    const int64_t in = blocks * BLOCK, grouped = start + (end - start) / GROUP * GROUP;                         \
    float *offsets = OFFSET ? block_sums(x, rows, blocks, (float)(OFFSET)) : NULL;                             \
    if (grouped < end || (OFFSET && offsets == NULL))      /* the last rows, fewer than a group */              \
        PORTABLE(values, scale, x, y, blocks, out, offsets == NULL && OFFSET ? start : grouped, end, rows);    \
    if (OFFSET && offsets == NULL) return;                 /* no memory for the sums: all rows done above */    \
    clear(y, rows, out, start, grouped);                                                                       \
    for (int64_t j = 0; j < blocks; j++) {                                                                      \
        const TYPE *slab = values + j * out * BYTES;                                                           \
        for (int64_t o = start; o < grouped; o += GROUP) {                                                      \
            __m256 w[GROUP][4], products[GROUP];                                                               \
            for (int r = 0; r < GROUP; r++) CODES(slab + (o + r) * BYTES, w[r]);                               \
            const __m256 d = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(scale + j * out + o)));         \
            for (int64_t n = 0; n < rows; n++) {                                                                \
                const float *xj = x + n * in + j * BLOCK;                                                      \
                const __m256 x0 = _mm256_loadu_ps(xj), x1 = _mm256_loadu_ps(xj + 8);                           \
                const __m256 x2 = _mm256_loadu_ps(xj + 16), x3 = _mm256_loadu_ps(xj + 24);                      \
                for (int r = 0; r < GROUP; r++)                                                                \
                    products[r] = _mm256_fmadd_ps(w[r][0], x0, _mm256_fmadd_ps(w[r][1], x1,                    \
                                  _mm256_fmadd_ps(w[r][2], x2, _mm256_mul_ps(w[r][3], x3))));                  \
                __m256 sums = sums8(products);                                                                 \
                if (OFFSET) sums = _mm256_sub_ps(sums, _mm256_set1_ps(offsets[n * blocks + j]));               \
                float *yo = y + n * out + o;                                                                   \
                _mm256_storeu_ps(yo, _mm256_fmadd_ps(sums, d, _mm256_loadu_ps(yo)));                           \
            }                                                                                                  \
        }                                                                                                      \
    }                                                                                                          \
    free(offsets);                                                                                             \
}

SIMD_LINEAR(q8_0_linear, int8_t, BLOCK, q8_0_codes, 0, q8_0_portable)
SIMD_LINEAR(q4_0_linear, uint8_t, (BLOCK / 2), q4_0_codes, 8, q4_0_portable)

#else

void q8_0_linear(const int8_t *values, const uint16_t *scale, const float *x, float *y,
                 int64_t blocks, int64_t out, int64_t start, int64_t end, int64_t rows)
{
    q8_0_portable(values, scale, x, y, blocks, out, start, end, rows);
}

void q4_0_linear(const uint8_t *values, const uint16_t *scale, const float *x, float *y,
                 int64_t blocks, int64_t out, int64_t start, int64_t end, int64_t rows)
{
    q4_0_portable(values, scale, x, y, blocks, out, start, end, rows);
}

#endif

/* ------------------------------------------------------------------------------------------------------------
   The rounded kernels (q8_0_rounded_linear, q4_0_rounded_linear): the same product with x first rounded to
   8 bits per block of 32, llama.cpp's way for many rows of x:
       x̃[n, 32 j + i] = e[n, j] · p[n, j, i],  e = max_i |x[n, 32 j + i]| / 127,  p = round(x / e) ∈ [−127, 127]
       y[n, o] = Σ_j (d[j, o] · e[n, j]) · (Σ_i u[j, o, i] · p[n, j, i]  −  OFFSET · Σ_i p[n, j, i])
   with u the code as an unsigned byte (Q8_0: code + 128, OFFSET 128; Q4_0: the nibble, OFFSET 8), so each
   block's inner sum is exact in int32 and only the 8-bit rounding of x differs from the float op (bound:
   docs/quantization.md). Float arithmetic, identical in both builds: the scale product d · e rounded once,
   then y = fma(float(sum), d · e, y) over j in order, from y = 0.
   Loop order (the AVX-512 VNNI build): output rows in groups of 16, taken a chunk of groups at a time
   (~CODE_BYTES); a chunk's codes, for every block, are rearranged once into a scratch buffer (lane l of a
   vector = 4 consecutive codes of output row l) while the next chunk is prefetched, then every row of x
   runs over a group's blocks with 16 outputs in one register: 8 VNNI dot products (vpdpbusd: 4 u8 × s8
   products summed into each int32 lane) a block, no horizontal sums, 8 rows of x at a time. y is written
   once. Elsewhere the portable C below computes the same numbers (the op does not route rows to it: it is
   no faster than the float kernels). */

#if defined(__AVX512F__) && defined(__AVX512BW__) && !defined(TINYGRAD_LLM_PORTABLE)
#include <immintrin.h>
#define ROUND_SIMD 1
#else
#define ROUND_SIMD 0
#endif

/* x rounded to 8 bits per block of 32 (e, p above) and −offset · Σ p per block. The AVX-512 build takes a
   block as two vectors; the same float steps (max |x|, 127 / max, x · that, rounded to nearest even: the
   conversion's default rounding, as nearbyintf's), so both builds give the same bytes for finite x.
   by_block 0: p (rows, blocks, 32), e and offsets (rows, blocks); 1: block-major, p (blocks, rows, 32), e and
   offsets (blocks, rows), so that one block's rows lie together (the tiled VNNI loop's order). */
static void round_rows(const float *x, int64_t rows, int64_t blocks, int32_t offset,
                       int8_t *p, float *e, int32_t *offsets, int by_block)
{
    for (int64_t source = 0; source < rows * blocks; source++) {
        const float *xk = x + source * BLOCK;
        const int64_t k = by_block ? (source % blocks) * rows + source / blocks : source;   /* where it goes */
#if ROUND_SIMD
        const __m512 low = _mm512_loadu_ps(xk), high = _mm512_loadu_ps(xk + 16);
        const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(low), _mm512_abs_ps(high)));
        const __m512 inverse = _mm512_set1_ps(amax > 0.0f ? 127.0f / amax : 0.0f);
        const __m512i q_low = _mm512_cvtps_epi32(_mm512_mul_ps(low, inverse));       /* |q| ≤ 127 */
        const __m512i q_high = _mm512_cvtps_epi32(_mm512_mul_ps(high, inverse));
        _mm_storeu_si128((__m128i *)(p + k * BLOCK), _mm512_cvtepi32_epi8(q_low));
        _mm_storeu_si128((__m128i *)(p + k * BLOCK + 16), _mm512_cvtepi32_epi8(q_high));
        const int32_t total = _mm512_reduce_add_epi32(_mm512_add_epi32(q_low, q_high));
#else
        float amax = 0.0f;
        /* fmaxf's result (a NaN is skipped) as a compare, which the compiler vectorises (fmaxf is a libm call) */
        for (int i = 0; i < BLOCK; i++) {
            const float a = fabsf(xk[i]);
            amax = a > amax ? a : amax;
        }
        const float inverse = amax > 0.0f ? 127.0f / amax : 0.0f;
        int32_t total = 0;
        for (int i = 0; i < BLOCK; i++) {
            const int32_t q = (int32_t)nearbyintf(xk[i] * inverse);       /* |q| ≤ 127: |x| · 127 / amax */
            p[k * BLOCK + i] = (int8_t)q;
            total += q;
        }
#endif
        e[k] = amax / 127.0f;
        offsets[k] = -offset * total;               /* negated: the sums start from it */
    }
}

/* rows [start, end) of y for every row of x, plain C: the integer sums, then the float steps in the order
   the SIMD build takes them */
static void rounded_portable(const uint8_t *values, int q4, const uint16_t *scale, const int8_t *p,
                             const float *e, const int32_t *offsets, float *y,
                             int64_t blocks, int64_t out, int64_t start, int64_t end, int64_t rows)
{
    clear(y, rows, out, start, end);
    const int64_t bytes = q4 ? BLOCK / 2 : BLOCK;
    for (int64_t j = 0; j < blocks; j++) {
        for (int64_t o = start; o < end; o++) {
            const uint8_t *q = values + (j * out + o) * bytes;
            const float d = half_to_float(scale[j * out + o]);
            for (int64_t n = 0; n < rows; n++) {
                const int8_t *pn = p + (n * blocks + j) * BLOCK;
                int32_t sum = 0;
                if (q4) {
                    for (int i = 0; i < BLOCK / 2; i++)
                        sum += (int32_t)(q[i] & 15) * pn[i] + (int32_t)(q[i] >> 4) * pn[i + BLOCK / 2];
                } else {
                    for (int i = 0; i < BLOCK; i++) sum += (int32_t)(uint8_t)(q[i] ^ 0x80) * pn[i];
                }
                sum += offsets[n * blocks + j];
                const float product = d * e[n * blocks + j];
                y[n * out + o] = fmaf((float)sum, product, y[n * out + o]);
            }
        }
    }
}

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__) && !defined(TINYGRAD_LLM_PORTABLE)
#include <immintrin.h>
#define ROUNDED_SIMD 1
#define LANES 16                  /* output rows a group: one zmm of int32 / float32 */
#ifndef CODE_BYTES
#define CODE_BYTES (128 * 1024)   /* rearranged codes kept at once (L2) while every row of x runs over them */
#endif
#define ARRANGED 8                /* zmm a group keeps per block */
#ifndef PREFETCH_ROWS
#define PREFETCH_ROWS 4           /* rows of x from which the next chunk is prefetched while this one computes */
#endif

/* rows[r] = [output row r's 32 codes | row r + 8's], r < 8  ->  w[k] lane l = bytes 4k…4k+3 of row l */
static inline void transpose_group(const __m512i *rows, __m512i *w)
{
    __m512i t[8], u[8];
    for (int r = 0; r < 8; r += 2) {
        t[r] = _mm512_unpacklo_epi32(rows[r], rows[r + 1]);
        t[r + 1] = _mm512_unpackhi_epi32(rows[r], rows[r + 1]);
    }
    for (int r = 0; r < 8; r += 4) {
        u[r] = _mm512_unpacklo_epi64(t[r], t[r + 2]);          /* dwords 0 | 4 of rows r…r+3 */
        u[r + 1] = _mm512_unpackhi_epi64(t[r], t[r + 2]);      /* 1 | 5 */
        u[r + 2] = _mm512_unpacklo_epi64(t[r + 1], t[r + 3]);  /* 2 | 6 */
        u[r + 3] = _mm512_unpackhi_epi64(t[r + 1], t[r + 3]);  /* 3 | 7 */
    }
    const __m512i first = _mm512_setr_epi64(0, 1, 8, 9, 4, 5, 12, 13);          /* 128-bit lanes 0 of u[k], u[k+4] */
    const __m512i second = _mm512_setr_epi64(2, 3, 10, 11, 6, 7, 14, 15);       /* lanes 1 */
    for (int k = 0; k < 4; k++) {
        w[k] = _mm512_permutex2var_epi64(u[k], first, u[k + 4]);
        w[k + 4] = _mm512_permutex2var_epi64(u[k], second, u[k + 4]);
    }
}

/* The codes of output rows [o, o + 16 · groups) for every block as unsigned bytes (Q8_0: code + 128;
   Q4_0: the nibble), rearranged (transpose_group) into codes[(g · blocks + j) · 8 …], and their scales as
   float32 in scales[g · blocks + j]. Blocks outer, so each block's slab is read as one run. */
static void arrange_groups(const uint8_t *values, int q4, const uint16_t *scale, int64_t blocks, int64_t out,
                           int64_t o, int64_t groups, __m512i *codes, __m512 *scales)
{
    const __m256i low = _mm256_set1_epi8(15);
    const __m512i flip = _mm512_set1_epi8((char)0x80);
    for (int64_t j = 0; j < blocks; j++) {
        for (int64_t g = 0; g < groups; g++) {
            const int64_t first = o + g * LANES;
            __m512i rows[8];
            if (q4) {
                const uint8_t *q = values + (j * out + first) * (BLOCK / 2);
                for (int r = 0; r < 8; r++) {
                    const __m128i row = _mm_loadu_si128((const __m128i *)(q + r * 16));
                    const __m128i later = _mm_loadu_si128((const __m128i *)(q + (r + 8) * 16));
                    const __m256i packed = _mm256_inserti128_si256(_mm256_castsi128_si256(row), later, 1);
                    const __m256i lo = _mm256_and_si256(packed, low);
                    const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(packed, 4), low);
                    rows[r] = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_permute2x128_si256(lo, hi, 0x20)),
                                                 _mm256_permute2x128_si256(lo, hi, 0x31), 1);
                }
            } else {
                const uint8_t *q = values + (j * out + first) * BLOCK;
                for (int r = 0; r < 8; r++) {
                    const __m256i row = _mm256_loadu_si256((const __m256i *)(q + r * BLOCK));
                    const __m256i later = _mm256_loadu_si256((const __m256i *)(q + (r + 8) * BLOCK));
                    rows[r] = _mm512_xor_si512(flip, _mm512_inserti64x4(_mm512_castsi256_si512(row), later, 1));
                }
            }
            transpose_group(rows, codes + (g * blocks + j) * ARRANGED);
            {   /* the start of the same block's piece of the next chunk: each block's slab is read in pieces,
                   which the hardware prefetcher follows better with this hint (measured on a step's products:
                   −20 % at 1 row of x, −8 % at 32; prefetching the whole next piece here gained half that) */
                const int64_t ahead = first + groups * LANES, bytes = q4 ? BLOCK / 2 : BLOCK;
                if (ahead + LANES <= out) {
                    const char *next = (const char *)values + (j * out + ahead) * bytes;
                    for (int line = 0; line < LANES * bytes; line += 64) _mm_prefetch(next + line, _MM_HINT_T1);
                }
            }
            scales[g * blocks + j] = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(scale + j * out + first)));
        }
    }
}

/* acc + the 16 lanes' dot products of w's 4 unsigned bytes with the 4 signed bytes at b, broadcast: one
   vpdpbusd with a memory broadcast operand (GCC 12 emits a separate broadcast for the intrinsic) */
static inline __m512i dot_broadcast(__m512i acc, __m512i w, const int32_t *b)
{
#if defined(__GNUC__)
    __asm__("vpdpbusd %2%{1to16%}, %1, %0" : "+v"(acc) : "v"(w), "m"(*b));
    return acc;
#else
    return _mm512_dpbusd_epi32(acc, w, _mm512_set1_epi32(*b));
#endif
}

/* y[n … n + T, o … o + 16] for T rows of x over one group's arranged blocks: each block's 16 sums start at
   −OFFSET · Σ p, then 8 dot products, x's 4 bytes broadcast from memory into the instruction */
static inline __attribute__((always_inline)) void rows_tile(const int T, const __m512i *codes,
                                                            const __m512 *scales, const int8_t *p,
                                                            const int32_t *offsets, const float *e, float *y,
                                                            int64_t blocks, int64_t out, int64_t n, int64_t o)
{
    __m512 acc[8];
    for (int t = 0; t < T; t++) acc[t] = _mm512_setzero_ps();
    for (int64_t j = 0; j < blocks; j++) {
        const __m512i *w = codes + j * ARRANGED;
        __m512i sums[8];
        for (int t = 0; t < T; t++) sums[t] = _mm512_set1_epi32(offsets[(n + t) * blocks + j]);
        for (int k = 0; k < 8; k++)
            for (int t = 0; t < T; t++) {
                const int32_t *words = (const int32_t *)(p + ((n + t) * blocks + j) * BLOCK);
                sums[t] = dot_broadcast(sums[t], w[k], words + k);
            }
        for (int t = 0; t < T; t++) {
            const __m512 product = _mm512_mul_ps(scales[j], _mm512_set1_ps(e[(n + t) * blocks + j]));   /* d · e */
            acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sums[t]), product, acc[t]);
        }
    }
    for (int t = 0; t < T; t++) _mm512_storeu_ps(y + (n + t) * out + o, acc[t]);
}

static void rounded_simd(const uint8_t *values, int q4, const uint16_t *scale, const int8_t *p,
                         const int32_t *offsets, const float *e,
                         float *y, int64_t blocks, int64_t out, int64_t start, int64_t end, int64_t rows,
                         __m512i *all_codes, __m512 *all_scales, int64_t chunk)
{
    for (int64_t first = start; first < end; first += chunk * LANES) {
        const int64_t groups = (end - first) / LANES < chunk ? (end - first) / LANES : chunk;
        arrange_groups(values, q4, scale, blocks, out, first, groups, all_codes, all_scales);
        /* the next chunk's codes and scales, fetched into L2 a slice of its blocks per group while this
           chunk's groups compute (with many rows of x that takes far longer than the fetch) */
        const int64_t next = first + groups * LANES;
        const int64_t next_rows = end - next < chunk * LANES ? (end - next) / LANES * LANES : chunk * LANES;
        const int64_t bytes = q4 ? BLOCK / 2 : BLOCK;
        for (int64_t g = 0; g < groups; g++) {
            const int64_t o = first + g * LANES;
            if (PREFETCH_ROWS > 0 && rows >= PREFETCH_ROWS && next_rows > 0)
                for (int64_t j = g * blocks / groups; j < (g + 1) * blocks / groups; j++) {
                    const char *slab = (const char *)values + (j * out + next) * bytes;
                    const char *scales_next = (const char *)(scale + j * out + next);
                    for (int64_t line = 0; line < next_rows * bytes; line += 64)
                        _mm_prefetch(slab + line, _MM_HINT_T1);
                    for (int64_t line = 0; line < next_rows * 2; line += 64)
                        _mm_prefetch(scales_next + line, _MM_HINT_T1);
                }
            const __m512i *codes = all_codes + g * blocks * ARRANGED;
            const __m512 *scales = all_scales + g * blocks;
            int64_t n = 0;
            for (; n + 8 <= rows; n += 8) rows_tile(8, codes, scales, p, offsets, e, y, blocks, out, n, o);
            if (n + 4 <= rows) { rows_tile(4, codes, scales, p, offsets, e, y, blocks, out, n, o); n += 4; }
            if (n + 2 <= rows) { rows_tile(2, codes, scales, p, offsets, e, y, blocks, out, n, o); n += 2; }
            if (n < rows) rows_tile(1, codes, scales, p, offsets, e, y, blocks, out, n, o);
        }
    }
}
#else
#define ROUNDED_SIMD 0
#endif

static void rounded_linear(const uint8_t *values, int q4, const uint16_t *scale, const float *x, float *y,
                           int64_t blocks, int64_t out, int64_t start, int64_t end, int64_t rows)
{
    int8_t *p = (int8_t *)malloc((size_t)(rows * blocks * BLOCK));
    float *e = (float *)malloc((size_t)(rows * blocks) * sizeof(float));
    int32_t *offsets = (int32_t *)malloc((size_t)(rows * blocks) * sizeof(int32_t));
    int64_t grouped = start;
#if ROUNDED_SIMD
    /* groups arranged at once: ~CODE_BYTES of rearranged codes */
    const int64_t per_group = blocks * ARRANGED * (int64_t)sizeof(__m512i);
    const int64_t chunk = CODE_BYTES / per_group > 1 ? CODE_BYTES / per_group : 1;
    __m512i *codes = (__m512i *)aligned_alloc(64, (size_t)(chunk * per_group));
    __m512 *scales = (__m512 *)aligned_alloc(64, (size_t)(chunk * blocks) * sizeof(__m512));
#endif
    if (p == NULL || e == NULL || offsets == NULL) {            /* no memory for x rounded: the float kernels */
        if (q4) q4_0_linear(values, scale, x, y, blocks, out, start, end, rows);
        else q8_0_linear((const int8_t *)values, scale, x, y, blocks, out, start, end, rows);
    } else {
        round_rows(x, rows, blocks, q4 ? 8 : 128, p, e, offsets, 0);
#if ROUNDED_SIMD
        if (codes != NULL && scales != NULL) {
            grouped = start + (end - start) / LANES * LANES;
            rounded_simd(values, q4, scale, p, offsets, e, y, blocks, out, start, grouped, rows, codes, scales,
                         chunk);
        }
#endif
        if (grouped < end)
            rounded_portable(values, q4, scale, p, e, offsets, y, blocks, out, grouped, end, rows);
    }
#if ROUNDED_SIMD
    free(codes);
    free(scales);
#endif
    free(p);
    free(e);
    free(offsets);
}

void q8_0_rounded_linear(const int8_t *values, const uint16_t *scale, const float *x, float *y,
                         int64_t blocks, int64_t out, int64_t start, int64_t end, int64_t rows)
{
    rounded_linear((const uint8_t *)values, 0, scale, x, y, blocks, out, start, end, rows);
}

void q4_0_rounded_linear(const uint8_t *values, const uint16_t *scale, const float *x, float *y,
                         int64_t blocks, int64_t out, int64_t start, int64_t end, int64_t rows)
{
    rounded_linear(values, 1, scale, x, y, blocks, out, start, end, rows);
}

/* 1 where the rounded kernels run the VNNI build (faster than the float kernels for many rows of x), 0 where
   they are the plain C above (exact integer sums, but no faster than the float kernels) */
int rounded_simd_build(void)
{
    return ROUNDED_SIMD;
}

/* ------------------------------------------------------------------------------------------------------------
   The tiled kernels (q8_0_tiled_linear, q4_0_tiled_linear, q8_0_tiled_rounded_linear, q4_0_tiled_rounded_linear):
   the four kernels above, same arithmetic, bit for bit, on the tiled layout of the same bytes
   (QuantizedMatrix.tile() in formats.py), which the AVX-512 VNNI build reads without rearranging:
       values  G = out / 16 groups of 16 output rows, group-major: group g's tile for block j at byte
               (g · blocks + j) · 16 · BYTES, in it byte 64 c + 4 l + b = byte 4 c + b of output row 16 g + l's
               block (BYTES 32: Q8_0's codes, c < 8; 16: Q4_0's packed nibbles, c < 4, so the low nibbles of
               vector c are elements 4 c + b and the high ones 16 + 4 c + b); then the last out − 16 G rows
               as before, (blocks, out − 16 G, BYTES)
       scale   (G, blocks, 16) float16 bits, then (blocks, out − 16 G)
   A tile is what the VNNI loop wants in its registers (lane l = output row l, 4 codes a lane), and a group's
   blocks lie back to back, so one group's codes are one run of memory. Output rows [start, end): start a
   multiple of 16, end one too or out. The last out − 16 G rows go through the untiled float kernel (into a
   small buffer) or the rounded kernels' plain C loop (the same steps as the untiled ones take there). The float kernels' SIMD build takes the 16 rows of a tile as the 16 lanes of one vector and adds
   in the order of the 8-row kernels above (lane t of a row's 8 partial sums holds elements t, 8 + t, 16 + t,
   24 + t; then ((0 + 1) + (2 + 3)) + ((4 + 5) + (6 + 7))), so both layouts give the same bytes. */

#define TILE_ROWS 16
#ifndef GROUPS_AHEAD
#define GROUPS_AHEAD 4        /* groups ahead whose tiles the rounded kernels prefetch (a GPT-2-size head: 2 and 8 were slower) */
#endif
#ifndef GROUP_HINT
#define GROUP_HINT _MM_HINT_T1
#endif
#ifndef TILE_PREFETCH
#define TILE_PREFETCH 24      /* tiles ahead that the float kernels prefetch (a GPT-2-size row of blocks) */
#endif

/* output row o's codes of block j in the tiled layout, copied into a row of BYTES (the plain C path) */
static void tiled_row(const uint8_t *values, int64_t bytes, int64_t blocks, int64_t out, int64_t j, int64_t o,
                      uint8_t *row)
{
    const int64_t grouped = out / TILE_ROWS * TILE_ROWS;
    if (o >= grouped) {
        memcpy(row, values + grouped * blocks * bytes + (j * (out - grouped) + o - grouped) * bytes, (size_t)bytes);
        return;
    }
    const uint8_t *tile = values + ((o / TILE_ROWS) * blocks + j) * TILE_ROWS * bytes;
    for (int64_t c = 0; c < bytes; c++) row[c] = tile[(c / 4) * 64 + (o % TILE_ROWS) * 4 + c % 4];
}

static uint16_t tiled_scale(const uint16_t *scale, int64_t blocks, int64_t out, int64_t j, int64_t o)
{
    const int64_t grouped = out / TILE_ROWS * TILE_ROWS;
    if (o >= grouped) return scale[grouped * blocks + j * (out - grouped) + o - grouped];
    return scale[((o / TILE_ROWS) * blocks + j) * TILE_ROWS + o % TILE_ROWS];
}

typedef void (*linear_kernel)(const void *, const uint16_t *, const float *, float *, int64_t, int64_t, int64_t,
                              int64_t, int64_t);

/* the last out − 16 G rows (row layout) through an untiled kernel, into a buffer, then into y's columns;
   0, or −1 where the buffer cannot be had */
static int tiled_tail(linear_kernel kernel, const uint8_t *values, int64_t bytes, const uint16_t *scale,
                      const float *x, float *y, int64_t blocks, int64_t out, int64_t rows)
{
    const int64_t grouped = out / TILE_ROWS * TILE_ROWS, tail = out - grouped;
    float *part = (float *)malloc((size_t)(rows * tail) * sizeof(float));
    if (part == NULL) return -1;
    kernel(values + grouped * blocks * bytes, scale + grouped * blocks, x, part, blocks, tail, 0, tail, rows);
    for (int64_t n = 0; n < rows; n++) memcpy(y + n * out + grouped, part + n * tail, (size_t)tail * sizeof(float));
    free(part);
    return 0;
}

/* plain C for tiled rows [start, end) (end ≤ 16 G): each row's block copied out, then the untiled plain loops'
   arithmetic; `rounded` selects the rounded kernels' (p, e, offsets given) */
static void tiled_portable(const uint8_t *values, int q4, const uint16_t *scale, const float *x, float *y,
                           int64_t blocks, int64_t out, int64_t start, int64_t end, int64_t rows)
{
    const int64_t in = blocks * BLOCK, bytes = q4 ? BLOCK / 2 : BLOCK;
    uint8_t q[BLOCK];
    clear(y, rows, out, start, end);
    for (int64_t j = 0; j < blocks; j++)
        for (int64_t o = start; o < end; o++) {
            tiled_row(values, bytes, blocks, out, j, o, q);
            const float d = half_to_float(tiled_scale(scale, blocks, out, j, o));
            for (int64_t n = 0; n < rows; n++) {
                const float *xj = x + n * in + j * BLOCK;
                float sum = 0.0f;
                if (q4) {
                    for (int i = 0; i < BLOCK / 2; i++)
                        sum += (float)((int)(q[i] & 15) - 8) * xj[i] + (float)((int)(q[i] >> 4) - 8) * xj[i + BLOCK / 2];
                } else {
                    for (int i = 0; i < BLOCK; i++) sum += (float)(int8_t)q[i] * xj[i];
                }
                y[n * out + o] += d * sum;
            }
        }
}

static void tiled_rounded_portable(const uint8_t *values, int q4, const uint16_t *scale, const int8_t *p,
                                   const float *e, const int32_t *offsets, float *y,
                                   int64_t blocks, int64_t out, int64_t start, int64_t end, int64_t rows)
{
    const int64_t bytes = q4 ? BLOCK / 2 : BLOCK;
    uint8_t q[BLOCK];
    clear(y, rows, out, start, end);
    for (int64_t j = 0; j < blocks; j++)
        for (int64_t o = start; o < end; o++) {
            tiled_row(values, bytes, blocks, out, j, o, q);
            const float d = half_to_float(tiled_scale(scale, blocks, out, j, o));
            for (int64_t n = 0; n < rows; n++) {
                const int8_t *pn = p + (j * rows + n) * BLOCK;
                int32_t sum = 0;
                if (q4) {
                    for (int i = 0; i < BLOCK / 2; i++)
                        sum += (int32_t)(q[i] & 15) * pn[i] + (int32_t)(q[i] >> 4) * pn[i + BLOCK / 2];
                } else {
                    for (int i = 0; i < BLOCK; i++) sum += (int32_t)(uint8_t)(q[i] ^ 0x80) * pn[i];
                }
                sum += offsets[j * rows + n];
                const float product = d * e[j * rows + n];
                y[n * out + o] = fmaf((float)sum, product, y[n * out + o]);
            }
        }
}

#if ROUNDED_SIMD
/* element i of a tile's 16 rows as float32: Q8_0 the signed byte i % 4 of dword lane i / 4 of vector i / 4;
   Q4_0 the nibble (without the −8) of byte i % 4 of vector (i % 16) / 4, high for i ≥ 16 */
static inline __m512 tile_element(const __m512i *z, int q4, int i)
{
    if (q4) {
        const int shift = 8 * (i & 3) + (i >= 16 ? 4 : 0);
        const __m512i v = shift ? _mm512_srli_epi32(z[(i & 15) >> 2], (unsigned)shift) : z[(i & 15) >> 2];
        return _mm512_cvtepi32_ps(_mm512_and_si512(v, _mm512_set1_epi32(15)));
    }
    const int b = i & 3;
    const __m512i v = b < 3 ? _mm512_slli_epi32(z[i >> 2], (unsigned)(24 - 8 * b)) : z[i >> 2];
    return _mm512_cvtepi32_ps(_mm512_srai_epi32(v, 24));
}

/* vector add, mul, sub as the instructions' builtins: the flags let the compiler reassociate plain vector
   arithmetic, which would change the order of the sums */
#define ADD(a, b) _mm512_add_round_ps((a), (b), _MM_FROUND_CUR_DIRECTION)
#define MUL(a, b) _mm512_mul_round_ps((a), (b), _MM_FROUND_CUR_DIRECTION)
#define SUB(a, b) _mm512_sub_round_ps((a), (b), _MM_FROUND_CUR_DIRECTION)

/* the 16 rows' Σ_i w_i · x_i for one tile and 32 inputs, in the 8-row float kernels' order */
static inline __attribute__((always_inline)) __m512 tile_sums(const __m512i *z, int q4, const float *xj)
{
    __m512 partial[8];
#pragma GCC unroll 8
    for (int t = 0; t < 8; t++)
        partial[t] = _mm512_fmadd_ps(tile_element(z, q4, t), _mm512_set1_ps(xj[t]),
                     _mm512_fmadd_ps(tile_element(z, q4, 8 + t), _mm512_set1_ps(xj[8 + t]),
                     _mm512_fmadd_ps(tile_element(z, q4, 16 + t), _mm512_set1_ps(xj[16 + t]),
                     MUL(tile_element(z, q4, 24 + t), _mm512_set1_ps(xj[24 + t])))));
    return ADD(ADD(ADD(partial[0], partial[1]), ADD(partial[2], partial[3])),
               ADD(ADD(partial[4], partial[5]), ADD(partial[6], partial[7])));
}

/* float kernels, tiled rows [start, end): a group's blocks in order, y[n, o … o + 16] one vector; offsets: Q4_0's
   8 · Σ x per block (block_sums), NULL for Q8_0 */
static inline __attribute__((always_inline)) void tiled_float_simd(const uint8_t *values, const int q4,
        const uint16_t *scale, const float *x, const float *offsets, float *y, int64_t blocks, int64_t out,
        int64_t start, int64_t end, int64_t rows)
{
    const int64_t in = blocks * BLOCK, bytes = q4 ? BLOCK / 2 : BLOCK;
    for (int64_t o = start; o < end; o += TILE_ROWS) {
        const uint8_t *tiles = values + (o / TILE_ROWS) * blocks * TILE_ROWS * bytes;
        const uint16_t *scales = scale + (o / TILE_ROWS) * blocks * TILE_ROWS;
        for (int64_t n = 0; n < rows; n++) _mm512_storeu_ps(y + n * out + o, _mm512_setzero_ps());
        for (int64_t j = 0; j < blocks; j++) {
            __m512i z[8];
            for (int c = 0; c < (q4 ? 4 : 8); c++) {
                _mm_prefetch((const char *)(tiles + (TILE_PREFETCH + j) * TILE_ROWS * bytes + 64 * c), _MM_HINT_T0);
                z[c] = _mm512_loadu_si512((const void *)(tiles + j * TILE_ROWS * bytes + 64 * c));
            }
            const __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(scales + j * TILE_ROWS)));
            for (int64_t n = 0; n < rows; n++) {
                __m512 sums = tile_sums(z, q4, x + n * in + j * BLOCK);
                if (q4) sums = SUB(sums, _mm512_set1_ps(offsets[n * blocks + j]));
                float *yo = y + n * out + o;
                _mm512_storeu_ps(yo, _mm512_fmadd_ps(sums, d, _mm512_loadu_ps(yo)));
            }
        }
    }
}

/* the VNNI loop of rows_tile on a group's tiles: codes straight from memory (Q8_0: code + 128 by a xor).
   keep 0: the codes made ready (xor, or Q4_0's nibbles split) and the scales converted for these rows only;
   1: also stored in `ready` (READY vectors a block) for the group's later rows of x; 2: read from there */
#define READY 9                    /* vectors a block keeps ready: 8 of codes, 1 of float32 scales */
static inline __attribute__((always_inline)) void tiled_rows_tile(const int T, const uint8_t *tiles, const int q4,
        const int keep, __m512i *ready, const uint16_t *scales, const int8_t *p, const int32_t *offsets,
        const float *e, float *y, int64_t blocks, int64_t out, int64_t rows, int64_t n, int64_t o,
        const uint8_t *ahead)
{
    const __m512i flip = _mm512_set1_epi8((char)0x80), low = _mm512_set1_epi8(15);
    __m512 acc[8];
    for (int t = 0; t < T; t++) acc[t] = _mm512_setzero_ps();
    for (int64_t j = 0; j < blocks; j++) {
        __m512i w[8], sums[8];
        __m512 d;
        if (ahead != NULL)
            for (int line = 0; line < TILE_ROWS * (q4 ? BLOCK / 2 : BLOCK); line += 64)
                _mm_prefetch((const char *)(ahead + j * TILE_ROWS * (q4 ? BLOCK / 2 : BLOCK) + line), GROUP_HINT);
        if (keep == 2) {
            for (int c = 0; c < 8; c++) w[c] = _mm512_load_si512((const void *)(ready + j * READY + c));
            d = _mm512_castsi512_ps(_mm512_load_si512((const void *)(ready + j * READY + 8)));
        } else {
            if (q4) {
                const uint8_t *tile = tiles + j * TILE_ROWS * (BLOCK / 2);
                for (int c = 0; c < 4; c++) {
                    const __m512i packed = _mm512_loadu_si512((const void *)(tile + 64 * c));
                    w[c] = _mm512_and_si512(packed, low);
                    w[c + 4] = _mm512_and_si512(_mm512_srli_epi16(packed, 4), low);
                }
            } else {
                const uint8_t *tile = tiles + j * TILE_ROWS * BLOCK;
                for (int c = 0; c < 8; c++) w[c] = _mm512_xor_si512(flip, _mm512_loadu_si512((const void *)(tile + 64 * c)));
            }
            d = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(scales + j * TILE_ROWS)));
            if (keep == 1) {
                for (int c = 0; c < 8; c++) _mm512_store_si512((void *)(ready + j * READY + c), w[c]);
                _mm512_store_si512((void *)(ready + j * READY + 8), _mm512_castps_si512(d));
            }
        }
        const int32_t *words = (const int32_t *)(p + (j * rows + n) * BLOCK);   /* block j, row n + t at 8 t */
        for (int t = 0; t < T; t++) sums[t] = _mm512_set1_epi32(offsets[j * rows + n + t]);
        for (int k = 0; k < 8; k++)
            for (int t = 0; t < T; t++) sums[t] = dot_broadcast(sums[t], w[k], words + 8 * t + k);
        for (int t = 0; t < T; t++) {
            const __m512 product = _mm512_mul_ps(d, _mm512_set1_ps(e[j * rows + n + t]));   /* d · e */
            acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sums[t]), product, acc[t]);
        }
    }
    for (int t = 0; t < T; t++) _mm512_storeu_ps(y + (n + t) * out + o, acc[t]);
}

/* every row of x over one group's tiles, 8 rows at a time, then 4, 2, 1; with more than 8 rows (and `ready`)
   the first 8 make each block's codes ready once and the later rows read them */
static inline __attribute__((always_inline)) void tiled_group(const uint8_t *tiles, const int q4, __m512i *ready,
        const uint16_t *scales, const int8_t *p, const int32_t *offsets, const float *e, float *y,
        int64_t blocks, int64_t out, int64_t rows, int64_t o, const uint8_t *ahead)
{
    int64_t n = 0;
    if (rows > 8 && ready != NULL) {
        tiled_rows_tile(8, tiles, q4, 1, ready, scales, p, offsets, e, y, blocks, out, rows, 0, o, ahead);
        for (n = 8; n + 8 <= rows; n += 8)
            tiled_rows_tile(8, tiles, q4, 2, ready, scales, p, offsets, e, y, blocks, out, rows, n, o, NULL);
        if (n + 4 <= rows) { tiled_rows_tile(4, tiles, q4, 2, ready, scales, p, offsets, e, y, blocks, out, rows, n, o, NULL); n += 4; }
        if (n + 2 <= rows) { tiled_rows_tile(2, tiles, q4, 2, ready, scales, p, offsets, e, y, blocks, out, rows, n, o, NULL); n += 2; }
        if (n < rows) tiled_rows_tile(1, tiles, q4, 2, ready, scales, p, offsets, e, y, blocks, out, rows, n, o, NULL);
        return;
    }
    for (; n + 8 <= rows; n += 8)
        tiled_rows_tile(8, tiles, q4, 0, NULL, scales, p, offsets, e, y, blocks, out, rows, n, o, n ? NULL : ahead);
    if (n + 4 <= rows) { tiled_rows_tile(4, tiles, q4, 0, NULL, scales, p, offsets, e, y, blocks, out, rows, n, o, n ? NULL : ahead); n += 4; }
    if (n + 2 <= rows) { tiled_rows_tile(2, tiles, q4, 0, NULL, scales, p, offsets, e, y, blocks, out, rows, n, o, n ? NULL : ahead); n += 2; }
    if (n < rows) tiled_rows_tile(1, tiles, q4, 0, NULL, scales, p, offsets, e, y, blocks, out, rows, n, o, n ? NULL : ahead);
}

static void tiled_rounded_simd(const uint8_t *values, const int q4, const uint16_t *scale, const int8_t *p,
                               const int32_t *offsets, const float *e, float *y, int64_t blocks, int64_t out,
                               int64_t start, int64_t end, int64_t rows)
{
    const int64_t bytes = q4 ? BLOCK / 2 : BLOCK;
    __m512i *ready = rows > 8 && !q4 ? (__m512i *)aligned_alloc(64, (size_t)(blocks * READY) * sizeof(__m512i)) : NULL;
    for (int64_t o = start; o < end; o += TILE_ROWS) {
        const uint8_t *tiles = values + (o / TILE_ROWS) * blocks * TILE_ROWS * bytes;
        const uint16_t *scales = scale + (o / TILE_ROWS) * blocks * TILE_ROWS;
        /* a later group's tiles, into L2 while this one computes, a block's tile beside each block's products
           of the first rows of x (a burst of a whole group's lines at once gained less: measured) */
        const uint8_t *ahead = o + GROUPS_AHEAD * TILE_ROWS < end ? tiles + GROUPS_AHEAD * blocks * TILE_ROWS * bytes
                                                                   : NULL;
        if (q4) tiled_group(tiles, 1, ready, scales, p, offsets, e, y, blocks, out, rows, o, ahead);
        else tiled_group(tiles, 0, ready, scales, p, offsets, e, y, blocks, out, rows, o, ahead);
    }
    free(ready);
}
#endif

static void tiled_linear(const uint8_t *values, int q4, const uint16_t *scale, const float *x, float *y,
                         int64_t blocks, int64_t out, int64_t start, int64_t end, int64_t rows)
{
    const int64_t grouped = out / TILE_ROWS * TILE_ROWS, last = end < grouped ? end : grouped;
    int done = 0;
#if ROUNDED_SIMD
    float *offsets = q4 ? block_sums(x, rows, blocks, 8.0f) : NULL;
    if (!q4 || offsets != NULL) {
        if (q4) tiled_float_simd(values, 1, scale, x, offsets, y, blocks, out, start, last, rows);
        else tiled_float_simd(values, 0, scale, x, NULL, y, blocks, out, start, last, rows);
        done = 1;
    }
    free(offsets);
#endif
    if (!done && start < last) tiled_portable(values, q4, scale, x, y, blocks, out, start, last, rows);
    if (end > grouped && end > start) {
        const int64_t bytes = q4 ? BLOCK / 2 : BLOCK;
        if (tiled_tail(q4 ? (linear_kernel)q4_0_linear : (linear_kernel)q8_0_linear, values, bytes, scale, x, y,
                       blocks, out, rows) != 0)
            tiled_portable(values, q4, scale, x, y, blocks, out, grouped, end, rows);
    }
}

/* the rounded product on x already rounded (p, e, offsets: round_rows), tiled rows [start, end): the VNNI loop
   over whole tiles, the plain C loop (the same integer sums and float steps) over the last out − 16 G rows */
static void tiled_rounded_given(const uint8_t *values, int q4, const uint16_t *scale, const int8_t *p,
                                const float *e, const int32_t *offsets, float *y,
                                int64_t blocks, int64_t out, int64_t start, int64_t end, int64_t rows)
{
    const int64_t grouped = out / TILE_ROWS * TILE_ROWS, last = end < grouped ? end : grouped;
    if (start < last) {
#if ROUNDED_SIMD
        tiled_rounded_simd(values, q4, scale, p, offsets, e, y, blocks, out, start, last, rows);
#else
        tiled_rounded_portable(values, q4, scale, p, e, offsets, y, blocks, out, start, last, rows);
#endif
    }
    if (end > grouped && end > start)
        tiled_rounded_portable(values, q4, scale, p, e, offsets, y, blocks, out, grouped > start ? grouped : start,
                               end, rows);
}

static void tiled_rounded(const uint8_t *values, int q4, const uint16_t *scale, const float *x, float *y,
                          int64_t blocks, int64_t out, int64_t start, int64_t end, int64_t rows)
{
    int8_t *p = (int8_t *)malloc((size_t)(rows * blocks * BLOCK));
    float *e = (float *)malloc((size_t)(rows * blocks) * sizeof(float));
    int32_t *offsets = (int32_t *)malloc((size_t)(rows * blocks) * sizeof(int32_t));
    if (p == NULL || e == NULL || offsets == NULL) {           /* no memory for x rounded: the float kernels */
        tiled_linear(values, q4, scale, x, y, blocks, out, start, end, rows);
    } else {
        round_rows(x, rows, blocks, q4 ? 8 : 128, p, e, offsets, 1);
        tiled_rounded_given(values, q4, scale, p, e, offsets, y, blocks, out, start, end, rows);
    }
    free(p);
    free(e);
    free(offsets);
}

void q8_0_tiled_linear(const int8_t *values, const uint16_t *scale, const float *x, float *y,
                       int64_t blocks, int64_t out, int64_t start, int64_t end, int64_t rows)
{
    tiled_linear((const uint8_t *)values, 0, scale, x, y, blocks, out, start, end, rows);
}

void q4_0_tiled_linear(const uint8_t *values, const uint16_t *scale, const float *x, float *y,
                       int64_t blocks, int64_t out, int64_t start, int64_t end, int64_t rows)
{
    tiled_linear(values, 1, scale, x, y, blocks, out, start, end, rows);
}

void q8_0_tiled_rounded_linear(const int8_t *values, const uint16_t *scale, const float *x, float *y,
                               int64_t blocks, int64_t out, int64_t start, int64_t end, int64_t rows)
{
    tiled_rounded((const uint8_t *)values, 0, scale, x, y, blocks, out, start, end, rows);
}

void q4_0_tiled_rounded_linear(const uint8_t *values, const uint16_t *scale, const float *x, float *y,
                               int64_t blocks, int64_t out, int64_t start, int64_t end, int64_t rows)
{
    tiled_rounded(values, 1, scale, x, y, blocks, out, start, end, rows);
}
