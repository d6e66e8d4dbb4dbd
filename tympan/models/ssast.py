"""SSAST pretraining (Gong et al., AAAI 2022): masked spectrogram patch modelling on the AST backbone.

Masked patches are replaced by a learned ``mask_embed`` before the positional embedding; the encoder output
at each masked position feeds two heads (``Linear -> ReLU -> Linear``):

* MPC (discriminative): InfoNCE between the masked input patches and the predictions of the same clip
  (``nce``) plus the accuracy of picking the right prediction (``acc``);
* MPG (generative): MSE between the reconstruction and the masked input patch.

The released models were trained with ``nce + 10 * mse``, the two tasks drawing independent masks: cluster
masking (c x c blocks, c in {3, 4, 5}) for patch models, uniform frame masking for frame models. Masks are
drawn here from a ``torch.Generator`` (the original used Python's ``random``), or passed in explicitly.
The fine-tuning models are :class:`tympan.models.ast.ASTModel` (ids ``ssast-{size}-{patch,frame}``); this
module registers the pretraining models as ``ssast-{size}-{patch,frame}-pretrain``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tympan.models.ast import (
    NUM_PREFIX_TOKENS,
    SSAST_PATCHES,
    SSAST_SIZES,
    SSAST_URLS,
    TINY_CONFIG,
    ASTModel,
    official_backbone_state,
)
from tympan.models.layers import Block
from tympan.models.registry import ModelEntry, StateDict, Weights, register_model

CLUSTER_SIZES = (3, 4, 5)
MPG_WEIGHT = 10.0  # loss = nce + 10 * mse for all released models


class PredictionHead(nn.Module):
    """``Linear(D, D) -> ReLU -> Linear(D, patch_dim)``: SSAST's ``cpredlayer`` / ``gpredlayer``."""

    def __init__(self, dim: int, out_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, dim)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(dim, out_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class MPCOutput(NamedTuple):
    acc: Tensor  # scalar: fraction of masked patches whose own prediction scores highest
    nce: Tensor  # scalar InfoNCE loss
    pred: Tensor  # [B, M, patch_dim] mpc head outputs at the masked positions


class MPGOutput(NamedTuple):
    mse: Tensor  # scalar
    pred: Tensor  # [B, M, patch_dim] reconstructions
    target: Tensor  # [B, M, patch_dim] masked input patches


class PretrainOutput(NamedTuple):
    loss: Tensor  # nce + 10 * mse
    nce: Tensor
    mse: Tensor
    acc: Tensor


def cluster_mask(
    num_patches: int, t_dim: int, mask_size: int, generator: torch.Generator | None = None
) -> Tensor:
    """SSAST's cluster masking (``gen_maskid_patch``) for one clip: ``mask_size`` unique indices, ascending.

    One cluster size ``c`` is drawn from {3, 4, 5}; c x c blocks ``start + t_dim * i + j`` (kept when
    ``0 < index < num_patches``; rows are not wrapped, as in the original) are added at uniform random starts
    until more than ``mask_size`` distinct indices are collected, and the ``mask_size`` smallest are returned
    (the original's Python ``set`` order for small ints).
    """
    if not 0 < mask_size <= num_patches - 2:
        raise ValueError(
            f"cluster masking needs 0 < mask_size <= {num_patches - 2} for {num_patches} patches, got {mask_size}"
        )
    size = CLUSTER_SIZES[int(torch.randint(len(CLUSTER_SIZES), (1,), generator=generator))]
    offsets = (torch.arange(size)[:, None] * t_dim + torch.arange(size)[None, :]).flatten()
    cells = torch.empty(0, offsets.numel(), dtype=torch.long)
    while True:  # one round almost always suffices; more rounds only extend the same random sequence
        starts = torch.randint(num_patches, (num_patches,), generator=generator)
        cells = torch.cat([cells, starts[:, None] + offsets])
        valid = (cells > 0) & (cells < num_patches)
        flat = torch.where(valid, cells, num_patches).flatten()  # invalid cells -> sentinel bucket
        position = torch.arange(flat.numel())
        first = torch.full((num_patches + 1,), flat.numel()).scatter_reduce(0, flat, position, "amin")
        is_new = (first[flat] == position) & valid.flatten()
        distinct_after_draw = is_new.view(cells.shape).sum(dim=1).cumsum(dim=0)
        enough = torch.nonzero(distinct_after_draw > mask_size)
        if enough.numel():
            last_draw = int(enough[0])
            chosen = cells[: last_draw + 1][valid[: last_draw + 1]]
            return torch.unique(chosen)[:mask_size]


def frame_mask(num_patches: int, mask_size: int, generator: torch.Generator | None = None) -> Tensor:
    """SSAST's frame masking (``gen_maskid_frame``): ``mask_size`` distinct indices uniformly, in random order."""
    if not 0 < mask_size <= num_patches:
        raise ValueError(f"frame masking needs 0 < mask_size <= {num_patches}, got {mask_size}")
    return torch.randperm(num_patches, generator=generator)[:mask_size]


def audio_first_mask(has_audio: Tensor, mask_size: int, generator: torch.Generator | None = None) -> Tensor:
    """Frame masking that prefers patches holding audio: ``[B, mask_size]`` distinct indices per clip, drawn
    uniformly among a clip's audio patches, topped up from its padding patches only when it has too few.

    ``has_audio [B, N]`` is :meth:`SSASTPretrainModel.audio_patches`. Zero-padding makes identical patches: as
    masked targets they are indistinguishable for MPC (wav2vec 2.0 likewise masks only within each clip's length).
    """
    if not 0 < mask_size <= has_audio.shape[1]:
        raise ValueError(f"frame masking needs 0 < mask_size <= {has_audio.shape[1]}, got {mask_size}")
    keys = torch.rand(has_audio.shape, generator=generator).to(has_audio.device) + has_audio.to(torch.float32)
    return keys.topk(mask_size, dim=1).indices  # audio patches score in (1, 2), padding in (0, 1)


class SSASTPretrainModel(ASTModel):
    """SSAST pretraining model: the AST backbone (non-overlapping patches) plus ``mask_embed`` and the MPC/MPG heads.

    ``cluster=None`` picks cluster masking when patches do not span all mel bins (patch models), as the
    original run script does; ``mask_patch`` is the number of masked patches per clip.
    """

    def __init__(
        self,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        fshape: int = 16,
        tshape: int = 16,
        input_fdim: int = 128,
        input_tdim: int = 1024,
        mask_patch: int = 400,
        cluster: bool | None = None,
        drop_path_rate: float = 0.0,
    ):
        super().__init__(
            embed_dim, depth, num_heads, mlp_ratio, fshape, tshape, fstride=fshape, tstride=tshape,
            input_fdim=input_fdim, input_tdim=input_tdim, num_classes=0, pooling="avgtok",
            drop_path_rate=drop_path_rate,
        )
        self.mask_patch = mask_patch
        self.cluster = input_fdim != fshape if cluster is None else cluster
        limit = self.num_patches - 2 if self.cluster else self.num_patches
        if not 0 < mask_patch <= limit:
            raise ValueError(f"mask_patch must be in [1, {limit}] for {self.num_patches} patches, got {mask_patch}")
        patch_dim = fshape * tshape
        self.mask_embed = nn.Parameter(torch.empty(1, 1, embed_dim))
        nn.init.xavier_normal_(self.mask_embed)
        self.mpc_head = PredictionHead(embed_dim, patch_dim)
        self.mpg_head = PredictionHead(embed_dim, patch_dim)
        for head in (self.mpc_head, self.mpg_head):
            for layer in (head.fc1, head.fc2):
                nn.init.trunc_normal_(layer.weight, std=0.02)
                nn.init.zeros_(layer.bias)

    def audio_patches(self, lengths: Tensor) -> Tensor:
        """``[B, N]``: True where a patch covers at least one of the clip's ``lengths [B]`` real input frames."""
        columns = torch.arange(self.num_patches, device=lengths.device) % self.grid[1]
        return columns[None, :] * self.patch_embed.stride[1] < lengths[:, None]

    def random_mask(self, batch: int, generator: torch.Generator | None = None,
                    lengths: Tensor | None = None) -> Tensor:  # fmt: skip
        """``[batch, mask_patch]`` masked patch indices (cluster or frame masking), drawn independently per clip.

        With ``lengths`` (real input frames per clip, the rest being padding), frame masking draws from the
        patches that hold audio (:func:`audio_first_mask`).
        """
        if lengths is not None:
            if self.cluster:
                raise ValueError("masking by input length needs frame masking (cluster=False)")
            return audio_first_mask(self.audio_patches(lengths.to(self.pos_embed.device)), self.mask_patch, generator)
        if self.cluster:
            masks = [cluster_mask(self.num_patches, self.grid[1], self.mask_patch, generator) for _ in range(batch)]
        else:
            masks = [frame_mask(self.num_patches, self.mask_patch, generator) for _ in range(batch)]
        return torch.stack(masks).to(self.pos_embed.device)

    def input_patches(self, x: Tensor) -> Tensor:
        """``[B, T, F]`` -> flattened input patches ``[B, N, fshape * tshape]`` (frequency-major inside a patch)."""
        image = self.patchify_input(x)
        return F.unfold(image, self.patch_embed.patch, stride=self.patch_embed.stride).transpose(1, 2)

    def encode_masked(self, x: Tensor, mask_index: Tensor) -> Tensor:
        """Encoder outputs ``[B, M, D]`` at the masked positions, the masked tokens replaced by ``mask_embed``."""
        patches = self.patch_embed(self.patchify_input(x))
        masked = torch.zeros(patches.shape[:2], dtype=torch.bool, device=patches.device)
        masked = masked.scatter(1, mask_index, True)
        patches = torch.where(masked[..., None], self.mask_embed.to(patches.dtype), patches)
        tokens = self.encode(patches)
        return _gather_rows(tokens, mask_index + NUM_PREFIX_TOKENS)

    def mpc(self, x: Tensor, mask_index: Tensor) -> MPCOutput:
        """Masked patch classification: InfoNCE of each masked patch against all predictions of its clip."""
        pred = self.mpc_head(self.encode_masked(x, mask_index))
        target = _gather_rows(self.input_patches(x), mask_index).detach()
        scores = target @ pred.transpose(1, 2)  # [B, M, M]: row = input patch, column = prediction
        count = mask_index.numel()
        nce = -scores.log_softmax(dim=-1).diagonal(dim1=1, dim2=2).sum() / count
        picked = scores.softmax(dim=-1).argmax(dim=1)  # per prediction, the input patch that scores highest
        acc = (picked == torch.arange(scores.shape[-1], device=x.device)).sum() / count
        return MPCOutput(acc, nce, pred)

    def mpg(self, x: Tensor, mask_index: Tensor) -> MPGOutput:
        """Masked patch generation: reconstruct the masked input patches, MSE loss."""
        pred = self.mpg_head(self.encode_masked(x, mask_index))
        target = _gather_rows(self.input_patches(x), mask_index)
        return MPGOutput(torch.mean((pred - target) ** 2), pred, target)

    def forward(
        self,
        x: Tensor,
        mpc_mask: Tensor | None = None,
        mpg_mask: Tensor | None = None,
        generator: torch.Generator | None = None,
        lengths: Tensor | None = None,
    ) -> PretrainOutput:
        """Joint pretraining loss ``nce + 10 * mse``; masks not given are drawn independently for the two tasks
        (from the patches holding audio when ``lengths``, the real frames per clip, are given)."""
        if mpc_mask is None:
            mpc_mask = self.random_mask(x.shape[0], generator, lengths)
        if mpg_mask is None:
            mpg_mask = self.random_mask(x.shape[0], generator, lengths)
        acc, nce, _ = self.mpc(x, mpc_mask)
        mse = self.mpg(x, mpg_mask).mse
        return PretrainOutput(nce + MPG_WEIGHT * mse, nce, mse, acc)


def _gather_rows(x: Tensor, index: Tensor) -> Tensor:
    """``x[b, index[b]]`` for every clip: ``[B, N, C]``, ``[B, M]`` -> ``[B, M, C]``."""
    return torch.gather(x, 1, index[..., None].expand(-1, -1, x.shape[-1]))


_PRETRAIN_HEAD_KEYS = {
    "mask_embed": "mask_embed",
    "cpredlayer.0.weight": "mpc_head.fc1.weight",
    "cpredlayer.0.bias": "mpc_head.fc1.bias",
    "cpredlayer.2.weight": "mpc_head.fc2.weight",
    "cpredlayer.2.bias": "mpc_head.fc2.bias",
    "gpredlayer.0.weight": "mpg_head.fc1.weight",
    "gpredlayer.0.bias": "mpg_head.fc1.bias",
    "gpredlayer.2.weight": "mpg_head.fc2.weight",
    "gpredlayer.2.bias": "mpg_head.fc2.bias",
}


def convert_pretrain_checkpoint(state: StateDict, model: nn.Module) -> StateDict:
    """Official SSAST pretraining state dict -> :class:`SSASTPretrainModel` (strict, like the original); ours unchanged.

    ``p_input_fdim``/``p_input_tdim`` become config (``input_fdim``/``input_tdim``), so they are dropped here;
    a checkpoint for another input size fails the strict load on ``pos_embed``.
    """
    if not any(key.startswith("v.") for key in state):
        return state
    heads = {ours: state[theirs] for theirs, ours in _PRETRAIN_HEAD_KEYS.items() if theirs in state}
    return official_backbone_state(state) | heads


def _register() -> None:
    for size, (dim, heads) in SSAST_SIZES.items():
        for kind, patch in SSAST_PATCHES.items():
            url = SSAST_URLS.get((size, kind))
            register_model(
                ModelEntry(
                    name=f"ssast-{size}-{kind}-pretrain",
                    family="ssast",
                    build=SSASTPretrainModel,
                    config=dict(
                        embed_dim=dim, depth=12, num_heads=heads, **patch, input_fdim=128, input_tdim=1024,
                        mask_patch=400, cluster=None, drop_path_rate=0.0,
                    ),
                    weights=None if url is None else Weights(url, notes="SSAST pretraining checkpoint, 400 masked"),
                    convert_checkpoint=convert_pretrain_checkpoint,
                    description=f"SSAST {size} {kind}-based pretraining model (masked patch MPC + MPG heads)",
                    input_kind="ast-fbank",
                    input_shape=(1, 1024, 128),
                    output="embeddings",
                    block_types=(Block,),
                    test_config=dict(TINY_CONFIG, mask_patch=8),
                )
            )


_register()
