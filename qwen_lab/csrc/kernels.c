/* Kernels for decoding one token on a CPU (AVX2), called by qwen_lab/kernels.py: RMSNorm of one
 * row, a layer's attention step for one new token, and a decoder layer's whole one-token step. Each
 * replaces a dozen or more small torch operations of a few microseconds. (The matrix-vector product
 * is gemv.c, reached from the layer step through a pointer to the variant chosen; the threads, pool.c.)
 *
 * Built on first use (cc -O3 -mavx2 -mfma) and called through ctypes.
 */
#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>
#include <stdatomic.h>

#include "bf16.h"
#include "gemv.h"
#include "pool.h"

static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}


/* Attention is arithmetic more than memory (each cached key serves a group of query heads, with an
 * exp per score), so it is shared over the pool once heads x positions x head_dim passes solo_work
 * multiply-adds (64 positions of Qwen2.5-0.5B); below, waking a helper costs more than it saves.
 * kernels.py sets it (SOLO_WORK; tests set 0 to share every step). */
static int64_t solo_work = 1 << 16;

void qwen_kernels_configure(int64_t work) { solo_work = work; }

/* RMSNorm of one row as Qwen2 computes it: in float32, t = x * rsqrt(mean(x^2) + eps),
 * then y = w * t, with t rounded to the model's dtype before the product (as model.py's
 * `self.weight * normed.to(x.dtype)` does). Eight lanes of squares, summed at the end. */
static inline float rms_scale(const float *xf, int64_t n, float eps) {
    __m256 acc = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        __m256 v = _mm256_loadu_ps(xf + i);
        acc = _mm256_fmadd_ps(v, v, acc);
    }
    float ss = hsum(acc);
    for (; i < n; i++) ss += xf[i] * xf[i];
    return 1.0f / sqrtf(ss / (float)n + eps);
}

void qwen_rmsnorm_f32(const float *x, const float *w, float *y, int64_t n, float eps) {
    float r = rms_scale(x, n, eps);
    for (int64_t i = 0; i < n; i++) y[i] = w[i] * (x[i] * r);
}

/* Returns 0, or -1 if memory for the float32 copy of x ran out. */
int qwen_rmsnorm_bf16(const uint16_t *x, const uint16_t *w, uint16_t *y, int64_t n, float eps) {
    float stack[8192];
    float *xf = n <= 8192 ? stack : (float *)malloc((size_t)n * sizeof(float));
    if (!xf) return -1;
    for (int64_t i = 0; i < n; i++) xf[i] = bf16_to_f32(x[i]);
    float r = rms_scale(xf, n, eps);
    for (int64_t i = 0; i < n; i++)
        y[i] = f32_to_bf16(bf16_to_f32(w[i]) * bf16_to_f32(f32_to_bf16(xf[i] * r)));
    if (xf != stack) free(xf);
    return 0;
}

/* ---- attention for one new token (decoding), batch 1 ------------------------------------ */

/* e^x for x <= 88.3 (e^-87 below -87), eight at a time: 2^n * e^r with |r| <= ln2/2 and a degree-6
 * polynomial (Cephes' coefficients, the classic SIMD exp); relative error ~2e-7, like expf's. */
static inline __m256 exp8(__m256 x) {
    x = _mm256_max_ps(x, _mm256_set1_ps(-87.0f));
    __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504f)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.9875691500e-4f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
    p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

/* Rotary position embedding of one head (halves layout, as model.apply_rotary). */
static inline void rotate(const float *x, const float *cos, const float *sin, float *out, int64_t d) {
    int64_t h = d / 2;
    for (int64_t i = 0; i < h; i++) {
        out[i] = x[i] * cos[i] - x[i + h] * sin[i];
        out[i + h] = x[i + h] * cos[i + h] + x[i] * sin[i + h];
    }
}

static inline float load_any(const void *p, int64_t i, int bf16) {
    return bf16 ? bf16_to_f32(((const uint16_t *)p)[i]) : ((const float *)p)[i];
}

