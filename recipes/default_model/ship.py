"""Ship the default model into ``tympan/assets``: EMA weights (safetensors) + sidecar, NOTICE, corpus manifest.

    python recipes/default_model/ship.py recipes/default_model.yaml [--set key=value ...] [--bench bench.json]
        [--assets DIR] [--code FILE]

``--set`` overrides the recipe as ``train.py --set`` does (a continuation written as a recipe plus overrides ships
with those overrides recorded). Reads the run's ``last.pt`` (``train.out``), the corpus shards' ``manifest.json``
and ``corpus_table.md``, and an optional ``benchmarks/bench_default_model.py --json`` result; writes
``tymnet-s.safetensors`` (float32), ``tymnet-s.json`` (tympan's sidecar: model id, config, labels with mids; under
``extra`` the SHA-256, frontend, lineage, training and evaluation figures), ``tymnet-s.corpus.csv.gz`` (every source
file with package, version, licence and split) and ``NOTICE.tymnet-s.md``, and records the new SHA-256 in
``tympan/models/tymnet.py`` (``--assets`` and ``--code`` write elsewhere instead, e.g. to review a candidate).
The model card (``MODEL_CARD.md``) is written by hand from these figures.
"""

from __future__ import annotations

import argparse
import csv
import gzip
import io
import json
import sys
from collections import Counter
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
ASSETS = REPO / "tympan" / "assets"
CODE = REPO / "tympan" / "models" / "tymnet.py"


def _relative(path: str) -> str:
    resolved = Path(path).resolve()
    return str(resolved.relative_to(REPO)) if resolved.is_relative_to(REPO) else str(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("recipe")
    parser.add_argument("--set", action="append", default=[], help="recipe override key.sub=value, as train.py's")
    parser.add_argument("--bench", default=None, help="JSON from benchmarks/bench_default_model.py")
    parser.add_argument("--assets", type=Path, default=ASSETS, help="folder for the four shipped files")
    parser.add_argument("--code", type=Path, default=CODE, help="module whose SHIPPED_SHA256 line gets the digest")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from train import FRONTEND, export, load_recipe

    recipe = load_recipe(args.recipe, args.set)
    recipe_text = " ".join([_relative(args.recipe), *(f"--set {item}" for item in args.set)])
    run = Path(recipe["train"]["out"])
    shards = Path(recipe["corpus"]["shards"])
    ckpt = torch.load(run / "last.pt", map_location="cpu", weights_only=True)
    from tympan.models import create_model

    model = create_model("tymnet-s", **recipe["model"].get("overrides", {}))
    model.load_state_dict(ckpt["ema"])
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    assets = args.assets
    assets.mkdir(parents=True, exist_ok=True)
    weights = assets / "tymnet-s.safetensors"
    info = {
        "frontend": FRONTEND,
        "lineage": "distilled from the outputs of a quantized ONNX export of Google's YAMNet (Apache-2.0); no "
                   "teacher weights included; labels: AudioSet ontology (CC BY-SA 4.0)",
        "notice": "NOTICE.tymnet-s.md",
        "training": {"steps": int(ckpt["step"]), "minutes_one_thread": round(float(ckpt["seconds"]) / 60, 1),
                     "batch_size": recipe["train"]["batch_size"], "recipe": recipe_text,
                     "init": recipe["train"].get("init"), "online_teacher": recipe["train"].get("online_teacher"),
                     "heldout_agreement": metrics[-1] if metrics else None},
    }
    if args.bench:
        info["evaluation"] = json.loads(Path(args.bench).read_text())
    digest = export(model, weights, info)
    weights.chmod(0o644)
    text = args.code.read_text()
    start = text.index("SHIPPED_SHA256: str | None = ")
    end = text.index("\n", start)
    args.code.write_text(text[:start] + f'SHIPPED_SHA256: str | None = "{digest}"' + text[end:])

    manifest = json.loads((shards / "manifest.json").read_text())
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["key", "source", "version", "license", "seconds", "split", "patches"])
    for m in manifest:
        writer.writerow([m["key"], m["source"], m["version"], m["license"], m["seconds"], m["split"], m["patches"]])
    with gzip.GzipFile(assets / "tymnet-s.corpus.csv.gz", "wb", mtime=0) as f:
        f.write(buffer.getvalue().encode())
    licences = Counter(m["license"] for m in manifest if m["source"] != "mixture")
    table = (shards / "corpus_table.md").read_text()
    init = recipe["train"].get("init")
    warm = f", warm-started from an earlier export of the same model, `{Path(init).name}`" if init else ""
    notice = f"""# NOTICE: tymnet-s (the default model)

Weights: `tymnet-s.safetensors` (SHA-256 `{digest}`), trained by tympan (`{recipe_text}`{warm}) and
released with it (BSD-3-Clause). Whether trained weights are a derivative work of their training audio is not
settled; some of that audio is GPL-2+ or CC BY-SA, so every licence and file is listed here for users who must decide.

## Lineage

* **Teacher**: the student learned to reproduce the outputs (per 0.96 s patch: 521 class probabilities and the
  1024-d embedding) of YAMNet, Google's AudioSet tagger (Apache-2.0, <https://github.com/tensorflow/models/tree/master/research/audioset/yamnet>),
  through a quantized ONNX export (Qualcomm AI Hub `YamNet_w8a8`). **No teacher weights are included.**
* **Labels**: the 521 class names and ids (mids) are YAMNet's, from the AudioSet ontology by Google
  (<https://github.com/audioset/ontology>, CC BY-SA 4.0): `tymnet_labels.csv`.
* **Training audio**: the corpus below, built by `recipes/default_model/build_corpus.py`: Debian main packages
  (DFSG-free; the licence of each file read from the package's machine-readable `debian/copyright`, or stated in
  the recipe where that file is not machine-readable), shared effect sets with per-file licences, a small
  synthetic share (fluidsynth + FluidR3 GM soundfont (MIT), espeak-ng, sox) and mixtures of these. No audio is
  shipped except the demo clips (see `DEMO_SCENE.md`, `DEMO_AUDIO.md`). ESC-10 and FSDD test takes were not used.
  The full per-file list (package, version, licence, split) is `tymnet-s.corpus.csv.gz`.

## Corpus by source

{table}
## Licences of the source files (count of files)

""" + "\n".join(f"* {name}: {count}" for name, count in licences.most_common()) + "\n"
    (assets / "NOTICE.tymnet-s.md").write_text(notice)
    print(f"shipped {weights} ({weights.stat().st_size / 1e6:.2f} MB) sha256 {digest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
