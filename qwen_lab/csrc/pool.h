/* A thread pool for the decode kernels: a job is cut into chunks that threads take one at a time.
 * See pool.c for why it is not OpenMP. */
#ifndef QWEN_POOL_H
#define QWEN_POOL_H
#include <stdint.h>

/* Runs fn(job, i) for every chunk i in 0..n-1 on up to `threads` threads (the caller's included)
 * and returns when all are done. Chunks may run in any order, on any thread, but each once. */
typedef void (*qwen_chunk_fn)(const void *job, int64_t chunk);
void qwen_pool_run(qwen_chunk_fn fn, const void *job, int64_t n, int threads);

#endif
