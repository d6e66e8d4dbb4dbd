"""AST (Gong et al., Interspeech 2021) and SSAST fine-tuning models: one architecture.

A DeiT-distilled ViT over a log-mel spectrogram ``[B, T, F]``: the spectrogram is treated as a one-channel
image of height F and width T, cut into (possibly overlapping) patches by a ``Conv2d(1, D, (fshape, tshape),
stride=(fstride, tstride))``, prefixed with the cls and dist tokens, given a learned positional embedding,
run through pre-norm blocks and a final LayerNorm, then pooled and classified by ``LayerNorm + Linear``.

* AST pools ``(cls + dist) / 2`` (``pooling="cls"``); SSAST fine-tuning pools the mean of the patch tokens
  (``pooling="avgtok"``, the original ``ft_avgtok``) or uses ``"cls"`` (``ft_cls``).
* SSAST "frame" models use ``fshape=128, tshape=2`` patches (all mel bins, two frames).

Official checkpoints (DataParallel ``module.v.*`` / ``module.mlp_head.*``, SSAST pretraining files with
``cpredlayer``/``gpredlayer``/``mask_embed``/``p_input_*``, DeiT ImageNet files) are converted by
:func:`convert_checkpoint`, which adapts the positional embedding to the built model exactly as the
original code does (see :func:`tympan.models.patching.adapt_grid`).

Protocol: ``frontend`` is the ``ast-fbank`` recipe padded/cropped to ``input_tdim`` frames (the original loader's
input), ``forward`` returns logits. ``embed`` reads features of any length in ``input_tdim``-frame windows stepped by
whole time columns; :meth:`ASTModel.embed_waveform` feeds it the whole clip's fbank (the frontend would crop it).
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import Tensor, nn

from tympan.models.layers import Block, stochastic_depth_rates
from tympan.models.protocol import AudioModel, Embeddings, in_groups, weighted_mean
from tympan.models.patching import PatchEmbed, adapt_grid, join_pos_embed, patch_grid, split_pos_embed
from tympan.models.registry import ModelEntry, StateDict, Weights, register_model

NUM_PREFIX_TOKENS = 2  # cls + dist
POOLINGS = ("cls", "avgtok")
AUDIOSET_MEL_BINS = 128
HOP_SAMPLES = 160  # 10 ms fbank frames
KALDI_FIRST_CENTRE_SECONDS = 0.0125  # snip_edges Kaldi frames: 25 ms windows every 10 ms  # every released AST/SSAST checkpoint was trained on 128 mel bins
SSAST_TIME_RESIZE_ROWS = 8  # SSAST resizes the time axis to 8 rows whatever the pretraining grid (reference quirk)

# model size -> (embed_dim, num_heads); all depth 12, MLP ratio 4
AST_SIZES = {"tiny224": (192, 3), "small224": (384, 6), "base224": (768, 12), "base384": (768, 12)}
SSAST_SIZES = {"tiny": (192, 3), "small": (384, 6), "base": (768, 12)}


class ClassifierHead(nn.Module):
    """``LayerNorm`` (eps 1e-5, unlike the backbone's 1e-6) then ``Linear``: the original ``mlp_head``."""

    def __init__(self, dim: int, num_classes: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc = nn.Linear(dim, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.norm(x))


class ASTModel(AudioModel):
    """Audio Spectrogram Transformer; input a normalised log-mel ``[B, T, F]`` (see ``tympan.features.ast_fbank``).

    ``input_tdim`` fixes the number of time patches (the positional embedding is learned per patch);
    inputs must have that many frames (pad or crop them, as the original data loader does).
    ``num_classes=0`` builds an encoder without head (``forward`` then returns the pooled embedding).
    """

    def __init__(
        self,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        fshape: int = 16,
        tshape: int = 16,
        fstride: int = 10,
        tstride: int = 10,
        input_fdim: int = 128,
        input_tdim: int = 1024,
        num_classes: int = 527,
        pooling: str = "cls",
        drop_path_rate: float = 0.0,
    ):
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {', '.join(POOLINGS)}, got {pooling!r}")
        self.input_fdim, self.input_tdim = input_fdim, input_tdim
        self.pooling = pooling
        self.grid = patch_grid(input_fdim, input_tdim, (fshape, tshape), (fstride, tstride))
        self.num_patches = self.grid[0] * self.grid[1]
        self.embed_dim = self.embedding_size = self.frame_embedding_size = embed_dim
        self.num_classes = max(num_classes, 0)
        self.classifier = "head" if num_classes > 0 else None
        self.block_types = (Block,)
        self.frame_hop_seconds = tstride * HOP_SAMPLES / self.sample_rate
        self.window_samples = input_tdim * HOP_SAMPLES
        self.min_samples = 400  # one 25 ms Kaldi frame
        from tympan.features import get_frontend  # imported here: features may import models' helpers

        self.frontend = get_frontend("ast-fbank", target_length=input_tdim, num_mel_bins=input_fdim)

        self.patch_embed = PatchEmbed(embed_dim, (fshape, tshape), (fstride, tstride))
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.dist_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, NUM_PREFIX_TOKENS + self.num_patches, embed_dim))
        self.blocks = nn.ModuleList(
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias=True, norm_eps=1e-6, drop_path=rate)
            for rate in stochastic_depth_rates(depth, drop_path_rate)
        )
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.head = ClassifierHead(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """timm's ViT initialisation: truncated normal (std 0.02) tokens and linear weights, zero biases."""
        for param in (self.pos_embed, self.cls_token, self.dist_token):
            nn.init.trunc_normal_(param, std=0.02)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def patchify_input(self, x: Tensor) -> Tensor:
        """Check ``x`` ``[B, T, F]`` and turn it into the one-channel image ``[B, 1, F, T]``."""
        if x.ndim != 3 or x.shape[2] != self.input_fdim:
            raise ValueError(f"expected a spectrogram [B, T, {self.input_fdim}], got {list(x.shape)}")
        if patch_grid(x.shape[2], x.shape[1], self.patch_embed.patch, self.patch_embed.stride) != self.grid:
            raise ValueError(
                f"this model takes {self.input_tdim} frames (patch grid {self.grid[0]} x {self.grid[1]}), got "
                f"{x.shape[1]}: pad/crop the input or build the model with input_tdim={x.shape[1]}"
            )
        return x.transpose(1, 2).unsqueeze(1)

    def encode(self, patches: Tensor) -> Tensor:
        """Patch embeddings ``[B, N, D]`` -> tokens after the final norm ``[B, 2 + N, D]`` (cls, dist, patches)."""
        prefix = torch.cat([self.cls_token, self.dist_token], dim=1).expand(patches.shape[0], -1, -1)
        x = torch.cat([prefix, patches], dim=1) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.norm(x)

    def forward_features(self, x: Tensor) -> Tensor:
        """``[B, T, F]`` -> tokens after the final LayerNorm ``[B, 2 + f_dim * t_dim, D]`` (frequency-major patches)."""
        return self.encode(self.patch_embed(self.patchify_input(x)))

    def pool(self, tokens: Tensor) -> Tensor:
        """Clip embedding: ``(cls + dist) / 2`` or the mean of the patch tokens."""
        if self.pooling == "avgtok":
            return tokens[:, NUM_PREFIX_TOKENS:].mean(dim=1)
        return (tokens[:, 0] + tokens[:, 1]) / 2

    def pooled(self, x: Tensor) -> Tensor:
        """Pooled clip embedding ``[B, D]`` of one window (the input of the classifier head)."""
        return self.pool(self.forward_features(x))

    def forward(self, x: Tensor) -> Tensor:
        """Logits ``[B, num_classes]`` (no sigmoid: the originals train with BCEWithLogits)."""
        return self.head(self.pooled(x))

    def embed(self, x: Tensor, windows_per_batch: int = 16) -> Embeddings:
        """Features ``[B, T, F]`` of any length in ``input_tdim``-frame windows stepped by whole time columns (the last
        padded as the original loader pads); frames = patch columns averaged over frequency, scene = the pooled vectors
        averaged over windows weighted by their real frames."""
        n, frames, bins = x.shape
        window, (f_dim, t_dim) = self.input_tdim, self.grid
        tshape, tstride = self.patch_embed.patch[1], self.patch_embed.stride[1]
        step = t_dim * tstride
        windows = 1 if frames <= window else -(-(frames - window) // step) + 1
        x = nn.functional.pad(x, (0, 0, 0, (windows - 1) * step + window - frames), value=self.padding_value())
        stacked = x.unfold(1, window, step).permute(0, 1, 3, 2).reshape(n * windows, window, bins)

        def run(part: Tensor) -> tuple[Tensor, Tensor]:
            tokens = self.forward_features(part)
            columns = tokens[:, NUM_PREFIX_TOKENS:].reshape(part.shape[0], f_dim, t_dim, -1).mean(1)
            return columns, self.pool(tokens)

        columns, pooled = map(torch.cat, zip(*in_groups(run, stacked, windows_per_batch)))
        real = frames - step * torch.arange(windows, device=x.device)
        first = KALDI_FIRST_CENTRE_SECONDS + (tshape - 1) * HOP_SAMPLES / 2 / self.sample_rate
        scene = weighted_mean(pooled.reshape(n, windows, -1), real.clamp(max=window))
        return Embeddings(scene, columns.reshape(n, windows * t_dim, -1), self.frame_hop_seconds, first)

    def embed_waveform(self, waveform: Tensor, windows_per_batch: int = 16) -> Embeddings:
        """The whole clip's features (the frontend's recipe without its crop to one window), then :meth:`embed`."""
        from tympan.features import ast_fbank

        fe = self.frontend
        features = ast_fbank(waveform, fe.sample_rate, None, fe.mean, fe.std, fe.normalize, fe.num_mel_bins,
                             fe.frame_shift)  # fmt: skip
        return self.embed(features, windows_per_batch)

    def padding_value(self) -> float:
        """A zero-padded fbank frame after the frontend's normalisation (what the original loader pads with)."""
        fe = self.frontend
        return -fe.mean / (2 * fe.std) if fe.normalize else 0.0


# ----------------------------------------------------------------------------------------------------------
# checkpoint conversion

_HEAD_KEYS = {
    "mlp_head.0.weight": "head.norm.weight",
    "mlp_head.0.bias": "head.norm.bias",
    "mlp_head.1.weight": "head.fc.weight",
    "mlp_head.1.bias": "head.fc.bias",
}
_UNUSED_BACKBONE_PREFIXES = ("head.", "head_dist.", "pre_logits.")  # timm's ImageNet heads, unused by AST


def official_backbone_state(state: StateDict) -> StateDict:
    """The ``v.*`` tensors of an official AST/SSAST state dict, ``v.`` removed, timm's unused heads dropped."""
    return {
        key[2:]: value
        for key, value in state.items()
        if key.startswith("v.") and not key[2:].startswith(_UNUSED_BACKBONE_PREFIXES)
    }


def _checkpoint_error(message: str) -> Exception:
    from tympan.checkpoints import CheckpointError  # imported here: tympan.checkpoints imports the registry

    return CheckpointError(message)


def _grid_of(pos_embed: Tensor, f_dim: int, what: str) -> tuple[int, int]:
    rows = pos_embed.shape[1] - NUM_PREFIX_TOKENS
    if rows % f_dim:
        raise _checkpoint_error(f"{what}: pos_embed has {rows} patch rows, not a multiple of {f_dim} frequency patches")
    return f_dim, rows // f_dim


def _adapt_pos_embed(pos_embed: Tensor, source: tuple[int, int], target: tuple[int, int], **rule: Any) -> Tensor:
    prefix, grid = split_pos_embed(pos_embed.detach().float(), NUM_PREFIX_TOKENS, source)
    return join_pos_embed(prefix, adapt_grid(grid, target, **rule)).to(pos_embed.dtype)


def _head_state(state: StateDict, model: nn.Module) -> StateDict:
    """The checkpoint's ``mlp_head`` if it fits the model, else the model's own fresh head (as fine-tuning does)."""
    own = model.state_dict()
    if "head.fc.weight" not in own:
        return {}
    head = {ours: state[theirs] for theirs, ours in _HEAD_KEYS.items() if theirs in state}
    if len(head) == len(_HEAD_KEYS) and all(head[k].shape == own[k].shape for k in head):
        return head
    if head:
        warnings.warn(
            f"checkpoint head has {head['head.fc.weight'].shape[0]} classes, the model "
            f"{own['head.fc.weight'].shape[0]}: the head is newly initialised",
            stacklevel=3,
        )
    return {k: own[k] for k in _HEAD_KEYS.values()}


def _convert_ssast_pretrained(state: StateDict, backbone: StateDict, model: ASTModel) -> StateDict:
    """SSAST pretraining file -> fine-tuning model, as the original ``ASTModel(pretrain_stage=False)`` loader."""
    p_fshape, p_tshape = backbone["patch_embed.proj.weight"].shape[2:]
    if (p_fshape, p_tshape) != model.patch_embed.patch:
        raise _checkpoint_error(
            f"SSAST checkpoint has {p_fshape} x {p_tshape} patches, the model {model.patch_embed.patch[0]} x "
            f"{model.patch_embed.patch[1]}: fine-tuning must keep the pretraining patch shape (fshape/tshape)"
        )
    p_shape = (p_fshape, p_tshape)
    source = patch_grid(int(state["p_input_fdim"]), int(state["p_input_tdim"]), p_shape, p_shape)
    backbone["pos_embed"] = _adapt_pos_embed(
        backbone["pos_embed"], source, model.grid, time_resize_rows=SSAST_TIME_RESIZE_ROWS
    )
    return backbone


def _convert_deit_imagenet(state: StateDict, model: ASTModel) -> StateDict:
    """timm DeiT (ImageNet) -> AST, as ``imagenet_pretrain=True``: RGB kernel summed, pos-embed centre-cut/resized."""
    converted = {k: v for k, v in state.items() if not k.startswith(_UNUSED_BACKBONE_PREFIXES)}
    weight = converted["patch_embed.proj.weight"]
    converted["patch_embed.proj.weight"] = weight.sum(dim=1, keepdim=True)
    side = round((converted["pos_embed"].shape[1] - NUM_PREFIX_TOKENS) ** 0.5)
    converted["pos_embed"] = _adapt_pos_embed(converted["pos_embed"], (side, side), model.grid)
    return converted | _head_state({}, model)


def convert_checkpoint(state: StateDict, model: ASTModel) -> StateDict:
    """Official AST / SSAST / DeiT state dict (``module.`` already stripped) -> ours; ours passes unchanged.

    * AST (``v.*`` + ``mlp_head.*``): when the model's patch grid differs from the checkpoint's (a
      128-bin grid at the model's stride is assumed, as the original hard-codes 12 x 101), the
      positional embedding is centre-cut (fewer time patches) or bilinearly resized (more), time axis
      first, exactly like ``ASTModel(audioset_pretrain=True)``.
    * SSAST pretraining (``p_input_*``, ``cpredlayer``, ...): the pretraining heads are dropped, the
      patch embedding is reused with the model's stride and the positional embedding adapted with
      SSAST's rule; the classifier head is the model's own fresh one.
    * DeiT ImageNet (``head_dist.*`` without ``v.``): AST's ImageNet initialisation.

    The checkpoint's ``mlp_head`` is kept when its shape fits, else the model's newly initialised head is used.
    """
    if "head_dist.weight" in state:
        return _convert_deit_imagenet(state, model)
    if not any(key.startswith("v.") for key in state):
        return state
    backbone = official_backbone_state(state)
    if "p_input_fdim" in state:
        return _convert_ssast_pretrained(state, backbone, model) | _head_state({}, model)
    pos_embed = backbone.get("pos_embed")
    if pos_embed is not None and pos_embed.shape[1] != model.pos_embed.shape[1]:
        f_source = (AUDIOSET_MEL_BINS - model.patch_embed.patch[0]) // model.patch_embed.stride[0] + 1
        source = _grid_of(pos_embed, f_source, "AST checkpoint")
        backbone["pos_embed"] = _adapt_pos_embed(pos_embed, source, model.grid)
    return backbone | _head_state(state, model)


# ----------------------------------------------------------------------------------------------------------
# registry

_AST_URL = "https://www.dropbox.com/s/ca0b1v2nlxzyeb4/audioset_10_10_0.4593.pth?dl=1"
_DEIT_URLS = {
    "tiny224": "https://dl.fbaipublicfiles.com/deit/deit_tiny_distilled_patch16_224-b40b3cf7.pth",
    "small224": "https://dl.fbaipublicfiles.com/deit/deit_small_distilled_patch16_224-649709d9.pth",
    "base224": "https://dl.fbaipublicfiles.com/deit/deit_base_distilled_patch16_224-df68dfff.pth",
}
SSAST_URLS = {
    ("base", "patch"): "https://www.dropbox.com/s/ewrzpco95n9jdz6/SSAST-Base-Patch-400.pth?dl=1",
    ("base", "frame"): "https://www.dropbox.com/s/nx6nl4d4bl71sm8/SSAST-Base-Frame-400.pth?dl=1",
    ("small", "patch"): "https://www.dropbox.com/s/i24w446rl9pkf05/SSAST-Small-Patch-400.pth?dl=1",
    ("tiny", "patch"): "https://www.dropbox.com/s/fkbtf78y94113wz/SSAST-Tiny-Patch-400.pth?dl=1",
    ("tiny", "frame"): "https://www.dropbox.com/s/rx7g60ruzawffzv/SSAST-Tiny-Frame-400.pth?dl=1",
}
# patch shape of SSAST's two model kinds, and the fine-tuning strides of the recipes (AudioSet/ESC-50/SC)
SSAST_PATCHES = {"patch": {"fshape": 16, "tshape": 16}, "frame": {"fshape": 128, "tshape": 2}}
SSAST_FINETUNE_STRIDES = {"patch": {"fstride": 10, "tstride": 10}, "frame": {"fstride": 128, "tstride": 1}}


TINY_CONFIG = dict(embed_dim=16, depth=1, num_heads=1, input_tdim=256)  # 16-wide, one block, 2.56 s windows


def _register_ast() -> None:
    for size, (dim, heads) in AST_SIZES.items():
        if size == "base384":
            weights = Weights(
                _AST_URL,
                filename="audioset_10_10_0.4593.pth",
                notes="AST AudioSet tagger, f/t stride 10, 1024 frames, weight-averaged, 0.4593 mAP",
            )
            description = "AST base384, AudioSet tagger (fstride=tstride=10, 1024 frames, 527 classes)"
        else:
            weights = Weights(
                _DEIT_URLS[size],
                notes="DeiT distilled ImageNet weights; loaded the way AST's imagenet_pretrain=True does (new head)",
            )
            description = f"AST {size} (DeiT-{size[:-3]} distilled backbone); official init is ImageNet DeiT"
        register_model(
            ModelEntry(
                name=f"ast-{size}",
                family="ast",
                build=ASTModel,
                config=dict(
                    embed_dim=dim, depth=12, num_heads=heads, fstride=10, tstride=10, input_fdim=128,
                    input_tdim=1024, num_classes=527, pooling="cls", drop_path_rate=0.0,
                ),
                weights=weights,
                convert_checkpoint=convert_checkpoint,
                description=description,
                input_kind="ast-fbank",
                input_shape=(1, 1024, 128),
                labels="audioset" if size == "base384" else None,
                classifier="head",
                block_types=(Block,),
                test_config=TINY_CONFIG,
            )
        )


def _register_ssast_finetune() -> None:
    for size, (dim, heads) in SSAST_SIZES.items():
        for kind in ("patch", "frame"):
            url = SSAST_URLS.get((size, kind))
            weights = None if url is None else Weights(
                url, notes="SSAST self-supervised pretraining checkpoint (400 masked patches); the head is new"
            )
            register_model(
                ModelEntry(
                    name=f"ssast-{size}-{kind}",
                    family="ssast",
                    build=ASTModel,
                    config=dict(
                        embed_dim=dim, depth=12, num_heads=heads, **SSAST_PATCHES[kind], **SSAST_FINETUNE_STRIDES[kind],
                        input_fdim=128, input_tdim=1024, num_classes=527, pooling="avgtok", drop_path_rate=0.0,
                    ),
                    weights=weights,
                    convert_checkpoint=convert_checkpoint,
                    description=f"SSAST {size} {kind}-based model for fine-tuning (ft_avgtok pooling, new head)",
                    input_kind="ast-fbank",
                    input_shape=(1, 1024, 128),
                    classifier="head",
                    block_types=(Block,),
                    test_config=TINY_CONFIG,
                )
            )


_register_ast()
_register_ssast_finetune()
