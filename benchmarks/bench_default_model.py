"""The default model (tymnet-s) beside its teacher YAMNet, in one run: ESC-10 probes, held-out agreement, speed.

1. **ESC-10 probe** (folds 1-4, 4-fold leave-one-fold-out, clips cropped/padded to 5 s): cosine kNN (k=5) and the
   linear probe of :mod:`tympan.eval.probe` on the student's scene embeddings and on YAMNet's (mean of its 1024-d
   patch embeddings), same protocol, same run. ESC-10 is never in the student's training corpus.
2. **Agreement with the teacher** on the held-out corpus shards (source files never trained on):
   :func:`tympan.data.corpus.teacher_agreement` (clip mAP against YAMNet's top-3 labels, top-1 / top-5 match),
   with the teacher's own figures beside it (re-run on the stored float16 patches, and shifted by one 10 ms frame):
   the metric's ceiling under perturbations no listener would notice. With ``--compare``, also the mAP difference
   between the two students and its paired bootstrap interval over the held-out clips
   (:func:`tympan.data.corpus.agreement_difference`): whether a gain is more than the choice of clips.
3. **Speed**, tagging the 320 ESC-10 files end to end (decode, frontend, model, top-5 tags), one file at a time,
   YAMNet on ``--threads`` threads, the student on those `tympan tag` gives it (its ``inference_threads`` hint,
   at most ``--threads``; ``--student-threads`` overrides): the student through ``tympan tag``'s own path
   (:func:`tympan.inference.tagging.tag_file`: streamed decode, the model's batched ``steps``, the final partial step, clip mean) and, as a second row, the
   clip-level forward ``model(model.frontend(w))``; YAMNet through onnxruntime + its numpy frontend; interleaved
   file by file; each file's fastest of ``--repeats`` runs, summed (the machine is shared). ``OMP_WAIT_POLICY`` (set
   before the run; recorded) decides whether idle OpenMP threads spin or sleep.
4. **Throughput** over the whole file list on ``--threads`` cores, whole passes (best of ``--repeats``): the
   student as ``tympan tag FILES... --threads N`` runs it (:func:`tympan.inference.tagging.tag_files`: one thread
   per file, its hint, and ``N / hint`` files at once); YAMNet file by file on N onnxruntime threads, and YAMNet
   ``N`` files at once on one thread each (the same scheme given to the peer). Speed-ups are against the faster
   YAMNet row.
5. **Layers** (``--layers``, not run by default): the same ESC-10 probes on the student's pooled features after
   the stem and after each block, and on its per-patch embeddings pooled three ways (mean,
   mean + std, mean + max), YAMNet's pooled the same three ways beside them: where in the student the scene
   information is, and whether the pooling of the scene embedding holds it back.

    python benchmarks/bench_default_model.py [--weights EXPORT.safetensors] [--compare PREVIOUS.safetensors]
        [--shards /work/cache/corpus/shards_v3] [--threads 2] [--student-threads N] [--precision int8]
        [--layers] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tympan import audio
from tympan.eval.probe import evaluate, fold_splits

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
CLIP = 80000


def esc10_rows(shared: Path) -> list[dict[str, Any]]:
    import csv

    with open(shared / "data" / "esc10" / "esc10.csv") as f:
        rows = [r for r in csv.DictReader(f) if int(r["fold"]) <= 4]
    return [r for r in rows if (shared / "data" / "esc10" / "audio" / r["filename"]).is_file()]


def esc10_files(shared: Path) -> tuple[list[Path], float]:
    """The ESC-10 files the speed rows tag, and their total duration in seconds."""
    files = [shared / "data" / "esc10" / "audio" / r["filename"] for r in esc10_rows(shared)]
    return files, sum(audio.info(f).duration for f in files)


def fit(waveform: np.ndarray) -> np.ndarray:
    return np.pad(waveform, (0, max(0, CLIP - len(waveform))))[:CLIP]


def esc10_clips(shared: Path) -> tuple[list[np.ndarray], np.ndarray, Any]:
    """The ESC-10 clips (5 s each), their class ids and the leave-one-fold-out splits."""
    rows = esc10_rows(shared)
    waves = [fit(audio.load(shared / "data" / "esc10" / "audio" / r["filename"])) for r in rows]
    labels = np.array([int(r["target_esc10"]) for r in rows])
    return waves, labels, fold_splits(np.array([int(r["fold"]) for r in rows]))


def _accuracies(x: np.ndarray, labels: np.ndarray, splits: Any) -> dict[str, float]:
    """ESC-10 4-fold kNN and linear-probe accuracy (%) of embeddings `x`."""
    return {m: round(100 * evaluate(x, labels, splits, method=m)["mean"]["accuracy"], 2) for m in ("knn", "linear")}


@torch.no_grad()
def probe(model: Any, yamnet: Any, shared: Path, previous: Any = None) -> dict[str, Any]:
    waves, labels, splits = esc10_clips(shared)
    batch = torch.from_numpy(np.stack(waves))

    def scene(m: Any) -> np.ndarray:
        return torch.cat([m.embed(m.frontend(b)).scene for b in batch.split(32)]).numpy()

    embeddings = {"tymnet-s": scene(model)}
    if previous is not None:
        embeddings["tymnet-s/previous"] = scene(previous)
    embeddings["yamnet"] = yamnet.clip(list(waves))[1]
    out: dict[str, Any] = {"clips": len(waves)}
    for name, x in embeddings.items():
        out.update({f"{name}/{method}": value for method, value in _accuracies(x, labels, splits).items()})
    return out


@torch.no_grad()
def layers(model: Any, yamnet: Any, shared: Path) -> dict[str, Any]:
    """ESC-10 probes on each stage of the student (stem, blocks: means over positions and patches) and
    on per-patch embeddings pooled over patches by mean, mean + std and mean + max, YAMNet's beside them."""
    waves, labels, splits = esc10_clips(shared)
    stages = [("stem", model.stem_bn), *((f"block{i + 1}", b) for i, b in enumerate(model.blocks))]
    pooled: dict[str, list[torch.Tensor]] = {name: [] for name, _ in stages}

    def keep(name: str) -> Any:
        def hook(_module: Any, _inputs: Any, out: torch.Tensor) -> None:  # the stem's ReLU is functional
            pooled[name].append((out.relu() if name == "stem" else out).mean((-2, -1)))

        return hook

    hooks = [module.register_forward_hook(keep(name)) for name, module in stages]
    own = vars(model).get("folded_inference")
    model.folded_inference = False  # through the modules, so the hooks see every stage
    try:
        frames = []
        for batch in torch.from_numpy(np.stack(waves)).split(32):
            features = model.frontend(batch)
            frames.append(model.embed(features).frames)
    finally:
        if own is None:
            del model.folded_inference
        else:
            model.folded_inference = own
        for hook in hooks:
            hook.remove()
    count = frames[0].shape[1]
    out: dict[str, Any] = {}
    for name, parts in pooled.items():
        scene = torch.cat(parts).view(len(waves), count, -1).mean(1)
        out[f"tymnet-s/{name}"] = _accuracies(scene.numpy(), labels, splits)
    teacher = torch.from_numpy(np.stack([yamnet.frames(w)[1] for w in waves]))
    per_patch = {"tymnet-s": torch.cat(frames), "yamnet": teacher}
    for name, x in per_patch.items():
        pools = {"mean": x.mean(1), "mean+std": torch.cat([x.mean(1), x.std(1)], -1),
                 "mean+max": torch.cat([x.mean(1), x.amax(1)], -1)}  # fmt: skip
        for pool, e in pools.items():
            out[f"{name}/embedding {pool}"] = _accuracies(e.numpy(), labels, splits)
    return out


