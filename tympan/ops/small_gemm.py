"""Small products on prepacked weights (SAT-T streaming: 48 tokens; TymNet's blocks), in one small AVX-512 C library.

MKL repacks the weight on every call, which for 48 rows costs about as much as the product, and a streaming step
makes ~50 such calls on 22 MB of weights. Here each ``nn.Linear`` weight is packed once into 32-column panels
(``[N/32, K, 32]``, kept while the weight's storage and version are unchanged) and the C kernel (:mod:`tympan.ops.native`:
built on first use, ``TYMPAN_SMALL_GEMM=0`` disables it) computes 6 x 32 output tiles with the K loop innermost:
each output is one sequential fused-multiply-add chain over K, then the bias, then an epilogue (none, a residual
add ``res + (...)``, or the exact GELU) on the registers.

* :func:`linear`: ``module(x)`` for one ``nn.Linear`` (TymNet's head and projection, any output width);
* :func:`dsconv_stack` / :func:`run_dsconv`: MobileNet-v1 blocks (depthwise 3x3 + bias + ReLU, pointwise + bias
  + ReLU; BatchNorms folded by the caller) and the mean over positions, image by image in one call (TymNet's
  backbone after its stem): each image's activations stay in two small scratch areas, the GIL is released for the
  whole stack, and several images are dealt out to ``torch.get_num_threads()`` threads.
* :func:`block_table` / :func:`run_blocks`: whole pre-norm ViT blocks (:class:`tympan.models.layers.Block`) on a
  chunk with memory keys/values, the SAT streaming step, in one call: layer norms, the fused qkv product (and the
  memory's keys/values when not given), attention over memory + chunk keys, ``x + proj(.)``, ``gelu(fc1(.))``,
  ``y + fc2(.)``, on ``torch.get_num_threads()`` threads in one OpenMP parallel region. Each product is split by
  output panels (every thread all rows, its share of the weights: at 48 rows the 22 MB of weights streamed per step
  are the cost, and with a split by rows each thread streamed all of them, 8 % slower per step), attention by
  (stream, head, 6-row query tile) units; every thread computes the layer norms itself (cheaper than a barrier).
  A block costs five barriers (spin ~30 us, then sleep on a futex: on a machine busier than its cores a spinning
  waiter would hold the core the awaited thread needs). Each output is computed by one thread with the same
  arithmetic whatever the split, so results do not depend on the thread count. The library is built with
  ``-fopenmp`` when the compiler takes it and then runs on torch's own OpenMP runtime and thread team; without
  OpenMP it runs on one thread.

Numerics: the same products, each output's K sum in order; layer norm two-pass in fp32; softmax ``exp(s - max)``
with the sum divided at the end (as the flash attention kernel); GELU with erf by Abramowitz-Stegun 7.1.26
(|error| < 1.5e-7), the form torch's vectorised CPU GELU evaluates, and an own exp (Cody-Waite, degree-7 Taylor).
Results match the module path to ~1e-6.

Everything falls back (``None`` / the module itself) when the kernel does not apply: no compiler or no AVX-512,
autograd, autocast, non-float32 or non-CPU tensors, inference-tensor weights (the blocks; :func:`linear` packs such a
weight afresh on each call), sizes not multiples of 32 (:func:`linear`'s outputs excepted: zero-padded panels; head
sizes included), or modules other than the plain ones (e.g. the int8 mode's ``Int8Linear``, a tanh GELU).
"""

from __future__ import annotations

import ctypes
import weakref
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tympan.ops import native
from tympan.ops.weights import DerivedCache, fingerprint

__all__ = ["linear", "available", "openmp", "pack_weight", "block_table", "run_blocks", "BlockTable", "DSConvStack",
           "dsconv_stack", "run_dsconv", "int8_available", "quantize_pointwise", "quantize_u8_rows", "pointwise_u8"]

ENABLED = True  # False: linear() is the module itself and block_table() None (e.g. to count FLOPs, which the C
# kernel hides from torch)
BLOCKS_ENABLED = True  # False: block_table() is None, the callers run their op-by-op path (benchmarks compare both)
PANEL = 32
MIN_PANELS_PER_THREAD = 4  # linear(): below this a second thread costs more than it saves
MIN_TILES_PER_THREAD = 2  # run_blocks(): a second thread from this many 6-row tiles of rows per thread (less work
# loses more to the five barriers per block than the split of the weights gains)
MAX_K = 4096  # the kernel's zero row holds this many inputs (K, and memory + chunk tokens in attention)
INT8_MAX_INPUTS = 512  # int8 pointwise products: every partial sum stays below 2^24, exact in float32 (pointwise_u8)

