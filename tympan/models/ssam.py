"""SSAM: Self-Supervised Audio Mamba (Yadav & Tan, Interspeech 2024), encoder and HEAR-style embeddings.

The encoder (``MambaSSAST`` in the original) reads a per-clip standardised log-mel chunk ``[B, 1, 200, 80]``
(time-major; :func:`tympan.features.get_frontend` ``("ssam-mel")``), cuts it into 4-frame x 16-bin patches
(50 x 5 = 250 tokens, ordered time-major: index ``t * 5 + f``), adds a fixed 2-D sin-cos table, prepends a cls
token and runs ``depth`` Mamba-1 mixers in the Mamba-LM residual arrangement
(``r_{i+1} = r_i + mixer_i(LN_i(r_i))``, final LayerNorm, eps 1e-6). Each block scans the sequence once,
left to right: SSAM is unidirectional (the spec and the reference fixtures agree; no flipped pass exists).

**Output regrouping quirk, kept literally.** ``forward_features`` drops the cls output and applies the
original's ``'b (f t) d -> b t (f d)'`` with ``f = 5, t = 50``. Tokens are really ordered ``(t f)``, so output
row ``j``, slot ``k`` holds token ``k * 50 + j`` -- time ``10k + j // 5``, frequency ``j % 5`` -- and rows are
not time frames. Every released downstream number was computed on this layout, so we reproduce it.

HEAR embeddings (:meth:`SSAM.timestamp_embeddings`, :meth:`SSAM.scene_embeddings`) follow the original
``RuntimeSSAST``: whole-clip log-mel, zero-pad at the end by ``200 - T % 200`` frames (a whole extra chunk when
``T`` is already a multiple of 200), encode each 200-frame chunk, concatenate, drop the last
``floor(50 * pad / 200)`` rows, timestamps ``i * duration / n`` in ms (start-aligned), scene = mean over rows.

Parameter names equal the official checkpoints' (``patch_embed.proj``, ``cls_token``, ``pos_embed``,
``blocks.<i>.norm``, ``blocks.<i>.mixer.*``, ``encoder_norm``); the converter drops the pretraining-only
``mask_token`` and ``pred.*`` head.

Protocol: ``frontend`` is the ``ssam-mel`` recipe (a submodule; frontends hold no weights, so the state dict is the
original's); ``embed`` is the HEAR path above on features of any length (rows about 40 ms apart, start-aligned);
:meth:`SSAM.embed_waveform` gives them the original's exact spacing ``duration / rows``.
"""

from __future__ import annotations

import math
import re
from typing import Sequence

import numpy as np
import torch
from torch import Tensor, nn

from tympan.models.mamba import MambaMixer
from tympan.models.protocol import AudioModel, Embeddings
from tympan.models.registry import ModelEntry, StateDict, register_model

_PRETRAINING_ONLY = re.compile(r"^(mask_token$|pred\.)")


def sincos_pos_embed_2d(dim: int, grid_rows: int, grid_cols: int, cls_token: bool = True) -> Tensor:
    """MAE-style fixed 2-D sin-cos table ``[1, (cls +) rows * cols, dim]`` (float32, row-major positions).

    The first ``dim / 2`` channels encode the column index, the last ``dim / 2`` the row index; each half is
    ``[sin(p * w_k), cos(p * w_k)]`` with ``w_k = 10000^(-k / (dim / 4))``. The cls row is zeros.
    """
    if dim % 4:
        raise ValueError(f"sin-cos positional embedding needs a dim divisible by 4, got {dim}")
    omega = 1.0 / 10000 ** (np.arange(dim // 4, dtype=np.float32) / (dim / 4.0))
    cols, rows = np.meshgrid(np.arange(grid_cols, dtype=np.float32), np.arange(grid_rows, dtype=np.float32))

    def encode(pos: np.ndarray) -> np.ndarray:
        angles = np.outer(pos.reshape(-1), omega)
        return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)

    table = np.concatenate([encode(cols), encode(rows)], axis=1).astype(np.float32)
    if cls_token:
        table = np.concatenate([np.zeros((1, dim), dtype=np.float32), table], axis=0)
    return torch.from_numpy(table)[None]


def regroup_tokens(tokens: Tensor, grid_time: int, grid_freq: int) -> Tensor:
    """The original's ``'b (f t) d -> b t (f d)'`` on time-major tokens ``[B, t * f, D]`` -> ``[B, t, f * D]``."""
    b, _, d = tokens.shape
    return tokens.reshape(b, grid_freq, grid_time, d).transpose(1, 2).reshape(b, grid_time, grid_freq * d)


class PatchEmbed(nn.Module):
    """Non-overlapping ``patch_size`` conv patches of ``[B, 1, T, F]`` -> time-major tokens ``[B, N, D]``."""

    def __init__(self, patch_size: tuple[int, int], dim: int, in_chans: int = 1):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class MambaBlock(nn.Module):
    """LayerNorm then a Mamba mixer; the residual add happens in :class:`SSAM` (Mamba-LM arrangement)."""

    def __init__(self, dim: int, norm_eps: float, **mixer_kwargs):
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=norm_eps)
        self.mixer = MambaMixer(dim, **mixer_kwargs)

    def forward(self, residual: Tensor) -> Tensor:
        return self.mixer(self.norm(residual))


