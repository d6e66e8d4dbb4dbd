"""``x @ W^T + b`` for the few-row products of streaming steps (SAT-T: 48 tokens), on prepacked weights.

MKL repacks the weight on every call, which for 48 rows costs about as much as the product, and a streaming step
makes ~50 such calls on 22 MB of weights. Here each ``nn.Linear`` weight is packed once into 32-column panels
(``[N/32, K, 32]``, kept while the weight's storage and version are unchanged) and a small AVX-512 C kernel
(:mod:`tympan.ops.native`: built on first use, ``TYMPAN_SMALL_GEMM=0`` disables it) computes 6 x 32 output tiles
with the K loop innermost: each output is one sequential fused-multiply-add chain over K, then the bias.

:func:`linear` falls back to ``F.linear`` whenever the kernel does not apply: no compiler or no AVX-512, autograd,
autocast, non-float32 or non-CPU tensors, ``N`` not a multiple of 32, or a module other than a plain ``nn.Linear``
(e.g. the int8 mode's ``Int8Linear``). More than one intra-op thread splits the panels (:func:`native.parallel_ranges`).
"""

from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tympan.ops import native

__all__ = ["linear", "available", "pack_weight"]

ENABLED = True  # False: linear() is the module itself (e.g. to count FLOPs, which the C kernel hides from torch)
PANEL = 32
MIN_PANELS_PER_THREAD = 4  # below this a second thread costs more than it saves

_SOURCE = r"""
#include <stdint.h>
#include <string.h>

#if defined(__AVX512F__)
#include <immintrin.h>

/* One 6 x 32 tile: c[r, j] = sum_k a[r, k] w[k, j] + bias[j] (a row stride lda, c row stride ldc). */
static inline void tile6(const float* a, int64_t lda, int64_t k, const float* w, __m512 b0, __m512 b1, float* c,
                         int64_t ldc) {
    __m512 c00 = _mm512_setzero_ps(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00,
           c30 = c00, c31 = c00, c40 = c00, c41 = c00, c50 = c00, c51 = c00;
    const float *a0 = a, *a1 = a + lda, *a2 = a + 2 * lda, *a3 = a + 3 * lda, *a4 = a + 4 * lda, *a5 = a + 5 * lda;
    for (int64_t kk = 0; kk < k; kk++) {
        __m512 w0 = _mm512_loadu_ps(w + kk * 32), w1 = _mm512_loadu_ps(w + kk * 32 + 16), v;
        v = _mm512_set1_ps(a0[kk]); c00 = _mm512_fmadd_ps(v, w0, c00); c01 = _mm512_fmadd_ps(v, w1, c01);
        v = _mm512_set1_ps(a1[kk]); c10 = _mm512_fmadd_ps(v, w0, c10); c11 = _mm512_fmadd_ps(v, w1, c11);
        v = _mm512_set1_ps(a2[kk]); c20 = _mm512_fmadd_ps(v, w0, c20); c21 = _mm512_fmadd_ps(v, w1, c21);
        v = _mm512_set1_ps(a3[kk]); c30 = _mm512_fmadd_ps(v, w0, c30); c31 = _mm512_fmadd_ps(v, w1, c31);
        v = _mm512_set1_ps(a4[kk]); c40 = _mm512_fmadd_ps(v, w0, c40); c41 = _mm512_fmadd_ps(v, w1, c41);
        v = _mm512_set1_ps(a5[kk]); c50 = _mm512_fmadd_ps(v, w0, c50); c51 = _mm512_fmadd_ps(v, w1, c51);
    }
    _mm512_storeu_ps(c, _mm512_add_ps(c00, b0)); _mm512_storeu_ps(c + 16, _mm512_add_ps(c01, b1)); c += ldc;
    _mm512_storeu_ps(c, _mm512_add_ps(c10, b0)); _mm512_storeu_ps(c + 16, _mm512_add_ps(c11, b1)); c += ldc;
    _mm512_storeu_ps(c, _mm512_add_ps(c20, b0)); _mm512_storeu_ps(c + 16, _mm512_add_ps(c21, b1)); c += ldc;
    _mm512_storeu_ps(c, _mm512_add_ps(c30, b0)); _mm512_storeu_ps(c + 16, _mm512_add_ps(c31, b1)); c += ldc;
    _mm512_storeu_ps(c, _mm512_add_ps(c40, b0)); _mm512_storeu_ps(c + 16, _mm512_add_ps(c41, b1)); c += ldc;
    _mm512_storeu_ps(c, _mm512_add_ps(c50, b0)); _mm512_storeu_ps(c + 16, _mm512_add_ps(c51, b1));
}

int small_gemm_available(void) { return 1; }

/* out[m, n] (row stride n) = x[m, k] @ W^T + bias for the 32-column panels p0 <= p < p1 of W packed [n/32, k, 32]. */
void small_gemm(const float* x, int64_t m, int64_t k, const float* w, const float* bias, float* out, int64_t n,
                int64_t p0, int64_t p1) {
    float pad_a[6 * 4096], pad_c[6 * 32];
    for (int64_t p = p0; p < p1; p++) {
        const float* wp = w + p * k * 32;
        __m512 b0 = bias ? _mm512_loadu_ps(bias + p * 32) : _mm512_setzero_ps();
        __m512 b1 = bias ? _mm512_loadu_ps(bias + p * 32 + 16) : _mm512_setzero_ps();
        int64_t i = 0;
        for (; i + 6 <= m; i += 6) tile6(x + i * k, k, k, wp, b0, b1, out + i * n + p * 32, n);
        if (i < m) { /* last rows: zero-padded to a full tile */
            int64_t rows = m - i;
            memset(pad_a, 0, sizeof(float) * 6 * k);
            memcpy(pad_a, x + i * k, sizeof(float) * rows * k);
            tile6(pad_a, k, k, wp, b0, b1, pad_c, 32);
            for (int64_t r = 0; r < rows; r++) memcpy(out + (i + r) * n + p * 32, pad_c + r * 32, sizeof(float) * 32);
        }
    }
}
#else
int small_gemm_available(void) { return 0; }
void small_gemm(const float* x, int64_t m, int64_t k, const float* w, const float* bias, float* out, int64_t n,
                int64_t p0, int64_t p1) {}
#endif
"""

