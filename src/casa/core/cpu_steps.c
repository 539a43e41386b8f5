/* casa's fused one-token CPU steps: a decoded token's attention sublayer, feed-forward and whole
 * decoder block, each in one call, built on the primitives of cpu_kernels.c.
 *
 * The library is this file compiled alone (casa.core.cpu_kernels builds it): cpu_kernels.c is
 * included, so that the two form one translation unit and the primitives stay `static`, private
 * to the library and inlinable into the steps.
 */
#include "cpu_kernels.c"

/* ------------------------------------------------------ fused one-token steps
 * A decoded token's attention sublayer (or feed-forward) in one call, so that the dozen small
 * ops between the projections do not each pay Python's and the dispatcher's overhead. Every
 * intermediate is an fp32 buffer, rounded to bf16 (bf16 operands) exactly where the per-op path
 * (the kernels above, called one by one from casa.core) rounds it, so both give the same bits. */

/* out = W x (+ b), fp32, for weights of either dtype */
static void gemv(const void *W, int bf16, const float *x, const float *b, float *out, long O, long I) {
    if (bf16) casa_gemv_bf16(W, x, b, out, O, I);
    else casa_gemv_f32(W, x, b, out, O, I);
}

/* y = W_o attend(rope(q), cache + [rope(k), v]) for one token, q k v = W_qkv rmsnorm(h) + b.
 * h [I] and norm weight [I], W_qkv [(H + 2 Hkv) D, I], W_o [I, H D] in the dtype; b fp32 or NULL;
 * cos/ssin [D] in the dtype, or NULL (no RoPE). Cache (`ckind`: the weights' dtype, or KIND_I8 with
 * scales ksc/vsc, head j's at + j ss): head j's rows at kc/vc + j hs, `ld` apart; the token's
 * key/value are written at `row`, then rows [0, S) are attended (row < S).
 * With row < 0 the token does not join the cache (a `ca` fusion layer reading its window's
 * image prefix): only the query rows of W_qkv are read, and rows [0, S) attended (S = 0: y = 0).
 * y [I] fp32 (bf16: the projection's output before the caller's cast). Returns 0, or -1 when
 * out of memory (nothing written to the cache then). */
static int attn_step(const void *h, const void *norm_w, float eps, const void *Wqkv, const float *b, const void *Wo,
                     const void *cos, const void *ssin, void *kc, void *vc, int ckind, float *ksc, float *vsc,
                     long ss, long row, long S, long ld, long hs, float *y, long I, long H, long Hkv, long D,
                     int bf16) {
    long Q = H * D, KV = Hkv * D, G = H / Hkv, joins = row >= 0;
    long O = joins ? Q + 2 * KV : Q;  /* the product's rows: q, k, v, or q alone */
    float *buf = malloc(sizeof(float) * (I + Q + 2 * KV + Q + G * S));
    if (!buf) return -1;
    float *x = buf, *qkv = x + I, *att = qkv + Q + 2 * KV, *scores = att + Q;
    norm_row(h, norm_w, bf16, x, I, eps);
    gemv(Wqkv, bf16, x, b, qkv, O, I);
    if (bf16) round_bf16(qkv, O);  /* the product's output, in the weights' dtype */
    float *q = qkv, *k = qkv + Q, *v = k + KV;
    if (cos) {
        rope_rows(q, cos, ssin, bf16, H, D);
        if (joins) rope_rows(k, cos, ssin, bf16, Hkv, D);
    }
    for (long j = 0; j < Hkv && joins; j++) {
        long at = j * hs + row * ld;
        if (ckind == KIND_I8) {
            quantize_row(k + j * D, (int8_t *)kc + at, ksc + j * ss + row, D);
            quantize_row(v + j * D, (int8_t *)vc + at, vsc + j * ss + row, D);
        } else if (ckind == KIND_BF16) {
            for (long d = 0; d < D; d++) {
                ((uint16_t *)kc)[at + d] = f32_to_bf16(k[j * D + d]);
                ((uint16_t *)vc)[at + d] = f32_to_bf16(v[j * D + d]);
            }
        } else {
            memcpy((float *)kc + at, k + j * D, sizeof(float) * D);
            memcpy((float *)vc + at, v + j * D, sizeof(float) * D);
        }
    }
    float scale = 1.0f / sqrtf((float)D);
    long head_bytes = hs * (ckind == KIND_I8 ? 1 : ckind == KIND_BF16 ? 2 : 4);
    for (long j = 0; j < Hkv; j++)
        attend(q + j * G * D, (const char *)kc + j * head_bytes, (const char *)vc + j * head_bytes, ckind,
               ksc ? ksc + j * ss : NULL, vsc ? vsc + j * ss : NULL, NULL, scores, att + j * G * D, G, 1, S, D, ld,
               scale);
    if (bf16) round_bf16(att, Q);  /* attention's output, cast to the dtype */
    gemv(Wo, bf16, att, NULL, y, I, Q);
    free(buf);
    return 0;
}

