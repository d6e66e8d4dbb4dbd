"""The ``tympan`` command line: one entry point, one subcommand per job.

Each subcommand is a pair of functions, ``_add_<name>(subparsers)`` that declares its arguments and
``_run_<name>(args) -> int`` that does the work and returns the exit status. Errors a user can fix (a bad
file, an unknown model id) are printed as one line on stderr, never as a traceback.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable, Sequence

EPILOG = """examples:
  tympan models                                   list registered models and their weights
  tympan models 'ast-*'                           only the AST family
  tympan features clip.wav --frontend kaldi-fbank -o feats/
                                                  write clip.npy with Kaldi fbank features
run 'tympan COMMAND --help' for the options of each command."""


class UserError(Exception):
    """An error caused by the user's input: printed as one line, exit status 2."""


# --------------------------------------------------------------------------------------------------- models
def _add_models(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "models",
        help="list the registered models",
        description="List the registered model ids with their family, input and official weights.",
    )
    p.add_argument("pattern", nargs="?", default="*", help="shell-style filter on the id, e.g. 'dasheng-*'")
    p.add_argument("--pretrained", action="store_true", help="only models with official weights")


def _run_models(args: argparse.Namespace) -> int:
    from tympan.models.registry import get_model_entry, list_models

    names = list_models(args.pattern, pretrained=args.pretrained)
    if not names:
        print(f"no registered model matches {args.pattern!r}", file=sys.stderr)
        return 1
    rows = [("id", "family", "input", "labels", "official weights")]
    for name in names:
        e = get_model_entry(name)
        rows.append((name, e.family, e.input_kind, e.labels or "-", e.weights.url if e.weights else "-"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[-1])
    return 0


# ------------------------------------------------------------------------------------------------- features
def _add_features(sub: argparse._SubParsersAction) -> None:
    from tympan.features import FRONTENDS

    p = sub.add_parser(
        "features",
        help="compute spectrogram features of audio files",
        description="Compute a model family's input features for each FILE and write one file per input "
        "into OUT. Files that cannot be read are reported and skipped; the exit status is 1 if any failed.",
    )
    p.add_argument("files", nargs="+", type=Path, metavar="FILE", help="audio files (wav, flac, ogg, mp3)")
    p.add_argument("--frontend", required=True, choices=sorted(FRONTENDS), help="which frontend to run")
    p.add_argument("-o", "--output", required=True, type=Path, metavar="OUT", help="output folder")
    p.add_argument("--format", choices=("npy", "safetensors"), default="npy", help="output file format")


def _run_features(args: argparse.Namespace) -> int:
    import numpy as np
    import torch
    from tqdm.auto import tqdm

    from tympan.audio import AudioError, load
    from tympan.features import get_frontend

    frontend = get_frontend(args.frontend)
    args.output.mkdir(parents=True, exist_ok=True)
    failed: list[str] = []
    for path in tqdm(args.files, desc=f"features ({args.frontend})", unit="file", disable=len(args.files) < 2):
        try:
            samples = load(path, sample_rate=frontend.sample_rate)
            with torch.no_grad():
                feats = frontend(torch.from_numpy(samples)[None])[0].contiguous()
        except (AudioError, ValueError) as err:
            failed.append(str(err) if str(path) in str(err) else f"{path}: {err}")
            continue
        target = args.output / f"{path.stem}.{args.format}"
        if args.format == "npy":
            np.save(target, feats.numpy())
        else:
            from safetensors.torch import save_file

            save_file({"features": feats}, str(target), metadata={"frontend": args.frontend, "source": str(path)})
    for message in failed:
        print(f"skipped {message}", file=sys.stderr)
    print(f"{len(args.files) - len(failed)} of {len(args.files)} files written to {args.output}", file=sys.stderr)
    return 1 if failed else 0


# -------------------------------------------------------------------------------------------------- plumbing
COMMANDS: dict[str, tuple[Callable, Callable]] = {
    "models": (_add_models, _run_models),
    "features": (_add_features, _run_features),
}


def build_parser() -> argparse.ArgumentParser:
    from tympan import __version__

    parser = argparse.ArgumentParser(
        prog="tympan",
        description="Audio tagging and audio representation models (AST, SSAST, DASS, SSAM, Dasheng, SAT).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"tympan {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add, _ in COMMANDS.values():
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    _, run = COMMANDS[args.command]
    try:
        return run(args)
    except (UserError, FileNotFoundError, KeyError) as err:
        print(f"tympan {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
