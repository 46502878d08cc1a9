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
   (hadd) for the 8 sums; elsewhere (or with -DTINYGRAD_LLM_PORTABLE) plain C that the compiler vectorises,
   given the flags that let it reassociate the 32-term sums (tinygrad_llm/quant/cpu_kernels.py builds it). */
#include <stdint.h>
#include <string.h>

#define BLOCK 32
#define CHUNK 512          /* output rows whose scales are converted at once */

static inline float half_to_float(uint16_t bits)
{
#if defined(__FLT16_MAX__)
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

static inline __m256 widen(__m128i bytes)                  /* the low 8 int8 lanes -> float32 */
{
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(bytes));
}

/* a block's 32 codes as float32, w[0..3] = elements 0–7, 8–15, 16–23, 24–31 */
static inline void q8_0_codes(const int8_t *q, __m256 *w)
{
    const __m128i a = _mm_loadu_si128((const __m128i *)q), b = _mm_loadu_si128((const __m128i *)(q + 16));
    w[0] = widen(a); w[1] = widen(_mm_srli_si128(a, 8)); w[2] = widen(b); w[3] = widen(_mm_srli_si128(b, 8));
}

static inline void q4_0_codes(const uint8_t *q, __m256 *w)
{
    const __m128i packed = _mm_loadu_si128((const __m128i *)q), mask = _mm_set1_epi8(15), eight = _mm_set1_epi8(8);
    const __m128i low = _mm_sub_epi8(_mm_and_si128(packed, mask), eight);                      /* elements 0–15 */
    const __m128i high = _mm_sub_epi8(_mm_and_si128(_mm_srli_epi16(packed, 4), mask), eight);  /* elements 16–31 */
    w[0] = widen(low); w[1] = widen(_mm_srli_si128(low, 8)); w[2] = widen(high); w[3] = widen(_mm_srli_si128(high, 8));
}

#define SIMD_LINEAR(NAME, TYPE, BYTES, CODES, PORTABLE)                                                         \
void NAME(const TYPE *values, const uint16_t *scale, const float *x, float *y,                                  \
          int64_t blocks, int64_t out, int64_t start, int64_t end, int64_t rows)                               \
{                                                                                                              \
    const int64_t in = blocks * BLOCK, grouped = start + (end - start) / GROUP * GROUP;                         \
    if (grouped < end)                                     /* the last rows, fewer than a group */              \
        PORTABLE(values, scale, x, y, blocks, out, grouped, end, rows);                                        \
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
                float *yo = y + n * out + o;                                                                   \
                _mm256_storeu_ps(yo, _mm256_fmadd_ps(sums8(products), d, _mm256_loadu_ps(yo)));               \
            }                                                                                                  \
        }                                                                                                      \
    }                                                                                                          \
}

SIMD_LINEAR(q8_0_linear, int8_t, BLOCK, q8_0_codes, q8_0_portable)
SIMD_LINEAR(q4_0_linear, uint8_t, (BLOCK / 2), q4_0_codes, q4_0_portable)

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
