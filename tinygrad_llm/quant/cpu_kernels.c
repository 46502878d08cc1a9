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
   flags that let it reassociate the 32-term sums (tinygrad_llm/quant/cpu_kernels.py builds it). */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

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
