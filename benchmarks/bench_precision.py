"""Speed and drift of the precision modes (fp32 / bf16 / int8), against fp32 and against a named peer, in one run.

Speed: each model on 10.24 s of noise through its own frontend (batch 1, random weights, ``torch.manual_seed(0)``, or
``--trained``: the weights ``tympan.load`` gives offline, e.g. the shipped default model's), the modes timed alternately
(median of ``--repeats``), with the ratio to tympan fp32 and, for AST-base384, to Hugging Face transformers'
``ASTForAudioClassification`` in fp32 (the peer of ``bench_transformers.py``), and each mode's FLOP/s as a share of
the matching matmul peak measured in the same run (``benchmarks/peak.py``: fp32, bf16 or int8).

Drift: the same weights on real ESC-10 clips (``../shared/data/esc10``, ``--clips`` of them, 5 s each, padded by the
model's frontend) in every mode: the largest probability difference to fp32, the top-5 agreement (the share of
fp32's top-5 classes a mode also ranks top-5) and the mAP of a mode's scores against fp32's top-5 tags (1.0 =
fp32's ranking of them above every other class, per clip, averaged over the clips).

    python -m benchmarks.bench_precision [--models ast-base384 dass-small] [--threads 2] [--clips 40]
    python -m benchmarks.bench_precision --models tymnet-s --trained --threads 1
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path
from typing import Callable

import torch

import tympan
from benchmarks.timing import alternated_ms
from benchmarks.peak import count_flops, load_average, matmul_peak, share_of_peak
from tympan.eval.metrics import average_precision
from tympan.inference.precision import PRECISIONS, with_precision

REPO = Path(__file__).resolve().parents[1]
ESC10 = REPO.parent / "shared" / "data" / "esc10"
HF_AST = "transformers ASTForAudioClassification fp32"


def build(model_id: str, precision: str, state: dict | None = None, trained: bool = False) -> torch.nn.Module:
    """``model_id`` with seed-0 random weights (or ``state``; ``trained``: as ``tympan.load`` gives it) in
    ``precision``."""
    torch.manual_seed(0)
    model = tympan.load(model_id) if trained else tympan.create_model(model_id).eval()
    if state is not None:
        model.load_state_dict(state)
    return with_precision(model, precision)


def hf_ast() -> torch.nn.Module | None:
    """The transformers AST with AST-base384's config (random weights), or None when transformers is missing."""
    try:
        from transformers import ASTConfig, ASTForAudioClassification
    except ImportError:
        return None
    config = ASTConfig(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                       patch_size=16, frequency_stride=10, time_stride=10, max_length=1024, num_mel_bins=128,
                       num_labels=527, layer_norm_eps=1e-6)
    return ASTForAudioClassification(config).eval()


