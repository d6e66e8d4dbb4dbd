"""tympan.data on the real shared data: datafiles, datasets, augmentation, samplers, shards."""

from __future__ import annotations

import csv
import io
import json
import math
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.data import DataLoader

from tympan import audio
from tympan.data import (
    AddNoise,
    AudioDataset,
    BalancedSampler,
    DatafileError,
    DistributedSampler,
    Manifest,
    Mixup,
    MultiHot,
    NoiseRoll,
    RandomGain,
    Record,
    ShardDataset,
    SpecAugment,
    TimeRoll,
    balanced_weights,
    collate_audio,
    esc10_datafile,
    fsdd_datafile,
    part_range,
    read_datafile,
    sample_beta,
    write_datafile,
    write_shards,
)
from tympan.labels import read_label_csv

LAYOUTS = [(world, workers) for world in (1, 2, 3) for workers in (0, 2)]


@pytest.fixture(scope="module")
def esc10(data_dir, tmp_path_factory):
    return esc10_datafile(data_dir, tmp_path_factory.mktemp("esc10"))


@pytest.fixture(scope="module")
def fsdd(data_dir, tmp_path_factory):
    return fsdd_datafile(data_dir, tmp_path_factory.mktemp("fsdd"))


@pytest.fixture(scope="module")
def fsdd_small(fsdd) -> Manifest:
    """23 recordings of several digits and speakers (an odd count: uneven splits everywhere)."""
    return read_datafile(fsdd.datafile)[::118]


# ------------------------------------------------------------------------------------------- datafiles
def test_esc10_datafile_round_trip(esc10, data_dir, tmp_path):
    manifest = read_datafile(esc10.datafile)
    labels = read_label_csv(esc10.labels)
    assert len(manifest) == 320 and len(labels) == 10
    assert Counter(r.fold for r in manifest) == {1: 80, 2: 80, 3: 80, 4: 80}
    assert set(manifest.label_counts().values()) == {32}
    rows = {r["filename"]: r for r in csv.DictReader(open(data_dir / "esc10" / "esc10.csv"))}
    encode = MultiHot(labels)
    for record in manifest:
        row = rows[Path(record.wav).name]
        target = encode(record.labels)
        assert target.sum() == 1 and int(target.argmax()) == int(row["target_esc10"])
        assert labels.names[int(target.argmax())] == row["category"]
        assert record.fold == int(row["fold"]) and Path(record.wav).is_file()
    assert manifest.select(fold=[1, 2, 3]).__len__() == 240
    assert len(manifest.select(fold=lambda f: f != 4)) == 240
    # paths stored relative to the datafile are resolved against its folder
    moved = write_datafile(manifest, tmp_path / "sub" / "esc10.json", relative=True)
    assert not Path(json.loads(moved.read_text())["data"][0]["wav"]).is_absolute()
    assert [r.wav for r in read_datafile(moved)] == [r.wav for r in manifest]


def test_fsdd_datafile_splits_and_labels(fsdd):
    manifest = read_datafile(fsdd.datafile)
    assert len(manifest) == 2700
    assert Counter(r.split for r in manifest) == {"train": 2400, "validation": 300}
    assert all((r.split == "validation") == (5 <= r.extra["take"] <= 9) for r in manifest)
    encode = MultiHot(fsdd.labels)
    targets = torch.stack([encode(r.labels) for r in manifest])
    digits = torch.tensor([int(Path(r.wav).name[0]) for r in manifest])
    assert torch.equal(targets.argmax(1), digits) and torch.equal(targets.sum(1), torch.ones(2700))
    assert encode(["digit_3", "seven"]).nonzero().flatten().tolist() == [3, 7]  # mids or display names


