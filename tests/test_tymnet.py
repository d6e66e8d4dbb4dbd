"""TymNet, the default model: its torch frontend equals YAMNet's numpy one, streaming equals whole-clip patches,
the protocol's shapes, and the shipped weights (offline, SHA-256 checked, sensible tags on real clips)."""

from __future__ import annotations

import copy
import hashlib
import json
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tympan import audio
from tympan.models import create_model
from tympan.models.protocol import AudioModel
from tympan.ops import small_gemm
from tympan.models.tymnet import (
    LABELS_CSV,
    SHIPPED_SHA256,
    WEIGHTS_FILE,
    ChecksumError,
    TymNet,
    YAMNetLogMel,
    load_shipped,
)
from tympan.teachers.yamnet import log_mel_patches, log_mel_spectrogram, pad_waveform

ASSETS = LABELS_CSV.parent
SHIPPED = ASSETS / "tymnet-s.json"


@pytest.fixture(scope="module")
def dog(data_dir) -> np.ndarray:
    return audio.load(data_dir / "esc10" / "audio" / "1-100032-A-0.flac")


@pytest.fixture(scope="module")
def small() -> TymNet:
    torch.manual_seed(0)
    return create_model("tymnet-s", channels=(8, 8, 16, 16, 16, 16, 16), strides=(2, 1, 2, 1, 2, 1), teacher_dim=32).eval()


@pytest.mark.parametrize("dft", ["fft", "matmul"])
def test_frontend_equals_yamnet_numpy(dog, dft):
    for waveform in (dog, dog[:9000], dog[:15601]):
        reference = log_mel_spectrogram(pad_waveform(waveform))
        ours = YAMNetLogMel(dft=dft)(torch.from_numpy(waveform)[None])[0].numpy()
        assert ours.shape == reference.shape
        np.testing.assert_allclose(ours, reference, atol=2e-4)
    patches = TymNet.patches(YAMNetLogMel()(torch.from_numpy(dog)[None]))[0].numpy()
    np.testing.assert_allclose(patches, log_mel_patches(dog)[:, 0], atol=2e-4)


def test_batched_frontend_equals_one_by_one(dog):
    frontend = YAMNetLogMel()
    batch = torch.from_numpy(np.stack([dog, dog[::-1].copy()]))
    together = frontend(batch)
    np.testing.assert_allclose(together[1].numpy(), frontend(batch[1:])[0].numpy(), atol=1e-5)


@torch.no_grad()
def test_streaming_equals_whole_clip_patches(small, dog):
    """Step k sees exactly patch k of the clip left-padded with 7,920 zeros (the initial state)."""
    x = torch.from_numpy(dog)
    chunks = len(dog) // small.chunk_samples
    state = small.init_state(1)
    assert isinstance(state, tuple) and state[0].shape == (1, 7920)
    streamed = []
    for k in range(chunks):
        logits, state = small.step(x[None, k * 7680 : (k + 1) * 7680], state)
        streamed.append(logits)
        assert state[0].shape == (1, 7920)  # bounded state
    padded = torch.cat([torch.zeros(7920), x[: chunks * 7680]])[None]
    whole = small.frame_logits(YAMNetLogMel(pad=False)(padded))[0]
    assert whole.shape[0] == chunks
    torch.testing.assert_close(torch.cat(streamed), whole, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="7680"):
        small.step(x[None, :100], state)
    # steps: the same patches as one batch, from any state, ending in the same state
    start = small.init_state(2)
    both = torch.stack([x, x.flip(0)])[:, : chunks * 7680]
    batched, after = small.steps(both, start)
    assert batched.shape == (2, chunks, small.num_classes)
    torch.testing.assert_close(batched[0], torch.cat(streamed), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(after[0][:1], state[0])
    split, mid = small.steps(both[:, : 3 * 7680], start)  # 3 steps, then the rest from the state in between
    rest, end = small.steps(both[:, 3 * 7680 :], mid)
    torch.testing.assert_close(torch.cat([split, rest], 1), batched, atol=1e-5, rtol=1e-5)
    assert torch.equal(end[0], after[0])
    with pytest.raises(ValueError, match="7680"):
        small.steps(both[:, :7000], start)


@torch.no_grad()
def test_streamer_tags_a_file_in_blocks_like_step_by_step(small, data_dir):
    """The Streamer runs a block's steps in one `steps` call, and a file's final partial step with the last block's:
    same chunks and probabilities as one step at a time and a separate flush, whatever the block size."""
    from tympan.inference.streaming import Streamer
    from tympan.models.protocol import AudioModel

    path = data_dir / "esc10" / "audio" / "1-100032-A-0.flac"
    stepwise = copy.deepcopy(small)
    stepwise.steps = AudioModel.steps.__get__(stepwise)  # the protocol's loop over `step`
    reference = Streamer(stepwise, 2.0).run(torch.from_numpy(audio.load(path)))  # push, then flush: step by step
    assert reference[-1].partial and len(reference) == 3
    for seconds in (0.3, 0.7, 60.0):
        results = list(Streamer(small, 2.0).run_file(path, block_seconds=seconds))
        assert [(r.start, r.end, r.partial) for r in results] == [(r.start, r.end, r.partial) for r in reference]
        for got, want in zip(results, reference):
            torch.testing.assert_close(got.output, want.output, atol=1e-5, rtol=1e-4)


@torch.no_grad()
def test_protocol_outputs(small, dog):
    assert isinstance(small, AudioModel) and small.streaming and small.chunk_samples <= 8000  # a frame every 0.48 s
    features = small.frontend(torch.from_numpy(np.stack([dog, dog])))
    logits = small(features)
    frames = small.frame_logits(features)
    assert logits.shape == (2, 521) and frames.shape == (2, 10, 521)
    torch.testing.assert_close(torch.sigmoid(logits), torch.sigmoid(frames).mean(1), atol=1e-5, rtol=1e-4)
    emb = small.embed(features, windows_per_batch=1)
    assert emb.scene.shape == (2, 32) and emb.frames.shape == (2, 10, 32)
    torch.testing.assert_close(emb.scene, emb.frames.mean(1))
    assert emb.timestamps()[:2].tolist() == pytest.approx([0.4875, 0.9675])
    short = small(small.frontend(torch.zeros(1, 100)))  # shorter than one patch: padded to one
    assert short.shape == (1, 521)
    assert small.labels is not None and small.labels.mids[0] == "/m/09x0r" and small.labels.names[69] == "Dog"


def test_registered_default_config_size():
    model = create_model("tymnet-s")
    backbone = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("projection"))
    assert backbone < 1_000_000  # the shipped model stays small (wheel size, CPU speed)
    assert model.describe()["streaming"] is True


