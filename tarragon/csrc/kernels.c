/* The hot matmuls of a decode step at a few rows, float32, on a CPU: y = x W^T (+ b) with W
 * packed once at load (one thread, or two for a wide W), and a layer's SwiGLU experts over rows
 * grouped by expert (one thread).
 *
 * At decode a matmul has 1-64 rows, so the weight is read once per call and each of its values
 * serves only those few rows: the work is streaming W, and a BLAS call adds set-up and a copy of
 * W into its own layout every call. Here W is stored already in the kernel's layout: blocks of
 * BW output columns, each block [K][BW], read front to back once per call; the rows take turns on
 * the block while it is in the L1/L2 cache, RG rows at a time, their BW sums each in registers.
 * A row's result is computed by the same operations in the same order whatever rows share the
 * call: batch-invariant (a replayed expert call is bit-identical).
 * Built and called by tarragon/kernels.py (see there for the layout and why).
 */
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__AVX512F__)
#define VL 16 /* floats per vector register */
#define RG 6  /* rows at a time: RG x 4 sums + 4 weight vectors in 32 registers */
#elif defined(__AVX__)
#define VL 8
#define RG 3  /* 16 registers */
#else
#define VL 4
#define RG 3
#endif
#define BW (4 * VL) /* output columns per block */
typedef float vec __attribute__((vector_size(VL * 4)));

int64_t tarragon_block_width(void) { return BW; }

/* y[m][0..cols) = bias + sum_k a[m][k] W[k][..] over R rows (R a constant after inlining). */
static inline __attribute__((always_inline)) void block(const float *restrict W, int64_t K, const float *restrict bias,
                                                        const float *restrict a, int64_t lda, float *restrict y, int64_t ldy,
                                                        int64_t cols, const int R) {
    vec acc[RG][4];
    for (int m = 0; m < R; m++)
        for (int j = 0; j < 4; j++) {
            if (bias)
                memcpy(&acc[m][j], bias + j * VL, sizeof(vec));
            else
                acc[m][j] = (vec){0};
        }
    for (int64_t k = 0; k < K; k++) {
        const float *w = W + k * BW;
        vec w0, w1, w2, w3;
        memcpy(&w0, w, sizeof(vec)); memcpy(&w1, w + VL, sizeof(vec));
        memcpy(&w2, w + 2 * VL, sizeof(vec)); memcpy(&w3, w + 3 * VL, sizeof(vec));
        for (int m = 0; m < R; m++) {
            const float s = a[m * lda + k];
            acc[m][0] += s * w0; acc[m][1] += s * w1; acc[m][2] += s * w2; acc[m][3] += s * w3;
        }
    }
    for (int m = 0; m < R; m++) {
        if (cols == BW) {
            memcpy(y + m * ldy, acc[m], sizeof(acc[m]));
        } else {
            float tmp[BW];
            memcpy(tmp, acc[m], sizeof(tmp));
            memcpy(y + m * ldy, tmp, cols * sizeof(float));
        }
    }
}

/* Blocks [b0, b1) of y[rows][N] = a[rows][K] W^T (+ bias), W packed as [ceil(N / BW)][K][BW]
 * (zero columns past N), bias (or NULL) padded to a whole block. */
static void linear_blocks(const float *a, int64_t lda, int64_t rows, const float *W, const float *bias, int64_t K, int64_t N,
                          float *y, int64_t ldy, int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; b++) {
        const float *Wb = W + b * K * BW, *bb = bias ? bias + b * BW : NULL;
        const int64_t cols = N - b * BW < BW ? N - b * BW : BW;
        for (int64_t r = 0; r < rows; r += RG) {
            const float *ar = a + r * lda;
            float *yr = y + r * ldy + b * BW;
            switch (rows - r < RG ? rows - r : RG) {
                case 1: block(Wb, K, bb, ar, lda, yr, ldy, cols, 1); break;
                case 2: block(Wb, K, bb, ar, lda, yr, ldy, cols, 2); break;
#if RG > 3
                case 3: block(Wb, K, bb, ar, lda, yr, ldy, cols, 3); break;
                case 4: block(Wb, K, bb, ar, lda, yr, ldy, cols, 4); break;
                case 5: block(Wb, K, bb, ar, lda, yr, ldy, cols, 5); break;
#endif
                default: block(Wb, K, bb, ar, lda, yr, ldy, cols, RG); break;
            }
        }
    }
}

/* A second thread for large calls (the LM head, while the expert workers wait and their cores
 * idle): it takes the upper half of the blocks. Each block is computed as by one thread, so the
 * result is the same bits either way. One call at a time uses it; a concurrent one runs alone. */
struct job { const float *a; int64_t lda, rows; const float *W, *bias; int64_t K, N; float *y; int64_t ldy, b0, b1; };
static struct job job;
static atomic_int state; /* 0 idle, 1 posted, 2 done */
static pthread_mutex_t busy = PTHREAD_MUTEX_INITIALIZER, mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t posted = PTHREAD_COND_INITIALIZER;
static int helper_up;

