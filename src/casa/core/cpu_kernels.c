/* casa's CPU decode kernels: matrix-vector products and few-query attention that stream
 * their operands once, at the bandwidth one core can read (see cpu_kernels.py for why).
 *
 * Built at first use by casa.core.cpu_kernels with the machine's C compiler
 * (-O3 -march=native) and called through ctypes; single-threaded by design.
 * AVX2+FMA paths where the compiler targets them, plain C elsewhere. The fused one-token steps
 * built on these are in cpu_steps.c, which includes this file (the library is built from it).
 *
 * Shape letters: O output rows, I input width, S cached positions, D head width,
 * N queries of one key/value head (grouped heads x new tokens), T new tokens.
 * Weights are fp32 or bf16 (stored as uint16, the upper half of an fp32); caches are the weights'
 * dtype or int8 with an fp32 scale per row and head (`KIND_I8`); every sum is accumulated in fp32.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define CASA_AVX2 1
#endif

static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t f32_to_bf16(float f) {  /* round to nearest even, as PyTorch casts */
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffff) > 0x7f800000) return (uint16_t)((u >> 16) | 0x40);  /* NaN stays NaN */
    u += 0x7fff + ((u >> 16) & 1);
    return (uint16_t)(u >> 16);
}

#ifdef CASA_AVX2
static inline __m256 load8_f32(const float *p) { return _mm256_loadu_ps(p); }
static inline __m256 load8_bf16(const uint16_t *p) {
    __m128i h = _mm_loadu_si128((const __m128i *)p);
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
static inline __m256 load8_i8(const int8_t *p) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)p)));
}
static inline float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
/* e^x for 8 lanes: x = n ln2 + r, |r| <= ln2/2, e^r by a degree-6 polynomial, 2^n through the
 * exponent bits (relative error ~2e-7 over the softmax's range; x < -87 gives 0) */
static inline __m256 exp8(__m256 x) {
    const __m256 lo = _mm256_set1_ps(-87.0f);
    __m256 under = _mm256_cmp_ps(x, lo, _CMP_LT_OQ);
    x = _mm256_max_ps(x, lo);
    __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                               _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693145751953125f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(1.428606765330187045e-06f), r);
    __m256 p = _mm256_set1_ps(1.0f / 720);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 120));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 24));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 6));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
    __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_andnot_ps(under, _mm256_mul_ps(p, _mm256_castsi256_ps(e)));
}
#endif

/* ------------------------------------------------------------ matrix x vector
 * y[b, o] = sum_i W[o, i] x[b, i] (+ bias[o]); W row-major [O, I]. One weight row at a time, front
 * to back: the weights are then one linear stream, which this kind of core prefetches at full
 * speed (measured on an AVX2 EPYC: 22-24 GB/s, as fast as a plain sum; two or four rows read side
 * by side fall to 9-11 GB/s). A weight row's 8-float chunks are loaded once for up to three input
 * rows (a row costs one x load per multiply-add instead of a w and an x load: register blocking),
 * and each input row keeps four independent sums, combined in one fixed order: a row's dot has
 * the same bits whether it is computed alone or beside others (ROWS_DOT for R = 1, 2, 3). */
#ifdef CASA_AVX2
/* one 8-float chunk j of the weight row, for rows r < R; named accumulators (gcc spills arrays) */
#define CHUNK_FMA(LOAD, j, at)                                                                                  \
    {                                                                                                     \
        __m256 wv = LOAD(w + (at));                                                                       \
        a0##j = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x0 + (at)), a0##j);                                   \
        if (rows > 1) a1##j = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x1 + (at)), a1##j);                     \
        if (rows > 2) a2##j = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x2 + (at)), a2##j);                     \
    }