/* Eight cached values (a key or a value row) as float32. */
static inline __m256 load8(const void *p, int64_t i, int bf16) {
    if (!bf16) return _mm256_loadu_ps((const float *)p + i);
    __m128i h = _mm_loadu_si128((const __m128i *)((const uint16_t *)p + i));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

/* Qwen3's RMSNorm of one head's q or k (over head_dim), in place, before the rotary turn; with
 * the model's roundings when it computes in bf16 (normalised value, then the product with w). */
static void head_norm(float *x, const void *w, float eps, int64_t d, int bf16) {
    float ss = 0.0f;
    for (int64_t i = 0; i < d; i++) ss += x[i] * x[i];
    const float r = 1.0f / sqrtf(ss / (float)d + eps);
    for (int64_t i = 0; i < d; i++) {
        float t = x[i] * r;
        if (bf16) t = bf16_to_f32(f32_to_bf16(t));
        float y = load_any(w, i, bf16) * t;
        x[i] = bf16 ? bf16_to_f32(f32_to_bf16(y)) : y;
    }
}

/* Query heads one attention chunk takes together: heads that share a KV head (GQA) read its cached
 * keys and values once per chunk instead of once each (at 8,192 positions a 0.5B layer's keys and
 * values are 4 MB, read 7 times over otherwise). More per chunk would leave too few chunks to share
 * over the threads. */
#define HEADS_PER_CHUNK 4

struct attend_job {
    const void *q, *kc, *vc, *qnorm;
    void *y;
    const float *cs, *sn;
    float eps;
    int64_t d, L, max_len, group, per_chunk, chunks_per_group;
    int bf16;
    _Atomic int failed;
};

/* s[l] = K_l . q for one query head, four cached positions per pass (four independent chains of
 * adds); `top` becomes the largest. */
static void scores_one(const void *kc, int64_t base, const float *q, float *s, int64_t L, int64_t d, int bf16,
                       float *top) {
    int64_t l = 0;
    for (; l + 4 <= L; l += 4) {
        const int64_t row = base + l * d;
        __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
        for (int64_t i = 0; i < d; i += 8) {
            const __m256 qv = _mm256_loadu_ps(q + i);
            a0 = _mm256_fmadd_ps(load8(kc, row + i, bf16), qv, a0);
            a1 = _mm256_fmadd_ps(load8(kc, row + d + i, bf16), qv, a1);
            a2 = _mm256_fmadd_ps(load8(kc, row + 2 * d + i, bf16), qv, a2);
            a3 = _mm256_fmadd_ps(load8(kc, row + 3 * d + i, bf16), qv, a3);
        }
        s[l] = hsum(a0), s[l + 1] = hsum(a1), s[l + 2] = hsum(a2), s[l + 3] = hsum(a3);
        for (int r = 0; r < 4; r++) if (s[l + r] > *top) *top = s[l + r];
    }
    for (; l < L; l++) {
        __m256 a = _mm256_setzero_ps();
        for (int64_t i = 0; i < d; i += 8) a = _mm256_fmadd_ps(load8(kc, base + l * d + i, bf16), _mm256_loadu_ps(q + i), a);
        s[l] = hsum(a);
        if (s[l] > *top) *top = s[l];
    }
}

/* The same for N query heads of one KV head (q[t], s[t], top[t]): each cached key is loaded once and
 * serves the N heads (N independent chains); each head's sums are those of scores_one. */
static inline __attribute__((always_inline)) void scores_group(int N, const void *kc, int64_t base, float (*q)[512],
                                                               float **s, int64_t L, int64_t d, int bf16, float *top) {
    for (int64_t l = 0; l < L; l++) {
        __m256 a[HEADS_PER_CHUNK];
        for (int t = 0; t < N; t++) a[t] = _mm256_setzero_ps();
        for (int64_t i = 0; i < d; i += 8) {
            const __m256 k = load8(kc, base + l * d + i, bf16);
            for (int t = 0; t < N; t++) a[t] = _mm256_fmadd_ps(k, _mm256_loadu_ps(q[t] + i), a[t]);
        }
        for (int t = 0; t < N; t++) {
            s[t][l] = hsum(a[t]);
            if (s[t][l] > top[t]) top[t] = s[t][l];
        }
    }
}

/* acc = sum over positions l of p[l] V_l for one query head: 64 columns at a time in registers. */
static void values_one(const void *vc, int64_t base, const float *p, float *acc, int64_t L, int64_t d, int bf16) {
    for (int64_t i = 0; i < d; i++) acc[i] = 0.0f;
    for (int64_t i0 = 0; i0 < d; i0 += 64) {
        if (d - i0 >= 64) {
            __m256 v[8];
            for (int k = 0; k < 8; k++) v[k] = _mm256_setzero_ps();
            for (int64_t l = 0; l < L; l++) {
                const __m256 w = _mm256_set1_ps(p[l]);
                for (int k = 0; k < 8; k++) v[k] = _mm256_fmadd_ps(w, load8(vc, base + l * d + i0 + 8 * k, bf16), v[k]);
            }
            for (int k = 0; k < 8; k++) _mm256_storeu_ps(acc + i0 + 8 * k, v[k]);
        } else {
            for (int64_t l = 0; l < L; l++) {
                const __m256 w = _mm256_set1_ps(p[l]);
                for (int64_t i = i0; i < d; i += 8)
                    _mm256_storeu_ps(acc + i, _mm256_fmadd_ps(w, load8(vc, base + l * d + i, bf16), _mm256_loadu_ps(acc + i)));
            }
        }
    }
}

/* acc[t] = sum over positions l of p[t][l] V_l, for N query heads of one KV head: 16 columns at a time,
 * each cached value loaded once for the N heads; each element's sum runs over l in order, as for one
 * head alone. */
static inline __attribute__((always_inline)) void values_group(int N, const void *vc, int64_t base, float **p,
                                                               float (*acc)[512], int64_t L, int64_t d, int bf16) {
    int64_t i0 = 0;
    for (; i0 + 16 <= d; i0 += 16) {
        __m256 a[HEADS_PER_CHUNK][2];
        for (int t = 0; t < N; t++) a[t][0] = a[t][1] = _mm256_setzero_ps();
        for (int64_t l = 0; l < L; l++) {
            const __m256 v0 = load8(vc, base + l * d + i0, bf16), v1 = load8(vc, base + l * d + i0 + 8, bf16);
            for (int t = 0; t < N; t++) {
                const __m256 w = _mm256_set1_ps(p[t][l]);
                a[t][0] = _mm256_fmadd_ps(w, v0, a[t][0]);
                a[t][1] = _mm256_fmadd_ps(w, v1, a[t][1]);
            }
        }
        for (int t = 0; t < N; t++) {
            _mm256_storeu_ps(acc[t] + i0, a[t][0]);
            _mm256_storeu_ps(acc[t] + i0 + 8, a[t][1]);
        }
    }
    if (i0 < d) {  /* head_dim an odd multiple of 8: the last 8 columns */
        __m256 a[HEADS_PER_CHUNK];
        for (int t = 0; t < N; t++) a[t] = _mm256_setzero_ps();
        for (int64_t l = 0; l < L; l++) {
            const __m256 v0 = load8(vc, base + l * d + i0, bf16);
            for (int t = 0; t < N; t++) a[t] = _mm256_fmadd_ps(_mm256_set1_ps(p[t][l]), v0, a[t]);
        }
        for (int t = 0; t < N; t++) _mm256_storeu_ps(acc[t] + i0, a[t]);
    }
}

/* One chunk: query heads first .. first+n-1, all of KV head g: y_h = softmax(q_h K^T / sqrt(d)) V over
 * positions 0..L-1. */
static void attend_heads(const void *job, int64_t c) {
    struct attend_job *j = (struct attend_job *)job;
    const int64_t d = j->d, L = j->L, g = c / j->chunks_per_group;
    const int64_t first = g * j->group + (c % j->chunks_per_group) * j->per_chunk;
    const int n = (int)(first + j->per_chunk <= (g + 1) * j->group ? j->per_chunk : (g + 1) * j->group - first);
    const int bf16 = j->bf16;
    float qx[512], qr[HEADS_PER_CHUNK][512], acc[HEADS_PER_CHUNK][512], stack[4096], top[HEADS_PER_CHUNK], *s[HEADS_PER_CHUNK];
    float *scores = (int64_t)n * L <= 4096 ? stack : (float *)malloc((size_t)n * (size_t)L * sizeof(float));
    if (!scores) { atomic_store(&j->failed, 1); return; }
    const float scale = 1.0f / sqrtf((float)d);
    for (int t = 0; t < n; t++) {
        const int64_t h = first + t;
        for (int64_t i = 0; i < d; i++) qx[i] = load_any(j->q, h * d + i, bf16);
        if (j->qnorm) head_norm(qx, j->qnorm, j->eps, d, bf16);
        rotate(qx, j->cs, j->sn, qr[t], d);
        for (int64_t i = 0; i < d; i++) qr[t][i] = (bf16 ? bf16_to_f32(f32_to_bf16(qr[t][i])) : qr[t][i]) * scale;
        s[t] = scores + t * L;
        top[t] = -INFINITY;
    }
    const int64_t base = g * j->max_len * d;
    switch (n) {  /* scores; a constant N lets the compiler keep the N sums in registers */
        case 1: scores_one(j->kc, base, qr[0], s[0], L, d, bf16, &top[0]); break;
        case 2: scores_group(2, j->kc, base, qr, s, L, d, bf16, top); break;
        case 3: scores_group(3, j->kc, base, qr, s, L, d, bf16, top); break;
        default: scores_group(4, j->kc, base, qr, s, L, d, bf16, top); break;
    }
    float total[HEADS_PER_CHUNK];
    for (int t = 0; t < n; t++) {  /* softmax numerators and their sum, head by head */
        float *st = s[t];
        __m256 total8 = _mm256_setzero_ps();
        int64_t l = 0;
        for (; l + 8 <= L; l += 8) {
            __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(st + l), _mm256_set1_ps(top[t])));
            _mm256_storeu_ps(st + l, e);
            total8 = _mm256_add_ps(total8, e);
        }
        total[t] = hsum(total8);
        for (; l < L; l++) { st[l] = expf(st[l] - top[t]); total[t] += st[l]; }
    }
    switch (n) {  /* weighted sums of values */
        case 1: values_one(j->vc, base, s[0], acc[0], L, d, bf16); break;
        case 2: values_group(2, j->vc, base, s, acc, L, d, bf16); break;
        case 3: values_group(3, j->vc, base, s, acc, L, d, bf16); break;
        default: values_group(4, j->vc, base, s, acc, L, d, bf16); break;
    }
    for (int t = 0; t < n; t++) {
        const int64_t h = first + t;
        for (int64_t i = 0; i < d; i++) {
            float out = acc[t][i] / total[t];
            if (bf16) ((uint16_t *)j->y)[h * d + i] = f32_to_bf16(out);
            else ((float *)j->y)[h * d + i] = out;
        }
    }
    if (scores != stack) free(scores);
}

