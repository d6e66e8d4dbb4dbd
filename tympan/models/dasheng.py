"""Dasheng (Dinkel et al., Interspeech 2024): MAE-pretrained ViT audio encoders, and the AudioSet classifier.

A port of ``dasheng.pretrained.pretrained.Dasheng`` (PyPI ``dasheng`` 0.0.8/0.0.9) on the shared
:class:`~tympan.models.audiotransformer.SpectrogramTransformer`: 64x4 patches spanning all mel bins, so one token per
40 ms. What is Dasheng's own:

* long inputs are cut into independent pieces of ``target_length // 4`` (252) patches, positions restarting at 0 in
  each piece, the last piece short and unpadded; full pieces run as one batch, the rest as a second pass;
* ``x_length`` (samples) masks keys at patch ``>= floor(x_length / 640)`` with the finite ``finfo.min`` bias of
  :func:`~tympan.models.layers.key_padding_bias` (a piece whose keys are all masked gets a uniform softmax, as the
  original's ``masked_fill`` + ``nan_to_num``); padded queries still produce outputs;
* the dB floor (``top_db=120``) is taken over the whole batch, as torchaudio's ``AmplitudeToDB`` does there.

Protocol: ``forward`` returns the tokens (encoders) or the AudioSet logits (``dasheng-base-audioset``; the README's
sigmoid is :meth:`probabilities`). ``embed`` gives the 40 ms tokens as frames and their mean as the scene embedding;
``window_samples`` is one ``target_length`` piece (tools cut longer inputs into such windows).
"""

from __future__ import annotations

import torch
from torch import Tensor

from tympan.models.audiotransformer import SpectrogramTransformer, convert_official_checkpoint
from tympan.models.layers import Block, key_padding_bias
from tympan.models.protocol import Embeddings
from tympan.models.registry import ModelEntry, Weights, register_model

HOP_LENGTH = 160
PATCH_FRAMES = 4
SAMPLES_PER_PATCH = HOP_LENGTH * PATCH_FRAMES  # 640 samples = 40 ms per token


