/* The thread pool of the decode kernels (pool.h), and why it is not OpenMP.
 *
 * A decoding step makes ~170 parallel calls. With OpenMP's fork-join, each call ends in a
 * barrier that waits for *every* thread of the team. On a machine where another process wants
 * a core (a browser, a second notebook, 30 learners on one server), the operating system takes a
 * core from one of our threads for a few milliseconds at a time, and every call then waits for
 * that thread: measured on 2 cores with one busy process beside us, decoding fell to a fifth of
 * its speed. Here:
 *
 * 1. A job is cut into chunks that threads *claim* one at a time (an atomic counter), the caller
 *    included. A thread that is off its core claims nothing, so the others do its share.
 * 2. The caller waits for the chunks that were claimed, not for threads to arrive: a helper
 *    that wakes up late finds the job done and goes back to sleep.
 * 3. Nobody spins for long: a waiting thread spins a few microseconds (the next call usually
 *    comes that soon), then sleeps on a futex and gives its core away.
 * 4. A caller that finds the pool busy (another Python thread is in a kernel) runs its job alone.
 *
 * The claim word packs the job's generation (32 bits), its chunk count (16) and the next chunk
 * to claim (16), so a claim is one compare-and-swap that also checks the job is still current.
 * A thread reads the job's description only after a successful claim; the caller does not write
 * the next description until every claimed chunk is done, so it cannot change underneath.
 *
 * With two threads (a 2-core laptop, a workshop learner's share) the claims follow halves instead
 * (`halves`): the caller takes the first half of the chunks front to back, the helper the second
 * half, and each then takes what is left of the other's: the caller from its front (where the
 * helper has not started, the caller walks on without a break), the helper from its end. Taken in
 * one counter's order, each thread's next chunk lay away from its last one, and every chunk started
 * a new stream that the core's prefetchers had to find again (~1 us of a thread's time; a 2 MB job
 * has 20 chunks); in halves each thread reads one stream a job. Measured (AMD EPYC Zen 4, memory at
 * ~59 GB/s, benchmarks/RESULTS.md): a 2 MB job 35.8 us against 41.6, a 128 MB one 1-2% faster, and
 * beside a busy program a tie on short jobs. Its claim word: generation (16 bits), then the next
 * chunk and the end of each half (12 bits each), one compare-and-swap a claim as above.
 *
 * A thread that spins does not only wait: a decode step is products each of which needs the one before,
 * and a thread with nothing left to claim leaves its share of the memory's speed unused. The caller says
 * (qwen_pool_expect) where the next product starts for it and, claimed in halves, for the helper; while
 * a thread spins (for the other's last chunk, for the caller's small work between products, for the next
 * job) it prefetches its own part of that product into its L2 cache, `warm_bytes` at most, 4 KB between
 * looks at what it waits for, and only within the spin's time: a thread under contention sleeps as soon
 * as before. Measured (AMD EPYC Zen 4, memory fast, benchmarks/RESULTS.md): in a float32 0.5B step the
 * two threads ended each large job 17-22 us apart; with warming that step is 1-2% faster, a 1.5B bf16
 * one 1.7%, a 0.5B bf16 one a tie.
 */
#define _GNU_SOURCE
#include "pool.h"

#include <immintrin.h>
#include <limits.h>
#include <linux/futex.h>
#include <pthread.h>
#include <stdatomic.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#define MAX_WORKERS 64
#define MAX_CHUNKS 0xffff

static struct {
    pthread_mutex_t busy;           /* one caller at a time */
    pthread_mutex_t grow;           /* starting workers */
    int started;                    /* workers running */
    uint32_t last_gen;              /* the caller's generation counter */
    _Atomic uint32_t gen;           /* bumped per job; idle workers sleep on it */
    _Atomic uint64_t claim;         /* gen << 32 | n << 16 | next */
    _Atomic uint32_t done;          /* chunks finished in the current job */
    _Atomic uint32_t sleepers;      /* workers asleep on gen */
    _Atomic uint32_t caller_asleep; /* the caller sleeps on done */
    _Atomic int helpers;            /* workers that may join the current job */
    _Atomic uint64_t halves;        /* the claim word of a job claimed in halves: gen16 | a | endA | b | endB */
    _Atomic int in_halves;          /* the current job is claimed in halves (written before gen is published) */
    int halves_on;                  /* claim two threads' jobs in halves (qwen_pool_set_halves) */
    qwen_chunk_fn fn;
    const void *job;
    const char *helper_next;        /* where a helper's part of the job after this one starts (or NULL) */
    int64_t next_bytes, warm_bytes; /* how much of it there is; how much a thread warms (qwen_pool_set_warm) */
    /* counters for tests and tuning (relaxed) */
    _Atomic int64_t jobs, solo_jobs, helper_chunks, caller_sleeps, warmed[2];  /* warmed: by callers, helpers */
    int64_t worker_spin_ns, caller_spin_ns;
} pool = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_MUTEX_INITIALIZER, .halves_on = 1, .worker_spin_ns = 50000,
           .caller_spin_ns = 20000, .warm_bytes = 2 << 20};

