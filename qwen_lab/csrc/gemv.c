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
 *             8: also x read once per 8 rows: a long x (a down projection's: 9.5-35 KB) does not
 *                stay in L1 beside the weights streaming through, and each group of rows reads
 *                it again from L2 (AMD Zen 4 with the memory fast: 5-12% more GB/s than 4 rows
 *                for bf16 1536x8960 and 896x4864 and float32 896x4864; benchmarks/RESULTS.md);
 *   prefetch  0: hardware prefetching only; 1: also ask for the data 1 KiB ahead.
 *
 * It is written once with GCC's vector extensions and compiled once per instruction set
 * (kernels.py: VARIANTS): VEC = 8 floats as AVX2 ymm registers, VEC = 16 as AVX-512 zmm
 * registers — or, with -DVEC=16 and AVX2 flags, as pairs of ymm registers, which is how the
 * 16-wide code is tested on machines without AVX-512. Sums are float32; bf16 weights are
 * widened by a 16-bit shift (a bf16 is the top half of a float32), or, with -DDPBF16, multiplied
 * in pairs against the bf16 x as they are (AVX512-BF16's vdpbf16ps; DPBF16=1 does the same sums
 * with AVX2 arithmetic, to test that walk anywhere). Work is shared over the pool of pool.c in
 * chunks of rows.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "bf16.h"
#include "gemv.h"
#include "pool.h"
#if DPBF16 == 2
#include <immintrin.h>
#endif

#ifndef VEC
#define VEC 8
#endif
#ifndef VARIANT
#define VARIANT avx2
#endif
#define NAME2(a, b) a##_##b
#define NAME(a, b) NAME2(a, b)

typedef float vf __attribute__((vector_size(VEC * 4)));
typedef uint32_t vu __attribute__((vector_size(VEC * 4)));

static inline vf load_f32(const float *p) { vf v; memcpy(&v, p, sizeof v); return v; }

/* Two vectors of bf16 weights widened to float32 at once, from one load of 2*VEC bf16 values read as
 * VEC 32-bit lanes, each holding two weights: shifted left by 16 bits, a lane is its even weight as a
 * float32 (a bf16 is the top half of a float32); masked to its top half, it is its odd weight. Two
 * cheap integer operations per 2*VEC weights, no shuffles, so fewer instructions stand between one
 * load and the next. Measured against interleaving with zeros (which needed a lane-crossing permute
 * for the odd half), one core, weights in the L2 cache: 12-16% more weights per second on AMD Zen 3;
 * from memory both reach the same speed there, but a CPU with faster memory per core needs the
 * headroom. x comes reordered to match (shuffle_x): each block of
 * 2*VEC values as its even values, then its odd ones; a sum does not care about the order of its terms. */

static inline void load_bf16_pair(const uint16_t *p, vf *lo, vf *hi) {
    vu u;
    memcpy(&u, p, sizeof u);
    vu even = u << 16, odd = u & 0xffff0000u;
    memcpy(lo, &even, sizeof even);
    memcpy(hi, &odd, sizeof odd);
}

/* x as float32, each block of 2*VEC values reordered to match load_bf16_pair (the tail stays in order). */
static void shuffle_x(const uint16_t *x16, float *xs, int64_t K) __attribute__((unused));  /* not with DPBF16 */

/* A row's VEC sums added in halves (a tree: four dependent adds for 16 lanes, the order of kernels.c's hsum),
 * not lane after lane: a chain of VEC scalar adds per row, which GCC compiles a loop over lanes to, held a float32
 * one-row walk of 896-wide rows at 81-86% of a plain read's speed on AMD Zen 4 (one thread; scratch harness, the
 * same rows alternating; benchmarks/RESULTS.md); in halves ~95%, and with the rows' loop out of line (below)
 * at the read's speed. */
typedef float v8f __attribute__((vector_size(32)));
typedef float v4f __attribute__((vector_size(16)));

static inline float hsum(vf v) {
#if VEC == 16
    v8f a = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7)
            + __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
#else
    v8f a = v;
#endif
    v4f b = __builtin_shufflevector(a, a, 0, 1, 2, 3) + __builtin_shufflevector(a, a, 4, 5, 6, 7);
    b += __builtin_shufflevector(b, b, 2, 3, 0, 1);
    return b[0] + b[1];
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

#ifdef DPBF16
/* acc + the pair sums of 2*VEC bf16 weights w and 2*VEC bf16 values x: lane i gets
 * w[2i+1]*x[2i+1] + w[2i]*x[2i]. DPBF16 == 2: one vdpbf16ps (AVX512-BF16; it treats subnormal
 * inputs and results as zero). DPBF16 == 1: the same sums, in the same order, by widening both
 * (shift for the even, mask for the odd values): the products of two bf16 are exact in float32. */
static inline vf dot_pairs(vf acc, const uint16_t *w, const uint16_t *x) {
#if DPBF16 == 2 && VEC == 16
    __m512i a, b;
    memcpy(&a, w, sizeof a);
    memcpy(&b, x, sizeof b);
    return (vf)_mm512_dpbf16_ps((__m512)acc, (__m512bh)a, (__m512bh)b);
#else
    vu a, b;
    memcpy(&a, w, sizeof a);
    memcpy(&b, x, sizeof b);
    vu wo = a & 0xffff0000u, xo = b & 0xffff0000u, we = a << 16, xe = b << 16;
    vf fwo, fxo, fwe, fxe;
    memcpy(&fwo, &wo, sizeof wo); memcpy(&fxo, &xo, sizeof xo);
    memcpy(&fwe, &we, sizeof we); memcpy(&fxe, &xe, sizeof xe);
    acc += fwo * fxo;
    return acc + fwe * fxe;
#endif
}

/* R rows dotted with the bf16 x as it came (no widened copy): 2*VEC weights a step per accumulator. */
#define DOT_DP(NAME_, R, ACC)                                                                        \
static inline void NAME_(const uint16_t *w, const void *xv, int64_t K, int prefetch, float *out) {   \
    const uint16_t *x = xv;                                                                          \
    vf acc[R][ACC];                                                                                  \
    for (int r = 0; r < R; r++) for (int a = 0; a < ACC; a++) acc[r][a] = (vf){0};                   \
    int64_t k = 0;                                                                                   \
    for (; k + 2 * VEC * ACC <= K; k += 2 * VEC * ACC) {                                            \
        if (prefetch) for (int r = 0; r < R; r++)                                                    \
            __builtin_prefetch((const char *)(w + r * K + k) + PREFETCH_AHEAD, 0, 0);                \
        for (int a = 0; a < ACC; a++)                                                                \
            for (int r = 0; r < R; r++)                                                              \
                acc[r][a] = dot_pairs(acc[r][a], w + r * K + k + 2 * VEC * a, x + k + 2 * VEC * a); \
    }                                                                                                \
    for (; k + 2 * VEC <= K; k += 2 * VEC)                                                           \
        for (int r = 0; r < R; r++) acc[r][0] = dot_pairs(acc[r][0], w + r * K + k, x + k);         \
    for (int r = 0; r < R; r++) {                                                                    \
        vf total = acc[r][0];                                                                        \
        for (int a = 1; a < ACC; a++) total += acc[r][a];                                            \
        float s = hsum(total);                                                                       \
        for (int64_t t = k; t < K; t++) s += bf16_to_f32(w[r * K + t]) * bf16_to_f32(x[t]);         \
        out[r] = s;                                                                                  \
    }                                                                                                \
}
#endif

/* NACC sums per row: 2 * PAIRS (the even and the odd weights apart), or 1 where R rows of them would not fit
 * the 16 AVX2 registers (8 rows). */
#define DOT_BF16(NAME_, R, PAIRS, NACC)                                                              \
static inline void NAME_(const uint16_t *w, const void *xv, int64_t K, int prefetch, float *out) {   \
    const float *xs = xv;                                                                            \
    vf acc[R][NACC];                                                                                 \
    for (int r = 0; r < R; r++) for (int a = 0; a < NACC; a++) acc[r][a] = (vf){0};                  \
    int64_t k = 0;                                                                                   \
    for (; k + 2 * VEC * PAIRS <= K; k += 2 * VEC * PAIRS) {                                        \
        if (prefetch) for (int r = 0; r < R; r++)                                                    \
            __builtin_prefetch((const char *)(w + r * K + k) + PREFETCH_AHEAD, 0, 0);                \
        for (int a = 0; a < PAIRS; a++) {                                                            \
            vf xlo = load_f32(xs + k + 2 * VEC * a), xhi = load_f32(xs + k + 2 * VEC * a + VEC);    \
            for (int r = 0; r < R; r++) {                                                            \
                vf lo, hi;                                                                           \
                load_bf16_pair(w + r * K + k + 2 * VEC * a, &lo, &hi);                              \
                acc[r][(2 * a) % NACC] += lo * xlo;                                                  \
                acc[r][(2 * a + 1) % NACC] += hi * xhi;                                              \
            }                                                                                        \
        }                                                                                            \
    }                                                                                                \
    for (; k + 2 * VEC <= K; k += 2 * VEC) {                                                         \
        vf xlo = load_f32(xs + k), xhi = load_f32(xs + k + VEC);                                    \
        for (int r = 0; r < R; r++) {                                                                \
            vf lo, hi;                                                                               \
            load_bf16_pair(w + r * K + k, &lo, &hi);                                                 \
            acc[r][0] += lo * xlo;                                                                   \
            acc[r][1 % NACC] += hi * xhi;                                                            \
        }                                                                                            \
    }                                                                                                \
    for (int r = 0; r < R; r++) {                                                                    \
        vf total = acc[r][0];                                                                        \
        for (int a = 1; a < NACC; a++) total += acc[r][a];                                           \
        float s = hsum(total);                                                                       \
        for (int64_t t = k; t < K; t++) s += bf16_to_f32(w[r * K + t]) * xs[t];  /* tail: unshuffled */ \
        out[r] = s;                                                                                  \
    }                                                                                                \
}

DOT_F32(dot1_f32, 1, 4)
DOT_F32(dot2_f32, 2, 2)
DOT_F32(dot4_f32, 4, 2)
DOT_F32(dot8_f32, 8, 1)
#ifdef DPBF16
DOT_DP(dot1_bf16, 1, 2)
DOT_DP(dot2_bf16, 2, 1)
DOT_DP(dot4_bf16, 4, 1)
DOT_DP(dot8_bf16, 8, 1)
#else
DOT_BF16(dot1_bf16, 1, 2, 4)
DOT_BF16(dot2_bf16, 2, 1, 2)
DOT_BF16(dot4_bf16, 4, 1, 2)
DOT_BF16(dot8_bf16, 8, 1, 1)
#endif

static void shuffle_x(const uint16_t *x16, float *xs, int64_t K) {
    const int64_t block = 2 * VEC;
    int64_t k = 0;
    for (; k + block <= K; k += block)
        for (int i = 0; i < VEC; i++) {
            xs[k + i] = bf16_to_f32(x16[k + 2 * i]);
            xs[k + VEC + i] = bf16_to_f32(x16[k + 2 * i + 1]);
        }
    for (; k < K; k++) xs[k] = bf16_to_f32(x16[k]);
}

struct gemv_job {
    const void *x;  /* float32; for bf16 weights the widened, shuffled x, or with DPBF16 the bf16 x itself */
    int64_t K;
    int bf16, rows_in_flight, prefetch;
    const void *W[GROUP_MAX], *bias[GROUP_MAX];
    void *y[GROUP_MAX];
    struct gemv_layout at;
};

/* A chunk's `count` rows of one matrix, R at a time, the leftover rows one by one, into y (+ bias): one function
 * per walk, kept out of gemv_chunk. Inlined there, beside every other walk, a float32 one-row walk streamed ~6%
 * slower on AMD Zen 4 (one thread, 896-wide rows; benchmarks/RESULTS.md). */
#define ROWS_F32(NAME_, R, DOT)                                                                      \
__attribute__((noinline)) static void NAME_(const float *w, const float *x, const float *bias, float *y, \
                                            int64_t K, int64_t count, int prefetch) {                \
    float out[R];                                                                                    \
    int64_t r = 0;                                                                                   \
    for (; r + R <= count; r += R, w += R * K) {                                                     \
        DOT(w, x, K, prefetch, out);                                                                 \
        for (int i = 0; i < R; i++) y[r + i] = out[i] + (bias ? bias[r + i] : 0.0f);                 \
    }                                                                                                \
    for (; r < count; r++, w += K) {                                                                 \
        dot1_f32(w, x, K, prefetch, out);                                                            \
        y[r] = out[0] + (bias ? bias[r] : 0.0f);                                                     \
    }                                                                                                \
}

#define ROWS_BF16(NAME_, R, DOT)                                                                     \
__attribute__((noinline)) static void NAME_(const uint16_t *w, const void *x, const uint16_t *bias,     \
                                            uint16_t *y, int64_t K, int64_t count, int prefetch) {   \
    float out[R];                                                                                    \
    int64_t r = 0;                                                                                   \
    for (; r + R <= count; r += R, w += R * K) {                                                     \
        DOT(w, x, K, prefetch, out);                                                                 \
        for (int i = 0; i < R; i++) y[r + i] = f32_to_bf16(out[i] + (bias ? bf16_to_f32(bias[r + i]) : 0.0f)); \
    }                                                                                                \
    for (; r < count; r++, w += K) {                                                                 \
        dot1_bf16(w, x, K, prefetch, out);                                                           \
        y[r] = f32_to_bf16(out[0] + (bias ? bf16_to_f32(bias[r]) : 0.0f));                           \
    }                                                                                                \
}

ROWS_F32(rows1_f32, 1, dot1_f32)
ROWS_F32(rows2_f32, 2, dot2_f32)
ROWS_F32(rows4_f32, 4, dot4_f32)
ROWS_F32(rows8_f32, 8, dot8_f32)
ROWS_BF16(rows1_bf16, 1, dot1_bf16)
ROWS_BF16(rows2_bf16, 2, dot2_bf16)
ROWS_BF16(rows4_bf16, 4, dot4_bf16)
ROWS_BF16(rows8_bf16, 8, dot8_bf16)

/* The walks by rows side by side (valid() admits only these). */
static void (*const rows_f32[9])(const float *, const float *, const float *, float *, int64_t, int64_t, int) = {
    [1] = rows1_f32, [2] = rows2_f32, [4] = rows4_f32, [8] = rows8_f32};
static void (*const rows_bf16[9])(const uint16_t *, const void *, const uint16_t *, uint16_t *, int64_t, int64_t,
                                  int) = {[1] = rows1_bf16, [2] = rows2_bf16, [4] = rows4_bf16, [8] = rows8_bf16};

static void gemv_chunk(const void *job, int64_t c) {
    const struct gemv_job *j = job;
    int64_t n, end;
    const int m = gemv_chunk_rows(&j->at, c, &n, &end);
    const int64_t K = j->K;
    if (n >= end) return;
    if (j->bf16) {
        const uint16_t *bias = j->bias[m];
        rows_bf16[j->rows_in_flight]((const uint16_t *)j->W[m] + n * K, j->x, bias ? bias + n : NULL,
                                     (uint16_t *)j->y[m] + n, K, end - n, j->prefetch);
    } else {
        const float *bias = j->bias[m];
        rows_f32[j->rows_in_flight]((const float *)j->W[m] + n * K, j->x, bias ? bias + n : NULL,
                                    (float *)j->y[m] + n, K, end - n, j->prefetch);
    }
}

static void run(struct gemv_job *job, const int64_t *N, int count, int64_t row_bytes, int threads,
                int64_t solo_bytes, int64_t chunk_bytes, int64_t chunk_max, int64_t tail_split) {
    gemv_layout(&job->at, count, N, row_bytes, job->rows_in_flight, threads, solo_bytes, chunk_bytes, chunk_max,
                tail_split);
    qwen_pool_run(gemv_chunk, job, job->at.first[count], threads);
}

static int valid(int rows_in_flight) { return rows_in_flight == 1 || rows_in_flight == 2 || rows_in_flight == 4 || rows_in_flight == 8; }

/* y_i = W_i x + bias_i (bias_i may be NULL) for `count` (1 to GROUP_MAX) row-major (N_i x K) matrices
 * and one x, all float32 or (bf16 = 1) all bfloat16, sums in float32, y rounded once. The layer step of
 * kernels.c calls this through a pointer: the variant (instruction set) is chosen per machine.
 * Returns 0, -1 if memory for the float32 copy of a bf16 x ran out, or -2 for a bad mode or count. */
int NAME(qwen_gemv_group, VARIANT)(int bf16, int count, const void *const *W, const void *const *bias, void *const *y,
                                   const int64_t *N, int64_t K, const void *x, int threads, int rows_in_flight,
                                   int prefetch, int64_t solo_bytes, int64_t chunk_bytes, int64_t chunk_max,
                                   int64_t tail_split) {
    if (!valid(rows_in_flight) || count < 1 || count > GROUP_MAX) return -2;
    struct gemv_job job = {.K = K, .bf16 = bf16, .rows_in_flight = rows_in_flight, .prefetch = prefetch};
    for (int m = 0; m < count; m++) {
        job.W[m] = W[m];
        job.bias[m] = bias ? bias[m] : NULL;
        job.y[m] = y[m];
    }
    float stack[8192], *xf = NULL;
#ifdef DPBF16
    if (bf16) {
        job.x = x;  /* multiplied in pairs as it is */
    } else
#endif
    if (bf16) {
        xf = K <= 8192 ? stack : (float *)malloc((size_t)K * sizeof(float));
        if (!xf) return -1;
        shuffle_x(x, xf, K);
        job.x = xf;
    } else {
        job.x = x;
    }
    run(&job, N, count, K * (bf16 ? 2 : 4), threads, solo_bytes, chunk_bytes, chunk_max, tail_split);
    if (xf && xf != stack) free(xf);
    return 0;
}

/* y[n] = sum_k W[n, k] x[k] + (bias ? bias[n] : 0), W row-major (N x K). Returns 0, or -2 for a bad mode. */
int NAME(qwen_gemv_f32, VARIANT)(const float *W, const float *x, const float *bias, float *y, int64_t N, int64_t K,
                                 int threads, int rows_in_flight, int prefetch, int64_t solo_bytes, int64_t chunk_bytes,
                                 int64_t chunk_max, int64_t tail_split) {
    const void *w[1] = {W}, *b[1] = {bias};
    void *out[1] = {y};
    return NAME(qwen_gemv_group, VARIANT)(0, 1, w, b, out, &N, K, x, threads, rows_in_flight, prefetch, solo_bytes,
                                          chunk_bytes, chunk_max, tail_split);
}

/* The same with bfloat16 W, x, bias and y; x is widened to float32 once, sums are float32, y rounded once.
 * Returns 0, -1 if memory for the float32 copy of x ran out, or -2 for a bad mode. */
int NAME(qwen_gemv_bf16, VARIANT)(const uint16_t *W, const uint16_t *x16, const uint16_t *bias, uint16_t *y,
                                  int64_t N, int64_t K, int threads, int rows_in_flight, int prefetch,
                                  int64_t solo_bytes, int64_t chunk_bytes, int64_t chunk_max, int64_t tail_split) {
    const void *w[1] = {W}, *b[1] = {bias};
    void *out[1] = {y};
    return NAME(qwen_gemv_group, VARIANT)(1, 1, w, b, out, &N, K, x16, threads, rows_in_flight, prefetch, solo_bytes,
                                          chunk_bytes, chunk_max, tail_split);
}

/* ---------------------------------------------------------------- a few rows of x: a short prompt
 *
 * Y = X W^T (+ b) for T rows of X (2 to FEW_MAX tokens: the new message of a chat's turn, whose earlier
 * turns the KV cache kept). torch's matrix products are made for many rows: at a few they stream the
 * weights at a fraction of the memory's speed (benchmarks/RESULTS.md), and such a prompt, like a token, is
 * mostly the time its weights take to arrive. Here each weight row is read from memory once and dotted,
 * while it sits in L1, with every row of X, FEW_TOKENS rows of X at a time (FEW_ACC: registers of sums per
 * pair of rows). The weight rows are walked `rows_in_flight` side by side (at most FEW_ROWS_MAX; kernels.Linear
 * chooses: four where the rows of x are long or many, each vector of x loaded then serving four weight rows,
 * else as the one-row plan, one at a time on AMD Zen, whose prefetchers follow one stream best). Threads share
 * the rows of W in chunks as gemv's do. The sums run in another order than torch's and the one-row walks', so
 * the products differ from theirs in the last bits (tests compare them to float64 sums). */
#define FEW_TOKENS 4
#if defined(__AVX512F__)
#define FEW_ROWS_MAX 4
#elif VEC == 8
#define FEW_ROWS_MAX 2
#else
#define FEW_ROWS_MAX 1 /* 16-wide vectors on AVX2's 16 registers: two registers each */
#endif

/* R weight rows (row stride K) dotted with TB rows of x (row stride K): out[r * FEW_TOKENS + t]. ACC sums per
 * row of each, over alternate steps of the row, so that at least 8 chains of multiply-adds run side by side
 * (FEW_ACC): a single chain waits on each add's latency (one row of x through one weight row: half the one-row
 * walk's speed from L2, AMD Zen 4). */
#define FEW_ACC(R, TB) ((R) * (TB) >= 8 ? 1 : (R) * (TB) >= 4 ? 2 : (R) * (TB) >= 2 ? 4 : 8)

#define FEW_F32(NAME_, R, TB)                                                                        \
static inline void NAME_(const float *w, const float *x, int64_t K, float *out) {                    \
    enum { ACC = FEW_ACC(R, TB) };                                                                   \
    vf acc[R][TB][ACC];                                                                              \
    for (int r = 0; r < R; r++) for (int t = 0; t < TB; t++) for (int a = 0; a < ACC; a++) acc[r][t][a] = (vf){0}; \
    int64_t k = 0;                                                                                   \
    for (; k + VEC * ACC <= K; k += VEC * ACC)                                                       \
        for (int a = 0; a < ACC; a++) {                                                              \
            vf xv[TB];                                                                               \
            for (int t = 0; t < TB; t++) xv[t] = load_f32(x + t * K + k + a * VEC);                  \
            for (int r = 0; r < R; r++) {                                                            \
                const vf wv = load_f32(w + r * K + k + a * VEC);                                     \
                for (int t = 0; t < TB; t++) acc[r][t][a] += wv * xv[t];                             \
            }                                                                                        \
        }                                                                                            \
    for (; k + VEC <= K; k += VEC) {                                                                 \
        vf xv[TB];                                                                                   \
        for (int t = 0; t < TB; t++) xv[t] = load_f32(x + t * K + k);                                \
        for (int r = 0; r < R; r++) {                                                                \
            const vf wv = load_f32(w + r * K + k);                                                   \
            for (int t = 0; t < TB; t++) acc[r][t][0] += wv * xv[t];                                 \
        }                                                                                            \
    }                                                                                                \
    for (int r = 0; r < R; r++)                                                                      \
        for (int t = 0; t < TB; t++) {                                                               \
            vf total = acc[r][t][0];                                                                 \
            for (int a = 1; a < ACC; a++) total += acc[r][t][a];                                     \
            float s = hsum(total);                                                                   \
            for (int64_t i = k; i < K; i++) s += w[r * K + i] * x[t * K + i];                        \
            out[r * FEW_TOKENS + t] = s;                                                             \
        }                                                                                            \
}

#ifdef DPBF16
/* bf16 rows of x as they are, multiplied in pairs (dot_pairs). */
#define FEW_BF16(NAME_, R, TB)                                                                       \
static inline void NAME_(const uint16_t *w, const void *xv_, int64_t K, float *out) {                \
    enum { ACC = FEW_ACC(R, TB) };                                                                   \
    const uint16_t *x = xv_;                                                                         \
    vf acc[R][TB][ACC];                                                                              \
    for (int r = 0; r < R; r++) for (int t = 0; t < TB; t++) for (int a = 0; a < ACC; a++) acc[r][t][a] = (vf){0}; \
    int64_t k = 0;                                                                                   \
    for (; k + 2 * VEC * ACC <= K; k += 2 * VEC * ACC)                                               \
        for (int a = 0; a < ACC; a++)                                                                \
            for (int r = 0; r < R; r++)                                                              \
                for (int t = 0; t < TB; t++)                                                         \
                    acc[r][t][a] = dot_pairs(acc[r][t][a], w + r * K + k + 2 * VEC * a, x + t * K + k + 2 * VEC * a); \
    for (; k + 2 * VEC <= K; k += 2 * VEC)                                                           \
        for (int r = 0; r < R; r++)                                                                  \
            for (int t = 0; t < TB; t++) acc[r][t][0] = dot_pairs(acc[r][t][0], w + r * K + k, x + t * K + k); \
    for (int r = 0; r < R; r++)                                                                      \
        for (int t = 0; t < TB; t++) {                                                               \
            vf total = acc[r][t][0];                                                                 \
            for (int a = 1; a < ACC; a++) total += acc[r][t][a];                                     \
            float s = hsum(total);                                                                   \
            for (int64_t i = k; i < K; i++) s += bf16_to_f32(w[r * K + i]) * bf16_to_f32(x[t * K + i]); \
            out[r * FEW_TOKENS + t] = s;                                                             \
        }                                                                                            \
}
#else
/* rows of x widened and shuffled (shuffle_x), against the weights widened in pairs (load_bf16_pair). */
#define FEW_BF16(NAME_, R, TB)                                                                       \
static inline void NAME_(const uint16_t *w, const void *xv_, int64_t K, float *out) {                \
    enum { ACC = FEW_ACC(R, TB) };                                                                   \
    const float *xs = xv_;                                                                           \
    vf acc[R][TB][ACC];                                                                              \
    for (int r = 0; r < R; r++) for (int t = 0; t < TB; t++) for (int a = 0; a < ACC; a++) acc[r][t][a] = (vf){0}; \
    int64_t k = 0;                                                                                   \
    for (; k + 2 * VEC * ACC <= K; k += 2 * VEC * ACC)                                               \
        for (int a = 0; a < ACC; a++) {                                                              \
            const int64_t at = k + 2 * VEC * a;                                                      \
            for (int r = 0; r < R; r++) {                                                            \
                vf lo, hi;                                                                           \
                load_bf16_pair(w + r * K + at, &lo, &hi);                                            \
                for (int t = 0; t < TB; t++)                                                         \
                    acc[r][t][a] += lo * load_f32(xs + t * K + at) + hi * load_f32(xs + t * K + at + VEC); \
            }                                                                                        \
        }                                                                                            \
    for (; k + 2 * VEC <= K; k += 2 * VEC)                                                           \
        for (int r = 0; r < R; r++) {                                                                \
            vf lo, hi;                                                                               \
            load_bf16_pair(w + r * K + k, &lo, &hi);                                                 \
            for (int t = 0; t < TB; t++)                                                             \
                acc[r][t][0] += lo * load_f32(xs + t * K + k) + hi * load_f32(xs + t * K + k + VEC); \
        }                                                                                            \
    for (int r = 0; r < R; r++)                                                                      \
        for (int t = 0; t < TB; t++) {                                                               \
            vf total = acc[r][t][0];                                                                 \
            for (int a = 1; a < ACC; a++) total += acc[r][t][a];                                     \
            float s = hsum(total);                                                                   \
            for (int64_t i = k; i < K; i++) s += bf16_to_f32(w[r * K + i]) * xs[t * K + i];  /* tail: unshuffled */ \
            out[r * FEW_TOKENS + t] = s;                                                             \
        }                                                                                            \
}
#endif

/* few_<dtype>[i][tb]: 1 << i weight rows by tb rows of x */
FEW_F32(few_1x1_f32, 1, 1) FEW_F32(few_1x2_f32, 1, 2) FEW_F32(few_1x3_f32, 1, 3) FEW_F32(few_1x4_f32, 1, 4)
FEW_BF16(few_1x1_bf16, 1, 1) FEW_BF16(few_1x2_bf16, 1, 2) FEW_BF16(few_1x3_bf16, 1, 3) FEW_BF16(few_1x4_bf16, 1, 4)
#if FEW_ROWS_MAX >= 2
FEW_F32(few_2x1_f32, 2, 1) FEW_F32(few_2x2_f32, 2, 2) FEW_F32(few_2x3_f32, 2, 3) FEW_F32(few_2x4_f32, 2, 4)
FEW_BF16(few_2x1_bf16, 2, 1) FEW_BF16(few_2x2_bf16, 2, 2) FEW_BF16(few_2x3_bf16, 2, 3) FEW_BF16(few_2x4_bf16, 2, 4)
#endif
#if FEW_ROWS_MAX >= 4
FEW_F32(few_4x1_f32, 4, 1) FEW_F32(few_4x2_f32, 4, 2) FEW_F32(few_4x3_f32, 4, 3) FEW_F32(few_4x4_f32, 4, 4)
FEW_BF16(few_4x1_bf16, 4, 1) FEW_BF16(few_4x2_bf16, 4, 2) FEW_BF16(few_4x3_bf16, 4, 3) FEW_BF16(few_4x4_bf16, 4, 4)
#endif

typedef void (*few_f32_fn)(const float *, const float *, int64_t, float *);
typedef void (*few_bf16_fn)(const uint16_t *, const void *, int64_t, float *);
static const few_f32_fn few_f32[3][FEW_TOKENS + 1] = {
    {NULL, few_1x1_f32, few_1x2_f32, few_1x3_f32, few_1x4_f32},
#if FEW_ROWS_MAX >= 2
    {NULL, few_2x1_f32, few_2x2_f32, few_2x3_f32, few_2x4_f32},
#endif
#if FEW_ROWS_MAX >= 4
    {NULL, few_4x1_f32, few_4x2_f32, few_4x3_f32, few_4x4_f32},
#endif
};
static const few_bf16_fn few_bf16[3][FEW_TOKENS + 1] = {
    {NULL, few_1x1_bf16, few_1x2_bf16, few_1x3_bf16, few_1x4_bf16},
#if FEW_ROWS_MAX >= 2
    {NULL, few_2x1_bf16, few_2x2_bf16, few_2x3_bf16, few_2x4_bf16},
#endif
#if FEW_ROWS_MAX >= 4
    {NULL, few_4x1_bf16, few_4x2_bf16, few_4x3_bf16, few_4x4_bf16},
#endif
};

struct few_job {
    const void *W, *bias, *x;  /* x: T rows; for bf16 weights widened and shuffled, or with DPBF16 as given */
    void *y;                   /* T rows of N */
    int64_t N, K, T;
    int bf16, rows_log2;  /* weight rows side by side: 1 << rows_log2 */
    struct gemv_layout at;
};

static void few_chunk(const void *job, int64_t c) {
    const struct few_job *j = job;
    int64_t n, end;
    gemv_chunk_rows(&j->at, c, &n, &end);
    const int64_t K = j->K, N = j->N, T = j->T;
    float out[FEW_ROWS_MAX * FEW_TOKENS];
    for (int64_t r = n; r < end;) {
        const int i_rows = end - r >= (1 << j->rows_log2) ? j->rows_log2 : 0, R = 1 << i_rows;
        for (int64_t t0 = 0; t0 < T; t0 += FEW_TOKENS) {
            const int tb = T - t0 < FEW_TOKENS ? (int)(T - t0) : FEW_TOKENS;
            if (j->bf16) {
                const uint16_t *bias = j->bias;
#ifdef DPBF16
                const void *x = (const uint16_t *)j->x + t0 * K;
#else
                const void *x = (const float *)j->x + t0 * K;
#endif
                few_bf16[i_rows][tb]((const uint16_t *)j->W + r * K, x, K, out);
                for (int i = 0; i < R; i++)
                    for (int t = 0; t < tb; t++)
                        ((uint16_t *)j->y)[(t0 + t) * N + r + i] =
                            f32_to_bf16(out[i * FEW_TOKENS + t] + (bias ? bf16_to_f32(bias[r + i]) : 0.0f));
            } else {
                const float *bias = j->bias;
                few_f32[i_rows][tb]((const float *)j->W + r * K, (const float *)j->x + t0 * K, K, out);
                for (int i = 0; i < R; i++)
                    for (int t = 0; t < tb; t++)
                        ((float *)j->y)[(t0 + t) * N + r + i] = out[i * FEW_TOKENS + t] + (bias ? bias[r + i] : 0.0f);
            }
        }
        r += R;
    }
}

/* Y (T x N) = X (T x K) W^T + bias, W row-major (N x K), all float32 or (bf16 = 1) all bfloat16, sums in float32,
 * Y rounded once; 1 <= T <= FEW_MAX; `rows_in_flight` the one-row plan's (1, 2, 4 or 8; walked as at most
 * FEW_ROWS_MAX). Returns 0, -1 if memory for the float32 copy of a bf16 X ran out, -2 for a bad T or rows. */
int NAME(qwen_gemm_few, VARIANT)(int bf16, const void *W, const void *bias, void *y, int64_t N, int64_t K,
                                 const void *x, int64_t T, int threads, int rows_in_flight, int64_t solo_bytes,
                                 int64_t chunk_bytes, int64_t chunk_max, int64_t tail_split) {
    if (T < 1 || T > FEW_MAX || !valid(rows_in_flight)) return -2;
    int rows_log2 = rows_in_flight >= 4 ? 2 : rows_in_flight == 2;
    while ((1 << rows_log2) > FEW_ROWS_MAX) rows_log2--;
    struct few_job job = {.W = W, .bias = bias, .y = y, .N = N, .K = K, .T = T, .bf16 = bf16, .x = x,
                          .rows_log2 = rows_log2};
    float *xf = NULL;
#ifndef DPBF16
    if (bf16) {
        xf = (float *)malloc((size_t)(T * K) * sizeof(float));
        if (!xf) return -1;
        for (int64_t t = 0; t < T; t++) shuffle_x((const uint16_t *)x + t * K, xf + t * K, K);
        job.x = xf;
    }
#endif
    /* the rows of W in chunks as gemv's, by bytes of W, whole multiples of the rows walked side by side */
    gemv_layout(&job.at, 1, &N, K * (bf16 ? 2 : 4), 1 << rows_log2, threads, solo_bytes, chunk_bytes, chunk_max,
                tail_split);
    qwen_pool_run(few_chunk, &job, job.at.first[1], threads);
    free(xf);
    return 0;
}