#define ROW_SUM(ELEM, r, xr)                                                                                    \
    {                                                                                                     \
        float v = hsum8(_mm256_add_ps(_mm256_add_ps(_mm256_add_ps(a##r##0, a##r##1), a##r##2), a##r##3)); \
        for (long k = i; k < I; k++) v += ELEM(w[k]) * xr[k];                                             \
        s[r] = v;                                                                                         \
    }
#define ROWS_DOT(NAME, T, LOAD, ELEM, R)                                                                  \
    static inline void NAME(const T *w, const float *const *x, float *s, long I) {                        \
        const int rows = R; /* a constant: the branches on it fold away */                                \
        const float *x0 = x[0], *x1 = x[R > 1 ? 1 : 0], *x2 = x[R > 2 ? 2 : 0];                           \
        __m256 a00 = _mm256_setzero_ps(), a01 = a00, a02 = a00, a03 = a00, a10 = a00, a11 = a00, a12 = a00; \
        __m256 a13 = a00, a20 = a00, a21 = a00, a22 = a00, a23 = a00;                                     \
        long i = 0;                                                                                       \
        for (; i + 32 <= I; i += 32) {                                                                    \
            CHUNK_FMA(LOAD, 0, i) CHUNK_FMA(LOAD, 1, i + 8) CHUNK_FMA(LOAD, 2, i + 16) CHUNK_FMA(LOAD, 3, i + 24)                 \
        }                                                                                                 \
        for (; i + 8 <= I; i += 8) CHUNK_FMA(LOAD, 0, i)                                                        \
        ROW_SUM(ELEM, 0, x0)                                                                              \
        if (rows > 1) ROW_SUM(ELEM, 1, x1)                                                                \
        if (rows > 2) ROW_SUM(ELEM, 2, x2)                                                                \
    }
#else
#define ROWS_DOT(NAME, T, LOAD, ELEM, R)                                                                 \
    static inline void NAME(const T *w, const float *const *x, float *s, long I) {                       \
        for (int r = 0; r < R; r++) {                                                                   \
            float v = 0;                                                                                \
            for (long i = 0; i < I; i++) v += ELEM(w[i]) * x[r][i];                                     \
            s[r] = v;                                                                                   \
        }                                                                                               \
    }
#endif

#define F32(v) (v)
#define BF16(v) bf16_to_f32(v)
#define I8(v) ((float)(v))

enum { KIND_F32, KIND_BF16, KIND_I8 };  /* a cache's stored element */

ROWS_DOT(dots1_f32, float, load8_f32, F32, 1)
ROWS_DOT(dots2_f32, float, load8_f32, F32, 2)
ROWS_DOT(dots3_f32, float, load8_f32, F32, 3)
ROWS_DOT(dots1_bf16, uint16_t, load8_bf16, BF16, 1)
ROWS_DOT(dots2_bf16, uint16_t, load8_bf16, BF16, 2)
ROWS_DOT(dots3_bf16, uint16_t, load8_bf16, BF16, 3)

/* s[r] = w . x[r] for R <= 3 rows */
static inline void dots(const void *w, int bf16, const float *const *x, float *s, long R, long I) {
    if (bf16) {
        if (R == 3) dots3_bf16(w, x, s, I);
        else if (R == 2) dots2_bf16(w, x, s, I);
        else dots1_bf16(w, x, s, I);
    } else {
        if (R == 3) dots3_f32(w, x, s, I);
        else if (R == 2) dots2_f32(w, x, s, I);
        else dots1_f32(w, x, s, I);
    }
}

/* The kernels' threads: `casa_set_threads` (casa.core.cpu_kernels.set_threads), 1 by default. Work
 * is split where it changes no sum: output rows of a product, heads of an attention; so every
 * thread count gives the same bits. */
static int n_threads = 1;

void casa_set_threads(int n) { n_threads = n < 1 ? 1 : n; }
int casa_get_threads(void) { return n_threads; }
int casa_openmp(void) {
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
}

/* Y[b, o] = W[o, :] . X[b, :] (+ bias[o]) for B rows (rows of X `ldx` apart, of Y `ldy` apart): each
 * weight row is read from memory once for all B rows (it stays in L1 while their dots read it),
 * and each dot sums in ROWS_DOT's order, so a row's outputs have the bits it gets alone (B = 1).
 * Output rows are split over the threads in contiguous runs: each still one linear stream. */
static void gemm_rows(const void *W, int bf16, const float *X, long ldx, const float *bias, float *Y, long ldy,
                      long O, long I, long B) {
#ifdef _OPENMP
#pragma omp parallel for num_threads(n_threads) schedule(static) if (n_threads > 1 && O * I * B >= 65536)
#endif
    for (long o = 0; o < O; o++) {
        const void *w = bf16 ? (const void *)((const uint16_t *)W + o * I) : (const void *)((const float *)W + o * I);
        for (long b = 0; b < B; b += 3) {  /* input rows three at a time (the rest: two, one) */
            long R = B - b < 3 ? B - b : 3;
            const float *x[3] = {X + b * ldx, X + (b + (R > 1)) * ldx, X + (b + 2 * (R > 2)) * ldx};
            float s[3];
            dots(w, bf16, x, s, R, I);
            for (long r = 0; r < R; r++) Y[(b + r) * ldy + o] = bias ? s[r] + bias[o] : s[r];
        }
    }
}

void casa_gemv_f32(const float *W, const float *x, const float *b, float *y, long O, long I) {
    gemm_rows(W, 0, x, I, b, y, O, O, I, 1);
}

void casa_gemv_bf16(const uint16_t *W, const float *x, const float *b, float *y, long O, long I) {
    gemm_rows(W, 1, x, I, b, y, O, O, I, 1);
}

/* the B-row product's entry points: X [B, I] fp32, Y [B, O] fp32 */
void casa_gemm_rows_f32(const float *W, const float *X, const float *b, float *Y, long O, long I, long B) {
    gemm_rows(W, 0, X, I, b, Y, O, O, I, B);
}

void casa_gemm_rows_bf16(const uint16_t *W, const float *X, const float *b, float *Y, long O, long I, long B) {
    gemm_rows(W, 1, X, I, b, Y, O, O, I, B);
}

/* ------------------------------------------------------- few-query attention
 * One key/value head: out[n] = softmax_s(scale q[n].k[s], masked) . v[s].
 * q [N, D] fp32; k, v [S, D] rows `ld` elements apart; mask [T, S] bytes (1 = attend) or NULL,
 * query n uses mask row n % T; scores: scratch [N, S]; out [N, D] fp32.
 * The cache is read in chunks of CHUNK rows (8 KB at D = 64, fp32): a chunk comes from memory
 * once and serves all N queries from L1, so each pass (scores, then values) streams the cache
 * once. bf16 rows are widened to fp32 in registers. A query that sees no key gets zeros. */
#define CHUNK 32
#define DMAX 256

/* dst[s, :] = src[s, :] as fp32 for rows 0..rows-1 (src rows `ld` apart); returns dst, rows D apart */
static const float *widen_bf16(float *dst, const uint16_t *src, long rows, long D, long ld) {
    for (long s = 0; s < rows; s++) {
        long d = 0;
#ifdef CASA_AVX2
        for (; d + 8 <= D; d += 8) _mm256_storeu_ps(dst + s * D + d, load8_bf16(src + s * ld + d));
#endif
        for (; d < D; d++) dst[s * D + d] = bf16_to_f32(src[s * ld + d]);
    }
    return dst;
}

#ifdef CASA_AVX2
/* the lane-sums of a[0..3], as 4 floats */
static inline __m128 hsum4x8(__m256 a0, __m256 a1, __m256 a2, __m256 a3) {
    __m256 u = _mm256_hadd_ps(_mm256_hadd_ps(a0, a1), _mm256_hadd_ps(a2, a3));
    return _mm_add_ps(_mm256_castps256_ps128(u), _mm256_extractf128_ps(u, 1));
}
#endif

/* The two passes are written once, for either cache dtype: T the stored element, LOAD8 eight of
 * them as fp32 lanes, ELEM one (bf16 rows are widened in registers, exactly: no copy). */

/* scores[n * S + s] = q[n] . k[s] for n < N, s < rows (q rows D apart, k rows `ld` apart).
 * Register-blocked, two queries x four keys at a time: each loaded key vector serves two queries
 * and each query vector four keys, so the loads stay under the FMAs (one query at a time is
 * load-bound at about half the FMA rate, and the cache pass is then compute-bound). */
#ifdef CASA_AVX2
#define DOTS_AVX2(T, LOAD8)                                                                                   \
    if (D % 8 == 0) {                                                                                     \
        for (; n + 2 <= N; n += 2) {                                                                      \
            const float *q0 = q + n * D, *q1 = q0 + D;                                                    \
            long s = 0;                                                                                   \
            for (; s + 4 <= rows; s += 4) {                                                               \
                const T *k0 = k + s * ld, *k1 = k0 + ld, *k2 = k1 + ld, *k3 = k2 + ld;                    \
                __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, b0 = a0, b1 = a0, b2 = a0, b3 = a0; \
                for (long d = 0; d < D; d += 8) {                                                         \
                    __m256 x0 = LOAD8(k0 + d), x1 = LOAD8(k1 + d), x2 = LOAD8(k2 + d), x3 = LOAD8(k3 + d);  \
                    __m256 qa = _mm256_loadu_ps(q0 + d);                                                  \
                    a0 = _mm256_fmadd_ps(qa, x0, a0); a1 = _mm256_fmadd_ps(qa, x1, a1);                   \
                    a2 = _mm256_fmadd_ps(qa, x2, a2); a3 = _mm256_fmadd_ps(qa, x3, a3);                   \
                    __m256 qb = _mm256_loadu_ps(q1 + d);                                                  \
                    b0 = _mm256_fmadd_ps(qb, x0, b0); b1 = _mm256_fmadd_ps(qb, x1, b1);                   \
                    b2 = _mm256_fmadd_ps(qb, x2, b2); b3 = _mm256_fmadd_ps(qb, x3, b3);                   \
                }                                                                                         \
                _mm_storeu_ps(scores + n * S + s, hsum4x8(a0, a1, a2, a3));                               \
                _mm_storeu_ps(scores + (n + 1) * S + s, hsum4x8(b0, b1, b2, b3));                         \
            }                                                                                             \
            for (; s < rows; s++) {                                                                       \
                __m256 a = _mm256_setzero_ps(), b = a;                                                    \
                for (long d = 0; d < D; d += 8) {                                                         \
                    __m256 x = LOAD8(k + s * ld + d);                                                     \
                    a = _mm256_fmadd_ps(_mm256_loadu_ps(q0 + d), x, a);                                   \
                    b = _mm256_fmadd_ps(_mm256_loadu_ps(q1 + d), x, b);                                   \
                }                                                                                         \
                scores[n * S + s] = hsum8(a);                                                             \
                scores[(n + 1) * S + s] = hsum8(b);                                                       \
            }                                                                                             \
        }                                                                                                 \
    }
#else
#define DOTS_AVX2(T, LOAD8)
#endif
#define DOTS(NAME, T, LOAD8, ELEM)                                                                        \
    static void NAME(const float *q, long N, const T *k, long rows, long D, long ld, float *scores, long S) { \
        long n = 0;                                                                                       \
        DOTS_AVX2(T, LOAD8)                                                                               \
        for (; n < N; n++)                                                                                \
            for (long s = 0; s < rows; s++) {                                                             \
                float dot = 0;                                                                            \
                for (long d = 0; d < D; d++) dot += q[n * D + d] * ELEM(k[s * ld + d]);                   \
                scores[n * S + s] = dot;                                                                  \
            }                                                                                             \
    }

/* out[n] += sum_s p[n * S + s] v[s] for n < N, s < rows (v rows `ld` apart, out rows D apart).
 * Register-blocked, two queries x 32 outputs held across the chunk: each loaded value vector
 * serves two queries. */
#ifdef CASA_AVX2
#define WEIGHTED_SUM_AVX2(T, LOAD8)                                                                       \
    if (D % 32 == 0) {                                                                                    \
        for (; n + 2 <= N; n += 2) {                                                                      \
            const float *p0 = p + n * S, *p1 = p0 + S;                                                    \
            float *o0 = out + n * D, *o1 = o0 + D;                                                        \
            for (long d = 0; d < D; d += 32) {                                                            \
                __m256 a0 = _mm256_loadu_ps(o0 + d), a1 = _mm256_loadu_ps(o0 + d + 8);                   \
                __m256 a2 = _mm256_loadu_ps(o0 + d + 16), a3 = _mm256_loadu_ps(o0 + d + 24);              \
                __m256 b0 = _mm256_loadu_ps(o1 + d), b1 = _mm256_loadu_ps(o1 + d + 8);                    \
                __m256 b2 = _mm256_loadu_ps(o1 + d + 16), b3 = _mm256_loadu_ps(o1 + d + 24);              \
                for (long s = 0; s < rows; s++) {                                                         \
                    const T *vs = v + s * ld + d;                                                         \
                    __m256 x0 = LOAD8(vs), x1 = LOAD8(vs + 8), x2 = LOAD8(vs + 16), x3 = LOAD8(vs + 24);  \
                    __m256 pa = _mm256_set1_ps(p0[s]);                                                    \
                    a0 = _mm256_fmadd_ps(pa, x0, a0); a1 = _mm256_fmadd_ps(pa, x1, a1);                   \
                    a2 = _mm256_fmadd_ps(pa, x2, a2); a3 = _mm256_fmadd_ps(pa, x3, a3);                   \
                    __m256 pb = _mm256_set1_ps(p1[s]);                                                    \
                    b0 = _mm256_fmadd_ps(pb, x0, b0); b1 = _mm256_fmadd_ps(pb, x1, b1);                   \
                    b2 = _mm256_fmadd_ps(pb, x2, b2); b3 = _mm256_fmadd_ps(pb, x3, b3);                   \
                }                                                                                         \
                _mm256_storeu_ps(o0 + d, a0); _mm256_storeu_ps(o0 + d + 8, a1);                           \
                _mm256_storeu_ps(o0 + d + 16, a2); _mm256_storeu_ps(o0 + d + 24, a3);                     \
                _mm256_storeu_ps(o1 + d, b0); _mm256_storeu_ps(o1 + d + 8, b1);                           \
                _mm256_storeu_ps(o1 + d + 16, b2); _mm256_storeu_ps(o1 + d + 24, b3);                     \
            }                                                                                             \
        }                                                                                                 \
    }
#else
#define WEIGHTED_SUM_AVX2(T, LOAD8)
#endif
#define WEIGHTED_SUM(NAME, T, LOAD8, ELEM)                                                                \
    static void NAME(const float *p, long N, const T *v, long rows, long D, long ld, float *out, long S) { \
        long n = 0;                                                                                       \
        WEIGHTED_SUM_AVX2(T, LOAD8)                                                                       \
        for (; n < N; n++)                                                                                \
            for (long s = 0; s < rows; s++)                                                               \
                for (long d = 0; d < D; d++) out[n * D + d] += p[n * S + s] * ELEM(v[s * ld + d]);        \
    }

DOTS(dots_f32, float, load8_f32, F32)
DOTS(dots_bf16, uint16_t, load8_bf16, BF16)
DOTS(dots_i8, int8_t, load8_i8, I8)
WEIGHTED_SUM(weighted_sum_f32, float, load8_f32, F32)
WEIGHTED_SUM(weighted_sum_bf16, uint16_t, load8_bf16, BF16)
WEIGHTED_SUM(weighted_sum_i8, int8_t, load8_i8, I8)

/* row <- softmax(row), in place; an all-masked row becomes zeros */
static void softmax_row(float *row, long S) {
    float mx = -INFINITY;
    long s = 0;
#ifdef CASA_AVX2
    __m256 m8 = _mm256_set1_ps(-INFINITY);
    for (; s + 8 <= S; s += 8) m8 = _mm256_max_ps(m8, _mm256_loadu_ps(row + s));
    float lanes[8];
    _mm256_storeu_ps(lanes, m8);
    for (int j = 0; j < 8; j++) mx = lanes[j] > mx ? lanes[j] : mx;
#endif
    for (; s < S; s++) mx = row[s] > mx ? row[s] : mx;
    if (mx == -INFINITY) {
        memset(row, 0, sizeof(float) * S);
        return;
    }
    float sum = 0;
    s = 0;
#ifdef CASA_AVX2
    __m256 m = _mm256_set1_ps(mx), acc = _mm256_setzero_ps();
    for (; s + 8 <= S; s += 8) {
        __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(row + s), m));
        _mm256_storeu_ps(row + s, e);
        acc = _mm256_add_ps(acc, e);
    }
    sum = hsum8(acc);
#endif
    for (; s < S; s++) {
        row[s] = expf(row[s] - mx);
        sum += row[s];
    }
    float inv = 1.0f / sum;
    s = 0;
#ifdef CASA_AVX2
    __m256 inv8 = _mm256_set1_ps(inv);
    for (; s + 8 <= S; s += 8) _mm256_storeu_ps(row + s, _mm256_mul_ps(_mm256_loadu_ps(row + s), inv8));
#endif
    for (; s < S; s++) row[s] *= inv;
}

/* An int8 cache holds round(x / s) with s = max|x| / 127 per row and head (`quantize_row`); its
 * scales fold into the passes: a score is s_k[s] (q . k_int[s]), a value weight p[s] s_v[s]. */
static void attend(const float *q, const void *k, const void *v, int kind, const float *ksc, const float *vsc,
                   const uint8_t *mask, float *scores, float *out, long N, long T, long S, long D, long ld,
                   float scale) {
    float *qs = malloc(sizeof(float) * N * D);  /* the queries times the scale: one multiply per query element */
    for (long i = 0; i < N * D; i++) qs[i] = q[i] * scale;
    for (long s0 = 0; s0 < S; s0 += CHUNK) {
        long rows = S - s0 < CHUNK ? S - s0 : CHUNK;
        if (kind == KIND_BF16)
            dots_bf16(qs, N, (const uint16_t *)k + s0 * ld, rows, D, ld, scores + s0, S);
        else if (kind == KIND_I8)
            dots_i8(qs, N, (const int8_t *)k + s0 * ld, rows, D, ld, scores + s0, S);
        else
            dots_f32(qs, N, (const float *)k + s0 * ld, rows, D, ld, scores + s0, S);
        for (long n = 0; n < N; n++) {
            float *sc = scores + n * S + s0;
            if (kind == KIND_I8)
                for (long s = 0; s < rows; s++) sc[s] *= ksc[s0 + s];
            if (mask) {
                const uint8_t *mrow = mask + (n % T) * S + s0;
                for (long s = 0; s < rows; s++)
                    if (!mrow[s]) sc[s] = -INFINITY;
            }
        }
    }
    free(qs);
    for (long n = 0; n < N; n++) {
        softmax_row(scores + n * S, S);
        if (kind == KIND_I8)
            for (long s = 0; s < S; s++) scores[n * S + s] *= vsc[s];
    }
    memset(out, 0, sizeof(float) * N * D);
    for (long s0 = 0; s0 < S; s0 += CHUNK) {
        long rows = S - s0 < CHUNK ? S - s0 : CHUNK;
        if (kind == KIND_BF16)
            weighted_sum_bf16(scores + s0, N, (const uint16_t *)v + s0 * ld, rows, D, ld, out, S);
        else if (kind == KIND_I8)
            weighted_sum_i8(scores + s0, N, (const int8_t *)v + s0 * ld, rows, D, ld, out, S);
        else
            weighted_sum_f32(scores + s0, N, (const float *)v + s0 * ld, rows, D, ld, out, S);
    }
}

/* the entry points: Hkv heads, q/out [Hkv, N, D] contiguous, k/v heads `hs` elements apart (int8:
 * their scales [S] per head, heads `ss` apart); D <= DMAX (checked by the caller) */
void casa_attend_f32(const float *q, const float *k, const float *v, const uint8_t *mask, float *scores,
                     float *out, long Hkv, long N, long T, long S, long D, long ld, long hs, float scale) {
    for (long h = 0; h < Hkv; h++)
        attend(q + h * N * D, k + h * hs, v + h * hs, KIND_F32, NULL, NULL, mask, scores, out + h * N * D, N, T, S,
               D, ld, scale);
}
void casa_attend_bf16(const float *q, const uint16_t *k, const uint16_t *v, const uint8_t *mask, float *scores,
                      float *out, long Hkv, long N, long T, long S, long D, long ld, long hs, float scale) {
    for (long h = 0; h < Hkv; h++)
        attend(q + h * N * D, k + h * hs, v + h * hs, KIND_BF16, NULL, NULL, mask, scores, out + h * N * D, N, T, S,
               D, ld, scale);
}
void casa_attend_i8(const float *q, const int8_t *k, const int8_t *v, const float *ksc, const float *vsc, long ss,
                    const uint8_t *mask, float *scores, float *out, long Hkv, long N, long T, long S, long D, long ld,
                    long hs, float scale) {
    for (long h = 0; h < Hkv; h++)
        attend(q + h * N * D, k + h * hs, v + h * hs, KIND_I8, ksc + h * ss, vsc + h * ss, mask, scores,
               out + h * N * D, N, T, S, D, ld, scale);
}

/* x [D] -> out [D] int8 and its scale: s = max|x| / 127, out = round_half_even(x / s) (all zeros
 * when s = 0), as casa.inference.cache.quantize computes it */
static void quantize_row(const float *x, int8_t *out, float *s_out, long D) {
    float amax = 0;
    long d = 0;
#ifdef CASA_AVX2
    const __m256 sign = _mm256_set1_ps(-0.0f);
    __m256 m8 = _mm256_setzero_ps();
    for (; d + 8 <= D; d += 8) m8 = _mm256_max_ps(m8, _mm256_andnot_ps(sign, _mm256_loadu_ps(x + d)));
    float lanes[8];
    _mm256_storeu_ps(lanes, m8);
    for (int j = 0; j < 8; j++) amax = lanes[j] > amax ? lanes[j] : amax;
#endif
    for (; d < D; d++) amax = fabsf(x[d]) > amax ? fabsf(x[d]) : amax;
    float s = amax / 127.0f, div = s > 0 ? s : 1.0f;
    d = 0;
#ifdef CASA_AVX2  /* the same IEEE division and round-half-even, eight at a time */
    const __m256 div8 = _mm256_set1_ps(div), hi = _mm256_set1_ps(127.0f), lo = _mm256_set1_ps(-127.0f);
    for (; d + 8 <= D; d += 8) {
        __m256 r = _mm256_round_ps(_mm256_div_ps(_mm256_loadu_ps(x + d), div8),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        __m256i i32 = _mm256_cvtps_epi32(_mm256_max_ps(_mm256_min_ps(r, hi), lo));
        __m128i i16 = _mm_packs_epi32(_mm256_castsi256_si128(i32), _mm256_extracti128_si256(i32, 1));
        _mm_storel_epi64((__m128i *)(out + d), _mm_packs_epi16(i16, i16));
    }
#endif
    for (; d < D; d++) {
        float r = nearbyintf(x[d] / div);
        out[d] = (int8_t)(r > 127 ? 127 : r < -127 ? -127 : r);
    }
    *s_out = s;
}

/* rows of x [rows, D] (fp32) -> q [rows, D] int8 and scale [rows] (quantize_row each) */
void casa_quantize(const float *x, int8_t *q, float *scale, long rows, long D) {
    for (long r = 0; r < rows; r++) quantize_row(x + r * D, q + r * D, scale + r, D);
}

/* -------------------------------------------------------------------- SwiGLU
 * y = down(silu(gate(x)) * up(x)) for one row: W_gu [2F, I] (the gate's rows, then the up
 * projection's), W_d [O, F]; h: scratch [2F]. bf16 rounds where PyTorch's bf16 ops do (each
 * projection's output, silu, the product). */
static void silu_mul(float *h, long F, int bf16) {
    long f = 0;
#ifdef CASA_AVX2
    if (!bf16) {
        const __m256 one = _mm256_set1_ps(1.0f), hi = _mm256_set1_ps(88.0f);
        for (; f + 8 <= F; f += 8) {
            __m256 g = _mm256_loadu_ps(h + f);
            __m256 e = exp8(_mm256_min_ps(_mm256_sub_ps(_mm256_setzero_ps(), g), hi));
            __m256 sg = _mm256_div_ps(g, _mm256_add_ps(one, e));
            _mm256_storeu_ps(h + f, _mm256_mul_ps(sg, _mm256_loadu_ps(h + F + f)));
        }
    }
#endif
    for (; f < F; f++) {
        float g = h[f], u = h[F + f];
        if (bf16) {
            g = bf16_to_f32(f32_to_bf16(g));
            u = bf16_to_f32(f32_to_bf16(u));
            float sg = bf16_to_f32(f32_to_bf16(g / (1.0f + expf(-g))));
            h[f] = bf16_to_f32(f32_to_bf16(sg * u));
        } else {
            h[f] = g / (1.0f + expf(-g)) * u;
        }
    }
}

void casa_swiglu_f32(const float *Wgu, const float *Wd, const float *x, float *h, float *y, long I, long F, long O) {
    casa_gemv_f32(Wgu, x, NULL, h, 2 * F, I);
    silu_mul(h, F, 0);
    casa_gemv_f32(Wd, h, NULL, y, O, F);
}

void casa_swiglu_bf16(const uint16_t *Wgu, const uint16_t *Wd, const float *x, float *h, float *y, long I, long F,
                      long O) {
    casa_gemv_bf16(Wgu, x, NULL, h, 2 * F, I);
    silu_mul(h, F, 1);
    casa_gemv_bf16(Wd, h, NULL, y, O, F);
}

/* ------------------------------------------------------------------ RMS norm
 * out = w * (x / sqrt(mean(x^2) + eps)) over rows of width I, as casa.core.lm.RMSNorm computes it:
 * normalized in fp32, rounded to the operands' dtype, then scaled by w in that dtype. */

static inline void round_bf16(float *x, long n) {
    for (long i = 0; i < n; i++) x[i] = bf16_to_f32(f32_to_bf16(x[i]));
}

static float inv_rms(const float *x, long I, float eps) {
    double ss = 0;
    for (long i = 0; i < I; i++) ss += (double)x[i] * x[i];
    return 1.0f / sqrtf((float)(ss / I) + eps);
}

/* x = rmsnorm(h) of one row as fp32 values (bf16 operands: the rounded bf16 result, widened);
 * the one home of the norm's arithmetic, for the per-op kernels and the fused steps */
static void norm_row(const void *h, const void *w, int bf16, float *x, long I, float eps) {
    if (bf16) {
        const uint16_t *hb = h, *wb = w;
        for (long i = 0; i < I; i++) x[i] = bf16_to_f32(hb[i]);
        float inv = inv_rms(x, I, eps);
        for (long i = 0; i < I; i++)
            x[i] = bf16_to_f32(f32_to_bf16(bf16_to_f32(wb[i]) * bf16_to_f32(f32_to_bf16(x[i] * inv))));
    } else {
        const float *hf = h, *wf = w;
        float inv = inv_rms(hf, I, eps);
        for (long i = 0; i < I; i++) x[i] = wf[i] * (hf[i] * inv);
    }
}

void casa_rmsnorm_f32(const float *x, const float *w, float *out, long rows, long I, float eps) {
    for (long r = 0; r < rows; r++, x += I, out += I) norm_row(x, w, 0, out, I, eps);
}

void casa_rmsnorm_bf16(const uint16_t *x, const uint16_t *w, uint16_t *out, long rows, long I, float eps) {
    float row[DMAX * 64];  /* widths up to 16384 */
    for (long r = 0; r < rows; r++, x += I, out += I) {
        norm_row(x, w, 1, row, I, eps);
        for (long i = 0; i < I; i++) out[i] = f32_to_bf16(row[i]);  /* exact: already rounded */
    }
}

/* ---------------------------------------------------------------------- RoPE
 * out[h, i] = x[h, i] cos[i] + x[h, (i + D/2) % D] ssin[i] for H heads of width D (ssin = [-sin,
 * sin]): casa.core.lm.Rotary.apply's three ops, with its roundings (each product, then the sum,
 * rounded to the operands' dtype). */

/* the rotation of H heads of width D, in place on fp32 values (tables in the operands' dtype) */
static void rope_rows(float *x, const void *cos, const void *ssin, int bf16, long H, long D) {
    float row[DMAX];
    long half = D / 2;
    for (long h = 0; h < H; h++, x += D) {
        memcpy(row, x, sizeof(float) * D);
        for (long i = 0; i < D; i++) {
            float c = bf16 ? bf16_to_f32(((const uint16_t *)cos)[i]) : ((const float *)cos)[i];
            float s = bf16 ? bf16_to_f32(((const uint16_t *)ssin)[i]) : ((const float *)ssin)[i];
            float a = row[i] * c, b = row[(i + half) % D] * s;
            if (bf16) a = bf16_to_f32(f32_to_bf16(a)), b = bf16_to_f32(f32_to_bf16(b));
            x[i] = bf16 ? bf16_to_f32(f32_to_bf16(a + b)) : a + b;
        }
    }
}

/* the per-op entry points: x's heads `xs` elements apart, out contiguous */
void casa_rope_f32(const float *x, const float *cos, const float *ssin, float *out, long H, long D, long xs) {
    for (long h = 0; h < H; h++) memcpy(out + h * D, x + h * xs, sizeof(float) * D);
    rope_rows(out, cos, ssin, 0, H, D);
}

void casa_rope_bf16(const uint16_t *x, const uint16_t *cos, const uint16_t *ssin, uint16_t *out, long H, long D,
                    long xs) {
    float row[DMAX];
    for (long h = 0; h < H; h++, x += xs, out += D) {
        for (long i = 0; i < D; i++) row[i] = bf16_to_f32(x[i]);
        rope_rows(row, cos, ssin, 1, 1, D);
        for (long i = 0; i < D; i++) out[i] = f32_to_bf16(row[i]);  /* exact: already rounded */
    }
}
