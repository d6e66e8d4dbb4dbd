"""Waveform -> probabilities for models that output logits on a frontend's features (AST), through the tag path."""

import torch

import tympan
from tympan.features import ast_fbank
from tympan.inference.tagging import Tagger, tag_file, window_seconds

from tests.parity import fixtures_root


def _ast_fixture_model():
    path = fixtures_root() / "ast-base384-f10t10" / "checkpoint.pt"
    state = torch.load(path, weights_only=True)
    depth = len({k.split(".")[3] for k in state if k.startswith("module.v.blocks.")})
    return tympan.load("ast-base384", checkpoint=path, depth=depth)


def test_ast_file_tags_are_sigmoid_of_logits_on_padded_fbank(data_dir):
    from tympan import audio

    model = _ast_fixture_model()
    clip = sorted((data_dir / "esc10" / "audio").glob("1-*.flac"))[0]  # 5 s: one partial 10.24 s window
    assert window_seconds(model) == 10.24
    tags = tag_file(model, clip)
    wave = torch.from_numpy(audio.load(clip))[None]
    assert len(tags.chunk_probs) == 1 and tags.ends[-1] == wave.shape[1] / 16000
    with torch.no_grad():
        expected = torch.sigmoid(model(ast_fbank(wave, target_length=1024)))[0]
        direct = Tagger(model)(wave)[0]
    assert torch.allclose(tags.probs, expected, atol=1e-5)
    assert torch.allclose(direct, expected, atol=1e-5)
    assert len(Tagger(model).labels) == 527


def test_tag_files_in_threads_equals_one_at_a_time_and_reports_bad_files_in_place(data_dir, tmp_path):
    """Several files at once (how `tag` uses the cores a small model cannot split over): the same tags, bit for
    bit, in input order; a bad file comes back as its error at its place and the others are still tagged."""
    from tympan.audio import AudioError
    from tympan.inference.tagging import tag_files

    model = tympan.load()  # the shipped default model (hint: one thread per file)
    bad = tmp_path / "broken.wav"
    bad.write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunk")
    clips = sorted((data_dir / "esc10" / "audio").glob("2-*.flac"))[:6]
    paths = [*clips[:3], bad, *clips[3:]]
    sequential = list(tag_files(model, paths, workers=1))
    threaded = list(tag_files(model, paths, workers=3))
    assert [p for p, _ in threaded] == paths == [p for p, _ in sequential]
    assert isinstance(threaded[3][1], AudioError) and str(bad) in str(threaded[3][1])
    for (_, a), (_, b) in zip(sequential, threaded):
        if not isinstance(a, Exception):
            assert torch.equal(a.timeline, b.timeline) and a.ends == b.ends
            assert torch.equal(a.timeline, tag_file(model, a.path).timeline)