def test_datafile_errors_are_one_line(tmp_path, fsdd):
    with pytest.raises(DatafileError, match="not found"):
        read_datafile(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text('{"data": [{"labels": "x"}]}')
    with pytest.raises(DatafileError, match="entry 0"):
        read_datafile(tmp_path / "bad.json")
    with pytest.raises(ValueError, match="'/m/nope' is not in the label set"):
        AudioDataset([Record("x.wav", ("/m/nope",))], fsdd.labels)


# -------------------------------------------------------------------------------------------- datasets
def test_dataset_pads_and_crops_real_clips(esc10):
    manifest = read_datafile(esc10.datafile)
    by_name = {Path(r.wav).stem: r for r in manifest}
    clips = Manifest([by_name["1-17808-B-12"], by_name["4-164661-B-12"]])  # 7.24 s and 3.64 s
    full = [torch.from_numpy(audio.load(r.wav)) for r in clips]
    assert full[0].numel() > 80000 > full[1].numel()

    start = AudioDataset(clips, esc10.labels, clip_seconds=5.0)
    long_item, short_item = start[0], start[1]
    assert long_item["waveform"].shape == short_item["waveform"].shape == (80000,)
    assert torch.equal(long_item["waveform"], full[0][:80000]) and long_item["length"] == 80000
    assert torch.equal(short_item["waveform"][: full[1].numel()], full[1])
    assert short_item["length"] == full[1].numel() and not short_item["waveform"][full[1].numel():].any()

    centre = AudioDataset(clips, esc10.labels, clip_seconds=5.0, eval_crop="center")[0]["waveform"]
    offset = (full[0].numel() - 80000) // 2
    assert torch.equal(centre, full[0][offset : offset + 80000])

    train = AudioDataset(clips, esc10.labels, clip_seconds=5.0, train=True, seed=1)
    crops = []
    for epoch in (0, 0, 1, 2):
        train.set_epoch(epoch)
        crop = train[0]["waveform"]
        offsets = [o for o in (full[0][: full[0].numel() - 79999] == crop[0]).nonzero().flatten().tolist()
                   if torch.equal(full[0][o : o + 80000], crop)]  # fmt: skip
        assert offsets, "the training crop is not a window of the clip"
        crops.append(offsets[0])
    assert crops[0] == crops[1] and len(set(crops)) > 1  # reproducible per epoch, varies across epochs


def test_collate_pads_to_longest_with_lengths(fsdd_small, fsdd):
    dataset = AudioDataset(fsdd_small[:6], fsdd.labels)  # 8 kHz recordings resampled to 16 kHz
    batch = next(iter(DataLoader(dataset, batch_size=6, collate_fn=collate_audio)))
    expected = [round(r.duration * 16000) for r in fsdd_small[:6]]
    assert batch["lengths"].tolist() == expected
    assert batch["waveform"].shape == (6, max(expected)) and batch["target"].shape == (6, 10)
    for row, length in zip(batch["waveform"], expected):
        assert not row[length:].any()


def test_corrupt_clips_are_skipped_and_counted(fsdd_small, fsdd, tmp_path):
    corrupt = tmp_path / "corrupt.wav"
    corrupt.write_bytes(b"RIFF" + bytes(range(256)) * 8)
    records = list(fsdd_small[:6])
    records[2] = Record(str(corrupt), records[2].labels)
    records[4] = Record(str(tmp_path / "missing.flac"), records[4].labels)
    good = {0, 1, 3, 5}

    dataset = AudioDataset(records, fsdd.labels)
    batches = list(DataLoader(dataset, batch_size=4, collate_fn=collate_audio))
    assert sum(b["skipped"] for b in batches) == 2 and dataset.num_skipped == 2
    assert set(torch.cat([b["index"] for b in batches]).tolist()) == good  # replaced by the next good clip
    assert sorted(dataset.failed) == [2, 4] and "corrupt" in dataset.failed[2]

    dropping = AudioDataset(records, fsdd.labels, on_error="skip")
    batches = list(DataLoader(dropping, batch_size=4, num_workers=2, collate_fn=collate_audio))
    assert sum(b["skipped"] for b in batches) == 2  # visible across worker processes
    assert sorted(torch.cat([b["index"] for b in batches]).tolist()) == sorted(good)


def test_item_randomness_independent_of_workers(fsdd_small, fsdd):
    dataset = AudioDataset(fsdd_small[:8], fsdd.labels, clip_seconds=0.3, train=True, augment=RandomGain(), seed=5)
    runs = [
        torch.cat([b["waveform"] for b in DataLoader(dataset, batch_size=3, num_workers=w, collate_fn=collate_audio)])
        for w in (0, 2)
    ]
    assert torch.equal(runs[0], runs[1])


# ---------------------------------------------------------------------------------------- augmentation
def test_mixup_mixes_labels_to_one_per_row(fsdd_small, fsdd):
    batch = collate_audio([AudioDataset(fsdd_small, fsdd.labels)[i] for i in range(12)])
    waveform, target, lengths = batch["waveform"], batch["target"], batch["lengths"]
    mixed, mixed_target = Mixup(alpha=10.0, seed=0)(waveform, target, lengths)
    assert torch.allclose(mixed_target.sum(1), torch.ones(12))
    assert ((mixed_target > 0).sum(1) <= 2).all() and (mixed_target.max(1).values >= 0.5).all()
    padding = torch.arange(waveform.shape[1]) >= lengths[:, None]
    assert not mixed[padding].any()
    valid_mean = mixed.sum(1) / lengths
    assert valid_mean.abs().max() < 1e-6  # mean removed as in AST

    # without mean removal the mix is exactly lam * x1 + (1 - lam) * x2 (partner cut to x1's length)
    generator = torch.Generator().manual_seed(3)
    plain, plain_target = Mixup(remove_mean=False)(waveform, target, lengths, generator=generator)
    partner = torch.randperm(12, generator=torch.Generator().manual_seed(3))
    lam = (plain_target * target).sum(1)
    lam = torch.where(target.argmax(1) == target[partner].argmax(1), torch.ones(12), lam)
    differ = target.argmax(1) != target[partner].argmax(1)
    expected = lam[:, None] * waveform + (1 - lam[:, None]) * waveform[partner] * ~padding
    assert torch.allclose(plain[differ], expected[differ], atol=1e-6)
    assert torch.equal(Mixup(seed=4)(waveform, target)[0], Mixup(seed=4)(waveform, target)[0])


@pytest.mark.parametrize("alpha", [10.0, 0.5])
def test_beta_sampler_moments(alpha):
    draws = sample_beta(alpha, alpha, (200_000,), torch.Generator().manual_seed(0)).double()
    variance = 1 / (4 * (2 * alpha + 1))
    assert abs(draws.mean() - 0.5) < 5 * (variance / 200_000) ** 0.5
    assert abs(draws.var() / variance - 1) < 0.02
    assert ((draws >= 0) & (draws <= 1)).all()


def _zero_band(mask_1d: torch.Tensor) -> tuple[int, int]:
    positions = mask_1d.nonzero().flatten()
    if not len(positions):
        return 0, 0
    assert positions[-1] - positions[0] + 1 == len(positions), "mask is not one contiguous band"
    return int(positions[0]), len(positions)


@settings(max_examples=30, deadline=None)
@given(
    frames=st.integers(1, 60), bins=st.integers(1, 40), freq_mask=st.integers(0, 50), time_mask=st.integers(0, 70),
    layout=st.sampled_from(["BTF", "BFT"]), seed=st.integers(0, 2**16),
)  # fmt: skip
def test_specaugment_masks_requested_widths_only(frames, bins, freq_mask, time_mask, layout, seed):
    shape = (6, frames, bins) if layout == "BTF" else (6, bins, frames)
    out = SpecAugment(freq_mask, time_mask, layout=layout, seed=seed)(torch.ones(shape))
    zero = (out == 0) if layout == "BTF" else (out == 0).transpose(1, 2)  # [B, T, F]
    for row in zero:
        freq_band = row.all(0)  # bins masked over all frames
        time_band = row.all(1)
        _, freq_width = _zero_band(freq_band)
        _, time_width = _zero_band(time_band)
        if freq_width < bins and time_width < frames:  # otherwise one band covers everything
            assert torch.equal(row, freq_band[None, :] | time_band[:, None])
            assert freq_width < max(freq_mask, 1) and time_width < max(time_mask, 1)


def test_specaugment_width_distribution():
    out = SpecAugment(freq_mask=24, time_mask=96, seed=0)(torch.ones(4000, 100, 32))
    widths_f = (out == 0).all(1).sum(1)
    widths_t = (out == 0).all(2).sum(1)
    assert widths_f.max() == 23 and widths_t.max() == 95 and widths_f.min() == 0
    assert abs(widths_f.float().mean() - 11.5) < 0.5 and abs(widths_t.float().mean() - 47.5) < 2


def test_noise_gain_and_roll(data_dir, fsdd_small):
    clean = torch.stack([torch.from_numpy(audio.load(r.wav))[:4000] for r in fsdd_small[:5]])
    babble = torch.from_numpy(audio.load(data_dir / "noise" / "babble_dass_16k.flac"))
    noisy = AddNoise(snr_db=10.0, noise=babble, seed=0)(clean)
    snr = 10 * torch.log10(clean.square().mean(1) / (noisy - clean).square().mean(1))
    assert torch.allclose(snr, torch.full((5,), 10.0), atol=1e-3)
    white = AddNoise(snr_db=(0.0, 20.0), seed=0)(clean, lengths=torch.full((5,), 3000))
    assert not (white - clean)[:, 3000:].any()

    gains = RandomGain(-6, 10, seed=0)(clean) / clean
    gain_db = 20 * torch.log10(gains[:, 100])
    assert ((gain_db >= -6 - 1e-4) & (gain_db <= 10 + 1e-4)).all()

    roll = TimeRoll(max_shift=50, seed=1)
    rolled = roll(clean)
    shifts = torch.randint(-50, 50, (5,), generator=torch.Generator().manual_seed(1))
    assert all(torch.equal(rolled[i], torch.roll(clean[i], int(shifts[i]))) for i in range(5))

    features = torch.randn(3, 100, 16)
    out = NoiseRoll(seed=2)(features)  # AST noise=True: + U[0,1) * U[0, 0.1), roll in [-10, 9]
    added = torch.stack([  # undo the roll whose residual is smallest; the residual is the added noise
        min((torch.roll(out[i], -s, 0) - features[i] for s in range(-10, 10)), key=lambda r: r.abs().max())
        for i in range(3)
    ])
    assert ((added >= -1e-6) & (added < 0.1)).all()



def test_log_mel_mix_matches_waveform_mixing(data_dir):
    """Gain is exact in the log-mel domain; mixing adds magnitudes, close to the log-mel of the mixed waveform."""
    from tympan.data.augment import LogMelMix, mix_log_mel
    from tympan.models.tymnet import YAMNetLogMel

    frontend = YAMNetLogMel()
    dog = torch.from_numpy(audio.load(data_dir / "esc10" / "audio" / "1-116765-A-41.flac"))[:32000]  # chainsaw
    rain = torch.from_numpy(audio.load(data_dir / "esc10" / "audio" / "1-17367-A-10.flac"))[:32000]
    a, b = frontend(dog), frontend(rain)
    assert (a > math.log(1e-3) + 1).float().mean() > 0.5 and (b > math.log(1e-3) + 1).float().mean() > 0.5
    gained = mix_log_mel(a, gain_db=torch.tensor([-12.0]))
    assert torch.allclose(gained, frontend(dog * 10 ** (-12 / 20)), atol=1e-4)
    # SNR is measured on mel magnitudes: scale rain so that the ratio is 0 dB, mix the waveforms the same way
    mel_a, mel_b = (a.exp() - 1e-3).clamp_min(0), (b.exp() - 1e-3).clamp_min(0)
    scale = float((mel_a.square().mean() / mel_b.square().mean()).sqrt())
    mixed = mix_log_mel(a, b, snr_db=torch.tensor([0.0]))
    truth = frontend(dog + scale * rain)
    error = (mixed - truth).abs().mean()
    assert error < 0.15, error  # phase is unknown: powers add on average
    assert abs(float((mixed - truth).mean())) < 0.06  # nearly unbiased (adding magnitudes: +0.2)
    assert error < 0.3 * min((a - truth).abs().mean(), (b - truth).abs().mean())
    # no mixing at +inf SNR, tilt spans -t/2..+t/2 dB over the bands
    assert torch.allclose(mix_log_mel(a, b, snr_db=torch.tensor([float("inf")])), a, atol=1e-5)
    tilted = mix_log_mel(a, tilt_db=torch.tensor([6.0]))
    loud = a > 0  # far above the floor, log differences are the gains
    assert torch.allclose((tilted - a)[..., 0][loud[..., 0]], torch.tensor(-3 / 20 * math.log(10)), atol=1e-3)
    # the drawn parameters come from the generator: same seed, same batch
    batch, partner = torch.cat([a, b]), torch.cat([b, a])
    first = LogMelMix(mix_prob=0.5)(batch, partner, torch.Generator().manual_seed(3))
    assert torch.equal(first, LogMelMix(mix_prob=0.5)(batch, partner, torch.Generator().manual_seed(3)))
    assert first.shape == batch.shape and torch.isfinite(first).all() and (first >= math.log(1e-3) - 1e-6).all()
    with pytest.raises(ValueError, match="mix_prob"):
        LogMelMix(mix_prob=1.5)


# -------------------------------------------------------------------------------------------- sampling
def test_balanced_sampler_follows_label_weights():
    labels = [["a"]] * 60 + [["a", "b"]] * 6 + [["b"]] * 3 + [["c"]] + [[]]
    weights = balanced_weights(labels)
    a, b, c = 1000 / 66.01, 1000 / 9.01, 1000 / 1.01  # AST's 1000 / (count + 0.01)
    assert torch.allclose(weights, torch.tensor([a] * 60 + [a + b] * 6 + [b] * 3 + [c] + [0.0], dtype=torch.float64))

    sampler = BalancedSampler(weights, num_samples=400_000, seed=0)
    counts = torch.bincount(sampler.indices(), minlength=len(labels)).double()
    expected = weights / weights.sum() * 400_000
    assert counts[-1] == 0
    z = (counts[:-1] - expected[:-1]) / expected[:-1].sqrt()
    assert (z.square().sum() / (len(labels) - 2)) < 1.5  # chi-square per degree of freedom
    assert torch.equal(sampler.indices(), BalancedSampler(weights, 400_000, seed=0).indices())
    sampler.set_epoch(1)
    assert not torch.equal(sampler.indices()[:100], BalancedSampler(weights, 400_000, seed=0).indices()[:100])


@pytest.mark.parametrize("world, workers", LAYOUTS)
def test_distributed_sampler_exactly_once(world, workers, fsdd_small, fsdd):
    dataset = AudioDataset(fsdd_small[:11], fsdd.labels)
    seen = Counter()
    for rank in range(world):
        sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=7)
        sampler.set_epoch(3)
        loader = DataLoader(dataset, batch_size=2, sampler=sampler, num_workers=workers, collate_fn=collate_audio)
        indices = [i for batch in loader for i in batch["index"].tolist()]
        assert len(indices) == len(sampler)
        seen.update(indices)
    assert seen == Counter(range(11))


