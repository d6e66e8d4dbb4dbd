"""This machine's measured matrix-multiply peak, and a model's FLOPs, so a benchmark can say how close to the limit it is.

``matmul_peak(threads, dtype)`` times large square products (fp32, bf16, or int8 through ``torch._int_mm``) and
returns the best GFLOP/s (int8: GOP/s); ``count_flops(fn)`` counts the FLOPs of one call with torch's
``FlopCounterMode`` (matmuls, convolutions and attention: the work a peak is quoted for). Benchmarks print
``achieved GFLOP/s / peak`` as "share of peak".

    python -m benchmarks.peak [--threads 1 2] [--size 2048]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from typing import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode

DTYPES = ("fp32", "bf16", "int8")


def matmul_peak(threads: int | None = None, dtype: str = "fp32", size: int = 2048, seconds: float = 1.0) -> float:
    """Best GFLOP/s of ``size``-square products on ``threads`` threads over about ``seconds`` of repeats."""
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        g = torch.Generator().manual_seed(0)
        if dtype == "int8":
            a = torch.randint(-127, 128, (size, size), dtype=torch.int8, generator=g)
            b = torch.randint(-127, 128, (size, size), dtype=torch.int8, generator=g)
            fn = lambda: torch._int_mm(a, b)  # noqa: E731
        else:
            torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
            a = torch.randn(size, size, generator=g).to(torch_dtype)
            b = torch.randn(size, size, generator=g).to(torch_dtype)
            fn = lambda: a @ b  # noqa: E731
        fn()
        best, stop = float("inf"), time.perf_counter() + seconds
        while time.perf_counter() < stop or best == float("inf"):
            start = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - start)
        return 2 * size**3 / best / 1e9
    finally:
        torch.set_num_threads(previous)


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs of one call of ``fn`` (matmuls, convolutions, attention), counted by torch's FlopCounterMode, with
    tympan's C product kernels and oneDNN products off (torch cannot see inside them: the same work then runs as
    torch ops)."""
    from tympan.ops import dense, small_gemm

    saved = small_gemm.ENABLED, small_gemm.BLOCKS_ENABLED, dense.ENABLED
    small_gemm.ENABLED = small_gemm.BLOCKS_ENABLED = dense.ENABLED = False
    try:
        with torch.inference_mode(), FlopCounterMode(display=False) as counter:
            fn()
    finally:
        small_gemm.ENABLED, small_gemm.BLOCKS_ENABLED, dense.ENABLED = saved
    return counter.get_total_flops()


def share_of_peak(flops: float, ms: float, peak_gflops: float) -> float:
    """Achieved GFLOP/s over the measured peak."""
    return flops / (ms / 1e3) / 1e9 / peak_gflops


def load_average() -> str:
    """The 1-minute load average (how busy the machine was while measuring)."""
    try:
        return f"{os.getloadavg()[0]:.2f}"
    except OSError:
        return "n/a"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--size", type=int, default=2048)
    parser.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=DTYPES)
    args = parser.parse_args()
    rows = []
    for threads in args.threads:
        for dtype in args.dtypes:
            gflops = matmul_peak(threads, dtype, args.size)
            rows.append(dict(threads=threads, dtype=dtype, gflops=round(gflops, 1)))
            print(f"{threads} thread(s) {dtype:5s} {gflops:7.1f} G{'OP' if dtype == 'int8' else 'FLOP'}/s")
    print(json.dumps({"bench": "matmul_peak", "load": load_average(), "torch": torch.__version__, "results": rows}))


if __name__ == "__main__":
    main()