# ------------------------------------------------------------------------------------------ folded inference
def _random_batchnorms(model: TymNet, seed: int = 1) -> TymNet:
    """Non-trivial BatchNorm affine parameters and running statistics (a fresh model's are 1/0)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for bn in (m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)):
            n = bn.num_features
            bn.weight.copy_(1 + 0.3 * torch.randn(n, generator=g))
            bn.bias.copy_(0.2 * torch.randn(n, generator=g))
            bn.running_mean.copy_(0.5 * torch.randn(n, generator=g))
            bn.running_var.copy_(0.5 + torch.rand(n, generator=g))
    return model


def _outputs(model: TymNet, features: torch.Tensor, fold: bool) -> list[torch.Tensor]:
    """Every eval entry point, folded or through the modules."""
    model.folded_inference = fold
    try:
        emb = model.embed(features, windows_per_batch=1)  # > 16 patches: several passes
        patches = TymNet.patches(features).reshape(-1, 96, 64)
        chunk = torch.linspace(-0.3, 0.3, 7680)[None].repeat(features.shape[0], 1)
        step, _ = model.step(chunk, model.init_state(features.shape[0]))
        logits, pooled, _ = model.patch_outputs(patches)
        return [model(features), model.frame_logits(features), emb.scene, emb.frames, logits, pooled, step]
    finally:
        del model.folded_inference


@pytest.fixture(scope="module")
def long_features(dog) -> torch.Tensor:
    clip = np.concatenate([dog, dog[::-1], dog])  # 15 s: 30 patches
    return YAMNetLogMel()(torch.from_numpy(np.stack([clip, clip[::-1].copy()])))


@pytest.mark.parametrize("stem_stride", [4, 2])
@pytest.mark.parametrize("native", [True, False])
@torch.no_grad()
def test_folded_eval_equals_the_modules(long_features, stem_stride, native, monkeypatch):
    """Eval mode folds each BatchNorm into its convolution (the stem's tiles and the pointwise convolutions as
    matmuls; the blocks in one C call, or op by op): every output equals the plain conv -> BN -> ReLU modules', and
    the state dict keeps its keys."""
    torch.manual_seed(0)
    model = _random_batchnorms(create_model("tymnet-s", stem_stride=stem_stride)).eval()
    model.native_blocks = native
    keys = list(model.state_dict())
    for folded, plain in zip(_outputs(model, long_features, True), _outputs(model, long_features, False)):
        torch.testing.assert_close(folded, plain, atol=1e-5, rtol=1e-5)
    assert list(model.state_dict()) == keys and not any("fold" in k for k in keys)
    stack = model._kernel_stack(model.folded_weights(), stem=stem_stride == 2)
    assert (stack is not None) == (native and small_gemm.available())
    monkeypatch.setattr(small_gemm, "ENABLED", False)  # the switch benchmarks use to count FLOPs: op by op, cache or not
    assert model._kernel_stack(model.folded_weights(), stem=stem_stride == 2) is None


@torch.no_grad()
def test_folded_weights_follow_every_change(long_features):
    """The cached folded weights are rebuilt whenever what they are computed from changes after a first eval call."""
    torch.manual_seed(0)
    model = _random_batchnorms(create_model("tymnet-s")).eval()
    features = long_features[:1, :400]

    def check() -> torch.Tensor:
        folded = _outputs(model, features, True)[0]
        torch.testing.assert_close(folded, _outputs(model, features, False)[0], atol=1e-5, rtol=1e-5)
        return folded

    before = check()
    model.blocks[2].bn1.running_var.mul_(3.0)  # in place (version counter)
    after = check()
    assert not torch.allclose(before, after)
    model.blocks[0].pw.weight = torch.nn.Parameter(model.blocks[0].pw.weight * 0.5)  # a new parameter
    check()
    model.stem_bn.bias.data = model.stem_bn.bias.data + 1.0  # new storage, same parameter
    check()
    model.blocks[4].bn2.eps = 0.5
    check()
    model.blocks[5] = _random_batchnorms(create_model("tymnet-s"), seed=2).blocks[5]  # a new module...
    check()  # ... in training mode: its BatchNorms use batch statistics, so nothing is folded
    model.blocks[5].eval()
    check()
    model.load_state_dict(_random_batchnorms(create_model("tymnet-s"), seed=3).state_dict())
    check()
    with torch.inference_mode():  # state loaded in place under inference mode: the version still moves
        model.load_state_dict(_random_batchnorms(create_model("tymnet-s"), seed=4).state_dict())
    check()
    model.double()
    folded = _outputs(model, features.double(), True)[0]
    assert folded.dtype == torch.float64
    torch.testing.assert_close(folded, _outputs(model, features.double(), False)[0])


needs_kernel = pytest.mark.skipif(not small_gemm.available(), reason="no C compiler or no AVX-512")


def _check_stack(stack: small_gemm.DSConvStack, x: torch.Tensor, expected: torch.Tensor, threads: int) -> None:
    """The kernel's output on `threads` threads equals `expected`; an image's output is the same bits alone."""
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        out = small_gemm.run_dsconv(stack, x)
    finally:
        torch.set_num_threads(before)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    if x.shape[0] > 1:
        assert torch.equal(small_gemm.run_dsconv(stack, x[1:2]), out[1:2])


@needs_kernel
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("images,h,w,strides", [(11, 24, 16, (2, 1, 2, 1, 2, 1)), (3, 7, 5, (1, 2, 3)),
                                                  (1, 1, 1, (2,)), (0, 24, 16, (2, 1))])  # fmt: skip
def test_dsconv_kernel_equals_torch_ops(threads, images, h, w, strides):
    """The one-call C blocks equal depthwise conv2d + ReLU, matmul + ReLU and the mean, for odd sizes (rows not in
    whole 6-row tiles, strides that leave a remainder, one pixel, no images); each image's result is the same
    bit for bit whatever the thread count and the images beside it."""
    g = torch.Generator().manual_seed(images + h)
    channels = [32, 64, 96, 128][: len(strides) + 1] if len(strides) < 4 else [32, 64, 128, 128, 256, 256, 512]
    layers = [(torch.randn(c, 1, 3, 3, generator=g) / 3, torch.randn(c, generator=g) / 10,
               torch.randn(d, c, generator=g) / c**0.5, torch.randn(d, generator=g) / 10, s)
              for c, d, s in zip(channels[:-1], channels[1:], strides)]  # fmt: skip
    x = torch.randn(images, h, w, channels[0], generator=g).relu_()
    expected = x
    for dw, dw_b, pw, pw_b, s in layers:
        y = F.conv2d(expected.permute(0, 3, 1, 2), dw, dw_b, s, 1, groups=dw.shape[0]).relu_()
        expected = F.linear(y.permute(0, 2, 3, 1), pw, pw_b).relu_()
    expected = expected.mean((1, 2))
    _check_stack(small_gemm.dsconv_stack(layers), x, expected, threads)
    odd = [(dw, b, pw[:40], pw_b[:40], s) for dw, b, pw, pw_b, s in layers[:1]]  # 40 outputs: not whole panels
    assert small_gemm.dsconv_stack(odd) is None and small_gemm.dsconv_stack([(*layers[0][:4], 0)]) is None


def _dyadic(g: torch.Generator, *shape: int, lo: int, hi: int, denominator: int = 8) -> torch.Tensor:
    """Small multiples of 1/8: sums of a few products are exact in float32 whatever their order."""
    return torch.randint(lo, hi + 1, shape, generator=g).float() / denominator


needs_int8 = pytest.mark.skipif(not small_gemm.int8_available(), reason="no AVX-512 VNNI kernel")


@needs_int8
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("stem", [False, True])
@pytest.mark.parametrize("images,h,w,stride,cin,cout", [(7, 24, 16, 2, 32, 64), (3, 7, 5, 1, 64, 96),
                                                         (1, 1, 1, 2, 32, 32), (2, 12, 8, 1, 256, 512)])  # fmt: skip
def test_int8_block_equals_its_arithmetic_in_pytorch(threads, stem, images, h, w, stride, cin, cout):
    """One int8 block in the kernel (after the one-channel 3x3 stem, or on NHWC input) equals
    ``small_gemm.pointwise_u8``: inputs, taps and biases are multiples of 1/8, so the stem and the depthwise sums are
    exact in any order, the per-position quantisation sees the same numbers and the integer products are exact; only
    the rescale's rounding (fused multiply-add) and the mean's order remain. Partial 6-row tiles, zero rows (a
    negative bias under the ReLU), odd sizes, one pixel; each image's result is the same whatever the thread count."""
    g = torch.Generator().manual_seed(images + h + cin)
    dw, dw_b = _dyadic(g, cin, 1, 3, 3, lo=-8, hi=8), _dyadic(g, cin, lo=-8, hi=4)
    pw, pw_b = torch.randn(cout, cin, generator=g) / cin**0.5, torch.randn(cout, generator=g) / 10
    if stem:
        stem_w, stem_b = _dyadic(g, cin, 1, 3, 3, lo=-8, hi=8), _dyadic(g, cin, lo=-4, hi=4)
        hop = max(1, h // 2)  # overlapping images cut from one spectrogram, as TymNet's patches (views, no copy)
        frames = _dyadic(g, (images - 1) * hop + h, w, lo=-16, hi=16)
        x = frames.unfold(0, h, hop).permute(0, 2, 1)
        first = F.conv2d(x[:, None].contiguous(), stem_w, stem_b, 2, 1).relu_().permute(0, 2, 3, 1)
        spec = (stem_w, stem_b, 2)
    else:
        x = first = _dyadic(g, images, h, w, cin, lo=0, hi=16)
        spec = None
    y = F.conv2d(first.permute(0, 3, 1, 2), dw, dw_b, stride, 1, groups=cin).relu_().permute(0, 2, 3, 1)
    q, scale = small_gemm.quantize_pointwise(pw)
    expected = small_gemm.pointwise_u8(y, q, scale, pw_b).mean((1, 2))
    stack = small_gemm.dsconv_stack([(dw, dw_b, pw, pw_b, stride)], stem=spec, int8=True)
    assert stack is not None and stack.int8
    _check_stack(stack, x, expected, threads)


def test_int8_refuses_pointwise_wider_than_512_inputs():
    model = create_model("tymnet-s", channels=(32, 64, 1024, 32), strides=(2, 2, 2), teacher_dim=16).eval()
    with pytest.raises(ValueError, match="at most 512 input channels, this model has 1024"):
        model.quantize_int8()
    assert not model.int8_pointwise


def test_u8_quantisation_round_trips():
    """Per-row unsigned 8-bit quantisation: integers 0..255, the row maximum maps to 255, a zero row to scale 0,
    and the error is at most half a step."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(50, 64, generator=g).relu_()
    x[3] = 0
    q, scale = small_gemm.quantize_u8_rows(x)
    assert torch.equal(q, q.round()) and q.min() >= 0 and q.max() <= 255
    assert scale[3].item() == 0 and q[3].abs().sum() == 0
    nonzero = scale[:, 0] > 0
    assert torch.equal(q[nonzero].amax(1), torch.full((int(nonzero.sum()),), 255.0))
    assert ((q * scale - x).abs() <= scale / 2 + 1e-7).all()


@needs_int8
@pytest.mark.parametrize("stem_stride", [4, 2])
@torch.no_grad()
def test_int8_precision_tags_like_fp32(long_features, stem_stride):
    """``with_precision(model, "int8")`` runs TymNet's pointwise convolutions in int8 (kernel and op by op agree up
    to a quantisation step), close to float32 on real audio; training mode and autograd stay float32."""
    from tympan.inference.precision import with_precision

    torch.manual_seed(0)
    reference = _random_batchnorms(create_model("tymnet-s", stem_stride=stem_stride)).eval()
    model = copy.deepcopy(reference)
    with_precision(model, "int8")
    assert model.int8_pointwise and model._kernel_stack(model.folded_weights(), stem=stem_stride == 2).int8
    fp32 = torch.sigmoid(reference.frame_logits(long_features))
    int8 = torch.sigmoid(model.frame_logits(long_features))
    model.native_blocks = False
    int8_torch = torch.sigmoid(model.frame_logits(long_features))
    assert 0 < (int8 - fp32).abs().max() < 0.02
    assert (int8_torch - int8).abs().max() < 2e-3
    top, top_ref = int8.topk(5, -1).indices.flatten(0, 1), fp32.topk(5, -1).indices.flatten(0, 1)
    agreement = sum(len(set(a.tolist()) & set(b.tolist())) for a, b in zip(top, top_ref)) / top.numel()
    assert agreement >= 0.9, agreement
    with torch.enable_grad():
        assert torch.equal(model.train()(long_features), reference.train()(long_features))


def test_model_after_native_inference_copies_and_pickles(dog):
    """The C kernel's cached view (pointers) never travels with a copy: deepcopy and pickling work after inference
    and the copy computes the same."""
    import pickle

    model = create_model("tymnet-s").eval()
    features = YAMNetLogMel()(torch.from_numpy(dog)[None])
    with torch.inference_mode():
        expected = model(features)
        for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
            torch.testing.assert_close(clone(features), expected, atol=0, rtol=0)


def test_folded_eval_keeps_gradients(long_features):
    """Under autograd the folded weights are computed afresh: parameter gradients equal the modules'; with frozen
    weights (saliency), the cached weights (built under inference mode) take an input gradient."""
    torch.manual_seed(0)
    model = _random_batchnorms(create_model("tymnet-s")).eval()
    features = long_features[:1, :200]
    grads = []
    for fold in (True, False):
        model.zero_grad()
        model.folded_inference = fold
        model(features).sum().backward()
        grads.append([model.stem.weight.grad.clone(), model.blocks[3].bn2.weight.grad.clone()])
    del model.folded_inference
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    model.requires_grad_(False)
    with torch.inference_mode():
        model(features)  # caches the folded weights
    x = features.clone().requires_grad_()
    model(x).sum().backward()
    assert x.grad is not None and bool(torch.isfinite(x.grad).all())


def test_model_built_under_inference_mode(long_features):
    """Parameters made under inference mode keep no version counter: nothing is cached, outputs stay exact."""
    with torch.inference_mode():
        torch.manual_seed(0)
        model = _random_batchnorms(create_model("tymnet-s")).eval()
        features = long_features[:1, :300]
        first = _outputs(model, features, True)[0]
        model.stem_bn.running_mean.add_(1.0)
        torch.testing.assert_close(_outputs(model, features, True)[0], _outputs(model, features, False)[0])
        assert not torch.allclose(first, _outputs(model, features, True)[0])


def test_train_mode_runs_the_modules(long_features):
    """model.train() is untouched: BatchNorm uses the batch's statistics and updates its running ones."""
    torch.manual_seed(0)
    model = create_model("tymnet-s").train()
    before = model.stem_bn.running_mean.clone()
    model(long_features[:, :300]).sum().backward()
    assert not torch.equal(before, model.stem_bn.running_mean) and model.stem_bn.weight.grad is not None


