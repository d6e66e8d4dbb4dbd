"""Any ONNX audio classifier as a frozen teacher: waveform in, class scores (and optionally embeddings) out.

Teachers for distillation and peers for evaluation are often shipped as ONNX graphs (e.g. Qualcomm AI Hub's
quantised exports). :class:`OnnxTeacher` wraps one in onnxruntime and handles what such graphs have in common:

* the file may come zipped with its external weights (``model.onnx`` + ``model.data``): it is unzipped once into
  ``$TYMPAN_CACHE/onnx/<name>-<sha256 prefix>/``;
* exports are often fixed to batch 1: the graph is patched in memory so dim 0 of its inputs and outputs is
  symbolic, and windows run in batches (subclasses fix any internal ``Reshape`` that hard-codes the batch);
* an internal tensor (the embedding before the classifier) can be exposed as an extra output;
* quantised (QDQ) graphs take and give integers: the input is quantised with the scale / zero point of the
  ``DequantizeLinear`` that reads it, the output dequantised with those of the ``QuantizeLinear`` that writes it;
* the head's logits become scores through ``sigmoid`` (multi-label), ``softmax`` or nothing.

A model sees *windows*: by default the whole waveform is one window (graph input ``[batch, samples]``);
subclasses such as :class:`tympan.teachers.yamnet.YAMNet` override :meth:`OnnxTeacher.windows` with their own
frontend (log-mel patches). ``frames`` gives per-window outputs, ``clip`` pools them per clip, and calling the
teacher gives clip scores as a torch tensor for distillation losses.

onnx and onnxruntime are optional (``pip install 'tympan[onnx]'``); they are imported on first use.
"""

from __future__ import annotations

import hashlib
import importlib
import os
import shutil
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Literal, Sequence

import numpy as np
import torch
from torch import Tensor

from tympan.labels import LabelSet, read_label_csv

__all__ = [
    "Activation",
    "OnnxTeacher",
    "Quantization",
    "add_output",
    "extract_model",
    "find_quantization",
    "make_batch_symbolic",
    "require",
]

Activation = Literal["sigmoid", "softmax", "none"]
Pooling = Literal["mean", "max"]
ACTIVATIONS = ("sigmoid", "softmax", "none")
POOLINGS = ("mean", "max")
_ORT_DTYPES = {"tensor(float)": np.float32, "tensor(uint8)": np.uint8, "tensor(int8)": np.int8,
               "tensor(int16)": np.int16, "tensor(uint16)": np.uint16, "tensor(double)": np.float64}  # fmt: skip


def require(module: str) -> ModuleType:
    """Import an optional dependency, or fail with one line saying how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ImportError(f"{module} is needed for ONNX teachers: pip install 'tympan[onnx]'") from None


# ------------------------------------------------------------------------------------------ files
def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _find_onnx(folder: Path) -> Path:
    found = sorted(folder.rglob("*.onnx"))
    if len(found) != 1:
        raise ValueError(f"{folder}: expected exactly one .onnx file, found {len(found)}")
    return found[0]


def extract_model(path: str | os.PathLike, cache: str | os.PathLike | None = None) -> Path:
    """The ``.onnx`` file to load: `path` itself, or the one inside a zip, unzipped once into a cache folder.

    The folder is named after the zip and its SHA-256 prefix, so a changed zip is unzipped afresh; extraction
    goes through a temporary folder renamed into place, so an interrupted run leaves no half-written cache.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: ONNX model not found")
    if not zipfile.is_zipfile(path):
        return path
    if cache is None:
        from tympan.checkpoints import cache_dir

        cache = cache_dir() / "onnx"
    target = Path(cache) / f"{path.stem.removesuffix('.onnx')}-{_sha256(path)[:12]}"
    if not target.is_dir():
        target.parent.mkdir(parents=True, exist_ok=True)
        scratch = Path(tempfile.mkdtemp(prefix=".unzip-", dir=target.parent))
        try:
            with zipfile.ZipFile(path) as archive:
                archive.extractall(scratch)  # zipfile drops absolute paths and '..' components
            _find_onnx(scratch)
            try:
                scratch.rename(target)
            except OSError:  # another process won the race
                if not target.is_dir():
                    raise
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    return _find_onnx(target)


