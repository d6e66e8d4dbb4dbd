"""SAT-T streaming step speed (issue 16 goal: >= 400x real time in fp32), against the previous implementations.

Times ``model.step(chunk, state)`` of ``sat-tiny-2s`` (random weights, ``torch.manual_seed(0)``) carrying the state
from step to step, as :class:`tympan.inference.Streamer` does, on a real ESC-10 clip when the shared data is there
(white noise otherwise). Contenders, alternated step block by step block in one run so a busy machine hits all alike:

* ``kernel``: the current step (``SAT.stream_features`` with the blocks in one call of the C kernel,
  ``tympan.ops.small_gemm.run_blocks``, split over the intra-op threads);
* ``op_by_op``: the same step with the blocks op by op in Python (``small_gemm.BLOCKS_ENABLED = False``: fused qkv,
  K/V memo, packed-weight products), the implementation before the kernel;
* ``reference``: the block modules one op at a time (``SAT.reference_features``, ``sat.FAST_STEP = False``), what
  training, tracing and export run.

Per contender: the minimum, 10th percentile and median of the step times (ms), x real time (chunk seconds / step
time at the 10th percentile), FLOPs per step (``count_flops``: what each contender actually computes) and the share
of the fp32 matmul peak measured in the same run (``benchmarks/peak.py``), and the p10 ratios against the kernel.
One JSON line per thread count; the load average is printed with it. With more threads than idle cores the threads
of one step wait for each other (12 synchronisations per step): under load read the minimum as the capability.

    python -m benchmarks.bench_sat_stream [--threads 1 2] [--steps 40] [--rounds 8]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
import tympan  # noqa: E402
from benchmarks.peak import count_flops, load_average, matmul_peak, share_of_peak  # noqa: E402
from tympan.models import sat  # noqa: E402
from tympan.ops import small_gemm  # noqa: E402

CLIP_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "esc10" / "audio"


def stream_audio(samples: int) -> tuple[torch.Tensor, str]:
    """``samples`` of real audio (ESC-10 clips end to end) when the shared data is there, else white noise."""
    files = sorted(CLIP_DIR.glob("*.flac"))
    if files:
        from tympan import audio

        clips, total = [], 0
        for path in files:
            clips.append(torch.from_numpy(audio.load(path)))
            total += clips[-1].numel()
            if total >= samples:
                return torch.cat(clips)[:samples], f"ESC-10 clips from {files[0].name}"
    return torch.randn(samples, generator=torch.Generator().manual_seed(0)) * 0.1, "white noise"


CONTENDERS = {"kernel": (True, True), "op_by_op": (True, False), "reference": (False, False)}  # (FAST_STEP, blocks)


def time_steps(model: torch.nn.Module, chunks: list[torch.Tensor], contender: str, state: tuple) -> tuple[list[float], tuple]:
    """Per-step wall times (ms) of ``chunks`` streamed from ``state``; returns the times and the final state."""
    previous = sat.FAST_STEP, small_gemm.BLOCKS_ENABLED
    sat.FAST_STEP, small_gemm.BLOCKS_ENABLED = CONTENDERS[contender]
    times = []
    try:
        with torch.inference_mode():
            for chunk in chunks:
                start = time.perf_counter()
                _, state = model.step(chunk, state)
                times.append((time.perf_counter() - start) * 1000)
    finally:
        sat.FAST_STEP, small_gemm.BLOCKS_ENABLED = previous
    return times, state


def step_flops(model: torch.nn.Module, chunks: list[torch.Tensor], contender: str) -> int:
    """FLOPs of the second of two steps (the first fills the K/V memo where the contender has one), counted with the
    C kernel off (torch's counter does not see inside it; the op-by-op path does the same products)."""
    previous = sat.FAST_STEP, small_gemm.ENABLED
    sat.FAST_STEP, small_gemm.ENABLED = CONTENDERS[contender][0], False
    try:
        with torch.inference_mode():
            _, state = model.step(chunks[0], model.init_state(1))
            return count_flops(lambda: model.step(chunks[1], state))
    finally:
        sat.FAST_STEP, small_gemm.ENABLED = previous


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def bench(threads: int, steps: int, rounds: int) -> dict:
    """One thread count: every contender over ``rounds`` alternating blocks of ``steps`` steps."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = tympan.create_model("sat-tiny-2s").eval()
    chunk = model.chunk_samples
    wave, source = stream_audio(steps * chunk)
    chunks = list(wave.view(steps, 1, chunk))
    peak = matmul_peak(threads, "fp32")
    load_before = load_average()
    with torch.inference_mode():
        start_state = model.init_state(1)
    times: dict[str, list[float]] = {name: [] for name in CONTENDERS}
    for contender in CONTENDERS:  # warm-up
        time_steps(model, chunks[:3], contender, start_state)
    for _ in range(rounds):
        for contender in CONTENDERS:
            block, _ = time_steps(model, chunks, contender, start_state)
            times[contender] += block[1:]  # the first step of a block starts from a state with no memo
    flops = {name: step_flops(model, chunks, name) for name in CONTENDERS}
    seconds = chunk / model.sample_rate
    row: dict = {"bench": "sat_stream", "model": "sat-tiny-2s", "chunk_s": seconds, "threads": threads,
                 "torch": torch.__version__, "audio": source, "steps_timed": len(times["kernel"]),
                 "load_before": load_before, "load_after": load_average(), "peak_gflops": round(peak, 1),
                 "kernel_openmp": small_gemm.openmp()}
    for contender, values in times.items():
        p10 = quantile(values, 0.1)
        row[contender] = {"min_ms": round(min(values), 3), "p10_ms": round(p10, 3), "median_ms": round(quantile(values, 0.5), 3),
                          "x_real_time": round(seconds * 1000 / p10, 1), "gflop": round(flops[contender] / 1e9, 4),
                          "share_of_peak": round(share_of_peak(flops[contender], p10, peak), 3)}
    for contender in ("op_by_op", "reference"):
        row[f"kernel_vs_{contender}"] = round(row[contender]["p10_ms"] / row["kernel"]["p10_ms"], 2)
    return row


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--steps", type=int, default=40, help="steps per block (one block = one contender's turn)")
    parser.add_argument("--rounds", type=int, default=8, help="alternating blocks per contender")
    args = parser.parse_args(argv)
    for threads in args.threads:
        row = bench(threads, args.steps, args.rounds)
        print(f"sat-tiny-2s, {row['chunk_s']:.2f} s chunks, {threads} thread(s), load {row['load_before']} -> "
              f"{row['load_after']}, fp32 peak {row['peak_gflops']:.0f} GFLOP/s, {row['steps_timed']} steps each, {row['audio']}")
        for contender in CONTENDERS:
            r = row[contender]
            print(f"  {contender:9s} min {r['min_ms']:6.2f} ms  p10 {r['p10_ms']:6.2f} ms  median {r['median_ms']:6.2f} ms  "
                  f"{r['x_real_time']:6.1f}x real time  {r['gflop']:.3f} GFLOP  {100 * r['share_of_peak']:.0f}% of peak")
        print(f"  kernel vs op_by_op: {row['kernel_vs_op_by_op']:.2f}x, vs reference: {row['kernel_vs_reference']:.2f}x (p10)")
        print(json.dumps(row))


if __name__ == "__main__":
    main()