/* ckind 0: the cache has the weights' dtype; KIND_I8 (2): int8 with scales */
int casa_attn_step_f32(const float *h, const float *norm_w, float eps, const float *Wqkv, const float *b,
                       const float *Wo, const float *cos, const float *ssin, void *kc, void *vc, int ckind,
                       float *ksc, float *vsc, long ss, long row, long S, long ld, long hs, float *y, long I, long H,
                       long Hkv, long D) {
    return attn_step(h, norm_w, eps, Wqkv, b, Wo, cos, ssin, kc, vc, ckind == KIND_I8 ? KIND_I8 : KIND_F32, ksc, vsc,
                     ss, row, S, ld, hs, y, I, H, Hkv, D, 0);
}
int casa_attn_step_bf16(const uint16_t *h, const uint16_t *norm_w, float eps, const uint16_t *Wqkv, const float *b,
                        const uint16_t *Wo, const uint16_t *cos, const uint16_t *ssin, void *kc, void *vc, int ckind,
                        float *ksc, float *vsc, long ss, long row, long S, long ld, long hs, float *y, long I,
                        long H, long Hkv, long D) {
    return attn_step(h, norm_w, eps, Wqkv, b, Wo, cos, ssin, kc, vc, ckind == KIND_I8 ? KIND_I8 : KIND_BF16, ksc,
                     vsc, ss, row, S, ld, hs, y, I, H, Hkv, D, 1);
}

/* y = down(silu(gate(x)) * up(x)), x = rmsnorm(h), for one token; y [O] fp32. Returns 0, or -1
 * when out of memory. */
static int mlp_step(const void *h, const void *norm_w, float eps, const void *Wgu, const void *Wd, float *y, long I,
                    long F, long O, int bf16) {
    float *buf = malloc(sizeof(float) * (I + 2 * F));  /* the normed row, then the gate/up outputs */
    if (!buf) return -1;
    norm_row(h, norm_w, bf16, buf, I, eps);
    if (bf16) casa_swiglu_bf16(Wgu, Wd, buf, buf + I, y, I, F, O);
    else casa_swiglu_f32(Wgu, Wd, buf, buf + I, y, I, F, O);
    free(buf);
    return 0;
}

int casa_mlp_step_f32(const float *h, const float *norm_w, float eps, const float *Wgu, const float *Wd, float *y,
                      long I, long F, long O) {
    return mlp_step(h, norm_w, eps, Wgu, Wd, y, I, F, O, 0);
}
int casa_mlp_step_bf16(const uint16_t *h, const uint16_t *norm_w, float eps, const uint16_t *Wgu, const uint16_t *Wd,
                       float *y, long I, long F, long O) {
    return mlp_step(h, norm_w, eps, Wgu, Wd, y, I, F, O, 1);
}