@torch.no_grad()
def heldout_probs(model: Any, heldout: dict[str, np.ndarray]) -> torch.Tensor:
    """The student's class probabilities ``[P, C]`` on the held-out patches (``load_shards(..., "heldout")``)."""
    patches = torch.from_numpy(heldout["patches"])
    return torch.cat([torch.sigmoid(model.patch_outputs(p.float())[0]) for p in patches.split(512)])


def agreement(probs: torch.Tensor, heldout: dict[str, np.ndarray]) -> dict[str, Any]:
    """The student's agreement with the teacher's stored labels on the held-out patches."""
    from tympan.data.corpus import teacher_agreement

    return teacher_agreement(probs, heldout["scores"].astype(np.float32), heldout["file_id"])


@torch.no_grad()
def teacher_ceiling(yamnet: Any, heldout: dict[str, np.ndarray]) -> dict[str, dict[str, Any]]:
    """The same agreement for the teacher itself against its stored labels: run again on the stored (float16)
    patches, and on those patches shifted one 10 ms frame later (a roll: the frame before a patch is not stored, so
    its last frame wraps to the front). What a student that were the teacher would score: the metric's ceiling
    under perturbations no listener would notice."""
    from tympan.data.corpus import teacher_agreement

    patches = heldout["patches"].astype(np.float32)[:, None]
    labels = heldout["scores"].astype(np.float32)
    out = {}
    for name, inputs in (("rerun", patches), ("shifted_10ms", np.roll(patches, 1, axis=2))):
        scores, _ = yamnet.run(inputs)
        out[name] = teacher_agreement(scores, labels, heldout["file_id"])
    return out


