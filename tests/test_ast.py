"""AST / SSAST models: registry ids, shapes, gradients, checkpoint adaptation, errors, masking."""

from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import tympan
from tests.parity import fixtures_root
from tympan.checkpoints import CheckpointError, read_checkpoint
from tympan.models.ast import ASTModel, convert_checkpoint
from tympan.models.patching import adapt_grid, join_pos_embed, patch_grid, split_pos_embed
from tympan.models.ssast import SSASTPretrainModel, audio_first_mask, cluster_mask, frame_mask

AST_FIXTURE = fixtures_root() / "ast-base384-f10t10" / "checkpoint.pt"
SSAST_PATCH = fixtures_root() / "ssast-tiny-patch" / "checkpoint.pt"
SSAST_FRAME = fixtures_root() / "ssast-tiny-frame" / "checkpoint.pt"
TINY = dict(embed_dim=32, depth=1, num_heads=2)


def _depth(path) -> int:
    state, _ = read_checkpoint(path)
    return len({k.split(".")[2] for k in state if k.startswith("v.blocks.")})


@pytest.mark.parametrize("name", tympan.list_models("ast-*") + tympan.list_models("ssast-*"))
def test_every_registered_id_builds_and_runs(name):
    entry = tympan.get_model_entry(name)
    assert entry.input_kind == "ast-fbank" and entry.description
    extra = {"mask_patch": 10} if name.endswith("-pretrain") else {}
    model = tympan.create_model(name, **TINY, input_tdim=64, **extra).eval()
    x = torch.randn(2, 64, 128)
    with torch.no_grad():
        out = model(x)
    if isinstance(model, SSASTPretrainModel):
        assert out.loss.ndim == 0 and torch.isfinite(out.loss) and 0 <= float(out.acc) <= 1
    else:
        assert out.shape == (2, 527)


@pytest.mark.parametrize(
    "fshape,tshape,fstride,tstride,tdim",
    [(16, 16, 10, 10, 100), (16, 16, 16, 16, 128), (16, 16, 12, 14, 203), (128, 2, 128, 1, 50), (128, 2, 128, 2, 64)],
)
@pytest.mark.parametrize("pooling", ["cls", "avgtok"])
def test_forward_shapes(fshape, tshape, fstride, tstride, tdim, pooling):
    model = ASTModel(**TINY, fshape=fshape, tshape=tshape, fstride=fstride, tstride=tstride, input_tdim=tdim,
                     num_classes=7, pooling=pooling).eval()
    f_dim, t_dim = patch_grid(128, tdim, (fshape, tshape), (fstride, tstride))
    x = torch.randn(3, tdim, 128)
    with torch.no_grad():
        tokens = model.forward_features(x)
        assert tokens.shape == (3, 2 + f_dim * t_dim, 32)
        assert model.pooled(x).shape == (3, 32)
        assert model(x).shape == (3, 7)
        expected = tokens[:, 2:].mean(1) if pooling == "avgtok" else (tokens[:, 0] + tokens[:, 1]) / 2
        torch.testing.assert_close(model.pooled(x), expected)


def test_batch_items_are_independent():
    model = ASTModel(**TINY, input_tdim=64, num_classes=5).eval()
    x = torch.randn(3, 64, 128)
    with torch.no_grad():
        torch.testing.assert_close(model(x)[1:2], model(x[1:2]), atol=1e-5, rtol=1e-5)


def test_bad_input_is_one_clear_error():
    model = ASTModel(**TINY, input_tdim=64)
    with pytest.raises(ValueError, match=r"\[B, T, 128\]"):
        model(torch.randn(2, 64, 64))
    with pytest.raises(ValueError, match="input_tdim=100"):
        model(torch.randn(2, 100, 128))
    with pytest.raises(ValueError, match="pooling"):
        ASTModel(**TINY, pooling="max")


@pytest.mark.parametrize("drop_path_rate", [0.0, 0.1])
def test_backward_reaches_every_parameter(drop_path_rate):
    model = ASTModel(**{**TINY, "depth": 2}, input_tdim=48, num_classes=4, drop_path_rate=drop_path_rate).train()
    torch.manual_seed(0)
    model(torch.randn(4, 48, 128)).sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_pretraining_backward_reaches_every_parameter():
    model = SSASTPretrainModel(**TINY, input_tdim=256, mask_patch=20).train()
    out = model(torch.randn(2, 256, 128), generator=torch.Generator().manual_seed(0))
    out.loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


