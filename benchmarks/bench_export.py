"""ONNX export per family: max |ORT - PyTorch| at two lengths the export did not see, and ORT vs PyTorch eager speed.

Baseline: PyTorch eager on the same inputs, in the same run, with the same thread count (the ORT session's
``intra_op_num_threads``). Every model is built at full size with random weights (``torch.manual_seed(0)``),
exported with :func:`tympan.export.export_onnx` (dynamo, opset 18) and checked with :func:`tympan.export.verify_onnx`:
window models on ``--batch`` clips at x0.7 and x1.3 of the export example (half a window, or 4 s for DASS/SSAM), streaming
models (SAT) over three 2 s steps carrying the state and one short step. Time = best of ``--repeats`` per length,
summed over the lengths. Prints a table, the ORT/PyTorch speed ratios and one JSON line per model.

Run: ``python benchmarks/bench_export.py [--models ast-base384 dass-small ...] [--threads 2] [--repeats 3]``
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch

import tympan
from tympan.export import ExportError, export_onnx, verify_onnx
from tympan.models import DEFAULT_MODEL

FAMILIES = {  # family -> the id benchmarked
    "AST": "ast-base384",
    "SSAST": "ssast-base-patch",
    "DASS": "dass-small",
    "SSAM": "ssam-tiny",
    "Dasheng": "dasheng-base",
    "SAT (step)": "sat-tiny-2s",
    "ViT baseline": "audiotransformer-tiny",
    "default model (TymNet step)": "tymnet-s",
}


def run_one(model_id: str, folder: Path, repeats: int, batch: int) -> dict:
    torch.manual_seed(0)
    model = tympan.create_model(model_id).eval()
    started = time.perf_counter()
    try:
        report = export_onnx(model, folder / f"{model_id}.onnx")
    except ExportError as err:
        return {"model": model_id, "exported": False, "error": str(err)}
    verify_onnx(model, report, repeats=repeats, batch=batch)
    row = report.to_dict()
    row.update(model=model_id, exported=True, total_seconds=time.perf_counter() - started,
               onnx_mb=os.path.getsize(report.path) / 1e6)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", help="model ids (default: one per family and the default model)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", type=int, default=1, help="clips per window-model call (streaming: one stream)")
    parser.add_argument("--keep", type=Path, help="write the ONNX files here instead of a temporary folder")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    ids = args.models or list(dict.fromkeys([*FAMILIES.values(), DEFAULT_MODEL]))
    print(f"torch {torch.__version__}, {args.threads} threads, load average {os.getloadavg()[0]:.2f}; "
          "baseline: PyTorch eager on the same inputs")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.keep or Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        for model_id in ids:
            row = run_one(model_id, folder, args.repeats, args.batch)
            rows.append(row)
            print(json.dumps({"bench": "export", **row}, default=str), flush=True)
    print()
    print("| model | kind | export s | lengths (samples) | max abs diff probabilities | max abs diff embedding/state "
          "(rel) | PyTorch ms | ORT ms | ORT/PyTorch speed | verified |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        if not row["exported"]:
            print(f"| {row['model']} | | did not export: {row['error'][:120]} | | | | | | | no |")
            continue
        diffs = row["max_abs_diff"]
        other = [k for k in diffs if k != "probabilities"]
        other_text = ", ".join(f"{k} {diffs[k]:.1e} ({row['max_rel_diff'][k]:.1e})" for k in other)
        probs = f"{diffs['probabilities']:.1e}" if "probabilities" in diffs else "-"
        print(f"| {row['model']} | {row['kind']} | {row['export_seconds']:.0f} | {row['lengths']} | {probs} | "
              f"{other_text} | {row['torch_seconds'] * 1e3:.0f} | {row['ort_seconds'] * 1e3:.0f} | "
              f"{row['speedup']:.2f}x | {'yes' if row['ok'] else 'NO: ' + '; '.join(row['failures'])[:200]} |")
    done = [r for r in rows if r["exported"]]
    print("\nORT/PyTorch speed ratios: " + ", ".join(f"{r['model']} {r['speedup']:.2f}x" for r in done))
    print(json.dumps({"bench": "export_summary", "threads": args.threads, "baseline": "pytorch-eager",
                      "ratios": {r["model"]: r["speedup"] for r in done},
                      "verified": {r["model"]: r["ok"] for r in done},
                      "failed_export": [r["model"] for r in rows if not r["exported"]]}))


if __name__ == "__main__":
    main()
