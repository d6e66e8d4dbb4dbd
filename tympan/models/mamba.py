"""The Mamba-1 selective state-space mixer, as ``mamba_ssm`` 1.1.3's ``Mamba`` computes it (no inference cache).

One mixer maps hidden states ``[B, L, D]`` to ``[B, L, D]``:

1. ``in_proj`` (no bias) gives ``xz`` ``[B, 2E, L]``; the first ``E`` channels are the SSM input ``x``, the
   last ``E`` the gate ``z`` (``E = expand * D``);
2. a causal depthwise ``conv1d`` (``d_conv - 1`` frames of left zero padding) and SiLU give ``u``;
3. ``x_proj`` splits per token into ``dt`` (rank ``R``), ``B`` and ``C`` (``N`` each);
   ``delta = softplus(dt_proj(dt))`` (the ``dt_proj`` bias is added inside the softplus);
4. the selective scan (zero-order hold on ``A = -exp(A_log)``, Euler on ``B``, ``D`` skip, ``SiLU(z)`` gate);
5. ``out_proj`` (no bias).

SSAM stacks these unidirectionally (one left-to-right scan per block). The parameter names equal
``mamba_ssm``'s, so a ``blocks.<i>.mixer.*`` slice of an official checkpoint loads unchanged. The helpers
:func:`dt_bias_init` and :func:`s4d_real_log_a` are the Mamba initialisers, shared with DASS's SS2D.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tympan.ops import selective_scan


def resolve_dt_rank(dt_rank: int | str, d_model: int) -> int:
    """Mamba's ``dt_rank="auto"``: ``ceil(d_model / 16)``."""
    if dt_rank == "auto":
        return math.ceil(d_model / 16)
    if not isinstance(dt_rank, int) or dt_rank < 1:
        raise ValueError(f"dt_rank must be 'auto' or a positive int, got {dt_rank!r}")
    return dt_rank


@torch.no_grad()
def dt_bias_init(bias: Tensor, dt_min: float = 1e-3, dt_max: float = 0.1, dt_floor: float = 1e-4) -> Tensor:
    """Fill ``bias`` with softplus^-1(dt), dt log-uniform in [dt_min, dt_max] floored at ``dt_floor`` (Mamba init)."""
    log_dt = torch.rand_like(bias) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)
    dt = torch.exp(log_dt).clamp(min=dt_floor)
    return bias.copy_(dt + torch.log(-torch.expm1(-dt)))


def s4d_real_log_a(rows: int, d_state: int) -> Tensor:
    """S4D-real initialisation of ``A_log``: ``log(n + 1)`` for state ``n``, repeated over ``rows`` channels."""
    return torch.log(torch.arange(1, d_state + 1, dtype=torch.float32)).repeat(rows, 1)


class MambaTrace(NamedTuple):
    """Every intermediate of one mixer call, in ``mamba_ssm``'s layouts (channels before length)."""

    xz: Tensor  # [B, 2E, L] in_proj output: x then z
    x_conv: Tensor  # [B, E, L] SiLU(causal depthwise conv(x)), the scan input u
    delta: Tensor  # [B, E, L] softplus(dt_proj(dt)), bias included
    B: Tensor  # [B, N, L]
    C: Tensor  # [B, N, L]
    y: Tensor  # [B, E, L] scan output with D skip, times SiLU(z)
    output: Tensor  # [B, L, D]


class MambaMixer(nn.Module):
    """Unidirectional Mamba-1 mixer ``[B, L, D] -> [B, L, D]`` with ``mamba_ssm``'s parameter names."""

    def __init__(
        self,
        d_model: int,
        d_state: int = 16,
        d_conv: int = 4,
        expand: float = 2,
        dt_rank: int | str = "auto",
        conv_bias: bool = True,
        bias: bool = False,
        dt_min: float = 1e-3,
        dt_max: float = 0.1,
        dt_init_floor: float = 1e-4,
    ):
        super().__init__()
        self.d_model = d_model
        self.d_state = d_state
        self.d_inner = int(expand * d_model)
        self.dt_rank = resolve_dt_rank(dt_rank, d_model)
        e, r, n = self.d_inner, self.dt_rank, d_state
        self.in_proj = nn.Linear(d_model, 2 * e, bias=bias)
        self.conv1d = nn.Conv1d(e, e, d_conv, groups=e, padding=d_conv - 1, bias=conv_bias)
        self.x_proj = nn.Linear(e, r + 2 * n, bias=False)
        self.dt_proj = nn.Linear(r, e, bias=True)
        self.A_log = nn.Parameter(s4d_real_log_a(e, n))
        self.D = nn.Parameter(torch.ones(e))
        self.out_proj = nn.Linear(e, d_model, bias=bias)
        nn.init.uniform_(self.dt_proj.weight, -(r**-0.5), r**-0.5)
        dt_bias_init(self.dt_proj.bias, dt_min, dt_max, dt_init_floor)

    def trace(self, hidden: Tensor) -> MambaTrace:
        """Run the mixer on ``hidden`` ``[B, L, D]`` and keep every intermediate."""
        length = hidden.shape[1]
        xz = self.in_proj(hidden).transpose(1, 2)
        x, z = xz.chunk(2, dim=1)
        x_conv = F.silu(self.conv1d(x)[..., :length])
        dt, b, c = self.x_proj(x_conv.transpose(1, 2)).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        delta = F.softplus(self.dt_proj(dt)).transpose(1, 2)
        b, c = b.transpose(1, 2), c.transpose(1, 2)
        a = -torch.exp(self.A_log.float())
        y = selective_scan(x_conv, delta, a, b, c, D=self.D.float(), z=z, delta_softplus=False)
        return MambaTrace(xz, x_conv, delta, b, c, y, self.out_proj(y.transpose(1, 2)))

    def forward(self, hidden: Tensor) -> Tensor:
        return self.trace(hidden).output


def mamba_config_from_state(state: dict[str, Tensor]) -> dict:
    """``MambaMixer`` keyword arguments that fit a mixer state dict (``mamba_ssm`` names, no prefix)."""
    d_inner, d_state = state["A_log"].shape
    d_model = state["in_proj.weight"].shape[1]
    return dict(
        d_model=d_model,
        d_state=d_state,
        d_conv=state["conv1d.weight"].shape[-1],
        expand=d_inner // d_model if d_inner % d_model == 0 else d_inner / d_model,
        dt_rank=state["dt_proj.weight"].shape[1],
        conv_bias="conv1d.bias" in state,
        bias="in_proj.bias" in state,
    )
