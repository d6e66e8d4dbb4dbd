"""Reproduce the two training results of recipes/README.md: SSAST pretraining vs scratch on FSDD, and the ESC-10
YAMNet-distilled student's embeddings against log-mel and a random student. Prints tables and a JSON summary.

    python benchmarks/train_results.py pretrain [--seeds 0 1 2] [--epochs 25] [--head-lr 1] [--jobs 2] [--reuse]
    python benchmarks/train_results.py distill [--cv] [--jobs 2] [--reuse]

``pretrain``: runs the pretraining recipe once, checks that fine-tuning really starts from its weights (every
transferred tensor equal to the checkpoint's, the rest at their random init), then fine-tunes
``fsdd_ssast_tiny.yaml`` for the same number of epochs with the same seeds from scratch and from the pretraining.
The defaults are the fine-tuning recipe as it is (25 epochs, head lr x1); ``--epochs 6 --head-lr 10`` is the
short-budget comparison of recipes/README.md.

``distill``: embeds ESC-10 folds 1-4 with the distilled student (``tympan embed`` code path, scene embedding =
mean of the patch tokens), a random-weight student of the same architecture and the log-mel mean+std floor of
benchmarks/probe_yamnet_esc10.py, and runs the 4-fold kNN (k=5, cosine) on each. The recipe's student trains on
folds 1-3, so its folds 1-3 kNN rows test clips whose labels it was trained on: the fold-4 row is the clean one.
``--cv`` trains one student per held-out fold (folds != f train, fold f validates) and scores fold f with the
embeddings of the student that never saw it: a leak-free 4-fold figure.
Runs go to out/runs/train_results/ (``--reuse`` keeps finished runs). All runs are 1 thread, CPU.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
RUNS = ROOT / "out" / "runs" / "train_results"
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))


# ------------------------------------------------------------------------------------------ running recipes
def train_run(recipe: str, out_dir: Path, sets: list[str], reuse: bool) -> dict[str, Any]:
    """``python -m tympan train RECIPE --set ...`` into `out_dir` (skipped when `reuse` and finished); its metrics."""
    metrics = out_dir / "metrics.json"
    if not (reuse and metrics.is_file()):
        args = [sys.executable, "-m", "tympan", "train", str(ROOT / recipe), "--set", f"output.dir={out_dir}",
                "--set", "train.progress=false"]  # fmt: skip
        for item in sets:
            args += ["--set", item]
        start = time.perf_counter()
        done = subprocess.run(args, cwd=ROOT, capture_output=True, text=True)
        if done.returncode:
            raise RuntimeError(f"{recipe} {sets} failed:\n{done.stderr[-3000:]}")
        print(f"  {out_dir.name}: {time.perf_counter() - start:.0f} s", flush=True)
    return json.loads(metrics.read_text())


def parallel(jobs: int, calls: list[tuple]) -> list[Any]:
    """Run ``(fn, *args)`` calls on `jobs` threads (each call is its own process), results in order."""
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        return list(pool.map(lambda call: call[0](*call[1:]), calls))


def epoch_accuracies(out_dir: Path) -> list[float]:
    records = [json.loads(line) for line in (out_dir / "log.jsonl").read_text().splitlines()]
    return [r["accuracy"] for r in records if r.get("event") == "epoch" and "accuracy" in r]


# ------------------------------------------------------------------------------------------ pretraining
def check_transfer(checkpoint: Path, recipe: str) -> dict[str, Any]:
    """Build the fine-tuning model the way the trainer does and compare its tensors with the checkpoint's."""
    from safetensors.torch import load_file

    from tympan.train import load_config
    from tympan.train.trainer import build_model

    spec = dict(load_config(ROOT / recipe)["model"], checkpoint=str(checkpoint), strict=False)
    torch.manual_seed(0)
    model, note = build_model(spec, num_classes=10)
    torch.manual_seed(0)
    fresh, _ = build_model(dict(spec, checkpoint=None), num_classes=10)
    state, init, saved = model.state_dict(), fresh.state_dict(), load_file(str(checkpoint))
    transferred = [k for k in state if k in saved]
    max_err = max(float((state[k] - saved[k]).abs().max()) for k in transferred)
    moved = [k for k in transferred if not torch.equal(saved[k], init[k])]
    kept_init = [k for k in state if k not in saved and torch.equal(state[k], init[k])]
    return {"note": note, "transferred": len(transferred), "total": len(state), "max_abs_diff": max_err,
            "transferred_differ_from_init": len(moved), "not_transferred": sorted(set(state) - set(saved)),
            "not_transferred_at_init": len(kept_init)}  # fmt: skip


