"""Widen a TymNet export's last block (more output channels), keeping what it computes (net2net style).

    python recipes/default_model/widen.py IN.safetensors OUT.safetensors --width 768 [--noise 0.01] [--seed 0]

Each new channel of the last pointwise convolution copies an existing one (its weights and BatchNorm); the head and
the projection split their input weight over a channel and its copies, so the widened model gives the same outputs
(up to ``--noise``: a small relative perturbation of the copies, which lets them drift apart once trained; exact
copies would get identical gradients forever). Used to warm-start a wider student from a trained one.
"""

from __future__ import annotations

import argparse
import sys

import torch
from safetensors.torch import load_file

from tympan.files import write_safetensors


def widen(state: dict[str, torch.Tensor], width: int, noise: float = 0.01, seed: int = 0) -> dict[str, torch.Tensor]:
    """A state dict whose last block has `width` output channels, equal in function to `state` (noise aside)."""
    last = max(int(k.split(".")[1]) for k in state if k.startswith("blocks."))
    prefix = f"blocks.{last}."
    old = state[prefix + "pw.weight"].shape[0]
    if width < old:
        raise ValueError(f"--width {width} is narrower than the {old} channels the model has")
    gen = torch.Generator().manual_seed(seed)
    source = torch.cat([torch.arange(old), torch.randint(0, old, (width - old,), generator=gen)])
    copies = torch.bincount(source, minlength=old).float()
    out = dict(state)
    pw = state[prefix + "pw.weight"][source].clone()
    pw[old:] += noise * pw[old:].std() * torch.randn(pw[old:].shape, generator=gen)
    out[prefix + "pw.weight"] = pw
    for name in ("weight", "bias", "running_mean", "running_var"):
        out[prefix + "bn2." + name] = state[prefix + "bn2." + name][source].clone()
    for layer in ("head", "projection"):
        if layer + ".weight" in state:
            out[layer + ".weight"] = (state[layer + ".weight"] / copies)[:, source].contiguous()
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("source")
    parser.add_argument("out")
    parser.add_argument("--width", type=int, required=True)
    parser.add_argument("--noise", type=float, default=0.01)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    write_safetensors(args.out, widen(load_file(args.source), args.width, args.noise, args.seed))
    return 0


if __name__ == "__main__":
    sys.exit(main())
