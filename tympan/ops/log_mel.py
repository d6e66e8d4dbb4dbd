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

:func:`power_mel` serves the STFT frontends (Dasheng, SAT, SSAM: :func:`tympan.features.mel.mel_spectrogram`): after
torch's own FFT (kept, so the spectrum is the original's bit for bit) it squares, applies the mel bank and, for the
dB frontends, takes ``10 log10`` and the ``max - top_db`` floor in one pass, in place of about fifteen torch ops
(a 1.92 s SAT chunk: ~40 us instead of ~220 us on this machine's 2-core CPU, measured alone).
"""

from __future__ import annotations

import torch
from torch import Tensor

from tympan.ops import native

__all__ = ["available", "group_ranges", "mel_energies", "mel_layout", "power_mel"]

ENABLED = True  # False: mel_energies() returns None (the torch path; tests and benchmarks compare both)
NFFT = 512
HALF = NFFT // 2  # the complex FFT's size
BINS = HALF + 1

_SOURCE = r"""
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
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

/* 10 log10(x) for x > 0 in plain C that vectorises: x = m 2^e with m in [sqrt(1/2), sqrt(2)), ln m = 2 atanh(s),
   s = (m - 1) / (m + 1), |s| < 0.172, by its odd series to s^11 (relative error < 1e-9 before rounding). 0 gives
   -inf, NaN stays NaN, +inf stays +inf. */
static inline float ten_log10(float x) {
    union { float f; int32_t i; } u = {x};
    int32_t e = ((u.i >> 23) & 0xff) - 127;
    u.i = (u.i & 0x007fffff) | 0x3f800000;  /* m in [1, 2) */
    float m = u.f;
    const int big = m > 1.41421356f;
    m = big ? 0.5f * m : m;
    e = big ? e + 1 : e;
    const float s = (m - 1.0f) / (m + 1.0f), s2 = s * s;
    const float series =
        s * (2.0f + s2 * (2.0f / 3 + s2 * (2.0f / 5 + s2 * (2.0f / 7 + s2 * (2.0f / 9 + s2 * (2.0f / 11))))));
    const float y = ((float)e * 0.693147180559945f + series) * 4.34294481903252f;  /* 10 / ln 10 */
    return x > 0.0f && x < INFINITY ? y : (x == 0.0f ? -INFINITY : x);
}

#ifdef __AVX512F__
/* ten_log10 of 16 lanes: the exponent and mantissa from getexp / getmant (0 -> -inf, NaN and +inf pass through). */
static inline __m512 ten_log10_16(__m512 x) {
    const __m512 one = _mm512_set1_ps(1.0f);
    __m512 e = _mm512_getexp_ps(x), m = _mm512_getmant_ps(x, _MM_MANT_NORM_1_2, _MM_MANT_SIGN_zero);
    const __mmask16 big = _mm512_cmp_ps_mask(m, _mm512_set1_ps(1.41421356f), _CMP_GT_OQ);
    m = _mm512_mask_mul_ps(m, big, m, _mm512_set1_ps(0.5f));
    e = _mm512_mask_add_ps(e, big, e, one);
    const __m512 s = _mm512_div_ps(_mm512_sub_ps(m, one), _mm512_add_ps(m, one)), s2 = _mm512_mul_ps(s, s);
    __m512 series = _mm512_set1_ps(2.0f / 11);
    series = _mm512_fmadd_ps(series, s2, _mm512_set1_ps(2.0f / 9));
    series = _mm512_fmadd_ps(series, s2, _mm512_set1_ps(2.0f / 7));
    series = _mm512_fmadd_ps(series, s2, _mm512_set1_ps(2.0f / 5));
    series = _mm512_fmadd_ps(series, s2, _mm512_set1_ps(2.0f / 3));
    series = _mm512_fmadd_ps(series, s2, _mm512_set1_ps(2.0f));
    return _mm512_mul_ps(_mm512_fmadd_ps(e, _mm512_set1_ps(0.693147180559945f), _mm512_mul_ps(series, s)),
                         _mm512_set1_ps(4.34294481903252f));
}
#endif

/* Mel band powers of a complex spectrum, in dB when asked (the STFT frontends' |X|^2 @ mel, then AmplitudeToDB):
   spec [batch, frames, bins] (re, im interleaved) -> out [batch, mels, frames]. mel: [bins, mels16] (mels16 = mels
   rounded up to 16, zero columns past mels); ranges: per group of 16 bands, the bins [lo, hi) where any weight of the
   group is nonzero. Each band sums its bins in increasing order (zero weights add +0), four frames side by side (four
   independent chains of fused multiply-adds); the powers round as torch's square-then-add. db: out = 10 log10(max(out,
   amin)), then with top_db >= 0 floored at its max - top_db, the max over each group of `group` consecutive rows (1:
   each row; batch: all); a NaN makes its group's floor NaN, as torch's amax and maximum do. */
void power_mel(const float* spec, int64_t batch, int64_t frames, int64_t bins, const float* mel, int mels,
               const int32_t* ranges, int db, float amin, float top_db, int64_t group, float* out, int nthreads) {
    const int groups = (mels + 15) / 16, mels16 = 16 * groups;
    const int64_t blocks = (frames + L - 1) / L, tasks = batch * blocks;
    float* peaks = malloc(sizeof(float) * (tasks > 0 ? tasks : 1));
    if (!peaks) return;
#ifdef _OPENMP
#pragma omp parallel for num_threads(nthreads) schedule(static) if(nthreads > 1 && tasks >= 32)
#endif
    for (int64_t task = 0; task < tasks; task++) {  /* 16 frames each; threads only from 512 frames on */
        const int64_t row = task / blocks, first = (task % blocks) * L;
        const int used = (int)(frames - first < L ? frames - first : L);
#ifdef __AVX512F__
        const __m512i even = _mm512_set_epi32(30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0);
        const __m512i odd = _mm512_add_epi32(even, _mm512_set1_epi32(1));
#endif
        float* power = malloc(sizeof(float) * 4 * (bins + mels16));  /* 4 frames at a time: 4 independent sums */
        float peak = -INFINITY;
        if (power) {
            float* accs = power + 4 * bins;
            float* o = out + row * mels * frames + first;
            for (int l0 = 0; l0 < used; l0 += 4) {
                for (int f = 0; f < 4; f++) {  /* frames past `used` read frame l0 again; they are not written */
                    const float* x = spec + (row * frames + first + (l0 + f < used ? l0 + f : l0)) * bins * 2;
                    float* p = power + f * bins;
                    int64_t k = 0;
#ifdef __AVX512F__
                    for (; k + 16 <= bins; k += 16) {  /* deinterleave 16 (re, im) pairs: even and odd lanes */
                        const __m512 v0 = _mm512_loadu_ps(x + 2 * k), v1 = _mm512_loadu_ps(x + 2 * k + 16);
                        const __m512 re = _mm512_permutex2var_ps(v0, even, v1);
                        const __m512 im = _mm512_permutex2var_ps(v0, odd, v1);
                        _mm512_storeu_ps(p + k, _mm512_add_ps(_mm512_mul_ps(re, re), _mm512_mul_ps(im, im)));
                    }
#endif
                    for (; k < bins; k++) {
                        const float re2 = x[2 * k] * x[2 * k], im2 = x[2 * k + 1] * x[2 * k + 1];
                        p[k] = re2 + im2;
                    }
                }
                for (int g = 0; g < groups; g++) {
                    const float* w = mel + 16 * g;
#ifdef __AVX512F__
                    __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
                    for (int32_t k = ranges[2 * g]; k < ranges[2 * g + 1]; k++) {
                        const __m512 wk = _mm512_loadu_ps(w + (int64_t)k * mels16);
                        a0 = _mm512_fmadd_ps(_mm512_set1_ps(power[k]), wk, a0);
                        a1 = _mm512_fmadd_ps(_mm512_set1_ps(power[bins + k]), wk, a1);
                        a2 = _mm512_fmadd_ps(_mm512_set1_ps(power[2 * bins + k]), wk, a2);
                        a3 = _mm512_fmadd_ps(_mm512_set1_ps(power[3 * bins + k]), wk, a3);
                    }
                    _mm512_storeu_ps(accs + 16 * g, a0);
                    _mm512_storeu_ps(accs + mels16 + 16 * g, a1);
                    _mm512_storeu_ps(accs + 2 * mels16 + 16 * g, a2);
                    _mm512_storeu_ps(accs + 3 * mels16 + 16 * g, a3);
#else
                    for (int f = 0; f < 4; f++) {
                        float a[16] = {0};
                        for (int32_t k = ranges[2 * g]; k < ranges[2 * g + 1]; k++) {
                            const float pk = power[f * bins + k], *wk = w + (int64_t)k * mels16;
                            for (int j = 0; j < 16; j++) a[j] += pk * wk[j];
                        }
                        for (int j = 0; j < 16; j++) accs[f * mels16 + 16 * g + j] = a[j];
                    }
#endif
                }
                for (int f = 0; f < 4 && l0 + f < used; f++) {
                    float* acc = accs + f * mels16;
                    if (db) {  /* the frame's bands in dB, while they are in L1 */
#ifdef __AVX512F__
                        const __m512 floor = _mm512_set1_ps(amin);
                        __m512 top = _mm512_set1_ps(peak);
                        __mmask16 nan = peak != peak;
                        for (int j = 0; j < mels16; j += 16) {  /* max(amin, NaN) keeps the NaN */
                            const __m512 y = ten_log10_16(_mm512_max_ps(floor, _mm512_loadu_ps(acc + j)));
                            _mm512_storeu_ps(acc + j, y);
                            const __mmask16 live = j + 16 <= mels ? 0xffff : (__mmask16)((1u << (mels - j)) - 1);
                            top = _mm512_mask_max_ps(top, live, top, y);
                            nan |= _mm512_mask_cmp_ps_mask(live, y, y, _CMP_UNORD_Q);
                        }
                        peak = nan ? NAN : _mm512_reduce_max_ps(top);
#else
                        for (int j = 0; j < mels; j++) {
                            acc[j] = ten_log10(acc[j] < amin ? amin : acc[j]);  /* a NaN stays NaN */
                            if (peak == peak && !(acc[j] <= peak)) peak = acc[j];  /* a NaN sticks */
                        }
#endif
                    }
                    for (int j = 0; j < mels; j++) o[(int64_t)j * frames + l0 + f] = acc[j];
                }
            }
            free(power);
        }
        peaks[task] = peak;
    }
    if (db && top_db >= 0.0f) {
        if (group < 1) group = 1;
        for (int64_t g0 = 0; g0 < batch; g0 += group) {  /* each group's floor into peaks[row * blocks] of its rows */
            const int64_t g1 = g0 + group < batch ? g0 + group : batch;
            float peak = -INFINITY;
            for (int64_t t = g0 * blocks; t < g1 * blocks; t++)  /* a NaN anywhere makes the floor NaN, as torch's */
                if (peak == peak && !(peaks[t] <= peak)) peak = peaks[t];
            for (int64_t row = g0; row < g1; row++) peaks[row * blocks] = peak - top_db;
        }
#ifdef _OPENMP
#pragma omp parallel for num_threads(nthreads) schedule(static) if(nthreads > 1 && batch > 1)
#endif
        for (int64_t row = 0; row < batch; row++) {
            const float floor = peaks[row * blocks];
            float* o = out + row * mels * frames;
            for (int64_t i = 0; i < mels * frames; i++) o[i] = o[i] > floor ? o[i] : floor;
        }
    }
    free(peaks);
}
"""

_LIBRARY = native.NativeLibrary(
    "log_mel",
    _SOURCE,
    {
        "log_mel_openmp": (native.INT, []),
        "mel_energies": (None, [native.PTR, native.I64, native.I64, native.I64, native.I64, native.INT, native.PTR,
                                native.PTR, native.INT, native.FLOAT, native.PTR, native.INT]),
        "power_mel": (None, [native.PTR, native.I64, native.I64, native.I64, native.PTR, native.INT, native.PTR,
                             native.INT, native.FLOAT, native.FLOAT, native.I64, native.PTR, native.INT]),
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



def group_ranges(matrix: Tensor, size: int = 16) -> list[tuple[int, int]]:
    """Per group of ``size`` consecutive columns of ``matrix [K, M]``, the rows ``[lo, hi)`` where any of them is
    nonzero (``(0, 0)`` for a group with none): the bins a group of bands of a banded mel matrix reads (here and in
    :class:`tympan.features.mel.Filterbank`'s band products)."""
    nonzero = (matrix != 0).cpu()
    rows = torch.arange(matrix.shape[0]).unsqueeze(1)
    first = torch.where(nonzero, rows, matrix.shape[0]).amin(0).tolist()
    last = torch.where(nonzero, rows + 1, 0).amax(0).tolist()
    ranges = []
    for start in range(0, matrix.shape[1], size):
        lo, hi = min(first[start : start + size]), max(last[start : start + size])
        ranges.append((lo, hi) if hi > lo else (0, 0))
    return ranges


def mel_layout(mel: Tensor) -> tuple[Tensor, Tensor]:
    """``[F, M]`` mel matrix -> what :func:`power_mel` reads: the matrix with its columns padded with zeros to a
    multiple of 16 and, per group of 16 bands, the bin range ``[lo, hi)`` where any weight is nonzero (int32)."""
    bins, mels = mel.shape
    padded = torch.zeros(bins, -(-mels // 16) * 16, dtype=torch.float32)
    padded[:, :mels] = mel
    return padded, torch.tensor(group_ranges(mel, 16), dtype=torch.int32).reshape(-1, 2)


def power_mel(spectrum: Tensor, layout: tuple[Tensor, Tensor], mels: int,
              db: tuple[float, float | None, int] | None = None, threads: int | None = None) -> Tensor | None:
    """``|spectrum|^2 @ mel`` in one C pass: complex ``[B, T, F]`` (each frame's bins contiguous, e.g. the transpose
    of ``torch.stft``'s ``[B, F, T]``) -> ``[B, mels, T]`` float32, with the mel matrix as :func:`mel_layout` gives it.
    The powers are torch's bit for bit and each band sums its bins in order (within ~1e-7 of the dense product).
    ``db = (amin, top_db, group)`` also converts to dB as :func:`tympan.features.mel.amplitude_to_db` does (its
    own vectorised log10, within ~1e-5 dB), the ``max - top_db`` floor taken over each ``group`` consecutive items.
    ``None`` when it does not apply (off, autograd, tracing, not complex64 on the CPU, shapes that disagree): the
    caller uses torch ops."""
    if not ENABLED or native.tracing() or spectrum.dim() != 3:
        return None
    lib = _LIBRARY.lib()
    if lib is None or (torch.is_grad_enabled() and spectrum.requires_grad):
        return None
    matrix, ranges = layout
    if (spectrum.dtype != torch.complex64 or spectrum.device.type != "cpu" or matrix.shape[0] != spectrum.shape[2]
            or 0 in spectrum.shape or not 0 < mels <= matrix.shape[1]):
        return None
    spectrum = spectrum.contiguous()
    batch, frames, bins = spectrum.shape
    amin, top_db, group = db if db is not None else (0.0, None, 1)
    out = torch.empty(batch, mels, frames)
    lib.power_mel(spectrum.data_ptr(), batch, frames, bins, matrix.data_ptr(), mels, ranges.data_ptr(), db is not None,
                  float(amin), -1.0 if top_db is None else float(top_db), int(group), out.data_ptr(),
                  max(1, threads if threads is not None else torch.get_num_threads()))
    return out