def pretrain_results(args: argparse.Namespace) -> dict[str, Any]:
    pre_dir = RUNS / "pretrain"
    print(f"pretraining {args.pretrain_recipe} -> {pre_dir}", flush=True)
    pre = train_run(args.pretrain_recipe, pre_dir, [], args.reuse)
    checkpoint = pre_dir / "model.safetensors"
    transfer = check_transfer(checkpoint, args.finetune_recipe)
    print(f"transfer: {transfer['transferred']}/{transfer['total']} tensors, max |loaded - checkpoint| = "
          f"{transfer['max_abs_diff']:.1e}, {transfer['transferred_differ_from_init']} differ from the random init; "
          f"new: {', '.join(transfer['not_transferred'])}")  # fmt: skip
    calls, names = [], []
    for seed in args.seeds:
        for arm in ("scratch", "pretrained"):
            sets = [f"train.seed={seed}", f"train.epochs={args.epochs}", f"optim.head_lr={args.head_lr}"]
            if arm == "pretrained":
                sets += [f"model.checkpoint={checkpoint}", "model.strict=false"]
            out_dir = RUNS / f"fsdd_{arm}_{args.epochs}ep_seed{seed}"
            calls.append((train_run, args.finetune_recipe, out_dir, sets, args.reuse))
            names.append((arm, seed, out_dir))
    print(f"fine-tuning {len(calls)} runs, {args.jobs} at a time", flush=True)
    metrics = parallel(args.jobs, calls)
    rows = []
    for (arm, seed, out_dir), m in zip(names, metrics):
        rows.append({"arm": arm, "seed": seed, "final": m["final"]["accuracy"], "best": m["best_accuracy"],
                     "averaged": m.get("averaged", {}).get("accuracy"), "seconds": m["seconds"],
                     "per_epoch": epoch_accuracies(out_dir)})  # fmt: skip
    print(f"\nFSDD fine-tuning, {args.epochs} epochs, head_lr x{args.head_lr:g}, validation takes 5-9 (accuracy)")
    print(f"{'arm':<11} {'seed':>4} {'final':>8} {'best':>8} {'avg':>8} {'s':>6}  per epoch")
    for r in rows:
        avg = "-" if r["averaged"] is None else f"{100 * r['averaged']:.2f}"
        print(f"{r['arm']:<11} {r['seed']:>4} {100 * r['final']:>8.2f} {100 * r['best']:>8.2f} {avg:>8} "
              f"{r['seconds']:>6.0f}  {' '.join(f'{100 * a:.1f}' for a in r['per_epoch'])}")  # fmt: skip
    mean = {arm: float(np.mean([r["final"] for r in rows if r["arm"] == arm])) for arm in ("scratch", "pretrained")}
    print(f"mean final: scratch {100 * mean['scratch']:.2f} %, pretrained {100 * mean['pretrained']:.2f} %")
    log = [json.loads(line) for line in (pre_dir / "log.jsonl").read_text().splitlines()]
    losses = [r["train_loss"] for r in log if r.get("event") == "epoch"]
    return {"pretraining": {"recipe": args.pretrain_recipe, "train_loss_first_last": [losses[0], losses[-1]],
                            "steps": pre["steps"], "seconds": pre["seconds"]},
            "head_lr": args.head_lr,
            "transfer": transfer, "finetune_epochs": args.epochs, "runs": rows, "mean_final": mean}  # fmt: skip


# ------------------------------------------------------------------------------------------ distillation
def embed_student(checkpoint: Path | None, datafile: Path, out: Path, overrides: dict[str, Any]) -> Path:
    """Scene embeddings of every clip (``tympan embed`` code path); ``checkpoint=None``: random weights."""
    from tympan.eval.embed import embed_main

    torch.manual_seed(0)
    if checkpoint is None:
        embed_main("ssast-tiny-frame", datafile, out, pretrained=False, overrides=overrides, clip_seconds=5.0,
                   batch_size=32, progress=False)  # fmt: skip
    else:  # str: the CLI passes a Path, which the embeddings metadata cannot serialise (see the report)
        embed_main("ssast-tiny-frame", datafile, out, checkpoint=str(checkpoint), clip_seconds=5.0, batch_size=32,
                   progress=False)  # fmt: skip
    return out


def knn_rows(embeddings: np.ndarray, labels: np.ndarray, folds: np.ndarray) -> dict[str, Any]:
    from tympan.eval.probe import evaluate, fold_splits

    result = evaluate(embeddings, labels, fold_splits(folds, labels), "knn", k=5)
    return {"per_fold": [s["accuracy"] for s in result["splits"]], "mean": result["mean"]["accuracy"]}


