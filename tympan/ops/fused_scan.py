"""Fused CPU selective scan (forward, float32): one C loop per channel, compiled once with the system C compiler.

Eager PyTorch spends the N=1 scan (DASS) on separate passes for bias + softplus, exp, the products, layout moves
and the scan steps, each over the whole [b, d, L] tensor. Here each channel is one pass over time in tiles of
``TILE`` steps, all in cache:

1. vectorised over the tile: ``dt = softplus(delta + bias)``, ``dt * u`` and the decays ``exp(dt * A_k)``;
2. the recurrence ``h_k = a_k h_k + (dt u) B_k`` and ``y = sum_k C_k h_k`` step by step (scalar, one FMA chain
   per state; the N states of a step are independent);
3. vectorised: the ``D * u`` skip and the SiLU(z) gate, written straight to ``y``.

exp and log1p are short polynomials (Cephes-style range reduction, about 1 ulp; the softplus is the stable
``max(x, 0) + log1p(exp(-|x|))`` with torch's threshold of 20) so the compiler vectorises them with no
fast-math flag. Channels are split over ``torch.get_num_threads()`` threads. Memory: the inputs, ``y``
and a few tile buffers per thread, linear in L.

The library is built on first use by :mod:`tympan.ops.native` (cached per source, compiler and CPU); without a
working C compiler, or with ``TYMPAN_FUSED_SCAN=0`` (or ``TYMPAN_NATIVE=0``), :func:`available` is False and
callers use the eager path.
"""

from __future__ import annotations

import torch
from torch import Tensor

from tympan.ops import native

__all__ = ["available", "fused_scan_forward", "cross_scan_merge", "build_error"]

TILE = 512

