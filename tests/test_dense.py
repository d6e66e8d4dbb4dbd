"""oneDNN prepacked products (tympan.ops.dense) against F.linear, and where they must not apply."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tympan.models.layers import Block
from tympan.ops import dense

pytestmark = pytest.mark.skipif(not dense.available(), reason="torch without oneDNN: the modules run as written")


@pytest.mark.parametrize("shape", [(130, 48), (3, 100, 48), (2, 7, 50, 48)])
@pytest.mark.parametrize("gelu", [False, True])
def test_linear_equals_f_linear(shape, gelu):
    """Any leading shape (and a strided input), with and without the fused exact GELU and the bias."""
    torch.manual_seed(0)
    layer = nn.Linear(48, 80)
    x = torch.randn(*shape)
    for inp in (x, x.transpose(-2, -3) if x.dim() > 2 else x[::2]):
        with torch.inference_mode():
            out = dense.linear(layer, inp, gelu=gelu)
            expected = F.linear(inp, layer.weight, layer.bias)
            expected = F.gelu(expected) if gelu else expected
        assert out is not None and out.shape == expected.shape
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    layer.bias = None
    with torch.inference_mode():
        torch.testing.assert_close(dense.linear(layer, x), F.linear(x, layer.weight), atol=1e-5, rtol=1e-5)


def test_packed_weight_follows_in_place_changes():
    """The reordered copy is rebuilt when the weight changes in place or is replaced, and the bias is read live."""
    layer = nn.Linear(32, 32)
    x = torch.randn(100, 32)
    with torch.inference_mode():
        before = dense.linear(layer, x)
    with torch.no_grad():
        layer.weight.mul_(2.0)
        layer.bias.add_(1.0)
    with torch.inference_mode():
        torch.testing.assert_close(dense.linear(layer, x), F.linear(x, layer.weight, layer.bias), atol=1e-5, rtol=1e-5)
        assert not torch.allclose(dense.linear(layer, x), before)
    layer.weight = nn.Parameter(torch.zeros(32, 32))
    with torch.inference_mode():
        torch.testing.assert_close(dense.linear(layer, x), layer.bias.expand(100, -1), atol=0, rtol=0)


def test_declines_outside_plain_float32_inference():
    """Autograd, autocast, few rows, float64, another module type, an inference-tensor weight: None."""
    layer = nn.Linear(16, 16)
    x = torch.randn(200, 16)
    assert dense.linear(layer, x) is None  # autograd on
    with torch.inference_mode():
        assert dense.linear(layer, x[: dense.MIN_ROWS - 1]) is None
        assert dense.linear(layer.double(), x.double()) is None
        assert dense.linear(nn.Conv1d(16, 16, 1), x) is None
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert dense.linear(layer.float(), x) is None
        frozen = nn.Linear(16, 16)
    with torch.inference_mode():
        assert dense.linear(frozen, x) is None  # created in inference mode: no version counter to cache by


def test_block_output_and_training_path(monkeypatch):
    """A ViT block in eval mode on the dense path equals the same block with it off; training keeps autograd."""
    torch.manual_seed(0)
    block = Block(96, 3).eval()
    x = torch.randn(2, 130, 96)
    with torch.inference_mode():
        fast = block(x)
    monkeypatch.setattr(dense, "ENABLED", False)
    with torch.inference_mode():
        plain = block(x)
    monkeypatch.undo()
    torch.testing.assert_close(fast, plain, atol=1e-5, rtol=1e-5)
    block.train()
    y = block(x.requires_grad_())
    y.sum().backward()
    assert x.grad is not None and block.mlp.fc1.weight.grad is not None