_SOURCE = r"""
#define _GNU_SOURCE
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#define MAX_K 4096

int small_gemm_openmp(void) {
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
}

#if defined(__AVX512F__)
#include <immintrin.h>

int small_gemm_available(void) { return 1; }

static const float ZEROS[MAX_K]; /* the missing rows of a partial tile */

enum { EPI_BIAS = 0, EPI_RESIDUAL = 1, EPI_GELU = 2, EPI_RELU = 3 };

/* exp(x): x = n ln2 + r (Cody-Waite), exp(r) by its degree-7 Taylor polynomial (|r| <= ln2 / 2: < 1e-8 relative),
   times 2^n by scalef (underflows to denormals and zero). */
static inline __m512 exp16(__m512 x) {
    x = _mm512_max_ps(_mm512_min_ps(x, _mm512_set1_ps(88.7228f)), _mm512_set1_ps(-104.0f));
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.0f / 5040);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 720));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(p, n);
}

/* Exact GELU, x (1 + erf(x / sqrt 2)) / 2, with erf by Abramowitz-Stegun 7.1.26 (|error| < 1.5e-7): the form
   PyTorch's vectorised CPU GELU evaluates. */
static inline __m512 gelu16(__m512 x) {
    const __m512 one = _mm512_set1_ps(1.0f);
    __m512 z = _mm512_mul_ps(x, _mm512_set1_ps(0.70710678118654752f));
    __m512 az = _mm512_abs_ps(z);
    __m512 t = _mm512_div_ps(one, _mm512_fmadd_ps(_mm512_set1_ps(0.3275911f), az, one));
    __m512 p = _mm512_set1_ps(1.061405429f);
    p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(-1.453152027f));
    p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(1.421413741f));
    p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(-0.284496736f));
    p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(0.254829592f));
    p = _mm512_mul_ps(p, t);
    __m512 e = exp16(_mm512_sub_ps(_mm512_setzero_ps(), _mm512_mul_ps(z, z)));
    __m512 erf_abs = _mm512_fnmadd_ps(p, e, one);
    /* erf(z) carries z's sign */
    __m512 erf = _mm512_castsi512_ps(_mm512_or_si512(_mm512_castps_si512(erf_abs),
        _mm512_and_si512(_mm512_castps_si512(z), _mm512_set1_epi32((int)0x80000000))));
    return _mm512_mul_ps(_mm512_mul_ps(x, _mm512_set1_ps(0.5f)), _mm512_add_ps(one, erf));
}

static inline __attribute__((always_inline)) __m512 epilogue(__m512 acc, __m512 b, const float* res, int mode) {
    __m512 v = _mm512_add_ps(acc, b);
    if (mode == EPI_RESIDUAL) v = _mm512_add_ps(_mm512_loadu_ps(res), v);
    else if (mode == EPI_GELU) v = gelu16(v);
    else if (mode == EPI_RELU) v = _mm512_max_ps(v, _mm512_setzero_ps());
    return v;
}

/* Up to 6 rows x 32 columns: c[r, j] = epilogue(sum_k a_r[k] w[k, j] + bias[j]); each output one sequential
   fused-multiply-add chain over k, then the bias, then the epilogue (residual res[r, j] + ..., or GELU). */
static inline __attribute__((always_inline)) void tile6(const float* const* a, int64_t k, const float* w, __m512 b0,
        __m512 b1, float* c, int64_t ldc, const float* res, int64_t ldr, int rows, int mode) {
    __m512 c00 = _mm512_setzero_ps(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00,
           c30 = c00, c31 = c00, c40 = c00, c41 = c00, c50 = c00, c51 = c00;
    const float *a0 = a[0], *a1 = a[1], *a2 = a[2], *a3 = a[3], *a4 = a[4], *a5 = a[5];
    for (int64_t kk = 0; kk < k; kk++) {
        __m512 w0 = _mm512_loadu_ps(w + kk * 32), w1 = _mm512_loadu_ps(w + kk * 32 + 16), v;
        v = _mm512_set1_ps(a0[kk]); c00 = _mm512_fmadd_ps(v, w0, c00); c01 = _mm512_fmadd_ps(v, w1, c01);
        v = _mm512_set1_ps(a1[kk]); c10 = _mm512_fmadd_ps(v, w0, c10); c11 = _mm512_fmadd_ps(v, w1, c11);
        v = _mm512_set1_ps(a2[kk]); c20 = _mm512_fmadd_ps(v, w0, c20); c21 = _mm512_fmadd_ps(v, w1, c21);
        v = _mm512_set1_ps(a3[kk]); c30 = _mm512_fmadd_ps(v, w0, c30); c31 = _mm512_fmadd_ps(v, w1, c31);
        v = _mm512_set1_ps(a4[kk]); c40 = _mm512_fmadd_ps(v, w0, c40); c41 = _mm512_fmadd_ps(v, w1, c41);
        v = _mm512_set1_ps(a5[kk]); c50 = _mm512_fmadd_ps(v, w0, c50); c51 = _mm512_fmadd_ps(v, w1, c51);
    }
#define STORE_ROW(r, x0, x1)                                                                                  \
    if (rows > r) {                                                                                          \
        const float* rr = res ? res + r * ldr : 0;                                                           \
        __m512 o0 = epilogue(x0, b0, rr, mode), o1 = epilogue(x1, b1, rr ? rr + 16 : 0, mode);              \
        _mm512_storeu_ps(c + r * ldc, o0); _mm512_storeu_ps(c + r * ldc + 16, o1);                           \
    }
    STORE_ROW(0, c00, c01) STORE_ROW(1, c10, c11) STORE_ROW(2, c20, c21)
    STORE_ROW(3, c30, c31) STORE_ROW(4, c40, c41) STORE_ROW(5, c50, c51)
#undef STORE_ROW
}

/* A product segment: rows of a [m, k] (row stride lda) times packed panels w ([np, k, 32]) plus bias -> c (row
   stride ldc; panel p at column 32 p), with an epilogue (res: the residual, row stride ldr). */
typedef struct {
    const float* a; int64_t lda, m, k; const float* w; const float* bias; float* c; int64_t ldc;
    const float* res; int64_t ldr; int mode; int64_t np;
} segment;

static inline __attribute__((always_inline)) void seg_panel_mode(const segment* s, int64_t p, int64_t t0, int64_t t1,
                                                                 int mode) {
    const float* wp = s->w + p * s->k * 32;
    __m512 b0 = s->bias ? _mm512_loadu_ps(s->bias + p * 32) : _mm512_setzero_ps();
    __m512 b1 = s->bias ? _mm512_loadu_ps(s->bias + p * 32 + 16) : _mm512_setzero_ps();
    for (int64_t t = t0; t < t1; t++) {
        int64_t r0 = 6 * t;
        int rows = (int)(s->m - r0 < 6 ? s->m - r0 : 6);
        const float* a[6];
        for (int r = 0; r < 6; r++) a[r] = r < rows ? s->a + (r0 + r) * s->lda : ZEROS;
        tile6(a, s->k, wp, b0, b1, s->c + r0 * s->ldc + p * 32, s->ldc,
              s->res ? s->res + r0 * s->ldr + p * 32 : 0, s->ldr, rows, mode);
    }
}

/* panel p, row tiles [t0, t1) of a segment */
static void seg_panel(const segment* s, int64_t p, int64_t t0, int64_t t1) {
    if (s->mode == EPI_RESIDUAL) seg_panel_mode(s, p, t0, t1, EPI_RESIDUAL);
    else if (s->mode == EPI_GELU) seg_panel_mode(s, p, t0, t1, EPI_GELU);
    else if (s->mode == EPI_RELU) seg_panel_mode(s, p, t0, t1, EPI_RELU);
    else seg_panel_mode(s, p, t0, t1, EPI_BIAS);
}

/* Thread t of nt: its share of the (panel, row group) units of the segments; panels split first, rows only when
   there are fewer than two panels per thread. */
static void run_segments(const segment* segs, int count, int t, int nt) {
    int64_t panels = 0, units = 0;
    for (int i = 0; i < count; i++) panels += segs[i].np;
    int64_t groups = panels >= 2 * nt ? 1 : (2 * nt + panels - 1) / (panels ? panels : 1);
    int64_t g[4];
    for (int i = 0; i < count; i++) {
        int64_t tiles = (segs[i].m + 5) / 6;
        g[i] = groups < tiles ? groups : (tiles ? tiles : 1);
        units += segs[i].np * g[i];
    }
    int64_t u0 = units * t / nt, u1 = units * (t + 1) / nt, base = 0;
    for (int i = 0; i < count; i++) {
        const segment* s = segs + i;
        int64_t n_units = s->np * g[i], tiles = (s->m + 5) / 6;
        for (int64_t u = (u0 > base ? u0 : base); u < u1 && u < base + n_units; u++) {
            int64_t p = (u - base) / g[i], q = (u - base) % g[i];
            seg_panel(s, p, tiles * q / g[i], tiles * (q + 1) / g[i]);
        }
        base += n_units;
    }
}

static inline float hsum(__m512 v) { return _mm512_reduce_add_ps(v); }

/* y[r] = (x[r] - mean) / sqrt(var + eps) * w + b for rows r0 <= r < r1 (d a multiple of 16; w, b may be NULL) */
static void layer_norm_rows(const float* x, int64_t ldx, float* y, int64_t ldy, int64_t r0, int64_t r1, int64_t d,
                            const float* w, const float* b, float eps) {
    for (int64_t r = r0; r < r1; r++) {
        const float* xr = x + r * ldx;
        float* yr = y + r * ldy;
        __m512 s = _mm512_setzero_ps();
        for (int64_t j = 0; j < d; j += 16) s = _mm512_add_ps(s, _mm512_loadu_ps(xr + j));
        __m512 mean = _mm512_set1_ps(hsum(s) / (float)d), v = _mm512_setzero_ps();
        for (int64_t j = 0; j < d; j += 16) {
            __m512 c = _mm512_sub_ps(_mm512_loadu_ps(xr + j), mean);
            v = _mm512_fmadd_ps(c, c, v);
        }
        __m512 rstd = _mm512_set1_ps(1.0f / sqrtf(hsum(v) / (float)d + eps));
        for (int64_t j = 0; j < d; j += 16) {
            __m512 o = _mm512_mul_ps(_mm512_sub_ps(_mm512_loadu_ps(xr + j), mean), rstd);
            if (w) o = _mm512_mul_ps(o, _mm512_loadu_ps(w + j));
            if (b) o = _mm512_add_ps(o, _mm512_loadu_ps(b + j));
            _mm512_storeu_ps(yr + j, o);
        }
    }
}

/* Softmax numerators of one row of scores: e[j] = exp(scale s[j] - max) for j < l, 0 up to lp; returns their sum. */
static float softmax_row(float* s, int64_t l, int64_t lp, float scale) {
    __m512 sc = _mm512_set1_ps(scale), mx = _mm512_set1_ps(-INFINITY);
    int64_t j = 0;
    for (; j + 16 <= l; j += 16) mx = _mm512_max_ps(mx, _mm512_mul_ps(_mm512_loadu_ps(s + j), sc));
    __mmask16 tail = (__mmask16)((1u << (l - j)) - 1);
    if (l > j) mx = _mm512_mask_max_ps(mx, tail, mx, _mm512_mul_ps(_mm512_maskz_loadu_ps(tail, s + j), sc));
    __m512 m = _mm512_set1_ps(_mm512_reduce_max_ps(mx)), sum = _mm512_setzero_ps();
    for (j = 0; j + 16 <= l; j += 16) {
        __m512 e = exp16(_mm512_sub_ps(_mm512_mul_ps(_mm512_loadu_ps(s + j), sc), m));
        _mm512_storeu_ps(s + j, e);
        sum = _mm512_add_ps(sum, e);
    }
    if (l > j) {
        __m512 e = exp16(_mm512_sub_ps(_mm512_mul_ps(_mm512_maskz_loadu_ps(tail, s + j), sc), m));
        e = _mm512_maskz_mov_ps(tail, e);
        _mm512_storeu_ps(s + j, e);
        sum = _mm512_add_ps(sum, e);
        j += 16;
    }
    for (; j < lp; j += 16) _mm512_storeu_ps(s + j, _mm512_setzero_ps());
    return hsum(sum);
}

/* Attention of one head for query rows [r0, r1): keys/values are the m memory rows then the n chunk rows (row
   strides ldm, ldk); out = softmax(scale q k^T) v. kp, vp: the head's keys/values packed as 32-column panels
   (filled when pack is set), s: scores scratch [r1 - r0 (6-row aligned), lp], sums: [r1 - r0]. */
static void attention_rows(const float* q, int64_t ldq, int64_t r0, int64_t r1, const float* km, const float* vm,
                           int64_t ldm, int64_t m, const float* kc, const float* vc, int64_t ldk, int64_t n,
                           int64_t hd, float scale, float* out, int64_t ldo, float* kp, float* vp, float* s,
                           float* sums, int pack) {
    int64_t l = m + n, lp = (l + 31) / 32 * 32;
    if (pack) {
        memset(kp, 0, sizeof(float) * lp * hd);
        for (int64_t j = 0; j < l; j++) {
            const float* kr = j < m ? km + j * ldm : kc + (j - m) * ldk;
            float* dst = kp + (j / 32) * hd * 32 + (j % 32);
            for (int64_t c = 0; c < hd; c++) dst[c * 32] = kr[c];
        }
        for (int64_t j = 0; j < lp; j++) {
            const float* vr = j < m ? vm + j * ldm : (j < l ? vc + (j - m) * ldk : ZEROS);
            for (int64_t p = 0; p < hd / 32; p++) memcpy(vp + p * lp * 32 + j * 32, vr + p * 32, sizeof(float) * 32);
        }
    }
    int64_t rows = r1 - r0;
    segment sq = {q + r0 * ldq, ldq, rows, hd, kp, 0, s, lp, 0, 0, EPI_BIAS, lp / 32};
    run_segments(&sq, 1, 0, 1);
    for (int64_t r = 0; r < rows; r++) sums[r] = softmax_row(s + r * lp, l, lp, scale);
    segment sv = {s, lp, rows, lp, vp, 0, out + r0 * ldo, ldo, 0, 0, EPI_BIAS, hd / 32};
    run_segments(&sv, 1, 0, 1);
    for (int64_t r = 0; r < rows; r++) {
        __m512 div = _mm512_set1_ps(sums[r]);
        float* o = out + (r0 + r) * ldo;
        for (int64_t c = 0; c < hd; c += 16) _mm512_storeu_ps(o + c, _mm512_div_ps(_mm512_loadu_ps(o + c), div));
    }
}

/* The block barrier: spin a little, then sleep on a futex (Linux), so that on a machine busier than its cores a
   waiting thread hands its core to the thread it waits for instead of spinning through its time slice (OpenMP's
   own barrier spins far longer). Elsewhere: the OpenMP barrier. */
#if defined(_OPENMP) && defined(__linux__)
#include <linux/futex.h>
#include <stdatomic.h>
#include <sys/syscall.h>
#include <unistd.h>
typedef struct { atomic_int arrived, phase, sleepers; int threads; } block_barrier;
#define BARRIER_SPIN 100000 /* time-stamp counter ticks (~30 us) */
static void barrier_wait(block_barrier* b) {
    if (b->threads <= 1) return;
    int phase = atomic_load(&b->phase);
    if (atomic_fetch_add(&b->arrived, 1) == b->threads - 1) {
        atomic_store(&b->arrived, 0);
        atomic_fetch_add(&b->phase, 1);
        if (atomic_load(&b->sleepers)) syscall(SYS_futex, &b->phase, FUTEX_WAKE_PRIVATE, b->threads, 0, 0, 0);
        return;
    }
    for (uint64_t start = __rdtsc(); __rdtsc() - start < BARRIER_SPIN;) {
        if (atomic_load_explicit(&b->phase, memory_order_acquire) != phase) return;
        _mm_pause();
    }
    atomic_fetch_add(&b->sleepers, 1);
    while (atomic_load(&b->phase) == phase) syscall(SYS_futex, &b->phase, FUTEX_WAIT_PRIVATE, phase, 0, 0, 0);
    atomic_fetch_sub(&b->sleepers, 1);
}
#define BARRIER() barrier_wait(j->barrier)
#elif defined(_OPENMP)
typedef struct { int threads; } block_barrier;
#define BARRIER() _Pragma("omp barrier")
#else
typedef struct { int threads; } block_barrier;
#define BARRIER()
#endif

/* Everything one call of vit_blocks works on. */
typedef struct {
    int64_t depth, batch, n, m, d, heads, hidden;
    const float* const* weights; /* per block: ln1 w, b, qkv packed, bias, proj packed, bias, ln2 w, b,
                                    fc1 packed, bias, fc2 packed, bias */
    const float* eps;            /* per block: ln1, ln2 */
    float* states;               /* [depth + 1, batch, n, d]; plane 0 is the input */
    const float* const* mem_x;   /* per block: memory tokens [batch, m, d] (used when mem_kv is NULL) */
    const float* const* mem_kv;  /* per block: memory keys/values [batch, m, 2d] or NULL: computed into kvm */
    float* kvm;                  /* [depth, batch, m, 2d] */
    float* kvc;                  /* [depth, batch, n, 2d]: the chunk's keys/values */
    float *q, *mixed, *act, *scratch; /* shared: queries, attention outputs, fc1 activations; per thread */
    int64_t scratch_per_thread;
    block_barrier* barrier;
} job;


/* Thread t of nt: every product is split by output panels (each thread reads only its share of the weights, a
   whole-chunk tile of rows per panel: the weights are the traffic at these sizes, the 48 rows are not), attention by
   (stream, head, 6-row query tile) units, the layer norms are computed by every thread into its own buffer (a few
   microseconds, cheaper than a barrier). Per block: norm1, qkv (and the memory's keys/values), barrier, attention,
   barrier, proj + residual, barrier, norm2, fc1 + GELU, barrier, fc2 + residual, barrier. Each output is computed by
   one thread with the same arithmetic whatever the split, so the results do not depend on the thread count. */
static void run_blocks(const job* j, int t, int nt) {
    const int64_t d = j->d, n = j->n, m = j->m, rows = j->batch * n, mrows = j->batch * m, hd = d / j->heads;
    const int64_t l = m + n, lp = (l + 31) / 32 * 32, tiles = (n + 5) / 6, units = j->batch * j->heads * tiles;
    float* kp = j->scratch + t * j->scratch_per_thread;
    float *vp = kp + lp * hd, *s = vp + lp * hd, *sums = s + (n + 6) * lp;
    float* h = sums + n + 16;  /* this thread's norm of the chunk rows, then of the memory rows */
    float* hm = h + rows * d;
    const float scale = 1.0f / sqrtf((float)hd);
    const int64_t u0 = units * t / nt, u1 = units * (t + 1) / nt;
    for (int64_t i = 0; i < j->depth; i++) {
        const float* const* w = j->weights + 12 * i;
        const float* x = j->states + i * rows * d;
        float* y = j->states + (i + 1) * rows * d;
        float* kvc = j->kvc + i * rows * 2 * d;
        const int compute_memory = m > 0 && j->mem_kv[i] == 0;
        const float* kvm = m == 0 ? 0 : (compute_memory ? j->kvm + i * mrows * 2 * d : j->mem_kv[i]);
        const float *wkv = w[2] + d * d, *bkv = w[3] ? w[3] + d : 0;
        layer_norm_rows(x, d, h, d, 0, rows, d, w[0], w[1], j->eps[2 * i]);
        if (compute_memory) layer_norm_rows(j->mem_x[i], d, hm, d, 0, mrows, d, w[0], w[1], j->eps[2 * i]);
        {   /* queries -> q, the chunk's keys/values -> kvc, the memory's -> kvm when not given */
            segment segs[3] = {
                {h, d, rows, d, w[2], w[3], j->q, d, 0, 0, EPI_BIAS, d / 32},
                {h, d, rows, d, wkv, bkv, kvc, 2 * d, 0, 0, EPI_BIAS, 2 * d / 32},
                {hm, d, mrows, d, wkv, bkv, (float*)kvm, 2 * d, 0, 0, EPI_BIAS, 2 * d / 32}};
            run_segments(segs, compute_memory ? 3 : 2, t, nt);
        }
        BARRIER();
        for (int64_t u = u0; u < u1;) {  /* attention: this thread's units, one run of query tiles per (stream, head) */
            const int64_t group = u / tiles, b = group / j->heads, head = group % j->heads;
            const int64_t last = (group + 1) * tiles < u1 ? (group + 1) * tiles : u1;
            const int64_t q0 = 6 * (u - group * tiles), q1 = 6 * (last - group * tiles) < n ? 6 * (last - group * tiles) : n;
            const float* kmem = m ? kvm + b * m * 2 * d + head * hd : 0;
            const float* kch = kvc + b * n * 2 * d + head * hd;
            attention_rows(j->q + b * n * d + head * hd, d, q0, q1, kmem, kmem ? kmem + d : 0, 2 * d, m, kch, kch + d,
                           2 * d, n, hd, scale, j->mixed + b * n * d + head * hd, d, kp, vp, s, sums, 1);
            u = last;
        }
        BARRIER();
        {   /* y = x + proj(mixed) */
            segment seg = {j->mixed, d, rows, d, w[4], w[5], y, d, x, d, EPI_RESIDUAL, d / 32};
            run_segments(&seg, 1, t, nt);
        }
        BARRIER();
        layer_norm_rows(y, d, h, d, 0, rows, d, w[6], w[7], j->eps[2 * i + 1]);
        {   /* act = gelu(fc1(norm2(y))) */
            segment seg = {h, d, rows, d, w[8], w[9], j->act, j->hidden, 0, 0, EPI_GELU, j->hidden / 32};
            run_segments(&seg, 1, t, nt);
        }
        BARRIER();
        {   /* y += fc2(act) */
            segment seg = {j->act, j->hidden, rows, j->hidden, w[10], w[11], y, d, y, d, EPI_RESIDUAL, d / 32};
            run_segments(&seg, 1, t, nt);
        }
        if (i + 1 < j->depth) BARRIER();  /* the next norm reads every column of y (the last: the region's end) */
    }
}

/* Pre-norm ViT blocks on few tokens with memory keys/values (see the job fields); nthreads threads (OpenMP). */
int vit_blocks(int64_t depth, int64_t batch, int64_t n, int64_t m, int64_t d, int64_t heads, int64_t hidden,
               const float* const* weights, const float* eps, float* states, const float* const* mem_x,
               const float* const* mem_kv, float* kvm, float* kvc, int nthreads) {
    int64_t rows = batch * n, mrows = batch * m, hd = d / heads, lp = (m + n + 31) / 32 * 32;
    if (nthreads < 1) nthreads = 1;
    /* per thread: packed keys and values of a head, scores, sums, norms of the chunk and memory rows (64-byte
       multiples, so that no two threads write one cache line) */
    int64_t per_thread = (2 * lp * hd + (n + 6) * lp + n + 16 + (rows + mrows) * d + 15) / 16 * 16;
    int64_t shared = 2 * rows * d + rows * hidden;
    float* buffer = (float*)malloc(sizeof(float) * (shared + nthreads * per_thread));
    if (!buffer) return -1;
    block_barrier barrier = {0};
    barrier.threads = nthreads;
    job j = {depth, batch, n, m, d, heads, hidden, weights, eps, states, mem_x, mem_kv, kvm, kvc,
             buffer, buffer + rows * d, buffer + 2 * rows * d, buffer + shared, per_thread, &barrier};
#ifdef _OPENMP
    if (nthreads > 1) {
#pragma omp parallel num_threads(nthreads)
        {
            if (omp_get_num_threads() != nthreads) {  /* a smaller team than asked for */
#pragma omp single
                barrier.threads = omp_get_num_threads();
            }
            run_blocks(&j, omp_get_thread_num(), omp_get_num_threads());
        }
    } else
#endif
        run_blocks(&j, 0, 1);
    free(buffer);
    return 0;
}

/* out[m, n] (row stride n) = x[m, k] @ W^T + bias, W packed [n/32, k, 32], split over nthreads threads. */
void small_gemm(const float* x, int64_t m, int64_t k, const float* w, const float* bias, float* out, int64_t n,
                int nthreads) {
    segment seg = {x, k, m, k, w, bias, out, n, 0, 0, EPI_BIAS, n / 32};
#ifdef _OPENMP
    if (nthreads > 1) {
#pragma omp parallel num_threads(nthreads)
        run_segments(&seg, 1, omp_get_thread_num(), omp_get_num_threads());
        return;
    }
#endif
    run_segments(&seg, 1, 0, 1);
}

/* One output position (oy, ox) of a 3x3 convolution (padding 1, stride s) + bias + ReLU -> out [c], c a multiple of
   16; w9 [9, c]: the taps row-major (ky, kx). Depthwise (one_channel 0): x is NHWC [h, w, c]; the stem (one_channel
   1): x is one channel [h, w], each pixel feeding every output channel. Rows of x are ldx floats apart. Taps summed
   in order, then the bias (the border's missing taps skipped). */
static inline __attribute__((always_inline)) void conv3x3_at(const float* x, int64_t ldx, int one_channel,
        int64_t h, int64_t w, int64_t c, int64_t s, const float* w9, const float* b, float* out, int64_t oy,
        int64_t ox) {
    const int64_t pixel = one_channel ? 1 : c;
    for (int64_t c0 = 0; c0 < c; c0 += 16) {
        __m512 acc = _mm512_setzero_ps();
        for (int64_t ky = 0; ky < 3; ky++) {
            int64_t iy = oy * s - 1 + ky;
            if (iy < 0 || iy >= h) continue;
            for (int64_t kx = 0; kx < 3; kx++) {
                int64_t ix = ox * s - 1 + kx;
                if (ix < 0 || ix >= w) continue;
                const float* v = x + iy * ldx + ix * pixel;
                acc = _mm512_fmadd_ps(one_channel ? _mm512_set1_ps(*v) : _mm512_loadu_ps(v + c0),
                                      _mm512_loadu_ps(w9 + (ky * 3 + kx) * c + c0), acc);
            }
        }
        _mm512_storeu_ps(out + c0, _mm512_max_ps(_mm512_add_ps(acc, _mm512_loadu_ps(b + c0)), _mm512_setzero_ps()));
    }
}

/* Depthwise 3x3 convolution + bias + ReLU on one NHWC image x [h, w, c] -> y [ho, wo, c] (conv3x3_at). */
static void depthwise3x3_relu(const float* x, int64_t h, int64_t w, int64_t c, int64_t s, const float* w9,
                              const float* b, float* y, int64_t ho, int64_t wo) {
    for (int64_t oy = 0; oy < ho; oy++)
        for (int64_t ox = 0; ox < wo; ox++) conv3x3_at(x, w * c, 0, h, w, c, s, w9, b, y + (oy * wo + ox) * c, oy, ox);
}

/* The stem: a one-channel image x [h, w] (row stride ldx) -> y [ho, wo, c] (conv3x3_at); the interior positions of
   a 32-channel stem with all 18 tap vectors in registers (the same sums in the same order). */
static void stem3x3_relu(const float* x, int64_t ldx, int64_t h, int64_t w, int64_t c, int64_t s, const float* w9,
                         const float* b, float* y, int64_t ho, int64_t wo) {
    const __m512 zero = _mm512_setzero_ps();
    for (int64_t oy = 0; oy < ho; oy++) {
        int interior_row = oy * s - 1 >= 0 && oy * s + 1 < h;
        for (int64_t ox = 0; ox < wo; ox++) {
            float* out = y + (oy * wo + ox) * c;
            if (c != 32 || !interior_row || ox * s - 1 < 0 || ox * s + 1 >= w) {
                conv3x3_at(x, ldx, 1, h, w, c, s, w9, b, out, oy, ox);
                continue;
            }
            const float* p = x + (oy * s - 1) * ldx + ox * s - 1;
            __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
            for (int64_t t = 0; t < 9; t++) {
                __m512 v = _mm512_set1_ps(p[(t / 3) * ldx + t % 3]);
                a0 = _mm512_fmadd_ps(v, _mm512_loadu_ps(w9 + t * 32), a0);
                a1 = _mm512_fmadd_ps(v, _mm512_loadu_ps(w9 + t * 32 + 16), a1);
            }
            _mm512_storeu_ps(out, _mm512_max_ps(_mm512_add_ps(a0, _mm512_loadu_ps(b)), zero));
            _mm512_storeu_ps(out + 16, _mm512_max_ps(_mm512_add_ps(a1, _mm512_loadu_ps(b + 16)), zero));
        }
    }
}

#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
#define DSCONV_INT8 1
/* Rows of y [m, c] (c a multiple of 16, y >= 0: after a ReLU) as unsigned 8-bit: scale[r] = max_r / 255 (0 for a
   row of zeros), q = rint(y * (255 / max_r)) (round half to even, at most 255). */
static void quantize_u8_rows(const float* y, int64_t m, int64_t c, uint8_t* q, float* scale) {
    for (int64_t r = 0; r < m; r++) {
        const float* yr = y + r * c;
        __m512 mx = _mm512_setzero_ps();
        for (int64_t c0 = 0; c0 < c; c0 += 16) mx = _mm512_max_ps(mx, _mm512_loadu_ps(yr + c0));
        float top = _mm512_reduce_max_ps(mx);
        float inv = top > 0.0f ? 255.0f / top : 0.0f;
        scale[r] = top > 0.0f ? top / 255.0f : 0.0f;
        __m512 f = _mm512_set1_ps(inv);
        for (int64_t c0 = 0; c0 < c; c0 += 16) {
            __m512i v = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(yr + c0), f));
            _mm_storeu_si128((__m128i*)(q + r * c + c0), _mm512_cvtusepi32_epi8(v));
        }
    }
}

static inline __m512i broadcast4(const uint8_t* p) {
    int32_t v;
    memcpy(&v, p, 4);
    return _mm512_set1_epi32(v);
}

/* Up to 6 rows x 32 columns of an int8 pointwise product: c[r, j] = relu(float(sum_k a_r[k] w[k, j]) * (sa[r] *
   sw[j]) + bias[j]); a: unsigned 8-bit rows, w: signed 8-bit panel [k / 4, 32, 4] (VNNI: four k per lane), the sum
   exact in int32. */
static inline __attribute__((always_inline)) void tile6_u8(const uint8_t* const* a, int64_t k, const int8_t* w,
        __m512 s0, __m512 s1, __m512 b0, __m512 b1, const float* sa, float* c, int64_t ldc, int rows) {
    __m512i c00 = _mm512_setzero_si512(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00,
            c30 = c00, c31 = c00, c40 = c00, c41 = c00, c50 = c00, c51 = c00;
    const uint8_t *a0 = a[0], *a1 = a[1], *a2 = a[2], *a3 = a[3], *a4 = a[4], *a5 = a[5];
    for (int64_t kq = 0; kq < k / 4; kq++) {
        __m512i w0 = _mm512_loadu_si512(w + kq * 128), w1 = _mm512_loadu_si512(w + kq * 128 + 64), v;
        v = broadcast4(a0 + 4 * kq); c00 = _mm512_dpbusd_epi32(c00, v, w0); c01 = _mm512_dpbusd_epi32(c01, v, w1);
        v = broadcast4(a1 + 4 * kq); c10 = _mm512_dpbusd_epi32(c10, v, w0); c11 = _mm512_dpbusd_epi32(c11, v, w1);
        v = broadcast4(a2 + 4 * kq); c20 = _mm512_dpbusd_epi32(c20, v, w0); c21 = _mm512_dpbusd_epi32(c21, v, w1);
        v = broadcast4(a3 + 4 * kq); c30 = _mm512_dpbusd_epi32(c30, v, w0); c31 = _mm512_dpbusd_epi32(c31, v, w1);
        v = broadcast4(a4 + 4 * kq); c40 = _mm512_dpbusd_epi32(c40, v, w0); c41 = _mm512_dpbusd_epi32(c41, v, w1);
        v = broadcast4(a5 + 4 * kq); c50 = _mm512_dpbusd_epi32(c50, v, w0); c51 = _mm512_dpbusd_epi32(c51, v, w1);
    }
#define RESCALE(acc, s, b, q) _mm512_max_ps(_mm512_fmadd_ps(_mm512_cvtepi32_ps(acc), _mm512_mul_ps(s, q), b), z)
#define STORE_U8_ROW(r, x0, x1)                                                                                  \
    if (rows > r) {                                                                                             \
        __m512 q = _mm512_set1_ps(sa[r]), z = _mm512_setzero_ps();                                              \
        _mm512_storeu_ps(c + r * ldc, RESCALE(x0, s0, b0, q));                                                  \
        _mm512_storeu_ps(c + r * ldc + 16, RESCALE(x1, s1, b1, q));                                             \
    }
    STORE_U8_ROW(0, c00, c01) STORE_U8_ROW(1, c10, c11) STORE_U8_ROW(2, c20, c21)
    STORE_U8_ROW(3, c30, c31) STORE_U8_ROW(4, c40, c41) STORE_U8_ROW(5, c50, c51)
#undef STORE_U8_ROW
#undef RESCALE
}

/* relu(q [m, k] @ w + bias), rescaled by the rows' and columns' scales, into out [m, n] (n / 32 panels). */
static void pointwise_u8(const uint8_t* q, const float* sa, int64_t m, int64_t k, const int8_t* w, const float* sw,
                         const float* bias, float* out, int64_t n) {
    for (int64_t p = 0; p < n / 32; p++) {
        const int8_t* wp = w + p * k * 32;
        __m512 s0 = _mm512_loadu_ps(sw + p * 32), s1 = _mm512_loadu_ps(sw + p * 32 + 16);
        __m512 b0 = _mm512_loadu_ps(bias + p * 32), b1 = _mm512_loadu_ps(bias + p * 32 + 16);
        for (int64_t r0 = 0; r0 < m; r0 += 6) {
            int rows = (int)(m - r0 < 6 ? m - r0 : 6);
            const uint8_t* a[6];
            for (int r = 0; r < 6; r++) a[r] = r < rows ? q + (r0 + r) * k : (const uint8_t*)ZEROS;
            tile6_u8(a, k, wp, s0, s1, b0, b1, sa + r0, out + r0 * n + p * 32, n, rows);
        }
    }
}
#endif

int dsconv_int8_available(void) {
#ifdef DSCONV_INT8
    return 1;
#else
    return 0;
#endif
}

/* The geometry and weights of a stack (see dsconv_blocks). */
typedef struct {
    int64_t h, w, ldx, nb, stem_stride;
    const float *stem_w, *stem_b;
    const int64_t *channels, *strides;
    const float *const *dw, *const *dwb;
    const void* const* pw;       /* per block: packed float32 [cout / 32, cin, 32] or int8 [cout / 32, cin / 4, 32, 4] */
    const float *const *pwb, *const *pws; /* biases; column scales of an int8 block (NULL: a float32 block) */
    int64_t area;
} dsconv_net;

/* One image through the optional stem and nb MobileNet-v1 blocks, then the mean over positions -> pooled
   [channels[nb]]. buf: four scratch areas of `area` floats (the depthwise output, the pointwise output, the stem's
   output and then an int8 block's quantised input, its row scales). */
static void dsconv_image(const dsconv_net* net, const float* x, float* pooled, float* buf) {
    const int64_t area = net->area;
    int64_t h = net->h, w = net->w;
    float *mid = buf, *out = buf + area, *third = buf + 2 * area, *scales = buf + 3 * area;
    const float* cur = x;
    if (net->stem_w) {
        int64_t s = net->stem_stride, ho = (h - 1) / s + 1, wo = (w - 1) / s + 1;
        stem3x3_relu(x, net->ldx, h, w, net->channels[0], s, net->stem_w, net->stem_b, third, ho, wo);
        cur = third; h = ho; w = wo;
    }
    for (int64_t i = 0; i < net->nb; i++) {
        int64_t s = net->strides[i], ho = (h - 1) / s + 1, wo = (w - 1) / s + 1;
        int64_t cin = net->channels[i], cout = net->channels[i + 1];
        depthwise3x3_relu(cur, h, w, cin, s, net->dw[i], net->dwb[i], mid, ho, wo);
#ifdef DSCONV_INT8
        if (net->pws[i]) {
            uint8_t* q = (uint8_t*)third;
            quantize_u8_rows(mid, ho * wo, cin, q, scales);
            pointwise_u8(q, scales, ho * wo, cin, (const int8_t*)net->pw[i], net->pws[i], net->pwb[i], out, cout);
        } else
#endif
        {
            segment seg = {mid, cin, ho * wo, cin, (const float*)net->pw[i], net->pwb[i], out, cout, 0, 0, EPI_RELU,
                           cout / 32};
            for (int64_t p = 0; p < seg.np; p++) seg_panel(&seg, p, 0, (seg.m + 5) / 6);
        }
        cur = out; h = ho; w = wo;
    }
    int64_t c = net->channels[net->nb], positions = h * w;
    float scale = 1.0f / (float)positions;
    for (int64_t c0 = 0; c0 < c; c0 += 16) {
        __m512 acc = _mm512_setzero_ps();
        for (int64_t q = 0; q < positions; q++) acc = _mm512_add_ps(acc, _mm512_loadu_ps(cur + q * c + c0));
        _mm512_storeu_ps(pooled + c0, _mm512_mul_ps(acc, _mm512_set1_ps(scale)));
    }
}

/* MobileNet-v1 blocks (depthwise 3x3 + bias + ReLU, pointwise + bias + ReLU) on n images, then the mean over
   positions -> pooled [n, channels[nb]]. Without a stem (stem_w NULL) image i is NHWC [h, w, channels[0]] at
   x + i * image_stride (row stride ldx = w * channels[0]); with one, a one-channel [h, w] image (row stride ldx; the
   images may overlap) that the stem (3x3, stride stem_stride, padding 1, stem_w [9, channels[0]] + stem_b, ReLU)
   turns into the first block's input. Block i: dw[i] [9, channels[i]] taps, pw[i] packed float32 [channels[i+1] / 32,
   channels[i], 32] (pws[i] NULL) or int8 [channels[i+1] / 32, channels[i] / 4, 32, 4] with column scales pws[i] (its
   input quantised per position to unsigned 8 bits). scratch: nthreads x 4 x area floats. Images are dealt out to
   nthreads threads; each image's result does not depend on the others or on the thread count. Returns -1 when an
   int8 block is asked of a build without VNNI. */
int dsconv_blocks(const float* x, int64_t n, int64_t image_stride, int64_t ldx, int64_t h, int64_t w,
                  const float* stem_w, const float* stem_b, int64_t stem_stride, int64_t nb, const int64_t* channels,
                  const int64_t* strides, const float* const* dw, const float* const* dwb, const void* const* pw,
                  const float* const* pwb, const float* const* pws, float* pooled, float* scratch, int64_t area,
                  int nthreads) {
#ifndef DSCONV_INT8
    for (int64_t i = 0; i < nb; i++)
        if (pws[i]) return -1;
#endif
    dsconv_net net = {h, w, ldx, nb, stem_stride, stem_w, stem_b, channels, strides, dw, dwb, pw, pwb, pws, area};
    int64_t c = channels[nb];
#ifdef _OPENMP
    if (nthreads > 1) {
#pragma omp parallel for num_threads(nthreads) schedule(static)
        for (int64_t i = 0; i < n; i++)
            dsconv_image(&net, x + i * image_stride, pooled + i * c, scratch + 4 * area * omp_get_thread_num());
        return 0;
    }
#endif
    for (int64_t i = 0; i < n; i++) dsconv_image(&net, x + i * image_stride, pooled + i * c, scratch);
    return 0;
}

/* GELU of n floats (n a multiple of 16), for tests. */
void gelu_f32(const float* x, float* y, int64_t n) {
    for (int64_t i = 0; i < n; i += 16) _mm512_storeu_ps(y + i, gelu16(_mm512_loadu_ps(x + i)));
}
#else
int small_gemm_available(void) { return 0; }
int vit_blocks(int64_t depth, int64_t batch, int64_t n, int64_t m, int64_t d, int64_t heads, int64_t hidden,
               const float* const* weights, const float* eps, float* states, const float* const* mem_x,
               const float* const* mem_kv, float* kvm, float* kvc, int nthreads) { return -1; }
void small_gemm(const float* x, int64_t m, int64_t k, const float* w, const float* bias, float* out, int64_t n,
                int nthreads) {}
void gelu_f32(const float* x, float* y, int64_t n) {}
int dsconv_blocks(const float* x, int64_t n, int64_t image_stride, int64_t ldx, int64_t h, int64_t w,
                  const float* stem_w, const float* stem_b, int64_t stem_stride, int64_t nb, const int64_t* channels,
                  const int64_t* strides, const float* const* dw, const float* const* dwb, const void* const* pw,
                  const float* const* pwb, const float* const* pws, float* pooled, float* scratch, int64_t area,
                  int nthreads) { return -1; }
int dsconv_int8_available(void) { return 0; }
#endif
"""