# ------------------------------------------------------------------------------------ graph edits
def make_batch_symbolic(model: Any, dim_name: str = "batch") -> None:
    """Make dim 0 of every graph input and output symbolic, and drop the stored intermediate shapes.

    ``value_info`` only holds shape hints from export time (with batch 1); onnxruntime infers them again.
    """
    for value in (*model.graph.input, *model.graph.output):
        dims = value.type.tensor_type.shape.dim
        if len(dims):
            dims[0].Clear()
            dims[0].dim_param = dim_name
    del model.graph.value_info[:]


def add_output(model: Any, tensor_name: str, shape: Sequence[int | str], elem_type: int | None = None) -> None:
    """Expose an internal tensor as an extra graph output (float32 unless `elem_type`, an onnx TensorProto type)."""
    onnx = require("onnx")
    produced = {name for node in model.graph.node for name in node.output}
    if tensor_name not in produced:
        raise ValueError(f"the graph has no tensor named {tensor_name!r} to expose as an output")
    if tensor_name in {o.name for o in model.graph.output}:
        return
    elem_type = onnx.TensorProto.FLOAT if elem_type is None else elem_type
    model.graph.output.append(onnx.helper.make_tensor_value_info(tensor_name, elem_type, list(shape)))


@dataclass(frozen=True)
class Quantization:
    """Affine quantisation of a graph's integer input or output: ``real = scale * (q - zero_point)``."""

    scale: float
    zero_point: int
    dtype: np.dtype

    def quantize(self, x: np.ndarray) -> np.ndarray:
        info = np.iinfo(self.dtype)
        return np.clip(np.round(x / self.scale + self.zero_point), info.min, info.max).astype(self.dtype)

    def dequantize(self, q: np.ndarray) -> np.ndarray:
        return ((q.astype(np.float32) - np.float32(self.zero_point)) * np.float32(self.scale)).astype(np.float32)


def _initializer(model: Any, name: str) -> np.ndarray:
    onnx = require("onnx")
    for tensor in model.graph.initializer:
        if tensor.name == name:
            return onnx.numpy_helper.to_array(tensor)
    raise ValueError(f"the graph has no initializer {name!r}")


def find_quantization(model: Any, tensor_name: str) -> Quantization | None:
    """The (scalar) quantisation of a graph input read by a ``DequantizeLinear`` or an output written by a
    ``QuantizeLinear``; ``None`` for float tensors."""
    for node in model.graph.node:
        reads = node.op_type == "DequantizeLinear" and node.input[0] == tensor_name
        writes = node.op_type == "QuantizeLinear" and node.output[0] == tensor_name
        if reads or writes:
            scale = _initializer(model, node.input[1])
            zero_point = _initializer(model, node.input[2])
            if scale.size != 1 or zero_point.size != 1:
                raise ValueError(f"{tensor_name!r} is quantised per channel; only per-tensor is supported")
            return Quantization(float(scale.reshape(())), int(zero_point.reshape(())), zero_point.dtype)
    return None


def _activate(logits: np.ndarray, activation: str) -> np.ndarray:
    if activation == "sigmoid":
        return (1.0 / (1.0 + np.exp(-logits.astype(np.float64)))).astype(np.float32)
    if activation == "softmax":
        shifted = logits.astype(np.float64) - logits.max(axis=-1, keepdims=True)
        e = np.exp(shifted)
        return (e / e.sum(axis=-1, keepdims=True)).astype(np.float32)
    return logits.astype(np.float32)


def _pool(x: np.ndarray, pooling: str) -> np.ndarray:
    return x.max(axis=0) if pooling == "max" else x.mean(axis=0)


