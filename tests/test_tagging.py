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
