"""The GPU figures of issue 16, in one short script for a lent GPU: the selective scan, bf16 training steps,
inference at batch 64.

1. **Selective scan** at DASS's stage-1 shapes (b 2, d 384, L 8192, N 1, 4 direction groups; see
   ``bench_scan.py``), forward: tympan's chunked scan against mamba-ssm's fused CUDA kernel when ``mamba_ssm`` is
   importable (``backend="cuda"``), and forward + backward (a training step's scan).
2. **Training step** (forward, BCE against random multi-hot targets (encoders: the mean square of the output),
   backward, AdamW) per model at
   ``--train-batch``: float32 against bf16 autocast, samples per second and their ratio.
3. **Inference** at ``--infer-batch`` (64) per model: float32 against bf16 autocast, clips per second and the largest
   probability change bf16 makes on these inputs (encoders: the largest output change relative to the largest output).

Random weights (``torch.manual_seed(0)``), ``--seconds`` of noise per clip through each model's own frontend (on the
CPU, then moved: the frontends are the CPU ones), CUDA synchronised around every timed call, best of ``--repeats``
after ``--warmup`` untimed calls, float32 and bf16 alternated (:func:`benchmarks.timing.alternated_ms`). Prints one
JSON line per row. Runs on the CPU too (``--device cpu``, with small sizes), which is how it is checked without a GPU.

    python -m benchmarks.bench_gpu [--device cuda] [--models ast-base384 dasheng-base dass-small]
        [--train-batch 16] [--infer-batch 64] [--seconds 10] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
from typing import Callable

import torch

import tympan
from benchmarks.bench_scan import CASES, make_inputs
from benchmarks.timing import alternated_ms
from tympan.ops import selective_scan
from tympan.ops.selective_scan import cuda_kernel_available


def best_ms(fns: dict[str, Callable[[], object]], device: torch.device, repeats: int, warmup: int) -> dict[str, float]:
    """Fastest of ``repeats`` alternated timed calls of each function after ``warmup`` untimed ones (synchronised on
    CUDA)."""
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else None
    return alternated_ms(fns, repeats, warmup, reduce=min, sync=sync)


def scan_rows(device: torch.device, repeats: int, warmup: int) -> list[dict]:
    """DASS stage 1: the chunked scan, and mamba-ssm's kernel when importable (forward; forward + backward)."""
    case = next(c for c in CASES if c.name == "dass-stage1")
    backends = ["chunked"] + (["cuda"] if device.type == "cuda" and cuda_kernel_available() else [])
    rows = []
    for backward in (False, True):
        inputs = {k: v.detach().to(device).requires_grad_(backward) for k, v in make_inputs(case, False).items()}

        def run(backend: str) -> None:
            with torch.set_grad_enabled(backward):
                y = selective_scan(inputs["u"], inputs["delta"], inputs["A"], inputs["B"], inputs["C"], inputs["D"],
                                   delta_bias=inputs["delta_bias"], delta_softplus=True, backend=backend)
                if backward:
                    y.square().sum().backward()

        times = best_ms({b: lambda b=b: run(b) for b in backends}, device, repeats, warmup)
        row = {"bench": "gpu_scan", "case": case.name, "pass": "forward+backward" if backward else "forward",
               "device": str(device), **{f"{b}_ms": round(t, 3) for b, t in times.items()}}
        if "cuda" in times:
            row["chunked_vs_cuda_kernel"] = round(times["chunked"] / times["cuda"], 2)
        rows.append(row)
    return rows


def model_inputs(model: torch.nn.Module, batch: int, seconds: float, device: torch.device) -> torch.Tensor:
    """``batch`` clips of noise through the model's own frontend (on the CPU), on ``device``."""
    wave = torch.randn(batch, int(seconds * model.sample_rate), generator=torch.Generator().manual_seed(0)) * 0.1
    with torch.inference_mode():
        features = model.frontend(wave)
    return features.clone().to(device)


def train_row(name: str, device: torch.device, batch: int, seconds: float, repeats: int, warmup: int) -> dict:
    """Training steps per second in float32 and with bf16 autocast (the same model, optimizer and inputs)."""
    torch.manual_seed(0)
    model = tympan.create_model(name).to(device).train()
    features = model_inputs(model, batch, seconds, device)
    targets = (torch.rand(batch, max(model.num_classes, 1), generator=torch.Generator().manual_seed(1)) < 0.05).float()
    targets = targets.to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)

    def step(bf16: bool) -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            out = model(features)
        if model.num_classes:
            loss = torch.nn.functional.binary_cross_entropy_with_logits(out.float(), targets)
        else:  # an encoder: a loss on its output (the step's cost is the backward through the model either way)
            loss = out.float().square().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    times = best_ms({"fp32": lambda: step(False), "bf16": lambda: step(True)}, device, repeats, warmup)
    fp32, bf16 = times["fp32"], times["bf16"]
    return {"bench": "gpu_train_step", "model": name, "device": str(device), "batch": batch, "seconds": seconds,
            "fp32_ms": round(fp32, 2), "bf16_ms": round(bf16, 2), "fp32_samples_per_s": round(batch / fp32 * 1e3, 1),
            "bf16_samples_per_s": round(batch / bf16 * 1e3, 1), "bf16_vs_fp32": round(fp32 / bf16, 2)}


def infer_row(name: str, device: torch.device, batch: int, seconds: float, repeats: int, warmup: int) -> dict:
    """Clips per second in float32 and with bf16 autocast, and the largest probability change bf16 makes."""
    torch.manual_seed(0)
    model = tympan.create_model(name).to(device).eval()
    features = model_inputs(model, batch, seconds, device)

    def forward(bf16: bool) -> torch.Tensor:
        with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            return model(features)

    times = best_ms({"fp32": lambda: forward(False), "bf16": lambda: forward(True)}, device, repeats, warmup)
    fp32, bf16 = times["fp32"], times["bf16"]
    half, full = forward(True).float(), forward(False).float()
    if model.num_classes:  # the largest probability change
        drift = (torch.sigmoid(half) - torch.sigmoid(full)).abs().max().item()
    else:  # an encoder: the largest change relative to the output's largest magnitude
        drift = ((half - full).abs().max() / full.abs().max()).item()
    return {"bench": "gpu_inference", "model": name, "device": str(device), "batch": batch, "seconds": seconds,
            "fp32_ms": round(fp32, 2), "bf16_ms": round(bf16, 2), "fp32_clips_per_s": round(batch / fp32 * 1e3, 1),
            "bf16_clips_per_s": round(batch / bf16 * 1e3, 1), "bf16_vs_fp32": round(fp32 / bf16, 2),
            ("bf16_max_prob_change" if model.num_classes else "bf16_max_rel_change"): round(drift, 4)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--models", nargs="+", default=["ast-base384", "dasheng-base", "dass-small"])
    parser.add_argument("--train-batch", type=int, default=16)
    parser.add_argument("--infer-batch", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--skip", nargs="*", default=[], choices=["scan", "train", "inference"])
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False  # float32 rows stay float32
        torch.backends.cudnn.allow_tf32 = False
        print(f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}, mamba-ssm kernel: {cuda_kernel_available()}")
    rows: list[dict] = []
    if "scan" not in args.skip:
        rows += scan_rows(device, args.repeats, args.warmup)
    for name in args.models:
        if "train" not in args.skip:
            rows.append(train_row(name, device, args.train_batch, args.seconds, args.repeats, args.warmup))
        if "inference" not in args.skip:
            rows.append(infer_row(name, device, args.infer_batch, args.seconds, args.repeats, args.warmup))
    for row in rows:
        print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
