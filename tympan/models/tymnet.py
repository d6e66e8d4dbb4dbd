"""TymNet: the default model, a small depthwise-separable CNN on YAMNet's 0.96 s log-mel patches.

Distilled from YAMNet (521 AudioSet classes) on audio built here (``recipes/default_model.yaml``): per 0.96 s patch
(hop 0.48 s) it predicts the teacher's class scores and, through a projection, its 1024-d embedding.

* frontend (:class:`YAMNetLogMel`): YAMNet's own log-mel (``tympan.teachers.yamnet``) in float32 torch: zero-pad to
  >= 15,600 samples and to whole 0.48 s hops, 25 ms periodic Hann / 10 ms hop / 512-point STFT magnitude, 64 HTK mel
  bands 125-7500 Hz (a buffer, so it exports), ``log(mel + 0.001)``: ``[B, N] -> [B, frames, 64]``. On float32 CPU
  input outside autograd and tracing, everything up to the log runs in one C pass (:mod:`tympan.ops.log_mel`: no
  padded copy, 16 frames per vector, the GIL released); otherwise in torch ops (``torch.fft.rfft``); in an
  exported graph as three matmuls with a windowed real-DFT basis (no DFT op, no framing gather).
* model: patches of 96 frames with a 48-frame hop, each through depthwise-separable
  blocks (MobileNet-v1 style, BatchNorm + ReLU) after a stem (4x4 tiles, or a 3x3 stride-2 convolution), global
  average pool -> ``embedding`` -> 521 logits.
  Clip logits are ``logit(mean_patches sigmoid(patch logits))``, so clip probabilities are YAMNet-style means.
* inference (eval mode, not under export/compile tracing): every BatchNorm is folded into the convolution before
  it (:func:`fold_batchnorm`; cached, recomputed when a weight or running statistic changes) and the stem's 4x4
  tiles run as one matmul on NHWC activations. Without autograd, on float32 CPU tensors with an AVX-512 C compiler,
  the blocks and the pooling run patch by patch in one C call (:func:`tympan.ops.small_gemm.run_dsconv`: no
  Python between layers, the GIL released, each patch's activations in a small scratch area; a 3x3 stem runs in
  the same call, on the patches as views of the log-mel), and the head and projection on packed weights; otherwise
  op by op, pointwise convolutions as matmuls and depthwise ones through oneDNN. :meth:`TymNet.quantize_int8`
  (``--precision int8``) runs the pointwise convolutions as int8 products (VNNI). Training mode, the state dict and
  the exported graph use the modules as they are.
* embeddings: frame = per-patch embedding (hop 0.48 s, first centre 0.4875 s); scene = mean over patches.
* streaming: ``chunk_samples = 7,680`` (0.48 s); the state is the previous 7,920 samples, so each step sees exactly
  one 15,600-sample patch: step ``k`` equals patch ``k`` of the whole clip left-padded with 7,920 zeros.
  :meth:`TymNet.steps` runs many steps as one batch (how ``tympan tag`` and ``listen`` use it).
"""

from __future__ import annotations

import functools
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tympan.errors import CheckpointError
from tympan.models.protocol import AudioModel, Embeddings, State
from tympan.models.registry import ModelEntry, Weights, register_model
from tympan.ops import log_mel, small_gemm
from tympan.ops.native import exporting, tracing
from tympan.ops.small_gemm import DSConvStack, dsconv_stack, pointwise_u8, quantize_pointwise, run_dsconv
from tympan.ops.weights import fingerprint

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


