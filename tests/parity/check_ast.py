"""Parity of AST and SSAST (fine-tuning and pretraining) with the reference fixtures.

Model configs come from the fixture's meta.json constructors and the checkpoint itself (depth = number of
blocks stored); input lengths from the stored input tensors. Frontend tensors (waveform, fbank_kaldi, fbank,
input recomputed from audio) are checked by check_frontends.py.
"""

from __future__ import annotations

import re

import torch

import tympan
from tests.parity import Fixture, checks_for
from tympan.checkpoints import read_checkpoint


def _depth(fx: Fixture) -> int:
    state, _ = read_checkpoint(fx.checkpoint)
    return len({m.group(1) for key in state if (m := re.match(r"v\.blocks\.(\d+)\.", key))})


def _tolerance(fx: Fixture, word: str) -> dict[str, float]:
    """The atol/rtol entry of meta.json whose description mentions ``word``."""
    for name, entry in fx.meta["tolerance"].items():
        if isinstance(entry, dict) and word in name:
            return {"atol": entry["atol"], "rtol": entry["rtol"]}
    raise KeyError(f"{fx.path.name}: no tolerance mentioning {word!r}")


@checks_for("ast-base384-f10t10")
def check_ast(fx: Fixture) -> None:
    ctor = fx.meta["constructor_main"]
    tol = _tolerance(fx, "output")
    config = dict(
        depth=_depth(fx), fstride=ctor["fstride"], tstride=ctor["tstride"], input_fdim=ctor["input_fdim"],
        num_classes=ctor["label_dim"],
    )
    model_id = f"ast-{ctor['model_size']}"

    def run(name: str) -> tuple[torch.nn.Module, torch.Tensor]:
        x = fx[name]
        model = tympan.load(model_id, checkpoint=fx.checkpoint, input_tdim=x.shape[1], **config)
        with torch.no_grad():
            return model, model.forward_features(x)

    if fx.has("input"):
        model, tokens = run("input")
        with torch.no_grad():
            embedding = model.pool(tokens)
            fx.compare("output", model.head(embedding), **tol)
        if fx.has("embedding"):
            fx.compare("embedding", embedding, **tol)
    if fx.has("input_short"):  # AudioSet checkpoint into a shorter model: pos-embed centre cut
        model, tokens = run("input_short")
        with torch.no_grad():
            fx.compare("output_short", model.head(model.pool(tokens)), **tol)
        if fx.has("pos_embed_short"):
            fx.compare("pos_embed_short", model.pos_embed, **tol)
        if fx.has("last_hidden_short"):
            fx.compare("last_hidden_short", tokens, **tol)
    if fx.has("input_long"):  # longer model: bilinear interpolation
        model, tokens = run("input_long")
        with torch.no_grad():
            fx.compare("output_long", model.head(model.pool(tokens)), **tol)


def _ssast_id(ctor: dict) -> str:
    kind = "frame" if ctor["fshape"] == ctor["input_fdim"] else "patch"
    return f"ssast-{ctor['model_size']}-{kind}"


@checks_for("ssast-tiny-patch", "ssast-tiny-frame")
def check_ssast_finetune(fx: Fixture) -> None:
    ctor = fx.meta["constructor_finetune"]
    tol, pos_tol = _tolerance(fx, "outputs"), _tolerance(fx, "pos embed")
    config = dict(
        depth=_depth(fx), fshape=ctor["fshape"], tshape=ctor["tshape"], fstride=ctor["fstride"],
        tstride=ctor["tstride"], input_fdim=ctor["input_fdim"], num_classes=ctor["label_dim"],
    )
    # the reference draws a fresh random head; the fixture stores the one it used
    head = {ours: fx[f"ft_mlp_head.{theirs}"] for theirs, ours in
            (("0.weight", "norm.weight"), ("0.bias", "norm.bias"), ("1.weight", "fc.weight"), ("1.bias", "fc.bias"))}

    def load(x: torch.Tensor, pooling: str) -> torch.nn.Module:
        model = tympan.load(_ssast_id(ctor), checkpoint=fx.checkpoint, input_tdim=x.shape[1], pooling=pooling, **config)
        model.head.load_state_dict(head)
        return model

    if fx.has("input"):
        x = fx["input"]
        model = load(x, "avgtok")
        with torch.no_grad():
            tokens = model.forward_features(x)
            fx.compare("output", model(x), **tol)
            if fx.has("output_cls"):
                fx.compare("output_cls", load(x, "cls")(x), **tol)
        if fx.has("last_hidden"):
            fx.compare("last_hidden", tokens, **tol)
        if fx.has("ft_pos_embed"):
            fx.compare("ft_pos_embed", model.pos_embed, **pos_tol)
    if fx.has("input_long"):
        x = fx["input_long"]
        model = load(x, "avgtok")
        with torch.no_grad():
            fx.compare("output_long", model(x), **tol)
        if fx.has("ft_pos_embed_long"):
            fx.compare("ft_pos_embed_long", model.pos_embed, **pos_tol)


@checks_for("ssast-tiny-patch", "ssast-tiny-frame")
def check_ssast_pretrain(fx: Fixture) -> None:
    if not fx.has("pretrain_input", "mask_index"):
        return
    ctor = fx.meta["constructor_pretrain"]
    tol = _tolerance(fx, "outputs")
    x, mask_index = fx["pretrain_input"], fx["mask_index"]
    model = tympan.load(
        f"{_ssast_id(ctor)}-pretrain", checkpoint=fx.checkpoint, depth=_depth(fx), fshape=ctor["fshape"],
        tshape=ctor["tshape"], input_fdim=ctor["input_fdim"], input_tdim=x.shape[1], mask_patch=mask_index.shape[1],
    )
    with torch.no_grad():
        mpc = model.mpc(x, mask_index)
        mpg = model.mpg(x, mask_index)
    for name, value in (("mpc_pred", mpc.pred), ("mpg_pred", mpg.pred), ("mpg_target", mpg.target)):
        if fx.has(name):
            fx.compare(name, value, **tol)
    for name, value in (("mpc_nce", mpc.nce), ("mpg_mse", mpg.mse)):
        if fx.has(name):
            fx.compare(name, value.reshape(fx[name].shape), **tol)
    if fx.has("mpc_acc"):  # argmax-based: exact, but one near-tie may flip (meta: up to 1/(B*M))
        fx.compare("mpc_acc", mpc.acc.reshape(fx["mpc_acc"].shape), atol=1.0 / mask_index.numel() + 1e-7)
