"""SAT, Streaming Audio Transformers (Dinkel et al., arXiv 2305.17834), and the same repository's ViT baselines.

A port of ``RicherMans/SAT`` ``models/audiotransformer.py`` (``Streaming_AudioTransformer``) on the shared
:class:`~tympan.models.audiotransformer.SpectrogramTransformer`. The streaming memory ("cache") is a tensor
``[depth, B, M, D]``: for every block, the block INPUTS (residual stream before it) of the last ``M <= cache_size``
tokens, as a flat token list in ``(f t)`` order. At each step

* the chunk's tokens get time positions ``0..t-1`` as usual;
* layer-0 memory additionally gets ``time_pos_embed[-m:] + freq_pos_embed`` (``m = M / 4``) at every step; after a
  full chunk the stored memory is all new (un-augmented) tokens, but tokens that survive a short chunk keep the
  addition and get it again next step (the original concatenates the re-positioned memory; fixture-verified);
  deeper layers' memory is used as stored;
* every block attends from the chunk's tokens (queries) to ``[norm1(memory) ; norm1(chunk)]`` (keys/values) through
  the shared fused-``qkv`` :class:`~tympan.models.layers.Attention` (official ``to_q``/``to_kv`` weights are fused by
  the converter);
* the new memory is the last ``cache_size`` tokens of ``[old memory ; this chunk's block inputs]``.

:meth:`SAT.forward` is the original's ``forward(wave, cache=None, return_cache=False)`` including its quirks (a chunk
longer than ``target_length`` frames is cut into pieces, a short last piece dropped; a short chunk shifts the flat
memory by fewer than ``cache_size`` tokens), except that it returns logits (the original's sigmoid is
:meth:`probabilities`; several pieces combine as :func:`~tympan.models.audiotransformer.combine_piece_logits`).
:class:`tympan.inference.Streamer` fixes the streaming-level bugs.

Protocol: ``streaming = True``; the state is ``(cache,)``; :meth:`SAT.init_state` is the original's silence memory
(``warm=True``) or an empty one, :meth:`SAT.step` runs one waveform chunk (each stream's own spectrogram, as
``inference.py`` computes it per file). ``embed`` streams the clip through the same steps.

SAT-S-1s quirk: the original ``SAT_S_1s`` factory passes the 2 s settings (192/192 frames, 48 memory tokens), so
the released ``SAT_S_stream1s`` weights were trained and evaluated as that model. ``sat-small-1s`` reproduces the
factory (``target_length=192``); ``create_model("sat-small-1s", target_length=96, cache_length=96)`` gives a true 1 s
model (the converter then cuts ``time_pos_embed`` as the original ``load_state_dict`` would).
"""

from __future__ import annotations

import torch
from torch import Tensor

from tympan.models.audiotransformer import (
    AudioTransformer,
    SpectrogramTransformer,
    combine_piece_logits,
    convert_official_checkpoint,
)
from tympan.models.layers import Block
from tympan.models.protocol import Embeddings, State, weighted_mean
from tympan.models.registry import ModelEntry, Weights, register_model

SAMPLE_RATE = 16000
HOP_LENGTH = 160