@torch.no_grad()
def test_feature_map_pools_to_the_backbone(long_features):
    """``feature_map`` is the last block's map before pooling (what per-position distillation reads): its mean is
    the training path's pooled features exactly and the folded eval path's closely; ``[P, 512, 3, 2]`` per patch."""
    torch.manual_seed(0)
    model = _random_batchnorms(create_model("tymnet-s")).eval()
    patches = model.patches(long_features[:1, :300])[0]
    maps = model.feature_map(patches)
    assert maps.shape == (len(patches), 512, 3, 2)
    torch.testing.assert_close(maps.mean((-2, -1)), model.backbone(patches), atol=1e-4, rtol=1e-4)  # folded
    model.train()
    torch.testing.assert_close(model.feature_map(patches).mean((-2, -1)), model.backbone(patches), atol=0, rtol=0)


def test_frontend_magnitude_under_autograd(dog):
    """With a waveform that requires grad the frontend keeps complex abs (finite gradients through silence)."""
    x = torch.from_numpy(dog[:9000].copy())[None].requires_grad_()
    features = YAMNetLogMel()(x)
    with torch.no_grad():
        torch.testing.assert_close(features, YAMNetLogMel()(x.detach()), atol=1e-5, rtol=1e-5)
    features.sum().backward()
    assert bool(torch.isfinite(x.grad).all())


