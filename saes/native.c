/* CPU kernels of the SAE training step, built at first use by saes/native.py (plain C, no Python or torch
 * headers; each call takes a range of rows, split over OpenMP threads where built with OpenMP).
 *
 * topk_rows:      the positions of each row's k largest entries (in no particular order), and their values.
 * unit_row_adam:  one pass over a decoder whose rows are kept at unit norm: remove each gradient row's
 *                 component along its weight row, take torch's Adam step (no weight decay, no amsgrad),
 *                 renormalise the row.
 * scatter_rows:   the sparse product S^T dense of the sparse backwards, after a counting sort by latent.
 * gather_dot:     the sampled product of the decoder's backward: each entry's dot product of its row of one matrix
 *                 with its latent's row of another.
 * sparse_fvu:     the sparse decode and its reconstruction error in one pass over each row's latents: the decoded
 *                 row, its error, the error's squared norm, and the error's dot product with each of its latents'
 *                 rows (what the backward needs for the code values), the rows read once.
 * sparse_adam:    Adam's step of a weight matrix whose gradient is kept sparse (the entries of each latent, never
 *                 written as a dense gradient): each row's gradient made, stepped and (for a decoder) projected and
 *                 renormalised in one pass; the encoder's pass also sums the b_dec gradient's product with it.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef __AVX2__
#include <immintrin.h>
#endif
#ifdef _OPENMP
#include <omp.h>
#endif

#define BLOCK 16
/* The lowest bit of the key of the top-k's first bound that is found (see topk_range): 32 - 16 counting passes at
 * most in place of 32, the bound within 2^-7 of the exact one (no more than a few entries more to sort out). */
#ifndef BOUND_LAST_BIT
#define BOUND_LAST_BIT 16
#endif
#define MIN_ROWS_PER_THREAD 64

int native_version(void) { return 8; }

/* Fewer rows than this per thread run on fewer threads (a thread hand-off costs tens of microseconds); the Python
 * side reads it for its own split where the library has no OpenMP. */
int native_min_rows_per_thread(void) { return MIN_ROWS_PER_THREAD; }

/* Built with OpenMP, the kernels split their rows over native_set_threads() threads of the process's OpenMP
 * runtime: torch's own (the loader resolves libgomp.so.1 to the copy torch loaded), so no second pool of
 * threads competes with torch's. Built without it, each call runs on the calling thread and the caller splits. */
static int n_threads = 1;

void native_set_threads(int n) { n_threads = n > 0 ? n : 1; }

int native_openmp(void) {
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
}

/* Runs CALL (an int expression of the row range [a, b)) over [r0, r1) split into contiguous ranges, one per
 * thread, each starting a multiple of UNIT rows after r0; evaluates to the OR of the calls' results. */
#ifdef _OPENMP
#define SPLIT_ROWS_BY(r0, r1, UNIT, CALL)                                                                          \
    ({                                                                                                             \
        int64_t n_ = (r1) - (r0), t_ = n_ / MIN_ROWS_PER_THREAD, u_ = (n_ + (UNIT) - 1) / (UNIT);                  \
        int nt_ = t_ < 1 ? 1 : (t_ < n_threads ? (int)t_ : n_threads), rc_ = 0;                                    \
        _Pragma("omp parallel num_threads(nt_) reduction(| : rc_)") {                                              \
            int64_t i_ = omp_get_thread_num(), m_ = omp_get_num_threads();                                         \
            int64_t a_ = u_ * i_ / m_ * (UNIT), b_ = u_ * (i_ + 1) / m_ * (UNIT);                                  \
            int64_t a = (r0) + (a_ < n_ ? a_ : n_), b = (r0) + (b_ < n_ ? b_ : n_);                                \
            rc_ |= (CALL);                                                                                         \
        }                                                                                                          \
        rc_;                                                                                                       \
    })
#else
#define SPLIT_ROWS_BY(r0, r1, UNIT, CALL)                                                                          \
    ({                                                                                                             \
        int64_t a = (r0), b = (r1);                                                                                \
        (CALL);                                                                                                    \
    })
#endif
#define SPLIT_ROWS(r0, r1, CALL) SPLIT_ROWS_BY(r0, r1, 1, CALL)

/* Entries ahead of the one being added whose rows are asked for (prefetch_row). */
#ifndef AHEAD
#define AHEAD 4
#endif

/* Asks for a row of n floats to be brought into the cache (the sparse products read rows in an order no hardware
 * prefetcher can guess: each row is a few dozen cache lines, read once where it comes). */
static inline void prefetch_row(const float *p, int64_t n) {
    for (int64_t j = 0; j < n; j += 16) __builtin_prefetch(p + j, 0, 3);
}

/* Rows gathered into one call of dots or add_rows. */
#define ROWS_AT_ONCE 16

/* out[j] = <a, rows[j]> for j < n (rows of m floats): four rows at a time, so that four sums advance together (one
 * running sum waits on its previous add at every step). */