_LIBRARY = native.NativeLibrary(
    "small_gemm",
    _SOURCE,
    {
        "small_gemm_available": (native.INT, []),
        "small_gemm_openmp": (native.INT, []),
        "small_gemm": (None, [native.PTR, native.I64, native.I64, native.PTR, native.PTR, native.PTR, native.I64,
                              native.INT]),
        "vit_blocks": (native.INT, [native.I64] * 7 + [native.PTR] * 7 + [native.INT]),
        "gelu_f32": (None, [native.PTR, native.PTR, native.I64]),
        "dsconv_blocks": (native.INT, [native.PTR] + [native.I64] * 5 + [native.PTR] * 2 + [native.I64] * 2
                          + [native.PTR] * 9 + [native.I64, native.INT]),
        "dsconv_int8_available": (native.INT, []),
    },
    switch="TYMPAN_SMALL_GEMM",
    optional_flags=("-fopenmp",),
)
_packed: DerivedCache[tuple[Tensor, Tensor | None]] = DerivedCache()  # per nn.Linear: its packed weight, padded bias


def available() -> bool:
    """Whether the kernel is built and this CPU has AVX-512 (else :func:`linear` is ``F.linear``)."""
    lib = _LIBRARY.lib()
    return lib is not None and bool(lib.small_gemm_available())