@settings(max_examples=200, deadline=None)
@given(num_items=st.integers(0, 60), num_parts=st.integers(1, 9))
def test_part_range_policies(num_items, num_parts):
    uneven = [part_range(num_items, num_parts, p, "uneven") for p in range(num_parts)]
    assert [i for r in uneven for i in r] == list(range(num_items))  # contiguous, in order, exactly once
    assert max(map(len, uneven)) - min(map(len, uneven)) <= 1
    drop = [part_range(num_items, num_parts, p, "drop") for p in range(num_parts)]
    assert [i for r in drop for i in r] == list(range(num_items // num_parts * num_parts))
    pad = [part_range(num_items, num_parts, p, "pad") for p in range(num_parts)]
    assert {len(r) for r in pad} == {-(-num_items // num_parts)}
    if num_items:
        assert {i % num_items for r in pad for i in r} == set(range(num_items))


@pytest.mark.parametrize("world", [2, 3, 4])
def test_distributed_sampler_policies_and_wrapping(world):
    for remainder in ("pad", "drop"):
        parts = [list(DistributedSampler(10, world, rank, seed=1, remainder=remainder)) for rank in range(world)]
        assert len({len(p) for p in parts}) == 1  # equal per rank: safe for DDP
        union = Counter(i for p in parts for i in p)
        assert (set(union) == set(range(10))) if remainder == "pad" else max(union.values()) == 1
    balanced = BalancedSampler(torch.rand(50), num_samples=31, seed=2)
    parts = [DistributedSampler(balanced, world, rank, shuffle=False) for rank in range(world)]
    for part in parts:
        part.set_epoch(4)
    assert [i for p in parts for i in p] == balanced.indices().tolist()  # same draw on all ranks, split once


# ---------------------------------------------------------------------------------------------- shards
@pytest.fixture(scope="module")
def fsdd_shards(fsdd_small, tmp_path_factory):
    return write_shards(fsdd_small, tmp_path_factory.mktemp("shards"), max_samples_per_shard=5)


def test_shards_round_trip_bit_exact(fsdd_shards, fsdd_small, esc10, tmp_path):
    assert fsdd_shards.counts == (5, 5, 5, 5, 3) and not fsdd_shards.skipped
    items = {item["path"]: item for item in ShardDataset(fsdd_shards, sample_rate=None)}
    assert len(items) == len(fsdd_small)
    for record in fsdd_small:
        assert torch.equal(items[record.wav]["waveform"], torch.from_numpy(audio.load(record.wav, sample_rate=None)))
    with tarfile.open(fsdd_shards.shards[0]) as tar:  # the stored FLAC holds the WAV's int16 samples
        names = tar.getnames()
        stored, rate = sf.read(io.BytesIO(tar.extractfile(names[0]).read()), dtype="int16")
        meta = json.loads(tar.extractfile(names[1]).read())
    assert names[0].endswith(".flac") and names[1] == names[0].replace(".flac", ".json")
    assert np.array_equal(stored, sf.read(meta["wav"], dtype="int16")[0]) and rate == meta["sample_rate"] == 8000
    assert meta["labels"] == ",".join(fsdd_small[0].labels) and meta["split"] == fsdd_small[0].split

    esc = read_datafile(esc10.datafile)[:3]
    index = write_shards(esc, tmp_path / "esc", audio_format="original")
    for item, record in zip(ShardDataset(tmp_path / "esc", esc10.labels, clip_seconds=5.0), esc):
        assert torch.equal(item["waveform"], torch.from_numpy(audio.load(record.wav))[:80000])
        assert torch.equal(item["target"], MultiHot(esc10.labels)(record.labels))
    assert index.num_samples == 3


@pytest.mark.parametrize("world, workers", LAYOUTS)
def test_shard_dataset_exactly_once(world, workers, fsdd_shards):
    keys = Counter()
    for rank in range(world):
        dataset = ShardDataset(fsdd_shards, num_replicas=world, rank=rank, shuffle=True, shuffle_buffer=4, seed=1)
        dataset.set_epoch(2)
        loader = DataLoader(dataset, batch_size=2, num_workers=workers, collate_fn=collate_audio)
        got = [key for batch in loader for key in batch["key"]]
        assert len(got) == len(dataset)
        keys.update(got)
    with open(fsdd_shards.path) as f:
        assert json.load(f)["num_samples"] == 23
    assert len(keys) == 23 and set(keys.values()) == {1}


def test_shard_dataset_pad_policy_and_order(fsdd_shards):
    lengths = [len(ShardDataset(fsdd_shards, num_replicas=4, rank=r, remainder="pad")) for r in range(4)]
    assert lengths == [6, 6, 6, 6]
    ranks = [ShardDataset(fsdd_shards, num_replicas=4, rank=r, remainder="pad") for r in range(4)]
    padded = Counter(item["key"] for rank in ranks for item in rank)
    assert len(padded) == 23 and sum(padded.values()) == 24
    epochs = []
    for epoch in (0, 1):
        dataset = ShardDataset(fsdd_shards, shuffle=True, shuffle_buffer=6, seed=0)
        dataset.set_epoch(epoch)
        epochs.append([item["key"] for item in dataset])
    assert sorted(epochs[0]) == sorted(epochs[1]) and epochs[0] != epochs[1]


def test_shard_reader_skips_corrupt_samples(fsdd_shards, tmp_path):
    with tarfile.open(fsdd_shards.shards[-1]) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(tmp_path / "broken.tar", "w") as tar:
        for i, (member, payload) in enumerate(members):
            if i == 2:  # the second sample's audio
                payload = b"fLaC" + bytes(64)
                member.size = len(payload)
            tar.addfile(member, io.BytesIO(payload))
    batches = list(DataLoader(ShardDataset([tmp_path / "broken.tar"]), batch_size=8, collate_fn=collate_audio))
    assert sum(b["skipped"] for b in batches) == 1 and sum(len(b["key"]) for b in batches) == 2


def test_pack_shards_main(fsdd_small, tmp_path, capsys):
    datafile = write_datafile(fsdd_small[:4], tmp_path / "four.json")
    from tympan.cli import main

    assert main(["shards", str(datafile), "-o", str(tmp_path / "out"), "-s", "3"]) == 0
    assert "4 samples in 2 shards" in capsys.readouterr().out
    assert [p.name for p in sorted((tmp_path / "out").glob("*.tar"))] == ["shard-000000.tar", "shard-000001.tar"]
    assert main(["shards", str(tmp_path / "nope.json"), "-o", str(tmp_path / "x")]) == 2
    assert "no such file" in capsys.readouterr().err


def test_datafile_and_labels_written_while_read_are_never_torn(data_dir, tmp_path):
    """Two torchrun ranks both write `out/data/fsdd.json` and read it back: the writes are atomic, so a reader sees
    the old or the new file, never an empty one (a 2-process training failed with "not a readable JSON datafile
    (Expecting value: line 1 column 1)"). Here another process rewrites both files while this one reads them."""
    import subprocess
    import sys
    import time
    from pathlib import Path

    from tympan.data import fsdd_datafile, read_datafile
    from tympan.labels import read_label_csv

    first = fsdd_datafile(data_dir, tmp_path / "data")
    expected, labels = len(read_datafile(first.datafile)), len(read_label_csv(first.labels))
    code = ("import sys; from tympan.data import fsdd_datafile\n"
            "print('ready', flush=True)\n"
            "while True: fsdd_datafile(sys.argv[1], sys.argv[2])\n")  # fmt: skip
    writer = subprocess.Popen([sys.executable, "-c", code, str(data_dir), str(tmp_path / "data")],
                              stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert writer.stdout.readline().strip() == "ready"
        deadline = time.monotonic() + 3.0
        while time.monotonic() < deadline:  # raw reads: many per rewrite, so a torn file would be met
            assert len(json.loads(Path(first.datafile).read_text())["data"]) == expected
            assert Path(first.labels).read_text().count("\n") == labels + 1
        assert len(read_datafile(first.datafile)) == expected and writer.poll() is None  # it was writing all along
    finally:
        writer.kill()
        writer.wait()