# ------------------------------------------------------------------------------------------ shipped weights
shipped = pytest.mark.skipif(SHIPPED_SHA256 is None, reason="tymnet-s weights not shipped in tympan/assets")


@shipped
def test_shipped_weights_load_offline_and_checksum(tmp_path, monkeypatch):
    """The registered package weights load with no network (sockets refused), their SHA-256 checked; a copy with
    one flipped bit is refused."""
    import socket

    def refuse(*args, **kwargs):
        raise AssertionError("the default model must never touch the network")

    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    assert WEIGHTS_FILE.stat().st_size < 20e6
    model = load_shipped()
    assert isinstance(model, TymNet) and not model.training
    copy = tmp_path / WEIGHTS_FILE.name
    shutil.copy(WEIGHTS_FILE, copy)
    shutil.copy(SHIPPED, copy.with_suffix(".json"))
    load_shipped(copy)  # an intact copy loads
    data = bytearray(copy.read_bytes())
    data[-5] ^= 0x01
    copy.write_bytes(bytes(data))
    with pytest.raises(ChecksumError):
        load_shipped(copy)


def _top_group(model: TymNet, probs: torch.Tensor) -> str:
    """AudioSet group of the best specific class (the generic 'other' group, e.g. Silence, Sound effect, left out)."""
    from tympan.data.corpus import GROUPS, class_groups

    groups = class_groups()
    probs = probs.clone()
    probs[..., torch.from_numpy(groups == GROUPS.index("other"))] = 0
    return GROUPS[groups[int(probs.argmax())]]


