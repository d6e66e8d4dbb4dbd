"""DASS: Distilled Audio State Space models (Bhati et al., SLT 2024), a VMamba "v2" backbone on fbank images.

The input is AST's normalised Kaldi fbank ``[B, T, 128]`` (:func:`tympan.features.ast_fbank`), seen as a
one-channel image ``[B, 1, 128 mel, T]``. A two-conv stride-4 stem, four stages of VSS blocks (SS2D + MLP,
pre-norm, channel-first) joined by stride-2 conv downsampling, a channel LayerNorm, global average pooling
and a linear head give AudioSet logits. There is no positional embedding and every conv pads to ``ceil(n/2)``,
so any number of frames works with the same weights (cost linear in ``T``).

SS2D (VMamba forward type ``v05_noz``): 1x1 ``in_proj`` -> depthwise 3x3 conv -> SiLU -> four scans of the
feature map (row-major, column-major and both reversed; :func:`cross_scan`) through one selective scan with
per-direction ``B``/``C`` -> :func:`cross_merge` -> channel LayerNorm -> 1x1 ``out_proj``. No ``z`` gate.

Parameter names follow the original ``VSSM`` where they are meaningful (``op.x_proj_weight``, ``op.A_logs``,
``mlp.fc1``...); the original's index-named ``Sequential`` entries become named modules:

===========================================  ======================================================
official (``module.v.`` stripped)            tympan
===========================================  ======================================================
``patch_embed.{0,2,5,7}``                    ``patch_embed.{conv1,norm1,conv2,norm2}``
``layers.{i}.downsample.{1,3}``              ``layers.{i}.downsample.{conv,norm}``
``classifier.norm`` / ``classifier.head``    ``norm`` / ``head``
===========================================  ======================================================

:func:`convert_dass_checkpoint` also reads the Hugging Face port's layout (``dass.*`` + ``head.*``).

Protocol: ``frontend`` is the ``ast-fbank`` recipe at the clip's own length (no positional embedding, so no window);
``forward`` returns logits; ``embed`` gives the normalised last map averaged over mel as frames (320 ms apart: column
``w`` is centred on frame ``32 w``, every stride-2 conv with kernel 3 and padding 1 mapping output ``i`` to input
``2 i``) and the head's pooled input as the scene embedding.
"""

from __future__ import annotations

import re
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tympan.models.layers import DropPath, stochastic_depth_rates
from tympan.models.mamba import dt_bias_init, resolve_dt_rank, s4d_real_log_a
from tympan.models.protocol import AudioModel, Embeddings
from tympan.models.registry import ModelEntry, StateDict, Weights, register_model
from tympan.ops import fused_scan, selective_scan
from tympan.ops.native import tracing

NUM_DIRECTIONS = 4
# Inference works on column (time) tiles of this many map positions (batch x rows x columns), and scans a long
# map one direction and one channel tile (at least SCAN_TILE_CHANNELS, at most SCAN_TILE_ELEMENTS elements unless
# that is fewer channels) at a time, so its temporaries stay small whatever the input length.
TILE_POSITIONS = 1 << 14
SCAN_TILE_ELEMENTS = 1 << 22
SCAN_TILE_CHANNELS = 32
# CPU inference with d_state 1 runs the four scans and their merge as one compiled pass when one is available
# (tympan.ops.fused_scan.cross_scan_merge); False keeps the eager cross scan (benchmarks compare the two).
FUSED_CROSS_SCAN = True

# ------------------------------------------------------------------------------------------- functional core


def cross_scan(x: Tensor) -> Tensor:
    """Four 1-D readings of a feature map ``[B, C, H, W]`` -> ``[B, 4, C, H*W]``.

    Direction 0 reads row-major (along W inside a row, i.e. along time inside a mel row), 1 column-major
    (along H inside a column), 2 and 3 are 0 and 1 reversed.
    """
    rows = x.flatten(2)
    cols = x.transpose(2, 3).flatten(2)
    forward = torch.stack([rows, cols], dim=1)
    return torch.cat([forward, forward.flip(-1)], dim=1)