static inline void dots(const float *restrict a, const float *const *rows, int64_t n, int64_t m, float *out) {
    int64_t j = 0;
    for (; j + 4 <= n; j += 4) {
        const float *restrict w0 = rows[j], *restrict w1 = rows[j + 1], *restrict w2 = rows[j + 2],
                    *restrict w3 = rows[j + 3];
        float t0 = 0.f, t1 = 0.f, t2 = 0.f, t3 = 0.f;
#pragma omp simd reduction(+ : t0, t1, t2, t3)
        for (int64_t c = 0; c < m; c++) {
            float x = a[c];
            t0 += x * w0[c];
            t1 += x * w1[c];
            t2 += x * w2[c];
            t3 += x * w3[c];
        }
        out[j] = t0;
        out[j + 1] = t1;
        out[j + 2] = t2;
        out[j + 3] = t3;
    }
    for (; j < n; j++) {
        const float *restrict w = rows[j];
        float t = 0.f;
#pragma omp simd reduction(+ : t)
        for (int64_t c = 0; c < m; c++) t += a[c] * w[c];
        out[j] = t;
    }
}

/* o[0..m) += sum_j v[j] * rows[j] for j < n: eight rows a pass over o, then the rest (up to seven) in at most two
 * passes (four, then three, two or one), so that o is read and written once per eight rows, not once per row: a
 * latent of a batch-1,024 step has 3.6 entries on average. The one order of the sparse sums: the weight gradients
 * (scatter_rows and sparse_adam add in the same order) and the decode. */
static inline void add_rows(float *restrict o, const float *const *rows, const float *v, int64_t n, int64_t m) {
    int64_t j = 0;
    for (; j + 8 <= n; j += 8) {
        const float *restrict d0 = rows[j], *restrict d1 = rows[j + 1], *restrict d2 = rows[j + 2],
                    *restrict d3 = rows[j + 3], *restrict d4 = rows[j + 4], *restrict d5 = rows[j + 5],
                    *restrict d6 = rows[j + 6], *restrict d7 = rows[j + 7];
        float v0 = v[j], v1 = v[j + 1], v2 = v[j + 2], v3 = v[j + 3], v4 = v[j + 4], v5 = v[j + 5], v6 = v[j + 6],
              v7 = v[j + 7];
#pragma omp simd
        for (int64_t c = 0; c < m; c++)
            o[c] += (v0 * d0[c] + v1 * d1[c] + v2 * d2[c] + v3 * d3[c])
                    + (v4 * d4[c] + v5 * d5[c] + v6 * d6[c] + v7 * d7[c]);
    }
    if (n - j >= 4) {
        const float *restrict d0 = rows[j], *restrict d1 = rows[j + 1], *restrict d2 = rows[j + 2],
                    *restrict d3 = rows[j + 3];
        float v0 = v[j], v1 = v[j + 1], v2 = v[j + 2], v3 = v[j + 3];
#pragma omp simd
        for (int64_t c = 0; c < m; c++) o[c] += v0 * d0[c] + v1 * d1[c] + v2 * d2[c] + v3 * d3[c];
        j += 4;
    }
    if (n - j == 3) {
        const float *restrict d0 = rows[j], *restrict d1 = rows[j + 1], *restrict d2 = rows[j + 2];
        float v0 = v[j], v1 = v[j + 1], v2 = v[j + 2];
#pragma omp simd
        for (int64_t c = 0; c < m; c++) o[c] += v0 * d0[c] + v1 * d1[c] + v2 * d2[c];
    } else if (n - j == 2) {
        const float *restrict d0 = rows[j], *restrict d1 = rows[j + 1];
        float v0 = v[j], v1 = v[j + 1];
#pragma omp simd
        for (int64_t c = 0; c < m; c++) o[c] += v0 * d0[c] + v1 * d1[c];
    } else if (n - j == 1) {
        const float *restrict d = rows[j];
        float vj = v[j];
#pragma omp simd
        for (int64_t c = 0; c < m; c++) o[c] += vj * d[c];
    }
}

/* An int32 key of a float that orders as the float does, NaN above +inf (as torch.topk orders it). */
static inline int32_t key32(float x) {
    int32_t s;
    memcpy(&s, &x, sizeof s);
    if (x != x) s = 0x7FFFFFFF;
    return s < 0 ? s ^ 0x7FFFFFFF : s;
}

static inline float unkey32(int32_t s) {
    float x;
    s = s < 0 ? s ^ 0x7FFFFFFF : s;
    memcpy(&x, &s, sizeof x);
    return x;
}

/* The number of keys >= c. */
static inline int64_t count_ge(const int32_t *key, int64_t n, int32_t c) {
#ifdef __AVX512F__
    __m512i cv = _mm512_set1_epi32(c);
    int64_t cnt = 0, i = 0;
    for (; i + 16 <= n; i += 16)
        cnt += __builtin_popcount(_mm512_cmpge_epi32_mask(_mm512_loadu_si512(key + i), cv));
    if (i < n) {
        __mmask16 live = (__mmask16)((1u << (n - i)) - 1u);
        cnt += __builtin_popcount(_mm512_mask_cmpge_epi32_mask(live, _mm512_maskz_loadu_epi32(live, key + i), cv));
    }
    return cnt;
#else
    int32_t cnt = 0;  /* n < 2^31: a row's length */
#pragma omp simd reduction(+ : cnt)
    for (int64_t i = 0; i < n; i++) cnt += key[i] >= c;
    return cnt;
#endif
}

