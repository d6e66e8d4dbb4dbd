"""A short-time log-mel spectrogram in one C pass (the default model's YAMNet frontend), frames 16 at a time.

``torch.fft.rfft`` on a 5 s clip costs little, but the frontend around it (framing, window, complex magnitude, the
mel product, the log) is a row of separate passes over ``[frames, 257]`` buffers and Python calls: about an eighth
of tagging a short file (0.55 of 4.7 ms for 5 s). Here each group of 16 frames is framed, windowed, transformed,
reduced to its mel bands and written out while it sits in L1/L2, with the 16 frames in the 16 lanes of a vector
(structure of arrays: every butterfly is the same operation on 16 frames, so the compiler vectorises it for whatever
SIMD the CPU has).

The transform is a real FFT of ``nfft = 512`` samples through a complex radix-2 FFT of 256 points (even samples as
the real part, odd as the imaginary) and the usual split into the even/odd halves; twiddles are computed in double
and stored as float. Mel bands sum only the bins where their weights are nonzero (found in the matrix given, so the
result is the dense product's). Samples past the end of a row read as zeros (YAMNet pads with zeros), so no padded
copy is made. The log is left to the caller (one vectorised pass in torch).

Numerics: float32 throughout; the magnitude spectrum is within ~1e-7 of float64 (relative to its largest bin), and
the log-mel within ~5e-5 of the torch path (pocketfft) on real audio (the log magnifies quiet bins' rounding). The
library is built on first use (:mod:`tympan.ops.native`; ``TYMPAN_LOG_MEL=0`` or ``TYMPAN_NATIVE=0`` disables it):
without it :func:`mel_energies` returns ``None`` and the caller takes its torch path.
"""

from __future__ import annotations

import torch
from torch import Tensor

from tympan.ops import native

__all__ = ["available", "mel_energies"]

ENABLED = True  # False: mel_energies() returns None (the torch path; tests and benchmarks compare both)
NFFT = 512
HALF = NFFT // 2  # the complex FFT's size
BINS = HALF + 1