class SAT(SpectrogramTransformer):
    """Streaming Audio Transformer: ``forward(waveform, cache=None, return_cache=False)`` -> logits [, cache].

    Args:
        target_length: frames per chunk (192 = 1.92 s for the "2s" models, 96 for "1s").
        cache_length: frames of memory; ``cache_size = F * (cache_length // 16)`` tokens (48 / 24).
        eval_avg: how :meth:`forward` combines the pieces of a chunk longer than ``target_length``.
    """

    def __init__(
        self, *, target_length: int = 192, cache_length: int = 192, eval_avg: str = "mean", patch_size: int = 16, **kwargs
    ):
        if eval_avg not in ("mean", "max", "last"):
            raise ValueError(f"eval_avg must be 'mean', 'max' or 'last', not {eval_avg!r}")
        frames = patch_size if isinstance(patch_size, int) else patch_size[1]
        super().__init__(patch_size=patch_size, time_patches=(target_length + cache_length) // frames, **kwargs)
        self.target_length = target_length
        self.cache_length = cache_length
        self.cache_size = self.freq_patches * (cache_length // frames)
        self.eval_avg = eval_avg
        self.streaming = True
        self.window_samples = self.chunk_samples

    @property
    def chunk_samples(self) -> int:
        """Samples of one model chunk (``target_length`` frames at 10 ms)."""
        return self.target_length * HOP_LENGTH

    def memory_positions(self, tokens: int) -> Tensor:
        """Positions re-added to layer-0 memory of ``tokens`` tokens: ``time_pos_embed[-m:] + freq_pos_embed``, flat."""
        if tokens % self.freq_patches:
            raise ValueError(f"memory of {tokens} tokens does not split into {self.freq_patches} frequency rows")
        m = tokens // self.freq_patches
        grid = self.time_pos_embed[..., self.time_patches - m:] + self.freq_pos_embed
        return grid.flatten(2).transpose(1, 2)

    def forward_features(self, spec: Tensor, cache: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """One chunk (normalised ``[B, n_mels, T <= target_length]``) with memory -> (tokens, new cache)."""
        tokens = self.add_positions(self.patchify(spec))
        if cache is not None and cache.shape[2] == 0:
            cache = None
        if cache is not None and (cache.ndim != 4 or cache.shape[0] != len(self.blocks) or cache.shape[1] != tokens.shape[0]):
            raise ValueError(
                f"cache must be [depth={len(self.blocks)}, B={tokens.shape[0]}, M, D], got {tuple(cache.shape)}"
            )
        if cache is not None:  # layer-0 memory re-positioned; the original keeps this version in the concat below
            cache = torch.cat([(cache[0] + self.memory_positions(cache.shape[2]))[None], cache[1:]])
        inputs = []
        for i, block in enumerate(self.blocks):
            inputs.append(tokens)
            tokens = block(tokens, memory=None if cache is None else cache[i])
        new_cache = torch.stack(inputs)
        if cache is not None:
            new_cache = torch.cat([cache, new_cache], dim=2)
        return self.norm(tokens), new_cache[:, :, -self.cache_size:].detach()

    def step_spectrogram(self, spec: Tensor, cache: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """One streaming step on a normalised chunk: (logits ``[B, C]``, new cache)."""
        tokens, cache = self.forward_features(spec, cache)
        return self.classify(tokens), cache

    def forward_spectrogram(self, spec: Tensor, cache: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """The original's chunk handling: a spectrogram longer than ``target_length`` runs as sequential pieces
        carrying the cache, a short last piece is skipped (``pad_last=False``), piece outputs are combined."""
        if spec.shape[-1] <= self.target_length:
            return self.step_spectrogram(spec, cache)
        outputs = []
        for piece in spec.split(self.target_length, dim=-1)[: spec.shape[-1] // self.target_length]:
            logits, cache = self.step_spectrogram(piece, cache)
            outputs.append(logits)
        return combine_piece_logits(torch.stack(outputs), self.eval_avg), cache

    def forward(self, waveform: Tensor, cache: Tensor | None = None, return_cache: bool = False):
        logits, cache = self.forward_spectrogram(self.forward_to_spec(waveform), cache)
        return (logits, cache) if return_cache else logits

    # ------------------------------------------------------------------------------------------ protocol
    def init_state(self, batch: int = 1, warm: bool = True) -> State:
        """``(cache,)``: the original's silence memory (``warm``) or an empty memory ``[depth, batch, 0, D]``."""
        if warm:
            return (self.initial_cache(batch),)
        param = self.time_pos_embed
        return (param.new_zeros(len(self.blocks), batch, 0, self.embed_dim),)

    def step(self, chunk: Tensor, state: State) -> tuple[Tensor, State]:
        """One waveform chunk ``[B, N]`` (each stream's own spectrogram) with the state before it -> (logits, state)."""
        logits, cache = self.forward_spectrogram(self.per_clip_spec(chunk), state[0])
        return logits, (cache,)

    def embed(self, waveform: Tensor, windows_per_batch: int = 16) -> Embeddings:
        """``target_length``-frame chunks in order, each with its own spectrogram (as ``inference.py``), the memory
        carried from the silence memory; a final partial chunk is read without updating the memory. Frames are time
        columns, the scene the pooled vectors weighted by each chunk's samples."""
        chunk, patch = self.chunk_samples, self.patch_size[1]
        cache = self.initial_cache(waveform.shape[0])
        columns, pooled, weights = [], [], []
        for start in range(0, waveform.shape[1], chunk):
            piece = waveform[:, start:start + chunk]
            if piece.shape[1] // HOP_LENGTH + 1 < patch:  # too short for one patch: the grid holds the last value
                break
            tokens, new_cache = self.forward_features(self.per_clip_spec(piece), cache)
            if piece.shape[1] == chunk:
                cache = new_cache
            columns.append(self.time_columns(tokens))
            pooled.append(self.pool(tokens))
            weights.append(piece.shape[1])
        if not columns:
            raise ValueError(f"audio of {waveform.shape[1]} samples is too short for one {patch}-frame SAT patch")
        scene = weighted_mean(torch.stack(pooled, 1), torch.tensor(weights, device=waveform.device))
        return Embeddings(scene, torch.cat(columns, 1), self.frame_hop_seconds, self.first_frame_seconds)

    @torch.no_grad()
    def initial_cache(self, batch: int = 1) -> Tensor:
        """The "silence" cache of the original ``inference.py``: the cache after ``cache_length`` frames of zeros
        (``int(cache_length / 100 * 16000)`` samples), the same for every stream."""
        param = self.time_pos_embed
        zeros = torch.zeros(1, int(self.cache_length / 100 * SAMPLE_RATE), dtype=param.dtype, device=param.device)
        _, cache = self.forward(zeros, return_cache=True)
        return cache.expand(-1, batch, -1, -1).contiguous()


# ------------------------------------------------------------------------------------------ registry
_ZENODO = "https://zenodo.org/record/7964975/files/{}?download=1"
_SIZES = {
    "tiny": dict(embed_dim=192, depth=12, num_heads=3, pooling="mean"),
    "small": dict(embed_dim=384, depth=12, num_heads=6, pooling="token"),  # meant to be mean (code comment)
    "base": dict(embed_dim=768, depth=12, num_heads=12, pooling="mean"),
}
_VIT_FILES = {
    "tiny": "audiotransformer_tiny_mAP_44_15.pt",
    "small": "audiotransformer_small_mAP_45_68.pt",
    "base": "audiotransformer_base_mAP_47_40.pt",
}
_SAT_FILES = {
    ("tiny", "2s"): "SAT_T_stream2s_mAP_43_34.pt",
    ("tiny", "1s"): "SAT_T_stream1s_mAP_40_11.pt",
    ("small", "2s"): "SAT_S_stream2s_mAP_43_37.pt",
    ("small", "1s"): "SAT_S_stream1s_mAP_40_55.pt",
    ("base", "2s"): "SAT_B_stream2s_mAP_45_29.pt",
    ("base", "1s"): "SAT_B_stream1s_mAP_41_37.pt",
}


def _weights(filename: str) -> Weights:
    return Weights(url=_ZENODO.format(filename), filename=filename, license="Apache-2.0")


def _build_vit(**config) -> AudioTransformer:
    return AudioTransformer(**config)


def _build_sat(**config) -> SAT:
    return SAT(**config)


_TINY = dict(embed_dim=16, depth=1, num_heads=1)

for _size, _dims in _SIZES.items():
    register_model(
        ModelEntry(
            name=f"audiotransformer-{_size}",
            family="sat",
            build=_build_vit,
            config=dict(_dims, num_classes=527, target_length=1012, frontend="sat-mel"),
            weights=_weights(_VIT_FILES[_size]),
            convert_checkpoint=convert_official_checkpoint,
            description=f"SAT-repo non-streaming ViT-{_size[0].upper()} AudioSet tagger (16x16 patches, 10 s context)",
            labels="audioset",
            input_shape=(1, 161920),
            classifier="outputlayer",
            block_types=(Block,),
            test_config=dict(_TINY, target_length=256),
        )
    )
    for _delay in ("2s", "1s"):
        # SAT_S_1s in the original factory uses the 2 s settings; reproduced (see the module docstring).
        _frames = 192 if _delay == "2s" or _size == "small" else 96
        register_model(
            ModelEntry(
                name=f"sat-{_size}-{_delay}",
                family="sat",
                build=_build_sat,
                config=dict(_dims, num_classes=527, target_length=_frames, cache_length=_frames, frontend="sat-mel"),
                weights=_weights(_SAT_FILES[(_size, _delay)]),
                convert_checkpoint=convert_official_checkpoint,
                description=f"SAT-{_size[0].upper()} streaming AudioSet tagger, {_frames / 100:.2f} s chunks with memory"
                + (" (official factory quirk: 2 s settings)" if _size == "small" and _delay == "1s" else ""),
                labels="audioset",
                input_shape=(1, _frames * HOP_LENGTH),
                classifier="outputlayer",
                block_types=(Block,),
                test_config=_TINY,
            )
        )