/* A lower bound of the k-th largest of n keys (0 < k <= n), found bit by bit from the top, its bits from `last` up
 * (last 0: the k-th largest itself). The bits above the highest one on which the keys differ are theirs in common,
 * and are taken as they are; each bit below it takes one counting pass. At least k keys are >= the result. */
static int32_t kth_key_from(const int32_t *key, int64_t n, int64_t k, int last) {
    uint32_t all = 0xFFFFFFFFu, any = 0;
#pragma omp simd reduction(& : all) reduction(| : any)
    for (int64_t i = 0; i < n; i++) {
        uint32_t u = (uint32_t)key[i] ^ 0x80000000u;  /* unsigned order: the keys' order */
        all &= u;
        any |= u;
    }
    uint32_t diff = all ^ any;
    if (!diff) return key[0];  /* all equal */
    int top = 31 - __builtin_clz(diff);
    uint32_t t = top == 31 ? 0u : all & ~((2u << top) - 1u);  /* the common bits above `top` */
    for (int bit = top; bit >= last; bit--) {
        uint32_t c = t | (1u << bit);
        if (count_ge(key, n, (int32_t)(c ^ 0x80000000u)) >= k) t = c;
    }
    return (int32_t)(t ^ 0x80000000u);
}

/* out: the positions (pos[i], or i where pos is NULL) of the k largest keys; of the keys equal to the k-th
 * largest, the first ones. */
static void take_top(const int32_t *key, const int64_t *pos, int64_t n, int64_t k, int64_t *out) {
    int32_t t = kth_key_from(key, n, k, 0);
    int64_t ties = k - (t == INT32_MAX ? 0 : count_ge(key, n, t + 1)), o = 0;  /* k less the keys > t */
#ifdef __AVX512F__
    if (pos) {
        __m512i tv = _mm512_set1_epi32(t);
        for (int64_t i = 0; i < n && o < k; i += 16) {
            __mmask16 live = n - i >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (n - i)) - 1u);
            __m512i kv = _mm512_maskz_loadu_epi32(live, key + i);
            __mmask16 take = _mm512_mask_cmpgt_epi32_mask(live, kv, tv);
            __mmask16 eq = _mm512_mask_cmpeq_epi32_mask(live, kv, tv);
            for (; ties > 0 && eq; ties--) {
                take |= eq & (__mmask16)-eq;
                eq &= eq - 1;
            }
            int c0 = __builtin_popcount(take & 0xFF), c1 = __builtin_popcount(take >> 8);
            __m512i p0 = _mm512_maskz_compress_epi64((__mmask8)take, _mm512_maskz_loadu_epi64((__mmask8)live, pos + i));
            __m512i p1 = _mm512_maskz_compress_epi64((__mmask8)(take >> 8),
                                                     _mm512_maskz_loadu_epi64((__mmask8)(live >> 8), pos + i + 8));
            _mm512_mask_storeu_epi64(out + o, (__mmask8)((1u << c0) - 1u), p0);
            _mm512_mask_storeu_epi64(out + o + c0, (__mmask8)((1u << c1) - 1u), p1);
            o += c0 + c1;
        }
        return;
    }
#endif
    for (int64_t i = 0; i < n && o < k; i++) {
        if (key[i] > t || (key[i] == t && ties-- > 0)) out[o++] = pos ? pos[i] : i;
    }
}

/* Block maxima of a row (blocks of 16 adjacent entries, the last one possibly shorter); returns whether the
 * row holds a NaN. */
static int block_maxima(const float *p, int64_t d, float *bm) {
    int64_t nb = d / BLOCK, b = 0;
    int nan = 0;
#ifdef __AVX2__
    __m256 un = _mm256_setzero_ps();
    for (; b < nb; b++) {
        __m256 x0 = _mm256_loadu_ps(p + b * BLOCK), x1 = _mm256_loadu_ps(p + b * BLOCK + 8);
        un = _mm256_or_ps(un, _mm256_or_ps(_mm256_cmp_ps(x0, x0, _CMP_UNORD_Q), _mm256_cmp_ps(x1, x1, _CMP_UNORD_Q)));
        __m256 m = _mm256_max_ps(x0, x1);
        __m128 h = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
        h = _mm_max_ps(h, _mm_movehl_ps(h, h));
        h = _mm_max_ss(h, _mm_shuffle_ps(h, h, 1));
        bm[b] = _mm_cvtss_f32(h);
    }
    nan = _mm256_movemask_ps(un) != 0;
#endif
    for (; b < nb; b++) {
        float m = p[b * BLOCK];
        for (int t = 0; t < BLOCK; t++) {
            float x = p[b * BLOCK + t];
            nan |= x != x;
            m = x > m ? x : m;
        }
        bm[b] = m;
    }
    if (nb * BLOCK < d) {
        float m = p[nb * BLOCK];
        for (int64_t j = nb * BLOCK; j < d; j++) {
            nan |= p[j] != p[j];
            m = p[j] > m ? p[j] : m;
        }
        bm[nb] = m;
    }
    return nan;
}