_SOURCE = r"""
#include <math.h>
#include <stdint.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#ifdef __AVX512F__
#include <immintrin.h>
#endif

#define L 16
#define N 256         /* complex FFT size: a 512-sample real frame as 256 complex samples */
#define LOGN 8
#define BINS 257

static float tw_re[N / 2], tw_im[N / 2];     /* exp(-2 pi i k / 256) */
static float post_re[BINS], post_im[BINS];   /* exp(-2 pi i k / 512) */
static int bitrev[N];
static int ready = 0;

static void init_tables(void) {  /* idempotent: concurrent first calls write the same values */
    if (__atomic_load_n(&ready, __ATOMIC_ACQUIRE)) return;
    const double pi = 3.14159265358979323846;
    for (int k = 0; k < N / 2; k++) { tw_re[k] = (float)cos(2 * pi * k / N); tw_im[k] = (float)-sin(2 * pi * k / N); }
    for (int k = 0; k < BINS; k++) { post_re[k] = (float)cos(pi * k / N); post_im[k] = (float)-sin(pi * k / N); }
    for (int m = 0; m < N; m++) {
        int r = 0;
        for (int b = 0; b < LOGN; b++) r |= ((m >> b) & 1) << (LOGN - 1 - b);
        bitrev[m] = r;
    }
    __atomic_store_n(&ready, 1, __ATOMIC_RELEASE);
}

/* 16 frames -> their mel band energies + offset. x0: first sample of the first frame; frames `hop` apart; samples
   at or past `avail` (counted from x0) read as 0; lanes >= `used` are computed on zeros and not written. */
#ifdef __AVX512F__
/* r[l] (lane j = sample j of frame l) -> r[j] (lane l = frame l): unpack, then 128-bit lane shuffles */
static inline void transpose16(__m512 r[16]) {
    __m512 t[16];
    for (int i = 0; i < 8; i++) {
        t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
    }
    for (int i = 0; i < 4; i++) {
        r[4 * i] = _mm512_shuffle_ps(t[4 * i], t[4 * i + 2], 0x44);
        r[4 * i + 1] = _mm512_shuffle_ps(t[4 * i], t[4 * i + 2], 0xEE);
        r[4 * i + 2] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0x44);
        r[4 * i + 3] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0xEE);
    }
    for (int i = 0; i < 4; i++) {
        t[i] = _mm512_shuffle_f32x4(r[i], r[i + 4], 0x88);
        t[i + 4] = _mm512_shuffle_f32x4(r[i], r[i + 4], 0xDD);
        t[i + 8] = _mm512_shuffle_f32x4(r[i + 8], r[i + 12], 0x88);
        t[i + 12] = _mm512_shuffle_f32x4(r[i + 8], r[i + 12], 0xDD);
    }
    for (int i = 0; i < 8; i++) {
        r[i] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0x88);
        r[i + 8] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0xDD);
    }
}
#endif

/* 16 frames -> their mel band energies + offset. x0: first sample of the first frame; frames `hop` apart; samples
   at or past `avail` (counted from x0) read as 0; lanes >= `used` are computed on zeros and not written. `window`
   is zero-padded to 2N samples. The FFT input goes in bit-reversed order (even samples real, odd imaginary). */
static void block(const float* x0, int64_t avail, int64_t hop, int used, int window_len, const float* window,
                  const float* mel, int mels, const int* lo, const int* hi, float offset, float* out) {
    float re[N][L], im[N][L], mag[BINS][L];
    const int chunks = (window_len + 15) / 16;  /* 16-sample chunks that meet the window */
#ifdef __AVX512F__
    if (used == L && (int64_t)(L - 1) * hop + chunks * 16 <= avail) {  /* every read in bounds: 16 x 16 transposes */
        for (int c = 0; c < chunks; c++) {
            __m512 r[16];
            for (int l = 0; l < L; l++) r[l] = _mm512_loadu_ps(x0 + (int64_t)l * hop + 16 * c);
            transpose16(r);
            for (int j = 0; j < 16; j++) {
                const int n = 16 * c + j;
                const __m512 v = _mm512_mul_ps(r[j], _mm512_set1_ps(window[n]));
                _mm512_storeu_ps((n & 1) ? im[bitrev[n >> 1]] : re[bitrev[n >> 1]], v);
            }
        }
        for (int m = chunks * 8; m < N; m++) {
            _mm512_storeu_ps(re[bitrev[m]], _mm512_setzero_ps());
            _mm512_storeu_ps(im[bitrev[m]], _mm512_setzero_ps());
        }
    } else
#endif
    for (int m = 0; m < N; m++) {
        const int r = bitrev[m], a = 2 * m, b = 2 * m + 1;
        for (int l = 0; l < L; l++) {
            const int64_t at = (int64_t)l * hop;
            const int live = l < used;
            re[r][l] = (live && a < window_len && at + a < avail) ? x0[at + a] * window[a] : 0.0f;
            im[r][l] = (live && b < window_len && at + b < avail) ? x0[at + b] * window[b] : 0.0f;
        }
    }
    for (int start = 0; start < N; start += 4) {  /* sizes 2 and 4 together: twiddles 1 and -i, no products */
        float* restrict r0 = re[start]; float* restrict r1 = re[start + 1];
        float* restrict r2 = re[start + 2]; float* restrict r3 = re[start + 3];
        float* restrict i0 = im[start]; float* restrict i1 = im[start + 1];
        float* restrict i2 = im[start + 2]; float* restrict i3 = im[start + 3];
        for (int l = 0; l < L; l++) {
            const float ar = r0[l] + r1[l], ai = i0[l] + i1[l], br = r0[l] - r1[l], bi = i0[l] - i1[l];
            const float cr = r2[l] + r3[l], ci = i2[l] + i3[l], dr = r2[l] - r3[l], di = i2[l] - i3[l];
            r0[l] = ar + cr; i0[l] = ai + ci; r2[l] = ar - cr; i2[l] = ai - ci;
            r1[l] = br + di; i1[l] = bi - dr; r3[l] = br - di; i3[l] = bi + dr;  /* (dr, di) * -i = (di, -dr) */
        }
    }
    for (int size = 8; size <= N; size <<= 1) {
        const int half = size >> 1, step = N / size;
        for (int start = 0; start < N; start += size) {
            for (int j = 0; j < half; j++) {
                const float wr = tw_re[j * step], wi = tw_im[j * step];
                float* restrict ar = re[start + j]; float* restrict ai = im[start + j];
                float* restrict br = re[start + j + half]; float* restrict bi = im[start + j + half];
                for (int l = 0; l < L; l++) {
                    const float tr = br[l] * wr - bi[l] * wi, ti = br[l] * wi + bi[l] * wr;
                    br[l] = ar[l] - tr; bi[l] = ai[l] - ti;
                    ar[l] = ar[l] + tr; ai[l] = ai[l] + ti;
                }
            }
        }
    }
    for (int k = 0; k < BINS; k++) {  /* X[k] = E[k] + exp(-2 pi i k / 512) O[k] from Z[k] and conj(Z[256 - k]) */
        const int p = k & (N - 1), q = (N - k) & (N - 1);
        const float c = post_re[k], s = post_im[k];
        for (int l = 0; l < L; l++) {
            const float er = 0.5f * (re[p][l] + re[q][l]), ei = 0.5f * (im[p][l] - im[q][l]);
            const float orr = 0.5f * (im[p][l] + im[q][l]), oi = -0.5f * (re[p][l] - re[q][l]);
            const float xr = er + c * orr - s * oi, xi = ei + c * oi + s * orr;
            mag[k][l] = sqrtf(xr * xr + xi * xi);
        }
    }
    for (int band = 0; band < mels; band++) {
        float acc[L];
        for (int l = 0; l < L; l++) acc[l] = 0.0f;
        for (int k = lo[band]; k < hi[band]; k++) {
            const float w = mel[k * mels + band];
            for (int l = 0; l < L; l++) acc[l] += mag[k][l] * w;
        }
        for (int l = 0; l < used; l++) out[(int64_t)l * mels + band] = acc[l] + offset;
    }
}

int log_mel_openmp(void) {
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
}

/* wave [batch, length] (rows `length` apart), `frames` frames per row `hop` apart -> out [batch, frames, mels]. */
void mel_energies(const float* wave, int64_t batch, int64_t length, int64_t frames, int64_t hop, int window_len,
                  const float* window, const float* mel, int mels, float offset, float* out, int nthreads) {
    init_tables();
    float padded[2 * N];  /* the window, zeros past its end */
    for (int n = 0; n < 2 * N; n++) padded[n] = n < window_len ? window[n] : 0.0f;
    int lo[mels], hi[mels];  /* per band, the bins with nonzero weights: [lo, hi) */
    for (int b = 0; b < mels; b++) {
        lo[b] = BINS; hi[b] = 0;
        for (int k = 0; k < BINS; k++)
            if (mel[k * mels + b] != 0.0f) { if (lo[b] == BINS) lo[b] = k; hi[b] = k + 1; }
        if (lo[b] > hi[b]) lo[b] = hi[b];
    }
    const int64_t blocks = (frames + L - 1) / L, tasks = batch * blocks;
#ifdef _OPENMP
#pragma omp parallel for num_threads(nthreads) schedule(static) if(nthreads > 1 && tasks > 1)
#endif
    for (int64_t t = 0; t < tasks; t++) {
        const int64_t row = t / blocks, first = (t % blocks) * L;
        const int used = (int)(frames - first < L ? frames - first : L);
        const int64_t start = first * hop;
        block(wave + row * length + start, length - start, hop, used, window_len, padded, mel, mels, lo, hi, offset,
              out + (row * frames + first) * mels);
    }
}
"""

