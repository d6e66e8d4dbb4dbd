"""tympan.ops.selective_scan: the chunked scan against the sequential reference (values, gradients, stability)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tympan.ops import selective_scan, selective_scan_reference
from tympan.ops.chunked_scan import plan_blocks, selective_scan_chunked


def make_inputs(batch=2, groups=2, per_group=3, state=2, length=20, *, bc="grouped", with_D=True, with_z=True,
                with_bias=True, dtype=torch.float64, seed=0, dt_scale=0.5, decay_scale=1.0) -> dict:
    """Random scan inputs; ``bc``: "grouped" [b, g, n, L], "shared" [b, n, L] or "fixed" [d, n]."""
    g = torch.Generator().manual_seed(seed)
    d = groups * per_group

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=dtype)

    bc_shape = {"grouped": (batch, groups, state, length), "shared": (batch, state, length), "fixed": (d, state)}[bc]
    return dict(
        u=randn(batch, d, length), delta=dt_scale * randn(batch, d, length),
        A=-decay_scale * torch.exp(torch.rand(d, state, generator=g, dtype=dtype) * 2 - 1),
        B=randn(*bc_shape), C=randn(*bc_shape), D=1 + 0.5 * randn(d) if with_D else None,
        z=randn(batch, d, length) if with_z else None, delta_bias=randn(d) if with_bias else None,
    )


def assert_close(actual, expected, atol, rtol=0.0, msg=None):
    torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol, check_dtype=False, msg=msg)


scan_settings = st.fixed_dictionaries(dict(
    batch=st.integers(1, 3), groups=st.integers(1, 3), per_group=st.integers(1, 3), state=st.integers(1, 5),
    length=st.integers(1, 40), bc=st.sampled_from(["grouped", "shared", "fixed"]), with_D=st.booleans(),
    with_z=st.booleans(), with_bias=st.booleans(), seed=st.integers(0, 2**16),
))
plans = st.tuples(st.one_of(st.none(), st.integers(1, 9)), st.one_of(st.none(), st.integers(1, 17)))


@settings(max_examples=60, deadline=None)
@given(cfg=scan_settings, plan=plans, softplus=st.booleans())
def test_chunked_matches_reference(cfg, plan, softplus):
    inputs = make_inputs(**cfg)
    y_ref, last_ref = selective_scan_reference(**inputs, delta_softplus=softplus, return_last_state=True)
    y, last = selective_scan_chunked(**inputs, delta_softplus=softplus, return_last_state=True,
                                     chunk_size=plan[0], block_size=plan[1])
    assert y.shape == y_ref.shape and last.shape == last_ref.shape
    assert_close(y, y_ref, atol=1e-12, rtol=1e-10)
    assert_close(last, last_ref, atol=1e-12, rtol=1e-10)


@settings(max_examples=25, deadline=None)
@given(cfg=scan_settings, plan=plans)
def test_gradients_match_reference(cfg, plan):
    inputs = make_inputs(**cfg)
    leaves = {k: v.requires_grad_() for k, v in inputs.items() if v is not None}
    weight = torch.randn(inputs["u"].shape, dtype=torch.float64)
    grads = []
    for fn in (selective_scan_reference, lambda **kw: selective_scan_chunked(**kw, chunk_size=plan[0],
                                                                             block_size=plan[1])):
        y, last = fn(**inputs, delta_softplus=True, return_last_state=True)
        grads.append(torch.autograd.grad((y * weight).sum() + last.sum(), list(leaves.values())))
    for name, g_ref, g in zip(leaves, *grads):
        assert_close(g, g_ref, atol=1e-10, rtol=1e-9, msg=name)


def test_gradcheck_all_inputs():
    inputs = make_inputs(batch=2, groups=2, per_group=2, state=3, length=11)
    names = list(inputs)

    def fn(*tensors):
        kw = dict(zip(names, tensors))
        y, last = selective_scan_chunked(**kw, delta_softplus=True, return_last_state=True, chunk_size=2,
                                         block_size=4)
        return y, last

    tensors = tuple(inputs[k].requires_grad_() for k in names)
    assert torch.autograd.gradcheck(fn, tensors, eps=1e-6, atol=1e-6)


def test_gradients_moderate_shape_float32():
    inputs = make_inputs(batch=2, groups=4, per_group=8, state=4, length=300, dtype=torch.float32)
    leaves = {k: v.requires_grad_() for k, v in inputs.items()}
    weight = torch.randn(inputs["u"].shape)
    grads = []
    for fn in (selective_scan_reference, selective_scan_chunked):
        y = fn(**inputs, delta_softplus=True)
        grads.append(torch.autograd.grad((y * weight).sum(), list(leaves.values())))
    for name, g_ref, g in zip(leaves, *grads):
        scale = float(g_ref.abs().max())
        assert_close(g, g_ref, atol=2e-5 * scale, rtol=1e-4, msg=name)


@pytest.mark.parametrize("state", [1, 16])
def test_long_sequence_strong_decay_is_stable(state):
    """L = 8192 with decays down to exp(-200) per step: no inf/nan, matches the float64 reference."""
    inputs = make_inputs(batch=1, groups=2, per_group=4, state=state, length=8192, dtype=torch.float32,
                         dt_scale=4.0, decay_scale=20.0, with_z=False)
    y = selective_scan(**inputs, delta_softplus=True)
    assert torch.isfinite(y).all()
    expected = selective_scan_reference(**{k: v.double() for k, v in inputs.items() if v is not None},
                                        delta_softplus=True)
    assert_close(y, expected, atol=1e-4, rtol=1e-4)


def test_long_sequence_slow_decay_float32():
    """Near-unit decays over 10k steps (the state integrates): float32 stays close to float64."""
    inputs = make_inputs(batch=1, groups=1, per_group=8, state=2, length=10000, dtype=torch.float32,
                         decay_scale=1e-3, with_z=False)
    inputs["delta"] = inputs["delta"] - 4.0
    y, last = selective_scan(**inputs, delta_softplus=True, return_last_state=True)
    ref64, last64 = selective_scan_reference(**{k: v.double() for k, v in inputs.items() if v is not None},
                                             delta_softplus=True, return_last_state=True)
    scale = float(ref64.abs().max())
    assert_close(y, ref64, atol=1e-5 * scale, rtol=1e-4)
    assert_close(last, last64, atol=1e-5 * scale, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_inputs_accumulate_in_float32(dtype):
    inputs = make_inputs(batch=2, groups=2, per_group=4, state=4, length=64, dtype=torch.float32)
    low = {k: v.to(dtype) for k, v in inputs.items()}
    y, last = selective_scan(**low, delta_softplus=True, return_last_state=True)
    assert y.dtype == dtype and last.dtype == torch.float32
    y_ref = selective_scan_reference(**{k: v.double() for k, v in low.items()}, delta_softplus=True)
    assert_close(y.double(), y_ref.to(dtype).double(), atol=0.05, rtol=0.02)


def test_float32_matches_float64():
    inputs = make_inputs(batch=2, groups=4, per_group=8, state=4, length=500, dtype=torch.float32)
    y = selective_scan(**inputs, delta_softplus=True)
    y64 = selective_scan_reference(**{k: v.double() for k, v in inputs.items()}, delta_softplus=True)
    assert y.dtype == torch.float32
    assert_close(y, y64, atol=2e-5, rtol=1e-5)


def test_backends_agree_and_auto_is_chunked_on_cpu():
    inputs = make_inputs(dtype=torch.float32)
    y_auto = selective_scan(**inputs, delta_softplus=True)
    y_chunked = selective_scan(**inputs, delta_softplus=True, backend="chunked")
    y_ref = selective_scan(**inputs, delta_softplus=True, backend="reference")
    assert torch.equal(y_auto, y_chunked)
    assert_close(y_chunked, y_ref, atol=1e-5, rtol=1e-5)


def test_plan_blocks_covers_sequence():
    for length in (1, 7, 100, 8192):
        for elements in (1, 768, 49152, 10**6):
            block, chunk = plan_blocks(length, elements)
            assert 1 <= chunk <= block <= max(length, 1) and block % chunk == 0


@pytest.mark.parametrize("bad, message", [
    (dict(u=torch.zeros(2, 6)), "u must be"),
    (dict(delta=torch.zeros(2, 6, 5)), "delta shape"),
    (dict(A=torch.zeros(5, 2)), "A must be"),
    (dict(B=torch.zeros(2, 4, 2, 20)), "B must be"),
    (dict(C=torch.zeros(2, 3, 20)), "C must be"),
    (dict(D=torch.zeros(5)), "D must be"),
    (dict(z=torch.zeros(2, 6, 19)), "z shape"),
])
def test_bad_shapes_raise_clear_errors(bad, message):
    inputs = {**make_inputs(dtype=torch.float32), **bad}
    for backend in ("chunked", "reference"):
        with pytest.raises(ValueError, match=message):
            selective_scan(**inputs, backend=backend)


def test_bad_backend_raises():
    inputs = make_inputs(dtype=torch.float32)
    with pytest.raises(ValueError, match="backend"):
        selective_scan(**inputs, backend="triton")
    with pytest.raises(ValueError, match="cuda"):
        selective_scan(**inputs, backend="cuda")


# ------------------------------------------------------------------------------------------ fused CPU kernel

from tympan.ops import fused_scan  # noqa: E402
from tympan.ops.selective_scan import grouped_state_matrix  # noqa: E402

needs_fused = pytest.mark.skipif(not fused_scan.available(), reason=f"fused scan: {fused_scan.build_error()}")


def _fused(inputs: dict, softplus: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    u = inputs["u"]
    b, d, length = u.shape
    B = grouped_state_matrix(inputs["B"], b, d, length)
    C = grouped_state_matrix(inputs["C"], b, d, length)
    return fused_scan.fused_scan_forward(u, inputs["delta"], inputs["A"], B, C, inputs["D"], inputs["z"],
                                         inputs["delta_bias"], softplus, True)


@needs_fused
@pytest.mark.parametrize("state", [1, 3])
@pytest.mark.parametrize("bc", ["grouped", "shared", "fixed"])
@pytest.mark.parametrize("length, per_group", [(1, 1), (37, 3), (513, 5), (1100, 9)])
@pytest.mark.parametrize("softplus", [True, False])
def test_fused_kernel_matches_float64_reference(state, bc, length, per_group, softplus):
    """Tile boundaries (512 steps), channel blocks of 8 with remainders, group boundaries inside a block."""
    inputs = make_inputs(batch=2, groups=2, per_group=per_group, state=state, length=length, bc=bc,
                         dtype=torch.float32, seed=length + state)
    if not softplus:
        inputs["delta"] = inputs["delta"].abs()
        inputs["delta_bias"] = inputs["delta_bias"].abs()
    y, last = _fused(inputs, softplus)
    y64, last64 = selective_scan_reference(**{k: v.double() for k, v in inputs.items()}, delta_softplus=softplus,
                                           return_last_state=True)
    assert y.dtype == torch.float32 and last.shape == last64.shape
    assert_close(y, y64, atol=2e-5, rtol=1e-5)
    assert_close(last, last64, atol=2e-5, rtol=1e-5)


@needs_fused
def test_fused_kernel_optional_inputs_and_extremes():
    """No D / z / bias; softplus inputs far past the threshold of 20 and far below zero; large gates."""
    inputs = make_inputs(batch=1, groups=1, per_group=10, state=1, length=300, dtype=torch.float32,
                         with_D=False, with_z=False, with_bias=False)
    inputs["delta"][0, :, ::3] = 60.0
    inputs["delta"][0, :, 1::3] = -90.0
    y, _ = _fused(inputs)
    y64 = selective_scan_reference(**{k: None if v is None else v.double() for k, v in inputs.items()},
                                   delta_softplus=True)
    assert torch.isfinite(y).all()
    assert_close(y, y64, atol=2e-5, rtol=1e-5)
    inputs = make_inputs(batch=1, groups=1, per_group=4, state=1, length=64, dtype=torch.float32)
    inputs["z"] = torch.linspace(-200, 200, 64).expand(1, 4, 64).contiguous()
    y, _ = _fused(inputs)
    y64 = selective_scan_reference(**{k: v.double() for k, v in inputs.items()}, delta_softplus=True)
    assert torch.isfinite(y).all()
    assert_close(y, y64, atol=1e-4, rtol=1e-5)


@needs_fused
def test_chunked_inference_uses_the_fused_kernel_for_state_size_one(monkeypatch):
    inputs = make_inputs(batch=2, groups=4, per_group=8, state=1, length=700, dtype=torch.float32)
    calls = []
    original = fused_scan.fused_scan_forward
    monkeypatch.setattr(fused_scan, "fused_scan_forward", lambda *a: calls.append(1) or original(*a))
    with torch.no_grad():
        y = selective_scan(**inputs, delta_softplus=True)
    assert calls, "float32 N=1 inference did not take the fused kernel"
    y_eager = selective_scan_chunked(**inputs, delta_softplus=True, chunk_size=16)  # an explicit plan: eager
    assert len(calls) == 1
    assert_close(y, y_eager, atol=2e-5, rtol=1e-5)
    leaves = {k: v.requires_grad_() for k, v in inputs.items()}
    selective_scan(**leaves, delta_softplus=True).sum().backward()  # training keeps the autograd path
    assert len(calls) == 1 and all(v.grad is not None for v in leaves.values())


@needs_fused
@pytest.mark.parametrize("batch, channels, height, width, rank", [(2, 5, 3, 7, 2), (1, 3, 1, 9, 1), (1, 2, 9, 1, 3),
                                                                   (1, 9, 32, 40, 6)])
def test_fused_cross_scan_equals_the_four_scans_merged(batch, channels, height, width, rank):
    """DASS's cross scan (rows, columns, both reversed) with N = 1, merged, against the float64 reference scan;
    32 x 40 crosses the 512-step tiles."""
    from tympan.models.dass import cross_merge, cross_scan

    g = torch.Generator().manual_seed(height * width)
    u = torch.randn(batch, channels, height, width, generator=g)
    x_proj = 0.3 * torch.randn(4, rank + 2, channels, generator=g)
    dt_weight = 0.5 * torch.randn(4, channels, rank, generator=g)
    A = -torch.rand(4, channels, generator=g) - 0.1
    D, bias = torch.randn(4, channels, generator=g), torch.randn(4, channels, generator=g) - 1
    length = height * width
    xs = cross_scan(u)
    dts, bs, cs = torch.matmul(x_proj, xs).split([rank, 1, 1], dim=2)
    ys = selective_scan_reference(xs.reshape(batch, -1, length).double(),
                                  torch.matmul(dt_weight, dts).reshape(batch, -1, length).double(),
                                  A.reshape(-1, 1).double(), bs.double(), cs.double(), D=D.reshape(-1).double(),
                                  delta_bias=bias.reshape(-1).double(), delta_softplus=True)
    expected = cross_merge(ys.reshape(batch, 4, channels, length), height, width)
    proj = torch.matmul(x_proj.reshape(-1, channels), u.flatten(2)).view(batch, 4, rank + 2, length)
    merged = fused_scan.cross_scan_merge(u, proj, dt_weight, A, D, bias)
    assert merged.shape == u.shape and merged.dtype == torch.float32
    assert_close(merged, expected, atol=2e-5, rtol=1e-5)
