"""The HEAR 2021 API (``load_model``, ``get_scene_embeddings``, ``get_timestamp_embeddings``) for every tympan model.

Importable by the HEAR tooling as is (``python -m heareval.embeddings.runner tympan.hear --model PATH``); the model
id comes from ``load_model(model_id=...)``, else the ``TYMPAN_HEAR_MODEL`` environment variable, else
``dasheng-base``. Conventions, as hear-validator enforces them: 16 kHz float32 audio ``[n, samples]`` on the
model's device in, float32 out, timestamps in milliseconds on a regular grid with a hop of at most 50 ms, the first
within one hop of the start and the last within two hops of the end.

Each family gives its own frame embeddings on its native time grid (centre of the input it summarises):

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
SSAM                exactly the original ``RuntimeSSAST`` output (:meth:`SSAM.timestamp_embeddings`)  ~40 ms
==================  ======================================================================  ================

A grid coarser than 50 ms is linearly interpolated to ``hop / ceil(hop / 50)``; the output grid is every point of
that lattice inside ``[0, duration]`` (values held at the edges beyond the first/last native centre), so short and
long clips alike meet the validator's end conditions. SSAM keeps its original start-aligned timestamps.

A pretraining wrapper without a recipe of its own (MAE) is embedded through its ``encoder``.

Scene embeddings are each model's own clip embedding: the pooled vector its head reads (AST ``(cls + dist) / 2`` or
mean token, DASS ``embed``, SAT/ViT mean or cls token), averaged over windows weighted by their real frames; Dasheng
the mean token; SSAM the original's mean over rows.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

SAMPLE_RATE = 16000
MAX_HOP_MS = 50.0
MODEL_ENV = "TYMPAN_HEAR_MODEL"
DEFAULT_MODEL = "dasheng-base"
HOP_SAMPLES = 160  # 10 ms frames in every frontend
KALDI_FIRST_CENTRE_MS = 12.5  # snip_edges Kaldi frames: 25 ms windows every 10 ms
MIN_SAMPLES = 400  # one 25 ms frame

__all__ = [
    "DEFAULT_MODEL",
    "FrameEmbeddings",
    "HearModel",
    "MODEL_ENV",
    "get_scene_embeddings",
    "get_timestamp_embeddings",
    "load_model",
    "to_hear_grid",
]


@dataclass
class FrameEmbeddings:
    """A family's native output: frames ``[n, T, D]`` centred at ``first_ms + i * hop_ms``, and the clip vector."""

    frames: Tensor
    first_ms: float
    hop_ms: float
    scene: Tensor  # [n, D]


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


def _weighted_mean(vectors: Tensor, weights: Tensor) -> Tensor:
    """``vectors [n, W, D]`` averaged over windows with ``weights [W]`` (real frames per window)."""
    weights = weights.to(vectors.dtype).clamp(min=0)
    return (vectors * weights[None, :, None]).sum(1) / weights.sum().clamp(min=1)


def _in_groups(fn: Callable[[Tensor], Any], batch: Tensor, size: int) -> list[Any]:
    """``fn`` over slices of ``batch`` (dim 0) of at most ``size`` items: bounded activation memory."""
    return [fn(part) for part in batch.split(max(1, size))]


