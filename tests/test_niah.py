"""Audio needle-in-a-haystack: haystack construction, streamed features, scoring and sweeps (tiny models)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import tympan
from tympan.eval.niah import (
    Haystack,
    _streamed_fbank,
    haystack_blocks,
    load_babble,
    niah_main,
    run_niah,
    run_sweep,
    score_outputs,
)

SR = 16000
TINY = {
    "dass-small": dict(depths=(1, 1, 1, 1), dims=(8, 16, 32, 64)),
    "ast-base384": dict(embed_dim=16, depth=1, num_heads=1, input_tdim=128),
    "sat-tiny-2s": dict(embed_dim=16, depth=1, num_heads=1),
    "dasheng-base": dict(embed_dim=16, depth=1, num_heads=1),
    "ssam-tiny": dict(embed_dim=16, depth=1),
}


def tiny(model_id: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return tympan.create_model(model_id, **TINY[model_id]).eval()


@pytest.fixture(scope="module")
def needles(data_dir) -> np.ndarray:
    """Three real ESC-10 clips, 1 s each."""
    from tympan import audio

    files = sorted((data_dir / "esc10" / "audio").glob("*.flac"))[::40][:3]
    clips = [audio.load(f) for f in files]
    loudest = [int(np.argmax([np.square(c[a:a + SR]).sum() for a in range(0, len(c) - SR, SR // 4)])) * (SR // 4)
               for c in clips]  # fmt: skip
    return np.stack([c[a:a + SR] for c, a in zip(clips, loudest)])


def collect(blocks) -> np.ndarray:
    return np.concatenate(list(blocks), axis=1)


@pytest.mark.parametrize("position", [0.0, 0.37, 1.0])
def test_needle_is_inserted_whole_at_its_position(needles, position):
    total = 7 * SR + 11
    inputs = collect(haystack_blocks(needles, total, position, Haystack("white", 10.0, seed=3), block_samples=SR))
    assert inputs.shape == (3, total)
    start = int(round(position * (total - SR)))
    np.testing.assert_array_equal(inputs[:, start:start + SR], needles)
    noise = np.concatenate([inputs[:, :start], inputs[:, start + SR:]], axis=1)
    snr = 20 * np.log10(np.sqrt((needles.astype(np.float64) ** 2).mean(1)) / np.sqrt((noise.astype(np.float64) ** 2).mean(1)))
    np.testing.assert_allclose(snr, 10.0, atol=0.1)
    again = collect(haystack_blocks(needles, total, position, Haystack("white", 10.0, seed=3), block_samples=3 * SR))
    np.testing.assert_array_equal(inputs, again)  # seeded, whatever the block size


def test_zeros_and_babble_haystacks(needles, data_dir):
    zeros = collect(haystack_blocks(needles, 3 * SR, 0.5, Haystack("zeros"), block_samples=SR))
    assert np.count_nonzero(zeros[:, : SR]) == 0 and np.count_nonzero(zeros[:, 2 * SR:]) == 0
    babble = load_babble(data_dir / "noise" / "babble_dass_16k.flac")
    assert abs(np.sqrt(np.mean(babble.astype(np.float64) ** 2)) - 1) < 1e-4
    total = babble.shape[0] + 5 * SR  # longer than the babble file: it is tiled
    inputs = collect(haystack_blocks(needles[:1], total, 1.0, Haystack("babble", 0.0, babble=babble), block_samples=7 * SR))
    rms = np.sqrt(np.mean(needles[0].astype(np.float64) ** 2))
    hay = inputs[0, : total - SR] / rms
    np.testing.assert_allclose(hay[: babble.shape[0]], babble, atol=1e-5)
    np.testing.assert_allclose(hay[babble.shape[0]:], babble[: total - SR - babble.shape[0]], atol=1e-5)
    with pytest.raises(ValueError, match="haystack must be one of"):
        Haystack("pink")
    with pytest.raises(ValueError, match="shorter than the needle"):
        list(haystack_blocks(needles, SR // 2, 0.0, Haystack(), SR))


def test_streamed_fbank_equals_whole_input_fbank(monkeypatch):
    from tympan.eval import niah
    from tympan.features import ast_fbank

    monkeypatch.setattr(niah, "_FBANK_BLOCK_FRAMES", 97)  # many Kaldi calls with odd cuts
    wave = np.random.default_rng(0).standard_normal((2, 5 * SR + 123)).astype(np.float32) * 0.1 + 0.02
    blocks = (wave[:, a:a + 4321] for a in range(0, wave.shape[1], 4321))
    streamed = _streamed_fbank(blocks, wave.mean(1, keepdims=True), 128)
    torch.testing.assert_close(streamed, ast_fbank(torch.from_numpy(wave)), atol=5e-5, rtol=1e-5)


def test_scores_of_identical_and_shuffled_outputs():
    references = torch.rand(4, 20)
    targets = (references >= references.topk(3, dim=1).values[:, -1:]).double()
    same = score_outputs(references, references, targets)
    assert same["retention"] == pytest.approx(1.0) and same["needle_rank"] == 1 and same["needle_top1"] == 1
    assert same["label_rank"] == pytest.approx(2.0)  # top-3 labels rank 1, 2, 3
    shuffled = score_outputs(references[[1, 2, 3, 0]], references, targets)
    assert shuffled["needle_top1"] == 0 and shuffled["retention"] < 1
    assert "mAP" not in score_outputs(references, references, None)


@pytest.mark.parametrize("model_id, mode", [("dass-small", "whole"), ("ast-base384", "windows"),
                                             ("sat-tiny-2s", "stream"), ("dasheng-base", "windows"),
                                             ("ssam-tiny", "whole")])  # fmt: skip
def test_sweep_every_mode(model_id, mode, needles):
    model = tiny(model_id)
    result = run_niah(model, needles, durations=(1.0, 3.0), positions=(0.0, 1.0), log=None)
    assert result["mode"] == mode and len(result["points"]) == 4
    bare = result["points"][0]["scores"]  # the input is the bare needle: everything is retrieved
    assert bare["retention"] == pytest.approx(1.0, abs=1e-6) and bare["needle_top1"] == 1.0
    is_tagger = model_id not in ("dasheng-base", "ssam-tiny")
    assert ("mAP" in bare) == is_tagger
    for point in result["points"]:
        assert point["seconds"] >= 0 and point["peak_rss_mb"] > 0
        assert -1 <= point["scores"]["retention"] <= 1 + 1e-9


def test_window_aggregate_max_differs_from_mean(needles):
    model = tiny("ast-base384")
    mean = run_niah(model, needles, durations=(4.0,), positions=(0.5,), aggregate="mean", log=None)
    peak = run_niah(model, needles, durations=(4.0,), positions=(0.5,), aggregate="max", log=None)
    assert mean["points"][0]["scores"] != peak["points"][0]["scores"]
    with pytest.raises(ValueError, match="aggregate"):
        run_niah(model, needles, durations=(4.0,), aggregate="median", log=None)


def test_niah_main_writes_table_json_and_plot(data_dir, tmp_path, capsys):
    files = sorted((data_dir / "esc10" / "audio").glob("*.flac"))[:2]
    result = niah_main("sat-tiny-2s", files, tmp_path, pretrained=False, durations=(2.0, 4.0), positions=(0.5,),
                       haystack="babble", snr_db=5.0, babble_path=data_dir / "noise" / "babble_dass_16k.flac",
                       needle_seconds=2.0, overrides=TINY["sat-tiny-2s"])  # fmt: skip
    stored = json.loads((tmp_path / "niah.json").read_text())
    assert stored["points"] == json.loads(json.dumps(result["points"]))
    assert stored["haystack"] == {"kind": "babble", "snr_db": 5.0, "seed": 0} and stored["labels"] == "self"
    assert (tmp_path / "niah.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = (tmp_path / "niah.txt").read_text()
    assert "duration_s" in table and "mAP" in table
    assert "wrote" in capsys.readouterr().out
    run_sweep(result, tmp_path / "again")
    assert (tmp_path / "again" / "niah.txt").read_text() == table


def test_niah_compare_draws_and_tabulates_earlier_sweeps(data_dir, tmp_path, capsys):
    files = sorted((data_dir / "esc10" / "audio").glob("*.flac"))[:2]
    common = dict(pretrained=False, durations=(2.0, 4.0), positions=(0.5,), needle_seconds=1.0)
    first = niah_main("dass-small", files[:1], tmp_path / "dass", overrides=TINY["dass-small"], **common)
    with pytest.raises(ValueError, match="not a NIAH result"):  # checked before the sweep runs
        niah_main("ast-base384", files, tmp_path / "ast", compare=[tmp_path / "nowhere"],
                  overrides=TINY["ast-base384"], **common)  # fmt: skip
    assert not (tmp_path / "ast").exists()
    second = niah_main("ast-base384", files, tmp_path / "ast", compare=[tmp_path / "dass"],
                       overrides=TINY["ast-base384"], **common)  # fmt: skip
    table = (tmp_path / "ast" / "comparison.txt").read_text().splitlines()
    assert "ast-base384: mAP" in table[0] and "dass-small: retention" in table[0]  # one needle: its mAP is 1
    assert "ast-base384" in table[1] and "dass-small" in table[1]
    rows = [line.split("|") for line in table[2:]]
    assert [float(r[0].split()[0]) for r in rows] == [2.0, 4.0]
    for row, ours, theirs in zip(rows, second["points"], first["points"]):
        assert float(row[1].split()[0]) == pytest.approx(ours["seconds"], abs=0.06)
        assert float(row[2].split()[2]) == pytest.approx(theirs["scores"]["retention"], abs=6e-4)
        assert float(row[1].split()[2]) == pytest.approx(ours["scores"]["mAP"], abs=6e-4)
    assert (tmp_path / "ast" / "niah.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "NIAH comparison" in capsys.readouterr().out
