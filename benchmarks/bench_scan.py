"""Benchmark tympan's selective scan on CPU against the reference loop and mambapy's parallel scan.

"tympan" is the default CPU path (``selective_scan``: the fused C kernel of :mod:`tympan.ops.fused_scan` for
float32 inference with N=1 when a C compiler is there, else the blocked eager scan); "tympan-eager" forces the blocked
eager scan, so the fused kernel's own gain shows in the same run. The headline ratio is against the faster of the
reference loop and mambapy (goal at DASS stage 1: >= 3x). The scan is memory- and latency-bound (a few FLOPs per
element), so instead of a share of the matmul peak each row prints the input+output traffic in GB/s.

Shapes are the ones measured in shared/specs/peers.md (DASS stages with N=1 and 4 directions as groups,
SSAM-small, a Mamba training shape). mambapy is optional (``pip install --no-deps mambapy``); it is used only
here, through its ``pscan`` with the surrounding ops of its ``selective_scan``.

    python -m benchmarks.bench_scan [--repeat 3] [--skip-reference] [--cases dass-stage1 ...]
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass

import torch

from benchmarks.timing import alternated_ms
from tympan.ops import chunked_scan, fused_scan, selective_scan, selective_scan_reference


@dataclass
class Case:
    name: str
    batch: int
    channels: int
    length: int
    state: int
    groups: int  # B/C groups (DASS: 4 scan directions); 0 = ungrouped [b, n, L]
    threads: tuple[int, ...]
    backward: bool = False


CASES = [
    Case("dass-stage1", 2, 4 * 96, 8192, 1, 4, (1, 2)),  # 8 sequences = batch 2 x 4 directions
    Case("dass-stage3", 2, 4 * 384, 512, 1, 4, (1, 2)),
    Case("ssam-small-10s", 4, 768, 1250, 16, 0, (1, 2)),  # bidirectional B2 x 2
    Case("mamba-train", 2, 768, 512, 16, 0, (1, 2), backward=True),
]


def make_inputs(case: Case, requires_grad: bool) -> dict:
    g = torch.Generator().manual_seed(0)
    b, d, L, n = case.batch, case.channels, case.length, case.state
    bc_shape = (b, case.groups, n, L) if case.groups else (b, n, L)
    tensors = dict(
        u=torch.randn(b, d, L, generator=g), delta=0.5 * torch.randn(b, d, L, generator=g),
        A=-torch.exp(torch.rand(d, n, generator=g) * 2 - 1), B=torch.randn(bc_shape, generator=g),
        C=torch.randn(bc_shape, generator=g), D=torch.randn(d, generator=g), delta_bias=torch.randn(d, generator=g) - 3,
    )
    for t in tensors.values():
        t.requires_grad_(requires_grad)
    return tensors


def mambapy_scan(u, delta, A, B, C, D, delta_bias):
    """mambapy's selective_scan (pscan path) on our layout; grouped B/C are expanded per channel."""
    from mambapy.pscan import pscan

    dt = torch.nn.functional.softplus(delta + delta_bias[:, None]).transpose(1, 2)  # (b, L, d)
    x = u.transpose(1, 2)
    b, L, d = x.shape
    Bc = B if B.dim() == 4 else B[:, None]
    Cc = C if C.dim() == 4 else C[:, None]
    per_group = d // Bc.shape[1]
    Bc = Bc.repeat_interleave(per_group, 1).permute(0, 3, 1, 2)  # (b, L, d, n)
    Cc = Cc.repeat_interleave(per_group, 1).permute(0, 3, 1, 2)
    deltaA = torch.exp(dt.unsqueeze(-1) * A)
    BX = (dt * x).unsqueeze(-1) * Bc
    hs = pscan(deltaA, BX)
    y = (hs * Cc).sum(-1) + D * x
    return y.transpose(1, 2)


def ours(backend: str):
    def run(u, delta, A, B, C, D, delta_bias):
        return selective_scan(u, delta, A, B, C, D, delta_bias=delta_bias, delta_softplus=True, backend=backend)
    return run


def eager(u, delta, A, B, C, D, delta_bias):
    """The blocked eager scan (the fused kernel switched off for this call)."""
    use_fused = chunked_scan._use_fused
    chunked_scan._use_fused = lambda *args: False
    try:
        return ours("chunked")(u, delta, A, B, C, D, delta_bias)
    finally:
        chunked_scan._use_fused = use_fused


