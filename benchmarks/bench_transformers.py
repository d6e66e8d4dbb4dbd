"""CPU forward-pass speed of tympan's transformers against reference implementations, side by side.

Each model has one ``bench_<name>(args) -> list[Result]`` function listed in ``BENCHMARKS``; it times our
model and, where one can be installed without changing torch, a reference implementation with the same
config and random weights. Run ``python benchmarks/bench_transformers.py [--models ast] [--threads 2]``;
it prints a table and one JSON line per comparison, each with the model's FLOP/s as a share of the fp32 matmul
peak measured at the start of the same run (``benchmarks/peak.py``). Goals: AST at least as fast as transformers'
in fp32 (ratio >= 1; the reduced-precision modes are in ``bench_precision.py``), SAT-T streaming at least 400x
faster than real time in fp32 (per-step figures against the previous step: ``bench_sat_stream.py``).

The AST reference is Hugging Face ``transformers.ASTForAudioClassification`` (install it without touching
torch: ``pip install --no-deps transformers`` plus tokenizers, huggingface_hub, safetensors, regex,
packaging, filelock, pyyaml, tqdm, typer).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass
from typing import Callable

from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
import tympan  # noqa: E402
from benchmarks.timing import alternated_ms  # noqa: E402
from benchmarks.peak import count_flops, load_average, matmul_peak  # noqa: E402


@dataclass
class Result:
    model: str
    input: str
    ours_ms: float
    reference: str | None = None
    reference_ms: float | None = None
    notes: str = ""
    gflop: float | None = None  # FLOPs of what ``ours_ms`` times (matmuls, convolutions, attention)

    @property
    def ratio(self) -> float | None:
        """Reference time / our time: above 1 means ours is faster."""
        return None if self.reference_ms is None else self.reference_ms / self.ours_ms


def time_ms(*fns: Callable[[], object], repeats: int, warmup: int = 1) -> list[float]:
    """Median wall time in ms of each of ``fns``, run alternately (fair on a busy machine), in inference mode."""
    with torch.inference_mode():
        return list(alternated_ms(dict(zip(map(str, range(len(fns))), fns)), repeats, warmup).values())


# ----------------------------------------------------------------------------------------------------------
# AST


def bench_ast(args: argparse.Namespace) -> list[Result]:
    """AST-base384 (12 blocks, stride 10, random weights) on a 10 s clip (1024 frames x 128 mel bins)."""
    torch.manual_seed(0)
    ours = tympan.create_model("ast-base384").eval()
    x = torch.randn(args.batch, 1024, 128) * 0.5
    label = f"{args.batch} x 1024 frames (10 s)"
    try:
        from transformers import ASTConfig, ASTForAudioClassification
    except ImportError:
        print("transformers is not installed: AST reference skipped")
        return [Result("ast-base384", label, *time_ms(lambda: ours(x), repeats=args.repeats))]
    config = ASTConfig(
        hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
        patch_size=16, frequency_stride=10, time_stride=10, max_length=1024, num_mel_bins=128, num_labels=527,
        layer_norm_eps=1e-6,
    )
    reference = ASTForAudioClassification(config).eval()
    with torch.inference_mode():  # same architecture: same output shape, hence same work
        assert reference(x).logits.shape == ours(x).shape
    ours_ms, reference_ms = time_ms(lambda: ours(x), lambda: reference(x), repeats=args.repeats)
    name = f"transformers {__import__('transformers').__version__} ASTForAudioClassification"
    return [Result("ast-base384", label, ours_ms, name, reference_ms, gflop=count_flops(lambda: ours(x)) / 1e9)]


# ----------------------------------------------------------------------------------------------------------
# Dasheng: the original package (dasheng 0.0.9) cannot be imported next to torch 2.13 (it needs torchaudio), so its
# figures measured on this machine (specs/peers.md, torch 2.8) are the named baseline.

DASHENG_PEER_MS = {10: 380.0, 60: 1630.0}


def bench_dasheng(args: argparse.Namespace) -> list[Result]:
    """Dasheng-base (12 blocks, random weights) on 10 s and 60 s waveforms, batch ``args.batch``."""
    torch.manual_seed(0)
    model = tympan.create_model("dasheng-base").eval()
    results = []
    for seconds in (10, 60):
        wave = torch.randn(args.batch, 16000 * seconds) * 0.1
        (ours_ms,) = time_ms(lambda: model(wave), repeats=args.repeats)
        results.append(Result("dasheng-base", f"{args.batch} x {seconds} s waveform", ours_ms,
                              "dasheng 0.0.9 (peers.md)", DASHENG_PEER_MS[seconds] * args.batch,
                              gflop=count_flops(lambda: model(wave)) / 1e9))
    return results


# ----------------------------------------------------------------------------------------------------------
# SAT streaming: the baseline is real time itself (ratio = how many times faster than real time).


def bench_sat(args: argparse.Namespace) -> list[Result]:
    """SAT-T (2 s chunks with memory) streaming 60 s of audio pushed in 0.1 s pieces, as from a microphone."""
    from tympan.inference import Streamer

    torch.manual_seed(0)
    seconds = 60
    streamer = Streamer(tympan.create_model("sat-tiny-2s").eval())
    pieces = (torch.randn(16000 * seconds) * 0.1).split(1600)

    def run() -> None:
        streamer.reset()
        for piece in pieces:
            streamer.push(piece)

    (ours_ms,) = time_ms(run, repeats=args.repeats)
    model = streamer.model
    steps = seconds * 16000 // model.chunk_samples  # the streamer runs a model step whenever one fills
    notes = f"{ours_ms / steps:.1f} ms per {model.chunk_samples / 16000:.2f} s step ({steps} steps)"
    chunk, state = torch.zeros(1, model.chunk_samples), model.init_state(1)
    gflop = count_flops(lambda: model.step(chunk, state)) * steps / 1e9
    return [Result("sat-tiny-2s", f"{seconds} s stream, 1.92 s chunks", ours_ms, "real time", seconds * 1000.0,
                   notes, gflop=gflop)]


BENCHMARKS: dict[str, Callable[[argparse.Namespace], list[Result]]] = {
    "ast": bench_ast,
    "dasheng": bench_dasheng,
    "sat": bench_sat,
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(BENCHMARKS), choices=list(BENCHMARKS))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    peak = matmul_peak(args.threads, "fp32")
    print(f"torch {torch.__version__}, {args.threads} threads, load {load_average()}, fp32 matmul peak {peak:.0f} GFLOP/s")
    for name in args.models:
        for r in BENCHMARKS[name](args):
            ref = "" if r.reference_ms is None else f"   {r.reference}: {r.reference_ms:8.1f} ms   ratio {r.ratio:.2f}x"
            share = None if r.gflop is None else r.gflop / (r.ours_ms / 1e3) / peak
            share_text = "" if share is None else f"   {100 * share:.0f}% of peak"
            print(f"{r.model:20s} {r.input:28s} ours {r.ours_ms:8.1f} ms{ref}{share_text}   {r.notes}")
            print(json.dumps(asdict(r) | {"ratio": r.ratio, "threads": args.threads, "torch": torch.__version__,
                                          "peak_gflops": peak, "share_of_peak": share, "load": load_average()}))


if __name__ == "__main__":
    main()