# ----------------------------------------------------------------------------------------- teacher
class OnnxTeacher:
    """A frozen ONNX audio classifier: waveform in, scores (probabilities) and optional embeddings out.

    Args:
        model: an ``.onnx`` file (external data beside it) or a zip holding one.
        sample_rate: the rate the model expects waveforms at.
        labels: class-label CSV (``index,mid,display_name``) or a :class:`LabelSet`; ``None`` for none.
        activation: how the graph's output becomes scores (``"sigmoid"`` for multi-label logits).
        embedding_output: an internal tensor to expose as the embedding ``[batch, D]``, or ``None``.
        num_threads: onnxruntime intra-op threads (spinning off, so idle threads do not burn CPU).
        batch_size: windows per ``session.run`` call.
        symbolic_batch: patch the graph to a symbolic batch; ``False`` runs one window per call, for graphs
            whose batch cannot be freed.
        cache: where zipped models are unzipped (default ``$TYMPAN_CACHE/onnx``).
    """

    def __init__(
        self,
        model: str | os.PathLike,
        *,
        sample_rate: int = 16000,
        labels: str | os.PathLike | LabelSet | None = None,
        activation: Activation = "sigmoid",
        embedding_output: str | None = None,
        num_threads: int = 2,
        batch_size: int = 64,
        symbolic_batch: bool = True,
        providers: Sequence[str] = ("CPUExecutionProvider",),
        cache: str | os.PathLike | None = None,
    ) -> None:
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {', '.join(ACTIVATIONS)}, got {activation!r}")
        if batch_size < 1 or num_threads < 1:
            raise ValueError(f"batch_size and num_threads must be >= 1, got {batch_size} and {num_threads}")
        onnx, ort = require("onnx"), require("onnxruntime")
        self.path = extract_model(model, cache)
        self.sample_rate, self.activation = sample_rate, activation
        self.batch_size = batch_size if symbolic_batch else 1
        proto = onnx.load(str(self.path))  # external data is read from the same folder
        self.input_name, self.output_name = proto.graph.input[0].name, proto.graph.output[0].name
        self.input_quantization = find_quantization(proto, self.input_name)
        self.output_quantization = find_quantization(proto, self.output_name)
        if symbolic_batch:
            make_batch_symbolic(proto)
        self.embedding_output = embedding_output
        if embedding_output is not None:
            add_output(proto, embedding_output, ["batch" if symbolic_batch else 1, "embedding"])
        self.prepare_graph(proto)

        options = ort.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = num_threads, 1
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.add_session_config_entry("session.inter_op.allow_spinning", "0")
        self.session = ort.InferenceSession(proto.SerializeToString(), options, providers=list(providers))
        session_input = self.session.get_inputs()[0]
        self.input_dtype = _ORT_DTYPES.get(session_input.type, np.float32)
        self.input_shape = tuple(session_input.shape)
        self.labels = read_label_csv(labels) if isinstance(labels, (str, os.PathLike)) else labels
        self.num_classes = int(self.session.get_outputs()[0].shape[-1])
        if self.labels is not None and len(self.labels) != self.num_classes:
            raise ValueError(f"{len(self.labels)} labels given for a model with {self.num_classes} outputs")

    # ------------------------------------------------------------------- hooks for subclasses
    def prepare_graph(self, model: Any) -> None:
        """Edit the loaded graph in place before the session is built (e.g. free a hard-coded batch)."""

    def windows(self, waveform: np.ndarray) -> np.ndarray:
        """Model inputs (real-valued, before quantisation) for one mono waveform: ``[n_windows, ...]``.

        By default the whole waveform is one window, for graphs taking ``[batch, samples]``.
        """
        return waveform[None].astype(np.float32)

    # ------------------------------------------------------------------------------ running
    def _check_waveform(self, waveform: Any) -> np.ndarray:
        if isinstance(waveform, Tensor):
            waveform = waveform.detach().cpu().numpy()
        array = np.asarray(waveform)
        if array.ndim != 1 or array.size == 0 or not np.issubdtype(array.dtype, np.floating):
            raise ValueError(
                f"expected a non-empty mono float waveform [N] at {self.sample_rate} Hz, "
                f"got {array.dtype} array of shape {array.shape}"
            )
        if not np.isfinite(array).all():
            raise ValueError("waveform holds NaN or inf samples")
        return array

    def _as_clips(self, waveforms: Any) -> list[np.ndarray]:
        """One waveform [N], a batch [B, N] (array or tensor) or a list of [N_i] -> list of 1-D arrays."""
        if isinstance(waveforms, (np.ndarray, Tensor)) and waveforms.ndim == 2:
            waveforms = list(waveforms)
        elif isinstance(waveforms, (np.ndarray, Tensor)) or not isinstance(waveforms, (list, tuple)):
            waveforms = [waveforms]
        if not waveforms:
            raise ValueError("no waveforms given")
        return [self._check_waveform(w) for w in waveforms]

    def run(self, windows: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """Scores ``[n, C]`` (float32, after the activation) and embeddings ``[n, D]`` (or ``None``) for windows."""
        if windows.shape[0] == 0:
            raise ValueError("no windows to run")
        inputs = windows
        if self.input_quantization is not None:
            inputs = self.input_quantization.quantize(windows)
        inputs = inputs.astype(self.input_dtype, copy=False)
        names = [self.output_name] + ([self.embedding_output] if self.embedding_output else [])
        scores, embeddings = [], []
        for start in range(0, inputs.shape[0], self.batch_size):
            outputs = self.session.run(names, {self.input_name: inputs[start : start + self.batch_size]})
            scores.append(outputs[0])
            if self.embedding_output:
                embeddings.append(outputs[1].reshape(outputs[1].shape[0], -1).astype(np.float32))
        logits = np.concatenate(scores)
        if self.output_quantization is not None:
            logits = self.output_quantization.dequantize(logits)
        logits = logits.reshape(logits.shape[0], -1)
        return _activate(logits, self.activation), (np.concatenate(embeddings) if embeddings else None)

    def frames(self, waveform: Any) -> tuple[np.ndarray, np.ndarray | None]:
        """Per-window scores ``[n_windows, C]`` and embeddings ``[n_windows, D]`` (or ``None``) of one waveform."""
        return self.run(self.windows(self._check_waveform(waveform)))

    def clip(
        self, waveforms: Any, pooling: Pooling = "mean", embedding_pooling: Pooling = "mean"
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """Clip-level scores and embeddings, pooled over each clip's windows.

        `waveforms` is one waveform ``[N]`` (gives ``[C]`` and ``[D]``) or several (a ``[B, N]`` array/tensor or
        a list of 1-D arrays of any lengths; gives ``[B, C]`` and ``[B, D]``). The windows of all clips run
        together in batches. ``pooling="max"`` catches short events that a mean over windows dilutes.
        """
        if pooling not in POOLINGS or embedding_pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {', '.join(POOLINGS)}, got {pooling!r}/{embedding_pooling!r}")
        single = not isinstance(waveforms, (list, tuple)) and np.ndim(waveforms) == 1
        clip_windows = [self.windows(w) for w in self._as_clips(waveforms)]
        counts = [len(w) for w in clip_windows]
        if len({w.shape[1:] for w in clip_windows}) == 1:
            scores, embeddings = self.run(np.concatenate(clip_windows))
        else:  # windows of different shapes (whole-waveform models on clips of different lengths)
            results = [self.run(w) for w in clip_windows]
            scores = np.concatenate([r[0] for r in results])
            embeddings = np.concatenate([r[1] for r in results]) if self.embedding_output else None
        bounds = np.cumsum([0, *counts])
        pooled_scores = np.stack([_pool(scores[a:b], pooling) for a, b in zip(bounds[:-1], bounds[1:])])
        pooled_embeddings = None
        if embeddings is not None:
            parts = [_pool(embeddings[a:b], embedding_pooling) for a, b in zip(bounds[:-1], bounds[1:])]
            pooled_embeddings = np.stack(parts)
        if single:
            return pooled_scores[0], (None if pooled_embeddings is None else pooled_embeddings[0])
        return pooled_scores, pooled_embeddings

    @torch.no_grad()
    def __call__(self, waveforms: Tensor | np.ndarray, pooling: Pooling = "mean") -> Tensor:
        """Clip scores ``[B, C]`` float32 for a batch ``[B, N]``, as a tensor on the input's device (teacher use)."""
        device = waveforms.device if isinstance(waveforms, Tensor) else torch.device("cpu")
        if np.ndim(waveforms) == 1:
            waveforms = waveforms[None]
        scores, _ = self.clip(waveforms, pooling=pooling)
        return torch.from_numpy(scores).to(device)

    def top_classes(self, scores: np.ndarray, k: int = 5) -> list[tuple[str, float]]:
        """The `k` best (class name, score) pairs of one clip's scores ``[C]``."""
        order = np.argsort(-scores, kind="stable")[:k]
        names = self.labels.names if self.labels is not None else tuple(f"class_{i}" for i in range(len(scores)))
        return [(names[i], float(scores[i])) for i in order]

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.path)!r}, classes={self.num_classes}, rate={self.sample_rate})"