/* Everything layers.Attention does for one new token between the projections and o_proj:
 * normalise each head's q and k if qnorm/knorm are given (Qwen3; NULL otherwise), rotate q
 * (H heads) and k (KV heads) at position `pos`, write k and v into the caches (the layout of
 * layers.KVCache: KV x max_len x d, row pos), then for each query head h, with KV head h / (H / KV):
 * y_h = softmax(q_h K^T / sqrt(d)) V over positions 0..pos. float32 inside; `bf16` says
 * whether the tensors hold bfloat16 (then rotated q, k and y are rounded to it). Heads are
 * shared out over the pool once the cache is large enough to be worth it. */
static int attend(const void *q_, const void *k_, const void *v_, const void *cos_, const void *sin_,
                  const void *qnorm, const void *knorm, float eps, void *kc_, void *vc_, void *y_,
                  int64_t H, int64_t KV, int64_t d, int64_t pos, int64_t max_len, int bf16, int threads) {
    if (d > 512 || d % 8) return -2;
    float cs[512], sn[512], tmp[512], rot[512];
    for (int64_t i = 0; i < d; i++) { cs[i] = load_any(cos_, i, bf16); sn[i] = load_any(sin_, i, bf16); }
    for (int64_t g = 0; g < KV; g++) {  /* the new key (rotated) and value into the caches */
        for (int64_t i = 0; i < d; i++) tmp[i] = load_any(k_, g * d + i, bf16);
        if (knorm) head_norm(tmp, knorm, eps, d, bf16);
        rotate(tmp, cs, sn, rot, d);
        int64_t row = (g * max_len + pos) * d;
        for (int64_t i = 0; i < d; i++) {
            if (bf16) {
                ((uint16_t *)kc_)[row + i] = f32_to_bf16(rot[i]);
                ((uint16_t *)vc_)[row + i] = ((const uint16_t *)v_)[g * d + i];
            } else {
                ((float *)kc_)[row + i] = rot[i];
                ((float *)vc_)[row + i] = ((const float *)v_)[g * d + i];
            }
        }
    }
    const int64_t group = H / KV, chunks_per_group = (group + HEADS_PER_CHUNK - 1) / HEADS_PER_CHUNK;
    const int64_t per_chunk = (group + chunks_per_group - 1) / chunks_per_group;  /* 7 heads: 4 + 3 */
    struct attend_job job = {q_, kc_, vc_, qnorm, y_, cs, sn, eps, d, pos + 1, max_len, group, per_chunk,
                             chunks_per_group, bf16, 0};
    qwen_pool_run(attend_heads, &job, KV * chunks_per_group, H * (pos + 1) * d < solo_work ? 1 : threads);
    return atomic_load(&job.failed) ? -1 : 0;
}

