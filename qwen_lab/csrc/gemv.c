/* y = W x (+ b) for one row x: the matrix-vector product that decoding is made of.
 *
 * Decoding reads every weight matrix once per token and does two flops per weight, so its
 * speed is the speed at which the weights stream from memory. The loops here do nothing
 * clever with arithmetic; what differs between CPUs is how to keep enough memory requests in
 * flight, so the file offers a few ways to walk the matrix and kernels.py measures, once per
 * weight shape on this machine, which is fastest (torch's own F.linear included):
 *
 *   rows      1: one row at a time, front to back: one sequential stream per thread, which
 *                the hardware prefetcher follows best (AMD Zen);
 *             2, 4: that many rows side by side: more streams in flight per core, which some
 *                cores need to reach the memory's speed (measured on Intel, one core alone
 *                reads far below the socket's bandwidth);
 *   prefetch  0: hardware prefetching only; 1: also ask for the data 1 KiB ahead.
 *
 * It is written once with GCC's vector extensions and compiled once per instruction set
 * (kernels.py: VARIANTS): VEC = 8 floats as AVX2 ymm registers, VEC = 16 as AVX-512 zmm
 * registers — or, with -DVEC=16 and AVX2 flags, as pairs of ymm registers, which is how the
 * 16-wide code is tested on machines without AVX-512. Sums are float32; bf16 weights are
 * widened by a 16-bit shift (a bf16 is the top half of a float32). Work is shared over the
 * pool of pool.c in chunks of rows.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "bf16.h"
#include "pool.h"

#ifndef VEC
#define VEC 8
#endif
#ifndef VARIANT
#define VARIANT avx2
#endif
#define NAME2(a, b) a##_##b
#define NAME(a, b) NAME2(a, b)

typedef float vf __attribute__((vector_size(VEC * 4)));
typedef uint16_t vh __attribute__((vector_size(VEC * 2)));
typedef uint32_t vu __attribute__((vector_size(VEC * 4)));

static inline vf load_f32(const float *p) { vf v; memcpy(&v, p, sizeof v); return v; }

/* Two vectors of bf16 weights widened to float32 at once: a load of 2*VEC bf16 values, each interleaved
 * with a zero so it lands in the top half of a 32-bit lane — which makes it a float32. The interleave
 * is the one the CPU does within each 128-bit lane (vpunpcklwd / vpunpckhwd): `lo` gets weights 0-3,
 * 8-11, 16-19..., `hi` weights 4-7, 12-15...; x comes shuffled the same way (shuffle_x), since a sum
 * does not care about the order of its terms. Measured 1.3x faster than widening 8 at a time. */
typedef uint16_t vh2 __attribute__((vector_size(VEC * 4)));
#if VEC == 8
#define LO(z, h) __builtin_shufflevector(z, h, 0, 16, 0, 17, 0, 18, 0, 19, 0, 24, 0, 25, 0, 26, 0, 27)
#define HI(z, h) __builtin_shufflevector(z, h, 0, 20, 0, 21, 0, 22, 0, 23, 0, 28, 0, 29, 0, 30, 0, 31)
static const int ORDER[16] = {0, 1, 2, 3, 8, 9, 10, 11, 4, 5, 6, 7, 12, 13, 14, 15};
#elif VEC == 16
#define LO(z, h) __builtin_shufflevector(z, h, 0, 32, 0, 33, 0, 34, 0, 35, 0, 40, 0, 41, 0, 42, 0, 43, \
                                         0, 48, 0, 49, 0, 50, 0, 51, 0, 56, 0, 57, 0, 58, 0, 59)
#define HI(z, h) __builtin_shufflevector(z, h, 0, 36, 0, 37, 0, 38, 0, 39, 0, 44, 0, 45, 0, 46, 0, 47, \
                                         0, 52, 0, 53, 0, 54, 0, 55, 0, 60, 0, 61, 0, 62, 0, 63)
static const int ORDER[32] = {0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27,
                              4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31};
#else
#error "VEC must be 8 or 16"
#endif

static inline void load_bf16_pair(const uint16_t *p, vf *lo, vf *hi) {
    vh2 h, z = {0};
    memcpy(&h, p, sizeof h);
    vh2 a = LO(z, h), b = HI(z, h);
    memcpy(lo, &a, sizeof a);
    memcpy(hi, &b, sizeof b);
}

/* x as float32, each block of 2*VEC values reordered to match load_bf16_pair (the tail stays in order). */
static void shuffle_x(const uint16_t *x16, float *xs, int64_t K);

static inline float hsum(vf v) {
    float s = 0.0f;
    for (int i = 0; i < VEC; i++) s += v[i];
    return s;
}

