"""The ``tympan`` command line, run as a user would."""

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

from pathlib import Path

from tympan.cli import main

REPO = Path(__file__).resolve().parents[1]


def test_console_script_help():
    exe = shutil.which("tympan")
    cmd = [exe, "--help"] if exe else [sys.executable, "-m", "tympan.cli", "--help"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    for command in ("models", "features"):
        assert command in out
    assert "examples:" in out


def test_help_lists_every_command_without_building_them():
    """`tympan --help` and a mistyped command answer without importing torch (2-6 s before); a command's own
    parser is still the full one, and the full parser has a subcommand for every help line."""
    from tympan.cli import COMMAND_HELP, COMMANDS, build_parser

    code = ("import sys\nfrom tympan.cli import main\ntry:\n    main(sys.argv[1:])\nexcept SystemExit as e:\n"
            "    print('exit', e.code)\nprint('torch imported:', 'torch' in sys.modules)")
    for argv, status in ((["--help"], 0), (["tagg"], 2), (["--version"], 0)):
        run = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, check=True)
        assert f"exit {status}" in run.stdout and "torch imported: False" in run.stdout, (argv, run.stdout)
    out = subprocess.run([sys.executable, "-c", code, "--help"], capture_output=True, text=True).stdout
    assert all(text in " ".join(out.split()) for text in COMMAND_HELP.values())  # lines wrap
    assert set(COMMAND_HELP) == set(COMMANDS)
    tag = build_parser("tag").parse_args(["tag", "x.wav", "--topk", "3"])
    assert tag.topk == 3 and tag.command == "tag"
    full = build_parser()
    for name in COMMANDS:  # every command's own parser builds and prints its help
        with pytest.raises(SystemExit) as info:
            full.parse_args([name, "--help"])
        assert info.value.code == 0


