"""Weight averaging: the mean of saved epoch weights (AST/DASS ``wa``, Dasheng/SAT best-4) and an EMA.

Both act on state dicts of floating tensors; integer buffers (BatchNorm's ``num_batches_tracked``) are taken
from the last state, as the seeds' ``average_models`` effectively do.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence

import torch
from torch import Tensor, nn

__all__ = ["EMA", "average_checkpoints", "average_state_dicts"]

StateDict = dict[str, Tensor]


def average_state_dicts(states: Sequence[StateDict]) -> StateDict:
    """Uniform mean of floating tensors over `states` (computed in float64, cast back); others from the last."""
    if not states:
        raise ValueError("nothing to average: no state dicts given")
    keys = states[0].keys()
    for state in states[1:]:
        if state.keys() != keys:
            raise ValueError("cannot average state dicts with different keys")
    out: StateDict = {}
    for key in keys:
        last = states[-1][key]
        if last.is_floating_point():
            total = torch.stack([s[key].to(torch.float64) for s in states]).mean(0)
            out[key] = total.to(last.dtype)
        else:
            out[key] = last.clone()
    return out


def average_checkpoints(paths: Iterable[str | os.PathLike]) -> StateDict:
    """Average the model weights of saved checkpoints (our ``{"model": ...}`` files or plain state dicts)."""
    states = []
    for path in paths:
        state = torch.load(path, map_location="cpu", weights_only=True)
        states.append(state.get("model", state) if isinstance(state, dict) else state)
    return average_state_dicts(states)


class EMA:
    """Exponential moving average of a model's floating tensors: ``avg = decay * avg + (1 - decay) * current``.

    Buffers that are not floating point are copied. Kept in float32 on the parameters' device; its
    ``state_dict`` loads into the model like the model's own.
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.shadow: StateDict = {k: v.detach().clone().float() if v.is_floating_point() else v.detach().clone()
                                  for k, v in model.state_dict().items()}  # fmt: skip

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        for key, value in model.state_dict().items():
            shadow = self.shadow[key]
            if shadow.is_floating_point():
                shadow.mul_(self.decay).add_(value.detach().float(), alpha=1.0 - self.decay)
            else:
                shadow.copy_(value)

    def state_dict(self) -> StateDict:
        return dict(self.shadow)

    def load_state_dict(self, state: StateDict) -> None:
        missing = self.shadow.keys() - state.keys()
        if missing:
            raise ValueError(f"EMA state lacks {len(missing)} tensors, e.g. {sorted(missing)[0]}")
        self.shadow = {k: state[k].clone() for k in self.shadow}