def test_ast_checkpoint_adapts_to_other_lengths():
    """AudioSet checkpoint (grid 12 x 101) into 200 frames (cut) and 1200 (bilinear), as audioset_pretrain=True."""
    state, _ = read_checkpoint(AST_FIXTURE)
    grid = state["v.pos_embed"][:, 2:].transpose(1, 2).reshape(1, 768, 12, 101)
    short = tympan.load("ast-base384", checkpoint=AST_FIXTURE, depth=_depth(AST_FIXTURE), input_tdim=200)
    assert short.grid == (12, 19)
    torch.testing.assert_close(short.pos_embed[:, 2:], grid[..., 41:60].flatten(2).transpose(1, 2), rtol=0, atol=0)
    torch.testing.assert_close(short.pos_embed[:, :2], state["v.pos_embed"][:, :2], rtol=0, atol=0)
    long = tympan.load("ast-base384", checkpoint=AST_FIXTURE, depth=_depth(AST_FIXTURE), input_tdim=1200)
    expected = F.interpolate(grid, size=(12, 119), mode="bilinear", align_corners=False)
    torch.testing.assert_close(long.pos_embed[:, 2:], expected.flatten(2).transpose(1, 2), rtol=0, atol=0)
    assert torch.equal(long.head.fc.weight, state["mlp_head.1.weight"])


def test_new_head_when_the_class_count_differs():
    with pytest.warns(UserWarning, match="527 classes"):
        model = tympan.load("ast-base384", checkpoint=AST_FIXTURE, depth=_depth(AST_FIXTURE), input_tdim=128,
                            num_classes=10)
    assert model.head.fc.weight.shape == (10, 768)
    with torch.no_grad():
        assert model(torch.randn(1, 128, 128)).shape == (1, 10)


@pytest.mark.parametrize("path,kind,strides,tdim,grid", [
    (SSAST_PATCH, "patch", (10, 10), 100, (12, 9)),
    (SSAST_PATCH, "patch", (16, 16), 1024, (8, 64)),
    (SSAST_FRAME, "frame", (128, 1), 600, (1, 599)),
])
def test_ssast_pretrained_into_finetuning_model(path, kind, strides, tdim, grid):
    model = tympan.load(f"ssast-tiny-{kind}", checkpoint=path, depth=_depth(path), fstride=strides[0],
                        tstride=strides[1], input_tdim=tdim, num_classes=3)
    assert model.grid == grid and model.pos_embed.shape == (1, 2 + grid[0] * grid[1], 192)
    state, _ = read_checkpoint(path)
    assert torch.equal(model.patch_embed.proj.weight, state["v.patch_embed.proj.weight"])
    if strides == (16, 16):  # same grid and patch rows: the reference's adaptation is an identity
        torch.testing.assert_close(model.pos_embed, state["v.pos_embed"], rtol=0, atol=1e-7)
    with torch.no_grad():
        assert model(torch.randn(1, tdim, 128)).shape == (1, 3)


def test_wrong_checkpoints_give_clear_errors():
    with pytest.raises(CheckpointError, match=r"mis-shaped keys: blocks.0.*checkpoint \(192,\) vs model \(768,\)"):
        tympan.load("ast-base384", checkpoint=SSAST_PATCH, depth=4, fstride=16, tstride=16, input_tdim=1024)
    with pytest.raises(CheckpointError, match="missing keys: blocks.4"):
        tympan.load("ssast-tiny-patch", checkpoint=SSAST_PATCH, depth=6)
    with pytest.raises(CheckpointError, match="128 x 2 patches.*fshape/tshape"):
        tympan.load("ssast-tiny-patch", checkpoint=SSAST_FRAME, depth=4)
    with pytest.raises(CheckpointError, match="missing keys: mask_embed, mpc_head"):
        tympan.load("ssast-base-patch-pretrain", checkpoint=AST_FIXTURE, depth=2, input_tdim=1024)


