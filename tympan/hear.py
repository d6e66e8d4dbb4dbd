"""The HEAR 2021 API (``load_model``, ``get_scene_embeddings``, ``get_timestamp_embeddings``) for every tympan model.

Importable by the HEAR tooling as is (``python -m heareval.embeddings.runner tympan.hear --model PATH``); the model
id comes from ``load_model(model_id=...)``, else the ``TYMPAN_HEAR_MODEL`` environment variable, else
``dasheng-base``. Conventions, as hear-validator enforces them: 16 kHz float32 audio ``[n, samples]`` on the
model's device in, float32 out, timestamps in milliseconds on a regular grid with a hop of at most 50 ms, the first
within one hop of the start and the last within two hops of the end.

Every model gives its frame embeddings through the model protocol (:meth:`tympan.models.AudioModel.embed_waveform`),
on its native time grid (the centre of the input each frame summarises); the families' recipes live in their model
modules:

==================  ======================================================================  ================
family              frame embedding                                                         native hop
==================  ======================================================================  ================
AST / SSAST         patch tokens averaged over the frequency patches of each time column;   ``tstride`` x 10 ms
                    windows of ``input_tdim`` frames stepped by whole columns (no overlap
                    in columns), the last padded as the original loader pads
DASS                last feature map after the head's channel LayerNorm, averaged over mel  320 ms
                    (the whole clip in one pass: no positional embedding)
Dasheng             its 40 ms tokens (252-token pieces, as the model runs long inputs)      40 ms
AudioTransformer    16x16-patch tokens averaged over frequency, 1008-frame windows          160 ms
SAT                 the same, streamed chunk by chunk with the model's memory               160 ms
SSAM                exactly the original ``RuntimeSSAST`` output                            ~40 ms
==================  ======================================================================  ================

A grid coarser than 50 ms, or not anchored at 0, is linearly interpolated to ``hop / ceil(hop / 50)``; the output
grid is every point of that lattice inside ``[0, duration]`` (values held at the edges beyond the first/last native
centre), so short and long clips alike meet the validator's end conditions. A grid that starts at 0 with a hop of at
most 50 ms (SSAM's start-aligned rows) is already such a lattice and is kept as it is.

A pretraining wrapper (MAE) embeds through its encoder. Scene embeddings are each model's own clip embedding
(``Embeddings.scene``): the pooled vector its head reads, averaged over windows weighted by their real frames.
"""

from __future__ import annotations

import math
import os
from typing import Any

import torch
from torch import Tensor, nn

from tympan.models.protocol import Embeddings, audio_model

SAMPLE_RATE = 16000
MAX_HOP_MS = 50.0
MODEL_ENV = "TYMPAN_HEAR_MODEL"
from tympan.models.registry import DEFAULT_MODEL  # noqa: E402  (the shipped default, offline)
MIN_SAMPLES = 400  # one 25 ms frame

__all__ = [
    "DEFAULT_MODEL",
    "HearModel",
    "MODEL_ENV",
    "get_scene_embeddings",
    "get_timestamp_embeddings",
    "load_model",
    "to_hear_grid",
]


# ------------------------------------------------------------------------------------------------- grid
def to_hear_grid(
    frames: Tensor, first_ms: float, hop_ms: float, duration_ms: float, max_hop_ms: float = MAX_HOP_MS
) -> tuple[Tensor, Tensor]:
    """Native frames on ``first_ms + i * hop_ms`` -> (embeddings ``[n, T', D]``, timestamps ``[n, T']`` ms).

    The output lattice has hop ``hop_ms / ceil(hop_ms / max_hop_ms)`` and holds every lattice point in
    ``[0, duration_ms]`` (at least one); values are linear interpolations of the native frames, held constant
    before the first and after the last native centre.
    """
    n, count, _ = frames.shape
    if count == 0:
        raise ValueError("the model produced no frames for this input")
    factor = max(1, math.ceil(hop_ms / max_hop_ms - 1e-9))
    hop = hop_ms / factor
    start = first_ms % hop
    points = max(1, math.floor((duration_ms - start) / hop + 1e-9) + 1)
    times = (start + hop * torch.arange(points, dtype=torch.float64, device=frames.device)).clamp(max=duration_ms)
    position = ((times - first_ms) / hop_ms).clamp(0, count - 1)
    low = position.floor().long()
    high = (low + 1).clamp(max=count - 1)
    weight = (position - low).to(frames.dtype)[None, :, None]
    embeddings = frames[:, low] * (1 - weight) + frames[:, high] * weight
    return embeddings.float(), times.float().expand(n, -1).contiguous()


