"""Kaldi fbank throughput: tympan batched vs kaldi-native-fbank vs a per-utterance loop of tympan.

AST/SSAST/DASS settings (16 kHz, 25/10 ms, hanning, htk_compat, dither 0, no energy) on a batch of
``--batch`` x ``--seconds`` s of noisy tones. kaldi-native-fbank (1.23) refuses 128 bins at a 512-point FFT
("num_mel_bins too large": some low filters cover no FFT bin, which Kaldi's C++ forbids while torchaudio
allows), so the three-way comparison uses ``--knf-bins`` (80) bins, otherwise identical settings; tympan's
own speed at the AST's 128 bins is reported too. kaldi-native-fbank is driven its fastest way from Python
(one ``accept_waveform`` of a float list per clip, then ``get_frame`` for every frame); it is single-threaded.
Timings are the minimum (and median) of ``--repeats`` runs;
the load average is printed because other processes on a shared machine slow every row, and the
process CPU time (which such load barely changes; with 2 threads it includes OpenMP spin-waiting) is reported too. Prints a table, then one JSON line.

    python benchmarks/bench_features.py [--batch 16] [--seconds 10] [--repeats 15] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import time

import numpy as np
import torch

from tympan.features import kaldi_fbank

SAMPLE_RATE = 16000
AST_OPTIONS = dict(htk_compat=True, use_energy=False, window_type="hanning", dither=0.0, frame_shift=10.0)


def make_audio(batch: int, seconds: float, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    t = torch.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    tones = 0.3 * torch.sin(2 * math.pi * 440.0 * t) + 0.1 * torch.sin(2 * math.pi * 2500.0 * t * (1 + 0.1 * t))
    return (tones + 0.05 * torch.randn(batch, t.numel(), generator=gen)).float()


def timed(fn, repeats: int) -> tuple[float, float, float, object]:
    """(min wall s, median wall s, min process CPU s, result); CPU time is robust to other processes' load."""
    result = fn()  # warm-up (caches, allocator)
    walls, cpus = [], []
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        result = fn()
        walls.append(time.perf_counter() - start)
        cpus.append(time.process_time() - start_cpu)
    return min(walls), statistics.median(walls), min(cpus), result


def knf_fbank_batch(clips: list[list[float]], num_mel_bins: int) -> np.ndarray:
    import kaldi_native_fbank as knf

    opts = knf.FbankOptions()
    opts.frame_opts.samp_freq = SAMPLE_RATE
    opts.frame_opts.dither = 0.0
    opts.frame_opts.window_type = "hanning"
    opts.mel_opts.num_bins = num_mel_bins
    opts.htk_compat = True
    opts.use_energy = False
    outputs = []
    for clip in clips:
        extractor = knf.OnlineFbank(opts)
        extractor.accept_waveform(SAMPLE_RATE, clip)
        extractor.input_finished()
        outputs.append(np.stack([extractor.get_frame(i) for i in range(extractor.num_frames_ready)]))
    return np.stack(outputs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--knf-bins", type=int, default=80)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    audio = make_audio(args.batch, args.seconds)
    audio_seconds = args.batch * args.seconds
    clips = [row.tolist() for row in audio]  # list conversion is KNF's fastest input; not timed

    rows = {}
    with torch.inference_mode():
        rows["tympan batched (128 bins, AST)"] = timed(lambda: kaldi_fbank(audio, SAMPLE_RATE, num_mel_bins=128, **AST_OPTIONS), args.repeats)
        rows["tympan batched"] = timed(lambda: kaldi_fbank(audio, SAMPLE_RATE, num_mel_bins=args.knf_bins, **AST_OPTIONS), args.repeats)
        rows["tympan per-utterance loop"] = timed(
            lambda: torch.stack([kaldi_fbank(row, SAMPLE_RATE, num_mel_bins=args.knf_bins, **AST_OPTIONS) for row in audio]),
            args.repeats,
        )
    rows["kaldi-native-fbank"] = timed(lambda: knf_fbank_batch(clips, args.knf_bins), max(3, args.repeats // 3))

    batched = rows["tympan batched"][3]
    diff_loop = float((batched - rows["tympan per-utterance loop"][3]).abs().max())
    diff_knf = float((batched - torch.from_numpy(rows["kaldi-native-fbank"][3])).abs().max())

    load = os.getloadavg()[0]
    print(f"{args.batch} x {args.seconds:g} s at {SAMPLE_RATE} Hz, torch threads {args.threads}, "
          f"AST fbank settings ({args.knf_bins} bins unless noted); 1-min load average {load:.1f} on {os.cpu_count()} CPUs")
    print(f"{'implementation':34s} {'min ms':>9s} {'median ms':>10s} {'x real time':>12s} {'CPU ms':>9s} {'x RT per CPU-s':>15s}")
    speeds, cpu_speeds = {}, {}
    for name, (best, median, cpu, _) in rows.items():
        speeds[name] = audio_seconds / best  # seconds of audio per second = x real time
        cpu_speeds[name] = audio_seconds / max(cpu, 1e-9)
        print(f"{name:34s} {best * 1e3:9.2f} {median * 1e3:10.2f} {speeds[name]:12.0f} {cpu * 1e3:9.2f} {cpu_speeds[name]:15.0f}")
    vs_knf = speeds["tympan batched"] / speeds["kaldi-native-fbank"]
    vs_knf_cpu = cpu_speeds["tympan batched"] / cpu_speeds["kaldi-native-fbank"]
    vs_loop = speeds["tympan batched"] / speeds["tympan per-utterance loop"]
    print(f"tympan batched / kaldi-native-fbank: {vs_knf:.1f}x wall ({vs_knf_cpu:.1f}x per CPU second)   "
          f"tympan batched / per-utterance loop: {vs_loop:.2f}x")
    print(f"max abs diff (log-mel): batched vs loop {diff_loop:.2e}, batched vs kaldi-native-fbank {diff_knf:.2e}")
    goals = {"vs_knf_>=5x": vs_knf >= 5.0, "ast_128_bins_>=4000x_real_time": speeds["tympan batched (128 bins, AST)"] >= 4000.0}
    print("goals:", ", ".join(f"{k} {'met' if v else 'NOT met'}" for k, v in goals.items()))
    print(json.dumps({
        "benchmark": "kaldi_fbank", "batch": args.batch, "seconds": args.seconds, "threads": args.threads, "load_average": round(load, 2),
        "min_ms": {k: round(v[0] * 1e3, 3) for k, v in rows.items()},
        "median_ms": {k: round(v[1] * 1e3, 3) for k, v in rows.items()},
        "x_real_time": {k: round(v) for k, v in speeds.items()},
        "min_cpu_ms": {k: round(v[2] * 1e3, 3) for k, v in rows.items()},
        "x_real_time_per_cpu_second": {k: round(v) for k, v in cpu_speeds.items()},
        "ratio_vs_knf": round(vs_knf, 2), "ratio_vs_knf_cpu": round(vs_knf_cpu, 2), "ratio_vs_loop": round(vs_loop, 2),
        "max_abs_diff": {"loop": diff_loop, "knf": diff_knf}, "goals_met": goals,
    }))


if __name__ == "__main__":
    main()
