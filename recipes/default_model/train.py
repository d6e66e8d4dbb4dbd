"""Train the default model (TymNet) on the corpus shards; run from the repository root.

    python recipes/default_model/train.py recipes/default_model.yaml [--set train.steps=80000] [--export PATH]

Why not ``tympan train``: the trainer works on clips and clip-level teacher logits; this model learns per 0.96 s
patch from precomputed per-patch teacher scores *and* embeddings (float16 shards from ``build_corpus.py``), drawn
group-balanced. Everything is determined by (seed, step): batch ``s`` is drawn with a generator seeded from
``seed`` and ``s``, so a run resumed from ``last.pt`` continues bit-exactly. Checkpoints every few minutes; held-out
agreement with the teacher (files never trained on) is logged to ``metrics.jsonl``. ``--export`` writes the EMA
weights as safetensors with a sidecar.

Function matching (``train.online_teacher``): instead of the stored labels, each patch is augmented in the log-mel
domain (mixed with a second drawn patch, gain, spectral tilt: :class:`tympan.data.augment.LogMelMix`) and the
teacher (YAMNet ONNX, ``corpus.teacher``) labels it exactly as the student sees it, so the corpus yields new
targets at every step instead of being memorised. The batch for step ``s + 1`` (draws and teacher) is prepared in
a background thread while step ``s`` trains; it depends on ``(seed, s + 1)`` only, so resuming stays bit-exact.
``train.init`` warm-starts the model (and its EMA) from a safetensors file, e.g. an earlier export.

Per-position hints (``train.map_weight`` > 0, online teacher only): the teacher also gives its last map before
pooling (``[1024, 3, 2]``, :data:`tympan.teachers.yamnet.FEATURE_MAP_TENSOR`; its mean is then the embedding
target), and the student's projection, applied at each position of its own last map, is pulled towards it
(:func:`tympan.train.objectives.positionwise_cosine`).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from tympan.data import corpus as C
from tympan.models import create_model
from tympan.train.checkpointing import atomic_save
from tympan.train.objectives import positionwise_cosine, scores_embedding_loss


FRONTEND = ("YAMNet log-mel: 16 kHz, 25 ms periodic Hann, 10 ms hop, 512-point FFT magnitude, 64 HTK mel bands "
            "125-7500 Hz, log(mel + 0.001); 0.96 s patches every 0.48 s")


def log(*args: Any) -> None:
    print(time.strftime("%H:%M:%S"), *args, flush=True)


def load_recipe(path: str, overrides: list[str]) -> dict[str, Any]:
    recipe = yaml.safe_load(Path(path).read_text())
    for item in overrides:
        key, _, raw = item.partition("=")
        *parents, last = key.split(".")
        target = recipe
        for part in parents:
            target = target[part]
        if last not in target:
            raise SystemExit(f"unknown recipe key {key!r}")
        target[last] = yaml.safe_load(raw)
    return recipe


def lr_at(step: int, cfg: dict[str, Any]) -> float:
    """Linear warmup then cosine to 1 % of the peak over ``train.steps``."""
    if step < cfg["warmup_steps"]:
        return cfg["lr"] * (step + 1) / cfg["warmup_steps"]
    progress = min(1.0, (step - cfg["warmup_steps"]) / max(1, cfg["steps"] - cfg["warmup_steps"]))
    return cfg["lr"] * (0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * progress)))


def batch_indices(weights: torch.Tensor, step: int, seed: int, size: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed * 1_000_003 + step)
    return torch.multinomial(weights, size, replacement=True, generator=generator)


class Batches:
    """Batch ``step`` of the run as (student input ``[B, 96, 64]`` float32, teacher scores, teacher embeddings,
    teacher maps ``[B, 1024, 3, 2]`` or None): stored patches and labels, or with ``online``
    (``train.online_teacher``) augmented patches labelled by the teacher on the spot (with ``maps``, its last map
    too, and the embedding is that map's mean). A pure function of ``(seed, step)``; :meth:`get` prepares the next
    one in a thread."""

    def __init__(self, train: dict[str, np.ndarray], weights: torch.Tensor, seed: int, size: int,
                 online: dict[str, Any] | None, teacher_path: str | None, maps: bool = False) -> None:  # fmt: skip
        self.patches = torch.from_numpy(train["patches"])  # float16 [N, 96, 64]
        self.scores = torch.from_numpy(train["scores"])
        self.embeddings = torch.from_numpy(train["embeddings"])
        self.weights, self.seed, self.size = weights, seed, size
        self.mix = self.teacher = self.map_shape = None
        if online:
            from tympan.data.augment import LogMelMix
            from tympan.teachers.yamnet import EMBEDDING_TENSOR, FEATURE_MAP_SHAPE, FEATURE_MAP_TENSOR, YAMNet

            self.mix = LogMelMix(online.get("mix_prob", 0.5), tuple(online.get("snr_db", (-5.0, 15.0))),
                                 tuple(online.get("gain_db", (-20.0, 6.0))), online.get("tilt_db", 6.0))  # fmt: skip
            self.teacher = YAMNet(teacher_path, num_threads=online.get("threads", 1), batch_size=self.size,
                                  embedding_output=FEATURE_MAP_TENSOR if maps else EMBEDDING_TENSOR)  # fmt: skip
            self.map_shape = FEATURE_MAP_SHAPE if maps else None
        elif maps:
            raise SystemExit("train.map_weight needs train.online_teacher: the stored shards hold no teacher maps")
        from concurrent.futures import ThreadPoolExecutor

        self._pool, self._pending = ThreadPoolExecutor(max_workers=1), None

    def __call__(self, step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        index = batch_indices(self.weights, step, self.seed, self.size)
        x = self.patches[index].float()
        if self.teacher is None:
            return x, self.scores[index], self.embeddings[index], None
        generator = torch.Generator().manual_seed((self.seed + 1) * 2_000_029 + step)
        partner = torch.multinomial(self.weights, self.size, replacement=True, generator=generator)
        x = self.mix(x, self.patches[partner].float(), generator)
        scores, embeddings = self.teacher.run(x[:, None].numpy())
        if self.map_shape is not None:
            maps = torch.from_numpy(embeddings).reshape(-1, *self.map_shape)
            return x, torch.from_numpy(scores), maps.mean((-2, -1)), maps
        return x, torch.from_numpy(scores), torch.from_numpy(embeddings), None

    def get(self, step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Batch ``step`` (the prefetched one when it is), and start preparing ``step + 1``."""
        pending, self._pending = self._pending, None
        batch = pending[1].result() if pending is not None and pending[0] == step else self(step)
        self._pending = (step + 1, self._pool.submit(self, step + 1))
        return batch


@torch.no_grad()
def agreement(model: torch.nn.Module, data: dict[str, np.ndarray]) -> dict[str, float]:
    """Held-out agreement with the teacher (:func:`tympan.data.corpus.teacher_agreement`) plus the patch cosine
    between the projected student embedding and the teacher's."""
    model.eval()
    logits, projected = [], []
    for part in torch.from_numpy(data["patches"]).split(512):
        lg, _, pr = model.patch_outputs(part.float())
        logits.append(lg)
        projected.append(pr)
    out = C.teacher_agreement(torch.sigmoid(torch.cat(logits)), data["scores"].astype(np.float32), data["file_id"])
    if projected[0] is not None:
        emb = torch.from_numpy(data["embeddings"]).float()
        out["patch_cosine"] = float(torch.nn.functional.cosine_similarity(torch.cat(projected), emb).mean())
    model.train()
    return out


def export(model: torch.nn.Module, path: Path, info: dict[str, Any]) -> str:
    """EMA weights as safetensors (float32) plus tympan's sidecar ``<name>.json`` (model id, config, labels with
    mids, and under ``extra`` the SHA-256, frontend and training figures); returns the SHA-256."""
    import hashlib

    from tympan.files import write_safetensors

    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    write_safetensors(path, state, {"format": "pt", "model_id": "tymnet-s"})
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    config = {k: list(v) if isinstance(v, tuple) else v for k, v in model.tympan_config.items()}
    labels = model.labels
    sidecar = {"model_id": "tymnet-s", "config": config,
               "labels": {"mids": list(labels.mids), "names": list(labels.names)},
               "extra": {"sha256": digest, **info}}  # fmt: skip
    path.with_suffix(".json").write_text(json.dumps(sidecar, indent=1) + "\n")
    log(f"exported {path} ({path.stat().st_size / 1e6:.2f} MB, sha256 {digest[:16]}...)")
    return digest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("recipe")
    parser.add_argument("--set", action="append", default=[], help="recipe override key.sub=value (YAML value)")
    parser.add_argument("--export", help="write the current EMA weights to this .safetensors and exit")
    parser.add_argument("--max-minutes", type=float, default=None, help="stop (after a checkpoint) after this long")
    parser.add_argument("--stop-at", type=int, default=None, help="stop (after a checkpoint) at this step")
    args = parser.parse_args(argv)
    recipe = load_recipe(args.recipe, args.set)
    cfg, shards = recipe["train"], recipe["corpus"]["shards"]
    torch.set_num_threads(cfg["threads"])
    out = Path(cfg["out"])
    out.mkdir(parents=True, exist_ok=True)
    (out / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))

    torch.manual_seed(cfg["seed"])
    model = create_model(recipe["model"]["id"], **recipe["model"].get("overrides", {}))
    if cfg.get("init"):  # warm start (a resumed run's last.pt below takes precedence)
        from safetensors.torch import load_file

        model.load_state_dict(load_file(cfg["init"]))
        log(f"initialised from {cfg['init']}")
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.ndim <= 1 else decay).append(p)
    optim = torch.optim.AdamW([{"params": decay, "weight_decay": cfg["weight_decay"]},
                               {"params": no_decay, "weight_decay": 0.0}], lr=cfg["lr"])  # fmt: skip
    step, trained_seconds = 0, 0.0
    last = out / "last.pt"
    if last.exists():
        ckpt = torch.load(last, map_location="cpu", weights_only=True)
        model.load_state_dict(ckpt["model"])
        ema.load_state_dict(ckpt["ema"])
        optim.load_state_dict(ckpt["optim"])
        step, trained_seconds = int(ckpt["step"]), float(ckpt["seconds"])
        log(f"resumed at step {step} ({trained_seconds / 60:.1f} min trained)")
    if args.export:
        export(ema, Path(args.export), {"step": step, "train_minutes_one_thread": round(trained_seconds / 60, 1),
                                        "frontend": FRONTEND, "recipe": "recipes/default_model.yaml"})
        return 0

    train = C.load_shards(shards, "train")
    heldout = C.load_shards(shards, "heldout")
    weights = torch.from_numpy(C.group_weights(train["group"].astype(np.int64), cfg["group_power"]))
    map_weight = float(cfg.get("map_weight", 0.0))
    batches = Batches(train, weights, cfg["seed"], cfg["batch_size"], cfg.get("online_teacher"),
                      recipe["corpus"]["teacher"], maps=map_weight > 0)  # fmt: skip
    log(f"train {len(train['patches'])} patches, held-out {len(heldout['patches'])}; step {step}/{cfg['steps']}"
        + (" (online teacher)" if batches.teacher is not None else ""))

    def save() -> None:  # fsync + rename, ordinary file mode, a full disk is one line (the trainer's own writer)
        atomic_save({"model": model.state_dict(), "ema": ema.state_dict(), "optim": optim.state_dict(), "step": step,
                     "seconds": trained_seconds}, last)  # fmt: skip

    model.train()
    started, last_save, window = time.perf_counter(), time.perf_counter(), []
    metrics = (out / "metrics.jsonl").open("a")
    while step < cfg["steps"]:
        t0 = time.perf_counter()
        x, scores, embeddings, teacher_maps = batches.get(step)
        for group in optim.param_groups:
            group["lr"] = lr_at(step, cfg)
        if teacher_maps is None:
            logits, _, projected = model.patch_outputs(x)
        else:  # the projection is linear: its mean over positions is the projection of the pooled features
            feature_map = model.feature_map(x)
            projected_map = model.projection(feature_map.permute(0, 2, 3, 1))  # [B, H, W, 1024]
            logits, projected = model.head(feature_map.mean((-2, -1))), projected_map.mean((1, 2))
        loss, logs = scores_embedding_loss(logits, projected, scores, embeddings, cfg["embed_weight"],
                                           cfg.get("temperature", 1.0), cfg.get("logit_weight", 0.0),
                                           cfg.get("logit_floor", -8.0))  # fmt: skip
        if teacher_maps is not None:
            hint = positionwise_cosine(projected_map.permute(0, 3, 1, 2), teacher_maps)
            loss = loss + map_weight * (1.0 - hint)
            logs["map_cosine"], logs["loss"] = float(hint.detach()), float(loss.detach())
        optim.zero_grad(set_to_none=True)
        loss.backward()
        optim.step()
        with torch.no_grad():
            d = min(cfg["ema"], (1 + step) / (10 + step))
            for e, p in zip(ema.state_dict().values(), model.state_dict().values()):
                if e.dtype.is_floating_point:
                    e.mul_(d).add_(p.detach(), alpha=1 - d)
                else:
                    e.copy_(p)
        step += 1
        trained_seconds += time.perf_counter() - t0
        window.append(logs)
        if step % 100 == 0:
            mean = {k: round(float(np.mean([w[k] for w in window])), 4) for k in window[0]}
            log(f"step {step} lr {lr_at(step, cfg):.2e} {mean} ({trained_seconds / 60:.1f} min)")
            window = []
        if step % cfg["eval_every"] == 0 or step == cfg["steps"]:
            figures = agreement(ema, heldout)
            record = {"step": step, "minutes": round(trained_seconds / 60, 2), **figures}
            metrics.write(json.dumps(record) + "\n")
            metrics.flush()
            log(f"held-out (EMA): {record}")
        if time.perf_counter() - last_save > cfg["checkpoint_minutes"] * 60 or step == cfg["steps"]:
            save()
            last_save = time.perf_counter()
        if (args.max_minutes is not None and time.perf_counter() - started > args.max_minutes * 60) or (
            args.stop_at is not None and step >= args.stop_at
        ):
            save()
            log(f"stopping at step {step}")
            break
    return 0


if __name__ == "__main__":
    sys.exit(main())