def test_pretraining_checkpoint_round_trip(tmp_path):
    model = tympan.load("ssast-tiny-frame-pretrain", checkpoint=SSAST_FRAME, depth=_depth(SSAST_FRAME))
    assert model.cluster is False  # frame models mask uniformly
    with pytest.raises(CheckpointError, match=r"pos_embed: checkpoint \(1, 514, 192\) vs model \(1, 130, 192\)"):
        tympan.load("ssast-tiny-frame-pretrain", checkpoint=SSAST_FRAME, depth=4, input_tdim=256, mask_patch=50)
    path = tympan.save(model, tmp_path / "pretrain")
    again = tympan.load(path)
    x = torch.randn(1, 1024, 128)
    mask = frame_mask(512, 50, torch.Generator().manual_seed(0))[None]
    with torch.no_grad():
        assert torch.equal(model.mpc(x, mask).nce, again.mpc(x, mask).nce)
        assert torch.equal(model.mpg(x, mask).mse, again.mpg(x, mask).mse)


def test_save_load_round_trip_of_an_adapted_model(tmp_path):
    model = tympan.load("ssast-tiny-patch", checkpoint=SSAST_PATCH, depth=_depth(SSAST_PATCH), input_tdim=100,
                        num_classes=3)
    path = tympan.save(model, tmp_path / "ft")
    again = tympan.load(path)
    x = torch.randn(2, 100, 128)
    with torch.no_grad():
        assert torch.equal(model(x), again(x))
    # our own layout passes the converter unchanged
    assert convert_checkpoint(model.state_dict(), again) is not None
    assert set(convert_checkpoint(model.state_dict(), again)) == set(model.state_dict())


def test_deit_imagenet_initialisation():
    """A timm DeiT state dict (3-channel kernel, 14 x 14 grid, ImageNet heads) loads like imagenet_pretrain=True."""
    source = ASTModel(**TINY, fstride=16, tstride=16, input_fdim=224, input_tdim=224, num_classes=0)
    deit = {k: v for k, v in source.state_dict().items()}
    deit["patch_embed.proj.weight"] = torch.randn(32, 3, 16, 16)
    deit |= {"head.weight": torch.randn(1000, 32), "head.bias": torch.randn(1000),
             "head_dist.weight": torch.randn(1000, 32), "head_dist.bias": torch.randn(1000)}
    model = ASTModel(**TINY, input_tdim=100, num_classes=5)  # grid 12 x 9: centre cut of both axes
    state = convert_checkpoint(deit, model)
    model.load_state_dict(state)
    assert torch.equal(model.patch_embed.proj.weight, deit["patch_embed.proj.weight"].sum(1, keepdim=True))
    grid = deit["pos_embed"][:, 2:].transpose(1, 2).reshape(1, 32, 14, 14)
    assert torch.equal(model.pos_embed[:, 2:], grid[:, :, 1:13, 3:12].flatten(2).transpose(1, 2))


def test_grid_helpers_round_trip_and_frame_interpolation():
    pos = torch.randn(1, 2 + 8 * 64, 16)
    prefix, grid = split_pos_embed(pos, 2, (8, 64))
    assert torch.equal(join_pos_embed(prefix, grid), pos)
    # a 1-row grid resized through SSAST's 8 rows is a 1-D linear interpolation along time
    row = torch.randn(1, 16, 1, 512)
    adapted = adapt_grid(row, (1, 600), time_resize_rows=8)
    expected = F.interpolate(row[:, :, 0], size=600, mode="linear", align_corners=False)[:, :, None]
    torch.testing.assert_close(adapted, expected, atol=1e-6, rtol=0)