# ------------------------------------------------------------------------------------------------ API
class HearModel(nn.Module):
    """A tympan model behind the HEAR contract (``sample_rate``, ``scene_embedding_size``, ``timestamp_embedding_size``).

    ``windows_per_batch`` bounds how many model windows (clips x windows) run through the model at once.
    """

    sample_rate = SAMPLE_RATE

    def __init__(self, model: nn.Module, windows_per_batch: int = 16):
        super().__init__()
        model = audio_model(model)
        self.model_id = getattr(model, "tympan_id", type(model).__name__)
        self.model = model.eval()
        self.windows_per_batch = windows_per_batch
        self.scene_embedding_size = model.embedding_size
        self.timestamp_embedding_size = model.frame_embedding_size

    @property
    def device(self) -> torch.device:
        return self.model.device()

    def _prepare(self, audio: Tensor) -> Tensor:
        if not isinstance(audio, Tensor):
            raise TypeError(f"audio must be a torch.Tensor [n_sounds, n_samples], got {type(audio).__name__}")
        if audio.ndim != 2 or audio.shape[0] == 0:
            raise ValueError(f"audio must be [n_sounds, n_samples], got shape {tuple(audio.shape)}")
        if audio.shape[1] < MIN_SAMPLES:
            raise ValueError(f"audio of {audio.shape[1]} samples is shorter than one 25 ms frame ({MIN_SAMPLES})")
        return audio.to(self.device, torch.float32)

    def frame_embeddings(self, audio: Tensor) -> Embeddings:
        """The model's native frames (and grid) and its clip vector."""
        with torch.no_grad():
            return self.model.embed_waveform(self._prepare(audio), self.windows_per_batch)

    def timestamp_embeddings(self, audio: Tensor) -> tuple[Tensor, Tensor]:
        audio = self._prepare(audio)
        with torch.no_grad():
            native = self.model.embed_waveform(audio, self.windows_per_batch)
        hop_ms, first_ms = native.frame_hop_seconds * 1000.0, native.first_frame_seconds * 1000.0
        if first_ms == 0.0 and hop_ms <= MAX_HOP_MS:  # already a HEAR lattice (SSAM's original timestamps)
            timestamps = (native.timestamps() * 1000.0).to(torch.float32).to(audio.device)
            return native.frames.float(), timestamps.expand(audio.shape[0], -1).contiguous()
        duration_ms = audio.shape[1] / SAMPLE_RATE * 1000.0
        return to_hear_grid(native.frames, first_ms, hop_ms, duration_ms)

    def scene_embeddings(self, audio: Tensor) -> Tensor:
        audio = self._prepare(audio)
        with torch.no_grad():
            return self.model.embed_waveform(audio, self.windows_per_batch).scene.float()

    def forward(self, audio: Tensor) -> Tensor:
        return self.scene_embeddings(audio)


def load_model(model_file_path: str = "", model_id: str | None = None, pretrained: bool = True,
               **overrides: Any) -> HearModel:
    """HEAR ``load_model``: ``model_file_path`` is a checkpoint (official layout or ours), or ``""`` for the
    official weights of ``model_id`` (default: ``$TYMPAN_HEAR_MODEL``, else ``dasheng-base``); with ``""`` and
    ``pretrained=False`` the model keeps its random initialisation (a sanity floor for probes).

    ``overrides`` change the model config (as :func:`tympan.load`); ``windows_per_batch`` and ``precision``
    (``fp32``, ``bf16`` or ``int8``: :func:`tympan.inference.precision.with_precision`) are the wrapper's own.
    """
    import tympan
    from tympan.inference.precision import with_precision

    windows_per_batch = overrides.pop("windows_per_batch", 16)
    precision = overrides.pop("precision", "fp32")
    model_id = model_id or os.environ.get(MODEL_ENV) or DEFAULT_MODEL
    path = str(model_file_path or "")
    if path and not os.path.exists(path):
        raise FileNotFoundError(f"{path}: checkpoint not found")
    if path or pretrained:
        model = tympan.load(model_id, checkpoint=path or None, **overrides)
    else:
        model = tympan.create_model(model_id, **overrides).eval()
    return HearModel(with_precision(model, precision), windows_per_batch=windows_per_batch)


def _as_hear_model(model: nn.Module) -> HearModel:
    return model if isinstance(model, HearModel) else HearModel(model)


def get_scene_embeddings(audio: Tensor, model: nn.Module) -> Tensor:
    """HEAR ``get_scene_embeddings``: ``[n_sounds, n_samples]`` -> float32 ``[n_sounds, scene_embedding_size]``."""
    return _as_hear_model(model).scene_embeddings(audio)


def get_timestamp_embeddings(audio: Tensor, model: nn.Module) -> tuple[Tensor, Tensor]:
    """HEAR ``get_timestamp_embeddings``: -> (float32 ``[n, T, timestamp_embedding_size]``, float32 ms ``[n, T]``)."""
    return _as_hear_model(model).timestamp_embeddings(audio)
