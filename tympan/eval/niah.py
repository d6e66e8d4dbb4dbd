"""Audio needle in a haystack (NIAH, after DASS ``run_NIAH.py``) for any tympan model: how much of a short clip's
decision survives when it is buried in a long recording.

A needle clip (cropped / zero-padded to ``needle_seconds``) is inserted whole into a haystack so that the input
lasts ``duration`` seconds; the needle starts at ``position * (duration - needle)`` (0 = start, 0.5 = middle,
1 = end: the intent of the original, whose ``position = 1`` crashed). Haystacks, made at the waveform level so every
model sees the same input:

* ``zeros``: digital silence (the original's zeros live in DASS's normalised fbank domain instead; silence is the
  model-agnostic equivalent);
* ``white``: Gaussian noise, seeded; ``babble``: the DASS babble recording tiled. Both scaled to ``snr_db`` below
  the needle's RMS (``noise_rms = needle_rms / 10^(snr/20)``, as the original).

Each model runs over the whole input the way its protocol says (:func:`model_runner`): models without a window
(``window_samples is None``: DASS, SSAM) read the whole input at once through their frontend (an AST-style fbank of
the whole input is computed block by block); window models (AST, Dasheng, the SAT-repo ViTs) run window by window
through :class:`tympan.inference.Streamer` with the outputs averaged (``aggregate="mean"``) or max-pooled over
windows; streaming models (SAT) stream with their state. The haystack is generated block by
block (``block_seconds``), so window and streaming models hold one block; whole-sequence models hold the features
of the whole input once (an hour at 100 frames/s x 128 bins is 184 MB) plus their activations.

Scores, per (duration, position), over a set of needles:

* taggers: ``mAP`` of the haystack outputs against each needle's labels (macro over classes with a positive), and
  ``label_rank``: mean rank (1 = top) of the needle's labels in the haystack output. With ``labels="self"`` (for
  random-weight models, or needles without AudioSet labels) the labels are the model's own ``top_k`` classes on the
  bare needle, so the curve shows how much of its own decision survives;
* every model (encoders too): ``retention``, the correlation (centred cosine) between the haystack output and the
  bare-needle output, and ``needle_rank``: the rank of the right needle among all bare needles by that correlation
  (1 = found), with ``needle_top1`` the fraction found first.

:func:`run_sweep` writes ``niah.json``, ``niah.txt`` (a table) and ``niah.png`` (score vs. duration per position).
"""

from __future__ import annotations

import json
import os
import resource
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from tympan.models.protocol import AudioModel, audio_model

SAMPLE_RATE = 16000
HAYSTACKS = ("zeros", "white", "babble")
AGGREGATES = ("mean", "max")
DEFAULT_DURATIONS = (10.0, 30.0, 60.0, 300.0, 600.0, 1800.0, 3600.0)
DEFAULT_POSITIONS = (0.0, 0.5, 1.0)
BABBLE_ENV = "TYMPAN_BABBLE"
_FBANK_BLOCK_FRAMES = 6000  # 60 s of fbank frames per Kaldi call

__all__ = ["AGGREGATES", "HAYSTACKS", "Haystack", "NiahPoint", "format_comparison", "format_table",
           "haystack_blocks", "load_babble", "model_runner", "niah_main", "plot_curve", "read_result", "run_niah",
           "run_sweep", "score_outputs"]  # fmt: skip


# ------------------------------------------------------------------------------------------------ haystack
@dataclass(frozen=True)
class Haystack:
    """What surrounds the needle: ``kind`` in :data:`HAYSTACKS`, ``snr_db`` for the noises, the babble samples."""

    kind: str = "zeros"
    snr_db: float = 10.0
    seed: int = 0
    babble: np.ndarray | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.kind not in HAYSTACKS:
            raise ValueError(f"haystack must be one of {', '.join(HAYSTACKS)}, got {self.kind!r}")
        if self.kind == "babble" and (self.babble is None or self.babble.size == 0):
            raise ValueError("a babble haystack needs the babble samples (load_babble)")