def cross_merge(ys: Tensor, height: int, width: int) -> Tensor:
    """Undo :func:`cross_scan` on per-direction outputs ``[B, 4, C, H*W]`` and sum them -> ``[B, C, H, W]``."""
    both = ys[:, :2] + ys[:, 2:].flip(-1)
    b, _, c, _ = ys.shape
    rows = both[:, 0].reshape(b, c, height, width)
    cols = both[:, 1].reshape(b, c, width, height).transpose(2, 3)
    return rows + cols


def tiled_inference() -> bool:
    """True when forward passes may run tile by tile: no autograd graph and no tracing / export / compiling."""
    return not (torch.is_grad_enabled() or tracing())


def map_columns(fn: Callable[[int, int], Tensor], width: int, rows: int, out: Tensor | None = None) -> Tensor:
    """Columns ``[lo, hi)`` of a ``[B, C, H, width]`` map computed as ``fn(lo, hi)``, tile by tile, into ``out``.

    A tile holds about :data:`TILE_POSITIONS` positions (``rows`` = B * H of the output). ``fn`` may read
    ``out``'s own columns (per-position updates in place) but no others.
    """
    step = max(1, TILE_POSITIONS // max(rows, 1))
    for lo in range(0, width, step):
        hi = min(lo + step, width)
        tile = fn(lo, hi)
        if out is None:
            out = tile.new_empty(*tile.shape[:-1], width)
        out[..., lo:hi] = tile
    return out


def conv_width(conv: nn.Conv2d, width: int) -> int:
    """Output width of ``conv`` on an input ``width`` columns wide."""
    k, s, p, d = conv.kernel_size[1], conv.stride[1], conv.padding[1], conv.dilation[1]
    return (width + 2 * p - d * (k - 1) - 1) // s + 1


def conv_columns(conv: nn.Conv2d, columns: Callable[[int, int], Tensor], width: int, lo: int, hi: int) -> Tensor:
    """Output columns ``[lo, hi)`` of ``conv`` on a map ``width`` wide whose columns ``[a, b)`` are ``columns(a, b)``.

    Only the receptive field of the tile is computed; the zero padding beyond the map's edges is added here.
    """
    k, s, p, d = conv.kernel_size[1], conv.stride[1], conv.padding[1], conv.dilation[1]
    first, stop = lo * s - p, (hi - 1) * s - p + d * (k - 1) + 1
    inner_first, inner_stop = max(first, 0), min(stop, width)
    x = F.pad(columns(inner_first, inner_stop), (inner_first - first, stop - inner_stop))
    return F.conv2d(x, conv.weight, conv.bias, stride=conv.stride, padding=(conv.padding[0], 0),
                    dilation=conv.dilation, groups=conv.groups)


# ----------------------------------------------------------------------------------------------------- modules


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over ``C`` of a channel-first ``[B, C, H, W]`` map (VMamba's ``LN2D``)."""

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class Linear2d(nn.Linear):
    """A Linear layer applied per position of a channel-first map (a 1x1 conv with ``nn.Linear``'s weight)."""

    def forward(self, x: Tensor) -> Tensor:
        return F.conv2d(x, self.weight[:, :, None, None], self.bias)


class ConvMlp(nn.Module):
    """fc1 -> GELU -> fc2 on a channel-first map."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.fc1 = Linear2d(dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = Linear2d(hidden_dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class SS2D(nn.Module):
    """2-D selective scan mixer (VMamba ``SS2D``, forward type ``v05_noz``) on ``[B, C, H, W]``."""

    def __init__(
        self,
        dim: int,
        d_state: int = 1,
        ssm_ratio: float = 1.0,
        dt_rank: int | str = "auto",
        d_conv: int = 3,
        conv_bias: bool = False,
    ):
        super().__init__()
        d_inner = int(ssm_ratio * dim)
        self.d_state = d_state
        self.dt_rank = resolve_dt_rank(dt_rank, dim)
        k, r, n = NUM_DIRECTIONS, self.dt_rank, d_state
        self.in_proj = Linear2d(dim, d_inner, bias=False)
        self.conv2d = nn.Conv2d(d_inner, d_inner, d_conv, padding=(d_conv - 1) // 2, groups=d_inner, bias=conv_bias)
        self.x_proj_weight = nn.Parameter(torch.empty(k, r + 2 * n, d_inner))
        self.dt_projs_weight = nn.Parameter(torch.empty(k, d_inner, r))
        self.dt_projs_bias = nn.Parameter(torch.empty(k, d_inner))
        self.A_logs = nn.Parameter(s4d_real_log_a(k * d_inner, n))
        self.Ds = nn.Parameter(torch.ones(k * d_inner))
        self.out_norm = LayerNorm2d(d_inner)
        self.out_proj = Linear2d(d_inner, dim, bias=False)
        # VMamba init "v0": x_proj as nn.Linear's default, dt as Mamba's.
        bound = d_inner**-0.5
        nn.init.uniform_(self.x_proj_weight, -bound, bound)
        nn.init.uniform_(self.dt_projs_weight, -(r**-0.5), r**-0.5)
        dt_bias_init(self.dt_projs_bias)

    def forward(self, x: Tensor) -> Tensor:
        u = F.silu(self.conv2d(self.in_proj(x)))
        return self.project_out(self.mix(u), x.dtype)

    def project_out(self, y: Tensor, dtype: torch.dtype) -> Tensor:
        """out_proj(out_norm(y)) of merged scan outputs ``y`` (float32), cast back to the input dtype."""
        return self.out_proj(self.out_norm(y).to(dtype))

    def scan_parameters(self, channels: slice = slice(None)) -> tuple[Tensor, Tensor, Tensor]:
        """``A`` [4, C', N], ``D`` and ``delta_bias`` [4, C'] (float32) of the given channels of every direction."""
        k, n = NUM_DIRECTIONS, self.d_state
        A = -torch.exp(self.A_logs.float()).view(k, -1, n)[:, channels]
        return A, self.Ds.float().view(k, -1)[:, channels], self.dt_projs_bias.float()[:, channels]

    def mix(self, u: Tensor, tile_elements: int = SCAN_TILE_ELEMENTS) -> Tensor:
        """The four directional scans of ``u`` [B, C, H, W] merged (float32, before ``out_norm``).

        With autograd (or tracing), or when the four readings are small, the four directions run as one grouped
        scan; otherwise (inference on a long map) they run one direction and one channel tile at a time,
        accumulating into the merged map, so no four-fold copy of the map exists. Both orders add the same terms
        in the same order. ``tile_elements``: the size above which the map is scanned in tiles (tests lower it).
        """
        if (FUSED_CROSS_SCAN and tiled_inference() and self.d_state == 1 and u.device.type == "cpu"
                and u.dtype != torch.float64 and fused_scan.available()):
            return self._mix_fused(u)
        if tiled_inference() and NUM_DIRECTIONS * u.numel() > tile_elements:
            return self._mix_tiled(u, tile_elements)
        b, c, h, w = u.shape
        xs = cross_scan(u)  # [B, 4, C, L]
        x_dbl = torch.matmul(self.x_proj_weight, xs)  # [B, 4, R + 2N, L]
        dts, bs, cs = x_dbl.split([self.dt_rank, self.d_state, self.d_state], dim=2)
        dts = torch.matmul(self.dt_projs_weight, dts)  # [B, 4, C, L]
        A, D, delta_bias = self.scan_parameters()
        ys = selective_scan(
            xs.reshape(b, -1, h * w),
            dts.reshape(b, -1, h * w),
            A.reshape(-1, self.d_state),
            bs.contiguous(),
            cs.contiguous(),
            D=D.reshape(-1),
            delta_bias=delta_bias.reshape(-1),
            delta_softplus=True,
        )
        return cross_merge(ys.reshape(b, NUM_DIRECTIONS, c, h * w), h, w)

    def _mix_fused(self, u: Tensor) -> Tensor:
        """CPU inference with N = 1: the four scans and their merge in one C pass per channel
        (:func:`tympan.ops.fused_scan.cross_scan_merge`); x_proj is per position, so it runs on the row-order map."""
        b, c, h, w = u.shape
        proj = torch.matmul(self.x_proj_weight.reshape(-1, c), u.flatten(2)).view(b, NUM_DIRECTIONS, -1, h * w)
        A, D, delta_bias = self.scan_parameters()
        return fused_scan.cross_scan_merge(u, proj, self.dt_projs_weight, A[..., 0], D, delta_bias)

    def _mix_tiled(self, u: Tensor, tile_elements: int) -> Tensor:
        b, c, h, w = u.shape
        r, n = self.dt_rank, self.d_state
        rows = u.flatten(2)  # direction 0 is a view of the map

        def transposed(t: Tensor) -> Tensor:  # [B, ., L] in row order -> column order
            return t.reshape(b, -1, h, w).transpose(2, 3).reshape(b, -1, h * w)

        def reading(t: Tensor, direction: int) -> Tensor:  # row-order [B, ., L] as read by ``direction``
            t = transposed(t) if direction % 2 else t
            return t.flip(-1) if direction >= 2 else t

        # x_proj of every direction from the row-order map (a per-position product: reorder the small result)
        projections = torch.matmul(self.x_proj_weight.reshape(-1, c), rows).view(b, NUM_DIRECTIONS, r + 2 * n, -1)
        projections = [reading(projections[:, k], k) for k in range(NUM_DIRECTIONS)]
        merged = torch.empty(b, c, h, w, dtype=torch.float32, device=u.device)
        tiles = -(-c // max(min(SCAN_TILE_CHANNELS, c), tile_elements // rows[:, 0].numel()))
        step = -(-c // tiles)
        for start in range(0, c, step):
            channels = slice(start, min(start + step, c))
            A, D, delta_bias = self.scan_parameters(channels)
            tile = rows[:, channels]

            def scan(k: int) -> Tensor:
                dt, bs, cs = projections[k].split([r, n, n], dim=1)
                delta = torch.matmul(self.dt_projs_weight[k, channels], dt)
                return selective_scan(reading(tile, k), delta, A[k], bs, cs, D=D[k], delta_bias=delta_bias[k],
                                      delta_softplus=True)

            along_rows = scan(0).add_(scan(2).flip(-1))
            merged[:, channels] = along_rows.view(b, -1, h, w)
            del along_rows
            along_cols = scan(1).add_(scan(3).flip(-1))
            merged[:, channels] += along_cols.view(b, -1, w, h).transpose(2, 3)
        return merged


class VSSBlock(nn.Module):
    """Pre-norm VMamba block: ``x + SS2D(norm(x))`` then ``x + MLP(norm2(x))``."""

    def __init__(self, dim: int, mlp_ratio: float = 4.0, drop_path: float = 0.0, **ssm_kwargs):
        super().__init__()
        self.norm = LayerNorm2d(dim)
        self.op = SS2D(dim, **ssm_kwargs)
        self.norm2 = LayerNorm2d(dim)
        self.mlp = ConvMlp(dim, int(dim * mlp_ratio))
        self.drop_path = DropPath(drop_path)

    def forward(self, x: Tensor) -> Tensor:
        if not self.training and tiled_inference():
            return self._forward_tiled(x)
        x = x + self.drop_path(self.op(self.norm(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))

    def _forward_tiled(self, x: Tensor) -> Tensor:
        """The eval forward over column tiles: only ``x``, the scan input, the merged scans and the output are whole
        maps (the norms, projections, depthwise conv and MLP see one tile at a time)."""
        op, (b, _, h, w) = self.op, x.shape
        u = map_columns(lambda lo, hi: F.silu(conv_columns(
            op.conv2d, lambda a, z: op.in_proj(self.norm(x[..., a:z])), w, lo, hi)), w, b * h)
        y = op.mix(u)
        del u
        out = map_columns(lambda lo, hi: x[..., lo:hi] + op.project_out(y[..., lo:hi], x.dtype), w, b * h)
        del y
        return map_columns(lambda lo, hi: out[..., lo:hi] + self.mlp(self.norm2(out[..., lo:hi])), w, b * h, out)


class PatchEmbed(nn.Module):
    """Stride-4 stem: conv3x3/2 -> LN2d -> GELU -> conv3x3/2 -> LN2d (VMamba ``patchembed_version="v2"``)."""

    def __init__(self, in_chans: int, dim: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_chans, dim // 2, 3, stride=2, padding=1)
        self.norm1 = LayerNorm2d(dim // 2)
        self.conv2 = nn.Conv2d(dim // 2, dim, 3, stride=2, padding=1)
        self.norm2 = LayerNorm2d(dim)

    def forward(self, x: Tensor) -> Tensor:
        if tiled_inference():  # column tiles, each computed from its receptive field only
            width, mid = x.shape[-1], conv_width(self.conv1, x.shape[-1])
            out_width, rows = conv_width(self.conv2, mid), x.shape[0] * x.shape[2] // 4

            def hidden(lo: int, hi: int) -> Tensor:
                return F.gelu(self.norm1(conv_columns(self.conv1, lambda a, z: x[..., a:z], width, lo, hi)))

            return map_columns(lambda lo, hi: self.norm2(conv_columns(self.conv2, hidden, mid, lo, hi)), out_width,
                               rows)
        return self.norm2(self.conv2(F.gelu(self.norm1(self.conv1(x)))))


class Downsample(nn.Module):
    """conv3x3/2 (C -> C') -> LN2d (VMamba ``downsample_version="v3"``)."""

    def __init__(self, dim: int, out_dim: int):
        super().__init__()
        self.conv = nn.Conv2d(dim, out_dim, 3, stride=2, padding=1)
        self.norm = LayerNorm2d(out_dim)

    def forward(self, x: Tensor) -> Tensor:
        if tiled_inference():
            width, rows = x.shape[-1], x.shape[0] * x.shape[2] // 2
            return map_columns(lambda lo, hi: self.norm(conv_columns(self.conv, lambda a, z: x[..., a:z], width, lo,
                                                                     hi)), conv_width(self.conv, width), rows)
        return self.norm(self.conv(x))


class Stage(nn.Module):
    """``depth`` VSS blocks, then (except in the last stage) downsampling to the next width."""

    def __init__(self, dim: int, depth: int, out_dim: int | None, drop_paths: Sequence[float], **block_kwargs):
        super().__init__()
        self.blocks = nn.Sequential(*(VSSBlock(dim, drop_path=p, **block_kwargs) for p in drop_paths[:depth]))
        self.downsample = Downsample(dim, out_dim) if out_dim is not None else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.downsample(self.blocks(x))


class DASS(AudioModel):
    """DASS audio tagger: normalised fbank ``[B, T, n_mels]`` -> logits ``[B, num_classes]``.

    ``forward_features`` gives the last stage's map ``[B, C, ceil(n_mels/32), ceil(T/32)]`` (H = mel, W = time);
    ``pooled`` the ``[B, C]`` vector the head reads.
    """

    def __init__(
        self,
        depths: Sequence[int] = (2, 2, 8, 2),
        dims: Sequence[int] = (96, 192, 384, 768),
        num_classes: int = 527,
        num_mel_bins: int = 128,
        in_chans: int = 1,
        d_state: int = 1,
        ssm_ratio: float = 1.0,
        dt_rank: int | str = "auto",
        d_conv: int = 3,
        conv_bias: bool = False,
        mlp_ratio: float = 4.0,
        drop_path_rate: float = 0.2,
    ):
        super().__init__()
        if len(depths) != len(dims):
            raise ValueError(f"depths {list(depths)} and dims {list(dims)} must have the same length")
        self.num_mel_bins = num_mel_bins
        self.num_features = self.embedding_size = self.frame_embedding_size = dims[-1]
        self.num_classes = max(num_classes, 0)
        self.classifier = "head" if num_classes > 0 else None
        self.block_types = (VSSBlock,)
        self.frame_hop_seconds = 2 ** (1 + len(dims)) * 0.01  # stem /4, then /2 per downsampling stage
        self.min_samples = 400  # one 25 ms Kaldi frame
        from tympan.features import get_frontend  # imported here: features may import models' helpers

        self.frontend = get_frontend("ast-fbank", num_mel_bins=num_mel_bins)
        self.patch_embed = PatchEmbed(in_chans, dims[0])
        rates = stochastic_depth_rates(sum(depths), drop_path_rate)
        starts = [sum(depths[:i]) for i in range(len(depths))]
        ssm = dict(d_state=d_state, ssm_ratio=ssm_ratio, dt_rank=dt_rank, d_conv=d_conv, conv_bias=conv_bias)
        self.layers = nn.ModuleList(
            Stage(
                dims[i],
                depths[i],
                dims[i + 1] if i + 1 < len(dims) else None,
                rates[starts[i]:],
                mlp_ratio=mlp_ratio,
                **ssm,
            )
            for i in range(len(dims))
        )
        self.norm = LayerNorm2d(dims[-1])
        self.head = nn.Linear(dims[-1], num_classes) if num_classes > 0 else nn.Identity()
        self.apply(_init_linear)

    def _check_input(self, fbank: Tensor) -> None:
        if fbank.dim() != 3 or fbank.shape[-1] != self.num_mel_bins:
            raise ValueError(
                f"DASS expects a normalised fbank [batch, frames, {self.num_mel_bins}], got shape {tuple(fbank.shape)}"
            )

    def forward_features(self, fbank: Tensor) -> Tensor:
        """Last-stage feature map ``[B, C, H, W]`` before the final norm (H = mel axis, W = time axis)."""
        self._check_input(fbank)
        x = self.patch_embed(fbank.unsqueeze(1).transpose(2, 3))
        for stage in self.layers:
            x = stage(x)
        return x

    def pooled(self, fbank: Tensor) -> Tensor:
        """Pooled clip embedding ``[B, C]``: channel LayerNorm then the mean over (mel, time) positions."""
        return self.pool(self.forward_features(fbank))

    def embed(self, fbank: Tensor, windows_per_batch: int = 16) -> Embeddings:
        """The whole clip at once: normalised last map averaged over mel ``[B, W, C]``, scene = their mean."""
        frames = self.norm(self.forward_features(fbank)).mean(2).transpose(1, 2)
        return Embeddings(frames.mean(1), frames, self.frame_hop_seconds, 0.0125)

    def pool(self, features: Tensor) -> Tensor:
        """The head's input from a feature map: channel LayerNorm then the mean over positions."""
        return self.norm(features).mean(dim=(2, 3))

    def forward(self, fbank: Tensor) -> Tensor:
        return self.head(self.pooled(fbank))


def _init_linear(module: nn.Module) -> None:
    """VSSM._init_weights: truncated-normal(0.02) Linear weights and zero biases; LayerNorm 1/0."""
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


# ------------------------------------------------------------------------------------------------- converters

_OFFICIAL_RENAMES = [
    (r"^patch_embed\.0\.", "patch_embed.conv1."),
    (r"^patch_embed\.2\.", "patch_embed.norm1."),
    (r"^patch_embed\.5\.", "patch_embed.conv2."),
    (r"^patch_embed\.7\.", "patch_embed.norm2."),
    (r"^(layers\.\d+\.downsample)\.1\.", r"\1.conv."),
    (r"^(layers\.\d+\.downsample)\.3\.", r"\1.norm."),
    (r"^classifier\.norm\.", "norm."),
    (r"^classifier\.head\.", "head."),
]
_HF_RENAMES = [
    (r"^dass\.patch_embeddings\.projection\.0\.", "patch_embed.conv1."),
    (r"^dass\.patch_embeddings\.projection\.1\.", "patch_embed.norm1."),
    (r"^dass\.patch_embeddings\.projection\.3\.", "patch_embed.conv2."),
    (r"^dass\.patch_embeddings\.projection\.4\.", "patch_embed.norm2."),
    (r"^dass\.(layers\.\d+\.downsample)\.down\.", r"\1.conv."),
    (r"^dass\.(layers\.\d+\.downsample)\.norm\.", r"\1.norm."),
    (r"^dass\.norm\.", "norm."),
    (r"\.op\.x_proj\.weight$", ".op.x_proj_weight"),
    (r"\.op\.dt_projs\.weight$", ".op.dt_projs_weight"),
    (r"^dass\.", ""),
]


def _rename(key: str, rules: list[tuple[str, str]]) -> str:
    for pattern, replacement in rules:
        key = re.sub(pattern, replacement, key)
    return key


def convert_dass_checkpoint(state: StateDict, model: nn.Module | None = None) -> StateDict:
    """Map a DASS checkpoint onto our keys; our own layout passes through unchanged.

    Reads the official release / training layout (``v.*`` once DataParallel's ``module.`` is stripped, or
    bare VSSM keys as in the VMamba ImageNet checkpoints) and the Hugging Face port (``dass.*`` + ``head.*`` of
    ``DASSForAudioClassification``, or the bare ``DASSModel``; ``x_proj``/``dt_projs`` stored flat as grouped
    Linear weights). With a ``model``, tensors are given the
    model's shapes where the original code adapts them: flat projection weights are viewed as
    ``[4, ., .]``, and a 3-channel (ImageNet) stem conv is summed over its input channels for a 1-channel stem.
    """
    if any(k.startswith("patch_embeddings.") for k in state):  # HF base model (DASSModel) without the head
        state = {f"dass.{k}": v for k, v in state.items()}
    if any(k.startswith("dass.") for k in state):
        out = {_rename(k, _HF_RENAMES): v for k, v in state.items()}
    elif any(k.startswith("v.") for k in state) or "patch_embed.0.weight" in state:
        out = {_rename(k[2:] if k.startswith("v.") else k, _OFFICIAL_RENAMES): v for k, v in state.items()}
    else:
        out = dict(state)
    if model is not None:
        own = model.state_dict()
        for key, value in out.items():
            target = own.get(key)
            if target is None or target.shape == value.shape:
                continue
            if key.endswith(("op.x_proj_weight", "op.dt_projs_weight")) and target.numel() == value.numel():
                out[key] = value.reshape(target.shape)
            elif key == "patch_embed.conv1.weight" and value.shape[1] != target.shape[1] and target.shape[1] == 1:
                out[key] = value.sum(dim=1, keepdim=True)
    return out


def dass_config_from_state(state: StateDict) -> dict:
    """Depths, widths, state size and head size of a DASS checkpoint in any layout our converter reads."""
    ours = convert_dass_checkpoint(state)
    num_stages = 1 + sum(1 for k in ours if re.fullmatch(r"layers\.\d+\.downsample\.conv\.weight", k))
    dims = [ours["patch_embed.conv2.weight"].shape[0]]
    dims += [ours[f"layers.{i}.downsample.conv.weight"].shape[0] for i in range(num_stages - 1)]
    blocks = {(int(m[1]), int(m[2])) for k in ours if (m := re.match(r"layers\.(\d+)\.blocks\.(\d+)\.", k))}
    depths = [sum(1 for stage, _ in blocks if stage == i) for i in range(num_stages)]
    a_log = next(v for k, v in ours.items() if k.endswith("op.A_logs"))
    in_chans = ours["patch_embed.conv1.weight"].shape[1]
    config = dict(depths=depths, dims=dims, d_state=a_log.shape[1], in_chans=in_chans)
    if "head.weight" in ours:
        config["num_classes"] = ours["head.weight"].shape[0]
    return config


# --------------------------------------------------------------------------------------------------- registry

_PAPER = "Bhati et al., DASS: Distilled Audio State Space Models (SLT 2024, arXiv:2407.04082)"
_HF_NOTE = (
    "Hugging Face port (transformers-DASS layout, model.safetensors); the GitHub release files "
    "DASS_{small,medium}.pth (v1, official module.v.* layout) load with checkpoint=PATH"
)

for _name, _depths, _rate, _repo, _desc in (
    ("dass-small", (2, 2, 8, 2), 0.2, "saurabhati/DASS_small_AudioSet_50.1", "DASS-Small (30M) AudioSet tagger"),
    ("dass-medium", (2, 2, 20, 2), 0.3, "saurabhati/DASS_medium_AudioSet_50.2", "DASS-Medium (49M) AudioSet tagger"),
):
    register_model(
        ModelEntry(
            name=_name,
            family="dass",
            build=DASS,
            config=dict(depths=_depths, dims=(96, 192, 384, 768), num_classes=527, drop_path_rate=_rate),
            weights=Weights(
                url=f"https://huggingface.co/{_repo}/resolve/main/model.safetensors",
                filename=f"{_repo.split('/')[1]}.safetensors",
                notes=_HF_NOTE,
            ),
            convert_checkpoint=convert_dass_checkpoint,
            description=f"{_desc}; {_PAPER}. Input: normalised AST fbank [B, T, 128], any T.",
            input_kind="ast-fbank",
            input_shape=(1, 1024, 128),
            labels="audioset",
            classifier="head",
            block_types=(VSSBlock,),
            test_config=dict(depths=(1, 1, 1, 1), dims=(8, 16, 32, 64)),
        )
    )
