"""The one model protocol: the small surface every registered model offers, whatever its family.

Tools (tagging, streaming, HEAR, NIAH, objectives, the trainer, FSDP wrapping, ONNX export) talk to models only
through :class:`AudioModel`; they never ask which family a model is. The contract, after timm's uniform model
interface and icefall's explicit streaming state:

* ``model.frontend``: an ``nn.Module`` turning a 16 kHz waveform batch ``[B, N]`` into the model's input
  (``nn.Identity`` for models that read the waveform). Always separable: ``model(model.frontend(w))``.
* ``model(features) -> logits [B, C]`` for models with a classification head (``num_classes > 0``); never a
  sigmoid inside. :meth:`AudioModel.probabilities` applies the head's activation (``model.activation``).
* ``model.embed(features, windows_per_batch=16) -> Embeddings``: a scene embedding ``[B, D]`` and frame embeddings
  ``[B, T, D_f]`` with their hop and first-frame centre in seconds (sizes in ``embedding_size`` /
  ``frame_embedding_size``), for inputs of any length (the model windows them itself; ``windows_per_batch`` bounds
  how many windows run at once). ``embed_waveform(waveform)`` is ``embed(frontend(waveform))`` except where the
  frontend crops to one window (AST/SSAST), which embeds the whole clip's features instead.
* ``model.labels``: the head's :class:`~tympan.labels.LabelSet` (``None`` for encoders), from the registry's label
  set name (``label_source``) when it has ``num_classes`` classes, generic class names otherwise.
* ``model.window_samples``: the span the model was trained to see at once (tools cut longer inputs into such
  windows); ``model.min_samples``: the shortest input it accepts.
* streaming models (``model.streaming``): ``init_state(batch)`` and ``step(chunk, state) -> (logits, state)`` on
  waveform chunks of ``chunk_samples``; the state is a tuple of tensors, so it exports and crosses processes.
  ``init_state(batch, warm=False)`` gives an empty state (tensors with no memory entries).
  ``steps(block, state) -> (logits [B, k, C], state)`` runs ``k`` consecutive steps of a block of ``k`` chunks
  (what the Streamer calls on a file or a microphone buffer); by default a loop over ``step``, vectorised by
  families whose steps can run as one batch (TymNet: the state is only past samples).
* ``model.inference_threads``: the CPU thread count one stream runs fastest on, or ``None`` (all cores); tools
  run one stream on it and use the other cores for other streams (``tympan tag`` on several files: a model of
  tiny ops loses more to thread hand-offs than it gains).
* ``model.block_types`` (the repeated layers FSDP shards and layer-wise lr decay counts) and ``model.classifier``
  (name of the head submodule, ``None`` for encoders): declared by the registry entry, class defaults otherwise.

Refinements over the first draft (each forced by a family): ``embed`` takes ``windows_per_batch`` (long AST/ViT
inputs are many windows); ``embed_waveform`` is overridable (AST's frontend crops to its window, SSAM's timestamps
depend on the exact clip duration); ``init_state`` takes ``warm`` (SAT starts from the "silence" memory of the
original, or from none); the frontend, a submodule, never appears in the state dict (its tensors are computed from
its settings, so checkpoints stay frontend-free and loadable whatever the frontend's buffers).
``describe()``, ``window_seconds``, ``block_modules()``, ``classifier_module()`` and ``device()`` are derived helpers
for the tools. HEAR keeps a native grid as is only when it starts at 0 with a hop of at most 50 ms (SSAM's original
start-aligned rows); every other grid is resampled to the HEAR lattice.

Everything else (patch embedding, memory layout, cross scans) stays inside the family module.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor, nn

from tympan.labels import LabelSet

__all__ = ["ACTIVATIONS", "AudioModel", "Embeddings", "State", "audio_model", "in_groups", "weighted_mean"]

ACTIVATIONS = ("sigmoid", "softmax", "none")
State = tuple[Tensor, ...]


@dataclass
class Embeddings:
    """What :meth:`AudioModel.embed` returns for a batch of inputs."""

    scene: Tensor  # [B, D]: one vector per input (HEAR scene embedding)
    frames: Tensor  # [B, T, D_f]: one vector per frame (HEAR timestamp embeddings)
    frame_hop_seconds: float  # spacing of consecutive frames
    first_frame_seconds: float  # centre of frame 0

    def timestamps(self) -> Tensor:
        """``[T]`` centre of each frame in seconds."""
        count = self.frames.shape[1]
        return self.first_frame_seconds + self.frame_hop_seconds * torch.arange(count, dtype=torch.float64)


class AudioModel(nn.Module):
    """Base class of every registered model; subclasses fill in the attributes and the abstract methods.

    Class attributes a family sets (or assigns in ``__init__``): ``sample_rate``, ``num_classes`` (0 for encoders),
    ``embedding_size``, ``frame_embedding_size``, ``frame_hop_seconds``, ``window_samples`` (``None``: any length
    in one pass), ``min_samples``, ``streaming`` and, for streaming models, ``chunk_samples``.
    The registry sets ``tympan_id``, ``tympan_config``, ``label_source`` (hence ``labels``), ``classifier`` and
    ``block_types`` on the models it builds.
    """

    sample_rate: int = 16000
    num_classes: int = 0
    embedding_size: int = 0
    frame_embedding_size: int = 0
    frame_hop_seconds: float = 0.0
    window_samples: int | None = None
    min_samples: int = 1
    streaming: bool = False
    chunk_samples: int | None = None
    inference_threads: int | None = None
    activation: str = "sigmoid"
    label_source: str | None = None  # a label set name ("audioset") or CSV path; generic class names otherwise
    classifier: str | None = None
    block_types: tuple[type[nn.Module], ...] = ()
    frontend: nn.Module

    def __init__(self) -> None:
        super().__init__()
        self.frontend = nn.Identity()
        self._register_state_dict_hook(_drop_frontend_keys)
        self.register_load_state_dict_post_hook(_ignore_missing_frontend_keys)

    # ------------------------------------------------------------------------------------------ required
    def forward(self, features: Tensor) -> Tensor:  # pragma: no cover - abstract
        """``features`` (the frontend's output) -> logits ``[B, num_classes]``."""
        raise NotImplementedError(f"{type(self).__name__} has no classification head")

    def embed(self, features: Tensor, windows_per_batch: int = 16) -> Embeddings:  # pragma: no cover - abstract
        """``features`` (any length) -> scene and frame embeddings."""
        raise NotImplementedError

    def init_state(self, batch: int = 1, warm: bool = True) -> State:
        """The state a stream starts from (streaming models only)."""
        raise NotImplementedError(f"{type(self).__name__} does not stream")

    def step(self, chunk: Tensor, state: State) -> tuple[Tensor, State]:
        """One waveform chunk ``[B, chunk_samples]`` and the state before it -> logits ``[B, C]`` and the new state."""
        raise NotImplementedError(f"{type(self).__name__} does not stream")

    def steps(self, block: Tensor, state: State) -> tuple[Tensor, State]:
        """``k`` consecutive steps: ``[B, k * chunk_samples]`` -> logits ``[B, k, C]`` and the state after them.

        Equal to calling :meth:`step` on each chunk in turn (which this default does); a family overrides it when
        its steps can run as one batch."""
        size = int(self.chunk_samples or 0)
        if not size or block.shape[-1] % size:
            raise ValueError(f"steps takes a whole number of {size}-sample chunks, got {block.shape[-1]} samples")
        logits = []
        for chunk in block.split(size, dim=-1):
            out, state = self.step(chunk, state)
            logits.append(out)
        return torch.stack(logits, 1), state

    # ------------------------------------------------------------------------------------------ derived
    def probabilities(self, logits: Tensor) -> Tensor:
        """The head's activation: ``sigmoid`` (multi-label tags), ``softmax`` (one class per clip) or none."""
        if self.activation == "sigmoid":
            return torch.sigmoid(logits)
        if self.activation == "softmax":
            return logits.softmax(-1)
        return logits

    def predict(self, waveform: Tensor) -> Tensor:
        """Waveform ``[B, N]`` (one window at most) -> class probabilities ``[B, C]``."""
        return self.probabilities(self(self.frontend(waveform)))

    def embed_waveform(self, waveform: Tensor, windows_per_batch: int = 16) -> Embeddings:
        """Waveform ``[B, N]`` (any length) -> :class:`Embeddings`."""
        return self.embed(self.frontend(waveform), windows_per_batch)

    @property
    def labels(self) -> LabelSet | None:
        """The head's label set: ``label_source`` when it has ``num_classes`` classes, else generic names."""
        if not self.has_head:
            return None
        cached = self.__dict__.get("_labels")
        if cached is None or len(cached) != self.num_classes:
            from tympan.labels import get_label_set

            try:
                cached = get_label_set(self.label_source, self.num_classes)
            except ValueError:  # e.g. an AudioSet model rebuilt with a 10-class head
                cached = get_label_set(None, self.num_classes)
            self.__dict__["_labels"] = cached
        return cached

    @labels.setter
    def labels(self, value: LabelSet | None) -> None:
        self.__dict__["_labels"] = value

    @property
    def has_head(self) -> bool:
        return self.num_classes > 0

    @property
    def window_seconds(self) -> float | None:
        """``window_samples`` in seconds (``None``: the model reads any length in one pass)."""
        return None if self.window_samples is None else round(self.window_samples / self.sample_rate, 2)

    def block_modules(self) -> list[nn.Module]:
        """The repeated layers of the model's declared ``block_types``, in forward order."""
        return [m for m in self.modules() if self.block_types and isinstance(m, self.block_types)]

    def classifier_module(self) -> nn.Module | None:
        """The classifier head submodule named by ``classifier`` (``None`` for encoders)."""
        return self.get_submodule(self.classifier) if self.classifier else None

    def device(self) -> torch.device:
        """Where the model's parameters live (CPU for a model without any)."""
        param = next(self.parameters(), None)
        return param.device if param is not None else torch.device("cpu")

    def describe(self) -> dict[str, Any]:
        """The protocol's facts about this model, as plain values (model cards, ``tympan models``, export metadata)."""
        return {
            "model_id": getattr(self, "tympan_id", None),
            "sample_rate": self.sample_rate,
            "num_classes": self.num_classes,
            "activation": self.activation,
            "embedding_size": self.embedding_size,
            "frame_embedding_size": self.frame_embedding_size,
            "frame_hop_seconds": self.frame_hop_seconds,
            "window_samples": self.window_samples,
            "min_samples": self.min_samples,
            "streaming": self.streaming,
            "chunk_samples": self.chunk_samples,
            "classifier": self.classifier,
            "labels": None if self.labels is None else len(self.labels),
        }


def _drop_frontend_keys(module: nn.Module, state: dict[str, Any], prefix: str, local_metadata: Any) -> None:
    for key in [k for k in state if k.startswith(prefix + "frontend.")]:
        del state[key]


def _ignore_missing_frontend_keys(module: nn.Module, incompatible: Any) -> None:
    for key in [k for k in incompatible.missing_keys if k.split(".")[0] == "frontend" or ".frontend." in k]:
        incompatible.missing_keys.remove(key)


def audio_model(model: nn.Module) -> AudioModel:
    """``model`` itself when it implements the protocol (unwrapping DDP/compile wrappers), else a clear error."""
    inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None) or model
    if not isinstance(inner, AudioModel):
        raise TypeError(f"{type(inner).__name__} does not implement tympan's model protocol (tympan.models.AudioModel)")
    return inner


# ---------------------------------------------------------------------------------------------- helpers for families
def weighted_mean(vectors: Tensor, weights: Tensor) -> Tensor:
    """``vectors [n, W, D]`` averaged over windows with ``weights [W]`` (e.g. real frames per window)."""
    weights = weights.to(vectors.dtype).clamp(min=0)
    return (vectors * weights[None, :, None]).sum(1) / weights.sum().clamp(min=1)


def in_groups(fn: Callable[[Tensor], Any], batch: Tensor, size: int) -> list[Any]:
    """``fn`` over slices of ``batch`` (dim 0) of at most ``size`` items: bounded activation memory."""
    return [fn(part) for part in batch.split(max(1, size))]
