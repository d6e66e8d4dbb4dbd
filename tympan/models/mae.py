"""MAE pretraining for the spectrogram transformers (Dasheng, SAT-repo ViTs): encoder on visible patches, light
decoder, normalised-patch MSE on the masked ones (Dasheng ``AudioTransformerMAE``, SAT ``models/mae.py``).

* masking per clip by ``argsort`` of uniform noise, keeping ``int(L * (1 - mask_ratio))`` tokens; with
  ``group > 1`` (Dasheng: 2) the noise is drawn per group of ``group`` consecutive tokens, so masks come in runs;
* the encoder is any :class:`~tympan.models.audiotransformer.SpectrogramTransformer` (its frontend, BatchNorm,
  patch embedding, positions, blocks and norm; a ``cls`` token, when it pools by token, is always kept);
* decoder: ``input_proj`` -> mask tokens filled in -> learned positions -> blocks -> LayerNorm -> ``outputlayer``
  (``Linear(Dd, patch_mels * patch_frames)``);
* target: the dB mel *before* BatchNorm, cut into the encoder's patches (mel-major inside a patch, tokens in
  ``(f t)`` order); loss ``norm_pix``: each patch standardised by its own mean and unbiased variance (eps 1e-6),
  MSE per patch, mean over masked patches, in float32.

``forward(waveform)`` returns :class:`MAEOutput` (loss first), which is what :class:`tympan.train.ModelLossObjective`
expects. The pretrained encoder is ``model.encoder`` (save it with ``tympan.save`` under its own id).
Registered ids (prefixed, so that ``list_models("dasheng-*")`` stays the released encoders):
``mae-dasheng-{base,0.6b,1.2b}`` (decoder 512/8/16, 1.2B 768/8/24) and ``mae-audiotransformer-{tiny,small,base}``
(decoder 512 wide, depth 4/8/8, 8 heads).

Protocol: the wrapper reads the waveform like its encoder; ``embed`` is the encoder's (the pretrained
representation), ``forward`` the pretraining loss.
"""

from __future__ import annotations

import importlib
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tympan.models.audiotransformer import SpectrogramTransformer
from tympan.models.layers import Block
from tympan.models.protocol import AudioModel, Embeddings
from tympan.models.registry import ModelEntry, get_model_entry, register_model

__all__ = ["MAEOutput", "MAEPretrainModel", "normalized_patch_loss", "random_masking"]


class MAEOutput(NamedTuple):
    loss: Tensor  # scalar
    pred: Tensor  # [B, L, patch_dim] decoder outputs for every patch
    mask: Tensor  # [B, L] 1 = masked (removed from the encoder's input)


def random_masking(batch: int, length: int, mask_ratio: float, group: int = 1,
                   generator: torch.Generator | None = None, device: torch.device | None = None
                   ) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    """``(keep_ids [B, K], mask [B, L] with 1 = removed, ids_restore [B, L])`` for per-clip random masking.

    With ``group > 1`` the shuffle is drawn over ``L // group`` groups of consecutive tokens (``L`` must be a
    multiple of ``group``) and every group is expanded to its tokens, as Dasheng's ``random_masking_group``.
    """
    if group > 1 and length % group:
        raise ValueError(f"{length} tokens do not split into groups of {group}")
    groups = length // group
    noise = torch.rand(batch, groups, generator=generator, device=device)
    order = noise.argsort(dim=1)
    shuffle = (order[..., None] * group + torch.arange(group, device=order.device)).flatten(1)  # [B, L]
    restore = shuffle.argsort(dim=1)
    keep = int(length * (1 - mask_ratio))
    mask = torch.ones(batch, length, device=order.device)
    mask[:, :keep] = 0
    return shuffle[:, :keep], torch.gather(mask, 1, restore), restore


def normalized_patch_loss(pred: Tensor, target: Tensor, mask: Tensor, eps: float = 1e-6) -> Tensor:
    """MSE against per-patch standardised targets, averaged over masked patches (``norm_pix_loss``)."""
    pred, target = pred.float(), target.float()
    mean = target.mean(dim=-1, keepdim=True)
    var = target.var(dim=-1, keepdim=True, unbiased=True)
    target = (target - mean) / (var + eps).sqrt()
    per_patch = ((pred - target) ** 2).mean(dim=-1)
    return (per_patch * mask).sum() / mask.sum()