int qwen_attend_one_f32(const float *q, const float *k, const float *v, const float *cos, const float *sin,
                        const float *qnorm, const float *knorm, float eps, float *kc, float *vc, float *y,
                        int64_t H, int64_t KV, int64_t d, int64_t pos, int64_t max_len, int threads) {
    return attend(q, k, v, cos, sin, qnorm, knorm, eps, kc, vc, y, H, KV, d, pos, max_len, 0, threads);
}

int qwen_attend_one_bf16(const uint16_t *q, const uint16_t *k, const uint16_t *v, const uint16_t *cos,
                         const uint16_t *sin, const uint16_t *qnorm, const uint16_t *knorm, float eps, uint16_t *kc,
                         uint16_t *vc, uint16_t *y, int64_t H, int64_t KV, int64_t d, int64_t pos, int64_t max_len,
                         int threads) {
    return attend(q, k, v, cos, sin, qnorm, knorm, eps, kc, vc, y, H, KV, d, pos, max_len, 1, threads);
}

/* ---- a whole decoder layer for one new token ---------------------------------------------- */

/* A gemv.c group product (qwen_gemv_group_<variant>): the instruction set is chosen per machine. */
typedef int (*gemv_group_fn)(int bf16, int count, const void *const *W, const void *const *bias, void *const *y,
                             const int64_t *N, int64_t K, const void *x, int threads, int rows_in_flight,
                             int prefetch, int64_t solo_bytes, int64_t chunk_bytes, int64_t chunk_max,
                             int64_t tail_split);

/* How one product of the layer runs: the variant's function and the plan kernels.py measured for it. */
struct product { gemv_group_fn fn; int64_t rows, prefetch; };

/* What kernels.DecoderLayer fills in for one call (kernels.py: LayerStep, field for field; every
 * field is 8 bytes, so the two layouts cannot drift apart through padding). */
struct layer_step {
    /* the layer's parameters (a bias or a q/k norm may be NULL) */
    const void *in_norm, *post_norm, *wq, *bq, *wk, *bk, *wv, *bv, *wo, *bo, *qnorm, *knorm;
    const void *wg, *bg, *wu, *bu, *wd, *bd;
    double eps, qk_eps;
    struct product qkv, o, gate_up, down;
    int64_t hidden, inter, H, KV, d, bf16;
    /* this token */
    const void *x, *cos, *sin;
    void *out, *kc, *vc, *scratch;
    int64_t pos, max_len, scratch_bytes, threads, solo_bytes, chunk_bytes, chunk_max, tail_split;
};

static inline void put(void *p, int64_t i, float v, int bf16) {
    if (bf16) ((uint16_t *)p)[i] = f32_to_bf16(v);
    else ((float *)p)[i] = v;
}

