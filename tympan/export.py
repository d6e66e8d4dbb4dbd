"""ONNX export of any registered model, verified in onnxruntime, and an onnxruntime backend for tagging/embedding.

:func:`export_onnx` writes a model through the dynamo exporter (``torch.onnx.export(dynamo=True)``, opset 18: the
FFTs of the Kaldi and mel frontends become ONNX DFT/STFT) against the model protocol only
(:class:`~tympan.models.protocol.AudioModel`). Graph contract:

* input ``waveform`` float32 ``[batch, samples]`` at 16 kHz, both axes dynamic (``--no-frontend``: ``features``,
  the frontend's output, with its length axes dynamic);
* outputs ``probabilities`` (models with a head: what ``tympan tag`` reports for a clip that fits one window) and
  ``embedding`` (the scene embedding of ``embed_waveform``);
* streaming models export their step instead: ``(chunk, state_0, ...) -> (probabilities, state_0, ...)``, the initial
  ("silence") state for one stream saved beside the graph as ``<name>.state.npz``;
* ``metadata_props``: ``tympan.model_id``, ``tympan.version``, ``tympan.sample_rate``, ``tympan.output_kind``,
  ``tympan.labels`` (JSON list of label mids), ``tympan.describe`` (the protocol's facts) and the example length.

One graph call is one window (longer inputs are cut into windows at run time, as ``tag`` does). Frontend matrices
are built eagerly before tracing (a cold filterbank cache would be traced as data-dependent code), the selective scan
switches to its export form by itself (:mod:`tympan.ops.export_scan`), and the example holds several patches so no
size 1 is baked in. :func:`verify_onnx` then runs onnxruntime on two lengths the example did not use (x0.7, x1.3),
compares with PyTorch (probabilities ``atol 1e-4``, embeddings ``rtol 1e-3`` of their scale; streaming: three steps
carrying the state) and times both. :class:`OnnxModel` runs an exported file for ``tag``/``embed --backend onnx``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
import warnings
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import onnx  # the optional dependencies (tympan[onnx]) fail here, at import, with an ImportError naming them
import onnxruntime  # noqa: F401
import onnxscript  # noqa: F401  (the dynamo exporter's translator)
import torch
from torch import Tensor, nn

from tympan.labels import LabelSet
from tympan.models.protocol import AudioModel, audio_model

__all__ = [
    "OPSET",
    "ExportReport",
    "OnnxModel",
    "export_cache_path",
    "export_graph",
    "export_onnx",
    "onnx_tag_file",
    "verify_onnx",
]

OPSET = 18
PROBABILITY_ATOL = 1e-4
EMBEDDING_RTOL = 1e-3
VERIFY_SCALES = (0.7, 1.3)
STREAM_STEPS = 3
EXAMPLE_BATCH = 2
UNWINDOWED_EXAMPLE_SAMPLES = 4 * 16000  # example for models that read any length in one pass (DASS, SSAM)
_ALL_AT_ONCE = 1 << 20  # windows_per_batch while exporting: every window of the input in one call


class ExportError(RuntimeError):
    """The model did not export, or its ONNX graph does not match PyTorch."""


# ---------------------------------------------------------------------------------------------- graph modules


class WindowGraph(nn.Module):
    """``waveform [B, N]`` (or features) -> ``(probabilities, embedding)`` (encoders: ``(embedding,)``)."""

    def __init__(self, model: AudioModel, frontend: bool = True) -> None:
        super().__init__()
        self.model = model
        self.frontend = frontend

    @property
    def output_names(self) -> list[str]:
        return (["probabilities"] if self.model.has_head else []) + ["embedding"]

    def forward(self, x: Tensor) -> tuple[Tensor, ...]:
        model = self.model
        features = model.frontend(x) if self.frontend else x
        outputs = []
        if model.has_head:
            outputs.append(model.probabilities(model(features)))
        if self.frontend:
            outputs.append(model.embed_waveform(x, _ALL_AT_ONCE).scene)
        else:
            outputs.append(model.embed(features, _ALL_AT_ONCE).scene)
        return tuple(outputs)


class StepGraph(nn.Module):
    """Streaming step: ``(chunk [B, N], *state) -> (probabilities, *state)``."""

    def __init__(self, model: AudioModel) -> None:
        super().__init__()
        self.model = model

    def output_names(self, state_size: int) -> list[str]:
        return ["probabilities"] + [f"state_out_{i}" for i in range(state_size)]

    def forward(self, chunk: Tensor, *state: Tensor) -> tuple[Tensor, ...]:
        logits, new_state = self.model.step(chunk, tuple(state))
        return (self.model.probabilities(logits), *new_state)


# ---------------------------------------------------------------------------------------------- export


@dataclass
class ExportReport:
    """What :func:`export_onnx` wrote and, after verification, how ORT compared with PyTorch."""

    path: str
    model_id: str | None
    kind: str  # "tagging", "embedding" or "streaming"
    example_samples: int
    export_seconds: float
    state_path: str | None = None
    lengths: list[int] = field(default_factory=list)
    max_abs_diff: dict[str, float] = field(default_factory=dict)  # output name -> worst |ORT - PyTorch|
    max_rel_diff: dict[str, float] = field(default_factory=dict)  # divided by the reference's largest magnitude
    torch_seconds: float = 0.0
    ort_seconds: float = 0.0
    ok: bool | None = None
    failures: list[str] = field(default_factory=list)

    @property
    def speedup(self) -> float:
        """PyTorch eager time / ORT time on the same inputs (> 1: ORT is faster)."""
        return self.torch_seconds / self.ort_seconds if self.ort_seconds else float("nan")

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "speedup": self.speedup}

    def summary(self) -> str:
        diffs = ", ".join(f"{k} {v:.2e} (rel {self.max_rel_diff.get(k, 0.0):.1e})" for k, v in self.max_abs_diff.items())
        verdict = {None: "not verified", True: "OK", False: "MISMATCH"}[self.ok]
        return (f"{self.path}: {self.model_id} ({self.kind}), exported in {self.export_seconds:.1f} s; "
                f"max |ORT - PyTorch| at {self.lengths} samples: {diffs}; ORT/PyTorch speed {self.speedup:.2f}x "
                f"(PyTorch {self.torch_seconds * 1e3:.1f} ms, ORT {self.ort_seconds * 1e3:.1f} ms); {verdict}")


def output_kind(model: AudioModel) -> str:
    """``streaming`` (step graph), ``tagging`` (probabilities + embedding) or ``embedding`` (encoder)."""
    if model.streaming:
        return "streaming"
    return "tagging" if model.has_head else "embedding"


def example_samples(model: AudioModel) -> int:
    """Length of the export example: 0.9 of a streaming chunk (a chunk longer than the model's is cut into pieces,
    which would fix the traced length), half a window (so x1.3 still fits), or 4 s."""
    if model.streaming:
        return next((n for n in (int(0.9 * model.chunk_samples), model.chunk_samples) if _steps_on(model, n)),
                    model.chunk_samples)
    if model.window_samples:
        return max(int(model.window_samples) // 2, 2 * int(model.min_samples))
    return max(UNWINDOWED_EXAMPLE_SAMPLES, 2 * int(model.min_samples))


def stream_chunk_samples(model: AudioModel) -> int:
    """The chunk ``tag`` feeds a streaming model: its own chunk rounded up to whole seconds (2 s for SAT-2s), or
    exactly its chunk when its step takes nothing else."""
    rounded = math.ceil(model.chunk_samples / model.sample_rate) * model.sample_rate
    return rounded if _steps_on(model, rounded) else model.chunk_samples


def _steps_on(model: AudioModel, samples: int) -> bool:
    """Whether ``model.step`` accepts a chunk of ``samples`` (some steps take exactly ``chunk_samples``)."""
    try:
        with torch.no_grad():
            model.step(_waveform(1, samples, 0), model.init_state(1))
    except ValueError:
        return False
    return True


def _waveform(batch: int, samples: int, seed: int) -> Tensor:
    """A reproducible test waveform: noise with a few tones, peak ~0.5."""
    generator = torch.Generator().manual_seed(seed)
    t = torch.arange(samples, dtype=torch.float32) / 16000
    tones = sum(torch.sin(2 * math.pi * f * t) for f in (220.0, 1250.0, 3100.0)) / 6
    return (0.1 * torch.randn(batch, samples, generator=generator) + tones).float()


def _state_batch_axes(model: AudioModel) -> list[int]:
    """For each state tensor, the axis that grows with the batch (``init_state(1)`` vs ``init_state(2)``)."""
    one, two = model.init_state(1), model.init_state(2)
    axes = []
    for a, b in zip(one, two):
        diff = [i for i, (x, y) in enumerate(zip(a.shape, b.shape)) if x != y]
        if len(diff) != 1:
            raise ExportError(f"cannot tell the batch axis of a state tensor {tuple(a.shape)}")
        axes.append(diff[0])
    return axes


def _feature_axes(model: AudioModel, samples: int) -> list[int]:
    """Axes of the frontend's output that follow the input length (dynamic in a ``--no-frontend`` graph)."""
    with torch.no_grad():
        a = model.frontend(_waveform(EXAMPLE_BATCH, samples, 0))
        b = model.frontend(_waveform(EXAMPLE_BATCH, samples + samples // 3, 0))
    return [i for i in range(1, a.dim()) if a.shape[i] != b.shape[i]]


def _metadata(model: AudioModel, kind: str, frontend: bool, samples: int, state_path: str | None) -> dict[str, str]:
    from tympan import __version__

    labels = model.labels
    facts = model.describe()
    return {
        "tympan.model_id": str(facts.get("model_id")),
        "tympan.version": __version__,
        "tympan.sample_rate": str(model.sample_rate),
        "tympan.output_kind": kind,
        "tympan.input": "waveform" if frontend else "features",
        "tympan.labels": json.dumps(list(labels.mids) if labels is not None else []),
        "tympan.label_names": json.dumps(list(labels.names) if labels is not None else []),
        "tympan.describe": json.dumps(facts, default=str),
        "tympan.example_samples": str(samples),
        "tympan.state_file": os.path.basename(state_path) if state_path else "",
    }


def state_path_for(path: str | os.PathLike) -> Path:
    """Where the initial state of a streaming export lives: ``OUT.state.npz`` beside ``OUT.onnx``."""
    path = Path(path)
    return path.with_name(path.stem + ".state.npz")


@contextmanager
def _quiet_export() -> Iterator[None]:
    """Silence the exporter's progress prints and known-harmless warnings."""
    import logging

    loggers = [logging.getLogger(name) for name in ("torch.onnx", "torch.export", "torch._dynamo", "onnxscript")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def export_onnx(model: nn.Module, path: str | os.PathLike, *, frontend: bool = True, opset: int = OPSET,
                samples: int | None = None, verbose: bool = False) -> ExportReport:
    """Export ``model`` (any :class:`AudioModel`) to ``path`` with the dynamo exporter; see the module doc.

    ``samples``: length of the export example (default :func:`example_samples`). Returns an unverified
    :class:`ExportReport` (:func:`verify_onnx` fills in the comparison).
    """
    model = audio_model(model).eval()
    kind = output_kind(model)
    if kind == "streaming" and not frontend:
        raise ExportError("a streaming model exports its waveform step; --no-frontend does not apply")
    samples = int(samples or example_samples(model))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    dim = torch.export.Dim.DYNAMIC
    state_path = None
    if kind == "streaming":
        graph: nn.Module = StepGraph(model)
        state = tuple(t.detach() for t in model.init_state(EXAMPLE_BATCH))
        inputs: tuple[Tensor, ...] = (_waveform(EXAMPLE_BATCH, samples, 0), *state)
        input_names = ["chunk"] + [f"state_{i}" for i in range(len(state))]
        output_names = graph.output_names(len(state))
        # a step may take exactly chunk_samples (the samples axis then stays static: AUTO), any batch
        dynamic: tuple[Any, ...] = ({0: dim, 1: torch.export.Dim.AUTO},
                                    tuple({axis: dim} for axis in _state_batch_axes(model)))
    else:
        graph = WindowGraph(model, frontend)
        x = _waveform(EXAMPLE_BATCH, samples, 0)
        if frontend:
            inputs, input_names, dynamic = (x,), ["waveform"], ({0: dim, 1: dim},)
        else:
            with torch.no_grad():
                inputs = (model.frontend(x),)
            input_names = ["features"]
            dynamic = ({0: dim, **{axis: dim for axis in _feature_axes(model, samples)}},)
        output_names = graph.output_names
    graph.eval()
    started = time.perf_counter()
    with torch.no_grad():
        graph(*inputs)  # builds the frontends' windows and filterbanks eagerly (cached) before tracing
        context = _quiet_export() if not verbose else warnings.catch_warnings()
        with context:
            try:
                program = torch.onnx.export(graph, inputs, dynamo=True, opset_version=opset, input_names=input_names,
                                            output_names=output_names, dynamic_shapes=dynamic, verbose=verbose,
                                            external_data=False)
            except Exception as err:  # noqa: BLE001 - the exporter raises many types; report one line
                raise ExportError(f"{getattr(model, 'tympan_id', type(model).__name__)} did not export: {_cause(err)}") from err
    metadata = {}
    if kind == "streaming":
        state_path = str(state_path_for(path))
        np.savez(state_path, **{name: t.detach().float().contiguous().numpy()
                                for name, t in zip(input_names[1:], model.init_state(1))})
        metadata["tympan.state_batch_axes"] = json.dumps(_state_batch_axes(model))
        metadata["tympan.stream_chunk_samples"] = str(stream_chunk_samples(model))
        metadata["tympan.stream_partial"] = str(int(_steps_on(model, int(model.chunk_samples * min(VERIFY_SCALES)))))
    metadata.update(_metadata(model, kind, frontend, samples, state_path))
    proto = program.model_proto
    for key, value in metadata.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(proto, str(path))
    seconds = time.perf_counter() - started
    return ExportReport(str(path), getattr(model, "tympan_id", None), kind, samples, seconds, state_path)


def _cause(err: BaseException) -> str:
    """The informative line of an exporter error (its exception summary), else its first line."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    summary = [line for line in lines if line.startswith("<class ")]
    return (summary or lines or [type(err).__name__])[0][:400]


def export_graph(model: nn.Module, frontend: bool = True) -> nn.Module:
    """The module :func:`export_onnx` traces (PyTorch reference of the ONNX graph)."""
    model = audio_model(model).eval()
    return StepGraph(model) if model.streaming else WindowGraph(model, frontend)


# ---------------------------------------------------------------------------------------------- verification


def _session(path: str | os.PathLike, threads: int | None = None):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or torch.get_num_threads()
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _timed(fn, repeats: int) -> tuple[Any, float]:
    """``fn()``'s result and its best wall time over ``repeats`` runs after one warm-up."""
    result = fn()
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - started)
    return result, best


def _compare(report: ExportReport, name: str, ort_out: np.ndarray, ref: Tensor) -> None:
    ref_np = ref.detach().float().numpy()
    if ort_out.shape != ref_np.shape:
        report.failures.append(f"{name}: ORT shape {ort_out.shape} != PyTorch {ref_np.shape}")
        return
    diff = float(np.abs(ort_out - ref_np).max()) if ref_np.size else 0.0
    scale = float(np.abs(ref_np).max()) if ref_np.size else 0.0
    rel = diff / max(scale, 1e-12)
    report.max_abs_diff[name] = max(report.max_abs_diff.get(name, 0.0), diff)
    report.max_rel_diff[name] = max(report.max_rel_diff.get(name, 0.0), rel)
    if name == "probabilities" and diff > PROBABILITY_ATOL:
        report.failures.append(f"{name}: max |diff| {diff:.2e} > {PROBABILITY_ATOL:g}")
    elif name != "probabilities" and rel > EMBEDDING_RTOL:
        report.failures.append(f"{name}: max |diff| {diff:.2e} is {rel:.1e} of its scale > {EMBEDDING_RTOL:g}")


def verify_onnx(model: nn.Module, report: ExportReport, *, scales: Sequence[float] = VERIFY_SCALES,
                repeats: int = 3, threads: int | None = None, batch: int = EXAMPLE_BATCH) -> ExportReport:
    """Run the exported graph in onnxruntime on lengths ``scales`` x the example and compare with PyTorch.

    Window graphs: ``batch`` clips at each length. Streaming graphs: :data:`STREAM_STEPS` full chunks carrying the state
    from the shipped initial state, then one x0.7 chunk. Fills the report's differences, timings (best of
    ``repeats``, same thread count for both) and ``ok``.
    """
    model = audio_model(model).eval()
    session = _session(report.path, threads)
    names = [o.name for o in session.get_outputs()]
    graph = export_graph(model, frontend=_input_name(session) == "waveform").eval()
    report.failures.clear()
    report.lengths = []
    torch_time = ort_time = 0.0
    with torch.no_grad():
        if report.kind == "streaming":
            stored = np.load(report.state_path)
            state_ort = [np.ascontiguousarray(stored[k]) for k in stored.files]
            state_pt = tuple(t.detach() for t in model.init_state(1))
            full, short = stream_chunk_samples(model), int(model.chunk_samples * min(scales))
            lengths = [full] * STREAM_STEPS + ([short] if _steps_on(model, short) else [])
            for i, samples in enumerate(lengths):
                x = _waveform(1, samples, 100 + i)
                (ref, *new_pt), t_pt = _timed(lambda: graph(x, *state_pt), repeats)
                feeds = {"chunk": x.numpy(), **{f"state_{j}": s for j, s in enumerate(state_ort)}}
                (probs, *new_ort), t_ort = _timed(lambda: session.run(names, feeds), repeats)
                _compare(report, "probabilities", probs, ref)
                for j, (a, b) in enumerate(zip(new_ort, new_pt)):
                    _compare(report, f"state_{j}", a, b)
                if i < STREAM_STEPS:  # full chunks carry the state; the short last one does not
                    state_pt, state_ort = tuple(new_pt), list(new_ort)
                report.lengths.append(samples)
                torch_time += t_pt
                ort_time += t_ort
        else:
            for i, scale in enumerate(scales):
                samples = int(report.example_samples * scale)
                x = _waveform(batch, samples, 10 + i)
                if _input_name(session) == "features":
                    x = model.frontend(x)
                refs, t_pt = _timed(lambda: graph(x), repeats)
                outs, t_ort = _timed(lambda: session.run(names, {_input_name(session): x.numpy()}), repeats)
                for name, out, ref in zip(names, outs, refs):
                    _compare(report, name, out, ref)
                report.lengths.append(samples)
                torch_time += t_pt
                ort_time += t_ort
    report.torch_seconds, report.ort_seconds = torch_time, ort_time
    report.ok = not report.failures
    return report


def _input_name(session) -> str:
    return session.get_inputs()[0].name


# ---------------------------------------------------------------------------------------------- ORT backend


class OnnxModel:
    """An exported tympan graph in onnxruntime, with the protocol's facts read from its metadata.

    ``probabilities(waveform)`` / ``embedding(waveform)`` run one window (``[B, N]``, ``N <= window_samples``);
    :meth:`scene_embeddings` cuts longer clips into windows (what :func:`tympan.eval.embed.embed_datafile` calls);
    streaming graphs offer :meth:`init_state` and :meth:`step`.
    """

    def __init__(self, path: str | os.PathLike, threads: int | None = None) -> None:
        self.path = Path(path)
        meta = {p.key: p.value for p in onnx.load(str(self.path), load_external_data=False).metadata_props}
        if "tympan.model_id" not in meta:
            raise ValueError(f"{self.path}: not a tympan export (no tympan.model_id metadata)")
        self.metadata = meta
        self.facts: dict[str, Any] = json.loads(meta.get("tympan.describe", "{}"))
        self.model_id = meta["tympan.model_id"]
        self.kind = meta["tympan.output_kind"]
        self.sample_rate = int(meta["tympan.sample_rate"])
        mids, names = json.loads(meta.get("tympan.labels", "[]")), json.loads(meta.get("tympan.label_names", "[]"))
        self.labels = LabelSet(tuple(mids), tuple(names)) if mids else None
        self.window_samples: int | None = self.facts.get("window_samples")
        self.min_samples: int = int(self.facts.get("min_samples") or 1)
        self.chunk_samples: int | None = self.facts.get("chunk_samples")
        self.streaming = self.kind == "streaming"
        self.stream_chunk_samples = int(meta.get("tympan.stream_chunk_samples") or self.chunk_samples or 0)
        self.stream_partial = meta.get("tympan.stream_partial") == "1"
        self.session = _session(self.path, threads)
        self.input_name = _input_name(self.session)
        if self.input_name != "waveform" and not self.streaming:
            raise ValueError(f"{self.path}: exported without its frontend; the ORT backend needs a waveform graph")
        self.output_names = [o.name for o in self.session.get_outputs()]

    @property
    def has_head(self) -> bool:
        return "probabilities" in self.output_names

    def run(self, waveform: Tensor | np.ndarray) -> dict[str, np.ndarray]:
        """All outputs of one window graph call on ``[B, N]``."""
        x = np.ascontiguousarray(np.asarray(waveform, dtype=np.float32))
        return dict(zip(self.output_names, self.session.run(self.output_names, {self.input_name: x})))

    def probabilities(self, waveform: Tensor | np.ndarray) -> Tensor:
        """``[B, N]`` (one window at most) -> class probabilities ``[B, C]``."""
        if not self.has_head:
            raise ValueError(f"{self.model_id} is an encoder without a classification head: it has no tags to give")
        return torch.from_numpy(self.run(waveform)["probabilities"])

    def embedding(self, waveform: Tensor | np.ndarray) -> Tensor:
        """``[B, N]`` (one window at most) -> scene embedding ``[B, D]``."""
        return torch.from_numpy(self.run(waveform)["embedding"])

    def scene_embeddings(self, audio: Tensor) -> Tensor:
        """``[B, N]`` of any length -> ``[B, D]``: windows' scene embeddings averaged, weighted by their samples."""
        if self.streaming:
            raise ValueError(f"{self.model_id}: the streaming step graph gives no scene embedding")
        audio = torch.as_tensor(audio, dtype=torch.float32)
        window = self.window_samples or audio.shape[1]
        pieces = [audio[:, s:s + window] for s in range(0, audio.shape[1], window)]
        pieces = [p for p in pieces if p.shape[1] >= self.min_samples] or pieces[:1]
        weights = torch.tensor([p.shape[1] for p in pieces], dtype=torch.float32)
        stacked = torch.stack([self.embedding(p) for p in pieces])
        return (stacked * weights[:, None, None]).sum(0) / weights.sum()

    def init_state(self, batch: int = 1) -> list[np.ndarray]:
        """The initial state shipped beside a streaming graph, repeated for ``batch`` streams."""
        meta_file = self.metadata.get("tympan.state_file") or state_path_for(self.path).name
        stored = np.load(self.path.with_name(meta_file))
        axes = json.loads(self.metadata.get("tympan.state_batch_axes", "null")) or [1] * len(stored.files)
        return [np.repeat(stored[k], batch, axis=a) for k, a in zip(stored.files, axes)]

    def step(self, chunk: Tensor | np.ndarray, state: Sequence[np.ndarray]) -> tuple[Tensor, list[np.ndarray]]:
        """One streaming chunk ``[B, N]`` and the state before it -> (probabilities ``[B, C]``, new state)."""
        feeds = {"chunk": np.ascontiguousarray(np.asarray(chunk, dtype=np.float32))}
        feeds.update({f"state_{i}": s for i, s in enumerate(state)})
        probs, *new_state = self.session.run(self.output_names, feeds)
        return torch.from_numpy(probs), list(new_state)


def onnx_tag_file(runner: OnnxModel, path: str | os.PathLike, chunk_seconds: float | None = None,
                  block_seconds: float = 60.0):
    """:func:`tympan.inference.tagging.tag_file` on the ORT backend: same chunks, same clip-level mean.

    Chunks default to the model's window (streaming: its step rounded up to whole seconds). A streaming model runs
    whole steps of ``chunk_samples`` back to back (as :class:`tympan.inference.Streamer`): a chunk reports the mean
    of the steps ending inside it, and the final partial chunk adds one zero-padded step that leaves the state alone.
    """
    from tympan import audio
    from tympan.inference.tagging import FileTags

    if not runner.has_head:
        raise ValueError(f"{runner.model_id} is an encoder without a classification head: it has no tags to give")
    rate = runner.sample_rate
    if chunk_seconds is None:
        chunk_seconds = (math.ceil(runner.chunk_samples / rate) if runner.streaming
                         else round((runner.window_samples or 10 * rate) / rate, 2))  # fmt: skip
    chunk = round(chunk_seconds * rate)
    if runner.streaming and chunk < runner.chunk_samples:
        from tympan.inference.streaming import ChunkTooShortError

        raise ChunkTooShortError(f"chunk_seconds {chunk_seconds:g} is shorter than one step of the model; the minimum "
                                 f"is {runner.chunk_samples / rate:g} s")  # fmt: skip
    tags = FileTags(str(path))
    blocks = audio.stream(path, block_seconds=block_seconds, sample_rate=rate, mono=True)
    if runner.streaming:
        _onnx_stream_steps(runner, (np.asarray(b, np.float32).reshape(-1) for b in blocks), chunk, tags)
    else:
        pending, offset = np.zeros(0, np.float32), 0

        def score(piece: np.ndarray) -> None:
            nonlocal offset
            tags.starts.append(offset / rate)
            offset += piece.shape[0]
            tags.ends.append(offset / rate)
            tags.chunk_probs.append(runner.probabilities(piece[None])[0].float())

        for block in blocks:
            pending = np.concatenate([pending, np.asarray(block, np.float32).reshape(-1)])
            while pending.shape[0] >= chunk:
                score(pending[:chunk])
                pending = pending[chunk:]
        if pending.shape[0] > runner.min_samples:
            score(pending)
    if not tags.chunk_probs:
        raise ValueError(f"{path}: too short to tag")
    return tags


def _onnx_stream_steps(runner: OnnxModel, blocks: Any, chunk: int, tags: Any) -> None:
    """Whole ``chunk_samples`` steps of a streaming ONNX model, reported per ``chunk`` samples (see onnx_tag_file)."""
    step, rate = runner.chunk_samples, runner.sample_rate
    state = runner.init_state(1)
    pending = np.zeros(0, np.float32)  # samples of the step in progress
    probs: list[torch.Tensor] = []  # steps ended in the current chunk
    filled = offset = 0

    def report() -> None:
        nonlocal filled, offset, probs
        tags.starts.append(offset / rate)
        offset += filled
        tags.ends.append(offset / rate)
        tags.chunk_probs.append(torch.stack(probs).mean(0))
        probs, filled = [], 0

    for block in blocks:
        while block.shape[0]:
            take = min(chunk - filled, step - pending.shape[0], block.shape[0])
            pending, block, filled = np.concatenate([pending, block[:take]]), block[take:], filled + take
            if pending.shape[0] == step:
                out, state = runner.step(pending[None], state)
                probs.append(out[0].float())
                pending = np.zeros(0, np.float32)
            if filled == chunk:
                report()
    if filled and (probs or filled > runner.min_samples - 1):
        if pending.shape[0]:
            out, _ = runner.step(np.pad(pending, (0, step - pending.shape[0]))[None], state)
            probs.append(out[0].float())
        report()


def export_cache_path(model: nn.Module, directory: str | os.PathLike | None = None) -> Path:
    """Where :func:`cached_export` keeps ``model``'s graph: ``<cache>/onnx/<id>-<digest>.onnx``, the digest over the
    model's config and weights (another checkpoint gets its own file)."""
    from tympan.checkpoints import cache_dir

    model = audio_model(model)
    digest = hashlib.sha256()
    digest.update(json.dumps(getattr(model, "tympan_config", {}), sort_keys=True, default=str).encode())
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().float().cpu().numpy().tobytes())
    folder = Path(directory) if directory is not None else cache_dir() / "onnx"
    return folder / f"{getattr(model, 'tympan_id', 'model')}-{digest.hexdigest()[:16]}.onnx"


def cached_export(model: nn.Module, directory: str | os.PathLike | None = None) -> Path:
    """The verified ONNX file of ``model`` in the cache (:func:`export_cache_path`), exported and verified on first
    use; an export that does not match PyTorch raises :class:`ExportError` and is not kept."""
    model = audio_model(model).eval()
    path = export_cache_path(model, directory)
    if not path.is_file():
        tmp = path.with_name(path.stem + ".tmp.onnx")
        report = verify_onnx(model, export_onnx(model, tmp))
        if not report.ok:
            raise ExportError(f"the ONNX export of {report.model_id} does not match PyTorch: "
                              + "; ".join(report.failures))
        if report.state_path:
            os.replace(report.state_path, state_path_for(path))
            _rewrite_state_name(tmp, state_path_for(path).name)
        os.replace(tmp, path)
    return path


def _rewrite_state_name(path: Path, state_name: str) -> None:
    proto = onnx.load(str(path))
    for entry in proto.metadata_props:
        if entry.key == "tympan.state_file":
            entry.value = state_name
    onnx.save(proto, str(path))