/* Rows [r0, r1) of pre (row stride ld): out[r * k + i] are the positions of row r's k largest entries.
 *
 * A row of at least 2 k blocks of 16 takes three steps, exact by construction: the maxima of groups of f
 * adjacent blocks (f such that there are about 4 k groups); L, a lower bound of the k-th largest group maximum, its
 * key's bits from BOUND_LAST_BIT up (within 2^-7 of it, relatively; at least k group maxima, so at least k
 * entries of the row, are >= L, so every entry of the top k is >= L); the entries >= L of the blocks whose maximum
 * is >= L (about k of them; listed by vector compress where the CPU has AVX-512), and the k largest of those.
 * Other rows, and rows holding a NaN, count over the whole row. Where entries tie at the k-th value, the first
 * positions of it; the positions come out in the same order on every path.
 * Returns 0, or -1 when scratch memory could not be had. */
static int topk_range(int64_t r0, int64_t r1, const float *pre, int64_t d, int64_t ld, int64_t k, int64_t *out,
                      float *vout) {
    int64_t nbl = (d + BLOCK - 1) / BLOCK;
    int64_t f = nbl / (4 * k) > 1 ? nbl / (4 * k) : 1, ng = (nbl + f - 1) / f;
    float *bm = malloc(sizeof(float) * (nbl + ng));
    int32_t *key = malloc(sizeof(int32_t) * (d + BLOCK)), *blocks = malloc(sizeof(int32_t) * (nbl + BLOCK));
    int64_t *pos = malloc(sizeof(int64_t) * (d + BLOCK));
    if (!bm || !key || !pos || !blocks) { free(bm); free(key); free(pos); free(blocks); return -1; }
    float *gm = bm + nbl;
    for (int64_t r = r0; r < r1; r++) {
        const float *p = pre + r * ld;
        int64_t *o = out + r * k;
        if (nbl < 2 * k || block_maxima(p, d, bm)) {
            for (int64_t j = 0; j < d; j++) key[j] = key32(p[j]);
            take_top(key, NULL, d, k, o);
            if (vout)
                for (int64_t i = 0; i < k; i++) vout[r * k + i] = p[o[i]];
            continue;
        }
        for (int64_t g = 0; g < ng; g++) {
            int64_t end = (g + 1) * f < nbl ? (g + 1) * f : nbl;
            float m = bm[g * f];
            for (int64_t b = g * f + 1; b < end; b++) m = bm[b] > m ? bm[b] : m;
            gm[g] = m;
            key[g] = key32(m);
        }
        float L = unkey32(kth_key_from(key, ng, k, BOUND_LAST_BIT));
        if (L != L) L = -INFINITY;  /* a bound below -inf's key: every entry counts */
        int64_t n = 0;
        int64_t b = 0;
#ifdef __AVX512F__
        {
            __m512 lv = _mm512_set1_ps(L);
            const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
            const __m512i lane64 = _mm512_setr_epi64(0, 1, 2, 3, 4, 5, 6, 7), eight = _mm512_set1_epi64(8),
                          zero = _mm512_setzero_si512(), flip = _mm512_set1_epi32(0x7FFFFFFF);
            int64_t nc = 0;
            for (; b + 16 <= nbl && (b + 16) * BLOCK <= d; b += 16) {  /* the blocks whose maximum is >= L */
                __mmask16 m = _mm512_cmp_ps_mask(_mm512_loadu_ps(bm + b), lv, _CMP_GE_OQ);
                _mm512_storeu_si512(blocks + nc, _mm512_maskz_compress_epi32(m, _mm512_add_epi32(
                                                                                    _mm512_set1_epi32((int)b), lane)));
                nc += __builtin_popcount(m);
            }
            for (int64_t q = 0; q < nc; q++) {  /* their entries >= L, keyed (no NaN in this row) */
                int64_t j = (int64_t)blocks[q] * BLOCK;
                __m512i s = _mm512_castps_si512(_mm512_loadu_ps(p + j));
                __mmask16 m = _mm512_cmp_ps_mask(_mm512_castsi512_ps(s), lv, _CMP_GE_OQ);
                __m512i kv = _mm512_mask_xor_epi32(s, _mm512_cmplt_epi32_mask(s, zero), s, flip);
                _mm512_storeu_si512(key + n, _mm512_maskz_compress_epi32(m, kv));
                __m512i j0 = _mm512_add_epi64(_mm512_set1_epi64(j), lane64), j1 = _mm512_add_epi64(j0, eight);
                int c0 = __builtin_popcount(m & 0xFF);
                _mm512_storeu_si512(pos + n, _mm512_maskz_compress_epi64((__mmask8)m, j0));
                _mm512_storeu_si512(pos + n + c0, _mm512_maskz_compress_epi64((__mmask8)(m >> 8), j1));
                n += __builtin_popcount(m);
            }
        }
#endif
#ifdef __AVX2__
        __m256 lv = _mm256_set1_ps(L);
        for (; b + 8 <= nbl && (b + 8) * BLOCK <= d; b += 8) {
            unsigned bits = (unsigned)_mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(bm + b), lv, _CMP_GE_OQ));
            while (bits) {
                int64_t j = (b + __builtin_ctz(bits)) * BLOCK;
                bits &= bits - 1;
                unsigned mask = (unsigned)_mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(p + j), lv, _CMP_GE_OQ))
                    | (unsigned)_mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(p + j + 8), lv, _CMP_GE_OQ)) << 8;
                while (mask) {
                    int t = __builtin_ctz(mask);
                    mask &= mask - 1;
                    key[n] = key32(p[j + t]);
                    pos[n++] = j + t;
                }
            }
        }