def load_babble(path: str | os.PathLike | None = None) -> np.ndarray:
    """The babble noise at 16 kHz mono (``path``, else ``$TYMPAN_BABBLE``), mean-removed and scaled to unit RMS."""
    from tympan import audio

    path = path or os.environ.get(BABBLE_ENV)
    if not path:
        raise ValueError(f"no babble file: pass babble_path or set {BABBLE_ENV}")
    samples = audio.load(path, sample_rate=SAMPLE_RATE, mono=True).astype(np.float64)
    samples -= samples.mean()
    rms = np.sqrt(np.mean(samples**2))
    if rms == 0:
        raise ValueError(f"{path}: babble file is silent")
    return (samples / rms).astype(np.float32)


def _noise(haystack: Haystack, start: int, length: int, rng: np.random.Generator) -> np.ndarray:
    """Unit-RMS noise for haystack samples ``[start, start + length)`` (white: drawn in order from ``rng``)."""
    if haystack.kind == "zeros":
        return np.zeros(length, np.float32)
    if haystack.kind == "white":
        return rng.standard_normal(length, dtype=np.float32)
    babble = haystack.babble
    return babble[(start + np.arange(length)) % babble.shape[0]]


def haystack_blocks(
    needles: np.ndarray, total_samples: int, position: float, haystack: Haystack, block_samples: int
) -> Iterator[np.ndarray]:
    """Blocks ``[n, <= block_samples]`` of the inputs: haystack, then the needles ``[n, S]`` whole, then haystack.

    The needles share one noise sequence, scaled per needle to ``snr_db`` below its RMS.
    """
    n, needle_samples = needles.shape
    if total_samples < needle_samples:
        raise ValueError(f"duration {total_samples / SAMPLE_RATE:.2f} s is shorter than the needle")
    if not 0.0 <= position <= 1.0:
        raise ValueError(f"position must be in [0, 1], got {position}")
    hay_samples = total_samples - needle_samples
    insert_at = int(round(position * hay_samples))
    rms = np.sqrt(np.mean(needles.astype(np.float64) ** 2, axis=1, keepdims=True))
    scale = (rms / 10 ** (haystack.snr_db / 20)).astype(np.float32)
    rng = np.random.default_rng(haystack.seed)

    def hay(start: int, stop: int) -> Iterator[np.ndarray]:
        for a in range(start, stop, block_samples):
            b = min(stop, a + block_samples)
            yield scale * _noise(haystack, a, b - a, rng)[None]

    yield from hay(0, insert_at)
    yield needles
    yield from hay(insert_at, hay_samples)


# ------------------------------------------------------------------------------------------------ runners
Runner = Callable[[Callable[[], Iterator[np.ndarray]], int], Tensor]  # (blocks factory, streams) -> [n, C]


def _streamed_fbank(blocks: Iterator[np.ndarray], mean: np.ndarray, num_mel_bins: int,
                    stats: tuple[float, float] | None = None) -> Tensor:  # fmt: skip
    """AST/DASS normalised fbank ``[n, T, bins]`` of a long input given block by block, equal to ``ast_fbank`` on the
    whole input (the whole input's mean removed, Kaldi frames cut exactly as ``snip_edges``; ``stats`` = the
    normalisation's (mean, std), AudioSet's by default)."""
    from tympan.features import AUDIOSET_STATS, kaldi_fbank

    stats = stats or AUDIOSET_STATS

    window, shift = 400, 160
    pieces: list[Tensor] = []
    buffer = np.zeros((mean.shape[0], 0), np.float32)

    def emit(samples: np.ndarray) -> None:
        wave = torch.from_numpy(samples - mean)
        feats = kaldi_fbank(wave, SAMPLE_RATE, num_mel_bins=num_mel_bins, frame_shift=10.0, window_type="hanning",
                            htk_compat=True, use_energy=False, dither=0.0)  # fmt: skip
        pieces.append((feats - stats[0]) / (2.0 * stats[1]))

    for block in blocks:
        buffer = np.concatenate([buffer, block], axis=1)
        frames = 1 + (buffer.shape[1] - window) // shift if buffer.shape[1] >= window else 0
        while frames >= _FBANK_BLOCK_FRAMES or (frames and buffer.shape[1] > 2 * _FBANK_BLOCK_FRAMES * shift):
            take = min(frames, _FBANK_BLOCK_FRAMES)
            emit(buffer[:, : (take - 1) * shift + window])
            buffer = buffer[:, take * shift:]
            frames -= take
    if buffer.shape[1] >= window:
        frames = 1 + (buffer.shape[1] - window) // shift
        emit(buffer[:, : (frames - 1) * shift + window])
    if not pieces:
        raise ValueError("input shorter than one 25 ms frame")
    return torch.cat(pieces, dim=1)


