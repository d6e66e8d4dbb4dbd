"""The ``tympan`` command line: one entry point, one subcommand per job.

Each subcommand is a pair of functions, ``_add_<name>(subparsers)`` that declares its arguments and
``_run_<name>(args) -> int`` that does the work and returns the exit status. Errors a user can fix (a bad
file, an unknown model id) are printed as one line on stderr, never as a traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

if TYPE_CHECKING:
    from tympan.labels import LabelSet

EPILOG = """examples:
  tympan tag clip.wav                             top-5 AudioSet tags by the shipped default model (offline)
  tympan tag clips/*.wav --threads 4              many files, 4 cores
  tympan tag clip.wav --model sat-tiny-2s         another registered model (official weights, downloaded once)
  tympan tag long.flac --model sat-tiny-2s --chunk 2 --plot timeline.png
                                                  per-chunk tags and a PNG timeline
  tympan models                                   list registered models and their weights
  tympan models 'ast-*'                           only the AST family
  tympan features clip.wav --frontend kaldi-fbank -o feats/
                                                  write clip.npy with Kaldi fbank features
  tympan data ../shared/data/esc10/esc10.csv -o esc10.json
                                                  a datafile (+ esc10_labels.csv) from a dataset CSV or folder
  tympan embed esc10.json --model dasheng-base -o esc10.safetensors && tympan probe esc10.safetensors
                                                  embeddings of a dataset, then a k-fold kNN probe
  tympan train recipes/fsdd_ssast_tiny.yaml --set data.datafile=fsdd.json
                                                  train from a recipe; writes RUN/model.safetensors
  tympan evaluate --checkpoint RUN/model.safetensors --data fsdd.json
  tympan tag clip.wav --checkpoint RUN/model.safetensors
run 'tympan COMMAND --help' for the options of each command."""


class UserError(Exception):
    """An error caused by the user's input: printed as one line, exit status 2.

    Exit statuses, every command: 0 all good, 1 some inputs were skipped (each reported on stderr), 2 a usage
    or fatal error (one line naming the flag or file; any :class:`tympan.errors.TympanError` ends up here), 130
    interrupted (Ctrl-C), 141 the reader of the output closed it early (``| head``; nothing printed)."""


# --------------------------------------------------------------------------------------------------- models
def _add_models(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "models",
        help=COMMAND_HELP["models"],
        description="List the registered model ids with their family, input, labels and official weights. The "
        "weights column says whether they ship with tympan (shipped), are in the download cache ($TYMPAN_CACHE or "
        "~/.cache/tympan: cached), are fetched on first use (download), or were never released (-: train the model "
        "or give --checkpoint PATH).",
    )
    p.add_argument("pattern", nargs="?", default="*", help="shell-style filter on the id, e.g. 'dasheng-*'")
    p.add_argument("--pretrained", action="store_true", help="only models with official weights")


def _run_models(args: argparse.Namespace) -> int:
    from tympan.models.registry import get_model_entry, list_models

    names = list_models(args.pattern, pretrained=args.pretrained)
    if not names:
        print(f"no registered model matches {args.pattern!r}", file=sys.stderr)
        return 1
    rows = [("id", "family", "input", "labels", "weights", "official weights")]
    for name in names:
        e = get_model_entry(name)
        rows.append((name, e.family, e.input_kind, e.labels or "-", _weights_status(e.weights),
                     e.weights.url if e.weights else "none released: train it or give --checkpoint PATH"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[-1])
    return 0


def _weights_status(weights) -> str:
    """``shipped`` (in the package), ``cached`` (downloaded), ``download`` (fetched on first use) or ``-`` (none)."""
    from urllib.parse import urlparse

    from tympan.checkpoints import PACKAGE_SCHEME, cache_dir

    if weights is None:
        return "-"
    if weights.url.startswith(PACKAGE_SCHEME):
        return "shipped"
    name = weights.filename or Path(urlparse(weights.url).path).name
    return "cached" if (cache_dir() / name).is_file() else "download"


# ------------------------------------------------------------------------------------------------- features
def _add_features(sub: argparse._SubParsersAction) -> None:
    from tympan.features import FRONTENDS

    p = sub.add_parser(
        "features",
        help=COMMAND_HELP["features"],
        description="Compute a model family's input features for each FILE and write one file per input "
        "into OUT. Every frontend writes the same layout: a 2-D array [frames, bins], one row per 10 ms frame "
        "(kaldi-fbank 23 bins, ast-fbank 128, dasheng-mel/sat-mel 64 in dB, ssam-mel 80; --bins changes it). "
        "Files that cannot be read are reported and skipped; the exit status is 1 if any failed.",
        epilog="example:\n  tympan features clip.wav --frontend dasheng-mel --bins 128 -o feats/   "
        "feats/clip.npy, shape [frames, 128]",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("files", nargs="+", type=Path, metavar="FILE", help="audio files (wav, flac, ogg, mp3)")
    p.add_argument("--frontend", required=True, choices=sorted(FRONTENDS), help="which frontend to run")
    p.add_argument("-o", "--output", required=True, type=Path, metavar="OUT", help="output folder")
    p.add_argument("--format", choices=("npy", "safetensors"), default="npy", help="output file format")
    p.add_argument("--bins", type=int, metavar="N", help="number of mel bins (default: the frontend's own)")


def _frontend_bins(frontend) -> int | None:
    """The number of frequency bins a frontend produces (its ``n_mels`` or ``num_mel_bins``)."""
    for name in ("n_mels", "num_mel_bins"):
        if isinstance(getattr(frontend, name, None), int):
            return getattr(frontend, name)
    options = getattr(frontend, "options", None)
    return options.get("num_mel_bins") if isinstance(options, dict) else None


def _build_frontend(name: str, bins: int | None):
    """``get_frontend(name)`` with ``bins`` mel bins, whichever name the frontend gives that setting."""
    import inspect

    from tympan.features import FRONTENDS, get_frontend

    if bins is None:
        return get_frontend(name)
    if bins < 1:
        raise UserError(f"--bins must be a positive number, got {bins}")
    accepted = inspect.signature(FRONTENDS[name]).parameters
    key = next((k for k in ("n_mels", "num_mel_bins") if k in accepted), None)
    if key is None and any(p.kind is inspect.Parameter.VAR_KEYWORD for p in accepted.values()):
        key = "num_mel_bins"  # Kaldi's options
    if key is None:
        raise UserError(f"--bins: the {name} frontend has no setting for its number of bins")
    return get_frontend(name, **{key: bins})


def frames_by_bins(features, bins: int | None):
    """Any frontend's output as ``[frames, bins]``: leading singleton axes dropped, a ``[bins, frames]`` map
    transposed."""
    while features.ndim > 2 and features.shape[0] == 1:
        features = features[0]
    if features.ndim == 2 and bins is not None and features.shape[0] == bins and features.shape[1] != bins:
        features = features.transpose(0, 1)
    return features


def _run_features(args: argparse.Namespace) -> int:
    import torch
    from tqdm.auto import tqdm

    from tympan.audio import AudioError, stream
    from tympan.errors import TympanError
    from tympan.features.streaming import stream_features
    from tympan.files import atomic_write, unique_names, write_safetensors

    if args.output.exists() and not args.output.is_dir():
        raise UserError(f"--output {args.output} exists and is not a folder")
    try:
        args.output.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"--output {args.output}: cannot create the folder ({err.strerror or err})") from None
    frontend = _build_frontend(args.frontend, args.bins)
    bins = _frontend_bins(frontend)
    names = unique_names(list(args.files), f".{args.format}")  # a/x.flac and b/x.wav never share an output
    failed: list[str] = []
    written = 0
    for path, name in tqdm(list(zip(args.files, names)), desc=f"features ({args.frontend})", unit="file",
                           disable=len(args.files) < 2):  # fmt: skip
        try:
            stream(path, sample_rate=frontend.sample_rate)  # header checks before any work
            with torch.no_grad():  # block by block: a 1 h file never lies in memory whole
                feats = stream_features(frontend, lambda: stream(path, block_seconds=30.0,
                                                                 sample_rate=frontend.sample_rate))
            feats = frames_by_bins(feats, bins).contiguous()
        except (AudioError, TympanError) as err:
            failed.append(str(err) if str(path) in str(err) else f"{path}: {err}")
            continue
        target = args.output / name
        if args.format == "npy":
            atomic_write(target, lambda tmp, array=feats.numpy(): _write_npy(tmp, array))
        else:
            write_safetensors(target, {"features": feats}, {"frontend": args.frontend, "source": str(path)})
        written += 1
    for message in failed:
        print(f"skipped {message}", file=sys.stderr)
    print(f"{written} of {len(args.files)} files written to {args.output}", file=sys.stderr)
    return 1 if failed else 0


def _write_npy(path: str, array) -> None:
    import numpy as np

    with open(path, "wb") as f:
        np.save(f, array)


# ------------------------------------------------------------------------------------------------------ tag
def _parse_overrides(items: Sequence[str]) -> dict:
    """``key=value`` strings into a config dict; values parsed as YAML scalars (ints, floats, bools, lists)."""
    import yaml

    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UserError(f"--set expects key=value, got {item!r}")
        out[key.strip()] = yaml.safe_load(value)
    return out


def _model_id(args: argparse.Namespace) -> str | None:
    """``--model``, else the model a ``--checkpoint`` sidecar names (``None``), else the default model."""
    from tympan.models import DEFAULT_MODEL

    if args.model is not None:
        return args.model
    return None if getattr(args, "checkpoint", None) is not None else DEFAULT_MODEL


def _load_model(args: argparse.Namespace):
    import tympan

    overrides = _parse_overrides(args.set)
    model_id = _model_id(args)
    if args.random and args.checkpoint is None:
        model = tympan.create_model(model_id, **overrides).eval()
    else:
        model = tympan.load(model_id, checkpoint=args.checkpoint, **overrides)
    _apply_threads(args, model)
    return _apply_precision(model, getattr(args, "precision", "fp32"))


_THREADS_HELP = ("CPU threads to use (default: all cores). A model whose ops are too small to split runs each file on "
                 "fewer (its hint: 1 for the default model) and tags N / hint files at once")


def _add_threads_argument(p: argparse.ArgumentParser, help: str = _THREADS_HELP) -> None:
    p.add_argument("--threads", type=int, default=None, metavar="N", help=help)


def _apply_threads(args: argparse.Namespace, model) -> None:
    """Commands with ``--threads``: torch threads per file and ``args.file_workers`` (files at once).

    ``N`` = the flag, else the cores this process may use. A model with an ``inference_threads`` hint ``h`` runs
    each file on ``min(h, N)`` threads and ``N // that`` files at once; other models run one file at a time on
    ``N`` threads (torch's default when the flag is not given)."""
    if not hasattr(args, "threads"):
        return
    _check_threads(args)
    import torch

    hint = getattr(model, "inference_threads", None)
    if hint is None:
        if args.threads is not None:
            torch.set_num_threads(args.threads)
        args.file_workers = 1
        return
    threads = args.threads if args.threads is not None else _available_cores()
    per_file = max(1, min(hint, threads))
    torch.set_num_threads(per_file)
    args.file_workers = max(1, threads // per_file)


def _check_threads(args: argparse.Namespace) -> None:
    if args.threads is not None and args.threads < 1:
        raise UserError("--threads must be at least 1")


def _available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _add_precision_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--precision", choices=("fp32", "bf16", "int8"), default="fp32",
                   help="inference precision: fp32 (default, exact), bf16 (autocast) or int8 (dynamic int8 linears; "
                   "the default model's pointwise convolutions too); see benchmarks/README.md for the speed and drift "
                   "of each")


def _apply_precision(model, precision: str):
    from tympan.inference.precision import with_precision

    try:
        return with_precision(model, precision)
    except ValueError as err:
        raise UserError(str(err)) from None


def _check_precision_backend(args: argparse.Namespace) -> None:
    if getattr(args, "precision", "fp32") != "fp32" and getattr(args, "backend", "torch") != "torch":
        raise UserError(f"--precision {args.precision} applies to --backend torch only")


def _add_model_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", metavar="ID", help="registered model id (see 'tympan models'); default: the model "
                   "--checkpoint's sidecar names, else the default model (tymnet-s)")
    p.add_argument(
        "--checkpoint", type=Path, metavar="PATH",
        help="weights to load (a trained run's model.safetensors, an official file); default: the official weights",
    )
    p.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE",
        help="override a config entry of the model, e.g. --set depth=2 --set input_tdim=512 (repeatable)",
    )
    p.add_argument("--random", action="store_true",
                   help="keep the random initialisation instead of loading weights (a sanity floor)")


def _add_tag(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "tag",
        help=COMMAND_HELP["tag"],
        description="Tag each FILE with a classification model: clip-level top-k labels, or per-chunk labels "
        "with --chunk. Files of any length stream through the model at bounded memory; streaming models (SAT) "
        "carry their memory from chunk to chunk. Bad files are reported and skipped (exit status 1).",
        epilog="examples:\n"
        "  tympan tag clip.wav                                  the default model (tymnet-s)\n"
        "  tympan tag clips/*.wav --threads 4 --format csv     4 files at once (one thread each for tymnet-s)\n"
        "  tympan tag clip.wav --checkpoint RUN/model.safetensors   a model trained with 'tympan train'\n"
        "  tympan tag clip.wav --model sat-tiny-2s\n"
        "  tympan tag long.flac --model ast-base384 --chunk 10 --topk 3 --plot timeline.png\n"
        "  tympan tag *.wav --model dass-small --format csv > tags.csv",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("files", nargs="+", type=Path, metavar="FILE", help="audio files (wav, flac, ogg, mp3)")
    _add_model_arguments(p)
    p.add_argument("--chunk", type=float, metavar="SECONDS",
                   help="report per-chunk tags for chunks of this length (a streaming model needs at least one of "
                   "its steps: 0.48 s for tymnet-s, 1.92 s for sat-tiny-2s)")
    p.add_argument("--topk", type=int, default=5, metavar="K", help="labels per clip or chunk (default 5)")
    p.add_argument("--format", choices=("text", "json", "csv"), default="text", help="output format (default text)")
    p.add_argument("--labels", type=Path, metavar="CSV",
                   help="class-label CSV (index,mid,display_name) for a model that carries no label names")
    _add_backend_arguments(p)
    _add_precision_argument(p)
    _add_threads_argument(p)
    p.add_argument(
        "--plot", type=Path, metavar="OUT.png",
        help="save the per-chunk probabilities of the top classes over time (one PNG per file: OUT_<name>.png "
        "when several files are given)",
    )


def _run_tag(args: argparse.Namespace) -> int:
    import json

    from tympan.audio import AudioError
    from tympan.inference.tagging import Tagger, tag_files, tags_or_error

    if args.topk < 1:
        raise UserError("--topk must be at least 1")
    if args.chunk is not None and not 0 < args.chunk < float("inf"):  # nan and inf too
        raise UserError(f"--chunk must be a positive number of seconds, got {args.chunk}")
    _check_precision_backend(args)
    if args.plot is not None:
        _require_matplotlib("--plot")
    runner = _onnx_runner(args) if args.backend == "onnx" else None
    model = _load_model(args) if runner is None else None
    try:
        labels = Tagger(model, _read_labels(args.labels, model)).labels if runner is None else runner.labels
        if runner is not None and (labels is None or not runner.has_head):
            raise ValueError(f"{runner.model_id} is an encoder without a classification head: it has no tags to give")
    except ValueError as err:
        raise UserError(str(err)) from None
    _check_finite_weights(model)
    failed, records = [], []
    plots = _plot_paths(args.plot, list(args.files)) if args.plot is not None else []
    if runner is not None:
        from tympan.export import onnx_tag_file

        results = ((path, tags_or_error(lambda p=path: onnx_tag_file(runner, p, chunk_seconds=args.chunk)))
                   for path in args.files)  # fmt: skip
    else:
        results = tag_files(model, args.files, chunk_seconds=args.chunk, workers=getattr(args, "file_workers", 1),
                            progress=sys.stderr.isatty())  # fmt: skip
    for index, (path, tags) in enumerate(_chunk_errors_as_user_errors(results, args.chunk)):
        try:
            if isinstance(tags, Exception):
                raise tags
            _check_finite_scores(tags, path)
        except (AudioError, ValueError) as err:
            failed.append(str(err) if str(path) in str(err) else f"{path}: {err}")
            continue
        record = _tag_record(tags, labels, args.topk, per_chunk=args.chunk is not None)
        records.append(record)
        if args.format == "text":
            _print_tag_text(record)
        if args.plot is not None:
            plot_timeline(tags, labels, plots[index], topk=min(args.topk, 5))
    if args.format == "json":
        print(json.dumps(records, indent=2))
    elif args.format == "csv":
        _print_tag_csv(records)
    for message in failed:
        print(f"skipped {message}", file=sys.stderr)
    return 1 if failed else 0


def _chunk_errors_as_user_errors(results: Iterable[Any], chunk: float | None) -> Iterator[Any]:
    """A ``--chunk`` shorter than the model's step fails every file alike: one usage error, not N skips."""
    from tympan.inference.streaming import ChunkTooShortError

    try:
        yield from results
    except ChunkTooShortError as err:
        raise UserError(f"--chunk {chunk:g}: {err}") from None


def _require_matplotlib(flag: str) -> None:
    """Refuse ``flag`` before any work when matplotlib is missing (not after the whole job)."""
    import importlib.util

    if importlib.util.find_spec("matplotlib") is None:
        raise UserError(f"{flag} needs matplotlib: pip install matplotlib")


def _read_labels(path: Path | None, model) -> LabelSet | None:
    """``--labels CSV`` checked against the model's number of classes; ``None`` without the flag."""
    if path is None:
        return None
    from tympan.labels import read_label_csv

    try:
        labels = read_label_csv(path)
    except (OSError, ValueError) as err:
        raise UserError(f"--labels {path}: {err}") from None
    classes = getattr(model, "num_classes", None)
    if classes is not None and len(labels) != classes:
        raise UserError(f"--labels {path}: {len(labels)} labels, but the model has {classes} classes")
    return labels


def _check_finite_weights(model) -> None:
    """NaN/inf weights would tag every file "Speech nan": refuse them once, up front."""
    import torch

    if model is None:  # another backend runs the weights
        return
    bad = [name for name, p in model.state_dict().items() if p.is_floating_point() and not bool(torch.isfinite(p).all())]
    if bad:
        raise UserError(f"the model's weights hold NaN or inf ({len(bad)} tensors, e.g. {bad[0]}); check --checkpoint")


def _check_finite_scores(tags, path: Path) -> None:
    import torch

    if not bool(torch.isfinite(tags.probs).all()) or not all(bool(torch.isfinite(p).all()) for p in tags.chunk_probs):
        from tympan.errors import InputError

        raise InputError(f"{path}: the model gave non-finite scores (NaN or inf)")


def _plot_paths(plot: Path, files: list[Path]) -> list[Path]:
    """``--plot OUT.png`` for one file; ``OUT_<name>.png`` with names unique over the inputs for several."""
    from tympan.files import unique_names

    if len(files) == 1:
        return [plot]
    return [plot.with_name(f"{plot.stem}_{name}") for name in unique_names(files, ".png")]


def _print_tag_csv(records: list[dict]) -> None:
    """RFC 4180 CSV: file names with commas, quotes or newlines are quoted like any other field."""
    import csv

    writer = csv.writer(sys.stdout, lineterminator="\n")
    writer.writerow(["file", "start", "end", "rank", "label", "mid", "probability"])
    for record in records:
        for chunk in record["chunks"]:
            for rank, tag in enumerate(chunk["tags"], 1):
                writer.writerow([record["file"], f'{chunk["start"]:.2f}', f'{chunk["end"]:.2f}', rank, tag["label"],
                                 tag["mid"], f'{tag["probability"]:.4f}'])  # fmt: skip


def _tag_record(tags, labels, topk: int, per_chunk: bool) -> dict:
    import torch

    def top(probs: "torch.Tensor") -> list[dict]:
        values, indices = probs.topk(min(topk, probs.numel()))
        return [
            {"label": labels.names[i], "mid": labels.mids[i], "index": int(i), "probability": round(float(v), 6)}
            for v, i in zip(values, indices)
        ]

    if per_chunk:
        chunks = [{"start": s, "end": e, "tags": top(p)} for s, e, p in zip(tags.starts, tags.ends, tags.chunk_probs)]
    else:
        chunks = [{"start": tags.starts[0], "end": tags.ends[-1], "tags": top(tags.probs)}]
    return {"file": tags.path, "chunks": chunks}


def _print_tag_text(record: dict) -> None:
    print(record["file"])
    for chunk in record["chunks"]:
        span = f'[{chunk["start"]:.1f}s]-[{chunk["end"]:.1f}s]'
        for rank, tag in enumerate(chunk["tags"], 1):
            print(f'{span} Topk-{rank} {tag["label"]} {tag["probability"]:.4f}')


def plot_timeline(tags, labels, out: Path, topk: int = 5) -> Path:
    """Save a PNG of the per-chunk probabilities of the ``topk`` classes with the highest clip-level score."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UserError("--plot needs matplotlib: pip install 'tympan[plot]'") from None
    timeline = tags.timeline
    classes = tags.probs.topk(min(topk, timeline.shape[1])).indices.tolist()
    fig, ax = plt.subplots(figsize=(9, 3.6), constrained_layout=True)
    for c in classes:
        ax.step(tags.starts + [tags.ends[-1]], timeline[:, c].tolist() + [float(timeline[-1, c])], where="post",
                label=labels.names[c])
    ax.set_xlim(tags.starts[0], tags.ends[-1])
    ax.set_ylim(0, 1)
    ax.set_xlabel("time (s)")
    ax.set_ylabel("probability")
    ax.set_title(Path(tags.path).name)
    ax.legend(loc="upper right", fontsize="small")
    from tympan.files import atomic_write

    try:  # through a temporary file: two runs writing one PNG never tear it
        atomic_write(out, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    finally:
        plt.close(fig)
    return out



# --------------------------------------------------------------------------------------------------- shards
def _add_shards(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "shards",
        help=COMMAND_HELP["shards"],
        description="Pack the clips of a dataset (datafile, dataset CSV, class folders, file list) into "
        "webdataset-style tar shards ({key}.flac + {key}.json) with an index.json, for streaming training data "
        "across ranks and workers.",
    )
    p.add_argument("datafile", type=Path, metavar="DATASET",
                   help="JSON datafile, dataset CSV, class-folder tree or file list (see 'tympan data')")
    p.add_argument("-o", "--output", required=True, type=Path, metavar="OUT", help="output folder")
    p.add_argument("-s", "--samples-per-shard", type=int, default=1000, help="samples per shard (default 1000)")
    p.add_argument("--max-shard-mb", type=float, default=None, help="also close a shard at this many MB")
    p.add_argument("--audio-format", choices=("flac", "original"), default="flac",
                   help="store FLAC (lossless for integer PCM) or the source files' bytes")  # fmt: skip
    p.add_argument("--shuffle-seed", type=int, default=None, help="shuffle clips across shards with this seed")
    p.add_argument("--prefix", default="shard", help="shard file name prefix (default 'shard')")


def _run_shards(args: argparse.Namespace) -> int:
    from tympan.data import load_dataset
    from tympan.data.shards import write_shards

    try:
        index = write_shards(
            load_dataset(args.datafile).manifest,
            args.output,
            max_samples_per_shard=args.samples_per_shard,
            max_shard_bytes=None if args.max_shard_mb is None else int(args.max_shard_mb * 2**20),
            audio_format=args.audio_format,
            shuffle_seed=args.shuffle_seed,
            prefix=args.prefix,
            progress=sys.stderr.isatty(),
        )
    except ValueError as err:
        raise UserError(str(err)) from None
    print(f"wrote {index.num_samples} samples in {len(index.shards)} shards to {index.path.parent}"
          + (f"; skipped {len(index.skipped)} unreadable clips" if index.skipped else ""))  # fmt: skip
    return 1 if index.skipped else 0


# ---------------------------------------------------------------------------------------------------- probe
def _add_probe(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "probe",
        help=COMMAND_HELP["probe"],
        description="Evaluate an embeddings file (from 'tympan embed') with a cosine kNN or a linear probe "
        "(logistic regression, weight decay chosen on validation folds) under the datafile's k-fold or "
        "train/valid/test protocol. Prints a table; --output writes the per-fold figures as JSON.",
        epilog="examples:\n  tympan probe esc10-dasheng.safetensors --method linear\n"
        "  tympan probe esc10.safetensors ../shared/data/esc10/esc10.csv --label-column category",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("embeddings", type=Path, help="safetensors embeddings file (tensor 'embeddings' [N, D] + keys)")
    p.add_argument("datafile", type=Path, nargs="?",
                   help="CSV with one row per clip: key, label and fold (or split) columns; default: the labels and "
                   "folds that 'tympan embed' stored in the embeddings file")
    p.add_argument("--method", choices=("knn", "linear"), default="knn", help="probe (default knn)")
    p.add_argument("-k", type=int, default=5, help="neighbours for kNN (default 5)")
    p.add_argument("--key-column", default="filename", help="column matched to the embeddings' keys")
    p.add_argument("--label-column", default="target", help="class column")
    p.add_argument("--fold-column", default="fold", help="fold column for leave-one-fold-out")
    p.add_argument("--split-column", help="train/valid/test column (fixed split instead of folds); without a "
                   "datafile, any value selects the stored splits")
    p.add_argument("--label-separator", help="split the label column on this string (multi-label, reports mAP)")
    p.add_argument("-o", "--output", type=Path, help="write the results as JSON")


def _run_probe(args: argparse.Namespace) -> int:
    from tympan.eval.probe import probe_main

    try:
        probe_main(
            args.embeddings, args.datafile, args.method, args.k, key_column=args.key_column,
            label_column=args.label_column, fold_column=args.fold_column, split_column=args.split_column,
            label_separator=args.label_separator, output=args.output,
        )
    except (ValueError, OSError) as err:
        raise UserError(str(err)) from None
    return 0



# ------------------------------------------------------------------------------------------ train, evaluate
def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help=COMMAND_HELP["train"],
        description="Train from a recipe (see recipes/). Logs go to the run folder as JSONL, checkpoints are "
        "written atomically and --resume continues bit-for-bit. Scale out with torchrun: "
        "'torchrun --nproc-per-node 4 -m tympan train RECIPE' (gloo on CPU, NCCL on GPU).",
        epilog="examples:\n  tympan train recipes/fsdd_ssast_tiny.yaml\n"
        "  tympan train recipes/fsdd_ssast_tiny.yaml --set train.epochs=5 --set optim.lr=3e-4\n"
        "  tympan train recipes/fsdd_ssast_tiny.yaml --resume\n"
        "  tympan train recipes/fsdd_ssast_tiny.yaml --set data.datafile=my_sounds.json --set output.dir=runs/mine\n"
        "data.datafile takes a datafile, a dataset CSV, a class-folder tree or a file list (see 'tympan data').",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("recipe", type=Path, help="YAML recipe")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe entry, dotted keys, YAML values (repeatable)")
    p.add_argument("--resume", action="store_true", help="continue from the run folder's last checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace a previous run in the output folder")


def _run_train(args: argparse.Namespace) -> int:
    from tympan.train import train_main

    return train_main(args.recipe, args.set, resume=args.resume, overwrite=args.overwrite)


def _add_evaluate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "evaluate",
        help=COMMAND_HELP["evaluate"],
        description="Run a checkpoint over a JSON datafile and print mAP, mAUC and d-prime (and accuracy with "
        "--metric accuracy) as JSON.",
    )
    p.add_argument("--checkpoint", type=Path, required=True,
                   help="a trained run's model.safetensors (or an official file with --model)")
    p.add_argument("--data", type=Path, required=True, metavar="DATASET",
                   help="JSON datafile, dataset CSV, class-folder tree or file list (see 'tympan data')")
    p.add_argument("--labels", type=Path, help="class-label CSV (index,mid,display_name); default: the checkpoint's")
    p.add_argument("--model", metavar="ID", help="model id, needed for official checkpoints only")
    p.add_argument("--clip-seconds", type=float,
                   help="pad/crop clips to this length (default: the training run's, else 10)")
    p.add_argument("--metric", choices=("mAP", "accuracy"), help="headline metric (default: the training run's)")
    p.add_argument("--batch-size", type=int, default=32)


def _run_evaluate(args: argparse.Namespace) -> int:
    from tympan.train import evaluate_main

    return evaluate_main(args.checkpoint, args.data, labels=args.labels, model_id=args.model,
                         clip_seconds=args.clip_seconds, metric=args.metric, batch_size=args.batch_size)


# ----------------------------------------------------------------------------------------------------- data
def _add_data(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "data",
        help=COMMAND_HELP["data"],
        description="Write the JSON datafile (and its label CSV, NAME_labels.csv) that train, evaluate, embed and "
        "probe read. SOURCE is a CSV with a file column and optionally label/fold/split columns, a folder tree "
        "class/*.wav (labels from the folder names), a folder of unlabelled audio, or a .txt list of audio files. "
        "Those commands also take SOURCE directly; a datafile makes the choice of clips explicit and reusable.",
        epilog="examples:\n  tympan data ../shared/data/esc10/esc10.csv -o esc10.json\n"
        "  tympan data my_sounds/ -o my_sounds.json          # my_sounds/dog/*.wav, my_sounds/rain/*.wav ...",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("source", type=Path, metavar="SOURCE", help="dataset CSV, folder, or .txt file list")
    p.add_argument("-o", "--output", type=Path, required=True, metavar="OUT.json",
                   help="datafile to write (or a folder: OUT/NAME.json)")
    p.add_argument("--root", type=Path, help="folder of a CSV's relative file names (default: found beside the CSV)")
    p.add_argument("--relative", action="store_true", help="store paths relative to the datafile's folder")


def _run_data(args: argparse.Namespace) -> int:
    from tympan.data import import_dataset

    paths, dataset = import_dataset(args.source, args.output, root=args.root, relative=args.relative)
    datafile = getattr(paths, "datafile", paths)
    labels = getattr(paths, "labels", None)
    classes = f", {len(dataset.labels)} classes in {labels}" if labels is not None else " (unlabelled)"
    print(f"{datafile}: {len(dataset.manifest)} clips{classes}")
    for line in dataset.skipped:
        print(f"skipped {line}", file=sys.stderr)
    return 1 if dataset.skipped else 0


# ------------------------------------------------------------------------------------------- embed, niah
def _add_embed(sub: argparse._SubParsersAction) -> None:
    from tympan.eval.embed import POOLINGS

    p = sub.add_parser(
        "embed",
        help=COMMAND_HELP["embed"],
        description="Compute HEAR-style scene embeddings (or pooled timestamp embeddings) for every clip of a "
        "datafile with a progress bar; bad files are reported and skipped, and an interrupted run resumes "
        "from its partial file. The output feeds 'tympan probe'.",
        epilog="examples:\n  tympan embed ../shared/data/esc10/esc10.csv --model dasheng-base -o esc10-dasheng.safetensors\n"
        "  tympan data ../shared/data/esc10/esc10.csv -o esc10.json && tympan embed esc10.json -o esc10.safetensors\n"
        "  tympan embed my_sounds/ --checkpoint RUN/model.safetensors -o mine.safetensors",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_model_arguments(p)
    p.add_argument("datafile", metavar="DATASET",
                   help="JSON datafile, dataset CSV, class-folder tree or file list (see 'tympan data')")
    p.add_argument("-o", "--output", required=True, help="embeddings file to write (.safetensors)")
    p.add_argument("--pooling", choices=POOLINGS, default="scene",
                   help="scene embedding, or timestamp embeddings pooled by mean / max / both")  # fmt: skip
    p.add_argument("--clip-seconds", type=float,
                   help="crop or zero-pad every clip to this length (default: a trained checkpoint's, else whole clips)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--save-every", type=int, default=64, help="clips between resumable partial saves")
    p.add_argument("--device", default="cpu")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_backend_arguments(p)
    _add_precision_argument(p)
    _add_threads_argument(p, help="torch threads for the batches of clips (default: all cores)")


def _run_embed(args: argparse.Namespace) -> int:
    from tympan.eval.embed import embed_main

    _check_precision_backend(args)
    _check_threads(args)
    if args.threads is not None:  # batches of clips: every thread helps, whatever the model's one-stream hint
        import torch

        torch.set_num_threads(args.threads)
    if args.backend == "onnx":
        return _run_embed_onnx(args)
    checkpoint = str(args.checkpoint) if args.checkpoint else None  # JSON-safe in the metadata
    try:
        result = embed_main(args.model, args.datafile, args.output, checkpoint=checkpoint, pooling=args.pooling,
                   clip_seconds=args.clip_seconds, batch_size=args.batch_size, save_every=args.save_every,
                   device=args.device, overrides=_parse_overrides(args.set), progress=not args.quiet,
                   pretrained=not args.random, precision=args.precision)  # fmt: skip
    except ValueError as err:  # e.g. no clip could be embedded
        raise UserError(str(err)) from None
    return 1 if result.skipped else 0  # the exit rule: 1 when some inputs were skipped


def _add_niah(sub: argparse._SubParsersAction) -> None:
    from tympan.eval.niah import AGGREGATES, BABBLE_ENV, DEFAULT_DURATIONS, DEFAULT_POSITIONS, HAYSTACKS

    p = sub.add_parser(
        "niah",
        help=COMMAND_HELP["niah"],
        description="Insert needle clips into haystacks of zeros, white noise or babble of growing duration and "
        "measure how well the model still finds them (mAP, rank, retention). Each model reads the haystack its "
        "own way (whole sequence for DASS/SSAM, windows for AST/Dasheng, streaming for SAT). Writes niah.json, "
        "niah.txt and niah.png to the output folder.",
        epilog="examples:\n"
        "  tympan niah clip.wav --model dass-small --random --durations 10 60 600 3600 --positions 0.5 -o niah/dass\n"
        "  tympan niah clip.wav --model ast-base384 --random --durations 10 60 600 3600 --positions 0.5 -o niah/ast \\\n"
        "      --compare niah/dass      # both curves in niah/ast/niah.png, side by side in comparison.txt",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_model_arguments(p)
    p.add_argument("needles", nargs="+", help="needle audio files and/or JSON datafiles")
    p.add_argument("--output-dir", "-o", required=True)
    p.add_argument("--durations", type=float, nargs="+", default=list(DEFAULT_DURATIONS),
                   help="haystack durations in seconds (default 10 s .. 1 h)")
    p.add_argument("--positions", type=float, nargs="+", default=list(DEFAULT_POSITIONS), help="0..1")
    p.add_argument("--haystack", choices=HAYSTACKS, default="zeros")
    p.add_argument("--snr", type=float, default=10.0, help="dB of the needle over a noise haystack")
    p.add_argument("--babble", help=f"babble noise file (default ${BABBLE_ENV})")
    p.add_argument("--needle-seconds", type=float, default=5.0)
    p.add_argument("--num-needles", type=int, default=8)
    p.add_argument("--labels", choices=("self", "datafile"), default="self")
    p.add_argument("--top-k", type=int, default=5)
    p.add_argument("--aggregate", choices=AGGREGATES, default="mean", help="over windows of window models")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--compare", nargs="+", default=[], metavar="SWEEP",
                   help="earlier sweeps (niah.json or their folders) to draw in the same PNG and tabulate")


def _run_niah(args: argparse.Namespace) -> int:
    from tympan.eval.niah import niah_main

    checkpoint = str(args.checkpoint) if args.checkpoint else None  # JSON-safe in the metadata
    niah_main(_model_id(args) or _sidecar_model(args.checkpoint), args.needles, args.output_dir,
              checkpoint=checkpoint, pretrained=not args.random, durations=args.durations, positions=args.positions,
              haystack=args.haystack, snr_db=args.snr, babble_path=args.babble, needle_seconds=args.needle_seconds,
              num_needles=args.num_needles, labels=args.labels, top_k=args.top_k, aggregate=args.aggregate,
              seed=args.seed, device=args.device, overrides=_parse_overrides(args.set), compare=args.compare)  # fmt: skip
    return 0


def _sidecar_model(checkpoint: Path | None) -> str:
    """The model id a tympan checkpoint's sidecar names."""
    from tympan.eval.embed import _sidecar_model_id

    return _sidecar_model_id(str(checkpoint) if checkpoint else None)


# --------------------------------------------------------------------------------------------------- listen
def _add_listen(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "listen",
        help=COMMAND_HELP["listen"],
        description="Tag live audio as it arrives: one line (or JSON object) per chunk, with the same fields as "
        "'tympan tag --chunk' plus the latency from the chunk's last sample to its line. SOURCE is omitted for the "
        "default microphone (needs 'pip install tympan[live]' and the PortAudio library), '-' for raw mono PCM on "
        "stdin (16 kHz s16le unless --pcm/--rate say otherwise; read into a buffer while the model loads), or an "
        "audio file, played at real-time pace (--fast: as fast as possible). A readiness line goes to stderr when "
        "the first block arrives; Ctrl-C or the end of the input flushes the last partial chunk and prints a "
        "one-line summary (chunks, real-time factor, median and max latency) on stderr.",
        epilog="examples:\n"
        "  tympan listen                                   the default microphone, default model\n"
        "  tympan listen --list-devices                    the capture devices PortAudio sees\n"
        "  arecord -f S16_LE -r 16000 -c 1 -t raw | tympan listen - --format jsonl\n"
        "  ffmpeg -i URL -f s16le -ac 1 -ar 16000 - | tympan listen - --model sat-tiny-2s\n"
        "  tympan listen long.flac --chunk 2 --fast        a file through the same live loop",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("source", nargs="?", metavar="SOURCE",
                   help="'-' for raw PCM on stdin, an audio file, or nothing for the default microphone")
    p.add_argument("--model", metavar="ID",
                   help="registered model id (default: the shipped default model, see tympan.inference.live)")
    p.add_argument("--checkpoint", type=Path, metavar="PATH",
                   help="weights to load (official layout or tympan safetensors); default: the official weights")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config entry of the model (repeatable)")
    p.add_argument("--random", action="store_true", help="keep the random initialisation (a sanity floor)")
    p.add_argument("--chunk", type=float, metavar="SECONDS",
                   help="chunk length (default: a streaming model's own chunk, 2 s otherwise)")
    p.add_argument("--topk", type=int, default=5, metavar="K", help="labels per chunk (default 5)")
    p.add_argument("--format", choices=("text", "jsonl"), default="text", help="output format (default text)")
    p.add_argument("--seconds", type=float, metavar="N", help="stop after N seconds of audio")
    p.add_argument("--record", type=Path, metavar="OUT.wav",
                   help="also save the 16 kHz audio the model saw (float WAV: bit-exact)")
    p.add_argument("--device", metavar="NAME|INDEX", help="capture device (microphone source only)")
    p.add_argument("--list-devices", action="store_true", help="list the capture devices and exit")
    p.add_argument("--pcm", choices=("s16le", "f32le"), default="s16le", help="stdin sample format (default s16le)")
    p.add_argument("--rate", type=float, default=16000, metavar="R",
                   help="stdin sample rate in Hz, resampled to 16 kHz (default 16000)")
    p.add_argument("--fast", action="store_true", help="play a file as fast as possible instead of in real time")
    _add_precision_argument(p)
    p.add_argument("--threads", type=int, default=1, metavar="N",
                   help="torch threads (default 1: a small streaming model gains nothing from more, and spinning "
                   "workers cost CPU and, on a busy machine, latency; raise it for large models)")


def _listen_source(args: argparse.Namespace):
    from tympan.audio import AudioError
    from tympan.inference import live

    if args.source is None:
        if args.fast:
            raise UserError("--fast applies to a file SOURCE only")
        return live.MicrophoneSource(args.device)
    if args.device is not None:
        raise UserError("--device applies to the microphone (no SOURCE) only")
    if args.source == "-":
        if args.fast:
            raise UserError("--fast applies to a file SOURCE only")
        if sys.stdin.isatty():
            raise UserError("stdin is a terminal: pipe raw PCM in, e.g. arecord -f S16_LE -r 16000 -c 1 -t raw | "
                            "tympan listen -")
        return live.PcmSource(sys.stdin.buffer, encoding=args.pcm, rate=args.rate)
    if args.pcm != "s16le" or args.rate != 16000:
        raise UserError("--pcm and --rate describe raw PCM on stdin (SOURCE '-') only")
    try:
        return live.FileSource(args.source, realtime=not args.fast)
    except AudioError as err:
        raise UserError(str(err)) from None


def _run_listen(args: argparse.Namespace) -> int:
    import json
    import signal

    import numpy as np

    from tympan.audio import AudioError
    from tympan.inference import live
    from tympan.inference.streaming import Streamer
    from tympan.inference.tagging import FileTags, Tagger

    try:
        if args.list_devices:
            devices = live.list_input_devices()
            for d in devices:
                mark = "*" if d["default"] else " "
                print(f'{mark}{d["index"]:3d}  {d["name"]}  ({d["channels"]} in, {d["rate"]:g} Hz)')
            if not devices:
                print("no capture devices found; pipe raw PCM in instead: tympan listen -", file=sys.stderr)
            return 0
        if args.topk < 1:
            raise UserError("--topk must be at least 1")
        if args.chunk is not None and args.chunk <= 0:
            raise UserError("--chunk must be positive")
        if args.seconds is not None and args.seconds <= 0:
            raise UserError("--seconds must be positive")
        source = _listen_source(args)
        if source.buffers_early:
            source.start()  # a pipe is drained into memory while the model loads
        if args.threads < 1:
            raise UserError("--threads must be at least 1")
        import torch

        torch.set_num_threads(args.threads)
        model = _load_model(args)  # --model, else the --checkpoint sidecar's model, else the default model
        try:
            streamer = Streamer(model, chunk_seconds=args.chunk)
            labels = Tagger(model).labels
        except ValueError as err:
            raise UserError(str(err)) from None
        streamer.run(np.zeros(streamer.chunk_samples, np.float32))  # warm-up; run_live resets the stream

        def stop(signum: int, frame: object) -> None:
            source.request_stop()
            signal.signal(signal.SIGINT, signal.default_int_handler)  # a second Ctrl-C interrupts at once

        previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}

        def on_ready() -> None:
            chunk = streamer.chunk_samples / 16000
            print(f"tympan listen: listening to {source.description} with {args.model} ({chunk:g} s chunks); "
                  "Ctrl-C to stop", file=sys.stderr, flush=True)

        def on_chunk(result, latency: float) -> None:
            tags = FileTags(source.description, [result.start], [result.end], [result.output[0]])
            chunk = _tag_record(tags, labels, args.topk, per_chunk=True)["chunks"][0]
            chunk["latency_ms"] = round(latency * 1e3, 3)
            try:
                if args.format == "jsonl":
                    print(json.dumps(chunk), flush=True)
                else:
                    span = f'[{chunk["start"]:.1f}s]-[{chunk["end"]:.1f}s]'
                    lines = [f'{span} Topk-{rank} {tag["label"]} {tag["probability"]:.4f}'
                             for rank, tag in enumerate(chunk["tags"], 1)]
                    lines[0] += f'  ({chunk["latency_ms"]:.1f} ms)'
                    print("\n".join(lines), flush=True)
            except BrokenPipeError:  # the reader went away (e.g. '| head'): stop quietly
                sys.stdout = open(os.devnull, "w")
                source.request_stop()

        try:
            summary = live.run_live(source, streamer, on_chunk, max_seconds=args.seconds, record=args.record,
                                    on_ready=on_ready)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
    except (live.LiveError, AudioError) as err:
        raise UserError(str(err)) from None
    print(f"tympan listen: {summary.line()}", file=sys.stderr, flush=True)
    return 0


# --------------------------------------------------------------------------------------------- export, ORT
def _add_backend_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backend", choices=("torch", "onnx"), default="torch",
                   help="run the model in PyTorch (default) or its verified ONNX export in onnxruntime")
    p.add_argument("--onnx", type=Path, metavar="FILE.onnx",
                   help="with --backend onnx: a file from 'tympan export' (default: export the model once into "
                   "the cache, verified against PyTorch)")


def _onnx_runner(args: argparse.Namespace):
    """The ORT runner of ``--backend onnx``: the given ``--onnx`` file, or the model exported into the cache."""
    try:
        from tympan.export import ExportError, OnnxModel, cached_export
    except ImportError as err:
        raise UserError(f"--backend onnx needs onnx, onnxscript and onnxruntime: pip install 'tympan[onnx]' ({err})")
    if args.onnx is not None:
        if not args.onnx.is_file():
            raise UserError(f"{args.onnx}: no such ONNX file")
        try:
            return OnnxModel(args.onnx)
        except ValueError as err:
            raise UserError(str(err)) from None
    try:
        return OnnxModel(cached_export(_load_model(args)))
    except ExportError as err:
        raise UserError(str(err)) from None


def _run_embed_onnx(args: argparse.Namespace) -> int:
    from tympan.eval.embed import embed_datafile, report

    if args.pooling != "scene":
        raise UserError("--backend onnx gives the scene embedding only (--pooling scene)")
    runner = _onnx_runner(args)
    if runner.streaming:
        raise UserError(f"{runner.model_id} exports its streaming step, which has no scene embedding; "
                        "use --backend torch")
    checkpoint = str(args.checkpoint) if args.checkpoint else None
    result = embed_datafile(runner, args.datafile, args.output, pooling="scene", clip_seconds=args.clip_seconds,
                            batch_size=args.batch_size, save_every=args.save_every, checkpoint=checkpoint,
                            progress=not args.quiet)
    report(result, f"scene, {runner.model_id}, onnx")
    return 1 if result.skipped else 0


def _add_export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export",
        help=COMMAND_HELP["export"],
        description="Export a model with the dynamo ONNX exporter (opset 18 by default): input 'waveform' float32 "
        "[batch, samples] at 16 kHz (dynamic length), outputs 'probabilities' (models with a head) and 'embedding' "
        "(scene embedding); one call is one model window. Streaming models (SAT) export their step "
        "(chunk, state...) -> (probabilities, state...), the initial state written beside it as OUT.state.npz. "
        "The file is then run in onnxruntime on two lengths the export did not see and compared with PyTorch; "
        "the exit status is 1 when they do not match.",
        epilog="examples:\n"
        "  tympan export --model ast-base384 -o ast.onnx\n"
        "  tympan export --model sat-tiny-2s -o sat.onnx          # step graph + sat.state.npz\n"
        "  tympan export --model dass-small --no-frontend -o dass-features.onnx\n"
        "  tympan tag clip.wav --model ast-base384 --backend onnx --onnx ast.onnx",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", metavar="ID", help="registered model id (default: the default model)")
    p.add_argument("--checkpoint", type=Path, metavar="PATH",
                   help="weights to load (official layout or tympan safetensors); default: the official weights")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config entry of the model (repeatable)")
    p.add_argument("--random", action="store_true", help="keep the random initialisation instead of loading weights")
    p.add_argument("-o", "--output", type=Path, required=True, metavar="OUT.onnx", help="ONNX file to write")
    p.add_argument("--no-frontend", action="store_true",
                   help="graph input is the frontend's output ('features') instead of the waveform")
    p.add_argument("--opset", type=int, default=18, metavar="N", help="ONNX opset (default 18)")
    p.add_argument("--no-verify", action="store_true", help="skip the onnxruntime comparison")
    p.add_argument("--json", action="store_true", help="print the report as JSON")


def _run_export(args: argparse.Namespace) -> int:
    import json

    try:
        from tympan.export import ExportError, export_onnx, verify_onnx
    except ImportError as err:
        raise UserError(f"export needs onnx, onnxscript and onnxruntime: pip install 'tympan[onnx]' ({err})")
    model = _load_model(args)  # --model, else the --checkpoint sidecar's model, else the default model
    try:
        report = export_onnx(model, args.output, frontend=not args.no_frontend, opset=args.opset)
    except ExportError as err:
        raise UserError(str(err)) from None
    if not args.no_verify:
        verify_onnx(model, report)
    print(json.dumps(report.to_dict(), indent=2) if args.json else report.summary())
    for failure in report.failures:
        print(f"mismatch: {failure}", file=sys.stderr)
    return 1 if report.ok is False else 0


# -------------------------------------------------------------------------------------------------- plumbing
COMMANDS: dict[str, tuple[Callable, Callable]] = {
    "data": (_add_data, _run_data),
    "models": (_add_models, _run_models),
    "features": (_add_features, _run_features),
    "tag": (_add_tag, _run_tag),
    "export": (_add_export, _run_export),
    "listen": (_add_listen, _run_listen),
    "shards": (_add_shards, _run_shards),
    "embed": (_add_embed, _run_embed),
    "probe": (_add_probe, _run_probe),
    "niah": (_add_niah, _run_niah),
    "train": (_add_train, _run_train),
    "evaluate": (_add_evaluate, _run_evaluate),
}
COMMAND_HELP: dict[str, str] = {  # `tympan --help` lists these without building every command's parser
    "data": "turn a dataset CSV, a class-folder tree or a file list into a datafile",
    "models": "list the registered models",
    "features": "compute spectrogram features of audio files",
    "tag": "tag audio files with sound-event labels",
    "export": "export a model to ONNX and verify it in onnxruntime",
    "listen": "tag live audio (microphone, a PCM pipe, or a file at real-time pace) chunk by chunk",
    "shards": "pack a dataset's audio into tar shards for large-scale training",
    "embed": "embeddings of every clip of a datafile, in one file",
    "probe": "kNN / linear-probe accuracy of stored embeddings",
    "niah": "needle-in-an-audio-haystack duration test",
    "train": "train a model from a YAML recipe (fine-tuning, distillation, pretraining)",
    "evaluate": "tagging metrics of a trained checkpoint on a datafile",
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The ``tympan`` parser. Only ``command``'s subparser is built in full (its arguments may need torch-side
    names); the others are listed by their help line, so ``tympan --help`` and a typo answer at once. ``None``:
    every command in full."""
    from tympan import __version__

    parser = argparse.ArgumentParser(
        prog="tympan",
        description="Audio tagging and audio representation models (AST, SSAST, DASS, SSAM, Dasheng, SAT).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"tympan {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (add, _) in COMMANDS.items():
        if command is None or name == command:
            add(sub)
        else:
            sub.add_parser(name, help=COMMAND_HELP[name])
    return parser


def _command(argv: Sequence[str]) -> str:
    """The command word of `argv` (the first argument that is not an option), or ``""`` when there is none."""
    return next((a for a in argv if not a.startswith("-")), "")


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(_command(argv))
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    _, run = COMMANDS[args.command]
    from tympan.errors import TympanError  # checkpoint, model id, datafile, input errors all derive from it

    try:
        status = run(args)
        sys.stdout.flush()  # a reader that went away shows here, not in an "Exception ignored" at exit
        return status
    except BrokenPipeError:  # `tympan tag *.wav | head`: the reader has what it wanted; stop quietly, as cat does
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # the interpreter's final flush must not fail again
        return 141  # 128 + SIGPIPE, what a shell reports for a writer whose reader closed
    except (UserError, TympanError, FileNotFoundError) as err:
        message = " ".join(str(err).split())  # one line, whatever the error carried
        print(f"tympan {args.command}: error: {message}", file=sys.stderr)
        return 2
    except OSError as err:  # disk full, permission denied while writing results
        where = f"{err.filename}: " if getattr(err, "filename", None) else ""
        print(f"tympan {args.command}: error: {where}{err.strerror or err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
