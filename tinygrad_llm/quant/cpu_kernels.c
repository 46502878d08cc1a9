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
   memory; a block's 32 codes are converted to float32 once and used for every row of x. y's rows [start,
   end) stay in cache across the blocks. A caller splits [start, end) across threads (ctypes releases the
   GIL during the call). Built by tinygrad_llm/quant/cpu_kernels.py with the flags that let the compiler
   vectorise the 32-term sums (reassociation); no intrinsics, so any C99 compiler builds it. */
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

void q8_0_linear(const int8_t *values, const uint16_t *scale, const float *x, float *y,
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

void q4_0_linear(const uint8_t *values, const uint16_t *scale, const float *x, float *y,
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