# ------------------------------------------------------------------------------------------- families
def _ast_frames(model: nn.Module, audio: Tensor, windows_per_batch: int) -> FrameEmbeddings:
    """AST/SSAST: ``input_tdim``-frame windows stepped by whole time columns; column = mean over frequency patches."""
    from tympan.features import AUDIOSET_STATS, ast_fbank
    from tympan.models.ast import NUM_PREFIX_TOKENS

    fbank = ast_fbank(audio, num_mel_bins=model.input_fdim)  # whole-clip mean removal, as the original loader
    n, frames, bins = fbank.shape
    window = model.input_tdim
    f_dim, t_dim = model.grid
    (_, tshape), (_, tstride) = model.patch_embed.patch, model.patch_embed.stride
    step = t_dim * tstride
    windows = 1 if frames <= window else math.ceil((frames - window) / step) + 1
    pad_value = -AUDIOSET_STATS[0] / (2 * AUDIOSET_STATS[1])  # a zero-padded fbank frame after normalisation
    fbank = F.pad(fbank, (0, 0, 0, (windows - 1) * step + window - frames), value=pad_value)
    stacked = fbank.unfold(1, window, step).permute(0, 1, 3, 2).reshape(n * windows, window, bins)

    def run(part: Tensor) -> tuple[Tensor, Tensor]:
        tokens = model.forward_features(part)
        columns = tokens[:, NUM_PREFIX_TOKENS:].reshape(part.shape[0], f_dim, t_dim, -1).mean(1)
        return columns, model.pool(tokens)

    columns, pooled = map(torch.cat, zip(*_in_groups(run, stacked, windows_per_batch)))
    real = frames - step * torch.arange(windows, device=audio.device)
    return FrameEmbeddings(
        frames=columns.reshape(n, windows * t_dim, -1),
        first_ms=KALDI_FIRST_CENTRE_MS + (tshape - 1) * 5.0,
        hop_ms=tstride * 10.0,
        scene=_weighted_mean(pooled.reshape(n, windows, -1), real.clamp(max=window)),
    )


def _dass_frames(model: nn.Module, audio: Tensor, windows_per_batch: int) -> FrameEmbeddings:
    """DASS: the whole clip at once; normalised last map averaged over mel. Column ``w`` is centred on frame ``32 w``
    (every stride-2 conv, kernel 3, padding 1, maps output ``i`` to input ``2 i``)."""
    from tympan.features import ast_fbank

    fbank = ast_fbank(audio, num_mel_bins=model.num_mel_bins)
    features = model.norm(model.forward_features(fbank)).mean(2).transpose(1, 2)  # [n, W, C]
    stride = 2 ** (1 + len(model.layers))  # stem /4, then /2 per downsampling stage
    return FrameEmbeddings(features, KALDI_FIRST_CENTRE_MS, stride * 10.0, features.mean(1))


def _per_clip_spec(model: nn.Module, audio: Tensor) -> Tensor:
    """Dasheng/SAT log-mel, one frontend call per clip (the dB floor of a batch-1 call), then ``init_bn``."""
    return model.normalize(torch.cat([model.front_end(row[None]) for row in audio]))


def _time_columns(model: nn.Module, tokens: Tensor) -> Tensor:
    """Tokens ``[B, (cls) + F * t, D]`` (frequency-major) -> per time column mean over frequency ``[B, t, D]``."""
    if model.pooling == "token":
        tokens = tokens[:, 1:]
    return tokens.reshape(tokens.shape[0], model.freq_patches, -1, tokens.shape[-1]).mean(1)