def test_models_table(capsys):
    assert main(["models", "ast-*"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:3] == ["id", "family", "input"]
    assert any(line.startswith("ast-base384 ") for line in lines)
    assert main(["models", "no-such-model-*"]) == 1


@pytest.mark.parametrize("frontend,fmt", [("kaldi-fbank", "npy"), ("ast-fbank", "npy"), ("dasheng-mel", "safetensors"), ("ssam-mel", "npy")])
def test_features_writes_one_file_per_input(tmp_path, data_dir, frontend, fmt):
    clips = sorted((data_dir / "esc10" / "audio").glob("1-*.flac"))[:2] + sorted((data_dir / "fsdd" / "recordings").glob("*.wav"))[:1]
    out = tmp_path / "out"
    assert main(["features", *map(str, clips), "--frontend", frontend, "-o", str(out), "--format", fmt]) == 0
    written = sorted(out.iterdir())
    assert [p.stem for p in written] == sorted(p.stem for p in clips)
    if fmt == "npy":
        feats = np.load(written[0])
        assert feats.ndim >= 2 and np.isfinite(feats).all()


def test_features_reports_and_skips_bad_files(tmp_path, data_dir, capsys):
    good = sorted((data_dir / "esc10" / "audio").glob("*.flac"))[0]
    empty = tmp_path / "empty.wav"
    empty.write_bytes(b"")
    missing = tmp_path / "missing.flac"
    status = main(["features", str(empty), str(good), str(missing), "--frontend", "kaldi-fbank", "-o", str(tmp_path / "o")])
    assert status == 1
    err = capsys.readouterr().err
    assert "empty.wav" in err and "missing.flac" in err and "1 of 3 files written" in err
    assert (tmp_path / "o" / f"{good.stem}.npy").is_file()


def test_unreadable_datafile_is_one_line_exit_2(tmp_path, capsys):
    """A cut-off datafile: one line naming it, exit 2 (DatafileError is a TympanError, which main turns into that)."""
    bad = tmp_path / "cut.json"
    bad.write_text('{"data": [')
    shipped = REPO / "tympan" / "assets" / "tymnet-s.safetensors"
    assert main(["evaluate", "--checkpoint", str(shipped), "--data", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(bad) in err and "not a readable JSON datafile" in err


def test_unknown_subcommand_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["frobnicate"])
    assert exit_info.value.code == 2


SAT_FIXTURE = "sat-tiny-2s"


@pytest.fixture(scope="module")
def sat_checkpoint():
    from tests.parity import fixtures_root

    path = fixtures_root() / SAT_FIXTURE / "checkpoint.pt"
    assert path.is_file(), path
    return str(path)


def test_tag_per_chunk_text_json_csv_and_plot(tmp_path, data_dir, sat_checkpoint, capsys):
    import json

    clip = str(sorted((data_dir / "esc10" / "audio").glob("1-*.flac"))[0])  # 5 s: chunks 0-2, 2-4 and a 1 s tail
    common = ["--model", "sat-tiny-2s", "--checkpoint", sat_checkpoint, "--chunk", "2", "--topk", "3"]
    assert main(["tag", clip, *common, "--plot", str(tmp_path / "t.png")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == clip
    assert lines[1].startswith("[0.0s]-[2.0s] Topk-1 ") and lines[4].startswith("[2.0s]-[4.0s] Topk-1 ")
    assert lines[7].startswith("[4.0s]-[5.0s] Topk-1 ")
    assert (tmp_path / "t.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    assert main(["tag", clip, *common, "--format", "json"]) == 0
    record = json.loads(capsys.readouterr().out)[0]
    assert [c["start"] for c in record["chunks"]] == [0.0, 2.0, 4.0]
    probs = [t["probability"] for t in record["chunks"][0]["tags"]]
    assert probs == sorted(probs, reverse=True) and all(0 <= p <= 1 for p in probs)

    assert main(["tag", clip, *common, "--format", "csv"]) == 0
    rows = capsys.readouterr().out.splitlines()
    assert rows[0] == "file,start,end,rank,label,mid,probability" and len(rows) == 1 + 3 * 3


def test_tag_clip_level_skips_bad_files(tmp_path, data_dir, sat_checkpoint, capsys):
    clip = str(sorted((data_dir / "esc10" / "audio").glob("2-*.flac"))[0])
    broken = tmp_path / "broken.flac"
    broken.write_bytes(b"definitely not audio")
    status = main(["tag", str(broken), clip, "--model", "sat-tiny-2s", "--checkpoint", sat_checkpoint, "--topk", "2"])
    captured = capsys.readouterr()
    assert status == 1
    assert "broken.flac" in captured.err and "Traceback" not in captured.err
    out = captured.out.splitlines()
    assert out[0] == clip and len(out) == 3 and out[1].startswith("[0.0s]-[5.0s] Topk-1 ")


def test_tag_refuses_an_encoder_and_an_unknown_model(data_dir, capsys):
    clip = str(sorted((data_dir / "esc10" / "audio").glob("1-*.flac"))[0])
    assert main(["tag", clip, "--model", "no-such-model"]) == 2
    assert "unknown model id" in capsys.readouterr().err
    from tests.parity import fixtures_root

    dasheng = fixtures_root() / "dasheng-base"
    config = json.loads((dasheng / "meta.json").read_text())["constructor_args"]
    sizes = [f"--set={k}={config[k]}" for k in ("embed_dim", "depth", "num_heads")]
    assert main(["tag", clip, "--model", "dasheng-base", "--checkpoint", str(dasheng / "checkpoint.pt"), *sizes]) == 2
    assert "encoder without a classification head" in capsys.readouterr().err


def test_embed_then_probe_then_niah(tmp_path, data_dir, capsys):
    """The evaluation chain a user runs: embeddings of a datafile, a k-fold probe on them, a NIAH sweep."""
    import csv

    rows = list(csv.DictReader(open(data_dir / "esc10" / "esc10.csv")))
    chosen = [r for r in rows if r["category"] in ("dog", "rain", "chainsaw")]
    chosen = [
        r for fold in "1234" for cat in ("dog", "rain", "chainsaw")
        for r in [x for x in chosen if x["fold"] == fold and x["category"] == cat][:2]
    ]
    datafile = tmp_path / "small.json"
    datafile.write_text(json.dumps({"data": [
        {"wav": str(data_dir / "esc10" / "audio" / r["filename"]), "labels": r["category"], "fold": int(r["fold"])}
        for r in chosen
    ]}))
    tiny = ["--set", "embed_dim=64", "--set", "depth=1", "--set", "num_heads=2"]
    out = tmp_path / "emb.safetensors"
    assert main(["embed", str(datafile), "--model", "dasheng-base", *tiny, "--random", "-o", str(out),
                 "--clip-seconds", "2", "--quiet"]) == 0
    assert main(["probe", str(out), "--method", "knn", "-k", "3", "-o", str(tmp_path / "probe.json")]) == 0
    result = json.loads((tmp_path / "probe.json").read_text())
    assert result["num_classes"] == 3 and result["n"] == 24
    assert [(s["name"], s["n_test"]) for s in result["splits"]] == [(f"fold{i}", 6) for i in range(1, 5)]
    assert 0.0 <= result["mean"]["accuracy"] <= 1.0

    needle = chosen[0]
    assert main(["niah", str(data_dir / "esc10" / "audio" / needle["filename"]), "--model", "dass-small", "--set",
                 "depths=[1,1,1,1]", "--random", "--durations", "10", "20", "--positions", "0.5",
                 "--num-needles", "1", "-o", str(tmp_path / "niah")]) == 0
    assert {p.name for p in (tmp_path / "niah").iterdir()} >= {"niah.json", "niah.png", "niah.txt"}


# ------------------------------------------------------------------------------ issue 15: outputs lost or misreported
def _tone_file(path, seconds: float = 1.0, rate: int = 16000):
    import soundfile as sf

    t = np.arange(int(seconds * rate)) / rate
    sf.write(path, (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32), rate)
    return path


def test_features_keeps_inputs_with_one_stem_apart(tmp_path, capsys):
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    first, second = _tone_file(tmp_path / "a" / "x.flac"), _tone_file(tmp_path / "b" / "x.wav", seconds=2.0)
    out = tmp_path / "out"
    assert main(["features", str(first), str(second), "--frontend", "kaldi-fbank", "-o", str(out)]) == 0
    written = sorted(p.name for p in out.iterdir())
    assert len(written) == 2 and "2 of 2 files written" in capsys.readouterr().err
    lengths = sorted(np.load(out / name).shape[0] for name in written)
    assert lengths == [98, 198]  # both files, not one written twice
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary left


def test_features_output_that_is_a_file_is_one_line(tmp_path, capsys):
    clip = _tone_file(tmp_path / "x.wav")
    existing = tmp_path / "taken.npy"
    existing.write_bytes(b"keep me")
    assert main(["features", str(clip), "--frontend", "kaldi-fbank", "-o", str(existing)]) == 2
    err = capsys.readouterr().err
    assert "--output" in err and "not a folder" in err and "Traceback" not in err and len(err.splitlines()) == 1
    assert existing.read_bytes() == b"keep me"


def test_features_streams_long_files_to_the_same_result(tmp_path):
    import torch

    from tympan.audio import load
    from tympan.features import get_frontend

    clip = _tone_file(tmp_path / "long.wav", seconds=75.0)  # longer than one 30 s block
    for frontend in ("kaldi-fbank", "dasheng-mel"):
        out = tmp_path / frontend
        assert main(["features", str(clip), "--frontend", frontend, "-o", str(out)]) == 0
        whole = get_frontend(frontend)(torch.from_numpy(load(clip)))
        whole = whole.T if frontend == "dasheng-mel" else whole  # written as [frames, bins]
        np.testing.assert_allclose(np.load(out / "long.npy"), whole.numpy(), atol=1e-4)


def test_tag_csv_quotes_file_names_and_plots_do_not_collide(tmp_path, sat_checkpoint, capsys):
    import csv
    import io

    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    odd = _tone_file(tmp_path / "a" / 'x, "quoted".wav')
    other = _tone_file(tmp_path / "b" / 'x, "quoted".flac')
    common = ["--model", "sat-tiny-2s", "--checkpoint", sat_checkpoint, "--topk", "2"]
    assert main(["tag", str(odd), str(other), *common, "--format", "csv", "--plot", str(tmp_path / "p.png")]) == 0
    rows = list(csv.reader(io.StringIO(capsys.readouterr().out)))
    assert rows[0] == ["file", "start", "end", "rank", "label", "mid", "probability"]
    assert {row[0] for row in rows[1:]} == {str(odd), str(other)} and all(len(row) == 7 for row in rows)
    plots = sorted(p for p in tmp_path.glob("p_*.png"))
    assert len(plots) == 2 and all(p.read_bytes()[:4] == b"\x89PNG" for p in plots)


def test_tag_refuses_nan_weights_instead_of_printing_nan(tmp_path, sat_checkpoint, capsys):
    import torch

    import tympan

    model = tympan.load("sat-tiny-2s", checkpoint=sat_checkpoint)
    with torch.no_grad():
        next(model.parameters()).fill_(float("nan"))
    saved = tympan.save(model, tmp_path / "nan.safetensors")
    clip = _tone_file(tmp_path / "x.wav")
    assert main(["tag", str(clip), "--model", "sat-tiny-2s", "--checkpoint", str(saved)]) == 2
    captured = capsys.readouterr()
    assert "NaN" in captured.err and "nan" not in captured.out and len(captured.err.splitlines()) == 1


def test_features_refuses_a_1_hz_header_in_one_line(tmp_path, capsys):
    import struct

    clip = _tone_file(tmp_path / "one_hz.wav", seconds=1.25)  # 40 KB
    data = bytearray(clip.read_bytes())
    data[24:28], data[28:32] = struct.pack("<I", 1), struct.pack("<I", 2)
    clip.write_bytes(bytes(data))
    assert main(["features", str(clip), "--frontend", "dasheng-mel", "-o", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert "implausible sample rate in the header 1 Hz" in err and "0 of 1 files written" in err


@pytest.mark.parametrize("chunk", ["nan", "inf", "0", "-2"])
def test_tag_refuses_a_chunk_that_is_not_a_positive_number(tmp_path, chunk, capsys):
    clip = _tone_file(tmp_path / "x.wav")
    assert main(["tag", str(clip), "--model", "sat-tiny-2s", "--random", "--chunk", chunk]) == 2
    assert "--chunk" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ issue 14
def test_tag_chunk_shorter_than_a_model_step_is_a_usage_error(data_dir, sat_checkpoint, capsys):
    """Item 4: --chunk 1 on SAT-2s (1.92 s steps) is exit 2 naming the minimum, not a bad file (exit 1)."""
    clip = str(sorted((data_dir / "esc10" / "audio").glob("1-*.flac"))[0])
    assert main(["tag", clip, "--model", "sat-tiny-2s", "--checkpoint", sat_checkpoint, "--chunk", "1"]) == 2
    err = capsys.readouterr().err
    assert "minimum is 1.92 s" in err and "skipped" not in err and len(err.strip().splitlines()) == 1


def test_tag_with_no_model_uses_the_default_model(capsys):
    """`tympan tag FILE`, nothing else: the shipped default model, its own 1 s reporting chunks."""
    clip = str(REPO / "tympan" / "assets" / "demo_digits_16k.flac")
    assert main(["tag", clip, "--format", "json"]) == 0
    record = json.loads(capsys.readouterr().out)[0]
    assert record["chunks"][0]["tags"][0]["label"]


def test_tag_threads_follow_the_flag_else_the_models_hint(capsys, data_dir):
    """The default model's ops are too small to split: `tag` runs each file on one thread (its hint) and uses the
    other cores of --threads for other files, with the output of a one-thread run; a model without a hint runs on
    --threads (torch's default without the flag); --threads 0 is a one-line usage error."""
    import torch

    clips = [str(p) for p in sorted((data_dir / "esc10" / "audio").glob("1-*.flac"))[:5]]
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert main(["tag", clips[0], "--format", "json"]) == 0 and torch.get_num_threads() == 1
        one = capsys.readouterr().out
        assert main(["tag", *clips, "--format", "json", "--threads", "1"]) == 0 and torch.get_num_threads() == 1
        sequential = capsys.readouterr().out
        assert main(["tag", *clips, "--format", "json", "--threads", "3"]) == 0 and torch.get_num_threads() == 1
        parallel = capsys.readouterr().out  # three files at once, one thread each
        assert parallel == sequential and json.loads(parallel)[0] == json.loads(one)[0]
        assert [r["file"] for r in json.loads(parallel)] == clips
        torch.set_num_threads(1)
        assert main(["tag", clips[0], "--model", "sat-tiny-2s", "--random", "--format", "json"]) == 0
        assert torch.get_num_threads() == 1  # no hint, no flag: left as it was
        assert main(["tag", clips[0], "--model", "sat-tiny-2s", "--random", "--threads", "2"]) == 0
        assert torch.get_num_threads() == 2
        capsys.readouterr()
        assert main(["tag", clips[0], "--threads", "0"]) == 2
        assert capsys.readouterr().err.strip() == "tympan tag: error: --threads must be at least 1"
    finally:
        torch.set_num_threads(before)


def test_tag_labels_flag_names_the_classes_and_is_checked(tmp_path, data_dir, sat_checkpoint, capsys):
    """Item 8: --labels CSV for a model without label names; a wrong number of rows is a one-line usage error."""
    clip = str(sorted((data_dir / "esc10" / "audio").glob("1-*.flac"))[0])
    names = tmp_path / "names.csv"
    names.write_text("index,mid,display_name\n" + "".join(f"{i},m{i},class {i}\n" for i in range(527)))
    common = ["tag", clip, "--model", "sat-tiny-2s", "--checkpoint", sat_checkpoint, "--format", "json"]
    assert main([*common, "--labels", str(names)]) == 0
    assert json.loads(capsys.readouterr().out)[0]["chunks"][0]["tags"][0]["label"].startswith("class ")
    names.write_text("index,mid,display_name\n0,a,A\n")
    assert main([*common, "--labels", str(names)]) == 2
    assert "1 labels, but the model has 527 classes" in capsys.readouterr().err


def test_tag_plot_without_matplotlib_fails_before_the_job(tmp_path, sat_checkpoint, capsys, monkeypatch):
    """Item 8: --plot is refused up front when matplotlib is missing (not after tagging every file)."""
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real(name, *a))
    clip = _tone_file(tmp_path / "x.wav")
    assert main(["tag", str(clip), "--model", "sat-tiny-2s", "--checkpoint", sat_checkpoint,
                 "--plot", str(tmp_path / "t.png")]) == 2  # fmt: skip
    captured = capsys.readouterr()
    assert "--plot needs matplotlib" in captured.err and captured.out == ""


def test_data_command_reads_the_shared_csv_and_a_folder_tree(tmp_path, data_dir, capsys):
    """Item 5: `tympan data` writes the datafile + label CSV from esc10.csv and from class/*.wav folders."""
    assert main(["data", str(data_dir / "esc10" / "esc10.csv"), "-o", str(tmp_path / "esc10.json")]) == 0
    assert "320 clips, 10 classes" in capsys.readouterr().out
    assert (tmp_path / "esc10_labels.csv").is_file()
    recordings = sorted((data_dir / "fsdd" / "recordings").glob("*_george_1[0-2].wav"))
    for path in recordings:
        (tmp_path / "tree" / f"digit{path.name[0]}").mkdir(parents=True, exist_ok=True)
        shutil.copy(path, tmp_path / "tree" / f"digit{path.name[0]}" / path.name)
    assert main(["data", str(tmp_path / "tree"), "-o", str(tmp_path / "tree.json")]) == 0
    assert f"{len(recordings)} clips, 10 classes" in capsys.readouterr().out
    assert main(["data", str(tmp_path / "nowhere.csv"), "-o", str(tmp_path / "x.json")]) == 2
    assert "no such file" in capsys.readouterr().err


@pytest.mark.parametrize("frontend,bins", [("kaldi-fbank", 23), ("ast-fbank", 128), ("dasheng-mel", 64), ("ssam-mel", 80)])
def test_features_write_frames_by_bins_for_every_frontend(tmp_path, frontend, bins):
    """Item 9: one layout, [frames, bins], whatever the frontend; --bins sets the number of bins."""
    clip = _tone_file(tmp_path / "x.wav", seconds=0.5)
    assert main(["features", str(clip), "--frontend", frontend, "-o", str(tmp_path / "a")]) == 0
    feats = np.load(tmp_path / "a" / "x.npy")
    assert feats.ndim == 2 and feats.shape[1] == bins and 48 <= feats.shape[0] <= 52
    assert main(["features", str(clip), "--frontend", frontend, "--bins", "40", "-o", str(tmp_path / "b")]) == 0
    assert np.load(tmp_path / "b" / "x.npy").shape[1] == 40


def test_embed_exits_1_when_it_skipped_a_file(data_dir, tmp_path, capsys):
    """The exit rule for every command: a bad file is reported and skipped, the rest embedded, exit 1 (was 0)."""
    broken = tmp_path / "broken.wav"
    broken.write_bytes(b"RIFF not really audio")
    clips = sorted((data_dir / "esc10" / "audio").glob("1-*.flac"))[:2]
    datafile = tmp_path / "mixed.json"
    datafile.write_text(json.dumps({"data": [{"wav": str(p), "labels": "x"} for p in [*clips, broken]]}))
    out = tmp_path / "emb.safetensors"
    tiny = ["--set", "embed_dim=32", "--set", "depth=1", "--set", "num_heads=2"]
    assert main(["embed", str(datafile), "--model", "dasheng-base", *tiny, "--random", "-o", str(out),
                 "--clip-seconds", "1", "--quiet"]) == 1
    printed = capsys.readouterr().out
    assert "2 clips x" in printed and "skipped" in printed and "broken.wav" in printed


def test_embed_threads_flag_is_applied_and_checked(data_dir, tmp_path, capsys):
    """`embed --threads N` runs the batches on N torch threads (the flag used to be accepted and ignored); 0 is a
    one-line usage error before any work."""
    import torch

    clips = sorted((data_dir / "esc10" / "audio").glob("1-*.flac"))[:2]
    datafile = tmp_path / "two.json"
    datafile.write_text(json.dumps({"data": [{"wav": str(p), "labels": "x"} for p in clips]}))
    out = tmp_path / "emb.safetensors"
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert main(["embed", str(datafile), "-o", str(out), "--threads", "1", "--quiet"]) == 0
        assert torch.get_num_threads() == 1 and out.is_file()
        capsys.readouterr()
        assert main(["embed", str(datafile), "-o", str(tmp_path / "x.safetensors"), "--threads", "0"]) == 2
        assert capsys.readouterr().err.strip() == "tympan embed: error: --threads must be at least 1"
        assert not (tmp_path / "x.safetensors").exists()
    finally:
        torch.set_num_threads(before)


def test_output_reader_closing_early_stops_quietly():
    """`tympan tag ... | head`: the tagger stops when the reader goes away, exit 141 (128 + SIGPIPE) and nothing on
    stderr (it printed "error: Broken pipe", exit 2, and Python's "Exception ignored" at exit)."""
    import subprocess
    import sys

    demo = str(REPO / "tympan" / "assets" / "demo_scene_16k.flac")
    args = [sys.executable, "-m", "tympan.cli", "tag", *[demo] * 40, "--chunk", "0.48", "--topk", "20"]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # ~1 MB: more than a pipe holds
    assert proc.stdout.read(100)  # the first lines arrived ...
    proc.stdout.close()  # ... and the reader leaves, like head
    assert proc.wait(timeout=120) == 141
    assert proc.stderr.read().decode().strip() == ""