MAX_K = 4096  # the kernel's padding buffer holds 6 rows of at most this many inputs

_LIBRARY = native.NativeLibrary(
    "small_gemm",
    _SOURCE,
    {
        "small_gemm_available": (native.INT, []),
        "small_gemm": (None, [native.PTR, native.I64, native.I64, native.PTR, native.PTR, native.PTR, native.I64,
                              native.I64, native.I64]),
    },
    switch="TYMPAN_SMALL_GEMM",
)
_packed: weakref.WeakKeyDictionary[nn.Linear, tuple[tuple[int, ...], Tensor]] = weakref.WeakKeyDictionary()


def available() -> bool:
    """Whether the kernel is built and this CPU has AVX-512 (else :func:`linear` is ``F.linear``)."""
    lib = _LIBRARY.lib()
    return lib is not None and bool(lib.small_gemm_available())


def pack_weight(weight: Tensor) -> Tensor:
    """``[N, K]`` -> ``[N/32, K, 32]``: column panels, each row of a panel contiguous."""
    n, k = weight.shape
    return weight.detach().t().reshape(k, n // PANEL, PANEL).permute(1, 0, 2).contiguous()


def _packed_weight(module: nn.Linear) -> Tensor:
    weight = module.weight
    key = (weight.data_ptr(), weight._version, *weight.shape)
    entry = _packed.get(module)
    if entry is None or entry[0] != key:
        entry = (key, pack_weight(weight))
        _packed[module] = entry
    return entry[1]


def _applies(module: nn.Module, x: Tensor) -> bool:
    if not ENABLED or type(module) is not nn.Linear or torch.is_grad_enabled() or torch.is_autocast_enabled("cpu"):
        return False
    weight = module.weight
    if weight.is_inference() or x.dtype != torch.float32 or weight.dtype != torch.float32 or x.device.type != "cpu":
        return False
    n, k = weight.shape
    return n % PANEL == 0 and k <= MAX_K and weight.device.type == "cpu" and available()


def linear(module: nn.Module, x: Tensor) -> Tensor:
    """``module(x)`` for an ``nn.Linear`` (``x [..., K]`` -> ``[..., N]``) through the packed-weight kernel when it
    applies (see the module doc), else the module itself."""
    if not _applies(module, x):
        return module(x)
    weight, bias = module.weight, module.bias
    n, k = weight.shape
    rows = x.reshape(-1, k)
    if not rows.is_contiguous():
        rows = rows.contiguous()
    packed = _packed_weight(module)
    if bias is not None and not bias.is_contiguous():
        bias = bias.contiguous()
    out = torch.empty(rows.shape[0], n, dtype=x.dtype, device=x.device)
    fn = _LIBRARY.lib().small_gemm
    x_ptr, w_ptr, out_ptr = rows.data_ptr(), packed.data_ptr(), out.data_ptr()
    b_ptr = None if bias is None else bias.data_ptr()
    m = rows.shape[0]
    native.parallel_ranges(n // PANEL, lambda p0, p1: fn(x_ptr, m, k, w_ptr, b_ptr, out_ptr, n, p0, p1),
                           min_items=MIN_PANELS_PER_THREAD)
    return out.view(*x.shape[:-1], n)