SOURCE = r"""
#include <stdint.h>
#include <string.h>
#include <stdlib.h>

#define TILE %(tile)d

static inline float exp_poly(float x) {
    x = x < -87.33654f ? -87.33654f : x;
    x = x > 88.37626f ? 88.37626f : x;
    float n = __builtin_floorf(x * 1.44269504088896341f + 0.5f);
    float r = __builtin_fmaf(n, -0.693359375f, x);
    r = __builtin_fmaf(n, 2.12194440e-4f, r);
    float p = 1.9875691500e-4f;
    p = __builtin_fmaf(p, r, 1.3981999507e-3f);
    p = __builtin_fmaf(p, r, 8.3334519073e-3f);
    p = __builtin_fmaf(p, r, 4.1665795894e-2f);
    p = __builtin_fmaf(p, r, 1.6666665459e-1f);
    p = __builtin_fmaf(p, r, 5.0000001201e-1f);
    p = __builtin_fmaf(p, r * r, r) + 1.0f;
    int32_t bits = ((int32_t)n + 127) << 23;
    float s;
    memcpy(&s, &bits, sizeof s);
    return p * s;
}

/* log1p(t) for t in [0, 1]: 2 atanh(s), s = t / (2 + t) <= 1/3, odd series to s^15 (relative error < 2e-9). */
static inline float log1p_unit(float t) {
    float s = t / (2.0f + t);
    float s2 = s * s;
    float q = 1.0f / 15.0f;
    q = __builtin_fmaf(q, s2, 1.0f / 13.0f);
    q = __builtin_fmaf(q, s2, 1.0f / 11.0f);
    q = __builtin_fmaf(q, s2, 1.0f / 9.0f);
    q = __builtin_fmaf(q, s2, 1.0f / 7.0f);
    q = __builtin_fmaf(q, s2, 1.0f / 5.0f);
    q = __builtin_fmaf(q, s2, 1.0f / 3.0f);
    q = __builtin_fmaf(q, s2, 1.0f);
    return 2.0f * s * q;
}

static inline float softplus20(float x) {
    float ax = x < 0.0f ? -x : x;
    float pos = x > 0.0f ? x : 0.0f;
    float v = pos + log1p_unit(exp_poly(-ax));
    return x > 20.0f ? x : v;
}

/* N = 1: CB channels at a time, so the CB recurrences (one FMA chain each) overlap in the core. */
#define CB 8
static void scan_n1(int64_t c0, int64_t c1, int64_t channels, int64_t length, int64_t per_group,
                    const float *u, const float *delta, const float *A,
                    const float *B, int64_t sb0, int64_t sb1, int64_t sb3,
                    const float *C, int64_t sc0, int64_t sc1, int64_t sc3,
                    const float *Dskip, const float *z, const float *bias, int softplus,
                    float *y, float *last, float *work) {
    float *dec = work, *x = work + CB * TILE, *dt = work + 2 * CB * TILE;
    for (int64_t first = c0; first < c1; first += CB) {
        int64_t m = c1 - first < CB ? c1 - first : CB;
        float h[CB];
        for (int64_t j = 0; j < CB; ++j) h[j] = 0.0f;
        for (int64_t t0 = 0; t0 < length; t0 += TILE) {
            int64_t n = length - t0 < TILE ? length - t0 : TILE;
            for (int64_t j = 0; j < m; ++j) {
                int64_t ch = first + j, b = ch / channels, c = ch %% channels, g = c / per_group;
                const float *u_t = u + ch * length + t0, *d_t = delta + ch * length + t0;
                const float *B_t = B + b * sb0 + g * sb1 + t0 * sb3;
                float bias_c = bias ? bias[c] : 0.0f, a_c = A[c];
                float *dec_j = dec + j * TILE, *x_j = x + j * TILE;
                if (softplus) {
                    for (int64_t t = 0; t < n; ++t) dt[t] = softplus20(d_t[t] + bias_c);
                } else {
                    for (int64_t t = 0; t < n; ++t) dt[t] = d_t[t] + bias_c;
                }
                for (int64_t t = 0; t < n; ++t) dec_j[t] = exp_poly(dt[t] * a_c);
                if (sb3 == 1) {
                    for (int64_t t = 0; t < n; ++t) x_j[t] = dt[t] * u_t[t] * B_t[t];
                } else {
                    for (int64_t t = 0; t < n; ++t) x_j[t] = dt[t] * u_t[t] * B_t[t * sb3];
                }
            }
            if (m == CB) {
                for (int64_t t = 0; t < n; ++t) {
                    for (int64_t j = 0; j < CB; ++j) {
                        h[j] = __builtin_fmaf(dec[j * TILE + t], h[j], x[j * TILE + t]);
                        x[j * TILE + t] = h[j];
                    }
                }
            } else {
                for (int64_t t = 0; t < n; ++t) {
                    for (int64_t j = 0; j < m; ++j) {
                        h[j] = __builtin_fmaf(dec[j * TILE + t], h[j], x[j * TILE + t]);
                        x[j * TILE + t] = h[j];
                    }
                }
            }
            for (int64_t j = 0; j < m; ++j) {
                int64_t ch = first + j, b = ch / channels, c = ch %% channels, g = c / per_group;
                const float *u_t = u + ch * length + t0, *C_t = C + b * sc0 + g * sc1 + t0 * sc3;
                const float *hs = x + j * TILE;
                float *y_t = y + ch * length + t0;
                float D_c = Dskip ? Dskip[c] : 0.0f;
                if (sc3 == 1) {
                    for (int64_t t = 0; t < n; ++t) y_t[t] = __builtin_fmaf(D_c, u_t[t], C_t[t] * hs[t]);
                } else {
                    for (int64_t t = 0; t < n; ++t) y_t[t] = __builtin_fmaf(D_c, u_t[t], C_t[t * sc3] * hs[t]);
                }
                if (z) {
                    const float *z_t = z + ch * length + t0;
                    for (int64_t t = 0; t < n; ++t) y_t[t] *= z_t[t] / (1.0f + exp_poly(-z_t[t]));
                }
            }
        }
        if (last) for (int64_t j = 0; j < m; ++j) last[first + j] = h[j];
    }
}

/* Any N, one channel at a time; channels [c0, c1) of the flattened [batch * channels]; strides in elements. */
static void scan_any(int64_t c0, int64_t c1, int64_t channels, int64_t length, int64_t nstate, int64_t per_group,
                     const float *u, const float *delta, const float *A,
                     const float *B, int64_t sb0, int64_t sb1, int64_t sb2, int64_t sb3,
                     const float *C, int64_t sc0, int64_t sc1, int64_t sc2, int64_t sc3,
                     const float *Dskip, const float *z, const float *bias, int softplus,
                     float *y, float *last, float *work) {
    float *dt = work, *du = work + TILE, *ypre = work + 2 * TILE;
    float *decay = work + 3 * TILE, *h = decay + (size_t)TILE * nstate;
    for (int64_t ch = c0; ch < c1; ++ch) {
        int64_t b = ch / channels, c = ch %% channels, g = c / per_group;
        const float *u_c = u + ch * length, *d_c = delta + ch * length;
        const float *z_c = z ? z + ch * length : 0;
        float *y_c = y + ch * length;
        const float *A_c = A + c * nstate;
        const float *B_c = B + b * sb0 + g * sb1, *C_c = C + b * sc0 + g * sc1;
        float bias_c = bias ? bias[c] : 0.0f, D_c = Dskip ? Dskip[c] : 0.0f;
        for (int64_t k = 0; k < nstate; ++k) h[k] = 0.0f;
        for (int64_t t0 = 0; t0 < length; t0 += TILE) {
            int64_t n = length - t0 < TILE ? length - t0 : TILE;
            const float *u_t = u_c + t0, *d_t = d_c + t0;
            if (softplus) {
                for (int64_t t = 0; t < n; ++t) dt[t] = softplus20(d_t[t] + bias_c);
            } else {
                for (int64_t t = 0; t < n; ++t) dt[t] = d_t[t] + bias_c;
            }
            for (int64_t t = 0; t < n; ++t) du[t] = dt[t] * u_t[t];
            for (int64_t k = 0; k < nstate; ++k) {
                float a_k = A_c[k];
                float *dk = decay + k * TILE;
                for (int64_t t = 0; t < n; ++t) dk[t] = exp_poly(dt[t] * a_k);
            }
            for (int64_t t = 0; t < n; ++t) {
                float acc = 0.0f, xx = du[t];
                int64_t tb = (t0 + t) * sb3, tc = (t0 + t) * sc3;
                for (int64_t k = 0; k < nstate; ++k) {
                    float hk = __builtin_fmaf(decay[k * TILE + t], h[k], xx * B_c[k * sb2 + tb]);
                    h[k] = hk;
                    acc = __builtin_fmaf(C_c[k * sc2 + tc], hk, acc);
                }
                ypre[t] = acc;
            }
            float *y_t = y_c + t0;
            if (z_c) {
                const float *z_t = z_c + t0;
                for (int64_t t = 0; t < n; ++t)
                    y_t[t] = __builtin_fmaf(D_c, u_t[t], ypre[t]) * (z_t[t] / (1.0f + exp_poly(-z_t[t])));
            } else {
                for (int64_t t = 0; t < n; ++t) y_t[t] = __builtin_fmaf(D_c, u_t[t], ypre[t]);
            }
        }
        if (last) memcpy(last + ch * nstate, h, sizeof(float) * nstate);
    }
}

/* Entry: channels [c0, c1) of the flattened [batch * channels]; B/C grouped [b, g, n, L] with element strides.
   Returns 0, or 1 when the work buffer cannot be allocated. */
int tympan_scan_f32(int64_t c0, int64_t c1, int64_t channels, int64_t length, int64_t nstate,
                    int64_t per_group, const float *u, const float *delta, const float *A,
                    const float *B, int64_t sb0, int64_t sb1, int64_t sb2, int64_t sb3,
                    const float *C, int64_t sc0, int64_t sc1, int64_t sc2, int64_t sc3,
                    const float *Dskip, const float *z, const float *bias, int softplus,
                    float *y, float *last) {
    size_t words = nstate == 1 ? (size_t)(2 * CB + 1) * TILE : (size_t)TILE * (3 + nstate) + nstate;
    float *work = (float *)malloc(sizeof(float) * words);
    if (!work) return 1;
    if (nstate == 1)
        scan_n1(c0, c1, channels, length, per_group, u, delta, A, B, sb0, sb1, sb3, C, sc0, sc1, sc3,
                Dskip, z, bias, softplus, y, last, work);
    else
        scan_any(c0, c1, channels, length, nstate, per_group, u, delta, A, B, sb0, sb1, sb2, sb3,
                 C, sc0, sc1, sc2, sc3, Dskip, z, bias, softplus, y, last, work);
    free(work);
    return 0;
}

/* VMamba/DASS cross scan with N = 1, merged: for channels [c0, c1) of [batch * channels], the four readings of the
   map (0 rows, 1 columns, 2 rows reversed, 3 columns reversed) are scanned and their outputs summed into out
   [b, c, H*W] (row order). proj [b, 4, R + 2, L] holds each direction's low-rank dt, B and C at every map
   position, in row order for directions 0 and 2 and in column order for 1 and 3; dt_w [4, channels, R]; A, Dskip,
   bias [4, channels]. Per channel the map is transposed once into a scratch buffer, so every direction reads
   contiguous memory (forwards or backwards), and the four recurrences run interleaved. */
int tympan_cross_scan_f32(int64_t c0, int64_t c1, int64_t channels, int64_t height, int64_t width, int64_t rank,
                          const float *u, const float *proj, const float *dt_w, const float *A,
                          const float *Dskip, const float *bias, float *out) {
    int64_t length = height * width, rows = rank + 2;
    float *work = (float *)malloc(sizeof(float) * ((size_t)TILE * 9 + 2 * (size_t)length));
    if (!work) return 1;
    float *dec = work, *x = work + 4 * TILE, *del = work + 8 * TILE;
    float *ut = work + 9 * TILE, *ot = ut + length;
    for (int64_t ch = c0; ch < c1; ++ch) {
        int64_t b = ch / channels, c = ch %% channels;
        const float *u_c = u + ch * length;
        float *o = out + ch * length;
        for (int64_t i = 0; i < height; ++i)
            for (int64_t j = 0; j < width; ++j) ut[j * height + i] = u_c[i * width + j];
        for (int64_t p = 0; p < length; ++p) { o[p] = 0.0f; ot[p] = 0.0f; }
        float h[4] = {0.0f, 0.0f, 0.0f, 0.0f};
        for (int64_t t0 = 0; t0 < length; t0 += TILE) {
            int64_t n = length - t0 < TILE ? length - t0 : TILE;
            for (int64_t k = 0; k < 4; ++k) {
                /* positions of this tile in the direction's own order: [t0, t0 + n) forwards, the mirror backwards */
                int64_t first = k >= 2 ? length - t0 - n : t0;
                const float *src = (k & 1) ? ut : u_c;
                const float *P = proj + (b * 4 + k) * rows * length;
                const float *w = dt_w + (k * channels + c) * rank;
                float a_c = A[k * channels + c], bias_c = bias[k * channels + c];
                float *dk = dec + k * TILE, *xk = x + k * TILE;
                for (int64_t t = 0; t < n; ++t) del[t] = bias_c;
                for (int64_t r = 0; r < rank; ++r) {
                    const float *Pr = P + r * length + first;
                    float wr = w[r];
                    for (int64_t t = 0; t < n; ++t) del[t] = __builtin_fmaf(wr, Pr[t], del[t]);
                }
                const float *Bp = P + rank * length + first, *up = src + first;
                for (int64_t t = 0; t < n; ++t) {
                    float d = softplus20(del[t]);
                    dk[t] = exp_poly(d * a_c);
                    xk[t] = d * up[t] * Bp[t];
                }
            }
            /* four independent recurrences; 2 and 3 walk their buffers backwards */
            float *d0 = dec, *d1 = dec + TILE, *d2 = dec + 2 * TILE, *d3 = dec + 3 * TILE;
            float *x0 = x, *x1 = x + TILE, *x2 = x + 2 * TILE, *x3 = x + 3 * TILE;
            float h0 = h[0], h1 = h[1], h2 = h[2], h3 = h[3];
            for (int64_t t = 0; t < n; ++t) {
                int64_t s = n - 1 - t;
                h0 = __builtin_fmaf(d0[t], h0, x0[t]); x0[t] = h0;
                h1 = __builtin_fmaf(d1[t], h1, x1[t]); x1[t] = h1;
                h2 = __builtin_fmaf(d2[s], h2, x2[s]); x2[s] = h2;
                h3 = __builtin_fmaf(d3[s], h3, x3[s]); x3[s] = h3;
            }
            h[0] = h0; h[1] = h1; h[2] = h2; h[3] = h3;
            for (int64_t k = 0; k < 4; ++k) {
                int64_t first = k >= 2 ? length - t0 - n : t0;
                const float *src = ((k & 1) ? ut : u_c) + first;
                const float *Cp = proj + (b * 4 + k) * rows * length + (rank + 1) * length + first;
                float d_c = Dskip[k * channels + c];
                float *dst = ((k & 1) ? ot : o) + first, *hs = x + k * TILE;
                for (int64_t t = 0; t < n; ++t) dst[t] += __builtin_fmaf(d_c, src[t], Cp[t] * hs[t]);
            }
        }
        for (int64_t i = 0; i < height; ++i)
            for (int64_t j = 0; j < width; ++j) o[i * width + j] += ot[j * height + i];
    }
    free(work);
    return 0;
}
"""

