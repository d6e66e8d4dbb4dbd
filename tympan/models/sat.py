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

Inference (no autograd, eval, not traced) runs :meth:`SAT.stream_features`: the same numbers with the blocks in
one call of a C kernel on prepacked weights, split over the intra-op threads (:mod:`tympan.ops.small_gemm`), and
the memory keys/values of blocks 1.. taken from the previous step (:class:`KVMemo`); training, tracing and export
run the block modules (:meth:`SAT.reference_features`).

Protocol: ``streaming = True``; the state is ``(cache,)``; :meth:`SAT.init_state` is the original's silence memory
(``warm=True``) or an empty one, :meth:`SAT.step` runs one waveform chunk (each stream's own spectrogram, as
``inference.py`` computes it per file). ``embed`` streams the clip through the same steps.

SAT-S-1s quirk: the original ``SAT_S_1s`` factory passes the 2 s settings (192/192 frames, 48 memory tokens), so
the released ``SAT_S_stream1s`` weights were trained and evaluated as that model. ``sat-small-1s`` reproduces the
factory (``target_length=192``); ``create_model("sat-small-1s", target_length=96, cache_length=96)`` gives a true 1 s
model (the converter then cuts ``time_pos_embed`` as the original ``load_state_dict`` would).
"""

from __future__ import annotations

import threading

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tympan.models.audiotransformer import (
    AudioTransformer,
    SpectrogramTransformer,
    combine_piece_logits,
    convert_official_checkpoint,
)
from tympan.models.layers import Block
from tympan.models.protocol import Embeddings, State, weighted_mean
from tympan.models.registry import ModelEntry, Weights, register_model
from tympan.ops import small_gemm
from tympan.ops.native import tracing
from tympan.ops.weights import fingerprint

SAMPLE_RATE = 16000
HOP_LENGTH = 160
FAST_STEP = True  # inference through SAT.stream_features; False: the block modules (SAT.reference_features)


class KVMemo:
    """The K/V memo of :meth:`SAT.stream_features`: the memory keys/values of blocks 1.. for the cache the last
    inference step returned (those blocks' memory is that step's block inputs, whose keys/values it computed).

    One slot per thread, held by the model with a private copy of that cache: a later step whose cache equals it (the
    state the step returned, or a copy of it) under unchanged weights reuses the keys/values; any other cache
    (another stream's, an edited one) or changed weights miss and recompute them. Per thread, so that a model shared
    by several threads (a server's request threads) never pairs one thread's keys/values with a cache another thread
    is overwriting. Never part of the state (its format is unchanged), never copied or pickled with the model.
    """

    def __init__(self) -> None:
        self._local = threading.local()  # .slot: (cache copy, weights key, values); .spare: the copy buffer before

    def lookup(self, cache: Tensor | None, key: tuple[int, ...] | None) -> list[Tensor] | None:
        """The stored keys/values when ``cache`` equals the stored cache and the weights have ``key``."""
        slot = getattr(self._local, "slot", None)
        if cache is None or key is None or slot is None:
            return None
        stored, stored_key, values = slot
        if stored_key != key or stored.shape != cache.shape or stored.dtype != cache.dtype:
            return None
        return values if torch.equal(stored, cache) else None

    def store(self, cache: Tensor, key: tuple[int, ...] | None, values: list[Tensor]) -> None:
        """Remember ``values`` (one ``[B, M, 2D]`` tensor per block 1..) for a copy of ``cache``."""
        local = self._local
        slot = getattr(local, "slot", None)
        if key is None:
            local.slot = None
            return
        spare = getattr(local, "spare", None)
        if (spare is None or spare.shape != cache.shape or spare.dtype != cache.dtype or spare.device != cache.device
                or (spare.is_inference() and not torch.is_inference_mode_enabled())):
            spare = torch.empty_like(cache, memory_format=torch.contiguous_format)
        spare.copy_(cache)
        local.spare = None if slot is None else slot[0]  # the slot being replaced stays intact until now
        local.slot = (spare, key, values)

    def clear(self) -> None:
        """Forget this thread's slot."""
        self._local.slot = self._local.spare = None

    def __reduce__(self) -> tuple[type, tuple]:
        return (KVMemo, ())

    def __deepcopy__(self, memo: dict) -> KVMemo:
        return KVMemo()


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
        self._kv_memo = KVMemo()

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
        """One chunk (normalised ``[B, n_mels, T <= target_length]``) with memory -> (tokens, new cache).

        Inference (no autograd, eval mode, not being traced) takes :meth:`stream_features`, the fused path; training,
        tracing and export take :meth:`reference_features`, the block modules as written. Both give the same numbers.
        """
        if self._fast_path_ok():
            return self.stream_features(spec, cache)
        return self.reference_features(spec, cache)

    def _fast_path_ok(self) -> bool:
        return FAST_STEP and not (self.training or torch.is_grad_enabled() or tracing())

    def _check_cache(self, cache: Tensor | None, batch: int) -> Tensor | None:
        """``cache`` validated against the model and batch; ``None`` for no memory (or an empty one)."""
        if cache is not None and cache.shape[2] == 0:
            return None
        if cache is not None and (cache.ndim != 4 or cache.shape[0] != len(self.blocks) or cache.shape[1] != batch):
            raise ValueError(f"cache must be [depth={len(self.blocks)}, B={batch}, M, D], got {tuple(cache.shape)}")
        return cache

    def reference_features(self, spec: Tensor, cache: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """:meth:`forward_features` through the block modules, one op at a time (autograd, tracing, export)."""
        tokens = self.add_positions(self.patchify(spec))
        cache = self._check_cache(cache, tokens.shape[0])
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

    def embed_chunk(self, spec: Tensor) -> Tensor:
        """``add_positions(patchify(spec))`` as one matmul: the stride-equals-kernel convolution is a product of the
        flattened patches with the flattened kernel, the tokens come out in ``(f t)`` order directly."""
        batch, bins, frames = spec.shape
        (ph, pw), rows = self.patch_size, self.freq_patches
        t = frames // pw
        if frames < self.min_frames or t > self.time_patches:
            return self.add_positions(self.patchify(spec))  # the checked path raises the usual errors
        patches = spec[..., : t * pw].reshape(batch, rows, ph, t, pw).permute(0, 1, 3, 2, 4).reshape(batch, rows * t, ph * pw)
        proj = self.patch_embed.proj
        positions = (self.time_pos_embed[..., :t] + self.freq_pos_embed).flatten(2).transpose(1, 2)
        tokens = F.linear(patches, proj.weight.reshape(proj.out_channels, -1), proj.bias) + positions
        if self.pooling == "token":
            cls = (self.cls_token + self.token_pos_embed).expand(batch, -1, -1)
            tokens = torch.cat([cls, tokens], dim=1)
        return tokens

    def stream_features(self, spec: Tensor, cache: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """:meth:`forward_features` for inference, with the per-step work cut to the matmuls and a few fused ops.

        * the patch embedding is one matmul (:meth:`embed_chunk`);
        * the blocks run in one call of the C kernel (:func:`tympan.ops.small_gemm.run_blocks`: prepacked weights,
          fused epilogues, attention, each product's output panels split over the intra-op threads); where it does
          not apply (e.g. the int8 mode), :meth:`_python_blocks` runs them op by op with the same fusions;
        * each block runs one fused ``qkv`` product on the chunk; only the memory's keys/values come from the
          memory, and for blocks 1.. they come from the K/V memo when ``cache`` is the tensor the previous step
          returned (see :class:`KVMemo`): those blocks' memory is that step's block inputs, whose keys and
          values it has already computed;
        * block inputs are written into one preallocated ``[depth + 1, B, N, D]`` buffer, whose first ``depth``
          planes are the new cache for a full chunk (no stack or concatenation).
        """
        tokens = self.embed_chunk(spec)
        batch, n, dim = tokens.shape
        cache = self._check_cache(cache, batch)
        depth, size = len(self.blocks), self.cache_size
        m = 0 if cache is None else cache.shape[2]
        memory0 = cache[0] + self.memory_positions(m) if cache is not None else None
        table = small_gemm.block_table(self.blocks, tokens)
        key = self._memo_key(table)
        memo = self._kv_memo.lookup(cache, key)
        states = tokens.new_empty(depth + 1, batch, n, dim)
        states[0] = tokens
        if table is not None:
            new_memo = self._fused_blocks(table, states, cache, memory0, memo)
        else:
            new_memo = self._python_blocks(states, cache, memory0, memo)
        if n >= size or cache is None:
            new_cache = states[:depth, :, max(0, n - size):]
        else:  # a short chunk keeps part of the (re-positioned) memory, as the original's concatenation does
            new_cache = torch.cat([torch.cat([memory0[None], cache[1:]]), states[:depth]], dim=2)[:, :, -size:]
        self._kv_memo.store(new_cache, key, new_memo)
        return self.norm(states[depth]), new_cache

    def _fused_blocks(self, table: small_gemm.BlockTable, states: Tensor, cache: Tensor | None,
                      memory0: Tensor | None, memo: list[Tensor] | None) -> list[Tensor]:
        """The blocks through the C kernel, in place on ``states``; returns the keys/values of blocks 1.. for the
        memo (views of the chunk's, for a full chunk)."""
        depth, batch, n, dim = states.shape[0] - 1, states.shape[1], states.shape[2], states.shape[3]
        size = self.cache_size
        kvc = states.new_empty(depth, batch, n, 2 * dim)
        if cache is None:
            small_gemm.run_blocks(table, states, kvc=kvc)
            return [kvc[i, :, -size:] for i in range(1, depth)]
        mem_kv: list[Tensor | None] = [None] * depth
        if memo is not None:
            mem_kv[1:] = [kv if kv.dtype == states.dtype else None for kv in memo]
        mem_x = [memory0, *cache[1:].unbind(0)]
        kvm = states.new_empty(depth, batch, cache.shape[2], 2 * dim)
        small_gemm.run_blocks(table, states, mem_x, mem_kv, kvm, kvc)
        if n >= size:
            return [kvc[i, :, n - size:] for i in range(1, depth)]
        return [torch.cat([kvm[i] if mem_kv[i] is None else mem_kv[i], kvc[i]], dim=1)[:, -size:]
                for i in range(1, depth)]

    def _python_blocks(self, states: Tensor, cache: Tensor | None, memory0: Tensor | None,
                       memo: list[Tensor] | None) -> list[Tensor]:
        """The blocks op by op (fused qkv, memory keys/values from the memo, chunk products through
        :func:`tympan.ops.small_gemm.linear`), in place on ``states``; returns the memo's keys/values."""
        batch, n, dim = states.shape[1:]
        size = self.cache_size
        new_memo: list[Tensor] = []
        for i, block in enumerate(self.blocks):
            x, attn, norm1 = states[i], block.attn, block.norm1
            heads, head_dim = attn.num_heads, attn.head_dim
            weight, bias = attn.qkv.weight, attn.qkv.bias  # read as before: the int8 mode's dequantised weight
            h = F.layer_norm(x, (dim,), norm1.weight, norm1.bias, norm1.eps)
            qkv = small_gemm.linear(attn.qkv, h) if type(attn.qkv) is nn.Linear else F.linear(h, weight, bias)
            kv = qkv[..., dim:]
            if cache is not None:
                kv_memory = memo[i - 1] if memo is not None and i and memo[i - 1].dtype == kv.dtype else None
                if kv_memory is None:
                    memory = memory0 if i == 0 else cache[i]
                    kv_memory = F.linear(
                        F.layer_norm(memory, (dim,), norm1.weight, norm1.bias, norm1.eps),
                        weight[dim:], None if bias is None else bias[dim:],
                    )
                kv = torch.cat([kv_memory, kv], dim=1)
            if i:
                new_memo.append(kv[:, -size:])
            q = qkv[..., :dim].unflatten(-1, (heads, head_dim)).transpose(1, 2)
            k, v = kv.unflatten(-1, (2, heads, head_dim)).permute(2, 0, 3, 1, 4)
            mixed = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(batch, n, dim)
            y = torch.add(x, small_gemm.linear(attn.proj, mixed), out=states[i + 1])
            mlp = block.mlp
            y += mlp.drop(small_gemm.linear(mlp.fc2, mlp.drop(mlp.act(small_gemm.linear(mlp.fc1, block.norm2(y))))))
        return new_memo

    def _memo_key(self, table: small_gemm.BlockTable | None = None) -> tuple[int, ...] | None:
        """Address and version of every tensor the memory keys/values of blocks 1.. depend on (``None`` when the
        weights are inference tensors, which keep no version: no memo then). Read through the module dicts: it runs
        every step. With the C kernel's block table (valid for the current weights) its fingerprint, which covers
        those tensors among all the block weights: one weight check per step, not two."""
        if table is not None:
            return table.fingerprint
        tensors: list[Tensor] = []
        for block in list(self.blocks._modules.values())[1:]:
            for module in (block._modules["norm1"], block._modules["attn"]._modules["qkv"]):
                tensors += [t for t in (*module._parameters.values(), *module._buffers.values()) if t is not None]
        return fingerprint(tensors)

    def step_spectrogram(self, spec: Tensor, cache: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """One streaming step on a normalised chunk: (logits ``[B, C]``, new cache)."""
        tokens, cache = self.forward_features(spec, cache)
        return self.classify(tokens), cache

    def forward_spectrogram(self, spec: Tensor, cache: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """The original's chunk handling: a spectrogram longer than ``target_length`` runs as sequential pieces
        carrying the cache, a short last piece is skipped (``pad_last=False``), piece outputs are combined; one piece
        (a streaming chunk's ``target_length + 1`` frames) gives its own logits, what the combination round-trips to."""
        pieces = spec.shape[-1] // self.target_length
        if pieces <= 1:
            return self.step_spectrogram(spec[..., : self.target_length], cache)
        outputs = []
        for piece in spec.split(self.target_length, dim=-1)[:pieces]:
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
