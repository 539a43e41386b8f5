/* casa's fused one-token CPU steps: decoded tokens' attention sublayer, feed-forward and whole
 * decoder block, each in one call for one stream or several at once, built on the primitives
 * of cpu_kernels.c.
 *
 * The library is this file compiled alone (casa.core.cpu_kernels builds it): cpu_kernels.c is
 * included, so that the two form one translation unit and the primitives stay `static`, private
 * to the library and inlinable into the steps.
 */
#include "cpu_kernels.c"

/* ------------------------------------------------------ fused one-token steps
 * A decoded token's attention sublayer (or feed-forward) in one call, so that the dozen small
 * ops between the projections do not each pay Python's and the dispatcher's overhead. Every
 * intermediate is an fp32 buffer, rounded to bf16 (bf16 operands) where PyTorch's per-op path
 * rounds it. Each step takes B rows (streams) at once: the rows share the weights, which each
 * product reads once for all of them (`gemm_rows`), and have their own states, positions and
 * caches. A row's arithmetic does not depend on the others, so a stream decoded in a batch gets
 * the bits it gets alone (B = 1). */

/* one row of an attention sublayer: its states h [I] (the dtype) and RoPE tables cos/ssin [D] (or
 * NULL), its cache (`ckind`: the weights' dtype, or KIND_I8 with scales ksc/vsc, head j's at + j ss):
 * head j's rows at kc/vc + j hs, D apart; the token's key/value are written at `row`, then rows
 * [0, S) are attended (row < S). With row < 0 the token does not join the cache (a `ca` fusion
 * layer reading its window's image prefix; S = 0: a zero update). */
struct attn_row {
    const void *h, *cos, *ssin;
    void *kc, *vc;
    float *ksc, *vsc;
    long ss, row, S, hs;
    int ckind;
};

/* Y[b] = W_o attend(rope(q), cache + [rope(k), v]) of each row, q k v = W_qkv rmsnorm(h) + bias:
 * norm weight [I], W_qkv [(H + 2 Hkv) D, I], W_o [I, H D] in the dtype, bias fp32 or NULL. The rows
 * agree on joining their caches (r[0].row >= 0) or not (then only the query rows of W_qkv are
 * read). Y [B, I] fp32 (bf16: the projection's output before the caller's cast). Returns 0, or
 * -1 when out of memory (nothing written to a cache then). */