/* A thread's next part to warm (the caller's from qwen_pool_expect, a helper's from the job it last took
 * chunks of) and how far it got. */
static __thread const char *next_at, *warming, *expect_helper;
static __thread int64_t next_bytes, warmed, expect_helper_bytes, uncounted;
static __thread int is_helper;

void qwen_pool_expect(const void *caller, int64_t caller_bytes, const void *helper, int64_t helper_bytes) {
    next_at = caller, next_bytes = caller_bytes;
    expect_helper = helper, expect_helper_bytes = helper_bytes;
}

/* The calling thread's expectation (qwen_pool_expect), for tests: caller, caller_bytes, helper, helper_bytes. */
void qwen_pool_expected(int64_t out[4]) {
    out[0] = (int64_t)(intptr_t)next_at, out[1] = next_bytes;
    out[2] = (int64_t)(intptr_t)expect_helper, out[3] = expect_helper_bytes;
}

/* Prefetch the next 4 KB of this thread's next part into L2; 0 once there is nothing (more) to warm. */
static int warm_some(void) {
    if (!next_at) return 0;
    if (next_at != warming) warming = next_at, warmed = 0;
    const int64_t limit = next_bytes < pool.warm_bytes ? next_bytes : pool.warm_bytes;
    if (warmed >= limit) return 0;
    const int64_t end = warmed + 4096 < limit ? warmed + 4096 : limit;
    for (const char *p = next_at + warmed; p < next_at + end; p += 64) _mm_prefetch(p, _MM_HINT_T1);
    uncounted += end - warmed;  /* counted once a spin ends: an atomic add per 4 KB shared the pool's line */
    warmed = end;
    return 1;
}

static void count_warmed(void) {
    if (uncounted) atomic_fetch_add_explicit(&pool.warmed[is_helper], uncounted, memory_order_relaxed);
    uncounted = 0;
}

#define HALF_BITS 12
#define HALF_MAX ((1u << HALF_BITS) - 1)  /* the most chunks a job claimed in halves has */

/* Does a job of n chunks on `threads` threads get claimed in halves (qwen_pool_run, qwen_pool_helper_first)? */
static int in_halves(int64_t n, int threads) { return pool.halves_on && threads == 2 && n <= HALF_MAX; }

static void futex_wait(_Atomic uint32_t *word, uint32_t expected) {
    syscall(SYS_futex, (uint32_t *)word, FUTEX_WAIT_PRIVATE, expected, NULL, NULL, 0);
}

static void futex_wake(_Atomic uint32_t *word, int count) {
    syscall(SYS_futex, (uint32_t *)word, FUTEX_WAKE_PRIVATE, count, NULL, NULL, 0);
}

static int64_t now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (int64_t)t.tv_sec * 1000000000 + t.tv_nsec;
}

/* Spin until *word != value or `budget_ns` passed; returns the last value seen. The spin warms this
 * thread's next part (warm_some) until that is done, and reads the clock after every 4 KB it warms (every
 * 16 pauses otherwise): warming takes no time that spinning did not, give or take one 4 KB step. */
static uint32_t spin_while(_Atomic uint32_t *word, uint32_t value, int64_t budget_ns) {
    int64_t deadline = 0;
    for (int i = 0;; i++) {
        uint32_t v = atomic_load_explicit(word, memory_order_acquire);
        if (v != value) return count_warmed(), v;
        const int warming_now = warm_some();
        if (warming_now || (i & 15) == 15) {
            int64_t t = now_ns();
            if (!deadline) deadline = t + budget_ns;
            else if (t >= deadline) return count_warmed(), v;
        }
        if (!warming_now) _mm_pause();
    }
}

/* One chunk finished: count it; the last one wakes a caller asleep on `done`. */
static void finished(uint32_t n) {
    if (atomic_fetch_add(&pool.done, 1) + 1 == n && atomic_load(&pool.caller_asleep))
        futex_wake(&pool.done, 1);
}