def test_cluster_masking_is_reproducible_and_unique():
    a = cluster_mask(512, 64, 400, torch.Generator().manual_seed(3))
    b = cluster_mask(512, 64, 400, torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    assert a.numel() == 400 and a.unique().numel() == 400 and int(a.min()) > 0 and int(a.max()) < 512
    model = SSASTPretrainModel(**TINY, input_tdim=1024, mask_patch=400)
    assert model.cluster  # 16 x 16 patches on 128 bins
    masks = model.random_mask(3, torch.Generator().manual_seed(1))
    assert masks.shape == (3, 400) and all(m.unique().numel() == 400 for m in masks)
    assert not torch.equal(masks[0], masks[1])


@settings(max_examples=30, deadline=None)
@given(f_dim=st.integers(1, 12), t_dim=st.integers(3, 80), fraction=st.floats(0.01, 1.0), seed=st.integers(0, 2**31))
def test_masks_have_the_requested_number_of_unique_indices(f_dim, t_dim, fraction, seed):
    patches = f_dim * t_dim
    size = max(1, int(fraction * (patches - 2)))
    generator = torch.Generator().manual_seed(seed)
    mask = cluster_mask(patches, t_dim, size, generator)
    assert mask.numel() == size == mask.unique().numel() and 0 < int(mask.min()) and int(mask.max()) < patches
    mask = frame_mask(patches, size, generator)
    assert mask.numel() == size == mask.unique().numel()
    with pytest.raises(ValueError, match="mask_size"):
        cluster_mask(patches, t_dim, patches - 1)


@settings(max_examples=40, deadline=None)
@given(lengths=st.lists(st.integers(0, 200), min_size=1, max_size=5), tstride=st.sampled_from([2, 4, 16]),
       size=st.integers(1, 12), seed=st.integers(0, 2**31))  # fmt: skip
def test_length_aware_masks_take_audio_patches_first(lengths, tstride, size, seed):
    """Frame masking by input length: distinct patches, every one holding audio while the clip has enough, and
    all of a clip's audio patches (then padding) when it has fewer than the mask size."""
    model = SSASTPretrainModel(embed_dim=16, depth=1, num_heads=1, fshape=64, tshape=tstride, input_fdim=64,
                               input_tdim=128, mask_patch=min(size, 128 // tstride), cluster=False)  # fmt: skip
    lengths_t = torch.tensor(lengths)
    has_audio = model.audio_patches(lengths_t)
    expected = (torch.arange(model.num_patches) * tstride)[None] < lengths_t[:, None]  # one patch per time step
    assert torch.equal(has_audio, expected)
    masks = model.random_mask(len(lengths), torch.Generator().manual_seed(seed), lengths_t)
    assert masks.shape == (len(lengths), model.mask_patch)
    for mask, audio in zip(masks, has_audio):
        assert mask.unique().numel() == model.mask_patch
        picked = audio[mask]
        assert bool(picked.all()) if int(audio.sum()) >= model.mask_patch else int(picked.sum()) == int(audio.sum())
    with pytest.raises(ValueError, match="mask_size"):
        audio_first_mask(has_audio, model.num_patches + 1)


def test_length_aware_masks_need_frame_masking():
    model = SSASTPretrainModel(**TINY, input_tdim=128, mask_patch=10)
    assert model.cluster
    with pytest.raises(ValueError, match="frame masking"):
        model.random_mask(2, lengths=torch.tensor([50, 128]))


def test_real_clip_through_the_ssast_fixture(data_dir):
    """An ESC-10 clip as AST log-mel (Kaldi fbank, AudioSet normalisation) through fine-tuning and pretraining."""
    from tympan.features.kaldi import kaldi_fbank

    wave, sr = sf.read(data_dir / "esc10" / "audio" / "1-100032-A-0.flac", dtype="float32")
    wave = torch.from_numpy(np.asarray(wave))
    fbank = kaldi_fbank(wave - wave.mean(), sample_rate=sr, num_mel_bins=128, window_type="hanning",
                        htk_compat=True, use_energy=False, dither=0.0, frame_shift=10)
    fbank = F.pad(fbank, (0, 0, 0, max(0, 512 - fbank.shape[0])))[:512]
    x = ((fbank + 4.2677393) / (2 * 4.5689974))[None]
    model = tympan.load("ssast-tiny-patch", checkpoint=SSAST_PATCH, depth=_depth(SSAST_PATCH), input_tdim=512,
                        num_classes=10)
    pretrain = tympan.load("ssast-tiny-patch-pretrain", checkpoint=SSAST_PATCH, depth=_depth(SSAST_PATCH))
    with torch.no_grad():
        logits = model(x)
        out = pretrain(F.pad(x, (0, 0, 0, 512)), generator=torch.Generator().manual_seed(0))
    assert logits.shape == (1, 10) and torch.isfinite(logits).all()
    assert torch.isfinite(out.loss) and out.loss > 0 and 0 <= float(out.acc) <= 1
