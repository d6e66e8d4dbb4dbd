"""Precision modes (fp32 / bf16 / int8): fp32 untouched, int8 layers equal their own quantised math, bounded drift
against fp32 on real ESC-10 clips, float32 outputs and streaming state in every mode."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tympan.audio import load as load_audio
from tympan.inference.precision import (PRECISIONS, Int8Linear, precision_of, quantize_linears, quantize_rows,
                                        with_precision)
from tympan.models.registry import create_test_model

ESC10_CLIPS = ["1-100032-A-0.flac", "1-116765-A-41.flac", "1-17150-A-12.flac", "1-26806-A-1.flac"]


def _model(model_id: str) -> nn.Module:
    torch.manual_seed(0)
    return create_test_model(model_id).eval()


def test_quantize_rows_is_symmetric_and_bounded():
    x = torch.randn(5, 33) * torch.tensor([0.01, 1.0, 10.0, 100.0, 0.0])[:, None]
    q, scale = quantize_rows(x)
    assert q.dtype == torch.int8 and q.abs().max() <= 127
    assert (q.abs().amax(1)[:4] == 127).all()  # every non-zero row uses the full range
    assert ((q * scale - x).abs() <= scale / 2 + 1e-7).all()  # rounding error at most half a step


@pytest.mark.parametrize("bias", [True, False])
def test_int8_linear_equals_its_dequantised_reference(bias):
    torch.manual_seed(0)
    linear = nn.Linear(96, 40, bias=bias)
    q = Int8Linear(linear)
    x = torch.randn(3, 7, 96)
    out = q(x)
    assert out.shape == (3, 7, 40) and out.dtype == torch.float32
    torch.testing.assert_close(out.double(), q.reference(x), rtol=1e-6, atol=1e-6)
    # and it approximates the float layer within the quantisation error
    exact = linear(x)
    assert (out - exact).abs().max() < 0.02 * exact.abs().max()
    torch.testing.assert_close(q.weight, linear.weight, atol=linear.weight.abs().max().item() / 127, rtol=0)


def test_int8_linear_handles_empty_and_zero_rows():
    q = Int8Linear(nn.Linear(32, 16))
    assert q(torch.zeros(0, 32)).shape == (0, 16)
    torch.testing.assert_close(q(torch.zeros(2, 32)), q.bias.expand(2, 16))


def test_quantize_linears_replaces_plain_linears_only():
    class Sub(nn.Linear):
        pass

    model = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), Sub(32, 32), nn.Linear(32, 4), nn.Linear(32, 32))
    count = quantize_linears(model, skip=lambda name, m: name == "4")
    assert count == 1  # [3] is narrower than min_features, [2] a subclass, [4] skipped
    assert isinstance(model[0], Int8Linear) and type(model[2]) is Sub
    assert type(model[3]) is nn.Linear and type(model[4]) is nn.Linear


def test_fp32_leaves_the_model_untouched():
    model = _model("ast-base384")
    x = torch.randn(1, *model.frontend(torch.zeros(1, 16000)).shape[1:])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.inference_mode():
        expected = model(x)
        assert with_precision(model, "fp32") is model and precision_of(model) == "fp32"
        assert torch.equal(model(x), expected)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_modes_are_checked():
    model = _model("ast-base384")
    with pytest.raises(ValueError, match="precision must be one of"):
        with_precision(model, "fp16")
    with_precision(model, "int8")
    assert precision_of(model) == "int8"
    with pytest.raises(ValueError, match="already in int8"):
        with_precision(model, "bf16")


def test_int8_keeps_the_head_float():
    model = with_precision(_model("ast-base384"), "int8")
    head = model.get_submodule(model.classifier)
    assert not any(isinstance(m, Int8Linear) for m in head.modules())
    assert any(isinstance(m, Int8Linear) for m in model.modules())


def _esc10_batch(data_dir, seconds: float = 5.0) -> torch.Tensor:
    clips = [torch.as_tensor(load_audio(str(data_dir / "esc10" / "audio" / name), sample_rate=16000, mono=True))
             for name in ESC10_CLIPS]
    n = int(seconds * 16000)
    return torch.stack([torch.nn.functional.pad(c.float().reshape(-1)[:n], (0, max(0, n - c.numel()))) for c in clips])


@pytest.mark.parametrize("model_id, bounds", [
    ("ast-base384", {"bf16": 0.02, "int8": 0.05}),
    ("dass-small", {"bf16": 0.02, "int8": 0.05}),
])
def test_drift_against_fp32_on_esc10_clips(data_dir, model_id, bounds):
    wave = _esc10_batch(data_dir)
    reference = _model(model_id)
    with torch.inference_mode():
        probs = {"fp32": reference.predict(wave)}
        for precision in ("bf16", "int8"):
            model = _model(model_id)
            model.load_state_dict(reference.state_dict())
            probs[precision] = with_precision(model, precision).predict(wave)
    for precision in ("bf16", "int8"):
        p = probs[precision]
        assert p.dtype == torch.float32 and p.shape == probs["fp32"].shape
        assert (p - probs["fp32"]).abs().max() < bounds[precision], precision
        k = min(5, p.shape[1])
        top = p.topk(k).indices
        top_ref = probs["fp32"].topk(k).indices
        agreement = sum(len(set(a.tolist()) & set(b.tolist())) for a, b in zip(top, top_ref)) / top.numel()
        assert agreement >= 0.6, (precision, agreement)


def test_bf16_streaming_gives_float32_logits_and_state():
    model = _model("sat-tiny-2s")
    fast = _model("sat-tiny-2s")
    fast.load_state_dict(model.state_dict())
    with_precision(fast, "bf16")
    chunk = 0.1 * torch.randn(1, model.chunk_samples, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        state, fast_state = model.init_state(1), fast.init_state(1)
        for _ in range(3):
            logits, state = model.step(chunk, state)
            fast_logits, fast_state = fast.step(chunk, fast_state)
    assert fast_logits.dtype == torch.float32
    assert all(t.dtype == s.dtype for t, s in zip(fast_state, state))
    assert (fast_logits - logits).abs().max() < 0.1


@pytest.mark.parametrize("precision", PRECISIONS)
def test_embed_in_every_mode(precision):
    model = with_precision(_model("dasheng-base"), precision)
    with torch.inference_mode():
        emb = model.embed_waveform(0.1 * torch.randn(1, 32000, generator=torch.Generator().manual_seed(1)))
    assert emb.scene.dtype == torch.float32 and emb.frames.dtype == torch.float32
    assert torch.isfinite(emb.scene).all()


@pytest.mark.parametrize("precision", ["bf16", "int8"])
def test_cli_tag_with_precision_is_close_to_fp32(data_dir, capsys, precision):
    import json

    from tympan.cli import main

    clip = str(data_dir / "esc10" / "audio" / ESC10_CLIPS[0])
    outputs = {}
    for mode in ("fp32", precision):
        torch.manual_seed(0)
        assert main(["tag", clip, "--model", "sat-tiny-2s", "--random", "--set", "depth=2", "--format", "json",
                     "--precision", mode]) == 0
        outputs[mode] = json.loads(capsys.readouterr().out)[0]["chunks"][0]["tags"]
    fp32 = {t["label"]: t["probability"] for t in outputs["fp32"]}
    low = {t["label"]: t["probability"] for t in outputs[precision]}
    assert len(set(fp32) & set(low)) >= 3
    assert all(abs(low[k] - fp32[k]) < 0.05 for k in set(fp32) & set(low))


def test_cli_refuses_precision_with_onnx(tmp_path, capsys):
    from tympan.cli import main

    assert main(["tag", str(tmp_path / "x.wav"), "--model", "sat-tiny-2s", "--random", "--backend", "onnx",
                 "--precision", "int8"]) == 2
    assert "--backend torch only" in capsys.readouterr().err


def test_hear_load_model_takes_a_precision():
    from tympan.hear import get_scene_embeddings, load_model

    model = load_model("", model_id="dasheng-base", pretrained=False, precision="int8", depth=1)
    assert precision_of(model.model) == "int8"
    emb = get_scene_embeddings(0.1 * torch.randn(2, 16000, generator=torch.Generator().manual_seed(0)), model)
    assert emb.dtype == torch.float32 and emb.shape[0] == 2 and torch.isfinite(emb).all()


def test_native_and_pytorch_quantisation_agree():
    """The C row quantiser (contiguous rows) and the PyTorch path (strided rows) give the same int8 and scales."""
    from tympan.inference.precision import rescale

    x = torch.randn(37, 300) * torch.logspace(-3, 3, 37)[:, None]
    q_native, s_native = quantize_rows(x)
    q_torch, s_torch = quantize_rows(x.t().contiguous().t())  # column-major: the PyTorch ops
    assert torch.equal(q_native, q_torch) and torch.equal(s_native, s_torch)
    acc = torch.randint(-2**20, 2**20, (37, 50), dtype=torch.int32)
    col, bias = torch.rand(50), torch.randn(50)
    native = rescale(acc, s_native, col, bias)
    reference = rescale(acc.t().contiguous().t(), s_native, col, bias)
    torch.testing.assert_close(native, reference, rtol=1e-6, atol=1e-6)
