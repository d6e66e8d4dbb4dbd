"""The probe table (issue 6): YAMNet peer, a log-mel floor and random-weight floors of every tympan family,
on ESC-10 (4-fold, folds 1-4) and FSDD (fixed split), by cosine kNN (k=5) and a linear probe.

Protocols:

* **ESC-10**: the 320 clips of folds 1-4, cropped/zero-padded to 5 s; leave-one-fold-out (:func:`fold_splits`,
  the weight decay chosen on the other training folds in turn).
* **FSDD**: train on the ``train`` split (takes 10-49, or ``--fsdd-train-takes``), report on the ``validation``
  split (takes 5-9 of every speaker and digit; the README's test takes 0-4 are not in /work/shared); clips at their
  own length. The linear probe's weight decay is chosen on a stratified 20 % of the training rows
  (:func:`fixed_split`, seed 0), then refitted on all training rows.

Rows: ``logmel`` (mean + std over time of YAMNet's 64-bin log-mel, 128-d), ``yamnet`` (the 1024-d embedding, mean
over 0.96 s patches), and random-weight tympan models (``torch.manual_seed(--seed)`` before building; scene
embeddings of :mod:`tympan.hear` through :func:`tympan.eval.embed.embed_datafile`). Embeddings are cached under
``--work-dir`` (one ``tympan.embeddings.v1`` file per row and dataset, resumable), so a rerun only probes.
Files that cannot be decoded are skipped and listed, never fatal.

    python benchmarks/probe_table.py --work-dir /tmp/probe_work [--rows logmel yamnet sat-tiny-2s ...]
        [--fsdd-train-takes 10 14] [--json table.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from probe_yamnet_esc10 import fit_length, log_mel_features  # noqa: E402

from tympan import audio  # noqa: E402
from tympan.data import esc10_datafile, fsdd_datafile, read_datafile, write_datafile  # noqa: E402
from tympan.eval.embed import embed_datafile  # noqa: E402
from tympan.eval.probe import evaluate, fixed_split, fold_splits, load_embeddings, save_embeddings  # noqa: E402
from tympan.hear import SAMPLE_RATE, load_model  # noqa: E402

ESC10_SECONDS = 5.0


@dataclass(frozen=True)
class Row:
    """One table row: a feature extractor and the model-config overrides it takes per dataset."""

    name: str
    model_id: str | None = None  # None: logmel / yamnet, computed here
    overrides: dict[str, dict[str, Any]] = field(default_factory=dict)
    note: str = ""
    min_seconds: float = 0.0  # shorter clips are skipped (reported) for this row: the model cannot take them


# AST/SSAST run on the window length of the originals' own recipes for such data (ESC-50: 512 frames; Speech
# Commands: 128 frames); a longer FSDD clip is cut into several windows by the HEAR wrapper.
# SAT embeds a clip only if it holds one 16-frame patch: 15 hops of 160 samples (FSDD's 6_nicolas_7.wav is shorter).
SAT_MIN_SECONDS = 15 * 160 / 16000
AST_WINDOWS = {"esc10": {"input_tdim": 512}, "fsdd": {"input_tdim": 128}}
ROWS = {
    row.name: row
    for row in (
        Row("logmel", note="mean+std of YAMNet's 64-bin log-mel (128-d)"),
        Row("yamnet", note="YAMNet 1024-d embedding, peer (pretrained)"),
        Row("audiotransformer-tiny", "audiotransformer-tiny"),
        Row("sat-tiny-2s", "sat-tiny-2s", min_seconds=SAT_MIN_SECONDS),
        Row("ssast-tiny-patch", "ssast-tiny-patch", AST_WINDOWS),
        Row("ast-tiny224", "ast-tiny224", AST_WINDOWS),
        Row("ast-base384", "ast-base384", AST_WINDOWS),
        Row("dasheng-base", "dasheng-base"),
        Row("dass-small", "dass-small"),
        Row("ssam-tiny", "ssam-tiny"),
    )
}
DEFAULT_ROWS = ("logmel", "yamnet", "audiotransformer-tiny", "sat-tiny-2s", "ssast-tiny-patch", "ast-tiny224",
                "dasheng-base", "dass-small", "ssam-tiny")  # fmt: skip


# ------------------------------------------------------------------------------------------- data
def build_datafiles(data_root: Path, work_dir: Path, train_takes: tuple[int, int]) -> dict[str, Path]:
    """ESC-10 and FSDD datafiles; ``fsdd`` keeps the validation takes and the training takes in `train_takes`."""
    esc10 = esc10_datafile(data_root, work_dir).datafile
    fsdd_all = fsdd_datafile(data_root, work_dir).datafile
    first, last = train_takes
    records = [r for r in read_datafile(fsdd_all) if r.split != "train" or first <= int(r.extra["take"]) <= last]
    suffix = "" if (first, last) == (10, 49) else f"_train{first}-{last}"
    fsdd = write_datafile(records, work_dir / f"fsdd{suffix}.json")
    return {"esc10": esc10, "fsdd": fsdd}


def clip_seconds(dataset: str) -> float | None:
    return ESC10_SECONDS if dataset == "esc10" else None


# ------------------------------------------------------------------------------------- embeddings
def _baseline_features(row: str, waveforms: list[np.ndarray], yamnet_path: Path, threads: int) -> np.ndarray:
    if row == "logmel":
        return np.stack([log_mel_features(w) for w in waveforms])
    from tympan.teachers.yamnet import YAMNet

    return YAMNet(yamnet_path, num_threads=threads).clip(waveforms)[1]


def embed_baseline(row: str, datafile: Path, output: Path, dataset: str, yamnet_path: Path, threads: int) -> None:
    """Log-mel or YAMNet features of every clip of `datafile`, written as an embeddings file like ``tympan embed``."""
    records = read_datafile(datafile)
    seconds = clip_seconds(dataset)
    kept, waveforms, skipped = [], [], []
    for record in records:
        try:
            samples = audio.load(record.wav, sample_rate=SAMPLE_RATE, mono=True)
        except (ValueError, OSError) as err:
            skipped.append((record.wav, str(err)))
            continue
        kept.append(record)
        waveforms.append(fit_length(samples, int(seconds * SAMPLE_RATE)) if seconds else samples)
    features = _baseline_features(row, waveforms, yamnet_path, threads)
    info = {"model": row, "clip_seconds": seconds, "sample_rate": SAMPLE_RATE, "datafile": str(datafile),
            "labels": [list(r.labels) for r in kept], "folds": [r.fold for r in kept],
            "splits": [r.split for r in kept], "skipped": skipped}  # fmt: skip
    save_embeddings(output, features, [r.wav for r in kept], info)


def row_datafile(row: Row, datafile: Path, work_dir: Path) -> tuple[Path, list[tuple[str, str]]]:
    """`datafile` without the clips too short for `row` (its own copy), and those clips with the reason."""
    if not row.min_seconds:
        return datafile, []
    records = read_datafile(datafile)
    short = [r for r in records if r.duration is not None and r.duration < row.min_seconds]
    if not short:
        return datafile, []
    kept = write_datafile([r for r in records if r not in short], work_dir / f"{datafile.stem}__{row.name}.json")
    return kept, [(r.wav, f"{r.duration:.3f} s, shorter than {row.name}'s minimum {row.min_seconds:.2f} s")
                  for r in short]  # fmt: skip


def embed_row(row: Row, dataset: str, datafile: Path, output: Path, args: argparse.Namespace) -> None:
    if row.model_id is None:
        embed_baseline(row.name, datafile, output, dataset, args.yamnet, args.threads)
        return
    torch.manual_seed(args.seed)
    model = load_model("", model_id=row.model_id, pretrained=False, **row.overrides.get(dataset, {}))
    embed_datafile(model, datafile, output, clip_seconds=clip_seconds(dataset), batch_size=args.batch_size,
                   save_every=32, progress=not args.quiet)  # fmt: skip


# ----------------------------------------------------------------------------------------- probes
def probe_file(path: Path, dataset: str) -> dict[str, Any]:
    """kNN and linear probe of one embeddings file under the dataset's protocol (see the module docstring)."""
    stored = load_embeddings(path)
    raw = [",".join(labels) for labels in stored.info["labels"]]
    classes = sorted(set(raw))
    y = np.array([classes.index(v) for v in raw], dtype=np.int64)
    if dataset == "esc10":
        splits = fold_splits(stored.info["folds"], y)
    else:  # train -> fitted on, validation -> reported on
        splits = fixed_split(["train" if s == "train" else "test" for s in stored.info["splits"]], y)
    result: dict[str, Any] = {"n": len(y), "dim": int(stored.embeddings.shape[1]),
                              "skipped": stored.info.get("skipped", [])}  # fmt: skip
    if dataset == "fsdd":
        result.update(n_train=int(len(splits[0].train)), n_test=int(len(splits[0].test)))
    for method in ("knn", "linear"):
        out = evaluate(stored.embeddings, y, splits, method, k=5)
        result[method] = {"accuracy": out["mean"]["accuracy"], "std": out["std"]["accuracy"],
                          "per_split": [s["accuracy"] for s in out["splits"]],
                          **({"weight_decay": [s["weight_decay"] for s in out["splits"]]} if method == "linear"
                             else {})}  # fmt: skip
    return result


