/* Decode attention read straight from the paged KV cache, float32, one CPU thread.
 *
 * One new query token per sequence attends to the sequence's cached context, which lies in
 * fixed-size blocks of the cache pools (block table per sequence). For each sequence: every
 * cached position's key row (all KV heads, contiguous in the pool) is read once and dotted with
 * the g query heads of each KV head; softmax per query head (with an optional sink logit, as
 * gpt-oss has); then every value row is read once and accumulated. Nothing is gathered or
 * padded, and a sequence's result never depends on the others in the batch.
 * The rows are asked for ahead of use (prefetch): between two layers the expert workers' weights
 * go through the cache, so the context is cold, in blocks scattered over the pools that the
 * hardware prefetcher does not follow: 2.0-2.5x less time cold at 32-64 sequences.
 * Built and called by tarragon/paged_attention.py (see there for why it exists).
 */
#include <float.h>
#include <stdint.h>

/* exp(x) for x <= 0 (scores after the maximum is subtracted), in a form the compiler vectorises:
 * x = n ln2 + r with |r| <= ln2/2, exp(r) by a degree-6 polynomial (Cephes' expf coefficients,
 * relative error ~2e-7), 2^n put into the exponent bits. Below -87 it is clamped (~1.6e-38). */
static inline float exp_nonpositive(float x) {
    x = x < -87.0f ? -87.0f : x;
    const float n = __builtin_rintf(x * 1.44269504088896341f);
    const float r = x - n * 0.693145751953125f - n * 1.428606765330187e-06f;
    const float p = 1.0f + r * (1.0f + r * (0.5f + r * (0.16666667163f + r * (0.041666645557f + r * (0.0083333803341f + r * 0.0013887813233f)))));
    union { float f; int32_t i; } two_n = { .i = ((int32_t)n + 127) << 23 };
    return p * two_n.f;
}

#define AHEAD 16
/* Asks for a row of `n` floats to be brought into the cache: the cached context is cold (the
 * expert workers' weights went through the cache since this layer ran last), and its rows lie in
 * scattered blocks the hardware prefetcher does not follow. */
static inline void prefetch_row(const float *p, int64_t n) {
    for (int64_t i = 0; i < n; i += 16) __builtin_prefetch(p + i, 0, 3);
}

static inline __attribute__((always_inline)) void attend(
    const float *q, int64_t q_stride, const float *k, int64_t k_slot, int64_t k_head,
    const float *v, int64_t v_slot, int64_t v_head, const int64_t *blocks, int64_t nblk, int64_t block_size,
    const int64_t *lens, const float *sinks, float *out, float *scores, int64_t B, int64_t kvh, int64_t g,
    const int64_t d, const int64_t dv, int64_t window, float scale) {
    const int64_t nh = kvh * g;
    for (int64_t b = 0; b < B; b++) {
        const int64_t *table = blocks + b * nblk;
        const int64_t end = lens[b], start = window > 0 && end > window ? end - window : 0, n = end - start;
        const float *qb = q + b * q_stride;
        float *ob = out + b * nh * dv;
        for (int64_t c = start; c < end; c++) {  /* scores [nh, n] */
            const float *kc = k + (table[c / block_size] * block_size + c % block_size) * k_slot;
            if (c + AHEAD < end) prefetch_row(k + (table[(c + AHEAD) / block_size] * block_size + (c + AHEAD) % block_size) * k_slot, kvh * k_head);
            prefetch_row(v + (table[c / block_size] * block_size + c % block_size) * v_slot, kvh * v_head);
            for (int64_t h = 0; h < kvh; h++)
                for (int64_t j = 0; j < g; j++) {
                    const float *qj = qb + (h * g + j) * d, *kh = kc + h * k_head;
                    float s = 0.0f;
#pragma omp simd reduction(+ : s)
                    for (int64_t e = 0; e < d; e++) s += qj[e] * kh[e];
                    scores[(h * g + j) * n + (c - start)] = s * scale;
                }
        }
        if (b + 1 < B) {  /* the next sequence's first key rows, while this one finishes */
            const int64_t *next = blocks + (b + 1) * nblk;
            const int64_t e1 = lens[b + 1], c1 = window > 0 && e1 > window ? e1 - window : 0;
            for (int64_t c = c1; c < e1 && c < c1 + AHEAD; c++)
                prefetch_row(k + (next[c / block_size] * block_size + c % block_size) * k_slot, kvh * k_head);
        }
        for (int64_t i = 0; i < nh; i++) {  /* softmax per query head; the output zeroed */
            float *si = scores + i * n, m = sinks ? sinks[i] : -FLT_MAX, sum = 0.0f;
            for (int64_t c = 0; c < n; c++) m = si[c] > m ? si[c] : m;
#pragma omp simd reduction(+ : sum)
            for (int64_t c = 0; c < n; c++) {
                const float p = exp_nonpositive(si[c] - m);
                si[c] = p;
                sum += p;
            }
            if (sinks) sum += exp_nonpositive(sinks[i] - m);
            const float inv = 1.0f / sum;
#pragma omp simd
            for (int64_t c = 0; c < n; c++) si[c] *= inv;
            for (int64_t e = 0; e < dv; e++) ob[i * dv + e] = 0.0f;
        }
        for (int64_t c = start; c < end; c++) {  /* out += p * v */
            const float *vc = v + (table[c / block_size] * block_size + c % block_size) * v_slot;
            for (int64_t h = 0; h < kvh; h++)
                for (int64_t j = 0; j < g; j++) {
                    const float p = scores[(h * g + j) * n + (c - start)], *vh = vc + h * v_head;
                    float *oi = ob + (h * g + j) * dv;
#pragma omp simd
                    for (int64_t e = 0; e < dv; e++) oi[e] += p * vh[e];
                }
        }
    }
}

