"""Inference cost against input duration: DASS-small, SSAM-tiny and AST-base384, 10 s to 60 min.

Random weights, batch 1, from model input (DASS / AST: normalised fbank ``[1, T, 128]``; SSAM: its HEAR path
from the waveform, log-mel included, since that is how it consumes long audio). AST is built with
``input_tdim = T`` (its positional table is learned per patch, so this measures cost only, not a usable model).
Each (model, duration) runs in a fresh process so its peak memory is its own: the process's peak RSS on CPU
(weights and input included),
``torch.cuda.max_memory_allocated`` on CUDA. A model stops at the first duration whose extrapolated memory
(power-law fit of the last two points) would pass ``--max-gb`` or whose time would pass ``--max-seconds``;
its row then gives that prediction instead of a measurement.

Each row reports wall time and the process's CPU time (user + sys) for the timed run, cost per audio second
relative to the model's shortest duration (the goal: within 1.5x of the 10 s value up to 60 min), peak memory
and the 1-minute load average before the run (other jobs on the machine inflate wall times; CPU time is the
steadier figure when the load exceeds ``--threads``).

    python -m benchmarks.bench_duration [--device cpu|cuda] [--threads 2] [--durations 10 60 600 3600]
        [--models dass-small ssam-tiny ast-base384] [--max-gb 16] [--max-seconds 600] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import resource
import time

SAMPLE_RATE = 16000
FRAMES_PER_SECOND = 100
MODELS = ("dass-small", "ssam-tiny", "ast-base384")
DURATIONS = (10, 60, 600, 3600)


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _measure(model_id: str, seconds: float, device: str, threads: int, queue) -> None:
    """Child process: build, run once to warm up (short inputs only), time one run, report peak memory."""
    import torch

    import tympan

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    frames = int(seconds * FRAMES_PER_SECOND)
    overrides = {"input_tdim": frames} if model_id.startswith("ast") else {}
    model = tympan.create_model(model_id, **overrides).eval().to(device)
    if model_id.startswith("ssam"):
        x = torch.randn(1, int(seconds * SAMPLE_RATE), device=device) * 0.1
        run = model.timestamp_embeddings
    else:
        x = torch.randn(1, frames, 128, device=device) * 0.5
        run = model
    with torch.inference_mode():
        if seconds <= 60:
            run(x)
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        load = os.getloadavg()[0]
        start, cpu_start = time.perf_counter(), _cpu_seconds()
        run(x)
        if device == "cuda":
            torch.cuda.synchronize()
        elapsed, cpu = time.perf_counter() - start, _cpu_seconds() - cpu_start
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else _peak_rss_bytes()
    queue.put({"model": model_id, "seconds": seconds, "time_s": elapsed, "cpu_s": cpu, "peak_gb": peak / 2**30,
               "realtime_factor": seconds / elapsed, "load_avg": load})


def run_one(model_id: str, seconds: float, device: str, threads: int) -> dict:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_measure, args=(model_id, seconds, device, threads, queue))
    proc.start()
    proc.join()
    if proc.exitcode != 0:
        return {"model": model_id, "seconds": seconds, "error": f"exit code {proc.exitcode} (out of memory?)"}
    return queue.get()


def extrapolate(points: list[tuple[float, float]], seconds: float) -> float:
    """Power-law extrapolation ``y = a x^p`` (p >= 1) from the last two points."""
    if not points:
        return 0.0
    if len(points) == 1:
        (x0, y0), = points
        return y0 * seconds / x0
    (x0, y0), (x1, y1) = points[-2:]
    p = max(1.0, math.log(max(y1, 1e-12) / max(y0, 1e-12)) / math.log(x1 / x0))
    return y1 * (seconds / x1) ** p


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--durations", type=float, nargs="+", default=DURATIONS)
    parser.add_argument("--models", nargs="+", default=MODELS)
    parser.add_argument("--max-gb", type=float, default=16.0)
    parser.add_argument("--max-seconds", type=float, default=600.0)
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args()

    rows = []
    print(f"{'model':14s} {'duration':>9s} {'wall s':>8s} {'ms/audio s':>11s} {'vs first':>9s} {'cpu s':>8s} "
          f"{'cpu ms/s':>9s} {'vs first':>9s} {'peak GB':>8s} {'load':>5s}")
    for model_id in args.models:
        memory, times = [], []
        for seconds in sorted(args.durations):
            mem_guess, time_guess = extrapolate(memory, seconds), extrapolate(times, seconds)
            if mem_guess > args.max_gb or time_guess > args.max_seconds:
                guess = f"predicted {mem_guess:.1f} GB, {time_guess:.0f} s"
                row = {"model": model_id, "seconds": seconds, "skipped": guess}
                rows.append(row)
                print(f"{model_id:14s} {seconds:>8.0f}s  skipped ({row['skipped']})")
                break
            row = run_one(model_id, seconds, args.device, args.threads)
            rows.append(row)
            if "error" in row:
                print(f"{model_id:14s} {seconds:>8.0f}s  {row['error']}")
                break
            memory.append((seconds, row["peak_gb"]))
            times.append((seconds, row["time_s"]))
            first = next(r for r in rows if r["model"] == model_id)
            row["relative_cost"] = (row["time_s"] / seconds) / (first["time_s"] / first["seconds"])
            row["relative_cpu"] = (row["cpu_s"] / seconds) / (first["cpu_s"] / first["seconds"])
            print(f"{model_id:14s} {seconds:>8.0f}s {row['time_s']:8.2f} {1000 * row['time_s'] / seconds:11.1f} "
                  f"{row['relative_cost']:8.2f}x {row['cpu_s']:8.2f} {1000 * row['cpu_s'] / seconds:9.1f} "
                  f"{row['relative_cpu']:8.2f}x {row['peak_gb']:8.2f} {row['load_avg']:5.1f}", flush=True)
    text = json.dumps({"device": args.device, "threads": args.threads, "rows": rows}, indent=2)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
