/* casa's CPU decode kernels: matrix-vector products and few-query attention that stream
 * their operands once, at the bandwidth one core can read (see cpu_kernels.py for why).
 *
 * Built at first use by casa.core.cpu_kernels with the machine's C compiler
 * (-O3 -march=native) and called through ctypes; single-threaded by design.
 * AVX2+FMA paths where the compiler targets them, plain C elsewhere.
 *
 * Shape letters: O output rows, I input width, S cached positions, D head width,
 * N queries of one key/value head (grouped heads x new tokens), T new tokens.
 * Weights and caches are fp32 or bf16 (stored as uint16, the upper half of an fp32);
 * every sum is accumulated in fp32.
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

#ifdef CASA_AVX2
static inline __m256 load8_f32(const float *p) { return _mm256_loadu_ps(p); }
static inline __m256 load8_bf16(const uint16_t *p) {
    __m128i h = _mm_loadu_si128((const __m128i *)p);
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
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
 * y[o] = sum_i W[o, i] x[i] (+ b[o]); W row-major [O, I]. Four rows at a time, so that x is
 * read from L1 once per four rows and each row is one forward stream. */
#define GEMV_BODY(LOAD, ELEM)                                                                     \
    long o = 0;                                                                                   \
    for (; o + 4 <= O; o += 4) {                                                                  \
        const TYPE *w0 = W + o * I, *w1 = w0 + I, *w2 = w1 + I, *w3 = w2 + I;                     \
        float s0 = 0, s1 = 0, s2 = 0, s3 = 0;                                                     \
        long i = 0;                                                                               \
        VEC_BLOCK4(LOAD)                                                                          \
        for (; i < I; i++) {                                                                      \
            float xi = x[i];                                                                      \
            s0 += ELEM(w0[i]) * xi; s1 += ELEM(w1[i]) * xi;                                       \
            s2 += ELEM(w2[i]) * xi; s3 += ELEM(w3[i]) * xi;                                       \
        }                                                                                         \
        y[o] = s0; y[o + 1] = s1; y[o + 2] = s2; y[o + 3] = s3;                                   \
    }                                                                                             \
    for (; o < O; o++) {                                                                          \
        const TYPE *w = W + o * I;                                                                \
        float s = 0;                                                                              \
        for (long i = 0; i < I; i++) s += ELEM(w[i]) * x[i];                                      \
        y[o] = s;                                                                                 \
    }                                                                                             \
    if (b)                                                                                        \
        for (long j = 0; j < O; j++) y[j] += b[j];

#ifdef CASA_AVX2
#define VEC_BLOCK4(LOAD)                                                                          \
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;                                   \
    for (; i + 8 <= I; i += 8) {                                                                  \
        __m256 xv = _mm256_loadu_ps(x + i);                                                       \
        a0 = _mm256_fmadd_ps(LOAD(w0 + i), xv, a0); a1 = _mm256_fmadd_ps(LOAD(w1 + i), xv, a1);   \
        a2 = _mm256_fmadd_ps(LOAD(w2 + i), xv, a2); a3 = _mm256_fmadd_ps(LOAD(w3 + i), xv, a3);   \
    }                                                                                             \
    s0 = hsum8(a0); s1 = hsum8(a1); s2 = hsum8(a2); s3 = hsum8(a3);
#else
#define VEC_BLOCK4(LOAD)
#endif

#define F32(v) (v)
#define BF16(v) bf16_to_f32(v)

#define TYPE float
void casa_gemv_f32(const float *W, const float *x, const float *b, float *y, long O, long I) {
    GEMV_BODY(load8_f32, F32)
}
#undef TYPE
#define TYPE uint16_t
void casa_gemv_bf16(const uint16_t *W, const float *x, const float *b, float *y, long O, long I) {
    GEMV_BODY(load8_bf16, BF16)
}
#undef TYPE

/* ------------------------------------------------------- few-query attention
 * One key/value head: out[n] = softmax_s(scale q[n].k[s], masked) . v[s].
 * q [N, D] fp32; k, v [S, D] rows `ld` elements apart; mask [T, S] bytes (1 = attend) or NULL,
 * query n uses mask row n % T; scores: scratch [N, S]; out [N, D] fp32.
 * The cache is read in chunks of CHUNK rows (8 KB at D = 64, fp32): a chunk comes from memory
 * once and serves all N queries from L1, so each pass (scores, then values) streams the cache
 * once. bf16 chunks are widened to fp32 first. A query that sees no key gets zeros. */
#define CHUNK 32
#define DMAX 256

#ifdef CASA_AVX2
/* the 8 lane-sums of a[0..7], as one vector */
static inline __m256 hsum8x8(const __m256 *a) {
    __m256 u0 = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
    __m256 u1 = _mm256_hadd_ps(_mm256_hadd_ps(a[4], a[5]), _mm256_hadd_ps(a[6], a[7]));
    return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
}
#endif

/* dst[s, :] = src[s, :] as fp32 for rows 0..rows-1 (src rows `ld` apart); returns dst, rows D apart */
static const float *widen_bf16(float *dst, const uint16_t *src, long rows, long D, long ld) {
    for (long s = 0; s < rows; s++)
        for (long d = 0; d < D; d++) dst[s * D + d] = bf16_to_f32(src[s * ld + d]);
    return dst;
}