def distill_results(args: argparse.Namespace) -> dict[str, Any]:
    from probe_yamnet_esc10 import fit_length, log_mel_features

    from tympan import audio
    from tympan.data import esc10_datafile
    from tympan.eval.probe import load_embeddings
    from tympan.train import load_config

    recipe = load_config(ROOT / args.distill_recipe)
    overrides = dict(recipe["model"]["overrides"], num_classes=10 + 521)
    data_dir = RUNS / "esc10_data"
    datafile = Path(esc10_datafile(args.shared / "data", data_dir).datafile)
    student_dir = RUNS / "esc10_distill"
    print(f"distillation {args.distill_recipe} -> {student_dir}", flush=True)
    metrics = train_run(args.distill_recipe, student_dir, [], args.reuse)

    emb = {"student": embed_student(student_dir / "model.safetensors", datafile, RUNS / "esc10_student.safetensors",
                                    overrides),
           "random student": embed_student(None, datafile, RUNS / "esc10_random.safetensors", overrides)}  # fmt: skip
    loaded = {name: load_embeddings(path) for name, path in emb.items()}
    ref = loaded["student"]
    classes = sorted({tuple(l) for l in ref.info["labels"]})
    labels = np.array([classes.index(tuple(l)) for l in ref.info["labels"]])
    folds = np.array(ref.info["folds"])
    features = {name: f.embeddings for name, f in loaded.items()}
    features["log-mel mean+std"] = np.stack([log_mel_features(fit_length(audio.load(k))) for k in ref.keys])
    table = {name: knn_rows(x, labels, folds) for name, x in features.items()}

    if args.cv:  # one student per held-out fold; fold f scored with the embeddings of the student that never saw it
        calls, dirs = [], []
        for fold in sorted(set(folds.tolist())):
            train_folds = [f for f in sorted(set(folds.tolist())) if f != fold]
            out_dir = RUNS / (f"esc10_distill_holdout{fold}" + (f"_{args.cv_epochs}ep" if args.cv_epochs else ""))
            calls.append((train_run, args.distill_recipe, out_dir,
                          [f"data.train.fold={train_folds}", f"data.valid.fold=[{fold}]"]
                          + ([f"train.epochs={args.cv_epochs}"] if args.cv_epochs else []), args.reuse))  # fmt: skip
            dirs.append((fold, out_dir))
        cv_metrics = parallel(args.jobs, calls)
        per_fold, agreement = [], []
        for (fold, out_dir), m in zip(dirs, cv_metrics):
            path = embed_student(out_dir / "model.safetensors", datafile, RUNS / f"esc10_student_holdout{fold}.safetensors",
                                 overrides)  # fmt: skip
            rows = knn_rows(load_embeddings(path).embeddings, labels, folds)
            per_fold.append(rows["per_fold"][sorted(set(folds.tolist())).index(fold)])
            agreement.append(m["final"]["teacher_agreement_mAP"])
        table["student, held-out-fold CV"] = {"per_fold": per_fold, "mean": float(np.mean(per_fold)),
                                              "agreement_mAP": agreement}  # fmt: skip

    print("\nESC-10 folds 1-4, kNN k=5 cosine, leave-one-fold-out (accuracy)")
    print(f"{'features':<28} {'fold1':>7} {'fold2':>7} {'fold3':>7} {'fold4':>7} {'mean':>7}")
    for name, r in table.items():
        print(f"{name:<28} " + " ".join(f"{100 * a:>7.2f}" for a in r["per_fold"]) + f" {100 * r['mean']:>7.2f}")
    final = metrics["final"]
    print(f"student on held-out fold 4: accuracy {100 * final['accuracy']:.2f} %, teacher agreement mAP "
          f"{final['teacher_agreement_mAP']:.3f}, top-1 match {100 * final['teacher_top1_match']:.1f} %")  # fmt: skip
    return {"recipe": args.distill_recipe, "seconds": metrics["seconds"], "heldout_fold4": final, "knn": table}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("part", choices=("pretrain", "distill", "all"))
    parser.add_argument("--pretrain-recipe", default="recipes/ssast_pretrain_esc10.yaml")
    parser.add_argument("--finetune-recipe", default="recipes/fsdd_ssast_tiny.yaml")
    parser.add_argument("--distill-recipe", default="recipes/esc10_yamnet_distill.yaml")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=25, help="fine-tuning epochs (both arms; the recipe's: 25)")
    parser.add_argument("--head-lr", type=float, default=1.0,
                        help="classifier-head lr multiplier (both arms; the recipe's is 1, 10 helps short budgets "
                        "by keeping the fresh head from distorting pretrained features in the first epochs)")
    parser.add_argument("--cv", action="store_true", help="distill: also one student per held-out fold")
    parser.add_argument("--cv-epochs", type=int, help="epochs of the held-out-fold students (default: the recipe's)")
    parser.add_argument("--jobs", type=int, default=2, help="training processes at a time")
    parser.add_argument("--reuse", action="store_true", help="keep runs that already finished")
    parser.add_argument("--shared", type=Path, default=ROOT.parent / "shared")
    parser.add_argument("--json", type=Path, help="also write the summary here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    RUNS.mkdir(parents=True, exist_ok=True)
    summary: dict[str, Any] = {}
    if args.part in ("pretrain", "all"):
        summary["pretrain_vs_scratch"] = pretrain_results(args)
    if args.part in ("distill", "all"):
        summary["distillation"] = distill_results(args)
    text = json.dumps(summary, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