/* out = x + a, rounded once to the model's dtype (what torch's `x + a` does). */
static void add(const void *x, const void *a, void *out, int64_t n, int bf16) {
    for (int64_t i = 0; i < n; i++) put(out, i, load_any(x, i, bf16) + load_any(a, i, bf16), bf16);
}

static int norm(const void *x, const void *w, void *y, int64_t n, float eps, int bf16) {
    if (bf16) return qwen_rmsnorm_bf16(x, w, y, n, eps);
    qwen_rmsnorm_f32(x, w, y, n, eps);
    return 0;
}

/* Eight float32 values rounded to bfloat16 (kept as float32 whose low halves are zero): f32_to_bf16,
 * eight at a time. */
static inline __m256 round_bf16_8(__m256 v) {
    const __m256i u = _mm256_castps_si256(v);
    const __m256i nan = _mm256_cmpgt_epi32(_mm256_and_si256(u, _mm256_set1_epi32(0x7fffffff)),
                                           _mm256_set1_epi32(0x7f800000));
    const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    __m256i r = _mm256_add_epi32(u, _mm256_add_epi32(_mm256_set1_epi32(0x7fff), odd));
    r = _mm256_blendv_epi8(r, _mm256_or_si256(u, _mm256_set1_epi32(0x400000)), nan);  /* NaN stays NaN */
    return _mm256_castsi256_ps(_mm256_and_si256(r, _mm256_set1_epi32((int)0xffff0000u)));
}

/* act = silu(g) * u as torch's two operations compute it: silu = g / (1 + e^-g), rounded to the model's
 * dtype, then the product, rounded. Eight at a time with exp8 (torch's exp is not C's either; the layer
 * tests allow for it). In a bf16 step this loop was 2.5% of a layer's time with one expf per value. */
static void silu_times(const void *g, const void *u, void *act, int64_t n, int bf16) {
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        const __m256 a = load8(g, i, bf16), minus = _mm256_sub_ps(_mm256_setzero_ps(), a);
        /* e^-a: exp8 up to 88.3; past it e * e^(-a-1), which overflows to infinity as expf does from 88.72 */
        const __m256 big = _mm256_cmp_ps(minus, _mm256_set1_ps(88.3f), _CMP_GT_OQ);
        const __m256 beyond = _mm256_mul_ps(exp8(_mm256_min_ps(_mm256_sub_ps(minus, _mm256_set1_ps(1.0f)),
                                                               _mm256_set1_ps(88.0f))), _mm256_set1_ps(2.71828183f));
        const __m256 e = _mm256_blendv_ps(exp8(_mm256_min_ps(minus, _mm256_set1_ps(88.3f))), beyond, big);
        __m256 silu = _mm256_div_ps(a, _mm256_add_ps(_mm256_set1_ps(1.0f), e));
        if (bf16) silu = round_bf16_8(silu);
        const __m256 out = _mm256_mul_ps(silu, load8(u, i, bf16));
        if (bf16) {
            const __m256i half = _mm256_srli_epi32(_mm256_castps_si256(round_bf16_8(out)), 16);
            _mm_storeu_si128((__m128i *)((uint16_t *)act + i),
                             _mm_packus_epi32(_mm256_castsi256_si128(half), _mm256_extracti128_si256(half, 1)));
        } else {
            _mm256_storeu_ps((float *)act + i, out);
        }
    }
    for (; i < n; i++) {
        float a = load_any(g, i, bf16);
        float silu = a / (1.0f + expf(-a));
        if (bf16) silu = bf16_to_f32(f32_to_bf16(silu));
        put(act, i, silu * load_any(u, i, bf16), bf16);
    }
}

/* silu_times, exported for tests/test_kernels.py. */
void qwen_silu_times(const void *g, const void *u, void *act, int64_t n, int bf16) { silu_times(g, u, act, n, bf16); }

/* What may follow the stack in the same call (kernels.py: StackTail): the final norm of `out` into
 * `normed`, then the head's product into `logits` (vocab values), by the variant and plan of `head`
 * (none where head.fn is NULL: a head measured faster by torch's product runs in Python). */
struct stack_tail {
    const void *norm, *head_w, *head_b;
    void *normed, *logits;
    double eps;
    struct product head;
    int64_t vocab;
};

/* Tells the pool where each thread's part of the next product starts, the product of `count` matrices
 * W (N[i] x K) run by plan `p` with this call's sharing of `s`, so that a thread waiting before it warms
 * its part (pool.c). Laid out as gemv.c lays out the product (gemv.h), and claimed as the pool claims. */
