"""YAMNet embeddings and a log-mel floor on ESC-10 (folds 1-4 here): 4-fold kNN (k=5, cosine) and linear probe.

Compares with ``shared/specs/peers.md`` (5-fold on all 400 clips: kNN 95.25 %, probe 97.50 % on the 1024-d
embedding). Clips are padded/cropped to 5 s (80,000 samples), as ESC-50 v2. Prints a table and a JSON summary.

    python benchmarks/probe_yamnet_esc10.py [--shared ../shared] [--save-dir /tmp/esc10_embeddings] [--json out.json]
"""

from __future__ import annotations

import argparse
import csv
import json
import time
from pathlib import Path

import numpy as np
import torch

from tympan import audio
from tympan.eval.probe import evaluate, fold_splits, format_results, save_embeddings
from tympan.teachers.yamnet import YAMNet, log_mel_spectrogram, pad_waveform

CLIP_SAMPLES = 80000


def fit_length(waveform: np.ndarray, length: int = CLIP_SAMPLES) -> np.ndarray:
    """Zero-pad or crop the end to `length` samples."""
    return np.pad(waveform, (0, max(0, length - len(waveform))))[:length]


def log_mel_features(waveform: np.ndarray) -> np.ndarray:
    """Mean and std over time of YAMNet's 64-bin log-mel: a 128-d floor."""
    log_mel = log_mel_spectrogram(pad_waveform(waveform))
    return np.concatenate([log_mel.mean(0), log_mel.std(0)]).astype(np.float32)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shared", type=Path, default=Path(__file__).resolve().parents[2] / "shared")
    parser.add_argument("--save-dir", type=Path, default=None, help="also write the embeddings files here")
    parser.add_argument("--json", type=Path, default=None, help="write the summary JSON here")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)  # also the probes' L-BFGS; on a busy machine 1 is far faster than 2

    data = args.shared / "data" / "esc10"
    rows = list(csv.DictReader(open(data / "esc10.csv")))
    rows = [r for r in rows if (data / "audio" / r["filename"]).is_file()]
    labels = np.array([int(r["target_esc10"]) for r in rows])
    folds = np.array([int(r["fold"]) for r in rows])
    keys = [r["filename"] for r in rows]

    start = time.perf_counter()
    waveforms = [fit_length(audio.load(data / "audio" / k)) for k in keys]
    decode_s = time.perf_counter() - start
    yamnet = YAMNet(args.shared / "teachers" / "yamnet" / "YamNet_w8a8.onnx.zip", num_threads=args.threads)
    start = time.perf_counter()
    scores, embeddings = yamnet.clip(waveforms)
    yamnet_s = time.perf_counter() - start
    log_mel = np.stack([log_mel_features(w) for w in waveforms])
    audio_s = len(waveforms) * CLIP_SAMPLES / yamnet.sample_rate
    print(f"{len(rows)} clips ({audio_s:.0f} s of audio): decode {decode_s:.1f} s, "
          f"YAMNet frontend+model {yamnet_s:.2f} s = {audio_s / yamnet_s:.0f}x real time")  # fmt: skip

    features = {"yamnet_embedding_1024": embeddings, "yamnet_scores_521": scores, "logmel_meanstd_128": log_mel}
    if args.save_dir:
        args.save_dir.mkdir(parents=True, exist_ok=True)
        for name, x in features.items():
            save_embeddings(args.save_dir / f"esc10_{name}.safetensors", x, keys, {"features": name, "clip_s": 5})

    splits = fold_splits(folds, labels)
    summary: dict[str, dict[str, float]] = {}
    for name, x in features.items():
        for method in ("knn", "linear"):
            start = time.perf_counter()
            result = evaluate(x, labels, splits, method, k=5)
            elapsed = time.perf_counter() - start
            print(f"\n== {name} / {method} ({elapsed:.1f} s)")
            print(format_results(result))
            summary[f"{name}/{method}"] = {
                "mean_accuracy": result["mean"]["accuracy"],
                "std_accuracy": result["std"]["accuracy"],
                "per_fold": [s["accuracy"] for s in result["splits"]],
                **({"weight_decay": [s["weight_decay"] for s in result["splits"]]} if method == "linear" else {}),
            }
    print("\nsummary (4-fold CV on folds 1-4; peers.md: 5-fold kNN 95.25 %, probe 97.50 % on the embedding)")
    print(f"{'features':<24} {'kNN k=5':>10} {'linear':>10}")
    for name in features:
        knn, lin = summary[f"{name}/knn"]["mean_accuracy"], summary[f"{name}/linear"]["mean_accuracy"]
        print(f"{name:<24} {100 * knn:>9.2f}% {100 * lin:>9.2f}%")
    summary["speed"] = {"clips": len(rows), "audio_s": audio_s, "yamnet_s": yamnet_s, "realtime": audio_s / yamnet_s}
    text = json.dumps(summary, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