def _scores(model: AudioModel, features: Tensor) -> Tensor:
    """Probabilities of a tagger, the scene embedding of an encoder."""
    return model.probabilities(model(features)) if model.has_head else model.embed(features).scene


def _whole_features(model: AudioModel, make_blocks: Callable[[], Iterator[np.ndarray]], streams: int) -> Tensor:
    """The frontend's features of the whole input ``[n, ...]``: an un-cropped AST-style fbank block by block (a first
    pass takes the whole input's mean, which the recipe removes), any other frontend on the joined waveform."""
    from tympan.features import ASTFbank

    frontend = model.frontend
    if isinstance(frontend, ASTFbank) and frontend.target_length is None and frontend.normalize:
        total = np.zeros((streams, 1), np.float64)
        count = 0
        for block in make_blocks():
            total += block.sum(axis=1, keepdims=True, dtype=np.float64)
            count += block.shape[1]
        mean = (total / count).astype(np.float32)
        return _streamed_fbank(make_blocks(), mean, frontend.num_mel_bins, (frontend.mean, frontend.std))
    audio = torch.from_numpy(np.concatenate(list(make_blocks()), axis=1))
    return torch.cat([frontend(row[None].to(model.device())).cpu() for row in audio])


def model_runner(model: nn.Module, aggregate: str = "mean") -> tuple[str, Runner]:
    """How ``model`` reads a long input, and a function ``(blocks factory, streams) -> outputs [n, C]``.

    Outputs are probabilities for taggers, scene embeddings for encoders. Returns ``(mode, runner)`` with mode
    ``"whole"`` (no window: DASS, SSAM), ``"stream"`` (streaming models: SAT) or ``"windows"`` (AST, Dasheng, ViTs).
    """
    from tympan.inference.streaming import Streamer
    from tympan.inference.tagging import window_seconds

    if aggregate not in AGGREGATES:
        raise ValueError(f"aggregate must be one of {', '.join(AGGREGATES)}, got {aggregate!r}")
    model = audio_model(model)

    if model.window_samples is None and not model.streaming:
        def run_whole(make_blocks: Callable[[], Iterator[np.ndarray]], streams: int) -> Tensor:
            features = _whole_features(model, make_blocks, streams)
            return torch.cat([_scores(model, row[None].to(model.device())).cpu() for row in features])  # one at a time

        return "whole", run_whole

    chunk_seconds = None if model.streaming else window_seconds(model)

    def run_windows(make_blocks: Callable[[], Iterator[np.ndarray]], streams: int) -> Tensor:
        streamer = Streamer(model, chunk_seconds, streams=streams)
        outputs = torch.stack([result.output for result in streamer.run_blocks(make_blocks())])
        return outputs.mean(0) if aggregate == "mean" else outputs.amax(0)

    return ("stream" if model.streaming else "windows"), run_windows


# ------------------------------------------------------------------------------------------------ scoring
def _ranks(scores: Tensor) -> Tensor:
    """Rank of every entry within its row, 1 = highest."""
    order = scores.argsort(dim=1, descending=True)
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(1, scores.shape[1] + 1).expand_as(order))
    return ranks


def score_outputs(outputs: Tensor, references: Tensor, targets: Tensor | None) -> dict[str, float]:
    """Haystack outputs ``[n, C]`` vs bare-needle outputs ``[n, C]`` (and binary needle labels ``[n, C]``)."""
    from tympan.eval.metrics import average_precision

    outputs, references = outputs.double(), references.double()
    centred = [torch.nn.functional.normalize(x - x.mean(1, keepdim=True), dim=1) for x in (outputs, references)]
    cosine = centred[0] @ centred[1].T  # Pearson correlation: random-weight sigmoid outputs all sit near 0.5
    own = cosine.diagonal()
    needle_rank = (cosine > own[:, None]).sum(1) + 1
    scores = {"retention": own.mean().item(), "needle_rank": needle_rank.double().mean().item(),
              "needle_top1": (needle_rank == 1).double().mean().item()}  # fmt: skip
    if targets is not None:
        positive = targets.sum(0) > 0
        ap = average_precision(outputs[:, positive], targets[:, positive])
        label_ranks = _ranks(outputs)[targets.bool()].double()
        scores["mAP"] = torch.nanmean(torch.as_tensor(ap, dtype=torch.float64)).item()
        scores["label_rank"] = label_ranks.mean().item()
    return scores


