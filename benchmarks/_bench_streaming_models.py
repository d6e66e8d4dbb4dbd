"""Benchmarks of Dasheng and SAT streaming, to be merged into ``benchmarks/bench_transformers.py``.

Run: ``python -m benchmarks._bench_streaming_models`` (2 threads, CPU, random weights, forward only).
Peers (specs/peers.md, same machine): Dasheng-base with the original ``dasheng`` 0.0.9 package 0.38 s (10 s) /
1.63 s (60 s). Goal for SAT-T streaming: >= 100x faster than real time.
"""

from __future__ import annotations

import time

import torch

from tympan.inference import Streamer
from tympan.models import create_model

PEERS = {10: 0.38, 60: 1.63}


def _best_of(fn, repeats: int = 3) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


@torch.no_grad()
def bench_dasheng_base(seconds: tuple[int, ...] = (10, 60)) -> list[dict]:
    """Full-size Dasheng-base encoder on ``seconds``-long waveforms, batch 1."""
    torch.manual_seed(0)
    model = create_model("dasheng-base").eval()
    rows = []
    for s in seconds:
        wave = torch.randn(1, 16000 * s) * 0.1
        t = _best_of(lambda: model(wave))
        rows.append({"model": "dasheng-base", "input_s": s, "time_s": round(t, 3), "peer_s": PEERS.get(s)})
    return rows


@torch.no_grad()
def bench_sat_streaming(model_id: str = "sat-tiny-2s", seconds: int = 60) -> dict:
    """Streamer over ``seconds`` of audio pushed in 0.1 s pieces: real-time factor and per-chunk latency."""
    torch.manual_seed(0)
    model = create_model(model_id).eval()
    streamer = Streamer(model)
    wave = torch.randn(16000 * seconds) * 0.1
    pieces = wave.split(1600)
    latencies = []

    def run() -> None:
        latencies.clear()
        streamer.reset()
        for piece in pieces:
            start = time.perf_counter()
            if streamer.push(piece):
                latencies.append(time.perf_counter() - start)

    total = _best_of(run, repeats=2)
    lat = torch.tensor(latencies)
    return {"model": model_id, "audio_s": seconds, "time_s": round(total, 3), "x_real_time": round(seconds / total, 1),
            "chunk_ms_median": round(float(lat.median()) * 1e3, 2), "chunk_ms_max": round(float(lat.max()) * 1e3, 2)}


def main() -> None:
    torch.set_num_threads(2)
    for row in bench_dasheng_base():
        print(row)
    print(bench_sat_streaming())


if __name__ == "__main__":
    main()
