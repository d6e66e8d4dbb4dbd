"""TymNet: the default model, a small depthwise-separable CNN on YAMNet's 0.96 s log-mel patches.

Distilled from YAMNet (521 AudioSet classes) on audio built here (``recipes/default_model.yaml``): per 0.96 s patch
(hop 0.48 s) it predicts the teacher's class scores and, through a projection, its 1024-d embedding.

* frontend (:class:`YAMNetLogMel`): YAMNet's own log-mel (``tympan.teachers.yamnet``) in float32 torch: zero-pad to
  >= 15,600 samples and to whole 0.48 s hops, 25 ms periodic Hann / 10 ms hop / 512-point STFT magnitude, 64 HTK mel
  bands 125-7500 Hz (a buffer, so it exports), ``log(mel + 0.001)``: ``[B, N] -> [B, frames, 64]``.
* model: patches of 96 frames with a 48-frame hop, each through depthwise-separable
  blocks (MobileNet-v1 style, BatchNorm + ReLU) after a 4x4-tile stem, global average pool -> ``embedding`` -> 521 logits.
  Clip logits are ``logit(mean_patches sigmoid(patch logits))``, so clip probabilities are YAMNet-style means.
* embeddings: frame = per-patch embedding (hop 0.48 s, first centre 0.4875 s); scene = mean over patches.
* streaming: ``chunk_samples = 7,680`` (0.48 s); the state is the previous 7,920 samples, so each step sees exactly
  one 15,600-sample patch: step ``k`` equals patch ``k`` of the whole clip left-padded with 7,920 zeros.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tympan.errors import CheckpointError
from tympan.models.protocol import AudioModel, Embeddings, State, in_groups
from tympan.models.registry import ModelEntry, Weights, register_model

__all__ = ["ChecksumError", "DSBlock", "LABELS_CSV", "TymNet", "YAMNetLogMel", "load_shipped"]

SAMPLE_RATE = 16000
WINDOW, HOP, NFFT, NUM_MELS = 400, 160, 512, 64
PATCH_FRAMES, PATCH_HOP_FRAMES = 96, 48
PATCH_HOP_SAMPLES = PATCH_HOP_FRAMES * HOP  # 7680
MIN_SAMPLES = (PATCH_FRAMES - 1) * HOP + WINDOW  # 15600
LOG_OFFSET = 0.001
LABELS_CSV = Path(__file__).resolve().parent.parent / "assets" / "tymnet_labels.csv"


def _mel_matrix() -> Tensor:
    """``[257, 64]`` YAMNet/TF HTK mel triangles (DC row zeroed), float32."""
    bins = torch.linspace(0.0, SAMPLE_RATE / 2, NFFT // 2 + 1, dtype=torch.float64)[1:]
    hz_to_mel = lambda hz: 1127.0 * torch.log1p(hz / 700.0)  # noqa: E731
    bin_mels = hz_to_mel(bins)[:, None]
    # scalar edges in Python floats: no tensor -> float round trip, so the model also builds on the meta device
    edges = torch.linspace(1127.0 * math.log1p(125.0 / 700.0), 1127.0 * math.log1p(7500.0 / 700.0), NUM_MELS + 2,
                           dtype=torch.float64)  # fmt: skip
    lower, centre, upper = edges[:-2], edges[1:-1], edges[2:]
    weights = torch.clamp(torch.minimum((bin_mels - lower) / (centre - lower), (upper - bin_mels) / (upper - centre)), min=0)
    return torch.cat([torch.zeros(1, NUM_MELS, dtype=torch.float64), weights]).float()


def padded_length(num_samples: int) -> int:
    """YAMNet's padding rule: >= 15,600 samples, then a whole number of 7,680-sample hops after the first patch."""
    length = max(num_samples, MIN_SAMPLES)
    hops = -(-(length - MIN_SAMPLES) // PATCH_HOP_SAMPLES)
    return MIN_SAMPLES + hops * PATCH_HOP_SAMPLES


class YAMNetLogMel(nn.Module):
    """16 kHz waveform ``[B, N]`` -> YAMNet log-mel ``[B, frames, 64]`` (float32; see the module docstring).

    ``dft="fft"`` uses ``torch.fft.rfft``; ``dft="matmul"`` a real DFT basis (a buffer), for exporters without FFT.
    ``pad=False`` skips YAMNet's padding (streaming steps pass exactly one patch of samples).
    """

    def __init__(self, dft: str = "fft", pad: bool = True) -> None:
        super().__init__()
        if dft not in ("fft", "matmul"):
            raise ValueError(f"dft must be 'fft' or 'matmul', got {dft!r}")
        self.dft, self.pad = dft, pad
        n = torch.arange(WINDOW, dtype=torch.float64)
        window = 0.5 - 0.5 * torch.cos(2 * math.pi * n / WINDOW)
        self.register_buffer("window", window.float(), persistent=False)
        self.register_buffer("mel", _mel_matrix(), persistent=False)
        k = torch.arange(NFFT // 2 + 1, dtype=torch.float64)
        angle = 2 * math.pi * n[:, None] * k[None, :] / NFFT
        basis = torch.cat([torch.cos(angle), -torch.sin(angle)], 1) * window[:, None]
        self.register_buffer("basis", basis.float(), persistent=False)

    def forward(self, waveform: Tensor) -> Tensor:
        if waveform.dim() == 1:
            waveform = waveform[None]
        waveform = waveform.float()
        if self.pad:
            waveform = F.pad(waveform, (0, padded_length(waveform.shape[-1]) - waveform.shape[-1]))
        frames = waveform.unfold(-1, WINDOW, HOP)  # [B, T, 400]
        if self.dft == "fft":
            magnitude = torch.fft.rfft(frames * self.window, n=NFFT).abs()
        else:
            spec = frames @ self.basis
            half = spec.shape[-1] // 2
            magnitude = torch.sqrt(spec[..., :half] ** 2 + spec[..., half:] ** 2)
        return torch.log(magnitude @ self.mel + LOG_OFFSET)


class DSBlock(nn.Module):
    """Depthwise 3x3 (stride s) + BN + ReLU, pointwise 1x1 + BN + ReLU (MobileNet v1)."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.dw = nn.Conv2d(cin, cin, 3, stride, 1, groups=cin, bias=False)
        self.bn1 = nn.BatchNorm2d(cin)
        self.pw = nn.Conv2d(cin, cout, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.bn2(self.pw(F.relu(self.bn1(self.dw(x))))))


class TymNet(AudioModel):
    """Patch CNN with a 521-class head and a YAMNet-embedding projection; see the module docstring.

    Args:
        channels: stem width then each block's output width.
        strides: each block's stride.
        stem_stride: 4 (4x4 tiles) or 2 (3x3 conv).
        num_classes: head size (YAMNet's 521).
        teacher_dim: size of the projection that predicts the teacher's embedding (0: none).
        embedding: what ``embed`` returns per patch: ``"projection"`` (the predicted 1024-d YAMNet embedding) or
            ``"backbone"`` (the pooled CNN features).
    """

    streaming = True
    chunk_samples = PATCH_HOP_SAMPLES
    min_samples = 1
    window_samples = None
    frame_hop_seconds = PATCH_HOP_SAMPLES / SAMPLE_RATE
    first_frame_seconds = MIN_SAMPLES / 2 / SAMPLE_RATE

    def __init__(self, channels: tuple[int, ...] = (32, 64, 128, 128, 256, 256, 512),
                 strides: tuple[int, ...] = (2, 1, 2, 1, 2, 1), stem_stride: int = 4, num_classes: int = 521,
                 teacher_dim: int = 1024, embedding: str = "projection", dft: str = "fft") -> None:  # fmt: skip
        super().__init__()
        if len(channels) != len(strides) + 1:
            raise ValueError(f"{len(channels)} channels need {len(channels) - 1} strides, got {len(strides)}")
        if embedding not in ("projection", "backbone") or (embedding == "projection" and not teacher_dim):
            raise ValueError(f"embedding must be 'projection' (with teacher_dim) or 'backbone', got {embedding!r}")
        self.frontend = YAMNetLogMel(dft=dft)
        # stride 4: non-overlapping 4x4 log-mel tiles (cheap: a 1-channel conv at full resolution is the slowest
        # layer on CPU); stride 2: a 3x3 conv
        kernel = 4 if stem_stride == 4 else 3
        self.stem = nn.Conv2d(1, channels[0], kernel, stem_stride, 0 if stem_stride == 4 else 1, bias=False)
        self.stem_bn = nn.BatchNorm2d(channels[0])
        self.blocks = nn.Sequential(*(DSBlock(a, b, s) for a, b, s in zip(channels[:-1], channels[1:], strides)))
        self.num_classes = num_classes
        self.head = nn.Linear(channels[-1], num_classes)
        self.projection = nn.Linear(channels[-1], teacher_dim) if teacher_dim else None
        self.embedding_kind = embedding
        self.embedding_size = self.frame_embedding_size = teacher_dim if embedding == "projection" else channels[-1]
        self.label_source = str(LABELS_CSV) if num_classes == 521 and LABELS_CSV.is_file() else None
        self.classifier = "head"
        self.block_types = (DSBlock,)
        self.to(memory_format=torch.channels_last)  # oneDNN's depthwise convolutions are ~2x faster in NHWC

    # ----------------------------------------------------------------------------------------- patches
    @staticmethod
    def patches(features: Tensor) -> Tensor:
        """Log-mel ``[B, T, 64]`` -> patches ``[B, n, 96, 64]`` (96 frames, hop 48; at least one, zero-padded)."""
        if features.shape[1] < PATCH_FRAMES:
            features = F.pad(features, (0, 0, 0, PATCH_FRAMES - features.shape[1]), value=math.log(LOG_OFFSET))
        return features.unfold(1, PATCH_FRAMES, PATCH_HOP_FRAMES).transpose(-1, -2)

    def backbone(self, patches: Tensor) -> Tensor:
        """Patches ``[P, 96, 64]`` -> pooled features ``[P, channels[-1]]``."""
        # explicitly NHWC like the weights: with an ambiguous 1-channel layout oneDNN can fall back to a path that is
        # hundreds of times slower (seen under torch.inference_mode)
        x = F.relu(self.stem_bn(self.stem(patches[:, None].contiguous(memory_format=torch.channels_last))))
        return self.blocks(x).mean((-2, -1))

    def patch_outputs(self, patches: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        """Patches ``[P, 96, 64]`` -> (logits ``[P, C]``, pooled features, projected teacher embedding or None)."""
        pooled = self.backbone(patches)
        projected = self.projection(pooled) if self.projection is not None else None
        return self.head(pooled), pooled, projected

    def _per_patch(self, features: Tensor, windows_per_batch: int) -> tuple[Tensor, Tensor]:
        batch = features.shape[0]
        patches = self.patches(features)
        count = patches.shape[1]
        flat = patches.reshape(-1, PATCH_FRAMES, NUM_MELS)
        outs = in_groups(lambda p: self.patch_outputs(p), flat, max(1, windows_per_batch) * 16)
        logits = torch.cat([o[0] for o in outs]).view(batch, count, -1)
        key = 2 if self.embedding_kind == "projection" else 1
        emb = torch.cat([o[key] for o in outs]).view(batch, count, -1)
        return logits, emb

    # ----------------------------------------------------------------------------------------- protocol
    def forward(self, features: Tensor) -> Tensor:
        """Log-mel ``[B, T, 64]`` -> clip logits ``[B, C]`` = ``logit(mean over patches of sigmoid)``."""
        patches = self.patches(features)
        batch, count = patches.shape[:2]
        flat = patches.reshape(-1, PATCH_FRAMES, NUM_MELS)
        logits = torch.cat([self.head(self.backbone(p)) for p in flat.split(512)]).view(batch, count, -1)
        return torch.logit(torch.sigmoid(logits).mean(1), eps=1e-6)

    def frame_logits(self, features: Tensor) -> Tensor:
        """Log-mel ``[B, T, 64]`` -> per-patch logits ``[B, n, C]`` (one every 0.48 s)."""
        return self._per_patch(features, 64)[0]

    def embed(self, features: Tensor, windows_per_batch: int = 16) -> Embeddings:
        _, emb = self._per_patch(features, windows_per_batch)
        return Embeddings(emb.mean(1), emb, self.frame_hop_seconds, self.first_frame_seconds)

    def init_state(self, batch: int = 1, warm: bool = True) -> State:
        """The previous ``15,600 - 7,680`` samples (zeros: silence before the stream starts)."""
        device = self.head.weight.device
        return (torch.zeros(batch, MIN_SAMPLES - PATCH_HOP_SAMPLES, device=device),)

    def step(self, chunk: Tensor, state: State) -> tuple[Tensor, State]:
        """``[B, 7680]`` new samples -> logits ``[B, C]`` of the 0.96 s patch ending with them, and the new state."""
        if chunk.shape[-1] != self.chunk_samples:
            raise ValueError(f"step takes chunks of {self.chunk_samples} samples, got {chunk.shape[-1]}")
        samples = torch.cat([state[0], chunk.float()], -1)
        features = self.frontend(samples)  # exactly 96 frames: no padding needed
        logits = self.head(self.backbone(features[:, :PATCH_FRAMES]))
        return logits, (samples[:, PATCH_HOP_SAMPLES:],)


def _build(**config: Any) -> TymNet:
    return TymNet(**config)


WEIGHTS_FILE = Path(__file__).resolve().parent.parent / "assets" / "tymnet-s.safetensors"
# SHA-256 of the shipped weights (package data); set when recipes/default_model/ship.py ships a new file
SHIPPED_SHA256: str | None = "af951dcc55ae0a49c292b41349d535d31c3bf1e368ea026079ab735071056943"


def _shipped_weights() -> Weights | None:
    """The package-data weights (resolved offline, SHA-256 checked by :mod:`tympan.checkpoints`), once shipped."""
    if SHIPPED_SHA256 is None or not WEIGHTS_FILE.is_file():
        return None
    return Weights(url=f"package://tympan/assets/{WEIGHTS_FILE.name}", sha256=SHIPPED_SHA256,
                   license="BSD-3-Clause (tympan); training-data licences: NOTICE.tymnet-s.md",
                   notes="distilled from YAMNet's outputs; no teacher weights included")  # fmt: skip


register_model(
    ModelEntry(
        name="tymnet-s",
        family="tymnet",
        build=_build,
        config=dict(channels=(32, 64, 128, 128, 256, 256, 512), strides=(2, 1, 2, 1, 2, 1), stem_stride=4,
                    num_classes=521, teacher_dim=1024, embedding="projection"),  # fmt: skip
        weights=_shipped_weights(),
        description="TymNet-S: 0.5 M-parameter streaming CNN (+0.5 M embedding projection) distilled from YAMNet on Debian/CC audio (default model)",
        labels=str(LABELS_CSV),
        input_shape=(1, PATCH_FRAMES, NUM_MELS),
        classifier="head",
        block_types=(DSBlock,),
        test_config=dict(channels=(8, 8, 16, 16, 16, 16, 16), strides=(2, 1, 2, 1, 2, 1), teacher_dim=32),
    )
)


# ------------------------------------------------------------------------------------------ shipped weights
class ChecksumError(CheckpointError):
    """A weights file whose SHA-256 differs from the one expected for it."""


def load_shipped(weights: str | Path | None = None, sha256: str | None = None, **overrides: Any) -> TymNet:
    """The shipped default model (or another tymnet-s safetensors file), its SHA-256 checked before its tensors are
    read (against `sha256`, by default the registered :data:`SHIPPED_SHA256`); a changed file raises
    :class:`ChecksumError`. Loading itself is :func:`tympan.load`'s (validated sidecar, strict keys, labels)."""
    from tympan.checkpoints import load, sha256sum

    path = Path(weights) if weights is not None else WEIGHTS_FILE
    expected = sha256 if sha256 is not None else SHIPPED_SHA256
    if expected is None:
        raise ChecksumError(f"{path}: no SHA-256 to check it against (the default model is not shipped yet)")
    if (digest := sha256sum(path)) != expected:
        raise ChecksumError(f"{path}: SHA-256 {digest} does not match the expected {expected}")
    return load(path, **overrides)