/* scores[s] = q . k[s] for s < rows (k rows `ld` apart) */
static void dots(const float *q, const float *k, long rows, long D, long ld, float *scores) {
    long s = 0;
#ifdef CASA_AVX2
    if (D % 8 == 0) {
        for (; s + 8 <= rows; s += 8) {
            __m256 acc[8];
            for (int j = 0; j < 8; j++) acc[j] = _mm256_setzero_ps();
            for (long d = 0; d < D; d += 8) {
                __m256 qv = _mm256_loadu_ps(q + d);
                for (int j = 0; j < 8; j++) acc[j] = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k + (s + j) * ld + d), acc[j]);
            }
            _mm256_storeu_ps(scores + s, hsum8x8(acc));
        }
    }
#endif
    for (; s < rows; s++) {
        float dot = 0;
        for (long d = 0; d < D; d++) dot += q[d] * k[s * ld + d];
        scores[s] = dot;
    }
}

/* out += sum_s p[s] v[s] for s < rows (v rows `ld` apart) */
static void weighted_sum(const float *p, const float *v, long rows, long D, long ld, float *out) {
    long d0 = 0;
#ifdef CASA_AVX2
    for (; d0 + 64 <= D; d0 += 64) {  /* 64 outputs held in 8 registers across the chunk */
        __m256 acc[8];
        for (int j = 0; j < 8; j++) acc[j] = _mm256_loadu_ps(out + d0 + 8 * j);
        for (long s = 0; s < rows; s++) {
            __m256 pv = _mm256_set1_ps(p[s]);
            const float *vs = v + s * ld + d0;
            for (int j = 0; j < 8; j++) acc[j] = _mm256_fmadd_ps(pv, _mm256_loadu_ps(vs + 8 * j), acc[j]);
        }
        for (int j = 0; j < 8; j++) _mm256_storeu_ps(out + d0 + 8 * j, acc[j]);
    }
#endif
    for (long s = 0; s < rows; s++)
        for (long d = d0; d < D; d++) out[d] += p[s] * v[s * ld + d];
}

/* row <- softmax(row), in place; an all-masked row becomes zeros */
static void softmax_row(float *row, long S) {
    float mx = -INFINITY;
    for (long s = 0; s < S; s++) mx = row[s] > mx ? row[s] : mx;
    if (mx == -INFINITY) {
        memset(row, 0, sizeof(float) * S);
        return;
    }
    float sum = 0;
    long s = 0;
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
    for (s = 0; s < S; s++) row[s] *= inv;
}

static void attend(const float *q, const void *k, const void *v, int bf16, const uint8_t *mask, float *scores,
                   float *out, long N, long T, long S, long D, long ld, float scale) {
    float buf[CHUNK * DMAX];
    for (long s0 = 0; s0 < S; s0 += CHUNK) {
        long rows = S - s0 < CHUNK ? S - s0 : CHUNK, cld = ld;
        const float *kc;
        if (bf16) {
            kc = widen_bf16(buf, (const uint16_t *)k + s0 * ld, rows, D, ld);
            cld = D;
        } else {
            kc = (const float *)k + s0 * ld;
        }
        for (long n = 0; n < N; n++) {
            float *sc = scores + n * S + s0;
            dots(q + n * D, kc, rows, D, cld, sc);
            const uint8_t *mrow = mask ? mask + (n % T) * S + s0 : NULL;
            for (long s = 0; s < rows; s++) sc[s] = (mrow && !mrow[s]) ? -INFINITY : sc[s] * scale;
        }
    }
    for (long n = 0; n < N; n++) softmax_row(scores + n * S, S);
    memset(out, 0, sizeof(float) * N * D);
    for (long s0 = 0; s0 < S; s0 += CHUNK) {
        long rows = S - s0 < CHUNK ? S - s0 : CHUNK, cld = ld;
        const float *vc;
        if (bf16) {
            vc = widen_bf16(buf, (const uint16_t *)v + s0 * ld, rows, D, ld);
            cld = D;
        } else {
            vc = (const float *)v + s0 * ld;
        }
        for (long n = 0; n < N; n++) weighted_sum(scores + n * S + s0, vc, rows, D, cld, out + n * D);
    }
}

/* the entry points; D <= DMAX (checked by the caller) */
void casa_attend_f32(const float *q, const float *k, const float *v, const uint8_t *mask, float *scores,
                     float *out, long N, long T, long S, long D, long ld, float scale) {
    attend(q, k, v, 0, mask, scores, out, N, T, S, D, ld, scale);
}
void casa_attend_bf16(const float *q, const uint16_t *k, const uint16_t *v, const uint8_t *mask, float *scores,
                      float *out, long N, long T, long S, long D, long ld, float scale) {
    attend(q, k, v, 1, mask, scores, out, N, T, S, D, ld, scale);
}

int casa_kernels_avx2(void) {
#ifdef CASA_AVX2
    return 1;
#else
    return 0;
#endif
}
