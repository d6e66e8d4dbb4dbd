"""DASS-small forward on a 10 s clip: tympan's chunked scan vs the original design's cost (the same model with the
sequential reference scan in place of the CUDA kernel, which is how the original runs on a CPU; peers.md measured
the original code that way at 1.17 s). Prints ms, the ratio and a JSON line.

Run: ``python benchmarks/bench_dass_forward.py [--threads 2] [--repeats 3]``
"""

from __future__ import annotations

import argparse
import functools
import json
import time

import torch

import tympan
import tympan.models.dass as dass
from tympan.ops import selective_scan


def best_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = tympan.create_model("dass-small").eval()
    x = torch.randn(1, 1024, 128) * 0.5  # 10.24 s of normalised fbank
    results = {}
    with torch.inference_mode():
        for backend in ("chunked", "reference"):
            dass.selective_scan = functools.partial(selective_scan, backend=backend)
            results[backend] = best_ms(lambda: model(x), args.repeats)
        dass.selective_scan = selective_scan
    ratio = results["reference"] / results["chunked"]
    print(f"dass-small 10.24 s, {args.threads} threads: tympan {results['chunked']:.0f} ms, "
          f"original design (reference scan) {results['reference']:.0f} ms, ratio {ratio:.1f}x "
          f"(peers.md: original code 1170 ms)")
    print(json.dumps({"bench": "dass_forward", "threads": args.threads, "tympan_ms": results["chunked"],
                      "reference_scan_ms": results["reference"], "ratio": ratio, "peers_original_ms": 1170.0}))


if __name__ == "__main__":
    main()