class Dasheng(SpectrogramTransformer):
    """Dasheng encoder: ``forward(waveform [B, N], x_length=None) -> tokens [B, t, D]``, ``t = ((N//160+1)-4)//4+1``.

    With ``num_classes > 0`` it is the AudioSet classifier of the Dasheng README: ``forward`` then returns the logits
    ``outputlayer(tokens.mean(1))`` ``[B, num_classes]`` (the README's sigmoid: :meth:`probabilities`);
    :meth:`forward_features` still gives the tokens.
    """

    def __init__(self, *, target_length: int = 1008, pooling: str | None = None, **kwargs):
        kwargs.setdefault("frontend", "dasheng-mel")
        kwargs.setdefault("linear_init", "xavier")
        pooling = "mean" if kwargs.get("num_classes") else pooling
        super().__init__(
            patch_size=(64, PATCH_FRAMES), time_patches=target_length // PATCH_FRAMES, pooling=pooling, **kwargs
        )
        self.target_length = target_length
        self.window_samples = target_length * HOP_LENGTH

    def padding_mask(self, x_length: Tensor, tokens: int) -> Tensor:
        """``[B, tokens]`` True where a patch lies past ``x_length`` samples (``floor(x_length / 640)`` valid)."""
        valid = torch.div(x_length.to(torch.long), SAMPLES_PER_PATCH, rounding_mode="floor")
        return torch.arange(tokens, device=x_length.device) >= valid.to(x_length.device)[:, None]

    def _encode_pieces(self, grid: Tensor, mask: Tensor | None) -> Tensor:
        """Patch grid ``[B, D, 1, t']`` whose ``t'`` is a multiple of a piece (or one short piece) -> tokens."""
        batch, dim, _, t = grid.shape
        piece = min(t, self.time_patches)
        pieces = t // piece
        grid = grid.view(batch, dim, 1, pieces, piece).permute(0, 3, 1, 2, 4).reshape(batch * pieces, dim, 1, piece)
        bias = None if mask is None else key_padding_bias(mask.reshape(batch * pieces, piece), grid.dtype)
        return self.encode(self.add_positions(grid), attn_bias=bias).view(batch, t, dim)

    def forward_features(self, spec: Tensor, x_length: Tensor | None = None) -> Tensor:
        """Normalised spectrogram ``[B, 64, T]`` -> tokens ``[B, t, D]`` through independent 252-patch pieces."""
        grid = self.patchify(spec)
        t = grid.shape[-1]
        mask = None if x_length is None else self.padding_mask(x_length, t)
        if t <= self.time_patches:  # one window (an exported graph's case: no data-dependent piece sizes)
            bias = None if mask is None else key_padding_bias(mask, grid.dtype)
            return self.encode(self.add_positions(grid), attn_bias=bias)
        full = t - t % self.time_patches
        parts = [
            self._encode_pieces(grid[..., start:stop], None if mask is None else mask[:, start:stop])
            for start, stop in ((0, full), (full, t))
            if stop > start
        ]
        return torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]

    def forward_spectrogram(self, spec: Tensor, x_length: Tensor | None = None) -> Tensor:
        """Normalised spectrogram -> tokens, or logits when the model has a head."""
        tokens = self.forward_features(spec, x_length)
        return self.classify(tokens) if self.num_classes else tokens

    def forward(self, waveform: Tensor, x_length: Tensor | None = None) -> Tensor:
        if x_length is not None and tuple(x_length.shape) != (waveform.shape[0],):
            raise ValueError(f"x_length must have shape [{waveform.shape[0]}], got {tuple(x_length.shape)}")
        return self.forward_spectrogram(self.forward_to_spec(waveform), x_length)

    def embed(self, waveform: Tensor, windows_per_batch: int = 16) -> Embeddings:
        """Tokens (40 ms, centred STFT frames ``4j .. 4j+3``) of each clip's own spectrogram, fed in whole pieces
        (``windows_per_batch`` pieces per clip at a time); scene = the mean token."""
        spec = self.per_clip_spec(waveform)
        group = self.target_length * max(1, windows_per_batch // max(1, waveform.shape[0]))
        if spec.shape[-1] <= self.target_length:  # one window: no split (keeps an exported graph free of sequences)
            tokens = self.forward_features(spec)
        else:
            tokens = torch.cat([self.forward_features(part) for part in spec.split(group, dim=-1)
                                if part.shape[-1] >= self.min_frames], dim=1)  # fmt: skip
        return Embeddings(tokens.mean(1), tokens, self.frame_hop_seconds, self.first_frame_seconds)


def _build(**config) -> Dasheng:
    return Dasheng(**config)


_ZENODO = "https://zenodo.org/records/11511780/files/"
_SIZES = {  # released sizes from dasheng/pretrained/pretrained.py (train/models.py's 0.6B factory differs)
    "base": dict(embed_dim=768, depth=12, num_heads=12),
    "0.6b": dict(embed_dim=1280, depth=32, num_heads=16),
    "1.2b": dict(embed_dim=1536, depth=40, num_heads=24),
}
_FILES = {"base": "dasheng_base.pt", "0.6b": "dasheng_06b.pt", "1.2b": "dasheng_12b.pt"}

_TINY = dict(embed_dim=16, depth=1, num_heads=1, target_length=256)  # 64-token pieces

for _size, _dims in _SIZES.items():
    register_model(
        ModelEntry(
            name=f"dasheng-{_size}",
            family="dasheng",
            build=_build,
            config=dict(_dims, target_length=1008),
            weights=Weights(url=_ZENODO + _FILES[_size], license="Apache-2.0"),
            convert_checkpoint=convert_official_checkpoint,
            description=f"Dasheng-{_size} MAE audio encoder (25 tokens/s, {_dims['embed_dim']}-d), arXiv 2406.06992",
            output="embeddings",
            input_shape=(1, 160000),
            block_types=(Block,),
            test_config=_TINY,
        )
    )

register_model(
    ModelEntry(
        name="dasheng-base-audioset",
        family="dasheng",
        build=_build,
        config=dict(_SIZES["base"], target_length=1008, num_classes=527),
        weights=Weights(
            url="https://zenodo.org/records/13315686/files/dasheng_audioset_mAP497.pt",
            license="Apache-2.0",
            notes="flat state dict: encoder keys + outputlayer.0 (LayerNorm) / outputlayer.1 (Linear 768->527)",
        ),
        convert_checkpoint=convert_official_checkpoint,
        description="Dasheng-base fine-tuned on AudioSet (49.7 mAP): mean token -> LayerNorm -> Linear (sigmoid tags)",
        labels="audioset",
        input_shape=(1, 160000),
        classifier="outputlayer",
        block_types=(Block,),
        test_config=_TINY,
    )
)