/* q [B, kvh*g, d] (sequence rows q_stride apart, heads d apart); pools [slots, kvh, d|dv] with
 * the given slot and head strides; blocks [B, nblk]; lens [B] (context length, the new token's
 * included); sinks [kvh*g] or NULL; window 0 or a sliding window; out [B, kvh*g, dv];
 * scores: scratch of kvh*g*max(lens) floats. The common head sizes get their own unrolled copy. */
void tarragon_paged_decode_f32(
    const float *q, int64_t q_stride, const float *k, int64_t k_slot, int64_t k_head,
    const float *v, int64_t v_slot, int64_t v_head, const int64_t *blocks, int64_t nblk, int64_t block_size,
    const int64_t *lens, const float *sinks, float *out, float *scores, int64_t B, int64_t kvh, int64_t g,
    int64_t d, int64_t dv, int64_t window, float scale) {
#define ATTEND(D, DV) attend(q, q_stride, k, k_slot, k_head, v, v_slot, v_head, blocks, nblk, block_size, lens, sinks, out, scores, B, kvh, g, D, DV, window, scale)
    if (d == 32 && dv == 32) ATTEND(32, 32);
    else if (d == 64 && dv == 64) ATTEND(64, 64);
    else if (d == 128 && dv == 128) ATTEND(128, 128);
    else ATTEND(d, dv);
}

/* One step's rotary embedding and cache write, as the attention layer's torch ops would do them
 * (apply_rope, then index_copy_ into the pools) in one pass: each token's qkv row [q heads, k
 * heads, v heads] of d each; the first `rot` dims of every q and k head rotated by halves
 * (transformers' rotate_half), the rest copied; q to q_out [T, nh, d], k and v to their slot in
 * the pools. Each output is x*cos + (+-x')*sin rounded as torch rounds it: two products, then
 * their sum, never a fused multiply-add, so the result is bit-identical to the torch ops'. */
__attribute__((optimize("fp-contract=off")))
void tarragon_rope_store_f32(const float *qkv, int64_t T, int64_t row, int64_t nh, int64_t kvh, int64_t d, int64_t rot,
                             const float *cos, const float *sin, const int64_t *slots, float *k_pool, int64_t k_slot,
                             float *v_pool, int64_t v_slot, float *q_out) {
    const int64_t half = rot / 2;
    for (int64_t t = 0; t < T; t++) {
        const float *x = qkv + t * row, *c = cos + t * rot, *s = sin + t * rot;
        for (int64_t h = 0; h < nh + kvh; h++) {
            const float *xh = x + h * d;
            float *o = h < nh ? q_out + (t * nh + h) * d : k_pool + slots[t] * k_slot + (h - nh) * d;
            for (int64_t i = 0; i < half; i++) {
                const float a = xh[i] * c[i], b = -xh[i + half] * s[i];
                o[i] = a + b;
            }
            for (int64_t i = half; i < rot; i++) {
                const float a = xh[i] * c[i], b = xh[i - half] * s[i];
                o[i] = a + b;
            }
            for (int64_t i = rot; i < d; i++) o[i] = xh[i];
        }
        const float *xv = x + (nh + kvh) * d;
        float *ov = v_pool + slots[t] * v_slot;
        for (int64_t i = 0; i < kvh * d; i++) ov[i] = xv[i];
    }
}

/* RMSNorm of T rows of n (x * rsqrt(mean(x^2) + eps) * w, products rounded in that order as
 * torch's ops round them), and before it, when `delta` is given, the residual sum x = h + delta
 * (written to h_out): the two small ops that come between a layer's attention and its experts in
 * one pass. */
void tarragon_add_rms_norm_f32(const float *h, const float *delta, const float *w, float eps, int64_t T, int64_t n,
                               float *h_out, float *out) {
    for (int64_t t = 0; t < T; t++) {
        const float *ht = h + t * n, *dt = delta ? delta + t * n : 0;
        float *xt = delta ? h_out + t * n : (float *)ht, *ot = out + t * n;
        if (delta)
            for (int64_t i = 0; i < n; i++) xt[i] = ht[i] + dt[i];
        float s = 0.0f;
#pragma omp simd reduction(+ : s)
        for (int64_t i = 0; i < n; i++) s += xt[i] * xt[i];
        const float r = 1.0f / __builtin_sqrtf(s / (float)n + eps);
        for (int64_t i = 0; i < n; i++) {
            const float y = xt[i] * r;
            ot[i] = y * w[i];
        }
    }
}