/* Claim and run chunks of job `g` until none are left; returns how many this thread ran. */
static int64_t take_chunks(uint32_t g) {
    int64_t ran = 0;
    for (;;) {
        uint64_t s = atomic_load_explicit(&pool.claim, memory_order_acquire);
        uint32_t n = (s >> 16) & 0xffff, next = s & 0xffff;
        if ((uint32_t)(s >> 32) != g || next >= n) return ran;
        if (!atomic_compare_exchange_weak_explicit(&pool.claim, &s, s + 1, memory_order_acq_rel,
                                                   memory_order_relaxed))
            continue;
        pool.fn(pool.job, next);
        ran++;
        finished(n);
    }
}

/* take_chunks for a job claimed in halves: `caller` 1 for the caller (the first half), 0 for the helper. */
static int64_t take_halves(uint32_t g, int caller) {
    const uint64_t mask = HALF_MAX, gen = (uint64_t)(g & 0xffff) << 48;
    int64_t ran = 0;
    for (;;) {
        uint64_t s = atomic_load_explicit(&pool.halves, memory_order_acquire);
        if ((s & 0xffff000000000000ull) != gen) return ran;
        uint64_t a = s >> 36 & mask, end_a = s >> 24 & mask, b = s >> 12 & mask, end_b = s & mask, chunk;
        if (caller && a < end_a) chunk = a++;
        else if (caller && b < end_b) chunk = b++;
        else if (!caller && b < end_b) chunk = b++;
        else if (!caller && a < end_a) chunk = --end_a;
        else return ran;
        if (!atomic_compare_exchange_weak_explicit(&pool.halves, &s, gen | a << 36 | end_a << 24 | b << 12 | end_b,
                                                   memory_order_acq_rel, memory_order_relaxed))
            continue;
        /* claimed: the job cannot end, nor the next one be written, before this chunk is done */
        const uint32_t n = (uint32_t)(atomic_load_explicit(&pool.claim, memory_order_acquire) >> 16 & 0xffff);
        if (!caller && !ran) next_at = pool.helper_next, next_bytes = pool.next_bytes;  /* read before the job ends */
        pool.fn(pool.job, (int64_t)chunk);
        ran++;
        finished(n);
    }
}

static void *worker_main(void *arg) {
    int me = (int)(intptr_t)arg;
    is_helper = 1;
    uint32_t seen = atomic_load(&pool.gen);
    for (;;) {
        /* a worker the last job did not ask for (started for a call on more threads, once) sleeps at once: on
         * two cores, a third thread spinning after every job took the core of the caller or of the helper */
        const int wanted = me < atomic_load_explicit(&pool.helpers, memory_order_relaxed);
        uint32_t g = wanted ? spin_while(&pool.gen, seen, pool.worker_spin_ns) : atomic_load(&pool.gen);
        if (g == seen) {  /* nothing came: sleep until a job is published */
            atomic_fetch_add(&pool.sleepers, 1);
            futex_wait(&pool.gen, seen);
            atomic_fetch_sub(&pool.sleepers, 1);
            continue;
        }
        seen = g;
        if (me < atomic_load_explicit(&pool.helpers, memory_order_relaxed))
            atomic_fetch_add_explicit(&pool.helper_chunks,
                                      atomic_load_explicit(&pool.in_halves, memory_order_relaxed) ? take_halves(g, 0)
                                                                                                  : take_chunks(g),
                                      memory_order_relaxed);
    }
    return NULL;
}

static void start_workers(int wanted) {
    if (wanted > MAX_WORKERS) wanted = MAX_WORKERS;
    pthread_mutex_lock(&pool.grow);
    while (pool.started < wanted) {
        pthread_t t;
        pthread_attr_t attr;
        pthread_attr_init(&attr);
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        int failed = pthread_create(&t, &attr, worker_main, (void *)(intptr_t)pool.started);
        pthread_attr_destroy(&attr);
        if (failed) break;  /* fewer helpers; the caller still does every chunk it must */
        pool.started++;
    }
    pthread_mutex_unlock(&pool.grow);
}

/* A forked child has the pool's memory but none of its threads: start afresh. */
static void after_fork_in_child(void) {
    pthread_mutex_init(&pool.busy, NULL);
    pthread_mutex_init(&pool.grow, NULL);
    pool.started = 0;
    atomic_store(&pool.sleepers, 0);
}

static void register_fork_handler(void) { pthread_atfork(NULL, NULL, after_fork_in_child); }

static void run_alone(qwen_chunk_fn fn, const void *job, int64_t n) {
    for (int64_t i = 0; i < n; i++) fn(job, i);
}

struct batch { qwen_chunk_fn fn; const void *job; int64_t offset; };