@shipped
@torch.no_grad()
def test_shipped_model_tags_make_sense(data_dir):
    """Clips never trained on: for six ESC-10 classes most clips' best specific tag lies in the class's AudioSet
    group (whole classes, not single clips: one clip may go either way), and a spoken digit is speech."""
    import csv

    model = load_shipped()
    expected = {"dog": "animal", "rooster": "animal", "rain": "nature", "sea_waves": "nature",
                "crying_baby": "human", "helicopter": "vehicle"}  # fmt: skip
    with open(data_dir / "esc10" / "esc10.csv") as f:
        rows = [r for r in csv.DictReader(f) if r["category"] in expected]
    hits = {category: [] for category in expected}
    for row in rows:
        waveform = torch.from_numpy(audio.load(data_dir / "esc10" / "audio" / row["filename"]))[None]
        probs = torch.sigmoid(model.frame_logits(model.frontend(waveform)))[0].max(0).values
        hits[row["category"]].append(_top_group(model, probs) == expected[row["category"]])
    shares = {category: sum(h) / len(h) for category, h in hits.items()}
    assert all(len(h) >= 20 for h in hits.values()) and min(shares.values()) >= 0.6, shares
    digit = torch.from_numpy(audio.load(data_dir / "fsdd" / "recordings" / "0_george_5.wav"))[None]
    assert _top_group(model, torch.sigmoid(model.frame_logits(model.frontend(digit)))[0].max(0).values) == "speech"