def _self_targets(references: Tensor, top_k: int) -> Tensor:
    targets = torch.zeros_like(references)
    targets.scatter_(1, references.topk(min(top_k, references.shape[1]), dim=1).indices, 1.0)
    return targets


# ------------------------------------------------------------------------------------------------ sweep
@dataclass
class NiahPoint:
    """One (duration, position) of a sweep."""

    duration: float
    position: float
    seconds: float  # wall time of the haystack runs (all needles)
    peak_rss_mb: float  # process peak resident memory so far
    scores: dict[str, float]


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: kB


def run_niah(
    model: nn.Module,
    needles: np.ndarray,
    durations: Sequence[float] = DEFAULT_DURATIONS,
    positions: Sequence[float] = DEFAULT_POSITIONS,
    haystack: Haystack = Haystack(),
    *,
    targets: Tensor | None = None,
    top_k: int = 5,
    aggregate: str = "mean",
    block_seconds: float = 60.0,
    progress: bool = True,
    log: Callable[[str], None] | None = print,
) -> dict[str, Any]:
    """Sweep ``durations`` x ``positions`` with ``needles [n, S]`` (16 kHz); returns a JSON-ready dict.

    ``targets [n, C]`` are the needles' binary labels; ``None`` means the model's own ``top_k`` classes on the bare
    needles for taggers (no label scores for encoders).
    """
    model = audio_model(model).eval()
    given = targets is not None
    mode, runner = model_runner(model, aggregate)
    needles = np.ascontiguousarray(needles, dtype=np.float32)
    n, needle_samples = needles.shape
    block_samples = int(block_seconds * SAMPLE_RATE)
    whole = mode == "whole"

    def outputs_for(total: int, position: float) -> Tensor:
        def rows(index: slice) -> Tensor:
            chosen = needles[index]
            return runner(lambda: haystack_blocks(chosen, total, position, haystack, block_samples), chosen.shape[0])

        with torch.no_grad():  # whole-sequence models: one needle at a time (their memory grows with duration)
            return torch.cat([rows(slice(i, i + 1)) for i in range(n)]) if whole else rows(slice(None))

    references = outputs_for(needle_samples, 0.0)
    if targets is None and model.has_head:
        targets = _self_targets(references, top_k)
    points: list[NiahPoint] = []
    for duration in durations:
        total = int(round(duration * SAMPLE_RATE))
        if total < needle_samples:
            raise ValueError(f"duration {duration} s is shorter than the {needle_samples / SAMPLE_RATE:.2f} s needle")
        for position in positions:
            start = time.perf_counter()
            outputs = outputs_for(total, position)
            point = NiahPoint(duration, position, time.perf_counter() - start, _peak_rss_mb(),
                              score_outputs(outputs, references, targets))  # fmt: skip
            points.append(point)
            if log is not None:
                log(_format_row(point))
    return {
        "model": getattr(model, "tympan_id", type(model).__name__),
        "mode": mode,
        "aggregate": aggregate if mode != "whole" else None,
        "haystack": {"kind": haystack.kind, "snr_db": haystack.snr_db, "seed": haystack.seed},
        "needles": n,
        "needle_seconds": needle_samples / SAMPLE_RATE,
        "labels": "given" if given else ("self" if targets is not None else None),
        "top_k": None if given or targets is None else top_k,
        "points": [asdict(p) for p in points],
    }


def _format_row(point: NiahPoint) -> str:
    cells = " ".join(f"{k}={v:.4g}" for k, v in point.scores.items())
    return f"{point.duration:>8.0f} s  pos {point.position:4.2f}  {point.seconds:8.2f} s  {point.peak_rss_mb:8.0f} MB  {cells}"


def format_table(result: dict[str, Any]) -> str:
    """The sweep as a fixed-width text table."""
    points = result["points"]
    names = list(points[0]["scores"]) if points else []
    header = ["duration_s", "position", "seconds", "peak_rss_mb"] + names
    lines = [f"# NIAH {result['model']} ({result['mode']}), haystack {result['haystack']['kind']}"
             f" snr {result['haystack']['snr_db']} dB, {result['needles']} needles of {result['needle_seconds']:.2f} s",
             "  ".join(f"{h:>11}" for h in header)]  # fmt: skip
    for p in points:
        values = [p["duration"], p["position"], p["seconds"], p["peak_rss_mb"]] + [p["scores"][k] for k in names]
        lines.append("  ".join(f"{v:>11.4g}" for v in values))
    return "\n".join(lines) + "\n"