def speed(model: Any, yamnet: Any, shared: Path, repeats: int) -> dict[str, Any]:
    """Per file, each tagger runs `repeats` times, interleaved; a file's time is its fastest run (on a machine
    shared with other jobs, the minimum is the least disturbed), summed over files; also the plain total of the
    first pass (disturbances included)."""
    files, seconds = esc10_files(shared)

    from tympan.inference.tagging import tag_file

    @torch.inference_mode()
    def student(f: Path) -> None:  # what `tympan tag` runs
        tag_file(model, f).probs.topk(5)

    @torch.inference_mode()
    def student_clip(f: Path) -> None:
        w = torch.from_numpy(audio.load(f))[None]
        torch.sigmoid(model(model.frontend(w)))[0].topk(5)

    def teacher(f: Path) -> None:
        scores, _ = yamnet.clip(audio.load(f))
        np.argsort(scores)[-5:]

    taggers = {"tymnet-s": student, "tymnet-s/clip-forward": student_clip, "yamnet": teacher}
    for fn in taggers.values():  # warm-up: caches, kernels
        fn(files[0])
    best = {k: np.full(len(files), np.inf) for k in taggers}
    first = {k: 0.0 for k in taggers}
    for r in range(repeats):
        for i, f in enumerate(files):
            for name, fn in taggers.items():
                t = time.perf_counter()
                fn(f)
                dt = time.perf_counter() - t
                best[name][i] = min(best[name][i], dt)
                first[name] += dt if r == 0 else 0.0
    total = {k: float(v.sum()) for k, v in best.items()}
    return {"files": len(files), "audio_seconds": round(seconds, 1), "repeats": repeats,
            **{f"{k}/seconds": round(v, 3) for k, v in total.items()},
            **{f"{k}/x_realtime": round(seconds / v) for k, v in total.items()},
            **{f"{k}/first_pass_seconds": round(v, 3) for k, v in first.items()},
            "speedup_vs_yamnet": round(total["yamnet"] / total["tymnet-s"], 2),
            "speedup_vs_yamnet/clip-forward": round(total["yamnet"] / total["tymnet-s/clip-forward"], 2),
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "(default)")}  # fmt: skip