@shipped
@torch.no_grad()
def test_shipped_model_follows_the_demo_scene():
    """Over the demo scene (DEMO_SCENE.md timeline) the patches of each piece mostly fall in its group."""
    model = load_shipped()
    waveform = torch.from_numpy(audio.load(ASSETS / "demo_scene_16k.flac"))[None]
    probs = torch.sigmoid(model.frame_logits(model.frontend(waveform)))[0]
    centres = model.embed(model.frontend(waveform)).timestamps()
    pieces = {(0.0, 1.76): "speech", (2.06, 4.78): "animal", (5.08, 8.08): "nature", (11.52, 13.64): "animal",
              (13.94, 16.94): "music"}  # fmt: skip
    for (start, end), expected in pieces.items():
        inside = [i for i, c in enumerate(centres.tolist()) if start + 0.3 <= c <= end - 0.3]
        votes = [_top_group(model, probs[i]) for i in inside]
        assert votes.count(expected) > len(votes) / 2, (start, votes)


# ------------------------------------------------------------------------------------------ training recipe
def _recipe_script(name: str = "train"):
    import importlib.util

    path = LABELS_CSV.parents[2] / "recipes" / "default_model" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"default_model_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _train_script():
    return _recipe_script("train")


@torch.no_grad()
def test_widened_student_computes_what_it_was_widened_from(long_features):
    """recipes/default_model/widen.py (v6's warm start): the last block widened by copies of its channels, the head
    and projection split over them, gives the same outputs (exactly so without noise, closely with it)."""
    widen = _recipe_script("widen").widen
    torch.manual_seed(0)
    small = _random_batchnorms(create_model("tymnet-s")).eval()
    features = long_features[:1, :400]
    wide_config = (32, 64, 128, 128, 256, 256, 700)
    for noise, tol in ((0.0, 2e-5), (0.01, 0.05)):
        wide = create_model("tymnet-s", channels=wide_config).eval()
        wide.load_state_dict(widen(small.state_dict(), 700, noise=noise))
        torch.testing.assert_close(wide(features), small(features), atol=tol, rtol=0)
        torch.testing.assert_close(wide.embed(features).scene, small.embed(features).scene, atol=tol * 10, rtol=1e-3)
    with pytest.raises(ValueError, match="narrower"):
        widen(small.state_dict(), 256)


