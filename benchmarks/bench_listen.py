"""Benchmark `tympan listen`: per-chunk latency and CPU share at real-time pace, SAT-T and the default model.

The audio (ESC-10 clips end to end) is replayed by ``FileSource`` at real-time pace in 10 ms blocks, the block size
of the microphone source, through the same ``run_live`` loop the command uses (printing aside). Latency is the time
from a chunk's last sample becoming available to its result; CPU share is the process's CPU time (all threads)
over the wall time of the run, so 100 % is one core busy; CPU per chunk is that CPU time per chunk (what a chunk
costs, waiting included: OpenMP workers spin between ops unless ``OMP_WAIT_POLICY=PASSIVE``). The issue's goal: median latency under 30 ms and CPU under
25 % of one core for SAT-T.

    python -m benchmarks.bench_listen [--seconds 60] [--threads 2 1] [--models sat-tiny-2s default] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
from pathlib import Path

import numpy as np
import soundfile as sf
import torch

import tympan
from tympan.inference.live import FileSource, run_live
from tympan.models import DEFAULT_MODEL
from tympan.inference.streaming import Streamer

SHARED = Path(os.environ.get("TYMPAN_SHARED") or Path(tympan.__file__).resolve().parents[2] / "shared")
GOAL_MEDIAN_MS, GOAL_CPU = 30.0, 0.25


def haystack(seconds: float, out: Path) -> Path:
    """ESC-10 clips (folds 1-4, sorted) end to end, cut to ``seconds``, as a 16 kHz FLAC."""
    clips = sorted((SHARED / "data" / "esc10" / "audio").glob("*.flac"))
    pieces, total = [], 0
    for clip in clips:
        samples = sf.read(clip, dtype="float32")[0]
        pieces.append(samples)
        total += len(samples)
        if total >= seconds * 16000:
            break
    sf.write(out, np.concatenate(pieces)[: round(seconds * 16000)], 16000, subtype="PCM_16")
    return out


def build(model_id: str) -> tuple[torch.nn.Module, str]:
    """The model with its shipped weights when they load offline, random weights otherwise (same cost)."""
    try:
        return tympan.load(model_id), "weights"
    except Exception:  # no weights offline: timing does not depend on the values
        torch.manual_seed(0)
        return tympan.create_model(model_id).eval(), "random"


def measure(model_id: str, path: Path, chunk: float | None) -> dict:
    model, weights = build(model_id)
    streamer = Streamer(model, chunk_seconds=chunk)
    streamer.run(np.zeros(streamer.chunk_samples, np.float32))  # warm-up, as the command does
    summary = run_live(FileSource(path, realtime=True), streamer, lambda result, latency: None)
    lat = sorted(summary.latencies)
    compute = summary.compute_seconds / max(summary.chunks, 1)
    return {
        "model": model_id, "weights": weights, "chunk_s": streamer.chunk_samples / 16000, "chunks": summary.chunks,
        "audio_s": round(summary.audio_seconds, 2), "wall_s": round(summary.wall_seconds, 2),
        "latency_median_ms": round(statistics.median(lat) * 1e3, 2),
        "latency_p95_ms": round(summary.latency(0.95) * 1e3, 2), "latency_max_ms": round(lat[-1] * 1e3, 2),
        "compute_per_chunk_ms": round(compute * 1e3, 2), "real_time_factor": round(summary.real_time_factor, 4),
        "cpu_share": round(summary.cpu_share, 4),
        "cpu_per_chunk_ms": round(summary.cpu_seconds / max(summary.chunks, 1) * 1e3, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=60.0, help="audio replayed per model (default 60)")
    parser.add_argument("--threads", type=int, nargs="+", default=[2], help="torch intra-op threads (default 2)")
    parser.add_argument("--chunk", type=float, help="chunk seconds (default: the model's own, as the command)")
    parser.add_argument("--models", nargs="+", default=["sat-tiny-2s", "default"],
                        help="model ids, each optionally ID:CHUNK_SECONDS; 'default' is the command's default model")
    parser.add_argument("--json", type=Path, help="also write the rows as JSON")
    args = parser.parse_args()
    ids = []  # (model id, chunk seconds or None)
    for spec in args.models:
        name, _, chunk = spec.partition(":")
        entry = (DEFAULT_MODEL if name == "default" else name, float(chunk) if chunk else args.chunk)
        if entry not in ids:
            ids.append(entry)
    print(f"load average {os.getloadavg()[0]:.2f}; torch {torch.__version__}, threads {args.threads}; "
          f"default model {DEFAULT_MODEL}; {args.seconds:g} s of ESC-10 at real-time pace, 10 ms blocks")
    with tempfile.TemporaryDirectory() as tmp:
        path = haystack(args.seconds, Path(tmp) / "haystack.flac")
        rows = []
        for threads in args.threads:
            torch.set_num_threads(threads)
            rows += [dict(measure(model_id, path, chunk), threads=threads) for model_id, chunk in ids]
    print("\n| model | weights | threads | chunk | chunks | latency median / p95 / max (ms) | compute per chunk (ms) | "
          "CPU (one core) | CPU per chunk (ms) | real-time factor |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f'| {r["model"]} | {r["weights"]} | {r["threads"]} | {r["chunk_s"]:g} s | {r["chunks"]} | {r["latency_median_ms"]:.1f} / '
              f'{r["latency_p95_ms"]:.1f} / {r["latency_max_ms"]:.1f} | {r["compute_per_chunk_ms"]:.1f} | '
              f'{r["cpu_share"]:.1%} | {r["cpu_per_chunk_ms"]:.1f} | {r["real_time_factor"]:.4f} |')
    for r in rows:
        ok = r["latency_median_ms"] < GOAL_MEDIAN_MS and r["cpu_share"] < GOAL_CPU
        print(f'{r["model"]}, {r["threads"]} threads: goal (median < {GOAL_MEDIAN_MS:g} ms, CPU < {GOAL_CPU:.0%}) {"met" if ok else "NOT met"}')
    print(json.dumps(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