/* ------------------------------------------------------------- a block's step
 * A decoded token through a whole decoder block in one call (`core.decode.BlockSteps`): its
 * attention sublayers in the block's placement, the residual adds, the feed-forward. Each
 * residual add rounds (bf16) where PyTorch's adds do and adds in the order `core.model.Block`
 * does, so the block gives the per-sublayer path's bits. */

/* one attention sublayer (attn_step's operands); `row`, `held` and the cache pointers change
 * every token, the rest when the weights do. A head of the cache is `hs` elements, rows D apart
 * (int8, `cache` KIND_I8: its scales `ss` apart); row < 0: the token reads the cache without
 * joining it (attn_step). */
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

static int plan_attn(const struct casa_attn_plan *a, const void *h, const void *cos, const void *ssin, float *y,
                     long I, int bf16) {
    int ckind = a->cache == KIND_I8 ? KIND_I8 : bf16 ? KIND_BF16 : KIND_F32;
    return attn_step(h, a->norm_w, a->eps, a->Wqkv, a->b, a->Wo, a->rope ? cos : NULL, a->rope ? ssin : NULL,
                     a->kc, a->vc, ckind, a->ksc, a->vsc, a->ss, a->row, a->held, a->D, a->hs, y, I, a->H, a->Hkv,
                     a->D, bf16);
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

/* h [I] in the dtype, updated in place; cos/ssin [D] or NULL. Returns 0, or -1 when out of memory
 * (h may then hold an intermediate state; a cache row may be written but is not yet held). */
static int block_step(const struct casa_block_plan *p, void *h, const void *cos, const void *ssin, int bf16) {
    long I = p->I;
    float *x = malloc(sizeof(float) * 3 * I);
    if (!x) return -1;
    float *u = x + I, *w = u + I;
    if (bf16) widen_bf16(x, h, 1, I, I);
    else memcpy(x, h, sizeof(float) * I);
    int rc = 0;
    switch (p->placement) {
    case PLACE_NONE:  /* h + sa(h) */
        if (!(rc = plan_attn(&p->sa, h, cos, ssin, u, I, bf16))) residual(x, u, I, bf16);
        break;
    case PLACE_PARALLEL:  /* h + sa(h) + fusion(h) */
        rc = plan_attn(&p->sa, h, cos, ssin, u, I, bf16) || plan_attn(&p->fusion, h, cos, ssin, w, I, bf16);
        if (!rc) {
            residual(x, u, I, bf16);
            residual(x, w, I, bf16);
        }
        break;
    case PLACE_BEFORE:  /* h' = h + fusion(h); h' + sa(h') */
        if (!(rc = plan_attn(&p->fusion, h, cos, ssin, w, I, bf16))) {
            residual(x, w, I, bf16);
            store_row(x, h, I, bf16);
            if (!(rc = plan_attn(&p->sa, h, cos, ssin, u, I, bf16))) residual(x, u, I, bf16);
        }
        break;
    default:  /* replace: h + fusion(h) */
        if (!(rc = plan_attn(&p->fusion, h, cos, ssin, w, I, bf16))) residual(x, w, I, bf16);
    }
    if (!rc) {  /* h + mlp(h) */
        store_row(x, h, I, bf16);
        if (!(rc = mlp_step(h, p->mlp_norm_w, p->mlp_eps, p->Wgu, p->Wd, u, I, p->F, I, bf16))) {
            residual(x, u, I, bf16);
            store_row(x, h, I, bf16);
        }
    }
    free(x);
    return rc;
}

int casa_block_step_f32(const struct casa_block_plan *p, float *h, const float *cos, const float *ssin) {
    return block_step(p, h, cos, ssin, 0);
}
int casa_block_step_bf16(const struct casa_block_plan *p, uint16_t *h, const uint16_t *cos, const uint16_t *ssin) {
    return block_step(p, h, cos, ssin, 1);
}