#define PREFETCH_AHEAD 1024  /* bytes */

/* R rows starting at w (row stride K) dotted with x: out[r]. ACC independent sums per row hide the
 * latency of the adds. bf16 rows read 2*VEC weights per step (load_bf16_pair) against a shuffled x. */
#define DOT_F32(NAME_, R, ACC)                                                                       \
static inline void NAME_(const float *w, const float *x, int64_t K, int prefetch, float *out) {      \
    vf acc[R][ACC];                                                                                  \
    for (int r = 0; r < R; r++) for (int a = 0; a < ACC; a++) acc[r][a] = (vf){0};                   \
    int64_t k = 0;                                                                                   \
    for (; k + VEC * ACC <= K; k += VEC * ACC) {                                                    \
        if (prefetch) for (int r = 0; r < R; r++)                                                    \
            __builtin_prefetch((const char *)(w + r * K + k) + PREFETCH_AHEAD, 0, 0);                \
        for (int a = 0; a < ACC; a++) {                                                              \
            vf xv = load_f32(x + k + a * VEC);                                                       \
            for (int r = 0; r < R; r++) acc[r][a] += load_f32(w + r * K + k + a * VEC) * xv;         \
        }                                                                                            \
    }                                                                                                \
    for (; k + VEC <= K; k += VEC) {                                                                 \
        vf xv = load_f32(x + k);                                                                     \
        for (int r = 0; r < R; r++) acc[r][0] += load_f32(w + r * K + k) * xv;                       \
    }                                                                                                \
    for (int r = 0; r < R; r++) {                                                                    \
        vf total = acc[r][0];                                                                        \
        for (int a = 1; a < ACC; a++) total += acc[r][a];                                            \
        float s = hsum(total);                                                                       \
        for (int64_t t = k; t < K; t++) s += w[r * K + t] * x[t];                                    \
        out[r] = s;                                                                                  \
    }                                                                                                \
}

#define DOT_BF16(NAME_, R, PAIRS)                                                                    \
static inline void NAME_(const uint16_t *w, const float *xs, int64_t K, int prefetch, float *out) {  \
    vf acc[R][2 * PAIRS];                                                                            \
    for (int r = 0; r < R; r++) for (int a = 0; a < 2 * PAIRS; a++) acc[r][a] = (vf){0};             \
    int64_t k = 0;                                                                                   \
    for (; k + 2 * VEC * PAIRS <= K; k += 2 * VEC * PAIRS) {                                        \
        if (prefetch) for (int r = 0; r < R; r++)                                                    \
            __builtin_prefetch((const char *)(w + r * K + k) + PREFETCH_AHEAD, 0, 0);                \
        for (int a = 0; a < PAIRS; a++) {                                                            \
            vf xlo = load_f32(xs + k + 2 * VEC * a), xhi = load_f32(xs + k + 2 * VEC * a + VEC);    \
            for (int r = 0; r < R; r++) {                                                            \
                vf lo, hi;                                                                           \
                load_bf16_pair(w + r * K + k + 2 * VEC * a, &lo, &hi);                              \
                acc[r][2 * a] += lo * xlo;                                                           \
                acc[r][2 * a + 1] += hi * xhi;                                                       \
            }                                                                                        \
        }                                                                                            \
    }                                                                                                \
    for (; k + 2 * VEC <= K; k += 2 * VEC) {                                                         \
        vf xlo = load_f32(xs + k), xhi = load_f32(xs + k + VEC);                                    \
        for (int r = 0; r < R; r++) {                                                                \
            vf lo, hi;                                                                               \
            load_bf16_pair(w + r * K + k, &lo, &hi);                                                 \
            acc[r][0] += lo * xlo;                                                                   \
            acc[r][1] += hi * xhi;                                                                   \
        }                                                                                            \
    }                                                                                                \
    for (int r = 0; r < R; r++) {                                                                    \
        vf total = acc[r][0];                                                                        \
        for (int a = 1; a < 2 * PAIRS; a++) total += acc[r][a];                                      \
        float s = hsum(total);                                                                       \
        for (int64_t t = k; t < K; t++) s += bf16_to_f32(w[r * K + t]) * xs[t];  /* tail: unshuffled */ \
        out[r] = s;                                                                                  \
    }                                                                                                \
}

DOT_F32(dot1_f32, 1, 4)
DOT_F32(dot2_f32, 2, 2)
DOT_F32(dot4_f32, 4, 2)
DOT_BF16(dot1_bf16, 1, 2)
DOT_BF16(dot2_bf16, 2, 1)
DOT_BF16(dot4_bf16, 4, 1)