class SSAM(AudioModel):
    """SSAM encoder: log-mel chunk ``[B, 1, T, F]`` -> regrouped features ``[B, T / pt, (F / pf) * D]``."""

    def __init__(
        self,
        embed_dim: int = 192,
        depth: int = 12,
        d_state: int = 24,
        d_conv: int = 4,
        expand: float = 3,
        input_size: Sequence[int] = (200, 80),
        patch_size: Sequence[int] = (4, 16),
        norm_eps: float = 1e-6,
        sample_rate: int = 16000,
        frontend: str = "ssam-mel",
    ):
        super().__init__()
        frames, bins = input_size
        if frames % patch_size[0] or bins % patch_size[1]:
            raise ValueError(f"input_size {tuple(input_size)} is not a multiple of patch_size {tuple(patch_size)}")
        self.input_size = (frames, bins)
        self.grid = (frames // patch_size[0], bins // patch_size[1])  # (time, freq)
        self.embed_dim = embed_dim
        self.sample_rate = sample_rate
        self.frontend_name = frontend
        self.block_types = (MambaBlock,)
        self.embedding_size = self.frame_embedding_size = self.grid[1] * embed_dim
        self.frame_hop_seconds = patch_size[0] * 0.01  # nominal: the exact spacing is duration / rows
        self.min_samples = 400
        from tympan.features import get_frontend  # imported here: features may import models' helpers

        self.frontend = get_frontend(frontend)
        self.patch_embed = PatchEmbed(tuple(patch_size), embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.register_buffer("pos_embed", sincos_pos_embed_2d(embed_dim, *self.grid))
        mixer = dict(d_state=d_state, d_conv=d_conv, expand=expand)
        self.blocks = nn.ModuleList(MambaBlock(embed_dim, norm_eps, **mixer) for _ in range(depth))
        self.encoder_norm = nn.LayerNorm(embed_dim, eps=norm_eps)
        self._init_weights(depth)

    @property
    def output_dim(self) -> int:
        """Size of one output row (and of the HEAR embeddings): ``freq patches * embed_dim``."""
        return self.grid[1] * self.embed_dim

    @torch.no_grad()
    def _init_weights(self, depth: int) -> None:
        """MambaSSAST init: xavier patch conv, N(0, .02) cls, zero Linear biases but dt's, out_proj / sqrt(depth)."""
        w = self.patch_embed.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.patch_embed.proj.bias)
        nn.init.normal_(self.cls_token, std=0.02)
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear) and module.bias is not None and not name.endswith("dt_proj"):
                nn.init.zeros_(module.bias)
            if name.endswith("out_proj"):
                nn.init.kaiming_uniform_(module.weight, a=math.sqrt(5))
                module.weight /= math.sqrt(depth)

    # ------------------------------------------------------------------------------------------- encoder

    def _check_chunks(self, x: Tensor) -> None:
        chunk, bins = self.input_size
        if x.dim() != 4 or x.shape[1] != 1 or x.shape[3] != bins or x.shape[2] == 0 or x.shape[2] % chunk:
            raise ValueError(
                f"SSAM expects log-mel chunks [batch, 1, {chunk} * k, {bins}], got shape {tuple(x.shape)}; "
                "use encode_features / timestamp_embeddings / scene_embeddings for any duration"
            )

    def forward_tokens(self, x: Tensor) -> Tensor:
        """Encoder output ``[B, 1 + N, D]`` for one chunk ``[B, 1, 200, 80]`` after the final LayerNorm (0 = cls)."""
        if x.dim() != 4 or tuple(x.shape[1:]) != (1, *self.input_size):
            chunk, bins = self.input_size
            raise ValueError(f"forward_tokens takes one chunk [batch, 1, {chunk}, {bins}], got shape {tuple(x.shape)}")
        tokens = self.patch_embed(x) + self.pos_embed[:, 1:]
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(x.shape[0], -1, -1)
        residual = torch.cat([cls, tokens], dim=1)
        for block in self.blocks:
            residual = residual + block(residual)
        return self.encoder_norm(residual)

    def forward_features(self, x: Tensor) -> Tensor:
        """The original's ``forward_features``: tokens without cls, regrouped ``(f t) -> t (f d)`` (module doc).

        ``x`` is ``[B, 1, 200 * k, 80]``: each 200-frame chunk is encoded on its own (the model has 250 positions)
        and the chunks' 50 rows are concatenated in time order -> ``[B, 50 * k, output_dim]``; ``k = 1`` is the
        original call, ``k > 1`` what its HEAR wrapper does before trimming.
        """
        self._check_chunks(x)
        b, _, frames, bins = x.shape
        chunks = x.reshape(b * (frames // self.input_size[0]), 1, self.input_size[0], bins)
        rows = regroup_tokens(self.forward_tokens(chunks)[:, 1:], *self.grid)
        return rows.reshape(b, -1, self.output_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_features(x)

    # ------------------------------------------------------------------------------------- HEAR embeddings

    def log_mel(self, audio: Tensor) -> Tensor:
        """Whole-clip standardised log-mel ``[n, 1, T, F]`` of audio ``[n, samples]`` (the HEAR wrapper's features)."""
        return self.frontend(audio)

    def encode_features(self, features: Tensor, chunks_per_batch: int = 64) -> Tensor:
        """Encode a whole log-mel ``[n, 1, T, F]`` as the HEAR wrapper does -> ``[n, rows, output_dim]``.

        Pads ``chunk - T % chunk`` zero frames at the end, encodes the chunks (``chunks_per_batch`` per item at a
        time, to bound memory) and drops the rows that correspond to padding (floor), exactly like ``RuntimeSSAST``.
        """
        bins = self.input_size[1]
        if features.dim() != 4 or features.shape[1] != 1 or features.shape[3] != bins:
            raise ValueError(f"expected log-mel [n, 1, frames, {bins}], got shape {tuple(features.shape)}")
        if chunks_per_batch < 1:
            raise ValueError(f"chunks_per_batch must be at least 1, got {chunks_per_batch}")
        chunk = self.input_size[0]
        pad = chunk - features.shape[2] % chunk
        padded = torch.nn.functional.pad(features, (0, 0, 0, pad))
        groups = padded.split(chunks_per_batch * chunk, dim=2)
        encoded = torch.cat([self.forward_features(group) for group in groups], dim=1)
        keep = encoded.shape[1] - (self.grid[0] * pad) // chunk
        return encoded[:, :keep]

    def timestamp_embeddings(self, audio: Tensor, chunks_per_batch: int = 64) -> tuple[Tensor, Tensor]:
        """HEAR ``get_timestamp_embeddings``: audio ``[n, samples]`` -> rows ``[n, rows, output_dim]``, ms ``[n, rows]``."""
        audio = _as_batch(audio)
        embeddings = self.encode_features(self.log_mel(audio), chunks_per_batch)
        n, rows = embeddings.shape[:2]
        return embeddings, hear_timestamps(audio.shape[-1], rows, self.sample_rate, n).to(audio.device)

    def scene_embeddings(self, audio: Tensor, chunks_per_batch: int = 64) -> Tensor:
        """HEAR ``get_scene_embeddings``: the mean of the timestamp embeddings over rows -> ``[n, output_dim]``."""
        audio = _as_batch(audio)
        return self.encode_features(self.log_mel(audio), chunks_per_batch).mean(dim=1)

    # ------------------------------------------------------------------------------------------- protocol

    def embed(self, features: Tensor, windows_per_batch: int = 64) -> Embeddings:
        """Log-mel of any length -> :meth:`encode_features` rows (nominal 40 ms apart from 0) and their mean."""
        rows = self.encode_features(features, windows_per_batch)
        return Embeddings(rows.mean(1), rows, self.frame_hop_seconds, 0.0)

    def embed_waveform(self, waveform: Tensor, windows_per_batch: int = 64) -> Embeddings:
        """As :meth:`embed`, with the original's row spacing ``duration / rows`` (:func:`hear_timestamps`)."""
        waveform = _as_batch(waveform)
        embedded = self.embed(self.log_mel(waveform), windows_per_batch)
        embedded.frame_hop_seconds = waveform.shape[-1] / self.sample_rate / embedded.frames.shape[1]
        return embedded


def _as_batch(audio: Tensor) -> Tensor:
    if audio.dim() == 1:
        audio = audio[None]
    if audio.dim() != 2 or audio.shape[-1] == 0:
        raise ValueError(f"expected mono audio [n, samples] or [samples], got shape {tuple(audio.shape)}")
    return audio


def hear_timestamps(num_samples: int, num_rows: int, sample_rate: int, batch: int) -> Tensor:
    """Start-aligned row times in ms: ``i * (num_samples / sample_rate) / num_rows * 1000``, float32 ``[batch, rows]``.

    Computed in float64 and rounded once, like the original (Python floats turned into a float32 tensor).
    """
    step_ms = (num_samples / sample_rate) / num_rows * 1000
    return (torch.arange(num_rows, dtype=torch.float64) * step_ms).to(torch.float32).repeat(batch, 1)


# ------------------------------------------------------------------------------------------------- converters


def convert_ssam_checkpoint(state: StateDict, model: nn.Module | None = None) -> StateDict:
    """Official ``checkpoint-<epoch>.pth`` state dict (``ckpt['model']``) -> ours: drop ``mask_token`` and ``pred.*``.

    All other names already match; our own layout passes unchanged.
    """
    return {k: v for k, v in state.items() if not _PRETRAINING_ONLY.match(k)}


def ssam_config_from_state(state: StateDict) -> dict:
    """Width, depth, mixer sizes and patch size of an SSAM checkpoint (official or ours)."""
    dim = state["cls_token"].shape[-1]
    depth = len({m.group(1) for k in state if (m := re.match(r"blocks\.(\d+)\.", k))})
    a_log = state["blocks.0.mixer.A_log"]
    return dict(
        embed_dim=dim,
        depth=depth,
        d_state=a_log.shape[1],
        d_conv=state["blocks.0.mixer.conv1d.weight"].shape[-1],
        expand=a_log.shape[0] // dim if a_log.shape[0] % dim == 0 else a_log.shape[0] / dim,
        patch_size=tuple(state["patch_embed.proj.weight"].shape[2:]),
    )


# --------------------------------------------------------------------------------------------------- registry

_SOURCE = (
    "Yadav & Tan, Audio Mamba: Selective State Spaces for Self-Supervised Audio Representations (Interspeech "
    "2024, arXiv:2406.02178). Official weights: Google Drive folder "
    "https://drive.google.com/drive/folders/1l6_8e1TFEfnobwUMIbA7-aKw2FwlBhho (no direct file links): download "
    "<run>/checkpoints/checkpoint-<newest epoch>.pth and pass checkpoint=PATH."
)

for _size, _dim in (("tiny", 192), ("small", 384), ("base", 768)):
    register_model(
        ModelEntry(
            name=f"ssam-{_size}",
            family="ssam",
            build=SSAM,
            config=dict(embed_dim=_dim, depth=12, d_state=24, d_conv=4, expand=3),
            weights=None,
            convert_checkpoint=convert_ssam_checkpoint,
            description=(
                f"SSAM-{_size.capitalize()} (ssam_{_size}_200_16x4) self-supervised encoder, {5 * _dim}-d HEAR "
                f"embeddings every ~40 ms. {_SOURCE}"
            ),
            input_kind="ssam-mel",
            input_shape=(1, 1, 200, 80),
            output="embeddings",
            block_types=(MambaBlock,),
            test_config=dict(embed_dim=16, depth=1),
        )
    )