/* A child of fork() has no helper thread (only the forking thread is copied): it starts its own. */
static void forked(void) {
    helper_up = 0;
    atomic_store(&state, 0);
    pthread_mutex_init(&busy, NULL);
    pthread_mutex_init(&mu, NULL);
    pthread_cond_init(&posted, NULL);
}

static void *helper(void *unused) {
    (void)unused;
    for (;;) {
        pthread_mutex_lock(&mu);
        while (atomic_load(&state) != 1) pthread_cond_wait(&posted, &mu);
        pthread_mutex_unlock(&mu);
        linear_blocks(job.a, job.lda, job.rows, job.W, job.bias, job.K, job.N, job.y, job.ldy, job.b0, job.b1);
        atomic_store(&state, 2);
    }
    return NULL;
}

/* y[rows][N] = a[rows][K] W^T (+ bias) on `threads` (1 or 2) threads. */
void tarragon_linear_f32(const float *a, int64_t lda, int64_t rows, const float *W, const float *bias, int64_t K, int64_t N,
                         float *y, int64_t ldy, int threads) {
    const int64_t nb = (N + BW - 1) / BW;
    if (threads < 2 || nb < 2 || pthread_mutex_trylock(&busy) != 0) {
        linear_blocks(a, lda, rows, W, bias, K, N, y, ldy, 0, nb);
        return;
    }
    if (!helper_up) {
        pthread_t t;
        if (pthread_create(&t, NULL, helper, NULL) != 0) {
            pthread_mutex_unlock(&busy);
            linear_blocks(a, lda, rows, W, bias, K, N, y, ldy, 0, nb);
            return;
        }
        pthread_detach(t);
        pthread_atfork(NULL, NULL, forked);
        helper_up = 1;
    }
    const int64_t half = nb / 2;
    job = (struct job){a, lda, rows, W, bias, K, N, y, ldy, half, nb};
    pthread_mutex_lock(&mu);
    atomic_store(&state, 1);
    pthread_cond_signal(&posted);
    pthread_mutex_unlock(&mu);
    linear_blocks(a, lda, rows, W, bias, K, N, y, ldy, 0, half);
    while (atomic_load(&state) != 2) sched_yield();
    atomic_store(&state, 0);
    pthread_mutex_unlock(&busy);
}

/* exp(x) in a form the compiler vectorises: x = n ln2 + r, n rounded by the 1.5 * 2^23 trick,
 * exp(r) by Cephes' expf polynomial (relative error ~2e-7), 2^n put into the exponent bits;
 * x clamped to [-87, 88]. */
static inline float exp_approx(float x) {
    x = x > 88.0f ? 88.0f : (x < -87.0f ? -87.0f : x);
    const float t = x * 1.44269504088896341f + 12582912.0f;
    const float n = t - 12582912.0f;
    const float r = x - n * 0.693359375f + n * 2.12194440e-4f;
    const float p = ((((((1.9875691500E-4f * r + 1.3981999507E-3f) * r + 8.3334519073E-3f) * r + 4.1665795894E-2f) * r
                       + 1.6666665459E-1f) * r + 5.0000001201E-1f) * r * r + r + 1.0f);
    union { float f; int32_t i; } bits = { .f = t }, two_n;
    two_n.i = (bits.i - 0x4B400000 + 127) << 23;
    return p * two_n.f;
}

/* One layer's SwiGLU experts: rows of x [*, H] grouped by expert, counts[i] rows for expert
 * ids[i] (i < n); w13[e] packed [2 Ip / BW][H][BW] (gate outputs, zero-padded to Ip, then up),
 * w2[e] packed [ceil(H / BW)][Ip][BW]. y[row] = W2 (silu(gate) * up). Returns -1 when out of memory. */
int tarragon_swiglu_experts_f32(const float *x, float *y, int64_t H, int64_t Ip, int64_t n, const int64_t *ids,
                                const int64_t *counts, const float *const *w13, const float *const *w2) {
    int64_t most = 0;
    for (int64_t i = 0; i < n; i++) most = counts[i] > most ? counts[i] : most;
    float *h = malloc((size_t)(most * 3 * Ip) * sizeof(float) + 1);
    if (h == NULL) return -1;
    float *act = h + most * 2 * Ip;
    int64_t start = 0;
    for (int64_t i = 0; i < n; i++) {
        const int64_t rows = counts[i], e = ids[i];
        if (rows == 0) continue;
        linear_blocks(x + start * H, H, rows, w13[e], NULL, H, 2 * Ip, h, 2 * Ip, 0, 2 * Ip / BW);
        for (int64_t m = 0; m < rows; m++) {
            const float *gate = h + m * 2 * Ip, *up = gate + Ip;
            float *out = act + m * Ip;
#pragma omp simd
            for (int64_t j = 0; j < Ip; j++) out[j] = gate[j] / (1.0f + exp_approx(-gate[j])) * up[j];
        }
        linear_blocks(act, Ip, rows, w2[e], NULL, Ip, H, y + start * H, H, 0, (H + BW - 1) / BW);
        start += rows;
    }
    free(h);
    return 0;
}