static int attn_rows(const struct attn_row *r, long B, const void *norm_w, float eps, const void *Wqkv,
                     const float *bias, const void *Wo, float *Y, long I, long H, long Hkv, long D, int bf16) {
    long Q = H * D, KV = Hkv * D, G = H / Hkv, P = Q + 2 * KV, joins = r[0].row >= 0;
    long O = joins ? P : Q;  /* the product's rows: q, k, v, or q alone */
    long *at = malloc(sizeof(long) * (B + 1));  /* where each row's scores start */
    if (!at) return -1;
    at[0] = 0;
    for (long b = 0; b < B; b++) at[b + 1] = at[b] + Hkv * G * r[b].S;
    float *buf = malloc(sizeof(float) * (B * (I + P + Q) + at[B]));
    if (!buf) {
        free(at);
        return -1;
    }
    float *x = buf, *qkv = x + B * I, *att = qkv + B * P, *scores = att + B * Q;
    for (long b = 0; b < B; b++) norm_row(r[b].h, norm_w, bf16, x + b * I, I, eps);
    gemm_rows(Wqkv, bf16, x, I, bias, qkv, P, O, I, B);
    for (long b = 0; b < B; b++) {
        float *q = qkv + b * P, *k = q + Q, *v = k + KV;
        if (bf16) round_bf16(q, O);  /* the product's output, in the weights' dtype */
        if (r[b].cos) {
            rope_rows(q, r[b].cos, r[b].ssin, bf16, H, D);
            if (joins) rope_rows(k, r[b].cos, r[b].ssin, bf16, Hkv, D);
        }
        for (long j = 0; j < Hkv && joins; j++) {
            long to = j * r[b].hs + r[b].row * D;
            if (r[b].ckind == KIND_I8) {
                quantize_row(k + j * D, (int8_t *)r[b].kc + to, r[b].ksc + j * r[b].ss + r[b].row, D);
                quantize_row(v + j * D, (int8_t *)r[b].vc + to, r[b].vsc + j * r[b].ss + r[b].row, D);
            } else if (r[b].ckind == KIND_BF16) {
                for (long d = 0; d < D; d++) {
                    ((uint16_t *)r[b].kc)[to + d] = f32_to_bf16(k[j * D + d]);
                    ((uint16_t *)r[b].vc)[to + d] = f32_to_bf16(v[j * D + d]);
                }
            } else {
                memcpy((float *)r[b].kc + to, k + j * D, sizeof(float) * D);
                memcpy((float *)r[b].vc + to, v + j * D, sizeof(float) * D);
            }
        }
    }
    float scale = 1.0f / sqrtf((float)D);
    /* one (row, key/value head) per task: each reads its own cache rows */
#ifdef _OPENMP
#pragma omp parallel for num_threads(n_threads) schedule(dynamic, 1) if (n_threads > 1 && at[B] * D >= 65536)
#endif
    for (long t = 0; t < B * Hkv; t++) {
        long b = t / Hkv, j = t % Hkv;
        int kind = r[b].ckind;
        long head_bytes = r[b].hs * (kind == KIND_I8 ? 1 : kind == KIND_BF16 ? 2 : 4);
        attend(qkv + b * P + j * G * D, (const char *)r[b].kc + j * head_bytes, (const char *)r[b].vc + j * head_bytes,
               kind, r[b].ksc ? r[b].ksc + j * r[b].ss : NULL, r[b].vsc ? r[b].vsc + j * r[b].ss : NULL, NULL,
               scores + at[b] + j * G * r[b].S, att + b * Q + j * G * D, G, 1, r[b].S, D, D, scale);
    }
    if (bf16) round_bf16(att, B * Q);  /* attention's output, cast to the dtype */
    gemm_rows(Wo, bf16, att, Q, NULL, Y, I, I, Q, B);
    free(buf);
    free(at);
    return 0;
}

/* the one-row entry points; ckind 0: the cache has the weights' dtype, KIND_I8 (2): int8 with scales */
static int attn_step(const void *h, const void *norm_w, float eps, const void *Wqkv, const float *b, const void *Wo,
                     const void *cos, const void *ssin, void *kc, void *vc, int ckind, float *ksc, float *vsc,
                     long ss, long row, long S, long hs, float *y, long I, long H, long Hkv, long D, int bf16) {
    struct attn_row r = {h, cos, ssin, kc, vc, ksc, vsc, ss, row, S, hs, ckind};
    return attn_rows(&r, 1, norm_w, eps, Wqkv, b, Wo, y, I, H, Hkv, D, bf16);
}

int casa_attn_step_f32(const float *h, const float *norm_w, float eps, const float *Wqkv, const float *b,
                       const float *Wo, const float *cos, const float *ssin, void *kc, void *vc, int ckind,
                       float *ksc, float *vsc, long ss, long row, long S, long ld, long hs, float *y, long I, long H,
                       long Hkv, long D) {
    (void)ld;  /* rows are D apart */
    return attn_step(h, norm_w, eps, Wqkv, b, Wo, cos, ssin, kc, vc, ckind == KIND_I8 ? KIND_I8 : KIND_F32, ksc, vsc,
                     ss, row, S, hs, y, I, H, Hkv, D, 0);
}
int casa_attn_step_bf16(const uint16_t *h, const uint16_t *norm_w, float eps, const uint16_t *Wqkv, const float *b,
                        const uint16_t *Wo, const uint16_t *cos, const uint16_t *ssin, void *kc, void *vc, int ckind,
                        float *ksc, float *vsc, long ss, long row, long S, long ld, long hs, float *y, long I,
                        long H, long Hkv, long D) {
    (void)ld;
    return attn_step(h, norm_w, eps, Wqkv, b, Wo, cos, ssin, kc, vc, ckind == KIND_I8 ? KIND_I8 : KIND_BF16, ksc,
                     vsc, ss, row, S, hs, y, I, H, Hkv, D, 1);
}

