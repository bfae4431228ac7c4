/* A thread pool for the decode kernels: a job is cut into chunks that threads take one at a time.
 * See pool.c for why it is not OpenMP. */
#ifndef QWEN_POOL_H
#define QWEN_POOL_H
#include <stdint.h>

/* Runs fn(job, i) for every chunk i in 0..n-1 on up to `threads` threads (the caller's included)
 * and returns when all are done. Chunks may run in any order, on any thread, but each once. */
typedef void (*qwen_chunk_fn)(const void *job, int64_t chunk);
void qwen_pool_run(qwen_chunk_fn fn, const void *job, int64_t n, int threads);

/* What the calling thread's next job reads first, for pool.c to warm while threads wait (see there):
 * `caller_bytes` from `caller` for the calling thread, `helper_bytes` from `helper` for a helper (NULL:
 * nothing). Kept for the calling thread until it says otherwise. */
void qwen_pool_expect(const void *caller, int64_t caller_bytes, const void *helper, int64_t helper_bytes);

/* The calling thread's expectation, for tests: caller, caller_bytes, helper, helper_bytes. */
void qwen_pool_expected(int64_t out[4]);

/* The chunk a helper claims first in a job of n chunks on `threads` threads, or -1 where no helper
 * claims a known one first (claims in one counter's order, or a job run on the calling thread alone). */
int64_t qwen_pool_helper_first(int64_t n, int threads);

#endif