def _metric(result: dict[str, Any]) -> str:
    """The score a sweep is drawn by: mAP for taggers, retention for encoders and for a single needle (whose mAP
    is 1 by construction: every class it holds has one positive, ranked first or alone)."""
    points = result["points"]
    return "mAP" if points and "mAP" in points[0]["scores"] and result.get("needles") != 1 else "retention"


def plot_curve(result: dict[str, Any] | Sequence[dict[str, Any]], path: str | os.PathLike) -> Path:
    """Score (mAP for taggers, else retention; see :func:`_metric`) and seconds vs. duration, log axes, one line
    per model and position: one sweep, or several (``tympan niah --compare``) drawn together."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = [result] if isinstance(result, dict) else list(result)
    fig, (score_ax, time_ax) = plt.subplots(1, 2, figsize=(11, 4))
    metrics = []
    for one in results:
        points, metric = one["points"], _metric(one)
        metrics.append(metric)
        for position in sorted({p["position"] for p in points}):
            at = [p for p in points if p["position"] == position]
            row = sorted((p["duration"], p["scores"][metric], p["seconds"]) for p in at)
            label = f"{one['model']} ({metric}), needle at {position:g}"
            score_ax.plot([d for d, _, _ in row], [s for _, s, _ in row], marker="o", label=label)
            time_ax.plot([d for d, _, _ in row], [t for _, _, t in row], marker="o", label=label)
    score_ax.set_xscale("log")
    score_ax.set_ylabel(" / ".join(sorted(set(metrics))))
    score_ax.set_title(f"NIAH: {', '.join(sorted({r['haystack']['kind'] for r in results}))} haystack")
    time_ax.set_xscale("log")
    time_ax.set_yscale("log")
    time_ax.set_ylabel("seconds per sweep point")
    time_ax.set_title("cost")
    for ax in (score_ax, time_ax):
        ax.set_xlabel("input duration (s)")
        ax.grid(True, alpha=0.3)
    score_ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def read_result(path: str | os.PathLike) -> dict[str, Any]:
    """A sweep written by :func:`run_sweep`: its ``niah.json``, or the folder holding it."""
    path = Path(path)
    file = path / "niah.json" if path.is_dir() else path
    try:
        result = json.loads(file.read_text())
    except (OSError, ValueError) as err:
        raise ValueError(f"{file}: not a NIAH result ({err})") from None
    if not isinstance(result, dict) or "points" not in result or "model" not in result:
        raise ValueError(f"{file}: not a NIAH result (no 'model' and 'points')")
    return result


def format_comparison(results: Sequence[dict[str, Any]]) -> str:
    """Several sweeps side by side: per duration and position, each model's seconds, peak RSS (MB) and score."""
    keys = sorted({(p["duration"], p["position"]) for r in results for p in r["points"]})
    width = 26
    lines = ["# NIAH comparison, per model: seconds, peak RSS MB, score (" +
             ", ".join(f"{r['model']}: {_metric(r)}" for r in results) + ")",
             f"{'duration_s':>10} {'position':>8}" + "".join(f" | {r['model'][:width]:>{width}}" for r in results)]
    for duration, position in keys:
        cells = []
        for r in results:
            point = next((p for p in r["points"] if (p["duration"], p["position"]) == (duration, position)), None)
            cells.append("-" if point is None else
                         f"{point['seconds']:.1f} {point['peak_rss_mb']:.0f} {point['scores'][_metric(r)]:.3f}")
        lines.append(f"{duration:>10.0f} {position:>8.2f}" + "".join(f" | {c:>{width}}" for c in cells))
    return "\n".join(lines) + "\n"


