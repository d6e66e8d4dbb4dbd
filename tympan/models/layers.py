"""Transformer pieces shared by every ViT-style family (AST, SSAST, Dasheng, SAT).

Parameter names follow timm's ViT (``norm1``, ``attn.qkv``, ``attn.proj``, ``norm2``, ``mlp.fc1``,
``mlp.fc2``) because AST, SSAST, Dasheng and the SAT baselines all save that layout, so their official
checkpoints map onto these modules one to one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tympan.ops import dense


def key_padding_bias(mask: Tensor, dtype: torch.dtype) -> Tensor:
    """Turn a boolean key-padding mask ``[B, N]`` (True = ignore) into an additive attention bias ``[B, 1, 1, N]``.

    The bias is the dtype's most negative finite value, not ``-inf``: a query whose keys are all masked
    then gets a uniform softmax, as in Dasheng's reference (``masked_fill(finfo.min)``), instead of NaN.
    """
    bias = torch.zeros(mask.shape, dtype=dtype, device=mask.device)
    bias = bias.masked_fill(mask, torch.finfo(dtype).min)
    return bias[:, None, None, :]


class Mlp(nn.Module):
    """Linear -> activation -> Linear."""

    def __init__(self, dim: int, hidden_dim: int, act_layer: type[nn.Module] = nn.GELU, drop: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = act_layer()
        self.fc2 = nn.Linear(hidden_dim, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: Tensor) -> Tensor:
        if type(self.act) is nn.GELU and self.act.approximate == "none" and not self.training:
            hidden = dense.linear(self.fc1, x, gelu=True)  # inference on prepacked weights, the GELU fused
            if hidden is not None:
                return dense.apply(self.fc2, hidden)
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class Attention(nn.Module):
    """Multi-head self-attention with a fused ``qkv`` projection, on ``F.scaled_dot_product_attention``.

    ``memory`` (optional, ``[B, M, D]``) is prepended to the keys and values only: queries come from ``x``.
    That is SAT's streaming attention expressed with the same weights.
    """

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, attn_drop: float = 0.0, proj_drop: float = 0.0):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.attn_drop = attn_drop
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: Tensor, attn_bias: Tensor | None = None, memory: Tensor | None = None) -> Tensor:
        b, n, d = x.shape
        if memory is None:
            qkv = dense.apply(self.qkv, x)  # in inference on a prepacked weight
            q, k, v = qkv.view(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        else:
            w_q, w_kv = self.qkv.weight.split([d, 2 * d])
            b_q, b_kv = self.qkv.bias.split([d, 2 * d]) if self.qkv.bias is not None else (None, None)
            q = F.linear(x, w_q, b_q).view(b, n, self.num_heads, self.head_dim).transpose(1, 2)
            kv = F.linear(torch.cat([memory, x], dim=1), w_kv, b_kv)
            k, v = kv.view(b, -1, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_bias, dropout_p=self.attn_drop if self.training else 0.0
        )
        return self.proj_drop(dense.apply(self.proj, out.transpose(1, 2).reshape(b, n, d)))


class DropPath(nn.Module):
    """Stochastic depth: drop the whole residual branch per sample while training."""

    def __init__(self, p: float = 0.0):
        super().__init__()
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(1.0 - self.p)
        return x * keep / (1.0 - self.p)


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(norm1(x))`` then ``x + mlp(norm2(x))``."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        norm_eps: float = 1e-6,
        act_layer: type[nn.Module] = nn.GELU,
        drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: float = 0.0,
    ):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=drop)
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=act_layer, drop=drop)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: Tensor, attn_bias: Tensor | None = None, memory: Tensor | None = None) -> Tensor:
        mem = self.norm1(memory) if memory is not None else None
        x = x + self.drop_path(self.attn(self.norm1(x), attn_bias=attn_bias, memory=mem))
        return x + self.drop_path(self.mlp(self.norm2(x)))


def stochastic_depth_rates(depth: int, drop_path_rate: float) -> list[float]:
    """Linearly increasing drop-path rates over the blocks, as timm and the seeds use."""
    return [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]