def cached_probe(path: Path, dataset: str) -> dict[str, Any]:
    """:func:`probe_file`, its result kept beside the embeddings (``.probe.json``) while they are unchanged."""
    cache = path.with_name(path.name + ".probe.json")
    if cache.is_file() and cache.stat().st_mtime >= path.stat().st_mtime:
        return json.loads(cache.read_text())
    result = probe_file(path, dataset)
    cache.write_text(json.dumps(result) + "\n")
    return result


# ------------------------------------------------------------------------------------------- main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    shared = Path(__file__).resolve().parents[2] / "shared"
    parser.add_argument("--data-root", type=Path, default=shared / "data")
    parser.add_argument("--yamnet", type=Path, default=shared / "teachers" / "yamnet" / "YamNet_w8a8.onnx.zip")
    parser.add_argument("--work-dir", type=Path, required=True, help="datafiles and cached embeddings")
    parser.add_argument("--rows", nargs="+", default=list(DEFAULT_ROWS), choices=list(ROWS))
    parser.add_argument("--datasets", nargs="+", default=["esc10", "fsdd"], choices=["esc10", "fsdd"])
    parser.add_argument("--fsdd-train-takes", type=int, nargs=2, default=(10, 49), metavar=("FIRST", "LAST"))
    parser.add_argument("--embed-only", action="store_true", help="compute the embeddings, no probes")
    parser.add_argument("--cached-only", action="store_true", help="probe only the embeddings already cached")
    parser.add_argument("--seed", type=int, default=0, help="torch seed of the random-weight models")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--json", type=Path, default=None, help="write the table as JSON here")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    args.work_dir.mkdir(parents=True, exist_ok=True)
    datafiles = build_datafiles(args.data_root, args.work_dir, tuple(args.fsdd_train_takes))
    timing_path = args.work_dir / "embed_seconds.json"
    timings = json.loads(timing_path.read_text()) if timing_path.is_file() else {}

    table: dict[str, dict[str, Any]] = {}
    for name in args.rows:
        row = ROWS[name]
        for dataset in args.datasets:
            output = args.work_dir / f"{datafiles[dataset].stem}__{name}.safetensors"
            datafile, too_short = row_datafile(row, datafiles[dataset], args.work_dir)
            key = output.name
            if not output.is_file() and args.cached_only:
                print(f"{key}: not cached, left out")
                continue
            if not output.is_file():
                start = time.perf_counter()
                embed_row(row, dataset, datafile, output, args)
                timings[key] = {"seconds": time.perf_counter() - start, "load_average": os.getloadavg()}
                on_disk = json.loads(timing_path.read_text()) if timing_path.is_file() else {}  # other runs' rows
                timings = {**on_disk, **timings}
                timing_path.write_text(json.dumps(timings, indent=1) + "\n")
                print(f"{key}: {timings[key]['seconds']:.0f} s (load average {os.getloadavg()[0]:.1f})", flush=True)
            if args.embed_only:
                continue
            result = cached_probe(output, dataset)
            result["skipped"] = too_short + result["skipped"]
            result["embed_s"] = timings.get(key, {}).get("seconds")
            table.setdefault(name, {"note": row.note, "overrides": row.overrides})[dataset] = result
            for path, reason in result["skipped"]:
                print(f"skipped ({name}, {dataset}) {path}: {reason}")
    if args.embed_only:
        return
    print(format_table(table, args))
    if args.json:
        args.json.write_text(json.dumps({"fsdd_train_takes": list(args.fsdd_train_takes), "seed": args.seed,
                                         "rows": table}, indent=1) + "\n")  # fmt: skip


def format_table(table: dict[str, dict[str, Any]], args: argparse.Namespace) -> str:
    first, last = args.fsdd_train_takes
    header = f"{'row':<24} {'dim':>5} {'ESC kNN':>9} {'ESC lin':>9} {'FSDD kNN':>9} {'FSDD lin':>9}  embed s"
    lines = [f"ESC-10: 4-fold CV (folds 1-4, 5 s clips); FSDD: train takes {first}-{last}, test = validation takes 5-9",
             header]  # fmt: skip
    for name, entry in table.items():
        cells, dim, seconds = [], "", []
        for dataset in ("esc10", "fsdd"):
            result = entry.get(dataset)
            cells += [f"{100 * result[m]['accuracy']:8.2f}%" if result else f"{'-':>9}" for m in ("knn", "linear")]
            if result:
                dim = result["dim"]
                seconds.append("?" if result["embed_s"] is None else f"{result['embed_s']:.0f}")
        lines.append(f"{name:<24} {dim:>5} {' '.join(cells)}  {'/'.join(seconds)}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