def traffic_gb(case: Case) -> float:
    """GB read and written by one forward: u, delta, y [b, d, L] and B, C [b, g, n, L] in float32."""
    b, d, L, n, g = case.batch, case.channels, case.length, case.state, max(case.groups, 1)
    return 4 * (3 * b * d * L + 2 * b * g * n * L) / 1e9


def reference(u, delta, A, B, C, D, delta_bias):
    return selective_scan_reference(u, delta, A, B, C, D, delta_bias=delta_bias, delta_softplus=True)


def run_once(fn, inputs: dict, backward: bool) -> None:
    for t in inputs.values():
        t.grad = None
    if backward:
        fn(**inputs).square().sum().backward()
    else:
        with torch.no_grad():
            fn(**inputs)


def time_interleaved(fns: dict, inputs: dict, backward: bool, repeat: int) -> dict:
    """Best-of-``repeat`` ms per function, alternating between them so load drift hits all alike."""
    return alternated_ms({name: lambda fn=fn: run_once(fn, inputs, backward) for name, fn in fns.items()}, repeat,
                         reduce=min)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--skip-reference", action="store_true", help="skip the slow sequential loop")
    parser.add_argument("--cases", nargs="*", default=None, help="subset of case names")
    args = parser.parse_args()
    try:
        import mambapy.pscan  # noqa: F401
        have_mambapy = True
    except Exception as exc:  # noqa: BLE001
        print(f"mambapy not importable ({exc}); skipping it")
        have_mambapy = False
    results = []
    for case in CASES:
        if args.cases and case.name not in args.cases:
            continue
        inputs = make_inputs(case, case.backward)
        with torch.no_grad():  # agreement check on the benchmark inputs
            y = ours("chunked")(**inputs)
            y_ref = mambapy_scan(**inputs) if have_mambapy else None
        for threads in case.threads:
            torch.set_num_threads(threads)
            row = dict(case=case.name, b=case.batch, d=case.channels, L=case.length, n=case.state, threads=threads,
                       mode="fwd+bwd" if case.backward else "fwd")
            fns = {"tympan": ours("chunked")}
            if not case.backward and fused_scan.available():
                fns["tympan-eager"] = eager
            if have_mambapy:
                fns["mambapy"] = mambapy_scan
            row.update({f"{k}_ms": v for k, v in time_interleaved(fns, inputs, case.backward, args.repeat).items()})
            if have_mambapy:
                row["max_abs_diff_vs_mambapy"] = float((y - y_ref).abs().max())
            if not args.skip_reference and not case.backward:  # autograd through the loop: ~10x mambapy
                once = alternated_ms({"ref": lambda: run_once(reference, inputs, False)}, 1, warmup=0)  # slow: once
                row["reference_ms"] = once["ref"]
            others = [row[k] for k in ("mambapy_ms", "reference_ms") if k in row]
            if others:
                row["speedup_vs_best_other"] = min(others) / row["tympan_ms"]
            if not case.backward:
                row["tympan_gb_per_s"] = traffic_gb(case) / (row["tympan_ms"] / 1e3)
            row["load"] = load_average()
            results.append(row)
            best = f"  => {row['speedup_vs_best_other']:.1f}x the faster baseline" if others else ""
            print(f"{case.name:16s} {row['mode']:7s} threads={threads}  tympan {row['tympan_ms']:9.1f} ms  "
                  + "  ".join(f"{k[:-3]} {row[k]:9.1f} ms ({row[k] / row['tympan_ms']:.1f}x)"
                              for k in ("tympan-eager_ms", "mambapy_ms", "reference_ms") if k in row)
                  + best + (f"  ({row['tympan_gb_per_s']:.1f} GB/s)" if "tympan_gb_per_s" in row else ""),
                  flush=True)
    print(json.dumps({"bench": "selective_scan", "torch": torch.__version__, "load": load_average(),
                      "fused_kernel": fused_scan.available(), "results": results}))


def load_average() -> str:
    try:
        return f"{os.getloadavg()[0]:.2f}"
    except OSError:
        return "n/a"


if __name__ == "__main__":
    main()