def openmp() -> bool:
    """Whether the kernel was built with OpenMP (else it runs on one thread)."""
    lib = _LIBRARY.lib()
    return lib is not None and bool(lib.small_gemm_openmp())


def pack_weight(weight: Tensor) -> Tensor:
    """``[N, K]`` -> ``[ceil(N/32), K, 32]``: column panels, each row of a panel contiguous (a last partial panel
    padded with zero columns)."""
    n, k = weight.shape
    weight = weight.detach()
    if n % PANEL:
        weight = torch.cat([weight, weight.new_zeros(PANEL - n % PANEL, k)])
    return weight.t().reshape(k, -1, PANEL).permute(1, 0, 2).contiguous()


def _packed_linear(module: nn.Linear) -> tuple[Tensor, Tensor | None]:
    """The module's weight packed (:func:`pack_weight`) and its bias padded to whole panels, cached while the weight's
    and bias's storage and version are unchanged (inference-tensor weights keep no version: packed afresh)."""
    weight, bias = module.weight, module.bias
    padded = -(-weight.shape[0] // PANEL) * PANEL

    def build() -> tuple[Tensor, Tensor | None]:
        if bias is None:
            return pack_weight(weight), None
        return pack_weight(weight), torch.cat([bias.detach(), bias.new_zeros(padded - bias.shape[0])]).contiguous()

    cached = _packed.get(module, (weight,) if bias is None else (weight, bias), build)
    return build() if cached is None else cached


def _packed_weight(module: nn.Linear) -> Tensor:
    return _packed_linear(module)[0]


def _inference_ok(x: Tensor) -> bool:
    """The call-level conditions: enabled, no autograd or autocast, not being traced (a foreign call is invisible to
    export), a float32 CPU input."""
    return (ENABLED and not torch.is_grad_enabled() and not torch.is_autocast_enabled("cpu")
            and x.dtype == torch.float32 and x.device.type == "cpu" and not native.tracing())


def _applies(module: nn.Module, x: Tensor) -> bool:
    if type(module) is not nn.Linear or not _inference_ok(x):
        return False
    weight = module.weight
    if weight.dtype != torch.float32:
        return False
    return weight.shape[1] <= MAX_K and weight.device.type == "cpu" and available()


def _threads(work: int, min_work: int = 1) -> int:
    return max(1, min(torch.get_num_threads(), work // max(min_work, 1)))


def linear(module: nn.Module, x: Tensor) -> Tensor:
    """``module(x)`` for an ``nn.Linear`` (``x [..., K]`` -> ``[..., N]``) through the packed-weight kernel when it
    applies (see the module doc), else the module itself. More than one intra-op thread splits the panels. An ``N``
    that is not a multiple of 32 (a 521-class head) runs on zero-padded panels, its extra columns dropped."""
    if not _applies(module, x):
        return module(x)
    n, k = module.weight.shape
    padded = -(-n // PANEL) * PANEL
    rows = x.reshape(-1, k)
    if not rows.is_contiguous():
        rows = rows.contiguous()
    packed, bias = _packed_linear(module)
    out = torch.empty(rows.shape[0], padded, dtype=x.dtype, device=x.device)
    _LIBRARY.lib().small_gemm(rows.data_ptr(), rows.shape[0], k, packed.data_ptr(),
                              None if bias is None else bias.data_ptr(), out.data_ptr(), padded,
                              _threads(padded // PANEL, MIN_PANELS_PER_THREAD))
    if padded != n:
        out = out[:, :n].contiguous()
    return out.view(*x.shape[:-1], n)


@dataclass
class BlockTable:
    """The C kernel's view of a stack of blocks: weight pointers (packed products), norm epsilons, sizes; valid
    while :func:`_block_modules` of the stack and the storage and version of their tensors are unchanged (the table
    holds the tensors, so a replaced one cannot reuse an address)."""

    modules: list[nn.Module]
    dicts: list[dict]  # the ``_parameters`` of the norms and products
    fingerprint: tuple[int, ...] | None  # of the tensors below (tympan.ops.weights.fingerprint)
    tensors: list[Tensor]
    pointers: ctypes.Array
    eps: ctypes.Array
    keep: list[Tensor]  # the packed weights and contiguous vectors the pointers point into
    dim: int
    heads: int
    hidden: int

    def valid(self, modules: list[nn.Module]) -> bool:
        """Whether the table still describes ``modules`` (a fresh :func:`_block_modules`)."""
        if modules != self.modules:  # identity: modules define no __eq__
            return False
        tensors = [t for params in self.dicts for t in params.values() if t is not None]
        return fingerprint(tensors) == self.fingerprint

_tables: weakref.WeakKeyDictionary[nn.Module, BlockTable] = weakref.WeakKeyDictionary()
_PER_BLOCK = 8  # norm1, qkv, proj, norm2, fc1, fc2, GELU, the block itself


def _block_modules(blocks: nn.Module) -> list[nn.Module] | None:
    """Per block: norm1, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2, mlp.act and the block (read through the module
    dicts: cheap enough to check every call); None when a block is not shaped so."""
    out: list[nn.Module] = []
    try:
        for block in blocks._modules.values():
            parts, attn, mlp = block._modules, block._modules["attn"]._modules, block._modules["mlp"]._modules
            out += (parts["norm1"], attn["qkv"], attn["proj"], parts["norm2"], mlp["fc1"], mlp["fc2"], mlp["act"], block)
    except (KeyError, AttributeError):
        return None
    return out


def _parameter_dicts(modules: list[nn.Module]) -> list[dict]:
    """The ``_parameters`` of the norms and products among ``modules`` (the GELU and the blocks have none of their
    own that the kernel reads)."""
    return [module._parameters for i, module in enumerate(modules) if i % _PER_BLOCK < 6]


def _plain_block(modules: list[nn.Module]) -> bool:
    """A plain inference ViT block: LayerNorms, nn.Linear products, an exact GELU, no active dropout."""
    norm1, qkv, proj, norm2, fc1, fc2, act, block = modules
    if not (type(norm1) is type(norm2) is nn.LayerNorm and type(qkv) is type(proj) is type(fc1) is type(fc2) is nn.Linear
            and type(act) is nn.GELU and act.approximate == "none"):
        return False
    attn, mlp = block.attn, block.mlp
    dropping = [m for m in (getattr(mlp, "drop", None), getattr(attn, "proj_drop", None), getattr(block, "drop_path", None))
                if m is not None and m.training and getattr(m, "p", 0.0)]
    return not dropping and not (attn.training and getattr(attn, "attn_drop", 0.0)) and hasattr(attn, "num_heads")


def block_table(blocks: nn.Module, x: Tensor) -> BlockTable | None:
    """The :func:`run_blocks` table of ``blocks`` (an ``nn.ModuleList`` of :class:`tympan.models.layers.Block`) for
    input ``x``, or None when the kernel does not apply (the caller runs its module path). Rebuilt when a module,
    or a weight's identity, storage or version changes."""
    if not BLOCKS_ENABLED or not _inference_ok(x) or not isinstance(blocks, nn.Module) or not available():
        return None
    modules = _block_modules(blocks)
    if not modules:
        return None
    table = _tables.get(blocks)
    if table is not None and table.valid(modules):
        return table
    table = _build_table(modules)
    if table is not None:
        _tables[blocks] = table
    return table


def _build_table(modules: list[nn.Module]) -> BlockTable | None:
    per_block = [modules[i:i + _PER_BLOCK] for i in range(0, len(modules), _PER_BLOCK)]
    if not all(_plain_block(parts) for parts in per_block):
        return None
    qkv, fc1 = per_block[0][1], per_block[0][4]
    heads, dim, hidden = per_block[0][7].attn.num_heads, qkv.in_features, fc1.out_features
    if dim % PANEL or hidden % PANEL or dim % heads or (dim // heads) % PANEL or max(dim, hidden) > MAX_K:
        return None
    dicts = _parameter_dicts(modules)
    tensors = [t for params in dicts for t in params.values() if t is not None]
    if any(t.is_inference() or t.dtype != torch.float32 or t.device.type != "cpu" for t in tensors):
        return None
    slots: list[Tensor | None] = []
    eps: list[float] = []
    for norm1, qkv, proj, norm2, fc1, fc2, _, block in per_block:
        shapes = [tuple(qkv.weight.shape), tuple(proj.weight.shape), tuple(fc1.weight.shape), tuple(fc2.weight.shape),
                  tuple(norm1.normalized_shape), tuple(norm2.normalized_shape)]
        if block.attn.num_heads != heads or shapes != [(3 * dim, dim), (dim, dim), (hidden, dim), (dim, hidden), (dim,),
                                                       (dim,)]:
            return None
        slots += [norm1.weight, norm1.bias, _packed_weight(qkv), qkv.bias, _packed_weight(proj), proj.bias,
                  norm2.weight, norm2.bias, _packed_weight(fc1), fc1.bias, _packed_weight(fc2), fc2.bias]
        eps += [norm1.eps, norm2.eps]
    keep = [t.detach().contiguous() for t in slots if t is not None]
    contiguous = iter(keep)
    pointers = [None if t is None else next(contiguous).data_ptr() for t in slots]
    return BlockTable(modules, dicts, fingerprint(tensors), tensors,
                      (ctypes.c_void_p * len(pointers))(*pointers), (ctypes.c_float * len(eps))(*eps), keep,
                      dim, heads, hidden)


def _pointer(t: Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def run_blocks(table: BlockTable, states: Tensor, mem_x: Sequence[Tensor] | None = None,
               mem_kv: Sequence[Tensor | None] | None = None, kvm: Tensor | None = None, kvc: Tensor | None = None) -> None:
    """Run the blocks of ``table`` in place on ``states [depth + 1, B, N, D]`` (contiguous): plane 0 is the input,
    plane ``i + 1`` becomes block ``i``'s output.

    With memory (``M > 0`` tokens): block ``i`` attends over its memory's keys/values then the chunk's; they are
    ``mem_kv[i]`` (``[B, M, 2D]``) when given, else computed from ``mem_x[i]`` (``[B, M, D]``, through the
    block's norm1 and qkv) into ``kvm[i]`` (``[depth, B, M, 2D]``). ``kvc`` (``[depth, B, N, 2D]``) receives the
    chunk's keys/values of every block.
    """
    depth, batch, n, dim = states.shape[0] - 1, states.shape[1], states.shape[2], states.shape[3]
    m = 0 if mem_x is None else mem_x[0].shape[1]
    if len(table.eps) != 2 * depth or dim != table.dim or not states.is_contiguous() or m + n > MAX_K:
        raise ValueError(f"states {tuple(states.shape)} do not fit the {len(table.eps) // 2} blocks of dim {table.dim}")
    if kvc is None:
        kvc = states.new_empty(depth, batch, n, 2 * dim)
    x_ptrs = (ctypes.c_void_p * depth)()
    kv_ptrs = (ctypes.c_void_p * depth)()
    keep = []
    if m:
        for i in range(depth):
            given = None if mem_kv is None else mem_kv[i]
            if given is not None:
                given = given.contiguous()
                keep.append(given)
                kv_ptrs[i] = given.data_ptr()
            else:
                x = mem_x[i].contiguous()
                keep.append(x)
                x_ptrs[i] = x.data_ptr()
        if kvm is None and any(ptr is None for ptr in kv_ptrs):
            raise ValueError("kvm is needed when a block's memory keys/values are computed")
    status = _LIBRARY.lib().vit_blocks(depth, batch, n, m, dim, table.heads, table.hidden, ctypes.addressof(table.pointers),
                                       ctypes.addressof(table.eps), states.data_ptr(), ctypes.addressof(x_ptrs),
                                       ctypes.addressof(kv_ptrs), _pointer(kvm), kvc.data_ptr(),
                                       _threads((batch * n + 5) // 6, MIN_TILES_PER_THREAD))
    if status:
        raise MemoryError("vit_blocks could not allocate its scratch")


def gelu(x: Tensor) -> Tensor:
    """The kernel's GELU of a float32 tensor with a multiple of 16 elements (for tests)."""
    x = x.contiguous()
    out = torch.empty_like(x)
    _LIBRARY.lib().gelu_f32(x.data_ptr(), out.data_ptr(), x.numel())
    return out


@dataclass
class DSConvStack:
    """The C kernel's view of a stack of MobileNet-v1 blocks (from :func:`dsconv_stack`): sizes and pointers to
    weights it keeps alive."""

    channels: list[int]
    strides: list[int]
    arrays: tuple  # ctypes arrays: channels, strides, taps, their biases, packed pointwise, their biases, scales
    keep: list[Tensor]
    stem: tuple[int, int, int] | None = None  # (stride, taps pointer, bias pointer) of a one-channel 3x3 stem
    int8: bool = False


def int8_available() -> bool:
    """Whether the kernel runs int8 pointwise products (AVX-512 VNNI): :func:`dsconv_stack` ``int8=True``."""
    lib = _LIBRARY.lib() if available() else None
    return lib is not None and bool(lib.dsconv_int8_available())


def quantize_pointwise(weight: Tensor) -> tuple[Tensor, Tensor]:
    """A pointwise weight ``[C_out, C_in]`` as int8, symmetric per output channel: (q ``[C_out, C_in]`` int8, scale
    ``[C_out]``), ``weight ~= q * scale[:, None]``."""
    weight = weight.detach().float()
    scale = weight.abs().amax(1).clamp_min(1e-12) / 127.0
    q = torch.round(weight / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scale


def quantize_u8_rows(x: Tensor) -> tuple[Tensor, Tensor]:
    """Rows of ``x [..., C]`` (``>= 0``: after a ReLU) as unsigned 8-bit: (q as float32 integers 0..255, scale
    ``[..., 1]``), ``x ~= q * scale``; scale = row max / 255 (0 for a row of zeros), q = round-half-even of
    ``x * (255 / max)``: the kernel's quantisation, bit for bit."""
    top = x.amax(-1, keepdim=True)
    positive, full = top > 0, torch.full_like(top, 255.0)
    # tensor / tensor: IEEE division, as the kernel (a Python number over a tensor is a reciprocal times it)
    inv = torch.where(positive, full / torch.where(positive, top, 1.0), 0.0)
    scale = torch.where(positive, top / full, 0.0)
    return torch.round(x * inv).clamp_(0, 255), scale


def pointwise_u8(x: Tensor, q_weight: Tensor, w_scale: Tensor, bias: Tensor) -> Tensor:
    """``relu(x @ weight.T + bias)`` as the kernel's int8 blocks compute it, in PyTorch ops (the path without the
    kernel, and the tests' reference): ``x`` quantised per row (:func:`quantize_u8_rows`), the integer product exact
    (in float32: every partial sum is below 2^24 for ``C_in <=`` :data:`INT8_MAX_INPUTS`), rescaled by the row and
    column scales."""
    if x.shape[-1] > INT8_MAX_INPUTS:
        raise ValueError(f"pointwise_u8 takes at most {INT8_MAX_INPUTS} input channels, got {x.shape[-1]}")
    q, row_scale = quantize_u8_rows(x)
    acc = F.linear(q, q_weight.float())
    return (acc * (w_scale * row_scale) + bias).relu_()


def _as_taps(weight: Tensor) -> Tensor:
    """A 3x3 kernel ``[C, 1, 3, 3]`` as the kernel's taps ``[9, C]`` (tap-major)."""
    return weight.reshape(weight.shape[0], 9).t().contiguous()


def dsconv_stack(layers: Sequence[tuple[Tensor, Tensor, Tensor, Tensor, int]],
                 stem: tuple[Tensor, Tensor, int] | None = None, int8: bool = False) -> DSConvStack | None:
    """Prepare blocks for :func:`run_dsconv`: per block (depthwise weight ``[C, 1, 3, 3]``, its bias ``[C]``,
    pointwise weight ``[C_out, C]``, its bias ``[C_out]``, stride). ``stem``: (weight ``[C0, 1, 3, 3]``, bias, stride)
    of a one-channel 3x3 convolution (padding 1) + ReLU run first, in the same call, on one-channel images. ``int8``:
    the pointwise products in int8 (:func:`quantize_pointwise` weights; each block's input quantised per position to
    unsigned 8 bits, as :func:`pointwise_u8`). ``None`` when the kernel does not apply (not built, no AVX-512, or no
    VNNI for int8, disabled, channels not multiples of 32, other shapes or dtypes)."""
    if not (ENABLED and layers and available()) or (int8 and not int8_available()):
        return None
    channels, strides, keep = [int(layers[0][0].shape[0])], [], []
    taps, tap_bias, packed, packed_bias, scales = [], [], [], [], []
    tensors_in = [t for layer in layers for t in layer[:4]] + ([] if stem is None else list(stem[:2]))
    if any(x.dtype != torch.float32 or x.device.type != "cpu" for x in tensors_in):
        return None
    for dw, dw_b, pw, pw_b, stride in layers:
        cin, cout = int(dw.shape[0]), int(pw.shape[0])
        if (tuple(dw.shape) != (cin, 1, 3, 3) or tuple(pw.shape) != (cout, cin) or cin != channels[-1]
                or cin % PANEL or cout % PANEL or cin > (INT8_MAX_INPUTS if int8 else MAX_K) or stride < 1):  # fmt: skip
            return None
        with torch.inference_mode(False), torch.no_grad():
            if int8:
                q, scale = quantize_pointwise(pw)
                weight = q.view(cout // PANEL, PANEL, cin // 4, 4).permute(0, 2, 1, 3).contiguous()
                parts = (_as_taps(dw), dw_b.contiguous(), weight, pw_b.contiguous(), scale.contiguous())
            else:
                parts = (_as_taps(dw), dw_b.contiguous(), pack_weight(pw), pw_b.contiguous())
        keep += parts
        for target, x in zip((taps, tap_bias, packed, packed_bias), parts):
            target.append(x.data_ptr())
        scales.append(parts[4].data_ptr() if int8 else None)
        channels.append(cout)
        strides.append(int(stride))
    stem_view = None
    if stem is not None:
        weight, bias, stride = stem
        if tuple(weight.shape) != (channels[0], 1, 3, 3) or tuple(bias.shape) != (channels[0],) or stride < 1:
            return None
        with torch.inference_mode(False), torch.no_grad():
            stem_parts = (_as_taps(weight), bias.contiguous())
        keep += stem_parts
        stem_view = (int(stride), stem_parts[0].data_ptr(), stem_parts[1].data_ptr())
    pointers = [(ctypes.c_void_p * len(v))(*v) for v in (taps, tap_bias, packed, packed_bias, scales)]
    arrays = ((ctypes.c_int64 * len(channels))(*channels), (ctypes.c_int64 * len(strides))(*strides), *pointers)
    return DSConvStack(channels, strides, arrays, keep, stem_view, int8)


def run_dsconv(stack: DSConvStack, x: Tensor) -> Tensor:
    """Images through the stack, averaged over positions: ``[n, C_last]``. Without a stem ``x`` is NHWC ``[n, h, w,
    C]`` (float32, after the stem's ReLU); with one, one-channel images ``[n, h, w]`` (float32; any view whose rows
    are contiguous, e.g. overlapping patches cut from one spectrogram: nothing is copied). Results match the
    convolutions and products of PyTorch to float rounding (each output's sum in a fixed order, independent of
    ``n`` and of the thread count); an int8 stack matches :func:`pointwise_u8`'s blocks the same way."""
    if stack.stem is None:
        n, h, w, c = x.shape
        if c != stack.channels[0]:
            raise ValueError(f"the stack takes {stack.channels[0]} channels, got {c}")
        x = x.contiguous()
        image_stride, row_stride = h * w * c, w * c
        stem_stride, stem_w, stem_b = 0, None, None
        area, hh, ww = 1, h, w
    else:
        if x.ndim != 3:
            raise ValueError(f"a stack with a stem takes one-channel images [n, h, w], got {tuple(x.shape)}")
        n, h, w = x.shape
        if x.stride(2) != 1 or x.dtype != torch.float32:
            x = x.float().contiguous()
        image_stride, row_stride = x.stride(0), x.stride(1)
        stem_stride, stem_w, stem_b = stack.stem
        hh, ww = (h - 1) // stem_stride + 1, (w - 1) // stem_stride + 1
        area = hh * ww * stack.channels[0]
    for cin, cout, s in zip(stack.channels[:-1], stack.channels[1:], stack.strides):
        hh, ww = (hh - 1) // s + 1, (ww - 1) // s + 1
        area = max(area, hh * ww * max(cin, cout))
    threads = _threads(n)
    scratch = torch.empty(threads * 4 * area, dtype=torch.float32)
    out = torch.empty(n, stack.channels[-1], dtype=torch.float32)
    if n and _LIBRARY.lib().dsconv_blocks(x.data_ptr(), n, image_stride, row_stride, h, w, stem_w, stem_b,
                                          stem_stride, len(stack.strides), *stack.arrays, out.data_ptr(),
                                          scratch.data_ptr(), area, threads):  # fmt: skip
        raise RuntimeError("the kernel was built without AVX-512 VNNI: no int8 blocks")
    return out