def _dasheng_frames(model: nn.Module, audio: Tensor, windows_per_batch: int) -> FrameEmbeddings:
    """Dasheng: its tokens (40 ms, centred STFT frames ``4j .. 4j+3``), the spectrogram fed in whole-piece groups."""
    spec = _per_clip_spec(model, audio)
    group = model.target_length * max(1, windows_per_batch // max(1, audio.shape[0]))
    tokens = torch.cat([model.forward_features(part) for part in spec.split(group, dim=-1)
                        if part.shape[-1] >= model.min_frames], dim=1)
    frames = model.patch_size[1]
    return FrameEmbeddings(tokens, (frames - 1) * 5.0, frames * 10.0, tokens.mean(1))


def _vit_frames(model: nn.Module, audio: Tensor, windows_per_batch: int) -> FrameEmbeddings:
    """SAT-repo ViT: whole-clip spectrogram cut into ``time_patches * 16``-frame windows (last zero-padded)."""
    spec = _per_clip_spec(model, audio)
    n, bins, frames = spec.shape
    patch = model.patch_size[1]
    window = model.time_patches * patch
    windows = max(1, math.ceil(frames / window))
    spec = F.pad(spec, (0, windows * window - frames))
    stacked = spec.unflatten(-1, (windows, window)).transpose(1, 2).reshape(n * windows, bins, window)

    def run(part: Tensor) -> tuple[Tensor, Tensor]:
        tokens = model.encode(model.add_positions(model.patchify(part)))
        return _time_columns(model, tokens), model.pool(tokens)

    columns, pooled = map(torch.cat, zip(*_in_groups(run, stacked, windows_per_batch)))
    real = (frames - window * torch.arange(windows, device=audio.device)).clamp(max=window)
    return FrameEmbeddings(
        columns.reshape(n, windows * model.time_patches, -1),
        (patch - 1) * 5.0,
        patch * 10.0,
        _weighted_mean(pooled.reshape(n, windows, -1), real),
    )


def _sat_frames(model: nn.Module, audio: Tensor, windows_per_batch: int) -> FrameEmbeddings:
    """SAT: ``target_length``-frame chunks in order, each with its own spectrogram (as ``inference.py``), the memory
    carried from the original's silence memory; a final partial chunk is read without updating the memory."""
    chunk = model.chunk_samples
    patch = model.patch_size[1]
    cache = model.initial_cache(audio.shape[0])
    columns, pooled, weights = [], [], []
    for start in range(0, audio.shape[1], chunk):
        piece = audio[:, start:start + chunk]
        if piece.shape[1] // HOP_SAMPLES + 1 < patch:  # too short for one patch: the grid holds the last value
            break
        tokens, new_cache = model.forward_features(_per_clip_spec(model, piece), cache)
        if piece.shape[1] == chunk:
            cache = new_cache
        columns.append(_time_columns(model, tokens))
        pooled.append(model.pool(tokens))
        weights.append(piece.shape[1])
    if not columns:
        raise ValueError(f"audio of {audio.shape[1]} samples is too short for one {patch}-frame SAT patch")
    scene = _weighted_mean(torch.stack(pooled, 1), torch.tensor(weights, device=audio.device))
    return FrameEmbeddings(torch.cat(columns, 1), (patch - 1) * 5.0, patch * 10.0, scene)


def _family_function(model: nn.Module) -> Callable[[nn.Module, Tensor, int], FrameEmbeddings] | None:
    from tympan.models.ast import ASTModel
    from tympan.models.audiotransformer import AudioTransformer
    from tympan.models.dasheng import Dasheng
    from tympan.models.dass import DASS
    from tympan.models.sat import SAT

    for cls, fn in ((ASTModel, _ast_frames), (DASS, _dass_frames), (Dasheng, _dasheng_frames), (SAT, _sat_frames),
                    (AudioTransformer, _vit_frames)):  # fmt: skip
        if isinstance(model, cls):
            return fn
    return None


def _embedding_size(model: nn.Module) -> int:
    for attr in ("output_dim", "num_features", "embed_dim"):  # SSAM, DASS, transformers
        value = getattr(model, attr, None)
        if isinstance(value, int):
            return value
    raise ValueError(f"{type(model).__name__}: cannot tell its embedding size")


# ------------------------------------------------------------------------------------------------ API
class HearModel(nn.Module):
    """A tympan model behind the HEAR contract (``sample_rate``, ``scene_embedding_size``, ``timestamp_embedding_size``).

    ``windows_per_batch`` bounds how many model windows (clips x windows) run through the model at once.
    """

    sample_rate = SAMPLE_RATE

    def __init__(self, model: nn.Module, windows_per_batch: int = 16):
        super().__init__()
        from tympan.models.ssam import SSAM

        model_id = getattr(model, "tympan_id", type(model).__name__)
        encoder = getattr(model, "encoder", None)
        if _family_function(model) is None and isinstance(encoder, nn.Module):  # pretraining wrappers (MAE)
            model = encoder
        self.model = model.eval()
        self.is_ssam = isinstance(model, SSAM)
        self.family_fn = None if self.is_ssam else _family_function(model)
        if not self.is_ssam and self.family_fn is None:
            raise ValueError(f"{type(model).__name__} has no HEAR embedding recipe in tympan.hear")
        self.windows_per_batch = windows_per_batch
        self.scene_embedding_size = self.timestamp_embedding_size = _embedding_size(model)
        self.model_id = model_id

    @property
    def device(self) -> torch.device:
        param = next(self.model.parameters(), None)
        return param.device if param is not None else torch.device("cpu")

    def _prepare(self, audio: Tensor) -> Tensor:
        if not isinstance(audio, Tensor):
            raise TypeError(f"audio must be a torch.Tensor [n_sounds, n_samples], got {type(audio).__name__}")
        if audio.ndim != 2 or audio.shape[0] == 0:
            raise ValueError(f"audio must be [n_sounds, n_samples], got shape {tuple(audio.shape)}")
        if audio.shape[1] < MIN_SAMPLES:
            raise ValueError(f"audio of {audio.shape[1]} samples is shorter than one 25 ms frame ({MIN_SAMPLES})")
        return audio.to(self.device, torch.float32)

    def frame_embeddings(self, audio: Tensor) -> FrameEmbeddings:
        """The family's native frames and clip vector (not available for SSAM, whose HEAR output is the original's)."""
        if self.family_fn is None:
            raise ValueError("SSAM's HEAR output is its original wrapper's; use timestamp_embeddings")
        with torch.no_grad():
            return self.family_fn(self.model, self._prepare(audio), self.windows_per_batch)

    def timestamp_embeddings(self, audio: Tensor) -> tuple[Tensor, Tensor]:
        audio = self._prepare(audio)
        with torch.no_grad():
            if self.is_ssam:
                embeddings, timestamps = self.model.timestamp_embeddings(audio)
                return embeddings.float(), timestamps.to(embeddings.device)
            native = self.family_fn(self.model, audio, self.windows_per_batch)
        duration_ms = audio.shape[1] / SAMPLE_RATE * 1000.0
        return to_hear_grid(native.frames, native.first_ms, native.hop_ms, duration_ms)

    def scene_embeddings(self, audio: Tensor) -> Tensor:
        audio = self._prepare(audio)
        with torch.no_grad():
            if self.is_ssam:
                return self.model.scene_embeddings(audio).float()
            return self.family_fn(self.model, audio, self.windows_per_batch).scene.float()

    def forward(self, audio: Tensor) -> Tensor:
        return self.scene_embeddings(audio)


def load_model(model_file_path: str = "", model_id: str | None = None, pretrained: bool = True,
               **overrides: Any) -> HearModel:
    """HEAR ``load_model``: ``model_file_path`` is a checkpoint (official layout or ours), or ``""`` for the
    official weights of ``model_id`` (default: ``$TYMPAN_HEAR_MODEL``, else ``dasheng-base``); with ``""`` and
    ``pretrained=False`` the model keeps its random initialisation (a sanity floor for probes).

    ``overrides`` change the model config (as :func:`tympan.load`); ``windows_per_batch`` is the wrapper's own.
    """
    import tympan

    windows_per_batch = overrides.pop("windows_per_batch", 16)
    model_id = model_id or os.environ.get(MODEL_ENV) or DEFAULT_MODEL
    path = str(model_file_path or "")
    if path and not os.path.exists(path):
        raise FileNotFoundError(f"{path}: checkpoint not found")
    if path or pretrained:
        model = tympan.load(model_id, checkpoint=path or None, **overrides)
    else:
        model = tympan.create_model(model_id, **overrides).eval()
    return HearModel(model, windows_per_batch=windows_per_batch)


def _as_hear_model(model: nn.Module) -> HearModel:
    return model if isinstance(model, HearModel) else HearModel(model)


def get_scene_embeddings(audio: Tensor, model: nn.Module) -> Tensor:
    """HEAR ``get_scene_embeddings``: ``[n_sounds, n_samples]`` -> float32 ``[n_sounds, scene_embedding_size]``."""
    return _as_hear_model(model).scene_embeddings(audio)


def get_timestamp_embeddings(audio: Tensor, model: nn.Module) -> tuple[Tensor, Tensor]:
    """HEAR ``get_timestamp_embeddings``: -> (float32 ``[n, T, timestamp_embedding_size]``, float32 ms ``[n, T]``)."""
    return _as_hear_model(model).timestamp_embeddings(audio)
