"""Issue 14: a newcomer's walk, CSV -> datafile -> train -> evaluate -> tag -> embed -> probe, through the CLI at toy
size on real FSDD recordings, with no flag beyond the training recipe's sizes: everything after ``train`` reads what
the run's checkpoint sidecar carries (model id, label names, frontend settings, clip length)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from tympan.cli import main

REPO = Path(__file__).resolve().parents[1]
DIGITS = {"0": "zero", "1": "one", "2": "two"}
SPLITS = {**{t: "train" for t in range(10, 16)}, 16: "valid", 17: "valid", **{t: "test" for t in range(18, 21)}}
TOY = {"embed_dim": 32, "num_heads": 2, "depth": 1, "fshape": 64, "tshape": 4, "fstride": 64, "tstride": 4,
       "input_fdim": 64, "input_tdim": 40}  # fmt: skip


@pytest.fixture(scope="module")
def walk(tmp_path_factory, data_dir):
    """A user's own CSV of 33 recordings (3 digits, one speaker), with absolute paths, labels and a split."""
    root = tmp_path_factory.mktemp("walk")
    recordings = data_dir / "fsdd" / "recordings"
    with open(root / "digits.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["file", "label", "split"])
        for digit, name in DIGITS.items():
            for take, split in SPLITS.items():
                writer.writerow([recordings / f"{digit}_george_{take}.wav", name, split])
    return root


def _train_args(root: Path) -> list[str]:
    sets = {"data.datafile": root / "digits.json", "model.overrides": json.dumps(TOY), "data.clip_seconds": 0.4,
            "data.train": "{split: train}", "data.valid": "{split: valid}", "train.epochs": 2,
            "train.batch_size": 6, "train.progress": False, "train.average_last": 0, "eval.batch_size": 16,
            "output.dir": root / "run"}  # fmt: skip
    return ["train", str(REPO / "recipes" / "fsdd_ssast_tiny.yaml")] + [a for k, v in sets.items()
                                                                         for a in ("--set", f"{k}={v}")]


def test_csv_to_datafile_to_train_evaluate_tag_embed_probe(walk, data_dir, capsys):
    # CSV -> datafile (+ label CSV beside it)
    assert main(["data", str(walk / "digits.csv"), "-o", str(walk / "digits.json")]) == 0
    assert "33 clips, 3 classes" in capsys.readouterr().out
    assert (walk / "digits_labels.csv").is_file()

    # train: per-epoch validation figures and the run folder on the console
    assert main(_train_args(walk)) == 0
    out, err = capsys.readouterr()
    assert "epoch 1/2: train loss" in err and "; valid " in err and "accuracy" in err and f"run folder: {walk / 'run'}" in err
    checkpoint = walk / "run" / "model.safetensors"
    sidecar = json.loads(checkpoint.with_suffix(".json").read_text())
    assert sidecar["labels"]["names"] == ["one", "two", "zero"] and sidecar["extra"]["clip_seconds"] == 0.4
    assert sidecar["extra"]["recipe"]["model"]["id"] == "ssast-tiny-frame" and "mean" in sidecar["extra"]["frontend"]

    # the same folder again without --resume is refused (item 7); --overwrite replaces the run
    assert main(_train_args(walk)) == 2
    assert "is not empty" in capsys.readouterr().err
    assert main(_train_args(walk) + ["--overwrite"]) == 0
    capsys.readouterr()

    # evaluate with no flag beyond checkpoint and data: the run's labels, clip length and metric (item 2)
    assert main(["evaluate", "--checkpoint", str(checkpoint), "--data", str(walk / "digits.json")]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["clips"] == 33 and metrics["clip_seconds"] == 0.4 and 0 <= metrics["accuracy"] <= 1
    # ... and straight from the CSV
    assert main(["evaluate", "--checkpoint", str(checkpoint), "--data", str(walk / "digits.csv")]) == 0
    assert json.loads(capsys.readouterr().out)["clips"] == 33

    # tag with the trained model: its own label names, its own frontend (item 3)
    clip = data_dir / "fsdd" / "recordings" / "1_george_12.wav"
    assert main(["tag", str(clip), "--checkpoint", str(checkpoint), "--format", "json"]) == 0
    record = json.loads(capsys.readouterr().out)[0]
    assert {t["label"] for t in record["chunks"][0]["tags"]} == {"zero", "one", "two"}

    # listen to a file with the trained model: no --model, no --labels
    assert main(["listen", str(clip), "--checkpoint", str(checkpoint), "--fast", "--format", "jsonl"]) == 0
    first = json.loads(capsys.readouterr().out.splitlines()[0])
    assert {t["label"] for t in first["tags"]} <= {"zero", "one", "two"}

    # embed the CSV directly, probe with the stored labels and split (items 5, 6)
    embeddings = walk / "digits.safetensors"
    assert main(["embed", str(walk / "digits.csv"), "--checkpoint", str(checkpoint), "-o", str(embeddings),
                 "--quiet"]) == 0  # fmt: skip
    assert "33 clips x 32" in capsys.readouterr().out
    assert main(["probe", str(embeddings)]) == 0
    assert "test" in capsys.readouterr().out


def test_embed_and_probe_a_subset_of_the_esc10_csv(tmp_path, data_dir, capsys):
    """Item 6: the full 320-row CSV with 8 embedded clips probes those 8, not '320 of 320 rows have no embedding'."""
    esc10 = data_dir / "esc10" / "esc10.csv"
    rows = list(csv.DictReader(open(esc10)))
    chosen = [r for c in ("dog", "rain") for f in ("1", "2") for r in [r for r in rows if (r["category"], r["fold"]) == (c, f)][:2]]
    with open(tmp_path / "few.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows({**r, "filename": str(esc10.parent / "audio" / r["filename"])} for r in chosen)
    out = tmp_path / "few.safetensors"
    assert main(["embed", str(tmp_path / "few.csv"), "--model", "dasheng-base",
                 "--random", "--set", "embed_dim=32", "--set", "depth=1", "--set", "num_heads=2", "-o", str(out),
                 "--quiet", "--clip-seconds", "1"]) == 0  # fmt: skip
    capsys.readouterr()
    assert main(["probe", str(out), str(esc10), "--label-column", "category", "-k", "1"]) == 0
    captured = capsys.readouterr()
    assert "probing the 8 of 320 datafile rows that have an embedding" in captured.err


def test_models_table_says_where_weights_come_from(capsys):
    """Item 11: the weights column says shipped / cached / download, and why there is nothing to load."""
    assert main(["models", "mae-audiotransformer-tiny"]) == 0
    line = capsys.readouterr().out.splitlines()[1]
    assert "none released: train it or give --checkpoint PATH" in line
    assert main(["models", "tymnet-s"]) == 0
    assert " shipped " in capsys.readouterr().out


def test_load_an_official_container_builds_from_its_stored_config(shared_dir):
    """Item 11: Dasheng's container stores its constructor config (as Dasheng.from_pretrained reads it); tympan.load
    builds from it with no size overrides."""
    import torch
    from safetensors.torch import load_file

    import tympan

    fixture = shared_dir / "fixtures" / "dasheng-base"
    model = tympan.load("dasheng-base", checkpoint=fixture / "checkpoint.pt")
    assert (model.tympan_config["embed_dim"], model.tympan_config["depth"]) == (384, 2)
    io = load_file(str(fixture / "io.safetensors"))
    with torch.no_grad():
        torch.testing.assert_close(model(io["input"]), io["output"], atol=1e-4, rtol=1e-4)