static void expect(const struct layer_step *s, const struct product *p, int count, const void *const *W,
                   const int64_t *N, int64_t K) {
    const int64_t row = K * (s->bf16 ? 2 : 4);
    struct gemv_layout l;
    gemv_layout(&l, count, N, row, (int)p->rows, (int)s->threads, s->solo_bytes, s->chunk_bytes, s->chunk_max,
                s->tail_split);
    const int64_t n = l.first[count], h = qwen_pool_helper_first(n, (int)s->threads);
    const char *helper = NULL;
    int64_t caller_bytes = N[0] * row, helper_bytes = 0, r, end;
    if (h >= 0) {
        const int m = gemv_chunk_rows(&l, h, &r, &end);
        helper = (const char *)W[m] + r * row, helper_bytes = (N[m] - r) * row;
        if (m == 0) caller_bytes = r * row;  /* the caller's half ends where the helper's starts */
    } else if (n > 1 && l.rows < N[0]) {
        caller_bytes = l.rows * row;  /* claimed in one counter's order: of its first chunk only is it sure */
    }
    qwen_pool_expect(W[0], caller_bytes, helper, helper_bytes);
}

/* expect() for the q/k/v product of layer `of`, with the sharing of `s`. */
static void expect_qkv(const struct layer_step *s, const struct layer_step *of) {
    const void *W[3] = {of->wq, of->wk, of->wv};
    const int64_t N[3] = {of->H * of->d, of->KV * of->d, of->KV * of->d};
    expect(s, &of->qkv, 3, W, N, of->hidden);
}

/* expect() for product `which` of layer `s`: 0 q/k/v, 1 o, 2 gate and up, 3 the down projection. */
static void expect_product(const struct layer_step *s, int which) {
    const int64_t D = s->hidden, I = s->inter, Q = s->H * s->d, NI[2] = {I, I};
    const void *o[1] = {s->wo}, *gate_up[2] = {s->wg, s->wu}, *down[1] = {s->wd};
    if (which == 0) expect_qkv(s, s);
    else if (which == 1) expect(s, &s->o, 1, o, &D, Q);
    else if (which == 2) expect(s, &s->gate_up, 2, gate_up, NI, D);
    else if (which == 3) expect(s, &s->down, 1, down, &D, I);
}

/* layers.DecoderLayer.forward for one token, as the module-by-module path computes it (the same
 * products, attention and roundings), in one call: the ~15 Python calls and small torch operations
 * of a layer cost more than its attention at short contexts. Scratch holds the intermediate rows:
 * 4 x hidden + 2 x H*d + 2 x KV*d + 3 x inter values. Returns 0, -1 (no memory), -2 (a refused
 * plan or head size), -3 (scratch too small). What comes after the layer, for the pool to warm during
 * its last product: `next` layer's q/k/v, or else `tail`'s head where the kernels run it, or else the q/k/v
 * of `first`, the next token's first layer (any of the three may be NULL). */
static int layer_step(const struct layer_step *s, const struct layer_step *next, const struct stack_tail *tail,
                      const struct layer_step *first) {
    const int bf16 = (int)s->bf16, threads = (int)s->threads;
    const int64_t es = bf16 ? 2 : 4, D = s->hidden, I = s->inter, Q = s->H * s->d, KVD = s->KV * s->d;
    if (s->scratch_bytes < es * (4 * D + 2 * Q + 2 * KVD + 3 * I)) return -3;
    char *p = s->scratch;
    void *h = p, *q = (p += es * D), *k = (p += es * Q), *v = (p += es * KVD), *y = (p += es * KVD);
    void *o = (p += es * Q), *x1 = (p += es * D), *g = (p += es * D), *u = (p += es * I), *act = (p += es * I);
    void *m = (p += es * I);
    int failed;
    /* attention */
    if ((failed = norm(s->x, s->in_norm, h, D, (float)s->eps, bf16))) return failed;
    {
        const void *W[3] = {s->wq, s->wk, s->wv}, *B[3] = {s->bq, s->bk, s->bv};
        void *Y[3] = {q, k, v};
        int64_t N[3] = {Q, KVD, KVD};
        expect_product(s, 1);  /* attention comes between: its jobs' waits warm o too */
        if ((failed = s->qkv.fn(bf16, 3, W, B, Y, N, D, h, threads, (int)s->qkv.rows, (int)s->qkv.prefetch,
                                s->solo_bytes, s->chunk_bytes, s->chunk_max, s->tail_split))) return failed;
    }
    if ((failed = attend(q, k, v, s->cos, s->sin, s->qnorm, s->knorm, (float)s->qk_eps, s->kc, s->vc, y, s->H,
                         s->KV, s->d, s->pos, s->max_len, bf16, threads))) return failed;
    {
        const void *W[1] = {s->wo}, *B[1] = {s->bo};
        void *Y[1] = {o};
        expect_product(s, 2);
        if ((failed = s->o.fn(bf16, 1, W, B, Y, &D, Q, y, threads, (int)s->o.rows, (int)s->o.prefetch,
                              s->solo_bytes, s->chunk_bytes, s->chunk_max, s->tail_split))) return failed;
    }
    add(s->x, o, x1, D, bf16);
    /* MLP: down(silu(gate(h)) * up(h)) */
    if ((failed = norm(x1, s->post_norm, h, D, (float)s->eps, bf16))) return failed;
    {
        const void *W[2] = {s->wg, s->wu}, *B[2] = {s->bg, s->bu};
        void *Y[2] = {g, u};
        int64_t N[2] = {I, I};
        expect_product(s, 3);
        if ((failed = s->gate_up.fn(bf16, 2, W, B, Y, N, D, h, threads, (int)s->gate_up.rows,
                                    (int)s->gate_up.prefetch, s->solo_bytes, s->chunk_bytes, s->chunk_max,
                                    s->tail_split))) return failed;
    }
    silu_times(g, u, act, I, bf16);
    {
        const void *W[1] = {s->wd}, *B[1] = {s->bd};
        void *Y[1] = {m};
        if (next) {
            expect_qkv(s, next);
        } else if (tail && tail->head.fn) {
            const void *after[1] = {tail->head_w};
            expect(s, &tail->head, 1, after, &tail->vocab, D);
        } else if (first) {
            expect_qkv(s, first);
        } else {
            qwen_pool_expect(NULL, 0, NULL, 0);
        }
        if ((failed = s->down.fn(bf16, 1, W, B, Y, &D, I, act, threads, (int)s->down.rows, (int)s->down.prefetch,
                                 s->solo_bytes, s->chunk_bytes, s->chunk_max, s->tail_split))) return failed;
    }
    add(x1, m, s->out, D, bf16);
    return 0;
}