/* Y[b] = down(silu(gate(x)) * up(x)), x = rmsnorm(h[b]), for B rows; Y [B, O] fp32. Returns 0, or
 * -1 when out of memory. */
static int mlp_rows(const void *const *h, long B, const void *norm_w, float eps, const void *Wgu, const void *Wd,
                    float *Y, long I, long F, long O, int bf16) {
    float *buf = malloc(sizeof(float) * B * (I + 2 * F));  /* the normed rows, then the gate/up outputs */
    if (!buf) return -1;
    float *x = buf, *gu = x + B * I;
    for (long b = 0; b < B; b++) norm_row(h[b], norm_w, bf16, x + b * I, I, eps);
    gemm_rows(Wgu, bf16, x, I, NULL, gu, 2 * F, 2 * F, I, B);
    for (long b = 0; b < B; b++) silu_mul(gu + b * 2 * F, F, bf16);
    gemm_rows(Wd, bf16, gu, 2 * F, NULL, Y, O, O, F, B);
    free(buf);
    return 0;
}

int casa_mlp_step_f32(const float *h, const float *norm_w, float eps, const float *Wgu, const float *Wd, float *y,
                      long I, long F, long O) {
    const void *rows[1] = {h};
    return mlp_rows(rows, 1, norm_w, eps, Wgu, Wd, y, I, F, O, 0);
}
int casa_mlp_step_bf16(const uint16_t *h, const uint16_t *norm_w, float eps, const uint16_t *Wgu, const uint16_t *Wd,
                       float *y, long I, long F, long O) {
    const void *rows[1] = {h};
    return mlp_rows(rows, 1, norm_w, eps, Wgu, Wd, y, I, F, O, 1);
}

/* ------------------------------------------------------------- a block's step
 * Decoded tokens through a whole decoder block in one call (`core.decode.BlockSteps`): its
 * attention sublayers in the block's placement, the residual adds, the feed-forward. Each
 * residual add rounds (bf16) where PyTorch's adds do and adds in the order `core.model.Block`
 * does. B rows: one plan per row (the same weights, its own caches). */

/* one attention sublayer (attn_rows' operands); `row`, `held` and the cache pointers change
 * every token, the rest when the weights do. A head of the cache is `hs` elements, rows D apart
 * (int8, `cache` KIND_I8: its scales `ss` apart); row < 0: the token reads the cache without
 * joining it. */
struct casa_attn_plan {
    const void *norm_w, *Wqkv, *Wo;
    const float *b;
    void *kc, *vc;
    float *ksc, *vsc;
    long row, held, hs, ss, H, Hkv, D;
    float eps;
    int rope, cache;
};

enum { PLACE_NONE, PLACE_PARALLEL, PLACE_BEFORE, PLACE_REPLACE };  /* no fusion layer, then §3's placements */

struct casa_block_plan {
    struct casa_attn_plan sa, fusion;
    const void *mlp_norm_w, *Wgu, *Wd;
    long I, F;
    float mlp_eps;
    int placement;
};

/* sublayer `fusion` (else the SA) of every row's plan on the rows' states h[b]; weights of P[0] */
static int plan_attn(const struct casa_block_plan *const *P, long B, int fusion, void *const *h,
                     const void *const *cos, const void *const *ssin, float *Y, int bf16) {
    struct attn_row *r = malloc(sizeof(struct attn_row) * B);
    if (!r) return -1;
    for (long b = 0; b < B; b++) {
        const struct casa_attn_plan *a = fusion ? &P[b]->fusion : &P[b]->sa;
        int ckind = a->cache == KIND_I8 ? KIND_I8 : bf16 ? KIND_BF16 : KIND_F32;
        r[b] = (struct attn_row){h[b], a->rope ? cos[b] : NULL, a->rope ? ssin[b] : NULL, a->kc, a->vc, a->ksc,
                                 a->vsc, a->ss, a->row, a->held, a->hs, ckind};
    }
    const struct casa_attn_plan *a = fusion ? &P[0]->fusion : &P[0]->sa;
    int rc = attn_rows(r, B, a->norm_w, a->eps, a->Wqkv, a->b, a->Wo, Y, P[0]->I, a->H, a->Hkv, a->D, bf16);
    free(r);
    return rc;
}