#endif
        for (; b < nbl; b++) {
            if (!(bm[b] >= L)) continue;
            int64_t end = (b + 1) * BLOCK < d ? (b + 1) * BLOCK : d;
            for (int64_t j = b * BLOCK; j < end; j++)
                if (p[j] >= L) { key[n] = key32(p[j]); pos[n++] = j; }
        }
        take_top(key, pos, n, k, o);
        if (vout)
            for (int64_t i = 0; i < k; i++) vout[r * k + i] = p[o[i]];
    }
    free(bm);
    free(key);
    free(pos);
    free(blocks);
    return 0;
}

int topk_rows(int64_t r0, int64_t r1, const float *pre, int64_t d, int64_t ld, int64_t k, int64_t *out,
              float *vout) {
    return SPLIT_ROWS(r0, r1, topk_range(a, b, pre, d, ld, k, out, vout));
}

/* Adam's constants of step number `step` (torch's: no weight decay, no amsgrad). */
typedef struct {
    float step_size, bc2, eps, b2, omb1, omb2;
} adam_consts;

static adam_consts adam_setup(double lr, double beta1, double beta2, double eps, double step) {
    double bc1 = 1.0 - pow(beta1, step), bc2_sqrt = sqrt(1.0 - pow(beta2, step));
    adam_consts c = {(float)(lr / bc1), (float)bc2_sqrt, (float)eps, (float)beta2, (float)(1.0 - beta1),
                     (float)(1.0 - beta2)};
    return c;
}

/* One row w (moments m, v) of cols floats stepped with gradient g; a decoder row (decoder set) has g's component
 * along w removed first (<w, w> taken as 1 when unit is set) and is renormalised after:
 *   g <- g - (<g, w> / <w, w>) w
 *   m <- m + (1 - beta1) (g - m);  v <- beta2 v + (1 - beta2) g^2
 *   w <- w - step_size m / (sqrt(v) / bc2_sqrt + eps);  w <- w / max(|w|, 1e-12)
 * with step_size = lr / (1 - beta1^step), bc2_sqrt = sqrt(1 - beta2^step). g is not written. */
static inline void adam_row(float *restrict w, float *restrict m, float *restrict v, const float *restrict g,
                            int64_t cols, const adam_consts *k, int decoder, int unit) {
    float coef = 0.f;
    if (decoder) {
        float gw = 0.f, ww = 0.f;
#pragma omp simd reduction(+ : gw, ww)
        for (int64_t c = 0; c < cols; c++) { gw += g[c] * w[c]; ww += w[c] * w[c]; }
        coef = unit ? gw : gw / (ww > 1e-24f ? ww : 1e-24f);
    }
    float nn = 0.f, step_size = k->step_size, bc2 = k->bc2, e = k->eps, b2 = k->b2, omb1 = k->omb1, omb2 = k->omb2;
#pragma omp simd reduction(+ : nn)
    for (int64_t c = 0; c < cols; c++) {
        float gc = g[c] - coef * w[c];
        float mc = m[c] + omb1 * (gc - m[c]);
        float vc = b2 * v[c] + omb2 * gc * gc;
        m[c] = mc;
        v[c] = vc;
        float wc = w[c] - step_size * mc / (sqrtf(vc) / bc2 + e);
        w[c] = wc;
        nn += wc * wc;
    }
    if (decoder) {
        float s = 1.0f / fmaxf(sqrtf(nn), 1e-12f);
#pragma omp simd
        for (int64_t c = 0; c < cols; c++) w[c] *= s;
    }
}

/* Rows [r0, r1) of a decoder W (rows x cols, row-major) with gradient G and Adam moments M, V (same layout): each
 * row's adam_row as a decoder row. G is not written. */
