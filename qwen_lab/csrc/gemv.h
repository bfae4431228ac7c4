/* How gemv.c cuts a product into chunks for the pool: shared with kernels.c, which needs to know where
 * each thread's part of the next product starts (pool.c warms it while threads wait). */
#ifndef QWEN_GEMV_H
#define QWEN_GEMV_H
#include <stdint.h>

/* A job is one to GROUP_MAX matrices that share the input x (a layer's q, k and v; its gate and up),
 * each with its own output; their chunks are numbered one after another, so one call to the pool
 * shares all of them over the threads (k and v alone would be too small to share). */
#define GROUP_MAX 3

/* The most rows of x a product of gemv.c's few-rows walk takes (qwen_gemm_few_*: a short prompt; kernels.FEW_MAX). */
#define FEW_MAX 16

/* Chunks are whole multiples of rows_in_flight rows: about 1/CHUNKS_PER_THREAD of each thread's share
 * of the job, kept between `chunk_bytes` and `chunk_max` (measured on a 544 MB bf16 product, 2 threads:
 * 64 KB chunks read at 82% of `sum`'s speed, 1 MB chunks at 92%: each chunk costs two contended
 * atomic operations and a fresh start for the prefetcher). Several chunks per thread leave a thread
 * that loses its CPU mid-job little that the others must wait for. A job smaller than `solo_bytes`
 * in all is one chunk per matrix.
 *
 * The last `threads` chunks' worth of rows are cut `tail_split` times smaller: the job ends when its
 * last chunk does, and a thread that finds none left waits for the others' last ones. With 1 MB chunks
 * that wait was half a chunk on average (tens of microseconds per job, and the caller, done spinning,
 * slept on a futex in a quarter of the jobs); a tail of quarter chunks shortens it fourfold and leaves
 * the large chunks everywhere else. */
#define CHUNKS_PER_THREAD 8

struct gemv_layout {
    int count;
    int64_t N[GROUP_MAX];
    int64_t rows;                 /* rows per chunk */
    int64_t first[GROUP_MAX + 1]; /* first[i]: matrix i's first chunk; first[count]: the number of chunks */
    int64_t body, tail_rows;      /* the last matrix: `body` chunks of `rows`, then chunks of tail_rows (0: none) */
};

static inline void gemv_layout(struct gemv_layout *l, int count, const int64_t *N, int64_t row_bytes,
                               int rows_in_flight, int threads, int64_t solo_bytes, int64_t chunk_bytes,
                               int64_t chunk_max, int64_t tail_split) {
    int64_t total = 0, rows = 0;
    l->count = count;
    for (int m = 0; m < count; m++) {
        l->N[m] = N[m];
        total += N[m];
        if (N[m] > rows) rows = N[m];
    }
    if (threads > 1 && total * row_bytes >= solo_bytes) {
        int64_t bytes = total * row_bytes / ((int64_t)threads * CHUNKS_PER_THREAD);
        if (bytes > chunk_max) bytes = chunk_max;
        if (bytes < chunk_bytes) bytes = chunk_bytes;
        rows = bytes / row_bytes;
        rows -= rows % rows_in_flight;
        if (rows < rows_in_flight) rows = rows_in_flight;
    }
    l->rows = rows;
    l->body = l->tail_rows = 0;
    l->first[0] = 0;
    for (int m = 0; m < count; m++) l->first[m + 1] = l->first[m] + (N[m] + rows - 1) / rows;
    const int L = count - 1;
    const int64_t body = (N[L] + rows - 1) / rows - threads, tail = rows / (tail_split > 1 ? tail_split : 1);
    if (threads > 1 && tail_split > 1 && body > 0 && tail >= rows_in_flight) {
        l->body = body;
        l->tail_rows = tail - tail % rows_in_flight;
        l->first[L + 1] = l->first[L] + body + (N[L] - body * rows + l->tail_rows - 1) / l->tail_rows;
    }
}

/* Chunk c's matrix (returned) and its rows [*n, *end) of it (*n >= *end: none). */
static inline int gemv_chunk_rows(const struct gemv_layout *l, int64_t c, int64_t *n, int64_t *end) {
    int m = 0;
    while (c >= l->first[m + 1]) m++;
    c -= l->first[m];
    *n = c * l->rows, *end = *n + l->rows;
    if (m == l->count - 1 && l->tail_rows && c >= l->body) {  /* the job's last rows, in smaller chunks */
        *n = l->body * l->rows + (c - l->body) * l->tail_rows;
        *end = *n + l->tail_rows;
    }
    if (*end > l->N[m]) *end = l->N[m];
    return m;
}

#endif