@pytest.mark.parametrize("online", [False, True, "maps"], ids=["stored-labels", "online-teacher", "teacher-maps"])
def test_training_resumes_bit_exactly(tmp_path, dog, yamnet_teacher, shared_dir, online):
    """The recipe's trainer on real teacher targets (a dog clip and its reversed copy): 8 steps in one go equal
    4 steps, a stop, and a resume; the exported weights load through the SHA-256-checked loader. With the online
    teacher (function matching) the batches are mixed patches that the teacher labels as the student sees them;
    with ``train.map_weight`` also its last map per patch (the embedding target is then that map's mean)."""
    from tympan.data import corpus as C

    parts = [C.label_waveform(w, yamnet_teacher, 10) for w in (dog, dog[::-1].copy())]
    for split in ("train", "heldout"):
        arrays = {k: np.concatenate([p[k] for p in parts]) for k in ("patches", "scores", "embeddings")}
        arrays["file_id"] = np.repeat(np.arange(2, dtype=np.int32), 10)
        arrays["group"] = C.patch_groups(arrays["scores"].astype(np.float32)).astype(np.int8)
        C.write_shards(tmp_path / "shards", arrays, split)
    recipe = LABELS_CSV.parents[2] / "recipes" / "default_model.yaml"
    common = [str(recipe), "--set", f"corpus.shards={tmp_path / 'shards'}", "--set", "train.steps=8", "--set",
              "train.batch_size=4", "--set", "train.warmup_steps=2", "--set", "train.eval_every=4", "--set",
              "model.overrides={channels: [8, 8, 16, 16, 16, 16, 16], strides: [2, 1, 2, 1, 2, 1]}"]  # fmt: skip
    teacher = shared_dir / "teachers" / "yamnet" / "YamNet_w8a8.onnx.zip"
    train = _train_script()
    if not online:
        with pytest.raises(SystemExit, match="online_teacher"):  # the stored shards hold no maps
            train.main([*common, "--set", f"train.out={tmp_path / 'x'}", "--set", "train.map_weight=1.0"])
    if online:
        common += ["--set", f"corpus.teacher={teacher}", "--set", "train.online_teacher={mix_prob: 1.0}"]
        if online == "maps":
            common += ["--set", "train.map_weight=1.0"]
        data = C.load_shards(tmp_path / "shards", "train")
        batches = train.Batches(data, torch.ones(20, dtype=torch.float64), 0, 6, {"mix_prob": 1.0}, str(teacher),
                                maps=online == "maps")  # fmt: skip
        x, scores, embeddings, maps = batches.get(3)
        assert torch.equal(batches.get(4)[0], batches(4)[0])  # the prefetched batch is the batch of that step
        stored = torch.from_numpy(data["patches"]).float()
        changed = [bool((stored - row).abs().amax((1, 2)).min() > 0.1) for row in x]
        assert sum(changed) >= len(x) // 2, changed  # mixed, scaled, tilted (a silent pair stays silent)
        expected_scores, expected_embeddings = yamnet_teacher.run(x[:, None].numpy())
        np.testing.assert_allclose(scores.numpy(), expected_scores, atol=1e-6)
        if online == "maps":
            assert maps.shape == (6, 1024, 3, 2)
            torch.testing.assert_close(embeddings, maps.mean((-2, -1)))
            cosine = torch.nn.functional.cosine_similarity(embeddings, torch.from_numpy(expected_embeddings))
            assert cosine.min() > 0.999  # the graph's pooled vector, before its re-quantisation
        else:
            assert maps is None
            np.testing.assert_allclose(embeddings.numpy(), expected_embeddings, atol=1e-5)
    assert train.main([*common, "--set", f"train.out={tmp_path / 'a'}"]) == 0
    assert train.main([*common, "--set", f"train.out={tmp_path / 'b'}", "--stop-at", "4"]) == 0
    assert torch.load(tmp_path / "b" / "last.pt", weights_only=True)["step"] == 4
    assert train.main([*common, "--set", f"train.out={tmp_path / 'b'}"]) == 0
    a = torch.load(tmp_path / "a" / "last.pt", weights_only=True)
    b = torch.load(tmp_path / "b" / "last.pt", weights_only=True)
    assert a["step"] == b["step"] == 8
    for key in ("model", "ema"):
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key])
    figures = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert [f["step"] for f in figures] == [4, 8] and 0 <= figures[-1]["clip_mAP_top3"] <= 1
    exported = tmp_path / "a" / "tymnet-s.safetensors"
    assert train.main([*common, "--set", f"train.out={tmp_path / 'a'}", "--export", str(exported)]) == 0
    sidecar = json.loads(exported.with_suffix(".json").read_text())
    assert sidecar["model_id"] == "tymnet-s" and len(sidecar["labels"]["mids"]) == 521
    model = load_shipped(exported, sha256=sidecar["extra"]["sha256"])
    torch.testing.assert_close(model.head.weight, a["ema"]["head.weight"])
    # the resumed run exports the same bytes: one SHA-256 for one set of weights
    resumed = tmp_path / "b" / "tymnet-s.safetensors"
    assert train.main([*common, "--set", f"train.out={tmp_path / 'b'}", "--export", str(resumed)]) == 0
    assert resumed.read_bytes() == exported.read_bytes()
    # train.init warm-starts a new run (model and EMA) from an export: exported before any step, it is that export
    from safetensors.torch import load_file

    again = tmp_path / "c" / "again.safetensors"
    assert train.main([*common, "--set", f"train.out={tmp_path / 'c'}", "--set", f"train.init={exported}",
                       "--export", str(again)]) == 0  # fmt: skip
    first, second = load_file(str(exported)), load_file(str(again))
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


