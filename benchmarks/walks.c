/* Walks of a float32 matrix-vector product, for benchmarks/bench_walks.py: why a long x is slow.
 *
 * A one-row walk (csrc/gemv.c's) reads each row of W once, and all of x for each row. When a row and x
 * no longer fit the L1 cache together (float32 rows of more than ~4,000 inputs: Qwen2.5-0.5B's down
 * projection has 4,864), the streaming weights push x out of L1 before the next row needs it again.
 * These walks measure what that costs, in one process, with OpenMP threads splitting the rows:
 *
 *   row       the production walk: row by row, 4 accumulators;
 *   xwindow   the same weights against a 4 KB window of x (wrong sums: x always in L1) -- the ceiling;
 *   colblock  W stored in column blocks ([blocks][N][B], contiguous), each block's x in L1;
 *   kblock    the row-major W walked block by block of columns (x in L1, the stream broken at each row).
 *
 * Built by bench_walks.py with the machine's widest vectors: cc -O3 -fopenmp -march=native.
 */
#include <stdint.h>
#include <string.h>
#include <omp.h>

#define VEC 16
typedef float vf __attribute__((vector_size(VEC * 4)));
static inline vf ld(const float *p) { vf v; memcpy(&v, p, sizeof v); return v; }

static inline float dot(const float *w, const float *x, int64_t K, int64_t xmask) {
    vf a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0};
    int64_t k = 0;
    for (; k + 4 * VEC <= K; k += 4 * VEC) {
        const int64_t j = k & xmask;
        a0 += ld(w + k) * ld(x + j);
        a1 += ld(w + k + VEC) * ld(x + j + VEC);
        a2 += ld(w + k + 2 * VEC) * ld(x + j + 2 * VEC);
        a3 += ld(w + k + 3 * VEC) * ld(x + j + 3 * VEC);
    }
    vf t = a0 + a1 + a2 + a3;
    float s = 0.0f;
    for (int i = 0; i < VEC; i++) s += t[i];
    for (; k < K; k++) s += w[k] * x[k & xmask];
    return s;
}

/* Seconds for `reps` products y = W x, cycling through `copies` matrices (so none stays in the cache).
 * walk: 0 row, 1 xwindow, 2 colblock (the copies in column-block layout), 3 kblock; B: columns a block. */
double walk(const float *const *Ws, int copies, const float *x, float *y, int64_t N, int64_t K, int reps, int walk,
            int64_t B, int threads) {
    const double t0 = omp_get_wtime();
#pragma omp parallel num_threads(threads)
    {
        const int t = omp_get_thread_num(), T = omp_get_num_threads();
        const int64_t r0 = N * t / T, r1 = N * (t + 1) / T;
        for (int rep = 0; rep < reps; rep++) {
            const float *W = Ws[rep % copies];
            if (walk <= 1) {
                const int64_t mask = walk == 1 ? 1023 : INT64_MAX;
                for (int64_t n = r0; n < r1; n++) y[n] = dot(W + n * K, x, K, mask);
            } else {
                for (int64_t n = r0; n < r1; n++) y[n] = 0.0f;
                for (int64_t kb = 0; kb < K; kb += B) {
                    const int64_t len = K - kb < B ? K - kb : B;
                    for (int64_t n = r0; n < r1; n++)
                        y[n] += walk == 2 ? dot(W + N * kb + n * len, x + kb, len, INT64_MAX)
                                          : dot(W + n * K + kb, x + kb, len, INT64_MAX);
                }
            }
#pragma omp barrier
        }
    }
    return omp_get_wtime() - t0;
}