static void run_batch_chunk(const void *b_, int64_t i) {
    const struct batch *b = b_;
    b->fn(b->job, b->offset + i);
}

void qwen_pool_run(qwen_chunk_fn fn, const void *job, int64_t n, int threads) {
    static pthread_once_t once = PTHREAD_ONCE_INIT;
    if (n <= 0) return;
    if (n > MAX_CHUNKS) {  /* more chunks than the claim word counts: in batches */
        for (int64_t offset = 0; offset < n; offset += MAX_CHUNKS) {
            struct batch b = {fn, job, offset};
            qwen_pool_run(run_batch_chunk, &b, n - offset < MAX_CHUNKS ? n - offset : MAX_CHUNKS, threads);
        }
        return;
    }
    atomic_fetch_add_explicit(&pool.jobs, 1, memory_order_relaxed);
    if (threads <= 1 || n == 1 || pthread_mutex_trylock(&pool.busy)) {
        atomic_fetch_add_explicit(&pool.solo_jobs, 1, memory_order_relaxed);
        run_alone(fn, job, n);
        return;
    }
    pthread_once(&once, register_fork_handler);
    start_workers(threads - 1);
    pool.fn = fn;
    pool.job = job;
    pool.helper_next = expect_helper, pool.next_bytes = expect_helper_bytes;
    atomic_store_explicit(&pool.helpers, threads - 1, memory_order_relaxed);
    atomic_store_explicit(&pool.done, 0, memory_order_relaxed);
    uint32_t g = ++pool.last_gen;
    const int halves = in_halves(n, threads);
    atomic_store_explicit(&pool.in_halves, halves, memory_order_relaxed);
    if (halves) {  /* the counter below then has nothing to claim: next = n */
        const uint64_t half = (uint64_t)n / 2;
        atomic_store_explicit(&pool.halves, (uint64_t)(g & 0xffff) << 48 | half << 24 | half << 12 | (uint64_t)n,
                              memory_order_release);
        atomic_store_explicit(&pool.claim, (uint64_t)g << 32 | (uint64_t)n << 16 | (uint64_t)n, memory_order_release);
    } else {
        atomic_store_explicit(&pool.claim, (uint64_t)g << 32 | (uint64_t)n << 16, memory_order_release);
    }
    atomic_store(&pool.gen, g);
    /* a futex wakes any of its sleepers: with more workers than this job wants, all of them, so that those it
     * wants are among them (the others go back to sleep) */
    if (atomic_load(&pool.sleepers)) futex_wake(&pool.gen, pool.started > threads - 1 ? INT32_MAX : threads - 1);
    if (halves) take_halves(g, 1);
    else take_chunks(g);
    uint32_t d;
    while ((d = atomic_load(&pool.done)) < n) {  /* chunks claimed by helpers still running */
        d = spin_while(&pool.done, d, pool.caller_spin_ns);
        if (d >= n) break;
        atomic_store(&pool.caller_asleep, 1);
        d = atomic_load(&pool.done);
        if (d < n) {
            atomic_fetch_add_explicit(&pool.caller_sleeps, 1, memory_order_relaxed);
            futex_wait(&pool.done, d);
        }
        atomic_store(&pool.caller_asleep, 0);
    }
    pthread_mutex_unlock(&pool.busy);
}

/* Counters since start: jobs, jobs run alone, chunks run by helpers, times the caller slept, bytes warmed by
 * callers, by helpers. */
void qwen_pool_stats(int64_t out[6]) {
    out[0] = atomic_load(&pool.jobs);
    out[1] = atomic_load(&pool.solo_jobs);
    out[2] = atomic_load(&pool.helper_chunks);
    out[3] = atomic_load(&pool.caller_sleeps);
    out[4] = atomic_load(&pool.warmed[0]);
    out[5] = atomic_load(&pool.warmed[1]);
}

/* How many bytes of its next part a waiting thread prefetches at most (0: none). */
void qwen_pool_set_warm(int64_t bytes) { pool.warm_bytes = bytes > 0 ? bytes : 0; }

int64_t qwen_pool_helper_first(int64_t n, int threads) { return n > 1 && in_halves(n, threads) ? n / 2 : -1; }

/* Claim two threads' jobs in halves (1, as built) or in one counter's order (0; for measurements). */
void qwen_pool_set_halves(int on) { pool.halves_on = on != 0; }

/* How long an idle worker and a waiting caller spin before they sleep (for measurements). */
void qwen_pool_configure(int64_t worker_spin_ns, int64_t caller_spin_ns) {
    pool.worker_spin_ns = worker_spin_ns;
    pool.caller_spin_ns = caller_spin_ns;
}