def median_ms(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median ms of each function, run alternately (load drift hits all alike), one warm-up call each."""
    with torch.inference_mode():
        return alternated_ms(fns, repeats)


def speed(model_id: str, models: dict[str, torch.nn.Module], peaks: dict[str, float], repeats: int) -> dict:
    """Median ms per mode (and the transformers peer for AST) on 10.24 s, ratios and shares of peak."""
    noise = torch.randn(1, 163840, generator=torch.Generator().manual_seed(0)) * 0.1
    with torch.inference_mode():
        features = models["fp32"].frontend(noise)
    fns = {mode: (lambda m=m: m(features)) for mode, m in models.items()}
    peer = hf_ast() if model_id == "ast-base384" else None
    if peer is not None:
        fns[HF_AST] = lambda: peer(features)
    ms = median_ms(fns, repeats)
    flops = count_flops(lambda: models["fp32"](features))
    shape = " x ".join(map(str, features.shape[1:]))
    row = dict(model=model_id, input=f"10.24 s ({shape} features)", gflop=round(flops / 1e9, 2), ms=ms,
               ratio_vs_fp32={m: ms["fp32"] / ms[m] for m in models},
               share_of_peak={m: share_of_peak(flops, ms[m], peaks[m]) for m in models})
    if peer is not None:
        row["peer"] = HF_AST
        row["ratio_vs_peer"] = {m: ms[HF_AST] / ms[m] for m in models}
        row["share_of_peak"][HF_AST] = share_of_peak(flops, ms[HF_AST], peaks["fp32"])
    return row


def esc10_clips(count: int) -> list[Path]:
    """``count`` ESC-10 clips spread over the classes (round robin over the class column)."""
    with open(ESC10 / "esc10.csv", newline="") as f:
        rows = sorted(csv.DictReader(f), key=lambda r: r["filename"])
    by_class: dict[str, list[str]] = {}
    for r in rows:
        by_class.setdefault(r["category"], []).append(r["filename"])
    picked, i = [], 0
    while len(picked) < count and any(i < len(v) for v in by_class.values()):
        picked += [v[i] for v in by_class.values() if i < len(v)]
        i += 1
    return [ESC10 / "audio" / name for name in picked[:count]]


def drift(models: dict[str, torch.nn.Module], clips: list[Path], batch: int = 4) -> dict:
    """Largest probability difference, top-5 agreement and mAP against fp32's top-5 tags, per mode."""
    from tympan.audio import load

    waves = [torch.as_tensor(load(str(p), sample_rate=16000, mono=True)).float() for p in clips]
    length = max(w.numel() for w in waves)
    wave = torch.stack([torch.nn.functional.pad(w, (0, length - w.numel())) for w in waves])
    probs = {}
    with torch.inference_mode():
        for mode, model in models.items():
            probs[mode] = torch.cat([model.predict(part) for part in wave.split(batch)])
    ref = probs["fp32"]
    top_ref = ref.topk(5).indices
    targets = torch.zeros_like(ref).scatter_(1, top_ref, 1.0)
    out = {}
    for mode, p in probs.items():
        top = p.topk(5).indices
        agree = sum(len(set(a.tolist()) & set(b.tolist())) for a, b in zip(top, top_ref)) / top_ref.numel()
        ap = average_precision(p.t(), targets.t())  # per clip: the mode's ranking of fp32's top-5 classes
        out[mode] = dict(max_prob_diff=float((p - ref).abs().max()), top5_agreement=agree,
                         map_vs_fp32_top5=float(ap.mean()))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["ast-base384", "dass-small"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--clips", type=int, default=40, help="ESC-10 clips for the drift (0: skip the drift)")
    parser.add_argument("--skip-speed", action="store_true")
    parser.add_argument("--trained", action="store_true", help="the weights tympan.load gives offline (the shipped "
                        "default model's), not random ones")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads, load {load_average()}")
    peaks = {m: matmul_peak(args.threads, m) for m in PRECISIONS} if not args.skip_speed else {}
    if peaks:
        print("matmul peak: " + ", ".join(f"{m} {g:.0f} G{'OP' if m == 'int8' else 'FLOP'}/s" for m, g in peaks.items()))
    results = []
    for model_id in args.models:
        state = build(model_id, "fp32", trained=args.trained).state_dict()
        models = {mode: build(model_id, mode, state, trained=args.trained) for mode in PRECISIONS}
        row: dict = dict(model=model_id)
        if not args.skip_speed:
            row.update(speed(model_id, models, peaks, args.repeats))
            peer = f"   {HF_AST}: {row['ms'][HF_AST]:.0f} ms" if "peer" in row else ""
            print(f"{model_id} {row['input']} ({row['gflop']} GFLOP){peer}")
            for mode in PRECISIONS:
                vs_peer = f"  {row['ratio_vs_peer'][mode]:.2f}x transformers" if "peer" in row else ""
                print(f"  {mode:5s} {row['ms'][mode]:7.{0 if row['ms']['fp32'] >= 100 else 2}f} ms  "
                      f"{row['ratio_vs_fp32'][mode]:.2f}x fp32{vs_peer}  "
                      f"{100 * row['share_of_peak'][mode]:.0f}% of {mode} peak")
        if args.clips and ESC10.is_dir():
            row["drift"] = drift(models, esc10_clips(args.clips))
            row["drift_clips"] = args.clips
            for mode, d in row["drift"].items():
                print(f"  drift {mode:5s} max |p - p_fp32| {d['max_prob_diff']:.4f}  top-5 agreement "
                      f"{100 * d['top5_agreement']:.1f}%  mAP vs fp32 top-5 {d['map_vs_fp32_top5']:.4f}")
        results.append(row)
    print(json.dumps({"bench": "precision", "threads": args.threads, "load": load_average(), "peaks": peaks,
                      "torch": torch.__version__, "results": results}))


if __name__ == "__main__":
    main()
