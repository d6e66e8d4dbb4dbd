"""tympan.train on real FSDD clips at toy sizes: config, schedules, averaging, objectives, evaluation, bf16,
and a SIGKILL mid-epoch followed by --resume that ends bit-exactly where an uninterrupted run does."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import tympan
from tympan.data import collate_audio, fsdd_datafile, read_datafile
from tympan.eval.metrics import multilabel_metrics, singlelabel_metrics
from tympan.train import (
    EMA,
    ConfigError,
    Trainer,
    average_state_dicts,
    distillation_loss,
    label_mapping,
    load_config,
    lr_multiplier,
    precompute_teacher_outputs,
)
from tympan.train.objectives import ModelTeacher
from tympan.train.objectives import model_frontend

REPO = Path(__file__).resolve().parents[1]
TOY_MODEL = {"embed_dim": 32, "num_heads": 2, "depth": 1, "fshape": 64, "tshape": 4, "fstride": 64, "tstride": 4,
             "input_fdim": 64, "input_tdim": 40}  # fmt: skip


def toy_config(data_dir: Path, out: Path, **sections) -> list[str]:
    """Overrides for a seconds-long run: 40 FSDD clips of one speaker, a 1-block 32-d SSAST-frame model."""
    items = {
        "model.id": "ssast-tiny-frame",
        "model.overrides": json.dumps(TOY_MODEL),
        "data.datafile": "fsdd",
        "data.root": str(data_dir),
        "data.train": '{speaker: george, take: {min: 10, max: 13}}',
        "data.valid": '{speaker: george, take: {min: 5, max: 6}}',
        "data.clip_seconds": 0.4,
        "data.cache": True,
        "objective.kind": "ce",
        "optim.lr": 3e-3,
        "schedule.warmup_steps": 2,
        "train.epochs": 2,
        "train.batch_size": 8,
        "train.threads": 1,
        "train.progress": False,
        "train.log_every": 1,
        "output.dir": str(out),
    }
    items.update(sections)
    return [f"{k}={v}" for k, v in items.items()]


def run(data_dir: Path, out: Path, **sections) -> tuple[Trainer, dict]:
    """Train in this process (single-threaded, like the subprocess runs it is compared with)."""
    threads = torch.get_num_threads()
    try:
        trainer = Trainer(load_config(None, toy_config(data_dir, out, **sections)))
        return trainer, trainer.fit()
    finally:
        torch.set_num_threads(threads)


def step_losses(out: Path) -> list[float]:
    lines = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    return [r["loss"] for r in lines if "loss" in r and "event" not in r]


# ------------------------------------------------------------------------------------------ config, schedules
def test_config_overrides_and_saved_config(tmp_path, data_dir):
    config = load_config(REPO / "recipes" / "fsdd_ssast_tiny.yaml", ["train.epochs=3", "optim.betas=[0.9,0.95]",
                                                                      f"output.dir={tmp_path}"])  # fmt: skip
    assert config["train"]["epochs"] == 3 and config["optim"]["betas"] == [0.9, 0.95]
    assert config["model"]["overrides"]["depth"] == 4  # recipe value kept, defaults filled in
    assert config["train"]["accumulation"] == 1
    config = load_config(REPO / "recipes" / "fsdd_ssast_tiny.yaml", ["model.overrides.depth=2"])
    assert config["model"]["overrides"]["depth"] == 2 and config["model"]["overrides"]["embed_dim"] == 128
    from tympan.train import save_config

    saved = load_config(save_config(config, tmp_path / "config.yaml"))
    assert saved == config  # the saved resolved config reproduces the run
    with pytest.raises(ConfigError, match="train.epoch"):
        load_config(REPO / "recipes" / "fsdd_ssast_tiny.yaml", ["train.epoch=3"])
    with pytest.raises(ConfigError, match="objective.kind"):
        load_config(REPO / "recipes" / "fsdd_ssast_tiny.yaml", ["objective.kind=focal"])


def _train_recipes() -> list[Path]:
    """The recipes ``tympan train`` reads (recipes/default_model.yaml drives its own scripts)."""
    import yaml

    from tympan.train.config import DEFAULTS

    return [p for p in sorted((REPO / "recipes").glob("*.yaml")) if set(yaml.safe_load(p.read_text())) <= set(DEFAULTS)]


@pytest.mark.parametrize("recipe", _train_recipes(), ids=lambda p: p.stem)
def test_recipes_parse(recipe):
    assert load_config(recipe)["model"]["id"] in tympan.list_models()


def test_schedules():
    cosine = {"kind": "cosine", "warmup_steps": 10, "min_lr_ratio": 0.1}
    assert lr_multiplier(cosine, 0, 100, 110) == 0.0
    assert lr_multiplier(cosine, 5, 100, 110) == 0.5
    assert lr_multiplier(cosine, 10, 100, 110) == pytest.approx(1.0)
    assert lr_multiplier(cosine, 60, 100, 110) == pytest.approx(0.55)
    assert lr_multiplier(cosine, 110, 100, 110) == pytest.approx(0.1)
    ast = {"kind": "multistep", "warmup_steps": 1000, "warmup_style": "ast", "milestones": [2, 3, 4], "gamma": 0.5}
    assert lr_multiplier(ast, 49, 5000, 25000) == 0.0  # AST refreshes the warm-up lr every 50 steps
    assert lr_multiplier(ast, 120, 5000, 25000) == pytest.approx(0.1)
    assert [lr_multiplier(ast, e * 5000, 5000, 25000) for e in range(1, 5)] == [1.0, 0.5, 0.25, 0.125]


# ------------------------------------------------------------------------------------------ averaging
def test_layer_wise_lr_decay_groups():
    """``optim.layer_decay``: lr x decay^(layers above) from the head down to the embeddings; staged models
    (DASS: layers.j.blocks.i) count their blocks in order; a model without blocks is a config error."""
    from tympan.train.trainer import build_optimizer, layer_depths

    optim = {"name": "adamw", "lr": 1.0, "weight_decay": 0.1, "betas": [0.9, 0.999], "head_lr": 10.0,
             "no_decay_1d": True, "layer_decay": 0.5}  # fmt: skip
    model = tympan.create_model("ssast-tiny-frame", **TOY_MODEL | {"depth": 2}, num_classes=10)
    lr_of = {id(p): g["base_lr"] for g in build_optimizer(model, optim).param_groups for p in g["params"]}
    expected = {"pos_embed": 0.125, "patch_embed.proj.weight": 0.125, "blocks.0.attn.qkv.weight": 0.25,
                "blocks.1.mlp.fc2.bias": 0.5, "norm.weight": 1.0, "head.fc.weight": 10.0}  # head: head_lr too
    params = dict(model.named_parameters())
    for name, lr in expected.items():
        assert lr_of[id(params[name])] == pytest.approx(lr), name
    dass = tympan.create_model("dass-small", depths=(1, 1, 2, 1), dims=(8, 16, 32, 64))
    depths = layer_depths(dass)
    assert depths["patch_embed.conv1.weight"] == 0 and depths["head.weight"] == 6
    order = [depths[f"layers.{j}.blocks.{i}.norm.weight"] for j, i in ((0, 0), (1, 0), (2, 0), (2, 1), (3, 0))]
    assert order == [1, 2, 3, 4, 5]
    assert depths["layers.0.downsample.norm.weight"] == 1  # between blocks: the depth of the block before
    with pytest.raises(ConfigError, match="layer_decay"):
        build_optimizer(torch.nn.Linear(2, 2), optim)


def test_weight_average_and_ema_hand_case():
    a = {"w": torch.tensor([1.0, 2.0]), "n": torch.tensor(3)}
    b = {"w": torch.tensor([3.0, 6.0]), "n": torch.tensor(5)}
    c = {"w": torch.tensor([5.0, 1.0]), "n": torch.tensor(7)}
    averaged = average_state_dicts([a, b, c])
    assert torch.equal(averaged["w"], torch.tensor([3.0, 3.0])) and int(averaged["n"]) == 7

    model = torch.nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(1.0)
    ema = EMA(model, decay=0.5)
    for value in (3.0, 5.0):
        with torch.no_grad():
            model.weight.fill_(value)
        ema.update(model)
    # 1 -> 0.5 * 1 + 0.5 * 3 = 2 -> 0.5 * 2 + 0.5 * 5 = 3.5
    assert ema.state_dict()["weight"].item() == 3.5


# ------------------------------------------------------------------------------------------ objectives
def test_distillation_losses_hand_values():
    s, t = torch.tensor([[1.0, 0.0, -1.0]]), torch.tensor([[0.0, 2.0, 0.0]])
    p_t = (t / 2.0).softmax(-1)
    expected = (p_t * (p_t.log() - s.log_softmax(-1))).sum()
    assert distillation_loss(s, t, "kl", temperature=2.0).item() == pytest.approx(expected.item(), rel=1e-6)
    cos = torch.nn.functional.cosine_similarity(s, t).item()
    assert distillation_loss(s, t, "cosine").item() == pytest.approx(1 - 1 / (1 + math.exp(-cos)), rel=1e-6)
    top1 = distillation_loss(s, t, "bce", top_k=1)  # soft labels: sigmoid(2) on class 1, zeros elsewhere
    target = torch.tensor([[0.0, torch.sigmoid(torch.tensor(2.0)).item(), 0.0]])
    assert top1.item() == pytest.approx(torch.nn.functional.binary_cross_entropy_with_logits(s, target).item())


def test_label_mapping_by_mid_and_append():
    from tympan.labels import LabelSet, get_label_set

    audioset = get_label_set("audioset", 527)
    yamnet_like = LabelSet(audioset.mids[:5] + ("/m/not_in_audioset",), ("a",) * 6)
    student, teacher = label_mapping("mid", 527, yamnet_like, 6, audioset)
    assert student.tolist() == [0, 1, 2, 3, 4] and teacher.tolist() == [0, 1, 2, 3, 4]
    student, teacher = label_mapping("append", 10 + 6, yamnet_like, 6, None, num_labels=10)
    assert student.tolist() == list(range(10, 16)) and teacher.tolist() == list(range(6))
    with pytest.raises(ValueError, match="label_map"):
        label_mapping("none", 10, yamnet_like, 6)


def test_scores_embedding_loss_terms():
    """The default model's objective: plain BCE + (1 - cos) by default; the temperature and logit terms vanish
    where the student equals the teacher and weigh the order of unlikely classes far more than plain BCE does."""
    from tympan.train.objectives import scores_embedding_loss

    F = torch.nn.functional
    teacher = torch.tensor([[0.9, 0.02, 0.002, 0.0]])  # YAMNet-like: a sure class, two unlikely, one at exact 0
    emb_s, emb_t = torch.tensor([[1.0, 2.0, 0.5]]), torch.tensor([[0.5, 2.0, 1.0]])
    logits = torch.tensor([[1.0, -5.0, -5.0, -20.0]])
    loss, logs = scores_embedding_loss(logits, emb_s, teacher, emb_t)
    plain = F.binary_cross_entropy_with_logits(logits, teacher) + 1 - F.cosine_similarity(emb_s, emb_t).mean()
    assert loss.item() == pytest.approx(plain.item(), rel=1e-6) and set(logs) == {"bce", "cosine", "loss"}
    t = 3.0
    soft = torch.sigmoid(torch.logit(teacher, eps=1e-7) / t)
    loss, _ = scores_embedding_loss(logits, None, teacher, None, temperature=t)
    assert loss.item() == pytest.approx(t**2 * F.binary_cross_entropy_with_logits(logits / t, soft).item(), rel=1e-6)

    def grads(**options: float) -> torch.Tensor:
        z = logits.clone().requires_grad_(True)
        scores_embedding_loss(z, None, teacher, None, **options)[0].backward()
        return z.grad[0]

    at_teacher = torch.logit(teacher, eps=1e-7).requires_grad_(True)
    for options in ({"temperature": 3.0}, {"logit_weight": 1.0}):  # the optional terms are zero at the teacher
        scores_embedding_loss(at_teacher, None, teacher, None, **{"temperature": 1.0, **options})[0].backward()
        assert at_teacher.grad[0].abs().max() < 1e-5
        at_teacher.grad = None
    # classes 1 and 2 (teacher 0.02 and 0.002, student both at -5): BCE barely tells them apart, the others do
    plain, tempered, logit = grads(), grads(temperature=3.0), grads(logit_weight=1.0)
    assert abs(plain[1] - plain[2]) < 0.02 / 4
    assert abs(tempered[1] - tempered[2]) > 5 * abs(plain[1] - plain[2])
    assert logit[1] < 0 < logit[2] and abs(logit[1] - logit[2]) > 10 * abs(plain[1] - plain[2])
    assert logit[3] == plain[3]  # below the floor on both sides: the logit term adds nothing


def test_positionwise_cosine_matches_each_position_and_skips_silent_ones():
    """The per-position hint: 1 where the maps point the same way at every position (whatever each position's
    scale), the plain mean of per-position cosines otherwise, positions where the teacher is all zero left out."""
    from tympan.train.objectives import positionwise_cosine

    torch.manual_seed(0)
    teacher = torch.rand(4, 16, 3, 2)
    scale = torch.rand(4, 1, 3, 2) + 0.1
    assert positionwise_cosine(teacher * scale, teacher).item() == pytest.approx(1.0, abs=1e-6)
    student = torch.randn(4, 16, 3, 2)
    per_position = torch.nn.functional.cosine_similarity(student, teacher, dim=1)
    assert positionwise_cosine(student, teacher).item() == pytest.approx(per_position.mean().item(), rel=1e-6)
    silent = teacher.clone()
    silent[:, :, 0, :] = 0  # the first time step of every patch silent: 4 of 6 positions count
    assert positionwise_cosine(student, silent).item() == pytest.approx(per_position[:, 1:].mean().item(), rel=1e-6)
    assert positionwise_cosine(student, torch.zeros_like(teacher)).item() == 1.0
    grad = student.clone().requires_grad_(True)
    positionwise_cosine(grad, silent).backward()
    assert grad.grad[:, :, 0].abs().max() == 0 and grad.grad[:, :, 1:].abs().max() > 0
    with pytest.raises(ValueError, match="shape"):
        positionwise_cosine(student, teacher[:, :8])
# ------------------------------------------------------------------------------------------ training runs
def test_training_runs_and_evaluation_matches_metrics(tmp_path, data_dir):
    trainer, summary = run(data_dir, tmp_path / "run", **{"train.average_last": 2, "train.ema": 0.9})
    losses = step_losses(tmp_path / "run")
    assert len(losses) == 2 * (40 // 8) and all(math.isfinite(x) for x in losses)
    assert {"model.safetensors", "best.safetensors", "averaged.safetensors", "ema.safetensors", "config.yaml",
            "epoch-0.pt", "epoch-1.pt", "checkpoint.pt", "metrics.json"} <= {p.name for p in (tmp_path / "run").iterdir()}
    # the trainer's evaluation equals tympan.eval.metrics on the saved model's own scores
    model = tympan.load("ssast-tiny-frame", checkpoint=tmp_path / "run" / "model.safetensors")
    valid = trainer.data["valid"]
    batch = collate_audio([valid[i] for i in range(len(valid))])
    with torch.no_grad():
        scores = model(model_frontend(model)(batch["waveform"])).softmax(-1)
    expected = singlelabel_metrics(scores, batch["target"].argmax(-1), top_k=()) | multilabel_metrics(scores, batch["target"])
    for key, value in expected.items():
        assert summary["final"][key] == pytest.approx(value, abs=1e-6), key
    # averaged weights are the mean of the two epoch files
    averaged = load_file(tmp_path / "run" / "averaged.safetensors")
    epochs = [torch.load(tmp_path / "run" / f"epoch-{e}.pt", weights_only=True)["model"] for e in (0, 1)]
    key = "blocks.0.attn.qkv.weight"
    torch.testing.assert_close(averaged[key], (epochs[0][key] + epochs[1][key]) / 2)


def test_bf16_autocast_and_accumulation(tmp_path, data_dir):
    _, summary = run(data_dir, tmp_path / "run", **{"train.precision": "bf16", "train.accumulation": 2,
                                                     "train.epochs": 1, "optim.clip_grad": 1.0})  # fmt: skip
    losses = step_losses(tmp_path / "run")
    assert len(losses) == 40 // 8 // 2 and all(math.isfinite(x) for x in losses)
    assert 0.0 <= summary["final"]["accuracy"] <= 1.0


def test_ssast_pretraining_objective(tmp_path, data_dir):
    overrides = {k: v for k, v in TOY_MODEL.items() if "stride" not in k} | {"mask_patch": 4, "cluster": False}
    _, summary = run(data_dir, tmp_path / "run", **{"model.id": "ssast-tiny-frame-pretrain", "objective.kind": "ssast",
                                                     "model.overrides": json.dumps(overrides), "train.epochs": 1})  # fmt: skip
    records = [json.loads(x) for x in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert {"nce", "mse", "acc"} <= set(records[1]) and math.isfinite(summary["final"]["loss"])


def test_pretraining_lowers_its_loss_and_fine_tuning_starts_from_it(tmp_path, data_dir):
    """The FSDD pretrain -> fine-tune path at toy size: the SSAST loss falls over the epochs, and fine-tuning with
    ``model.strict=false`` starts from every pretrained encoder tensor with only the classifier head new."""
    from tympan.train.trainer import build_model

    overrides = {k: v for k, v in TOY_MODEL.items() if "stride" not in k} | {"mask_patch": 4, "cluster": False}
    run(data_dir, tmp_path / "pre", **{"model.id": "ssast-tiny-frame-pretrain", "objective.kind": "ssast",
                                       "model.overrides": json.dumps(overrides), "train.epochs": 4,
                                       "data.train": "{speaker: george, take: {min: 10, max: 49}}"})  # fmt: skip
    records = [json.loads(x) for x in (tmp_path / "pre" / "log.jsonl").read_text().splitlines()]
    epoch_losses = [r["train_loss"] for r in records if r.get("event") == "epoch"]
    print("pretraining epoch losses", epoch_losses)
    assert len(epoch_losses) == 4 and epoch_losses[-1] < 0.8 * epoch_losses[0], epoch_losses

    pretrained = load_file(tmp_path / "pre" / "model.safetensors")
    spec = {"id": "ssast-tiny-frame", "overrides": TOY_MODEL, "checkpoint": str(tmp_path / "pre" / "model.safetensors"),
            "strict": False}  # fmt: skip
    model, note = build_model(spec, num_classes=10)
    state = model.state_dict()
    new = sorted(k for k in state if k not in pretrained)
    assert new == ["head.fc.bias", "head.fc.weight", "head.norm.bias", "head.norm.weight"], new
    for key in state.keys() - set(new):
        assert torch.equal(state[key], pretrained[key]), key
    assert note.startswith(f"{len(state) - len(new)}/{len(state)} tensors")
    _, summary = run(data_dir, tmp_path / "ft", **{"model.checkpoint": spec["checkpoint"], "model.strict": False,
                                                    "train.epochs": 1})  # fmt: skip
    assert 0.0 <= summary["final"]["accuracy"] <= 1.0


def test_ssast_pretraining_masks_audio_not_padding(tmp_path, data_dir):
    """``objective.mask_padding``: FSDD clips zero-padded to 1 s, the masked patches drawn from the real frames."""
    overrides = {k: v for k, v in TOY_MODEL.items() if "stride" not in k} | {"mask_patch": 4, "cluster": False,
                                                                           "input_tdim": 100}  # fmt: skip
    sections = {"model.id": "ssast-tiny-frame-pretrain", "objective.kind": "ssast", "objective.mask_padding": True,
                "model.overrides": json.dumps(overrides), "train.epochs": 1, "data.clip_seconds": 1.0}  # fmt: skip
    trainer, summary = run(data_dir, tmp_path / "run", **sections)
    batch = next(iter(trainer._loader(0, 0)))
    prepared = trainer._prepare(batch, None, train=False)
    frames = prepared["input_lengths"]
    assert bool((frames < 100).any()) and bool((frames > 10).all())  # FSDD digits last well under a second
    seconds = batch["lengths"].float() / 16000
    assert torch.allclose(frames.float(), (seconds - 0.025) / 0.010 + 1, atol=1.0)  # Kaldi 25 ms / 10 ms frames
    assert math.isfinite(summary["final"]["loss"])
    with pytest.raises(ConfigError, match="mask_padding"):
        load_config(None, toy_config(data_dir, tmp_path / "bad", **{**sections, "data.precompute_features": True}))


def test_mask_padding_objective_hands_the_lengths_to_the_model(tmp_path, data_dir):
    """The trainer's SSAST objective with ``mask_padding`` equals the model called with the clips' real frames,
    and its masks (hence its loss) differ from the length-blind ones drawn from the same seed."""
    from tympan.train.objectives import ModelLossObjective

    overrides = {k: v for k, v in TOY_MODEL.items() if "stride" not in k} | {"mask_patch": 4, "cluster": False,
                                                                           "input_tdim": 100}  # fmt: skip
    sections = {"model.id": "ssast-tiny-frame-pretrain", "objective.kind": "ssast", "objective.mask_padding": True,
                "model.overrides": json.dumps(overrides), "train.epochs": 1, "data.clip_seconds": 1.0}  # fmt: skip
    trainer = Trainer(load_config(None, toy_config(data_dir, tmp_path / "run", **sections)))
    prepared = trainer._prepare(next(iter(trainer._loader(0, 0))), None, train=False)
    model = trainer.model.eval()

    def loss_of(call):
        torch.manual_seed(7)
        with torch.no_grad():
            return float(call())

    masked_audio = loss_of(lambda: trainer.objective(model, prepared)[0])
    assert masked_audio == loss_of(lambda: model(prepared["inputs"], lengths=prepared["input_lengths"]).loss)
    assert masked_audio != loss_of(lambda: ModelLossObjective()(model, prepared)[0])


def test_distillation_from_precomputed_teacher(tmp_path, data_dir):
    files = fsdd_datafile(data_dir, tmp_path / "data")
    subset = read_datafile(files.datafile).select(lambda r: r.extra["speaker"] == "george" and r.extra["take"] < 14)
    from tympan.data import write_datafile

    datafile = write_datafile(subset, tmp_path / "data" / "george.json")
    torch.manual_seed(0)
    teacher = ModelTeacher("ssast-tiny-frame", **TOY_MODEL, num_classes=7)  # a random 7-class teacher
    path = precompute_teacher_outputs(teacher, datafile, "toy", clip_seconds=0.4)
    assert path.parent == datafile.parent
    _, summary = run(data_dir, tmp_path / "run", **{
        "data.datafile": str(datafile), "data.labels": str(files.labels), "objective.kind": "distill",
        "objective.teacher.kind": "precomputed", "objective.teacher.path": str(path),
        "objective.distill.label_map": "append", "objective.distill.loss": "kl", "train.epochs": 1,
        "eval.metric": "accuracy"})  # fmt: skip
    records = [json.loads(x) for x in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert {"distill_loss", "label_loss"} <= set(records[1])
    assert 0.0 <= summary["final"]["teacher_agreement_mAP"] <= 1.0 and "accuracy" in summary["final"]


def test_sat_streaming_against_live_teacher_and_mae(tmp_path, data_dir):
    # SAT: 0.81 s clips = 81 frames -> two 32-frame chunks, the second with the first's memory; BCE on the teacher's
    # top-3 probabilities (a tiny random ViT teacher run live on the same crops)
    tiny = {"embed_dim": 32, "depth": 1, "num_heads": 2}
    _, summary = run(data_dir, tmp_path / "sat", **{
        "model.id": "sat-tiny-2s", "model.overrides": json.dumps(tiny | {"target_length": 32, "cache_length": 32}),
        "data.clip_seconds": 0.81, "objective.kind": "distill", "objective.label_weight": 0.0,
        "objective.distill": '{weight: 1.0, loss: bce, top_k: 3, label_map: none}',
        "objective.teacher": json.dumps({"kind": "tympan", "id": "audiotransformer-tiny", "overrides": tiny}),
        "train.epochs": 1, "eval.metric": "mAP"})  # fmt: skip
    assert math.isfinite(step_losses(tmp_path / "sat")[-1]) and "teacher_agreement_mAP" in summary["final"]
    # MAE on a SAT-repo ViT encoder (cls token kept): normalised-patch loss over masked patches
    mae = tiny | {"decoder_dim": 32, "decoder_depth": 1, "decoder_heads": 2, "target_length": 64}
    _, summary = run(data_dir, tmp_path / "mae", **{"model.id": "mae-audiotransformer-tiny", "objective.kind": "mae",
                                                     "model.overrides": json.dumps(mae), "data.clip_seconds": 0.64,
                                                     "train.epochs": 1})  # fmt: skip
    assert 0.0 < summary["final"]["loss"] < 10.0
    encoder = tympan.load("audiotransformer-tiny", checkpoint=tmp_path / "mae" / "encoder.safetensors")
    assert encoder.embed_dim == 32 and encoder.pooling == "token"


def test_evaluate_main_prints_the_metrics(tmp_path, data_dir, capsys):
    from tympan.train import evaluate_main

    trainer, summary = run(data_dir, tmp_path / "run", **{"train.epochs": 1})
    valid = trainer.data["valid"].manifest
    from tympan.data import write_datafile

    datafile = write_datafile(valid, tmp_path / "valid.json")
    capsys.readouterr()
    assert evaluate_main(tmp_path / "run" / "model.safetensors", datafile, trainer.config["data"]["labels"] or
                         tmp_path / "run" / "data" / "fsdd_labels.csv", clip_seconds=0.4, metric="accuracy") == 0  # fmt: skip
    printed = json.loads(capsys.readouterr().out)
    assert printed["accuracy"] == pytest.approx(summary["final"]["accuracy"])


# ------------------------------------------------------------------------------------------ resume
def _train_subprocess(args: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    code = "import sys; from tympan.train import train_main; sys.exit(train_main(None, sys.argv[2:], sys.argv[1] == '1'))"
    return subprocess.run([sys.executable, "-c", code, *args], cwd=REPO, env={**os.environ, **(env or {})},
                          capture_output=True, text=True, timeout=300)  # fmt: skip


def test_sigkill_mid_epoch_then_resume_is_bit_exact(tmp_path, data_dir):
    # dropout-like randomness (stochastic depth) and mixup exercise the saved RNG and the per-step generators
    extra = {"model.overrides": json.dumps(TOY_MODEL | {"drop_path_rate": 0.2}), "augment.mixup": 0.5,
             "augment.freqm": 8, "augment.timem": 8, "train.checkpoint_every": 2, "train.epochs": 2}  # fmt: skip
    run(data_dir, tmp_path / "whole", **extra)  # uninterrupted, in this process (same single thread)
    # killed after optimiser step 7 (epoch 1, batch 2): the checkpoint of step 6 is the latest on disk
    killed = _train_subprocess(["0", *toy_config(data_dir, tmp_path / "killed", **extra)],
                               {"TYMPAN_TRAIN_KILL_AFTER_STEP": "7"})  # fmt: skip
    assert killed.returncode == -9
    state = torch.load(tmp_path / "killed" / "checkpoint.pt", weights_only=True)
    assert (state["trainer"]["epoch"], state["trainer"]["batch"], state["trainer"]["step"]) == (1, 1, 6)
    resumed = _train_subprocess(["1", *toy_config(data_dir, tmp_path / "killed", **extra)])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a, b = load_file(tmp_path / "whole" / "model.safetensors"), load_file(tmp_path / "killed" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert step_losses(tmp_path / "whole")[-3:] == step_losses(tmp_path / "killed")[-3:]