static int adam_range(int64_t r0, int64_t r1, float *W, const float *G, float *M, float *V, int64_t cols,
                      double lr, double beta1, double beta2, double eps, double step, int unit) {
    adam_consts k = adam_setup(lr, beta1, beta2, eps, step);
    for (int64_t r = r0; r < r1; r++)
        adam_row(W + r * cols, M + r * cols, V + r * cols, G + r * cols, cols, &k, 1, unit);
    return 0;
}

void unit_row_adam(int64_t r0, int64_t r1, float *W, const float *G, float *M, float *V, int64_t cols,
                   double lr, double beta1, double beta2, double eps, double step, int unit) {
    SPLIT_ROWS(r0, r1, adam_range(a, b, W, G, M, V, cols, lr, beta1, beta2, eps, step, unit));
}

/* Counting sort of n latent ids idx[0..n) in [0, d_sae): starts[l] .. starts[l + 1] index into order, which lists
 * the entries of latent l in ascending order. Returns 0, -1 when an id is out of range, -2 without memory. */
int sort_by_latent(const int64_t *idx, int64_t n, int64_t d_sae, int64_t *starts, int64_t *order) {
    memset(starts, 0, sizeof(int64_t) * (d_sae + 1));
    for (int64_t i = 0; i < n; i++) {
        if (idx[i] < 0 || idx[i] >= d_sae) return -1;
        starts[idx[i] + 1]++;
    }
    for (int64_t l = 0; l < d_sae; l++) starts[l + 1] += starts[l];
    int64_t *cur = malloc(sizeof(int64_t) * (d_sae > 0 ? d_sae : 1));
    if (!cur) return -2;
    memcpy(cur, starts, sizeof(int64_t) * d_sae);
    for (int64_t i = 0; i < n; i++) order[cur[idx[i]]++] = i;
    free(cur);
    return 0;
}

/* o[0..m) += the sum over the entries t in [e0, e1) of vals[i] * dense[i / k] (i = order[t]; dense's row stride ld)
 * by add_rows; rows up to entry `end` (exclusive) are asked for AHEAD entries early. */
static inline void add_entries(float *restrict o, const int64_t *order, int64_t e0, int64_t e1, int64_t end,
                               const float *vals, int64_t k, const float *dense, int64_t ld, int64_t m) {
    const float *rows[ROWS_AT_ONCE];
    float v[ROWS_AT_ONCE];
    for (int64_t t = e0; t < e1; t += ROWS_AT_ONCE) {
        int64_t n = e1 - t < ROWS_AT_ONCE ? e1 - t : ROWS_AT_ONCE;
        for (int64_t q = 0; q < n; q++) {
            if (t + q + AHEAD < end) prefetch_row(dense + (order[t + q + AHEAD] / k) * ld, m);
            int64_t i = order[t + q];
            rows[q] = dense + (i / k) * ld;
            v[q] = vals[i];
        }
        add_rows(o, rows, v, n, m);
    }
}

/* Latents [r0, r1): out[l] = sum over the entries i of latent l (in ascending order) of vals[i] * dense[i / k]
 * (rows of m floats; dense's row stride ld). Rows of latents with no entry are zero. */
static int scatter_range(int64_t r0, int64_t r1, const int64_t *starts, const int64_t *order, const float *vals,
                         int64_t k, const float *dense, int64_t ld, int64_t m, float *out) {
    int64_t e1 = starts[r1];
    for (int64_t e = starts[r0]; e < starts[r0] + AHEAD && e < e1; e++) prefetch_row(dense + (order[e] / k) * ld, m);
    for (int64_t l = r0; l < r1; l++) {
        float *o = out + l * m;
        memset(o, 0, sizeof(float) * m);
        add_entries(o, order, starts[l], starts[l + 1], e1, vals, k, dense, ld, m);
    }
    return 0;
}

void scatter_rows(int64_t r0, int64_t r1, const int64_t *starts, const int64_t *order, const float *vals, int64_t k,
                  const float *dense, int64_t ld, int64_t m, float *out) {
    SPLIT_ROWS(r0, r1, scatter_range(a, b, starts, order, vals, k, dense, ld, m, out));
}

/* rows[q] = W's row idx[i0 + q] for q < n (row stride ldw, m floats), asking for the row of entry i0 + q + ahead
 * where that entry is before `end`. */
static inline void latent_rows(const float **rows, const float *W, int64_t ldw, const int64_t *idx, int64_t i0,
                               int64_t n, int64_t ahead, int64_t end, int64_t m) {
    for (int64_t q = 0; q < n; q++) {
        if (i0 + q + ahead < end) prefetch_row(W + idx[i0 + q + ahead] * ldw, m);
        rows[q] = W + idx[i0 + q] * ldw;
    }
}

/* Rows [r0, r1): out[b * k + j] = <g[b], W[idx[b * k + j]]> (rows of m floats; g's row stride ldg, W's ldw; W has
 * n_rows rows). Returns -1 when an index is outside [0, n_rows), 0 otherwise. */