class MAEPretrainModel(AudioModel):
    """An encoder (built from a registered id) plus the MAE decoder; see the module docstring."""

    def __init__(self, encoder_id: str, encoder_config: dict, mask_ratio: float = 0.75, group: int = 1,
                 decoder_dim: int = 512, decoder_depth: int = 8, decoder_heads: int = 16) -> None:  # fmt: skip
        super().__init__()
        if not 0.0 < mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in (0, 1), got {mask_ratio}")
        entry = get_model_entry(encoder_id)
        self.encoder: SpectrogramTransformer = entry.build(**encoder_config)
        self.encoder.tympan_id, self.encoder.tympan_config = encoder_id, dict(encoder_config)
        self.mask_ratio, self.group = mask_ratio, group
        enc = self.encoder
        self.block_types = (Block,)
        self.embedding_size, self.frame_embedding_size = enc.embedding_size, enc.frame_embedding_size
        self.frame_hop_seconds, self.window_samples = enc.frame_hop_seconds, enc.window_samples
        self.min_samples = enc.min_samples
        self.prefix = 1 if enc.pooling == "token" else 0
        patch_dim = enc.patch_size[0] * enc.patch_size[1]
        max_tokens = enc.freq_patches * enc.time_patches
        self.input_proj = nn.Linear(enc.embed_dim, decoder_dim)
        self.mask_token = nn.Parameter(torch.randn(1, 1, decoder_dim) * 0.02)
        self.pos_embed = nn.Parameter(torch.zeros(1, self.prefix + max_tokens, decoder_dim))
        self.blocks = nn.ModuleList(Block(decoder_dim, decoder_heads, 4.0, qkv_bias=True, norm_eps=1e-6)
                                    for _ in range(decoder_depth))  # fmt: skip
        self.norm = nn.LayerNorm(decoder_dim, eps=1e-6)
        self.outputlayer = nn.Linear(decoder_dim, patch_dim)
        for module in (self.input_proj, self.outputlayer, *[m for b in self.blocks for m in b.modules()]):
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)

    def target_patches(self, mel_db: Tensor) -> Tensor:
        """dB mel ``[B, n_mels, T]`` -> patches ``[B, L, mels * frames]`` in token order."""
        size = self.encoder.patch_size
        return F.unfold(mel_db[:, None], kernel_size=size, stride=size).transpose(1, 2)

    def embed(self, waveform: Tensor, windows_per_batch: int = 16) -> Embeddings:
        """The encoder's embeddings."""
        return self.encoder.embed(waveform, windows_per_batch)

    def forward(self, waveform: Tensor, generator: torch.Generator | None = None) -> MAEOutput:
        enc = self.encoder
        mel_db = enc.front_end(waveform)
        tokens = enc.add_positions(enc.patchify(enc.normalize(mel_db)))
        prefix, patches = tokens[:, : self.prefix], tokens[:, self.prefix :]
        batch, length, dim = patches.shape
        group = self.group if length % max(self.group, 1) == 0 else 1
        keep, mask, restore = random_masking(batch, length, self.mask_ratio, group, generator, patches.device)
        visible = torch.gather(patches, 1, keep[..., None].expand(-1, -1, dim))
        encoded = enc.encode(torch.cat([prefix, visible], dim=1))

        x = self.input_proj(encoded)
        fill = self.mask_token.to(x.dtype).expand(batch, length - keep.shape[1], -1)
        full = torch.cat([x[:, self.prefix :], fill], dim=1)
        full = torch.gather(full, 1, restore[..., None].expand(-1, -1, full.shape[-1]))
        x = torch.cat([x[:, : self.prefix], full], dim=1) + self.pos_embed[:, : self.prefix + length]
        for block in self.blocks:
            x = block(x)
        pred = self.outputlayer(self.norm(x))[:, self.prefix :]
        target = self.target_patches(mel_db)[:, :length]
        return MAEOutput(normalized_patch_loss(pred, target, mask), pred, mask)


def _builder(encoder_id: str):
    def build(mask_ratio: float = 0.75, group: int = 1, decoder_dim: int = 512, decoder_depth: int = 8,
              decoder_heads: int = 16, **encoder_overrides) -> MAEPretrainModel:  # fmt: skip
        config = dict(get_model_entry(encoder_id).config) | encoder_overrides
        return MAEPretrainModel(encoder_id, config, mask_ratio, group, decoder_dim, decoder_depth, decoder_heads)

    return build


_TINY = dict(embed_dim=16, depth=1, num_heads=1, decoder_dim=16, decoder_depth=1, decoder_heads=1)


def _register() -> None:
    for family in ("dasheng", "sat"):  # the encoder ids used below (this module may be imported first)
        importlib.import_module(f"tympan.models.{family}")
    dasheng_decoders = {"base": (512, 8, 16), "0.6b": (512, 8, 16), "1.2b": (768, 8, 24)}
    for size, (dim, depth, heads) in dasheng_decoders.items():
        encoder_id = f"dasheng-{size}"
        register_model(ModelEntry(
            name=f"mae-{encoder_id}", family="mae", build=_builder(encoder_id),
            config=dict(get_model_entry(encoder_id).config, mask_ratio=0.75, group=2, decoder_dim=dim,
                        decoder_depth=depth, decoder_heads=heads),
            description=f"MAE pretraining of {encoder_id}: group masking (2), 0.75 masked, normalised-patch loss",
            output="embeddings", input_shape=(1, 160000), block_types=(Block,),
            test_config=dict(_TINY, target_length=256),
        ))  # fmt: skip
    for size, depth in {"tiny": 4, "small": 8, "base": 8}.items():
        encoder_id = f"audiotransformer-{size}"
        encoder = dict(get_model_entry(encoder_id).config, num_classes=0, pooling="token")
        register_model(ModelEntry(
            name=f"mae-{encoder_id}", family="mae", build=_builder(encoder_id),
            config=dict(encoder, mask_ratio=0.75, group=1, decoder_dim=512, decoder_depth=depth, decoder_heads=8),
            description=f"MAE pretraining of the SAT-repo {encoder_id} encoder (16x16 patches, cls token kept)",
            output="embeddings", input_shape=(1, 160000), block_types=(Block,),
            test_config=dict(_TINY, target_length=256),
        ))  # fmt: skip


_register()
