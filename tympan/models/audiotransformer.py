"""The ViT on a 64-mel dB spectrogram shared by Dasheng, SAT and the SAT repository's ViT baselines.

All three originals (``dasheng`` package; ``RicherMans/SAT`` ``models/audiotransformer.py``) are one design:

* a log-mel dB frontend (MelSpectrogram 512/160, 64 mels, ``AmplitudeToDB(top_db=120)`` whose floor is taken over
  the whole batch) held as the ``front_end`` submodule, then ``init_bn``: a BatchNorm over the 64 mel bins;
* a ``Conv2d`` patch embedding whose stride equals its kernel, so trailing frames that do not fill a patch drop;
* *separate* additive positional embeddings, ``time_pos_embed [1, D, 1, Gt]`` and ``freq_pos_embed [1, D, Gf, 1]``,
  flattened ``b d f t -> b (f t) d`` (frequency-major token order);
* pre-norm :class:`~tympan.models.layers.Block` layers (LayerNorm eps 1e-6) and a final norm;
* optionally a classifier ``outputlayer = LayerNorm(D) (eps 1e-5, torch default) + Linear`` on the mean token or a
  ``cls`` token. The originals apply a sigmoid after it; here ``forward`` returns the logits and the sigmoid is the
  protocol's :meth:`~tympan.models.protocol.AudioModel.probabilities` (``activation = "sigmoid"``).

Protocol (:class:`~tympan.models.protocol.AudioModel`): these models read the 16 kHz waveform (``frontend`` is the
identity; the log-mel ``front_end`` is part of the model, as in the originals, because its dB floor is taken over the
batch). Frame embeddings are the tokens averaged over frequency, one per time patch; the scene embedding is the pooled
vector the head reads.

:class:`SpectrogramTransformer` holds that shared core. :class:`AudioTransformer` (the non-streaming ViT-T/S/B
baselines) adds the long-input split/pad/average path; Dasheng (``tympan.models.dasheng``) and SAT
(``tympan.models.sat``) add their own long-input and streaming behaviour. :func:`convert_official_checkpoint`
maps every official layout of the three repositories onto ours.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tympan.models.layers import Block, stochastic_depth_rates
from tympan.models.protocol import AudioModel, Embeddings, in_groups, weighted_mean
from tympan.models.registry import StateDict

N_MELS = 64
HOP_LENGTH = 160  # 10 ms frames at 16 kHz
HEAD_NORM_EPS = 1e-5  # the heads use torch's default LayerNorm, unlike the blocks (1e-6)


def _pair(value: int | Sequence[int]) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else (int(value[0]), int(value[1]))


class PatchEmbed(nn.Module):
    """``Conv2d(1, D)`` with stride = kernel over a ``[B, n_mels, T]`` spectrogram -> ``[B, D, F, t]``."""

    def __init__(self, embed_dim: int, patch_size: tuple[int, int]):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(1, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, spec: Tensor) -> Tensor:
        return self.proj(spec.unsqueeze(1))


def combine_piece_logits(logits: Tensor, how: str) -> Tensor:
    """Per-piece logits ``[P, B, C]`` -> one row of logits per item whose sigmoid is the originals' combination of the
    pieces' probabilities: ``mean`` (``logit(mean sigmoid)``, in float64), ``max`` or ``last`` (both commute with the
    sigmoid)."""
    if how == "max":
        return logits.amax(0)
    if how == "last":
        return logits[-1]
    return torch.logit(torch.sigmoid(logits.double()).mean(0)).to(logits.dtype)


class SpectrogramTransformer(AudioModel):
    """Shared core: frontend, mel BatchNorm, patch embedding, separable positions, blocks, optional head.

    Args:
        embed_dim, depth, num_heads, mlp_ratio, qkv_bias: transformer size.
        patch_size: ``(mel, frames)`` of one patch (Dasheng ``(64, 4)``, SAT repo ``(16, 16)``).
        time_patches: length ``Gt`` of ``time_pos_embed`` (the longest chunk the model is run on, in patches).
        pooling: ``"mean"`` (average all tokens), ``"token"`` (a learned ``cls`` token) or ``None`` (encoder only).
        num_classes: width of the ``outputlayer`` head; 0 for no head.
        frontend: name of the log-mel dB frontend in :mod:`tympan.features` (``"dasheng-mel"``, ``"sat-mel"``).
        linear_init: ``"xavier"`` (Dasheng) or ``"trunc_normal"`` (SAT repo) for a model trained from scratch.
    """

    def __init__(
        self,
        *,
        embed_dim: int,
        depth: int,
        num_heads: int,
        patch_size: int | Sequence[int],
        time_patches: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        pooling: str | None = "mean",
        num_classes: int = 0,
        n_mels: int = N_MELS,
        frontend: str = "sat-mel",
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        linear_init: str = "trunc_normal",
    ):
        super().__init__()
        if pooling not in ("mean", "token", None):
            raise ValueError(f"pooling must be 'mean', 'token' or None, not {pooling!r}")
        if num_classes and pooling is None:
            raise ValueError("a classifier head needs pooling='mean' or 'token'")
        patch_size = _pair(patch_size)
        if n_mels % patch_size[0]:
            raise ValueError(f"n_mels {n_mels} is not a multiple of the patch height {patch_size[0]}")
        from tympan.features import get_frontend  # imported here: features may import models' helpers

        self.embed_dim = self.embedding_size = self.frame_embedding_size = embed_dim
        self.patch_size = patch_size
        self.pooling = pooling
        self.num_classes = num_classes
        self.classifier = "outputlayer" if num_classes else None
        self.block_types = (Block,)
        self.frame_hop_seconds = patch_size[1] * HOP_LENGTH / self.sample_rate
        self.min_samples = max(1, (patch_size[1] - 1) * HOP_LENGTH)
        self.front_end = get_frontend(frontend)
        self.init_bn = nn.BatchNorm1d(n_mels, momentum=0.01)
        self.patch_embed = PatchEmbed(embed_dim, patch_size)
        self.freq_patches = n_mels // patch_size[0]
        self.time_pos_embed = nn.Parameter(torch.randn(1, embed_dim, 1, time_patches) * 0.02)
        self.freq_pos_embed = nn.Parameter(torch.randn(1, embed_dim, self.freq_patches, 1) * 0.02)
        if pooling == "token":
            self.cls_token = nn.Parameter(torch.randn(1, 1, embed_dim) * 1e-6)
            self.token_pos_embed = nn.Parameter(torch.randn(1, embed_dim) * 0.02)
        self.pos_drop = nn.Dropout(drop_rate)
        self.blocks = nn.ModuleList(
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias, norm_eps=1e-6, drop=drop_rate,
                  attn_drop=attn_drop_rate, drop_path=rate)
            for rate in stochastic_depth_rates(depth, drop_path_rate)
        )
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        if num_classes:
            self.outputlayer = nn.Sequential(nn.LayerNorm(embed_dim, eps=HEAD_NORM_EPS), nn.Linear(embed_dim, num_classes))
        self._init_weights(linear_init)

    def _init_weights(self, linear_init: str) -> None:
        if linear_init not in ("xavier", "trunc_normal"):
            raise ValueError(f"linear_init must be 'xavier' or 'trunc_normal', not {linear_init!r}")
        for module in self.modules():
            if isinstance(module, nn.Linear):
                if linear_init == "xavier":
                    nn.init.xavier_uniform_(module.weight)
                else:
                    nn.init.trunc_normal_(module.weight, std=0.02, a=-2.0, b=2.0)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    # ------------------------------------------------------------------------------------------ pieces
    @property
    def time_patches(self) -> int:
        """Length of ``time_pos_embed``: the longest run of time patches one pass sees."""
        return self.time_pos_embed.shape[-1]

    @property
    def min_frames(self) -> int:
        return self.patch_size[1]

    def forward_to_spec(self, waveform: Tensor) -> Tensor:
        """16 kHz waveform ``[B, N]`` -> BatchNorm-ed log-mel ``[B, n_mels, T]``, ``T = N // 160 + 1``."""
        if waveform.ndim != 2:
            raise ValueError(f"expected a waveform batch [B, samples], got shape {tuple(waveform.shape)}")
        return self.normalize(self.front_end(waveform))

    def normalize(self, mel_db: Tensor) -> Tensor:
        """``init_bn``: per-mel-bin BatchNorm of a dB spectrogram ``[B, n_mels, T]``."""
        return self.init_bn(mel_db)

    def patchify(self, spec: Tensor) -> Tensor:
        """``[B, n_mels, T]`` -> patch grid ``[B, D, F, t]`` (trailing frames that do not fill a patch drop)."""
        if spec.shape[-1] < self.min_frames:
            raise ValueError(
                f"input too short: {spec.shape[-1]} frames, the {self.patch_size} patches need at least {self.min_frames}"
            )
        return self.patch_embed(spec)

    def add_positions(self, grid: Tensor) -> Tensor:
        """Add time positions ``0..t-1`` and frequency positions to ``[B, D, F, t]``, flatten to ``[B, F*t, D]``.

        With ``pooling="token"`` the ``cls`` token (plus its own position) is prepended.
        """
        t = grid.shape[-1]
        if t > self.time_patches:
            raise ValueError(f"{t} time patches exceed the model's {self.time_patches} time positions")
        grid = grid + self.time_pos_embed[..., :t]
        grid = grid + self.freq_pos_embed
        tokens = grid.flatten(2).transpose(1, 2)
        if self.pooling == "token":
            cls = (self.cls_token + self.token_pos_embed).expand(tokens.shape[0], -1, -1)
            tokens = torch.cat([cls, tokens], dim=1)
        return self.pos_drop(tokens)

    def encode(self, tokens: Tensor, attn_bias: Tensor | None = None) -> Tensor:
        """All blocks, then the final norm."""
        for block in self.blocks:
            tokens = block(tokens, attn_bias=attn_bias)
        return self.norm(tokens)

    def pool(self, tokens: Tensor) -> Tensor:
        """One vector per item: the mean token or the ``cls`` token."""
        return tokens[:, 0] if self.pooling == "token" else tokens.mean(dim=1)

    def classify(self, tokens: Tensor) -> Tensor:
        """Pooled tokens -> head -> logits ``[B, num_classes]`` (the originals' sigmoid is :meth:`probabilities`)."""
        if not self.num_classes:
            raise ValueError("this model has no classifier head (num_classes=0)")
        return self.outputlayer(self.pool(tokens))

    # ------------------------------------------------------------------------------------------ embeddings
    def per_clip_spec(self, waveform: Tensor) -> Tensor:
        """Normalised log-mel with each clip's own dB floor, so clips stay independent (``[B, 1, N]`` through the
        frontend: its floor is taken per item, bit-identical to one call per clip, and no loop over the batch)."""
        return self.normalize(self.front_end(waveform[:, None]).squeeze(1))

    def time_columns(self, tokens: Tensor) -> Tensor:
        """Tokens ``[B, (cls) + F * t, D]`` (frequency-major) -> per time column mean over frequency ``[B, t, D]``."""
        if self.pooling == "token":
            tokens = tokens[:, 1:]
        return tokens.reshape(tokens.shape[0], self.freq_patches, -1, tokens.shape[-1]).mean(1)

    @property
    def first_frame_seconds(self) -> float:
        """Centre of the first time patch: the middle of its ``patch`` centred STFT frames."""
        return (self.patch_size[1] - 1) * HOP_LENGTH / 2 / self.sample_rate

    def embed(self, waveform: Tensor, windows_per_batch: int = 16) -> Embeddings:
        """Whole-clip spectrogram cut into ``time_patches * patch``-frame windows (the last zero-padded); frames are
        time columns, the scene the pooled vectors averaged over windows weighted by their real frames."""
        spec = self.per_clip_spec(waveform)
        n, bins, frames = spec.shape
        window = self.time_patches * self.patch_size[1]
        windows = max(1, -(-frames // window))
        spec = F.pad(spec, (0, windows * window - frames))
        stacked = spec.unflatten(-1, (windows, window)).transpose(1, 2).reshape(n * windows, bins, window)

        def run(part: Tensor) -> tuple[Tensor, Tensor]:
            tokens = self.encode(self.add_positions(self.patchify(part)))
            return self.time_columns(tokens), self.pool(tokens)

        columns, pooled = map(torch.cat, zip(*in_groups(run, stacked, windows_per_batch)))
        real = (frames - window * torch.arange(windows, device=waveform.device)).clamp(max=window)
        scene = weighted_mean(pooled.reshape(n, windows, -1), real)
        frames_out = columns.reshape(n, windows * self.time_patches, -1)
        return Embeddings(scene, frames_out, self.frame_hop_seconds, self.first_frame_seconds)


class AudioTransformer(SpectrogramTransformer):
    """SAT repository's non-streaming ViT-T/S/B AudioSet taggers (``models.audiotransformer.AudioTransformer``).

    ``forward(waveform [B, N]) -> logits [B, num_classes]``. A spectrogram of up to
    ``target_length + 15`` frames (16x16 patches, at most ``target_length // 16`` time patches) is one pass. A longer
    one is cut into ``target_length``-frame pieces after the BatchNorm, the last short piece zero-padded (zeros in the
    normalised domain, ``pad_last``), the pieces run as one batch and their probabilities averaged (``eval_avg``).

    Deliberate fix: the original drops the last piece when the frame count is an exact multiple of
    ``target_length`` (``stack(splits[:-1])`` for a full last piece); here every full piece is kept. No fixture
    exercises that case (the official 12 s example has 1201 frames).
    """

    def __init__(self, *, target_length: int = 1012, patch_size: int = 16, eval_avg: str = "mean", **kwargs):
        if eval_avg not in ("mean", "max"):
            raise ValueError(f"eval_avg must be 'mean' or 'max', not {eval_avg!r}")
        time_patches = target_length // _pair(patch_size)[1]
        super().__init__(patch_size=patch_size, time_patches=time_patches, **kwargs)
        self.target_length = target_length
        self.eval_avg = eval_avg
        self.window_samples = target_length * HOP_LENGTH

    @property
    def max_single_pass_frames(self) -> int:
        """``maximal_allowed_length``: longer spectrograms take the split-and-average path."""
        return self.target_length + self.patch_size[1] - 1

    def forward_spectrogram(self, spec: Tensor) -> Tensor:
        """Normalised spectrogram ``[B, n_mels, T]`` -> logits ``[B, num_classes]`` (pieces: :func:`combine_piece_logits`)."""
        batch, frames = spec.shape[0], spec.shape[-1]
        if frames <= self.max_single_pass_frames:
            return self.classify(self.encode(self.add_positions(self.patchify(spec))))
        pieces = -(-frames // self.target_length)
        spec = F.pad(spec, (0, pieces * self.target_length - frames))  # zero-pad the last piece
        spec = spec.unflatten(-1, (pieces, self.target_length)).permute(2, 0, 1, 3).flatten(0, 1)
        logits = self.classify(self.encode(self.add_positions(self.patchify(spec)))).unflatten(0, (pieces, batch))
        return combine_piece_logits(logits, self.eval_avg)

    def forward(self, waveform: Tensor) -> Tensor:
        return self.forward_spectrogram(self.forward_to_spec(waveform))


# ------------------------------------------------------------------------------------------ checkpoints
def resize_pos_embed(pos: Tensor, size: tuple[int, int]) -> Tensor:
    """Fit a ``[1, D, F, T]`` positional embedding to ``size``: cut when shorter, bilinear when longer (as the originals)."""
    if tuple(pos.shape[-2:]) == tuple(size):
        return pos
    if pos.shape[-2] >= size[0] and pos.shape[-1] >= size[1]:
        return pos[..., : size[0], : size[1]].contiguous()
    return F.interpolate(pos, size=size, mode="bilinear", align_corners=False)


def convert_official_checkpoint(state: StateDict, model: nn.Module) -> StateDict:
    """Official Dasheng / SAT-repo state dict (or ours) -> ours, adapted to ``model``'s config.

    * ``init_bn.1.*`` (the BatchNorm inside ``Sequential(Rearrange, BN, Rearrange)``) -> ``init_bn.*``;
    * SAT's ``attn.to_q`` + ``attn.to_kv`` -> the fused ``attn.qkv`` of the shared attention;
    * the frontend's ``front_end.0.*`` buffers (Hann window, mel filterbank) are checked against our frontend,
      which computes them, and dropped; a mismatch means the checkpoint was made with other frontend settings;
    * Hugging Face ports' ``encoder.`` prefix is removed;
    * positional embeddings are cut or bilinearly resized to the built model, as the originals' ``load_state_dict``.

    Our own layout passes through unchanged.
    """
    if state and all(k.startswith("encoder.") for k in state):
        state = {k[len("encoder."):]: v for k, v in state.items()}
    own = model.state_dict()
    out: StateDict = {}
    official_frontend: StateDict = {}
    for key, value in state.items():
        if key.startswith("front_end.0."):
            official_frontend[key[len("front_end.0."):]] = value
            continue
        if key.startswith("init_bn.1."):
            key = "init_bn." + key[len("init_bn.1."):]
        out[key] = value
    for key in [k for k in out if k.endswith("attn.to_q.weight") or k.endswith("attn.to_q.bias")]:
        prefix, kind = key.rsplit(".to_q.", 1)
        out[f"{prefix}.qkv.{kind}"] = torch.cat([out.pop(key), out.pop(f"{prefix}.to_kv.{kind}")])
    _check_frontend_buffers(official_frontend, model)
    out.update({k: v for k, v in own.items() if k.startswith("front_end.") and k not in out})  # computed by ours
    for name in ("time_pos_embed", "freq_pos_embed"):
        if name in out and name in own:
            out[name] = resize_pos_embed(out[name], tuple(own[name].shape[-2:]))
    if "outputlayer.1.weight" in out and "outputlayer.1.weight" not in own:
        raise KeyError("outputlayer (the checkpoint has a classifier head; build a model id with one)")
    return out


def frontend_buffers(front_end: nn.Module) -> StateDict:
    """The tensors torchaudio stores in the originals' ``front_end.0`` (``spectrogram.window``, ``mel_scale.fb``),
    as our frontend (a :class:`~tympan.features.DashengMel`: periodic Hann, htk mel, no filter norm) computes them."""
    from tympan.features.mel import spectrogram_window, mel_filterbank

    names = ("sample_rate", "n_fft", "win_length", "f_min", "f_max", "n_mels")
    if not all(hasattr(front_end, n) for n in names):
        return {}
    fe = front_end
    f_max = float(fe.sample_rate // 2) if fe.f_max is None else float(fe.f_max)
    fb = mel_filterbank(fe.n_fft // 2 + 1, float(fe.f_min), f_max, fe.n_mels, fe.sample_rate)
    window = spectrogram_window("hann", fe.win_length, torch.device("cpu"), torch.float32)
    return {"spectrogram.window": window, "mel_scale.fb": fb}


def _check_frontend_buffers(official: StateDict, model: nn.Module) -> None:
    """Compare the checkpoint's STFT window / mel filterbank with the tensors our frontend computes."""
    if not official or not hasattr(model, "front_end"):
        return
    ours = frontend_buffers(model.front_end)
    if not ours:  # a frontend that does not expose its STFT settings: nothing to compare
        return
    for name, value in official.items():
        mine = ours.get(name)
        if mine is None or mine.shape != value.shape:
            raise ValueError(f"checkpoint frontend tensor front_end.0.{name} {tuple(value.shape)} has no counterpart in ours")
        err = (mine.float() - value.float().cpu()).abs().max()
        if err > 1e-5:
            raise ValueError(f"checkpoint frontend tensor front_end.0.{name} differs from ours (max abs diff {err:.2e})")