def throughput(model: Any, shared: Path, threads: int, repeats: int) -> dict[str, Any]:
    """Whole passes over the ESC-10 files on `threads` cores: `tympan tag`'s multi-file path vs YAMNet two ways."""
    from concurrent.futures import ThreadPoolExecutor

    from tympan.inference.tagging import tag_files
    from tympan.teachers.yamnet import YAMNet

    files, seconds = esc10_files(shared)
    per_file = max(1, min(model.inference_threads or threads, threads))  # what `tympan tag --threads N` does
    workers = max(1, threads // per_file)
    onnx = shared / "teachers" / "yamnet" / "YamNet_w8a8.onnx.zip"
    yam_n, yam_1 = YAMNet(onnx, num_threads=threads), YAMNet(onnx, num_threads=1)

    @torch.inference_mode()
    def student() -> None:
        torch.set_num_threads(per_file)
        for _, tags in tag_files(model, files, workers=workers):
            tags.probs.topk(5)

    def yamnet_file_by_file() -> None:
        for f in files:
            np.argsort(yam_n.clip(audio.load(f))[0])[-5:]

    def yamnet_files_at_once() -> None:
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(lambda f: np.argsort(yam_1.clip(audio.load(f))[0])[-5:], files))

    rows = {f"tymnet-s/tag-files-{workers}x{per_file}": student, f"yamnet/ort-{threads}-threads": yamnet_file_by_file,
            f"yamnet/{threads}-files-at-once": yamnet_files_at_once}  # fmt: skip
    best = {k: float("inf") for k in rows}
    for _ in range(repeats):
        for name, fn in rows.items():
            t = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - t)
    name = next(iter(rows))
    peer = min(v for k, v in best.items() if k.startswith("yamnet"))
    return {"files": len(files), "audio_seconds": round(seconds, 1), "threads": threads,
            **{f"{k}/seconds": round(v, 3) for k, v in best.items()},
            **{f"{k}/x_realtime": round(seconds / v) for k, v in best.items()},
            "speedup_vs_faster_yamnet": round(peer / best[name], 2)}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--weights", default=None, help="tymnet-s safetensors with its sidecar (default: the shipped one)")
    parser.add_argument("--compare", default=None, help="another tymnet-s export (e.g. the previously shipped one): "
                        "probe and agreement in the same run, as `<name>/previous`")
    parser.add_argument("--shards", default="/work/cache/corpus/shards_v3", help="corpus shards (held-out split)")
    parser.add_argument("--shared", default=str(SHARED))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--student-threads", type=int, default=None,
                        help="torch threads for the speed rows (default: as `tympan tag`, the model's hint)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip", nargs="*", default=[], choices=["probe", "agreement", "speed", "throughput"])
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16", "int8"),
                        help="the student's (and --compare's) inference precision, as `tympan tag --precision`")
    parser.add_argument("--layers", action="store_true", help="also the ESC-10 probes per stage and per pooling")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    from tympan.models.tymnet import load_shipped
    from tympan.teachers.yamnet import YAMNet

    import tympan

    shared = Path(args.shared)
    from tympan.inference.precision import with_precision

    model = with_precision(load_shipped() if args.weights is None else tympan.load(args.weights), args.precision)
    yamnet = YAMNet(shared / "teachers" / "yamnet" / "YamNet_w8a8.onnx.zip", num_threads=args.threads)
    results: dict[str, Any] = {"threads": args.threads, "precision": args.precision}
    previous = with_precision(tympan.load(args.compare), args.precision) if args.compare else None
    if "probe" not in args.skip:
        results["esc10_probe"] = probe(model, yamnet, shared, previous)
        print("ESC-10 4-fold:", results["esc10_probe"], flush=True)
    if args.layers:
        results["esc10_layers"] = layers(model, yamnet, shared)
        print("ESC-10 4-fold per stage and pooling:", results["esc10_layers"], flush=True)
    if "agreement" not in args.skip and Path(args.shards).is_dir():
        from tympan.data.corpus import load_shards

        heldout = load_shards(Path(args.shards), "heldout")  # read once for the student, the previous and the teacher
        probs = heldout_probs(model, heldout)
        results["heldout_agreement"] = agreement(probs, heldout)
        if previous is not None:
            from tympan.data.corpus import agreement_difference

            previous_probs = heldout_probs(previous, heldout)
            results["heldout_agreement/previous"] = agreement(previous_probs, heldout)
            results["heldout_agreement/difference"] = agreement_difference(
                probs, previous_probs, heldout["scores"].astype(np.float32), heldout["file_id"])
        for name, figures in teacher_ceiling(yamnet, heldout).items():
            results[f"heldout_agreement/teacher_{name}"] = figures
        print("held-out agreement:", {k: v for k, v in results.items() if k.startswith("heldout")}, flush=True)
    if "speed" not in args.skip:
        # the student on the threads `tympan tag` gives it on a machine of --threads cores: its hint (tymnet-s: 1)
        student_threads = args.student_threads or min(args.threads, model.inference_threads or args.threads)
        torch.set_num_threads(student_threads)
        results["student_threads"] = student_threads
        results["speed"] = speed(model, yamnet, shared, args.repeats)
        print("speed:", results["speed"], flush=True)
    if "throughput" not in args.skip:
        results["throughput"] = throughput(model, shared, args.threads, args.repeats)
        print("throughput:", results["throughput"], flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