static int gather_dot_range(int64_t r0, int64_t r1, const int64_t *idx, int64_t k, const float *g, int64_t ldg,
                            const float *W, int64_t ldw, int64_t n_rows, int64_t m, float *out) {
    for (int64_t i = r0 * k; i < r1 * k; i++)
        if (idx[i] < 0 || idx[i] >= n_rows) return -1;
    for (int64_t b = r0; b < r1; b++) {
        const float *gr = g + b * ldg;
        for (int64_t j = 0; j < k; j += ROWS_AT_ONCE) {
            const float *rows[ROWS_AT_ONCE];
            int64_t n = k - j < ROWS_AT_ONCE ? k - j : ROWS_AT_ONCE;
            latent_rows(rows, W, ldw, idx, b * k + j, n, ROWS_AT_ONCE, r1 * k, m);
            dots(gr, rows, n, m, out + b * k + j);
        }
    }
    return 0;
}

int gather_dot(int64_t r0, int64_t r1, const int64_t *idx, int64_t k, const float *g, int64_t ldg, const float *W,
               int64_t ldw, int64_t n_rows, int64_t m, float *out) {
    return SPLIT_ROWS(r0, r1, gather_dot_range(a, b, idx, k, g, ldg, W, ldw, n_rows, m, out));
}

/* One source of a weight gradient kept sparse: row l's gradient gets the sum over the entries i of latent l (in the
 * order order[starts[l]] .. order[starts[l + 1] - 1]) of vals[i] * dense[i / k] (dense's row stride ld): what
 * scatter_rows writes as row l. */
typedef struct {
    const int64_t *starts, *order;
    const float *vals;
    int64_t k;
    const float *dense;
    int64_t ld;
} grad_source;

/* Rows a chunk of the b_dec sums covers: each chunk's partial sum is one row of `partial`, so the result does not
 * depend on how rows are split over threads. */
#define CHUNK 64

int native_sparse_chunk(void) { return CHUNK; }

/* The gradient rows [r0, r1) into g (rows of cols floats; s: scratch of as many): G's rows (zero where G is NULL)
 * plus the sources' sums, each source's sum made first and added (as autograd adds the gradients of several uses
 * of a weight). */
static void gradient_rows(int64_t r0, int64_t r1, const grad_source *src, int nsrc, const float *G, int64_t ldg,
                          int64_t cols, float *restrict g, float *restrict s) {
    int64_t n = r1 - r0;
    if (G) {
        for (int64_t r = 0; r < n; r++) memcpy(g + r * cols, G + (r0 + r) * ldg, sizeof(float) * cols);
    } else {
        memset(g, 0, sizeof(float) * cols * n);
    }
    int first = G == NULL;
    for (int q = 0; q < nsrc; q++) {
        const int64_t *order = src[q].order, *starts = src[q].starts, k = src[q].k, ld = src[q].ld;
        const float *vals = src[q].vals, *dense = src[q].dense;
        float *restrict acc = first ? g : s;
        if (!first) memset(s, 0, sizeof(float) * cols * n);
        int64_t t0 = starts[r0], t1 = starts[r1];
        for (int64_t t = t0; t < t0 + AHEAD && t < t1; t++) prefetch_row(dense + (order[t] / k) * ld, cols);
        for (int64_t r = 0; r < n; r++)
            add_entries(acc + r * cols, order, starts[r0 + r], starts[r0 + r + 1], t1, vals, k, dense, ld, cols);
        if (!first) {
            for (int64_t r = 0; r < n; r++) {
                if (starts[r0 + r] == starts[r0 + r + 1]) continue;  /* g + 0: as autograd's sum, no write */
#pragma omp simd
                for (int64_t j = 0; j < cols; j++) g[r * cols + j] += s[r * cols + j];
            }
        }
        first = 0;
    }
}

/* Rows [r0, r1) (r0 a multiple of CHUNK) of W (rows x cols, row-major; M, V its Adam moments, same layout), a chunk
 * of CHUNK rows at a time: the chunk's gradient rows made first (gradient_rows: the random reads of the sources'
 * dense rows apart from the streaming pass), then for each row
 *   partial[r / CHUNK] += wb[r] * w  (before the step; where wb is not NULL);
 *   adam_row (a decoder row where decoder is set).
 * dry: the gradient rows and the partial sums only (W, M, V not written), each gradient row checked finite.
 * Returns 0, SPARSE_NONFINITE where a dry run found a gradient entry that is NaN or infinite, SPARSE_NOMEM without
 * scratch memory (flags: the threads' results are OR-ed). */
