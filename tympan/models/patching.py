"""Spectrogram patch embedding and 2-D positional-embedding grid helpers.

ViT-style audio models (AST, SSAST, ...) cut a ``[F, T]`` spectrogram into possibly overlapping
``fshape x tshape`` patches and learn one positional embedding per patch of a ``f_dim x t_dim`` grid.
When a checkpoint meets a model with another grid (other input length, other stride), the originals cut
or resize that grid; the pure functions here are those building blocks, written once.

Grids are ``[1, D, f_dim, t_dim]`` tensors (frequency = image height, time = width); token sequences are
``[1, num_prefix + f_dim * t_dim, D]`` in frequency-major order (token index = f * t_dim + t).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

Pair = tuple[int, int]


def patch_grid(input_fdim: int, input_tdim: int, patch: Pair, stride: Pair) -> Pair:
    """Number of patches along frequency and time: ``(size - patch) // stride + 1`` (trailing frames dropped)."""
    if input_fdim < patch[0] or input_tdim < patch[1]:
        raise ValueError(
            f"input {input_fdim} x {input_tdim} (mel bins x frames) is smaller than one {patch[0]} x {patch[1]} patch"
        )
    if min(stride) < 1:
        raise ValueError(f"strides must be positive, got {stride}")
    return (input_fdim - patch[0]) // stride[0] + 1, (input_tdim - patch[1]) // stride[1] + 1


class PatchEmbed(nn.Module):
    """``Conv2d(in_chans, D, patch, stride)`` over ``[B, C, F, T]``, flattened to tokens ``[B, f_dim * t_dim, D]``.

    A stride smaller than the patch gives overlapping patches (AST's 16x16 kernel with stride 10).
    """

    def __init__(self, embed_dim: int, patch: Pair = (16, 16), stride: Pair = (16, 16), in_chans: int = 1):
        super().__init__()
        self.patch = tuple(patch)
        self.stride = tuple(stride)
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=self.patch, stride=self.stride)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


def split_pos_embed(pos_embed: Tensor, num_prefix: int, grid: Pair) -> tuple[Tensor, Tensor]:
    """Split ``[1, num_prefix + f*t, D]`` into prefix-token rows ``[1, num_prefix, D]`` and a grid ``[1, D, f, t]``."""
    f_dim, t_dim = grid
    patches = pos_embed[:, num_prefix:]
    if patches.shape[1] != f_dim * t_dim:
        raise ValueError(f"pos_embed has {patches.shape[1]} patch rows, not {f_dim} x {t_dim} = {f_dim * t_dim}")
    return pos_embed[:, :num_prefix], patches.transpose(1, 2).reshape(1, -1, f_dim, t_dim)


def join_pos_embed(prefix: Tensor, grid: Tensor) -> Tensor:
    """Inverse of :func:`split_pos_embed`: flatten the grid frequency-major and prepend the prefix rows."""
    return torch.cat([prefix, grid.flatten(2).transpose(1, 2)], dim=1)


def centre_cut(grid: Tensor, size: int, dim: int) -> Tensor:
    """Keep ``size`` centre entries of ``grid`` along ``dim``: ``[n//2 - size//2, n//2 - size//2 + size)``."""
    start = grid.shape[dim] // 2 - size // 2
    return grid.narrow(dim, start, size)


def resize_grid(grid: Tensor, size: Pair) -> Tensor:
    """Bilinear resize of a ``[1, D, f, t]`` grid (``align_corners=False``, no antialiasing), as the originals do."""
    return F.interpolate(grid, size=tuple(size), mode="bilinear", align_corners=False)


def adapt_grid(grid: Tensor, target: Pair, time_resize_rows: int | None = None) -> Tensor:
    """Fit a ``[1, D, f_src, t_src]`` positional grid to ``target = (f, t)`` the way AST and SSAST do.

    Time first: keep the centre ``t`` columns when shrinking, else bilinear-resize to ``(rows, t)`` where
    ``rows`` is ``f_src`` (AST) or SSAST's hard-coded ``time_resize_rows`` (8). Then frequency: keep the
    centre ``f`` rows when shrinking, else bilinear-resize to ``(f, t)``. A resize to the same size is an
    exact identity, so AST's "cut when equal" and SSAST's "resize when equal" both hold.
    """
    f_src, t_src = grid.shape[-2:]
    f_dim, t_dim = target
    if t_dim < t_src:
        grid = centre_cut(grid, t_dim, dim=-1)
    else:
        grid = resize_grid(grid, (time_resize_rows or f_src, t_dim))
    if f_dim < f_src:
        return centre_cut(grid, f_dim, dim=-2)
    return resize_grid(grid, (f_dim, t_dim))