_LIBRARY = native.NativeLibrary(
    "fused_scan", SOURCE % {"tile": TILE},
    {"tympan_scan_f32": (native.INT, [native.I64] * 6 + [native.PTR] * 4 + [native.I64] * 4 + [native.PTR]
                         + [native.I64] * 4 + [native.PTR] * 3 + [native.INT] + [native.PTR] * 2),
     "tympan_cross_scan_f32": (native.INT, [native.I64] * 6 + [native.PTR] * 7)},
    switch="TYMPAN_FUSED_SCAN")


def _load():
    return _LIBRARY.lib()


def available() -> bool:
    """True when the fused kernel is built (or builds now) and loads."""
    return _load() is not None


def build_error() -> str | None:
    """Why the fused kernel is unavailable (``None`` when it is available)."""
    _load()
    return _LIBRARY.error


def _ptr(t: Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def fused_scan_forward(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None,
                       z: Tensor | None, delta_bias: Tensor | None, softplus: bool,
                       return_last_state: bool) -> tuple[Tensor, Tensor | None]:
    """y [b, d, L] (and the last state [b, d, n]) for float32 CPU inputs; B, C grouped [b, g, n, L] (any strides).

    The caller checks shapes and dtypes (see :func:`tympan.ops.chunked_scan.selective_scan_chunked`).
    """
    lib = _load()
    if lib is None:
        raise RuntimeError(f"fused scan unavailable: {_LIBRARY.error}")
    u, delta, A = u.contiguous(), delta.contiguous(), A.contiguous()
    z = None if z is None else z.contiguous()
    D = None if D is None else D.contiguous()
    delta_bias = None if delta_bias is None else delta_bias.contiguous()
    b, d, length = u.shape
    n = A.shape[1]
    per_group = d // B.shape[1]
    y = torch.empty_like(u)
    last = u.new_empty(b, d, n) if return_last_state else None
    args = (d, length, n, per_group, _ptr(u), _ptr(delta), _ptr(A), _ptr(B), *B.stride(), _ptr(C), *C.stride(),
            _ptr(D), _ptr(z), _ptr(delta_bias), int(bool(softplus)), _ptr(y), _ptr(last))

    def run(start: int, stop: int) -> None:
        if lib.tympan_scan_f32(start, stop, *args):
            raise MemoryError("fused scan: out of memory for its tile buffers")

    native.parallel_ranges(b * d, run, min_items=max(1, 32768 // max(length, 1)))
    return y, last


def cross_scan_merge(u: Tensor, proj: Tensor, dt_weight: Tensor, A: Tensor, D: Tensor,
                     delta_bias: Tensor) -> Tensor:
    """DASS's four-direction scan of a map, merged, in one pass per channel (float32 CPU inference, N = 1).

    ``u`` [b, c, H, W]; ``proj`` [b, 4, R + 2, H*W]: each direction's x_proj output (low-rank dt, B, C) at every
    map position in row order; ``dt_weight`` [4, c, R]; ``A``, ``D``, ``delta_bias`` [4, c]. Returns the sum over
    directions of the selective scans (softplus on) as a row-order map [b, c, H, W], equal to
    ``cross_merge(selective_scan(cross_scan(u), ...))`` up to float rounding, without forming the four readings,
    the full-size dt or the per-direction outputs (memory: ``u``, the output and one map per thread).
    """
    lib = _load()
    if lib is None:
        raise RuntimeError(f"fused scan unavailable: {_LIBRARY.error}")
    b, c, h, w = u.shape
    rank = dt_weight.shape[-1]
    if proj.shape != (b, 4, rank + 2, h * w) or A.shape != (4, c) or dt_weight.shape != (4, c, rank):
        raise ValueError(f"cross_scan_merge: proj {tuple(proj.shape)}, A {tuple(A.shape)}, dt_weight "
                         f"{tuple(dt_weight.shape)} do not fit u {tuple(u.shape)} with state size 1")
    u, dt_weight = u.float().contiguous(), dt_weight.float().contiguous()
    proj = proj.float().view(b, 4, rank + 2, h, w)
    rows = proj[:, 0::2].reshape(b, 2, rank + 2, h * w)
    cols = proj[:, 1::2].transpose(-1, -2).reshape(b, 2, rank + 2, h * w)  # directions 1 and 3 in column order
    proj = torch.stack([rows, cols], 2).reshape(b, 4, rank + 2, h * w)
    A, D, delta_bias = (t.float().contiguous() for t in (A, D, delta_bias))
    out = torch.empty(b, c, h, w)

    def run(start: int, stop: int) -> None:
        if lib.tympan_cross_scan_f32(start, stop, c, h, w, rank, u.data_ptr(), proj.data_ptr(),
                                     dt_weight.data_ptr(), A.data_ptr(), D.data_ptr(), delta_bias.data_ptr(),
                                     out.data_ptr()):
            raise MemoryError("cross scan: out of memory for its tile buffers")

    native.parallel_ranges(b * c, run)
    return out
