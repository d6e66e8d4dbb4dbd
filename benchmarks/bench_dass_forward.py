"""DASS-small forward on a 10 s clip (fp32): tympan against the original design's cost, in one run.

Rows: tympan as it runs by default (the fused C cross scan: four directions and their merge in one pass, when a
compiler is there), ``tympan-scan`` (the fused scan kernel inside the eager cross scan and merge), ``tympan-eager``
(no compiled kernel: the blocked eager scan), and the original design on a CPU: the same model with the sequential
reference scan in place of the CUDA kernel (peers.md measured the original code that way at 1.17 s). Prints ms,
the ratios, the model's FLOP/s as a share of the fp32 matmul peak measured in the same run, and a JSON line.
Goal: tympan <= 350 ms on 2 threads.

Run: ``python benchmarks/bench_dass_forward.py [--threads 2] [--repeats 5]``
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
import tympan  # noqa: E402
import tympan.models.dass as dass  # noqa: E402
from benchmarks.peak import count_flops, load_average, matmul_peak, share_of_peak  # noqa: E402
from tympan.ops import fused_scan, selective_scan  # noqa: E402

GOAL_MS = 350.0


def variant(name: str):
    """Set the scan DASS uses: "tympan" (default: the fused cross scan), "tympan-scan" (the fused scan kernel
    inside the eager cross scan / merge), "tympan-eager" (no compiled kernel), "reference" (sequential loop)."""
    fused_scan.available = AVAILABLE if name in ("tympan", "tympan-scan") else (lambda: False)
    dass.FUSED_CROSS_SCAN = name == "tympan"
    backend = "reference" if name == "reference" else "chunked"
    dass.selective_scan = functools.partial(selective_scan, backend=backend)


AVAILABLE = fused_scan.available


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--skip-reference", action="store_true", help="skip the slow sequential-scan row")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    peak = matmul_peak(args.threads, "fp32")
    torch.manual_seed(0)
    model = tympan.create_model("dass-small").eval()
    x = torch.randn(1, 1024, 128) * 0.5  # 10.24 s of normalised fbank
    names = ["tympan", "tympan-scan", "tympan-eager"] + ([] if args.skip_reference else ["reference"])
    times: dict[str, list[float]] = {n: [] for n in names}
    with torch.inference_mode():
        for name in names:  # warm-up (and the fused kernel's one-time build)
            variant(name)
            model(x)
        for _ in range(args.repeats):  # alternate, so load drift hits every row alike
            for name in names:
                variant(name)
                start = time.perf_counter()
                model(x)
                times[name].append((time.perf_counter() - start) * 1000)
    variant("tympan")
    dass.selective_scan = selective_scan
    flops = count_flops(lambda: model(x))
    ms = {n: statistics.median(t) for n, t in times.items()}
    ratios = {n: ms[n] / ms["tympan"] for n in names}
    print(f"dass-small 10.24 s, {args.threads} threads, load {load_average()}, fp32 peak {peak:.0f} GFLOP/s "
          f"({flops / 1e9:.1f} GFLOP)")
    for n in names:
        print(f"  {n:13s} {ms[n]:7.0f} ms  ({ratios[n]:.2f}x tympan's time)  "
              f"{100 * share_of_peak(flops, ms[n], peak):.0f}% of peak")
    print(f"  goal <= {GOAL_MS:.0f} ms: {'met' if ms['tympan'] <= GOAL_MS else 'missed'}; peers.md original code 1170 ms")
    print(json.dumps({"bench": "dass_forward", "threads": args.threads, "load": load_average(), "ms": ms,
                      "ratio_vs_tympan": ratios, "gflop": flops / 1e9, "peak_gflops": peak,
                      "share_of_peak": share_of_peak(flops, ms["tympan"], peak), "goal_ms": GOAL_MS,
                      "peers_original_ms": 1170.0}))


if __name__ == "__main__":
    main()