/* x += u as a residual add in the states' dtype: bf16 rounds the update, then the sum */
static void residual(float *x, const float *u, long I, int bf16) {
    if (bf16)
        for (long i = 0; i < I; i++) x[i] = bf16_to_f32(f32_to_bf16(x[i] + bf16_to_f32(f32_to_bf16(u[i]))));
    else
        for (long i = 0; i < I; i++) x[i] += u[i];
}

static void store_row(const float *x, void *h, long I, int bf16) {
    if (bf16)
        for (long i = 0; i < I; i++) ((uint16_t *)h)[i] = f32_to_bf16(x[i]);
    else
        memcpy(h, x, sizeof(float) * I);
}

static void residuals(float *x, const float *u, long B, long I, int bf16) {
    for (long b = 0; b < B; b++) residual(x + b * I, u + b * I, I, bf16);
}

static void store_rows(const float *x, void *const *h, long B, long I, int bf16) {
    for (long b = 0; b < B; b++) store_row(x + b * I, h[b], I, bf16);
}

/* h[b] [I] in the dtype, updated in place; cos[b]/ssin[b] [D] (a row's position). Returns 0, or
 * -1 when out of memory (h may then hold an intermediate state; a cache row may be written but
 * is not yet held). */
static int block_rows(const struct casa_block_plan *const *P, long B, void *const *h, const void *const *cos,
                      const void *const *ssin, int bf16) {
    long I = P[0]->I;
    float *x = malloc(sizeof(float) * 3 * B * I);
    if (!x) return -1;
    float *u = x + B * I, *w = u + B * I;
    for (long b = 0; b < B; b++) {
        if (bf16) widen_bf16(x + b * I, h[b], 1, I, I);
        else memcpy(x + b * I, h[b], sizeof(float) * I);
    }
    int rc = 0;
    switch (P[0]->placement) {
    case PLACE_NONE:  /* h + sa(h) */
        if (!(rc = plan_attn(P, B, 0, h, cos, ssin, u, bf16))) residuals(x, u, B, I, bf16);
        break;
    case PLACE_PARALLEL:  /* h + sa(h) + fusion(h) */
        rc = plan_attn(P, B, 0, h, cos, ssin, u, bf16) || plan_attn(P, B, 1, h, cos, ssin, w, bf16);
        if (!rc) {
            residuals(x, u, B, I, bf16);
            residuals(x, w, B, I, bf16);
        }
        break;
    case PLACE_BEFORE:  /* h' = h + fusion(h); h' + sa(h') */
        if (!(rc = plan_attn(P, B, 1, h, cos, ssin, w, bf16))) {
            residuals(x, w, B, I, bf16);
            store_rows(x, h, B, I, bf16);
            if (!(rc = plan_attn(P, B, 0, h, cos, ssin, u, bf16))) residuals(x, u, B, I, bf16);
        }
        break;
    default:  /* replace: h + fusion(h) */
        if (!(rc = plan_attn(P, B, 1, h, cos, ssin, w, bf16))) residuals(x, w, B, I, bf16);
    }
    if (!rc) {  /* h + mlp(h) */
        store_rows(x, h, B, I, bf16);
        if (!(rc = mlp_rows((const void *const *)h, B, P[0]->mlp_norm_w, P[0]->mlp_eps, P[0]->Wgu, P[0]->Wd, u, I,
                            P[0]->F, I, bf16))) {
            residuals(x, u, B, I, bf16);
            store_rows(x, h, B, I, bf16);
        }
    }
    free(x);
    return rc;
}

/* B streams' tokens, one row each: plans P[b], states h[b], RoPE tables cos[b]/ssin[b] */
int casa_block_rows_f32(const struct casa_block_plan *const *P, long B, void *const *h, const void *const *cos,
                        const void *const *ssin) {
    return block_rows(P, B, h, cos, ssin, 0);
}
int casa_block_rows_bf16(const struct casa_block_plan *const *P, long B, void *const *h, const void *const *cos,
                         const void *const *ssin) {
    return block_rows(P, B, h, cos, ssin, 1);
}