_LIBRARY = native.NativeLibrary(
    "log_mel",
    _SOURCE,
    {
        "log_mel_openmp": (native.INT, []),
        "mel_energies": (None, [native.PTR, native.I64, native.I64, native.I64, native.I64, native.INT, native.PTR,
                                native.PTR, native.INT, native.FLOAT, native.PTR, native.INT]),
    },
    switch="TYMPAN_LOG_MEL",
    optional_flags=("-fopenmp",),
)


def available() -> bool:
    """Whether the C library is built and loaded (any CPU: the code is plain C that the compiler vectorises)."""
    return _LIBRARY.lib() is not None


def mel_energies(waveform: Tensor, frames: int, hop: int, window: Tensor, mel: Tensor, offset: float,
                 threads: int | None = None) -> Tensor | None:
    """``[B, N]`` float32 CPU waveform -> ``[B, frames, bands]``: per frame (``hop`` samples apart, ``len(window)``
    samples long, zeros past the end) ``|rfft_512(frame * window)| @ mel + offset``, on ``threads`` threads (default
    torch's intra-op count; the GIL is released). ``None`` when the kernel is off or does not apply (autograd,
    tracing, another device or dtype, a window longer than 512, a hop under 1, a mel matrix not ``[257, M]``): the
    caller then computes it with torch ops."""
    if not ENABLED or frames <= 0 or hop < 1 or native.tracing():
        return None
    lib = _LIBRARY.lib()
    if lib is None or (torch.is_grad_enabled() and (waveform.requires_grad or mel.requires_grad)):
        return None
    if (waveform.dim() != 2 or waveform.dtype != torch.float32 or waveform.device.type != "cpu"
            or mel.dim() != 2 or mel.shape[0] != BINS or mel.dtype != torch.float32 or mel.device.type != "cpu"
            or window.dim() != 1 or not 0 < window.shape[0] <= NFFT or window.dtype != torch.float32):  # fmt: skip
        return None
    waveform, mel, window = waveform.contiguous(), mel.contiguous(), window.contiguous()
    out = torch.empty(waveform.shape[0], frames, mel.shape[1])
    lib.mel_energies(waveform.data_ptr(), waveform.shape[0], waveform.shape[1], frames, hop, window.shape[0],
                     window.data_ptr(), mel.data_ptr(), mel.shape[1], float(offset), out.data_ptr(),
                     max(1, threads if threads is not None else torch.get_num_threads()))  # fmt: skip
    return out