@functools.lru_cache(maxsize=1)
def _frontend_constants() -> dict[str, Tensor]:
    """The frontend's float32 CPU constants: ``window_nfft`` (the 400-sample periodic Hann window zero-padded to
    512: frames cut 512 wide need no padding inside rfft), the ``mel`` matrix ``[257, 64]`` and the windowed
    real-DFT ``basis`` ``[400, 514]`` (cos | -sin) for ``dft="matmul"``. Callers copy what they use."""
    cpu = torch.device("cpu")
    n = torch.arange(WINDOW, dtype=torch.float64, device=cpu)
    window = 0.5 - 0.5 * torch.cos(2 * math.pi * n / WINDOW)
    k = torch.arange(NFFT // 2 + 1, dtype=torch.float64, device=cpu)
    angle = 2 * math.pi * n[:, None] * k[None, :] / NFFT
    basis = torch.cat([torch.cos(angle), -torch.sin(angle)], 1) * window[:, None]
    with torch.device(cpu):
        mel = _mel_matrix()
    return {"window_nfft": F.pad(window.float(), (0, NFFT - WINDOW)), "mel": mel, "basis": basis.float()}


def _magnitude(spectrum: Tensor) -> Tensor:
    """``|spectrum|``; for a CPU complex64 tensor outside autograd and tracing through numpy's vectorised complex
    ``abs`` (~3x faster than torch's ``hypot`` loop, and than ``sqrt(re^2 + im^2)`` in torch ops)."""
    if spectrum.requires_grad or spectrum.device.type != "cpu" or spectrum.dtype != torch.complex64 or tracing():
        return spectrum.abs()
    return torch.from_numpy(np.abs(spectrum.numpy()))


def _mel_groups(size: int = 16) -> list[tuple[int, int, int, int]]:
    """``(band_lo, band_hi, bin_lo, bin_hi)`` per group of `size` consecutive mel bands: the FFT bins outside
    ``[bin_lo, bin_hi)`` have zero weight in those bands (computed in Python floats with one bin of margin each side,
    so the ranges hold whatever the rounding of :func:`_mel_matrix`)."""
    hz_to_mel = lambda hz: 1127.0 * math.log1p(hz / 700.0)  # noqa: E731
    low, high = hz_to_mel(125.0), hz_to_mel(7500.0)
    edges = [low + (high - low) * i / (NUM_MELS + 1) for i in range(NUM_MELS + 2)]
    bin_mels = [hz_to_mel(k * SAMPLE_RATE / NFFT) for k in range(NFFT // 2 + 1)]
    groups = []
    for band_lo in range(0, NUM_MELS, size):
        band_hi = min(band_lo + size, NUM_MELS)
        inside = [k for k, m in enumerate(bin_mels) if edges[band_lo] < m < edges[band_hi + 1]]
        groups.append((band_lo, band_hi, max(1, inside[0] - 1), min(NFFT // 2 + 1, inside[-1] + 2)))
    return groups


def padded_length(num_samples: int) -> int:
    """YAMNet's padding rule: >= 15,600 samples, then a whole number of 7,680-sample hops after the first patch."""
    length = max(num_samples, MIN_SAMPLES)
    hops = -(-(length - MIN_SAMPLES) // PATCH_HOP_SAMPLES)
    return MIN_SAMPLES + hops * PATCH_HOP_SAMPLES


_MEL_GROUPS = _mel_groups()


class YAMNetLogMel(nn.Module):
    """16 kHz waveform ``[B, N]`` -> YAMNet log-mel ``[B, frames, 64]`` (float32; see the module docstring).

    ``dft="fft"`` uses ``torch.fft.rfft``; ``dft="matmul"`` a real DFT basis (a buffer), for exporters without FFT.
    Exported graphs always take the matmul (the basis then a constant of the graph): ONNX Runtime's DFT op took
    1.1 ms of a 2.9 ms step, its framing gather 0.4 ms; the matmul step runs in ~1.2 ms.
    ``pad=False`` skips YAMNet's padding (streaming steps pass exactly one patch of samples).
    """

    def __init__(self, dft: str = "fft", pad: bool = True) -> None:
        super().__init__()
        if dft not in ("fft", "matmul"):
            raise ValueError(f"dft must be 'fft' or 'matmul', got {dft!r}")
        self.dft, self.pad = dft, pad
        # computed once on the CPU, then copied to the default device (a meta build, e.g. the registry's config
        # check, then makes no meta arange, whose decomposition imports torch._dynamo: ~1.3 s at every load)
        device = torch.get_default_device()
        for name, value in _frontend_constants().items():
            if name != ("basis" if dft == "fft" else "window_nfft"):  # each DFT its own (the basis is 0.8 MB)
                self.register_buffer(name, value.to(device, copy=True), persistent=False)

    def forward(self, waveform: Tensor) -> Tensor:
        if waveform.dim() == 1:
            waveform = waveform[None]
        waveform = waveform.float()
        length = padded_length(waveform.shape[-1]) if self.pad else waveform.shape[-1]
        count = (length - WINDOW) // HOP + 1  # frames
        if self.dft == "fft" and not exporting():
            # framing, FFT, magnitude and mel bands in one C pass (None where it does not apply: torch ops below)
            energies = log_mel.mel_energies(waveform, count, HOP, self.window_nfft[:WINDOW], self.mel, LOG_OFFSET)
            if energies is not None:
                return energies.log_()
            # one pad to whole 512-sample frames (the samples past 400 meet the window's zeros): no fill/copy in rfft
            waveform = F.pad(waveform, (0, (count - 1) * HOP + NFFT - waveform.shape[-1]))
            frames = waveform.unfold(-1, NFFT, HOP)[..., :count, :]  # [B, T, 512]
            magnitude = _magnitude(torch.fft.rfft(frames * self.window_nfft))
            if magnitude.requires_grad or magnitude.device.type != "cpu" or tracing():
                return torch.log(magnitude @ self.mel + LOG_OFFSET)
            # the mel matrix is banded: 16 bands at a time over only the bins they weigh, ~4x fewer multiply-adds
            flat = magnitude.reshape(-1, magnitude.shape[-1])
            mel = torch.cat([flat[:, k0:k1] @ self.mel[k0:k1, b0:b1] for b0, b1, k0, k1 in _MEL_GROUPS], 1)
            return mel.add_(LOG_OFFSET).log_().view(*magnitude.shape[:-1], NUM_MELS)
        basis = self.basis if self.dft == "matmul" else _frontend_constants()["basis"].to(waveform.device)
        if self.pad:
            waveform = F.pad(waveform, (0, length - waveform.shape[-1]))
        spec = _framed_matmul(waveform, basis, count)  # [B, T, 2 * 257]
        half = spec.shape[-1] // 2
        magnitude = torch.sqrt(spec[..., :half] ** 2 + spec[..., half:] ** 2)
        return torch.log(magnitude @ self.mel + LOG_OFFSET)


def _framed_matmul(waveform: Tensor, basis: Tensor, count: int) -> Tensor:
    """``count`` frames of 400 samples every 160 (``[B, N]``) times ``basis`` ``[400, K]`` -> ``[B, count, K]``,
    without cutting the frames: over rows of 160 samples, frame ``t`` is rows ``t`` and ``t + 1`` and the first 80
    samples of row ``t + 2``, so the product is three matmuls of shifted row views (an exported unfold is a gather,
    a copy of every frame)."""
    used = waveform[..., : (count - 1) * HOP + WINDOW]
    rows = F.pad(used, (0, 3 * HOP - WINDOW)).reshape(*waveform.shape[:-1], count + 2, HOP)
    tail = WINDOW - 2 * HOP
    return (rows[..., :count, :] @ basis[:HOP] + rows[..., 1 : count + 1, :] @ basis[HOP : 2 * HOP]
            + rows[..., 2 : count + 2, :tail] @ basis[2 * HOP :])  # fmt: skip


def _tiles(x: Tensor) -> Tensor:
    """``[B, 4R, M]`` (log-mel rows) -> its non-overlapping 4x4 tiles ``[B, R, M/4, 16]``, each tile row-major.

    float32 rows of 4 values move as single 16-byte complex128 elements where the layout allows (bitwise the same
    copy, ~4x faster than TensorIterator's 4-float inner loop; not differentiable, so only outside autograd)."""
    batch, rows, mels = x.shape[0], x.shape[1] // 4, x.shape[2] // 4
    if x.dtype == torch.float32 and not x.requires_grad and not tracing():
        try:
            packed = x.view(torch.complex128).view(batch, rows, 4, mels).transpose(2, 3).contiguous()
            return packed.view(torch.float32).view(batch, rows, mels, 16)
        except RuntimeError:  # strides or offset not in whole 16-byte units
            pass
    return x.reshape(batch, rows, 4, mels, 4).transpose(2, 3).reshape(batch, rows, mels, 16)


def fold_batchnorm(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> tuple[Tensor, Tensor]:
    """Weight and bias of one convolution equal to ``bn(conv(x))`` with `bn` in eval mode (its running statistics)."""
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError("folding needs a BatchNorm that tracks running statistics")
    scale = torch.rsqrt(bn.running_var + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight
    shift = -bn.running_mean * scale if conv.bias is None else (conv.bias - bn.running_mean) * scale
    if bn.bias is not None:
        shift = shift + bn.bias
    return conv.weight * scale.view(-1, *[1] * (conv.weight.dim() - 1)), shift


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
    folded_inference = True  # eval mode on folded weights; False: through the modules (the reference in tests)
    native_blocks = True  # folded inference runs the blocks in one C call when it applies; False: op by op
    int8_pointwise = False  # set by quantize_int8() (--precision int8)
    chunk_samples = PATCH_HOP_SAMPLES
    inference_threads = 1  # ~4 M multiply-adds per patch: on 2 cores one thread tags 1.3x faster than two
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
        # plain attributes, not state: folded_weights()'s (sources, their key, folded weights) and the C kernel's
        # view of those folded weights
        self._fold_cache: tuple[list[Tensor], tuple, list[Tensor]] | None = None
        self._stack_cache: tuple[list[Tensor], dict[tuple[bool, bool], DSConvStack | None]] | None = None
        self._int8_cache: tuple[list[Tensor], list[tuple[Tensor, Tensor]]] | None = None

    # ----------------------------------------------------------------------------------------- folded inference
    def _conv_bn_pairs(self) -> list[tuple[nn.Conv2d, nn.BatchNorm2d]]:
        """Each convolution with the BatchNorm after it (submodule dicts read directly: this runs every eval call)."""
        modules = self._modules
        pairs = [(modules["stem"], modules["stem_bn"])]
        for block in modules["blocks"]._modules.values():
            sub = block._modules
            pairs += [(sub["dw"], sub["bn1"]), (sub["pw"], sub["bn2"])]
        return pairs  # type: ignore[return-value]

    @staticmethod
    def _fold_sources(pairs: list[tuple[nn.Conv2d, nn.BatchNorm2d]]) -> tuple[list[Tensor], list[float]]:
        """Every tensor the folded weights are computed from, and each BN's eps."""
        tensors: list[Any] = []
        for conv, bn in pairs:
            params, buffers = bn._parameters, bn._buffers
            tensors += (conv._parameters["weight"], conv._parameters.get("bias"), params.get("weight"),
                        params.get("bias"), buffers.get("running_mean"), buffers.get("running_var"))  # fmt: skip
        return [t for t in tensors if t is not None], [bn.eps for _, bn in pairs]

    def folded_weights(self) -> list[Tensor]:
        """Eval-mode weights and biases, BatchNorms folded in: ``[stem_w, stem_b, dw_w, dw_b, pw_w, pw_b, ...]``;
        the 4x4 stem as a ``[C, 16]`` matrix over tiles, pointwise convolutions as ``[C_out, C_in]`` matrices.

        Cached without autograd and rebuilt when any source changes: a weight, bias or running statistic modified in
        place (its version counter), given new storage (``.data =``, a submodule's ``.to``) or replaced by another
        tensor or module (identity: the cache holds the sources, so their ids cannot be reused), or a BN's eps;
        ``.to``/``.train``/``.eval``/``load_state_dict`` on the model drop the cache too. Nothing is cached when a
        source keeps no version counter (made under ``torch.inference_mode``). Under autograd with trainable
        weights they are computed afresh, so gradients reach the convolution and BatchNorm parameters."""
        pairs = self._conv_bn_pairs()
        if torch.is_grad_enabled() and any(p.requires_grad for p in self.parameters()):
            return self._fold(pairs)
        tensors, eps = self._fold_sources(pairs)
        storage = fingerprint(tensors)  # None for inference tensors: nothing cached
        key = None if storage is None else (storage, tuple(map(id, tensors)), tuple(eps))
        cache = self._fold_cache
        if key is None or cache is None or cache[1] != key:
            with torch.inference_mode(False), torch.no_grad():  # normal tensors: usable later under autograd too
                folded = self._fold(pairs)
            self._fold_cache = None if key is None else (tensors, key, folded)
            return folded
        return cache[2]

    def _fold(self, pairs: list[tuple[nn.Conv2d, nn.BatchNorm2d]]) -> list[Tensor]:
        out: list[Tensor] = []
        for i, (conv, bn) in enumerate(pairs):
            weight, bias = fold_batchnorm(conv, bn)
            if conv.kernel_size == (1, 1) or (i == 0 and conv.stride == (4, 4)):
                weight = weight.reshape(weight.shape[0], -1).contiguous()  # pointwise / 4x4-tile stem: a matmul
            else:
                weight = weight.contiguous(memory_format=torch.channels_last)
            out += [weight, bias]
        return out

    def _folded_path(self) -> bool:
        """Eval mode (every BatchNorm's) outside tracing: run on folded weights (training and export use the
        modules)."""
        if not self.folded_inference or self.training or tracing():
            return False
        return not any(bn.training for _, bn in self._conv_bn_pairs())

    def _blocks_folded(self, x: Tensor, weights: list[Tensor]) -> Tensor:
        """Stem output ``[P, H, W, C]`` (NHWC, after its ReLU) -> pooled features ``[P, channels[-1]]``: the whole
        stack in one C call (:func:`tympan.ops.small_gemm.run_dsconv`) where it applies, else op by op."""
        stack = self._kernel_stack(weights, stem=False) if self._kernel_input(x) else None
        if stack is not None:
            return run_dsconv(stack, x)
        int8 = self.int8_pointwise and not torch.is_grad_enabled()  # int8 rounds: no gradients through it
        quantized = self._int8_weights(weights) if int8 else None
        for i, block in enumerate(self.blocks):
            dw_w, dw_b, pw_w, pw_b = weights[2 + 4 * i : 6 + 4 * i]
            y = F.conv2d(x.permute(0, 3, 1, 2), dw_w, dw_b, block.dw.stride, block.dw.padding, groups=dw_w.shape[0])
            y = y.relu_().permute(0, 2, 3, 1)
            if quantized is not None:
                x = pointwise_u8(y, *quantized[i], pw_b)
            else:
                x = F.linear(y, pw_w, pw_b).relu_()  # oneDNN writes NHWC: no copy
        return x.mean((1, 2))

    @staticmethod
    def _kernel_input(x: Tensor) -> bool:
        return x.dtype == torch.float32 and x.device.type == "cpu"

    def _int8_weights(self, weights: list[Tensor]) -> list[tuple[Tensor, Tensor]]:
        """Each block's pointwise weight as int8 (:func:`tympan.ops.small_gemm.quantize_pointwise`), for the op-by-op
        path of :meth:`quantize_int8` (cached with the folded weights)."""
        cache = self._int8_cache
        if cache is None or cache[0] is not weights:
            cache = self._int8_cache = (weights, [quantize_pointwise(weights[4 + 4 * i])
                                                  for i in range(len(self.blocks))])
        return cache[1]

    def _kernel_stack(self, weights: list[Tensor], stem: bool) -> DSConvStack | None:
        """The C kernel's prepared blocks for these folded weights (cached with them: a new fold, a new stack), with
        the 3x3 stem in the same call when ``stem``; ``None`` where the kernel does not apply."""
        if not (self.native_blocks and small_gemm.ENABLED) or torch.is_grad_enabled() or \
                torch.is_autocast_enabled("cpu"):  # fmt: skip
            return None  # autograd, or bf16 autocast (--precision bf16), or the kernel switched off: op by op
        key = (stem, self.int8_pointwise)
        cache = self._stack_cache
        if cache is None or cache[0] is not weights:
            cache = self._stack_cache = (weights, {})
        if key not in cache[1]:
            layers = [(*weights[2 + 4 * i : 6 + 4 * i], block.dw.stride[0]) for i, block in enumerate(self.blocks)]
            ok = all(b.dw.kernel_size == (3, 3) and b.dw.padding == (1, 1) and b.dw.stride[0] == b.dw.stride[1]
                     for b in self.blocks)  # fmt: skip
            stem_conv = self.stem
            if stem:
                ok = ok and stem_conv.kernel_size == (3, 3) and stem_conv.padding == (1, 1) and \
                    stem_conv.stride[0] == stem_conv.stride[1]  # fmt: skip
            stem_spec = (weights[0], weights[1], stem_conv.stride[0]) if stem else None
            cache[1][key] = dsconv_stack(layers, stem=stem_spec, int8=self.int8_pointwise) if ok else None
        return cache[1][key]

    def _backbone_folded(self, patches: Tensor) -> Tensor:
        """:meth:`backbone` on folded weights: activations stay NHWC ``[P, H, W, C]`` throughout; with the 3x3 stem
        and the C kernel, the stem runs in the kernel's call too, on the patches as given (views: no copy)."""
        weights = self.folded_weights()
        if self.stem.stride == (4, 4):  # non-overlapping 4x4 tiles [P, 24, 16, 16] @ [16, C]
            x = F.linear(_tiles(patches), weights[0], weights[1])
            return self._blocks_folded(x.relu_(), weights)
        stack = self._kernel_stack(weights, stem=True) if self._kernel_input(patches) else None
        if stack is not None:
            return run_dsconv(stack, patches)
        x = F.conv2d(patches[:, None].contiguous(memory_format=torch.channels_last), weights[0], weights[1],
                     self.stem.stride, self.stem.padding).permute(0, 2, 3, 1)  # fmt: skip
        return self._blocks_folded(x.relu_(), weights)

    def quantize_int8(self) -> None:
        """Run the pointwise convolutions in int8 from now on (``with_precision(model, "int8")``): weights symmetric
        per output channel, each block's input quantised per position to unsigned 8 bits after its ReLU, the products
        exact in int32 (AVX-512 VNNI in the C kernel; the same arithmetic in PyTorch ops elsewhere). Folded inference
        only: training mode, autograd and export keep float32. Up to ``small_gemm.INT8_MAX_INPUTS`` (512) input
        channels per pointwise convolution (the integer sums stay exact in float32 on the path without VNNI)."""
        widest, limit = max(block.pw.in_channels for block in self.blocks), small_gemm.INT8_MAX_INPUTS
        if widest > limit:
            raise ValueError(f"int8 pointwise convolutions take at most {limit} input channels, this model has {widest}")
        self.int8_pointwise = True
        self._stack_cache = self._int8_cache = None

    def _pooled(self, features: Tensor, group: int | None) -> Tensor:
        """Log-mel ``[B, T, 64]`` -> pooled features ``[B, n, channels[-1]]`` of its patches, at most `group`
        patches through the backbone at once (bounded memory; in training mode also BatchNorm's batch; ``None``:
        all at once).

        On folded weights with the 4x4 stem, the stem runs once per tile of the whole log-mel (patches overlap by
        half and start on whole tiles, so this equals running it per patch) and patches are cut from its output."""
        if not self._folded_path() or self.stem.stride != (4, 4):
            patches = self.patches(features)
            batch, count = patches.shape[:2]
            flat = patches.reshape(-1, PATCH_FRAMES, NUM_MELS)
            parts = [flat] if group is None else flat.split(max(1, group))
            return torch.cat([self.backbone(p) for p in parts]).view(batch, count, -1)
        if features.shape[1] < PATCH_FRAMES:
            features = F.pad(features, (0, 0, 0, PATCH_FRAMES - features.shape[1]), value=math.log(LOG_OFFSET))
        weights = self.folded_weights()
        batch, frames, mels = features.shape
        count = (frames - PATCH_FRAMES) // PATCH_HOP_FRAMES + 1
        rows, hop = PATCH_FRAMES // 4, PATCH_HOP_FRAMES // 4  # a patch and its hop in tile rows (24, 12)
        per = count if group is None else max(1, group // batch)  # patches of each clip per pass
        pooled = []
        for first in range(0, count, per):
            n = min(per, count - first)
            used = features[:, first * PATCH_HOP_FRAMES : first * PATCH_HOP_FRAMES + (rows + (n - 1) * hop) * 4]
            stem = F.linear(_tiles(used), weights[0], weights[1]).relu_()  # [B, tile rows, 16, C]
            # one copy (for one clip the reshape alone would be an overlapping view, which the convolution copies)
            x = stem.unfold(1, rows, hop).permute(0, 1, 4, 2, 3).reshape(batch * n, rows, mels // 4, -1).contiguous()
            pooled.append(self._blocks_folded(x, weights).view(batch, n, -1))
        return pooled[0] if len(pooled) == 1 else torch.cat(pooled, 1)

    def __getstate__(self) -> dict[str, Any]:
        """Pickling and deepcopy leave the C kernel's view behind (it holds pointers; rebuilt on first use)."""
        state = super().__getstate__() if hasattr(super(), "__getstate__") else self.__dict__
        return {**state, "_stack_cache": None, "_int8_cache": None}

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        self._fold_cache = None
        super()._load_from_state_dict(*args, **kwargs)

    def _apply(self, fn: Any, *args: Any, **kwargs: Any) -> TymNet:
        self._fold_cache = None
        return super()._apply(fn, *args, **kwargs)

    def train(self, mode: bool = True) -> TymNet:
        self._fold_cache = None
        return super().train(mode)

    # ----------------------------------------------------------------------------------------- patches
    @staticmethod
    def patches(features: Tensor) -> Tensor:
        """Log-mel ``[B, T, 64]`` -> patches ``[B, n, 96, 64]`` (96 frames, hop 48; at least one, zero-padded)."""
        if features.shape[1] < PATCH_FRAMES:
            features = F.pad(features, (0, 0, 0, PATCH_FRAMES - features.shape[1]), value=math.log(LOG_OFFSET))
        return features.unfold(1, PATCH_FRAMES, PATCH_HOP_FRAMES).transpose(-1, -2)

    def backbone(self, patches: Tensor) -> Tensor:
        """Patches ``[P, 96, 64]`` -> pooled features ``[P, channels[-1]]`` (eval mode: on folded weights)."""
        if self._folded_path():
            return self._backbone_folded(patches)
        return self.feature_map(patches).mean((-2, -1))

    def feature_map(self, patches: Tensor) -> Tensor:
        """Patches ``[P, 96, 64]`` -> the last block's map ``[P, channels[-1], H, W]`` before pooling (unfolded
        weights; what per-position distillation compares with the teacher's last map)."""
        # explicitly NHWC like the weights: with an ambiguous 1-channel layout oneDNN can fall back to a path that is
        # hundreds of times slower (seen under torch.inference_mode)
        x = F.relu(self.stem_bn(self.stem(patches[:, None].contiguous(memory_format=torch.channels_last))))
        return self.blocks(x)

    def patch_outputs(self, patches: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        """Patches ``[P, 96, 64]`` -> (logits ``[P, C]``, pooled features, projected teacher embedding or None)."""
        pooled = self.backbone(patches)
        projected = small_gemm.linear(self.projection, pooled) if self.projection is not None else None
        return small_gemm.linear(self.head, pooled), pooled, projected

    def _per_patch(self, features: Tensor, windows_per_batch: int) -> tuple[Tensor, Tensor]:
        pooled = self._pooled(features, max(1, windows_per_batch) * 16)
        if self.embedding_kind == "projection":
            return small_gemm.linear(self.head, pooled), small_gemm.linear(self.projection, pooled)
        return small_gemm.linear(self.head, pooled), pooled

    # ----------------------------------------------------------------------------------------- protocol
    def forward(self, features: Tensor) -> Tensor:
        """Log-mel ``[B, T, 64]`` -> clip logits ``[B, C]`` = ``logit(mean over patches of sigmoid)``."""
        logits = small_gemm.linear(self.head, self._pooled(features, 512))
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
        logits = small_gemm.linear(self.head, self._pooled(features[:, :PATCH_FRAMES], None)[:, 0])
        return logits, (samples[:, PATCH_HOP_SAMPLES:],)

    def steps(self, block: Tensor, state: State) -> tuple[Tensor, State]:
        """``k`` steps at once: ``[B, k * 7680]`` -> logits ``[B, k, C]`` (equal to ``k`` calls of :meth:`step`).

        The state is only past samples, so the ``k`` patches are those of the state and the block joined: one
        frontend pass and one batch through the backbone instead of ``k`` of each."""
        if block.shape[-1] == 0 or block.shape[-1] % self.chunk_samples:
            raise ValueError(f"steps takes a whole number of {self.chunk_samples}-sample chunks, got {block.shape[-1]}")
        samples = torch.cat([state[0], block.float()], -1)  # 15,600 + (k - 1) * 7,680: no padding
        pooled = self._pooled(self.frontend(samples), 256)  # [B, k, C]
        return small_gemm.linear(self.head, pooled), (samples[:, -(MIN_SAMPLES - PATCH_HOP_SAMPLES):],)


def _build(**config: Any) -> TymNet:
    return TymNet(**config)


WEIGHTS_FILE = Path(__file__).resolve().parent.parent / "assets" / "tymnet-s.safetensors"
# SHA-256 of the shipped weights (package data); set when recipes/default_model/ship.py ships a new file
SHIPPED_SHA256: str | None = "bbb1a23ca4e307b91ba464b557817de83d3fcafe23b37b6b54e672787ceecaf8"


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