#define SPARSE_NONFINITE 1
#define SPARSE_NOMEM 2
static int sparse_adam_range(int64_t r0, int64_t r1, const grad_source *src, int nsrc, const float *G, int64_t ldg,
                             float *W, float *M, float *V, int64_t cols, double lr, double beta1, double beta2,
                             double eps, double step, int decoder, int unit, const float *wb, float *partial,
                             int dry) {
    float *buf = malloc(sizeof(float) * cols * CHUNK * 2);
    if (!buf) return SPARSE_NOMEM;
    int rc = 0;
    adam_consts k = adam_setup(lr, beta1, beta2, eps, step);
    for (int64_t c0 = r0; c0 < r1; c0 += CHUNK) {
        int64_t c1 = c0 + CHUNK < r1 ? c0 + CHUNK : r1;
        gradient_rows(c0, c1, src, nsrc, G, ldg, cols, buf, buf + cols * CHUNK);
        for (int64_t r = c0; r < c1; r++) {
            float *w = W + r * cols;
            const float *g = buf + (r - c0) * cols;
            if (wb && wb[r] != 0.0f) {
                float *p = partial + (r / CHUNK) * cols, f = wb[r];
#pragma omp simd
                for (int64_t j = 0; j < cols; j++) p[j] += f * w[j];
            }
            if (dry) {
                float z = 0.f;
#pragma omp simd reduction(+ : z)
                for (int64_t j = 0; j < cols; j++) z += g[j] * 0.f;  /* NaN where an entry is NaN or infinite */
                if (z != z) rc |= SPARSE_NONFINITE;
                continue;
            }
            adam_row(w, M + r * cols, V + r * cols, g, cols, &k, decoder, unit);
        }
    }
    free(buf);
    return rc;
}

/* sparse_adam_range over all rows, split over threads at multiples of CHUNK rows (partial: zeroed by the caller,
 * ceil(rows / CHUNK) rows of cols floats); its flags. */
int sparse_adam(int64_t rows, const grad_source *src, int nsrc, const float *G, int64_t ldg, float *W, float *M,
                float *V, int64_t cols, double lr, double beta1, double beta2, double eps, double step, int decoder,
                int unit, const float *wb, float *partial, int dry) {
    return SPLIT_ROWS_BY(0, rows, CHUNK, sparse_adam_range(a, b, src, nsrc, G, ldg, W, M, V, cols, lr, beta1, beta2,
                                                           eps, step, decoder, unit, wb, partial, dry));
}

/* Rows [r0, r1) of a batch: xh[b] = sum_j vals[b * k + j] * W[idx[b * k + j]] + bias, e[b] = xh[b] - x[b],
 * sse[b] = <e[b], e[b]>, dots[b * k + j] = <e[b], W[idx[b * k + j]]> (rows of m floats; W's row stride ldw, x's ldx;
 * xh, e contiguous; bias NULL for none). Returns -1 when an index is outside [0, n_rows), 0 otherwise. */
static int sparse_fvu_range(int64_t r0, int64_t r1, const int64_t *idx, int64_t k, const float *vals, const float *W,
                            int64_t ldw, int64_t n_rows, const float *bias, const float *x, int64_t ldx, int64_t m,
                            float *xh, float *e, float *sse, float *out_dots) {
    for (int64_t i = r0 * k; i < r1 * k; i++)
        if (idx[i] < 0 || idx[i] >= n_rows) return -1;
    for (int64_t i = r0 * k; i < r0 * k + AHEAD && i < r1 * k; i++) prefetch_row(W + idx[i] * ldw, m);
    for (int64_t b = r0; b < r1; b++) {
        float *restrict o = xh + b * m, *restrict er = e + b * m;
        const float *restrict xr = x + b * ldx;
        memset(o, 0, sizeof(float) * m);
        for (int64_t j = 0; j < k; j += ROWS_AT_ONCE) {
            const float *rows[ROWS_AT_ONCE];
            int64_t n = k - j < ROWS_AT_ONCE ? k - j : ROWS_AT_ONCE;
            latent_rows(rows, W, ldw, idx, b * k + j, n, AHEAD, r1 * k, m);
            add_rows(o, rows, vals + b * k + j, n, m);
        }
        float s = 0.f;
#pragma omp simd reduction(+ : s)
        for (int64_t c = 0; c < m; c++) {
            float h = bias ? o[c] + bias[c] : o[c];
            o[c] = h;
            float d = h - xr[c];
            er[c] = d;
            s += d * d;
        }
        sse[b] = s;
        for (int64_t j = 0; j < k; j += ROWS_AT_ONCE) {  /* the rows just read: in the cache */
            const float *rows[ROWS_AT_ONCE];
            int64_t n = k - j < ROWS_AT_ONCE ? k - j : ROWS_AT_ONCE;
            latent_rows(rows, W, ldw, idx, b * k + j, n, 0, 0, m);
            dots(er, rows, n, m, out_dots + b * k + j);
        }
    }
    return 0;
}

int sparse_fvu(int64_t r0, int64_t r1, const int64_t *idx, int64_t k, const float *vals, const float *W, int64_t ldw,
               int64_t n_rows, const float *bias, const float *x, int64_t ldx, int64_t m, float *xh, float *e,
               float *sse, float *out_dots) {
    return SPLIT_ROWS(r0, r1, sparse_fvu_range(a, b, idx, k, vals, W, ldw, n_rows, bias, x, ldx, m, xh, e, sse,
                                               out_dots));
}