/* layer_step alone (kernels.DecoderLayer: one call per layer from Python). */
int qwen_layer_step(const struct layer_step *s) { return layer_step(s, NULL, NULL, NULL); }

/* What the pool is told to warm for product `which` of the layer `s` (0: its q/k/v, as the layer before it
 * or the last one's head says; 1: o; 2: gate and up; 3: the down projection), as qwen_pool_expected reads it
 * back; for tests. */
void qwen_layer_expects(const struct layer_step *s, int which, int64_t out[4]) {
    expect_product(s, which);
    qwen_pool_expected(out);
}

/* ---- the whole stack of layers for one new token ------------------------------------------ */

/* What changes from one token to the next and is the same for every layer (kernels.py: StackCall). */
struct stack_call {
    const void *x, *cos, *sin;
    void *out, *scratch, *between;  /* between: two rows of hidden values, the stream between layers */
    int64_t pos, threads, solo_bytes, chunk_bytes, chunk_max, tail_split;
};

/* Every layer for one token, in one call: x -> layer 0 -> ... -> layer n-1 -> out, each as
 * qwen_layer_step with the fields kernels.DecoderLayer keeps for it (`layers`, read only) and this
 * token's (`call`; layer i's KV cache at kv[2i], kv[2i + 1], max_len[i]). Between layers the Python of
 * one layer call (~150 us inside a step, where the memory streams nothing) is gone. With a `tail`
 * (or NULL), the final norm and the head too. Returns 0 or the first failing layer's (or product's) code. */
int qwen_stack_step(const struct layer_step *const *layers, int64_t n, void *const *kv, const int64_t *max_len,
                    const struct stack_call *call, const struct stack_tail *tail) {
    const int64_t row = layers[0]->hidden * (layers[0]->bf16 ? 2 : 4);
    struct layer_step s;
    for (int64_t i = 0; i < n; i++) {
        s = *layers[i];
        s.x = i == 0 ? call->x : (const char *)call->between + ((i - 1) % 2) * row;
        s.out = i == n - 1 ? call->out : (char *)call->between + (i % 2) * row;
        s.cos = call->cos, s.sin = call->sin, s.scratch = call->scratch;
        s.kc = kv[2 * i], s.vc = kv[2 * i + 1], s.max_len = max_len[i], s.pos = call->pos;
        s.threads = call->threads, s.solo_bytes = call->solo_bytes, s.chunk_bytes = call->chunk_bytes;
        s.chunk_max = call->chunk_max, s.tail_split = call->tail_split;
        int failed = layer_step(&s, i + 1 < n ? layers[i + 1] : NULL, tail, layers[0]);
        if (failed) return failed;
    }
    if (!tail) return 0;
    const int bf16 = (int)layers[0]->bf16;
    int failed = norm(call->out, tail->norm, tail->normed, layers[0]->hidden, (float)tail->eps, bf16);
    if (failed || !tail->head.fn) return failed;  /* no head function: the caller runs the head */
    const void *W[1] = {tail->head_w}, *B[1] = {tail->head_b};
    void *Y[1] = {tail->logits};
    if (n > 0) expect_qkv(&s, layers[0]);  /* the next token's first product */
    return tail->head.fn(bf16, 1, W, B, Y, &tail->vocab, layers[0]->hidden, tail->normed, (int)call->threads,
                         (int)tail->head.rows, (int)tail->head.prefetch, call->solo_bytes, call->chunk_bytes,
                         call->chunk_max, call->tail_split);
}

/* The greedy choice: the index of the largest of n logits (float32 or bfloat16), the first one where
 * several are equal, as torch.argmax; -1 where the largest is not a finite number (a NaN anywhere, or
 * an infinity), which the caller reports. Two passes, eight lanes at a time, over the row the head has
 * just written (in the cache): the largest value, then where it first is. Torch's way (a max for the
 * check, a float32 copy, an argmax) took 0.5-0.7 ms a token on a 2-core Zen 3;
 * the whole choice takes 0.1-0.2 ms with this one. */