def run_sweep(result: dict[str, Any], output_dir: str | os.PathLike,
              compare: Sequence[dict[str, Any]] = ()) -> dict[str, Path]:
    """Write ``niah.json``, ``niah.txt`` and ``niah.png`` for a :func:`run_niah` result; with earlier sweeps to
    `compare`, the PNG draws them all and ``comparison.txt`` tabulates them side by side."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "niah.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / "niah.txt").write_text(format_table(result))
    files = {"json": out / "niah.json", "table": out / "niah.txt"}
    if compare:
        (out / "comparison.txt").write_text(format_comparison([result, *compare]))
        files["comparison"] = out / "comparison.txt"
    files["plot"] = plot_curve([result, *compare], out / "niah.png")
    return files


# ------------------------------------------------------------------------------------------------ entry point
def _read_needles(
    sources: Sequence[str | os.PathLike], num_needles: int, needle_seconds: float
) -> tuple[np.ndarray, list[str], list[tuple[str, ...]]]:
    """Needle clips from audio files and/or JSON datafiles (first ``num_needles``), cropped / zero-padded."""
    from tympan import audio
    from tympan.data import read_datafile

    entries: list[tuple[str, tuple[str, ...]]] = []
    for source in sources:
        if str(source).endswith(".json"):
            entries += [(r.wav, r.labels) for r in read_datafile(source)]
        else:
            entries.append((str(source), ()))
    entries = entries[:num_needles]
    if not entries:
        raise ValueError("no needles: give audio files or a JSON datafile")
    length = int(round(needle_seconds * SAMPLE_RATE))
    clips = []
    for path, _ in entries:
        samples = audio.load(path, sample_rate=SAMPLE_RATE, mono=True)[:length]
        clips.append(np.pad(samples, (0, length - samples.shape[0])))
    return np.stack(clips), [p for p, _ in entries], [labels for _, labels in entries]


def niah_main(
    model_id: str,
    needles: Sequence[str | os.PathLike],
    output_dir: str | os.PathLike,
    *,
    checkpoint: str | None = None,
    pretrained: bool = True,
    durations: Sequence[float] = DEFAULT_DURATIONS,
    positions: Sequence[float] = DEFAULT_POSITIONS,
    haystack: str = "zeros",
    snr_db: float = 10.0,
    babble_path: str | os.PathLike | None = None,
    needle_seconds: float = 5.0,
    num_needles: int = 8,
    labels: str = "self",
    top_k: int = 5,
    aggregate: str = "mean",
    block_seconds: float = 60.0,
    seed: int = 0,
    device: str = "cpu",
    overrides: dict[str, Any] | None = None,
    compare: Sequence[str | os.PathLike] = (),
) -> dict[str, Any]:
    """``tympan niah``: build/load the model, read the needles, sweep, write JSON + table + PNG; returns the result.

    ``labels="self"`` scores against the model's own top-``top_k`` classes on the bare needles; ``"datafile"`` maps
    the needles' datafile labels (AudioSet mids or names) onto the model's label set.
    """
    import tympan

    if labels not in ("self", "datafile"):
        raise ValueError(f"labels must be 'self' or 'datafile', got {labels!r}")
    earlier = [read_result(path) for path in compare]  # fail before the sweep, not after an hour of it
    overrides = overrides or {}
    if checkpoint or pretrained:
        model = tympan.load(model_id, checkpoint=checkpoint, **overrides)
    else:
        model = tympan.create_model(model_id, **overrides).eval()
    model = model.to(device)
    clips, paths, needle_labels = _read_needles(needles, num_needles, needle_seconds)
    targets = _datafile_targets(model, needle_labels) if labels == "datafile" else None
    babble = load_babble(babble_path) if haystack == "babble" else None
    result = run_niah(model, clips, durations, positions, Haystack(haystack, snr_db, seed, babble), targets=targets,
                      top_k=top_k, aggregate=aggregate, block_seconds=block_seconds)  # fmt: skip
    result.update(needle_files=paths, labels=labels, pretrained=bool(checkpoint or pretrained), device=device)
    files = run_sweep(result, output_dir, earlier)
    print(format_table(result), end="")
    if earlier:
        print(files["comparison"].read_text(), end="")
    print("wrote " + ", ".join(str(p) for p in files.values()))
    return result


def _datafile_targets(model: nn.Module, needle_labels: list[tuple[str, ...]]) -> Tensor:
    from tympan.inference.tagging import Tagger

    label_set = Tagger(model).labels
    targets = torch.zeros(len(needle_labels), len(label_set))
    for row, labels in enumerate(needle_labels):
        for label in labels:
            try:
                targets[row, label_set.index(label)] = 1.0
            except KeyError:
                raise ValueError(f"needle label {label!r} is not a class of the model's label set") from None
    return targets