def test_ship_writes_the_checked_weights_the_notice_and_the_file_list(tmp_path, yamnet_teacher, data_dir):
    """recipes/default_model/ship.py on a real (tiny) build and run: the weights it writes load through the
    SHA-256-checked loader with the digest it records in the code; the sidecar names the recipe with its overrides;
    the file list is the shards' manifest and the NOTICE holds the corpus table and every licence."""
    import csv
    import gzip

    from tympan.data import corpus as C

    build, ship = _recipe_script("build_corpus"), _recipe_script("ship")
    clips = {"dog": "1-100032-A-0.flac", "rain": "1-17367-A-10.flac", "waves": "1-39901-A-11.flac"}
    items = [(C.AudioItem(f"esc:{name}", "esc10", "-", "CC-BY-3.0", str(data_dir / "esc10" / "audio" / f)), 4)
             for name, f in clips.items()]  # fmt: skip
    items[-1] = (C.AudioItem(items[-1][0].key, "other", "2", "CC0", items[-1][0].path), 4)
    cache = C.LabelCache(tmp_path / "cache")
    build.label_all(items[:2], cache, yamnet_teacher, heldout=0.0, seed=0)
    build.label_all(items[2:], cache, yamnet_teacher, heldout=1.0, seed=0)  # the held-out file
    build.write_all(items, cache, {"shards": str(tmp_path / "shards")}, [])
    recipe = LABELS_CSV.parents[2] / "recipes" / "default_model.yaml"
    overrides = [f"corpus.shards={tmp_path / 'shards'}", f"train.out={tmp_path / 'run'}", "train.steps=2",
                 "train.batch_size=4", "train.warmup_steps=1", "train.eval_every=2",
                 "model.overrides={channels: [8, 8, 16, 16, 16, 16, 16], strides: [2, 1, 2, 1, 2, 1]}"]  # fmt: skip
    sets = [arg for item in overrides for arg in ("--set", item)]
    assert _train_script().main([str(recipe), *sets]) == 0
    code = tmp_path / "tymnet.py"
    shutil.copy(LABELS_CSV.parents[1] / "models" / "tymnet.py", code)
    assets = tmp_path / "assets"
    assert ship.main([str(recipe), *sets, "--assets", str(assets), "--code", str(code)]) == 0

    weights = assets / "tymnet-s.safetensors"
    digest = hashlib.sha256(weights.read_bytes()).hexdigest()
    assert f'SHIPPED_SHA256: str | None = "{digest}"' in code.read_text()
    sidecar = json.loads((assets / "tymnet-s.json").read_text())
    assert sidecar["extra"]["sha256"] == digest and sidecar["extra"]["training"]["steps"] == 2
    assert sidecar["extra"]["training"]["recipe"].count("--set") == len(overrides)
    model = load_shipped(weights, sha256=digest)
    ema = torch.load(tmp_path / "run" / "last.pt", weights_only=True)["ema"]
    torch.testing.assert_close(model.head.weight, ema["head.weight"])
    with pytest.raises(ChecksumError):
        load_shipped(weights, sha256="0" * 64)
    manifest = json.loads((tmp_path / "shards" / "manifest.json").read_text())
    with gzip.open(assets / "tymnet-s.corpus.csv.gz", "rt") as f:
        listed = list(csv.DictReader(f))
    assert [(r["key"], r["license"], r["split"]) for r in listed] == [(m["key"], m["license"], m["split"])
                                                                     for m in manifest]  # fmt: skip
    assert [r["split"] for r in listed] == ["train", "train", "heldout"]
    notice = (assets / "NOTICE.tymnet-s.md").read_text()
    assert digest in notice and (tmp_path / "shards" / "corpus_table.md").read_text() in notice
    assert "* CC-BY-3.0: 2" in notice and "* CC0: 1" in notice


@pytest.fixture(scope="module")
def yamnet_teacher(shared_dir, tmp_path_factory):
    pytest.importorskip("onnxruntime")
    from tympan.teachers.yamnet import YAMNet

    return YAMNet(shared_dir / "teachers" / "yamnet" / "YamNet_w8a8.onnx.zip", num_threads=1,
                  cache=tmp_path_factory.mktemp("onnx"))  # fmt: skip
