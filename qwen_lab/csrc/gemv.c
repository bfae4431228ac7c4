/* Matrix-vector products for decoding one token: y = W x (+ b).
 *
 * Decoding reads every weight matrix once per token and does two flops per
 * weight, so its speed is the speed at which the weights stream from memory.
 * These loops do nothing clever: each thread takes a contiguous block of rows
 * of the row-major (out x in) matrix, as nn.Linear stores it, and reads it
 * front to back, one row at a time, with four AVX2 accumulators in flight.
 * That single sequential stream per core is what the hardware prefetcher
 * follows best: walking four rows side by side, as a BLAS does, was measured
 * 1.5x slower for bfloat16 on short rows. Sums are float32 for both dtypes.
 *
 * Built on first use by qwen_lab/gemv.py (cc -O3 -mavx2 -mfma -fopenmp) and
 * called through ctypes; the OpenMP runtime is the one torch already loaded.
 */
#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

static inline float bf16_to_f32(uint16_t h) {  /* a bfloat16 is the top half of a float32 */
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t f32_to_bf16(float f) {  /* round to nearest even, as torch does */
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);  /* NaN stays NaN */
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

/* One float32 row dotted with x, 32 weights per step in four independent sums. */
static inline float row_f32(const float *w, const float *x, int64_t K) {
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    int64_t k = 0;
    for (; k + 32 <= K; k += 32) {
        a0 = _mm256_fmadd_ps(_mm256_loadu_ps(w + k), _mm256_loadu_ps(x + k), a0);
        a1 = _mm256_fmadd_ps(_mm256_loadu_ps(w + k + 8), _mm256_loadu_ps(x + k + 8), a1);
        a2 = _mm256_fmadd_ps(_mm256_loadu_ps(w + k + 16), _mm256_loadu_ps(x + k + 16), a2);
        a3 = _mm256_fmadd_ps(_mm256_loadu_ps(w + k + 24), _mm256_loadu_ps(x + k + 24), a3);
    }
    for (; k + 8 <= K; k += 8) a0 = _mm256_fmadd_ps(_mm256_loadu_ps(w + k), _mm256_loadu_ps(x + k), a0);
    float s = hsum(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
    for (; k < K; k++) s += w[k] * x[k];
    return s;
}

/* One bfloat16 row, 32 weights per step. A 256-bit load holds 16 weights; interleaving it
 * with zeros puts each one in the top half of a 32-bit lane, which makes it a float32.
 * The interleave takes weights 0-3 and 8-11 (lo), 4-7 and 12-15 (hi), so x comes
 * shuffled the same way (see shuffle_x): a sum does not care about the order of its terms. */
static inline float row_bf16(const uint16_t *w, const float *xs, int64_t K) {
    const __m256i zero = _mm256_setzero_si256();
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    int64_t k = 0;
    for (; k + 32 <= K; k += 32) {
        __m256i v = _mm256_loadu_si256((const __m256i *)(w + k));
        __m256i u = _mm256_loadu_si256((const __m256i *)(w + k + 16));
        a0 = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_unpacklo_epi16(zero, v)), _mm256_loadu_ps(xs + k), a0);
        a1 = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_unpackhi_epi16(zero, v)), _mm256_loadu_ps(xs + k + 8), a1);
        a2 = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_unpacklo_epi16(zero, u)), _mm256_loadu_ps(xs + k + 16), a2);
        a3 = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_unpackhi_epi16(zero, u)), _mm256_loadu_ps(xs + k + 24), a3);
    }
    for (; k + 16 <= K; k += 16) {
        __m256i v = _mm256_loadu_si256((const __m256i *)(w + k));
        a0 = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_unpacklo_epi16(zero, v)), _mm256_loadu_ps(xs + k), a0);
        a1 = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_unpackhi_epi16(zero, v)), _mm256_loadu_ps(xs + k + 8), a1);
    }
    float s = hsum(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
    for (; k < K; k++) s += bf16_to_f32(w[k]) * xs[k];  /* the tail of x is not shuffled */
    return s;
}

/* x as float32, each full block of 16 reordered to match the interleaves of row_bf16. */
static void shuffle_x(const uint16_t *x16, float *xs, int64_t K) {
    static const int order[16] = {0, 1, 2, 3, 8, 9, 10, 11, 4, 5, 6, 7, 12, 13, 14, 15};
    int64_t k = 0;
    for (; k + 16 <= K; k += 16)
        for (int i = 0; i < 16; i++) xs[k + i] = bf16_to_f32(x16[k + order[i]]);
    for (; k < K; k++) xs[k] = bf16_to_f32(x16[k]);
}

/* y[n] = sum_k W[n, k] x[k] + (bias ? bias[n] : 0), W row-major (N x K). */
void qwen_gemv_f32(const float *W, const float *x, const float *bias, float *y,
                   int64_t N, int64_t K, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t n = 0; n < N; n++) y[n] = row_f32(W + n * K, x, K) + (bias ? bias[n] : 0.0f);
}

/* The same with bfloat16 weights, x, bias and y; sums in float32, y rounded once.
 * Returns 0, or -1 if memory for the float32 copy of x ran out. */
int qwen_gemv_bf16(const uint16_t *W, const uint16_t *x16, const uint16_t *bias, uint16_t *y,
                   int64_t N, int64_t K, int threads) {
    float stack[8192];
    float *xs = K <= 8192 ? stack : (float *)malloc((size_t)K * sizeof(float));
    if (!xs) return -1;
    shuffle_x(x16, xs, K);
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t n = 0; n < N; n++)
        y[n] = f32_to_bf16(row_bf16(W + n * K, xs, K) + (bias ? bf16_to_f32(bias[n]) : 0.0f));
    if (xs != stack) free(xs);
    return 0;
}