int64_t qwen_argmax(const void *logits, int64_t n, int bf16) {
    __m256 best8 = _mm256_set1_ps(-INFINITY), nan8 = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        const __m256 v = load8(logits, i, bf16);
        nan8 = _mm256_or_ps(nan8, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
        best8 = _mm256_max_ps(best8, v);
    }
    float lanes[8], best = -INFINITY;
    _mm256_storeu_ps(lanes, best8);
    int nan = _mm256_movemask_ps(nan8);
    for (int l = 0; l < 8; l++) best = lanes[l] > best ? lanes[l] : best;
    for (int64_t t = i; t < n; t++) {
        const float v = load_any(logits, t, bf16);
        nan |= v != v;
        best = v > best ? v : best;
    }
    if (nan || !isfinite(best)) return -1;
    const __m256 target = _mm256_set1_ps(best);
    for (i = 0; i + 8 <= n; i += 8) {
        const int hit = _mm256_movemask_ps(_mm256_cmp_ps(load8(logits, i, bf16), target, _CMP_EQ_OQ));
        if (hit) return i + __builtin_ctz(hit);
    }
    for (; i < n; i++)
        if (load_any(logits, i, bf16) == best) return i;
    return -1;
}

/* values[0..k) <- v with index i among the k largest so far (descending; an equal value goes after the
 * ones already there, as the earlier index); *have counts the values kept. */
static inline void offer(float v, int64_t i, float *values, int64_t *ids, int64_t k, int64_t *have) {
    int64_t at;
    if (*have < k) {
        at = (*have)++;
    } else {
        if (!(v > values[k - 1])) return;
        at = k - 1;  /* the smallest kept makes room */
    }
    while (at > 0 && v > values[at - 1]) {
        values[at] = values[at - 1], ids[at] = ids[at - 1];
        at--;
    }
    values[at] = v, ids[at] = i;
}

/* The k largest of n logits (float32 or bfloat16) after sampling.py's first two processors, computed
 * as its torch operations compute them in float32: the ids in seen[0..n_seen) (repeats allowed) turned
 * by the repetition penalty (v < 0 ? v * penalty : v / penalty), then every value divided by the
 * temperature. values[0..k) descending, ids with them; returns how many were filled (k, or n when
 * n < k), -1 without memory, -2 where a logit is NaN or infinite. One pass, eight at a time,
 * that looks at a value only when it beats the k-th so far: torch's copy, penalty, division and topk
 * took ~1.1 ms a token on a 2-core Zen 3 (benchmarks/bench_sampling.py). */
int64_t qwen_top_k(const void *logits, int64_t n, int bf16, const int64_t *seen, int64_t n_seen, float penalty,
                   float temperature, int64_t k, float *values, int64_t *ids) {
    uint8_t *marked = calloc((size_t)(n / 8 + 1), 1);
    if (!marked) return -1;
    for (int64_t j = 0; j < n_seen; j++)
        if (seen[j] >= 0 && seen[j] < n) marked[seen[j] >> 3] |= (uint8_t)(1u << (seen[j] & 7));
    const __m256 t8 = _mm256_set1_ps(temperature), inf = _mm256_set1_ps(INFINITY);
    const __m256 magnitude = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    __m256 bad8 = _mm256_setzero_ps();
    int64_t have = 0, i = 0, bad = 0;
    float lanes[8];
    for (; i + 8 <= n; i += 8) {
        __m256 v = load8(logits, i, bf16);
        bad8 = _mm256_or_ps(bad8, _mm256_cmp_ps(_mm256_and_ps(v, magnitude), inf, _CMP_NLT_UQ));  /* NaN, +-inf */
        if (marked[i >> 3]) {  /* i is a multiple of 8: this byte marks these eight */
            _mm256_storeu_ps(lanes, v);
            for (int l = 0; l < 8; l++)
                if (marked[i >> 3] >> l & 1) lanes[l] = lanes[l] < 0 ? lanes[l] * penalty : lanes[l] / penalty;
            v = _mm256_loadu_ps(lanes);
        }
        v = _mm256_div_ps(v, t8);
        int over = have < k ? 0xff : _mm256_movemask_ps(_mm256_cmp_ps(v, _mm256_set1_ps(values[k - 1]), _CMP_GT_OQ));
        if (!over) continue;
        _mm256_storeu_ps(lanes, v);
        for (int l = 0; l < 8; l++)
            if (over >> l & 1) offer(lanes[l], i + l, values, ids, k, &have);
    }
    for (; i < n; i++) {
        float v = load_any(logits, i, bf16);
        bad |= !isfinite(v);
        if (marked[i >> 3] >> (i & 7) & 1) v = v < 0 ? v * penalty : v / penalty;
        offer(v / temperature, i, values, ids, k, &have);
    }
    free(marked);
    return bad || _mm256_movemask_ps(bad8) ? -2 : have;
}

/* The sizes of struct layer_step, stack_call and stack_tail: kernels.py refuses to call through structs of
 * other sizes. */
int64_t qwen_layer_step_size(void) { return (int64_t)sizeof(struct layer_step); }
int64_t qwen_stack_call_size(void) { return (int64_t)sizeof(struct stack_call); }
int64_t qwen_stack_tail_size(void) { return (int64_t)sizeof(struct stack_tail); }