static void shuffle_x(const uint16_t *x16, float *xs, int64_t K) {
    const int64_t block = 2 * VEC;
    int64_t k = 0;
    for (; k + block <= K; k += block)
        for (int i = 0; i < block; i++) xs[k + i] = bf16_to_f32(x16[k + ORDER[i]]);
    for (; k < K; k++) xs[k] = bf16_to_f32(x16[k]);
}

struct gemv_job {
    const void *W;
    const float *x;
    const void *bias;
    void *y;
    int64_t N, K, rows;  /* rows per chunk */
    int bf16, rows_in_flight, prefetch;
};

static void gemv_chunk(const void *job, int64_t c) {
    const struct gemv_job *j = job;
    const int64_t K = j->K, end = (c + 1) * j->rows < j->N ? (c + 1) * j->rows : j->N;
    float out[4];
    int64_t n = c * j->rows;
    while (n < end) {
        int take = end - n >= j->rows_in_flight ? j->rows_in_flight : 1;  /* the chunk's leftover rows: one by one */
        if (j->bf16) {
            const uint16_t *w = (const uint16_t *)j->W + n * K;
            if (take == 4) dot4_bf16(w, j->x, K, j->prefetch, out);
            else if (take == 2) dot2_bf16(w, j->x, K, j->prefetch, out);
            else dot1_bf16(w, j->x, K, j->prefetch, out);
            for (int r = 0; r < take; r++) {
                float b = j->bias ? bf16_to_f32(((const uint16_t *)j->bias)[n + r]) : 0.0f;
                ((uint16_t *)j->y)[n + r] = f32_to_bf16(out[r] + b);
            }
        } else {
            const float *w = (const float *)j->W + n * K;
            if (take == 4) dot4_f32(w, j->x, K, j->prefetch, out);
            else if (take == 2) dot2_f32(w, j->x, K, j->prefetch, out);
            else dot1_f32(w, j->x, K, j->prefetch, out);
            for (int r = 0; r < take; r++) ((float *)j->y)[n + r] = out[r] + (j->bias ? ((const float *)j->bias)[n + r] : 0.0f);
        }
        n += take;
    }
}

/* Chunks are whole multiples of rows_in_flight rows, about `chunk_bytes` each; a job smaller
 * than `solo_bytes` is one chunk (the calling thread alone). */
static void run(struct gemv_job *job, int64_t row_bytes, int threads, int64_t solo_bytes, int64_t chunk_bytes) {
    int64_t rows = job->N;
    if (threads > 1 && job->N * row_bytes >= solo_bytes) {
        rows = chunk_bytes / row_bytes;
        rows -= rows % job->rows_in_flight;
        if (rows < job->rows_in_flight) rows = job->rows_in_flight;
    }
    job->rows = rows;
    qwen_pool_run(gemv_chunk, job, (job->N + rows - 1) / rows, threads);
}

static int valid(int rows_in_flight) { return rows_in_flight == 1 || rows_in_flight == 2 || rows_in_flight == 4; }

/* y[n] = sum_k W[n, k] x[k] + (bias ? bias[n] : 0), W row-major (N x K). Returns 0, or -2 for a bad mode. */
int NAME(qwen_gemv_f32, VARIANT)(const float *W, const float *x, const float *bias, float *y, int64_t N, int64_t K,
                                 int threads, int rows_in_flight, int prefetch, int64_t solo_bytes, int64_t chunk_bytes) {
    if (!valid(rows_in_flight)) return -2;
    struct gemv_job job = {W, x, bias, y, N, K, 0, 0, rows_in_flight, prefetch};
    run(&job, K * 4, threads, solo_bytes, chunk_bytes);
    return 0;
}

/* The same with bfloat16 W, x, bias and y; x is widened to float32 once, sums are float32, y rounded once.
 * Returns 0, -1 if memory for the float32 copy of x ran out, or -2 for a bad mode. */
int NAME(qwen_gemv_bf16, VARIANT)(const uint16_t *W, const uint16_t *x16, const uint16_t *bias, uint16_t *y,
                                  int64_t N, int64_t K, int threads, int rows_in_flight, int prefetch,
                                  int64_t solo_bytes, int64_t chunk_bytes) {
    if (!valid(rows_in_flight)) return -2;
    float stack[8192];
    float *x = K <= 8192 ? stack : (float *)malloc((size_t)K * sizeof(float));
    if (!x) return -1;
    shuffle_x(x16, x, K);
    struct gemv_job job = {W, x, bias, y, N, K, 0, 1, rows_in_flight, prefetch};
    run(&job, K * 2, threads, solo_bytes, chunk_bytes);
    if (x != stack) free(x);
    return 0;
}
