"""Corpus builder library: Debian copyright parsing (DEP-5), real decoding and teacher labelling of shared clips,
held-out split by source file, group balancing, mixtures, shards and the synthetic MIDI files."""

from __future__ import annotations

import io
import json
import re
import shutil
import string
import subprocess
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tympan import audio
from tympan.data import corpus as C

# ------------------------------------------------------------------------------------------- DEP-5 copyright
_word = st.text(alphabet=string.ascii_letters + string.digits + "-_.", min_size=1, max_size=12)
_pattern = st.lists(st.one_of(_word, st.just("*")), min_size=1, max_size=4).map("/".join)
_license = st.text(alphabet=string.ascii_letters + string.digits + "-.+", min_size=1, max_size=20)
_paragraph = st.builds(
    C.CopyrightParagraph,
    files=st.lists(_pattern, min_size=1, max_size=4).map(tuple),
    license=_license,
    copyright=st.lists(st.text(alphabet=string.ascii_letters + " ,0123456789", min_size=1, max_size=30)
                       .map(str.strip).filter(bool), max_size=3).map("\n".join),  # fmt: skip
)


def _glob_match(pattern: str, path: str) -> bool:
    """DEP-5's glob written plainly, one pattern against one whole path (the reference for license_for's one regex
    per paragraph): ``*`` is any characters, '/' included, ``?`` one character, nothing else is special."""
    regex = "".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern)
    return re.fullmatch(regex, path, flags=re.DOTALL) is not None


@given(paragraphs=st.lists(_paragraph, max_size=6), header=st.one_of(st.none(), _license))
def test_copyright_round_trip(paragraphs, header):
    document = C.DebianCopyright(True, tuple(paragraphs), header)
    assert C.parse_copyright(C.render_copyright(document)) == document


@given(paragraphs=st.lists(_paragraph, min_size=1, max_size=6), name=_word)
def test_last_matching_paragraph_wins(paragraphs, name):
    """DEP-5: the last paragraph whose Files pattern matches decides; ``*`` matches any path, '/' included."""
    document = C.DebianCopyright(True, (C.CopyrightParagraph(("*",), "FIRST"), *paragraphs))
    path = f"sounds/{name}.ogg"
    expected = "FIRST"
    for p in paragraphs:
        if any(_glob_match(pattern, path) or _glob_match(pattern, path.split("/", 1)[1]) for pattern in p.files):
            expected = p.license
    assert C.license_for(document, path) == expected


@given(paragraphs=st.lists(_paragraph, min_size=1, max_size=6), parts=st.lists(_word.filter(lambda w: w not in (".", "..")), min_size=1, max_size=5),
       ext=st.sampled_from([".ogg", ".wav", ""]))
def test_license_for_tries_every_suffix_of_the_path(paragraphs, parts, ext):
    """license_for's one regex per paragraph equals trying each pattern on the path and on each of its suffixes
    after a '/', the last matching paragraph winning."""
    document = C.DebianCopyright(True, tuple(paragraphs))
    path = "/".join(parts) + ext
    suffixes = ["/".join(parts[i:]) + ext for i in range(len(parts))]
    expected = None
    for p in paragraphs:
        if any(_glob_match(pattern, s) for pattern in p.files for s in suffixes):
            expected = p.license
    assert C.license_for(document, path) == expected


def test_license_for_installed_paths_and_real_layout():
    text = """Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/
Upstream-Name: example

Files: *
Copyright: 2001 Someone
License: GPL-2+

Files: data/sounds/*
 data/ambient/rain?.ogg
Copyright: 2010 Someone Else
License: CC-BY-SA-3.0
 Long licence text follows here
 .
 and more of it.

Files: debian/*
License: GPL-2+

License: CC-BY-SA-3.0
 Standalone licence text paragraph.
"""
    parsed = C.parse_copyright(text)
    assert parsed.machine_readable and len(parsed.paragraphs) == 3
    assert parsed.paragraphs[1].files == ("data/sounds/*", "data/ambient/rain?.ogg")
    # an installed path matches the source-tree pattern through one of its suffixes
    assert C.license_for(parsed, "usr/share/games/example/data/sounds/deep/dog.ogg") == "CC-BY-SA-3.0"
    assert C.license_for(parsed, "./usr/share/games/example/data/ambient/rain1.ogg") == "CC-BY-SA-3.0"
    assert C.license_for(parsed, "usr/share/games/example/data/ambient/rain12.ogg") == "GPL-2+"
    assert C.license_for(parsed, ".data/sounds/a.ogg") == "GPL-2+"  # a leading dot is part of the name
    assert C.license_for(parsed, "usr/share/doc/example/README") == "GPL-2+"


def test_free_form_copyright_is_not_machine_readable():
    parsed = C.parse_copyright("This package was debianized by someone.\n\nIt is GPL.\n")
    assert not parsed.machine_readable and parsed.paragraphs == ()
    assert C.license_for(parsed, "any/file.ogg") is None


def test_system_copyright_files_parse():
    """Real DEP-5 files on this Debian system: every Files paragraph has patterns and a licence."""
    files = sorted(Path("/usr/share/doc").glob("*/copyright"))[:200]
    parsed = [C.parse_copyright(p.read_text(errors="replace")) for p in files]
    readable = [p for p in parsed if p.machine_readable and p.paragraphs]
    if not readable:
        pytest.skip("no machine-readable copyright file under /usr/share/doc")
    for document in readable:
        for paragraph in document.paragraphs:
            assert paragraph.files and all(paragraph.files)


# ------------------------------------------------------------------------------------------- decoding, labelling
def test_decode_bytes_matches_audio_load(data_dir):
    path = data_dir / "esc10" / "audio" / "1-100032-A-0.flac"
    decoded = C.decode_bytes(path.read_bytes())
    np.testing.assert_allclose(decoded, audio.load(path), atol=1e-6)


def test_decode_resamples_to_16k(data_dir):
    import soundfile as sf

    path = sorted((data_dir / "mod-sounds" / "sounds").glob("*.ogg"))[0]
    with sf.SoundFile(io.BytesIO(path.read_bytes())) as f:
        rate, frames = f.samplerate, f.frames
    decoded = C.decode_bytes(path.read_bytes())
    assert decoded.dtype == np.float32 and decoded.ndim == 1
    assert abs(len(decoded) - frames * 16000 / rate) <= 1


def test_find_audio_in_folders_and_zips(tmp_path, data_dir):
    import zipfile

    source = data_dir / "esc10" / "audio" / "1-100032-A-0.flac"
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "a" / "b" / "dog.flac").write_bytes(source.read_bytes())
    (tmp_path / "a" / "notes.txt").write_text("not audio")
    with zipfile.ZipFile(tmp_path / "pack.zip", "w") as z:
        z.writestr("audio/x/dog.flac", source.read_bytes())
        z.writestr("audio/music/song.flac", source.read_bytes())
    found = C.find_audio(tmp_path, exclude=["audio/music/*"], zips=["pack.zip"])
    assert [name for name, _ in found] == ["a/b/dog.flac", "audio/x/dog.flac"]
    item = C.AudioItem("k", "test", "1", "CC-BY-3.0", found[1][1])
    assert item.read_bytes() == source.read_bytes()


@pytest.fixture(scope="module")
def yamnet(shared_dir, tmp_path_factory):
    pytest.importorskip("onnxruntime")
    from tympan.teachers.yamnet import YAMNet

    return YAMNet(shared_dir / "teachers" / "yamnet" / "YamNet_w8a8.onnx.zip", num_threads=1, batch_size=16,
                  cache=tmp_path_factory.mktemp("onnx"))  # fmt: skip


def test_label_waveform_real_clip(yamnet, data_dir):
    """A dog clip: float16 patches equal YAMNet's frontend; the teacher's patch groups are 'animal' (the bark) and
    'other' (Silence between barks)."""
    from tympan.teachers.yamnet import log_mel_patches

    waveform = audio.load(data_dir / "esc10" / "audio" / "1-100032-A-0.flac")
    arrays = C.label_waveform(waveform, yamnet, max_patches=4)
    assert arrays["patches"].shape == (4, 96, 64) and arrays["patches"].dtype == np.float16
    assert arrays["scores"].shape == (4, 521) and arrays["embeddings"].shape == (4, 1024)
    np.testing.assert_array_equal(arrays["index"], C.select_patches(10, 4))
    reference = log_mel_patches(waveform)[arrays["index"], 0]
    np.testing.assert_allclose(arrays["patches"].astype(np.float32), reference, atol=5e-3)
    groups = C.patch_groups(arrays["scores"].astype(np.float32))
    assert set(C.GROUPS[g] for g in groups) <= {"animal", "other"}
    assert "animal" in {C.GROUPS[g] for g in groups}


def test_label_cache_round_trip(tmp_path):
    cache = C.LabelCache(tmp_path)
    item = C.AudioItem("pkg:sounds/a.ogg", "pkg", "1.0", "CC0", "/nowhere/a.ogg")
    assert not cache.has(item.key)
    arrays = {"scores": np.arange(6, dtype=np.float16).reshape(2, 3)}
    cache.put(item, arrays, {"seconds": 1.5, "split": "train"})
    meta, back = cache.get(item.key)
    assert cache.has(item.key) and meta["license"] == "CC0" and meta["seconds"] == 1.5
    np.testing.assert_array_equal(back["scores"], arrays["scores"])
    assert cache.meta(item.key) == meta  # the provenance alone, arrays unread
    cache.put(item, {**arrays, "index": np.arange(2)}, {"seconds": 1.5, "split": "train"})
    meta_only, some = cache.get(item.key, ["index"])
    assert meta_only == meta and list(some) == ["index"] and np.array_equal(some["index"], [0, 1])
    with pytest.raises(KeyError, match="embeddings"):
        cache.get(item.key, ["embeddings"])


# ------------------------------------------------------------------------------------------- groups, splits
def test_class_groups_follow_the_ontology():
    groups = C.class_groups()
    names = {0: "speech", 69: "animal", 132: "music", 283: "nature", 301: "vehicle", 371: "domestic", 390: "alarm",
             413: "tools", 420: "impacts", 494: "other"}  # fmt: skip
    for index, name in names.items():
        assert C.GROUPS[groups[index]] == name
    assert set(np.unique(groups)) == set(range(len(C.GROUPS)))


def test_split_is_stable_and_near_the_fraction():
    keys = [f"pkg:file{i}.ogg" for i in range(4000)]
    splits = [C.split_of(k, 0.1) for k in keys]
    assert splits == [C.split_of(k, 0.1) for k in keys]
    assert 0.08 < splits.count("heldout") / len(keys) < 0.12
    assert C.split_of("x", 0.0) == "train" and C.split_of("x", 1.0) == "heldout"


@given(groups=st.lists(st.integers(0, len(C.GROUPS) - 1), min_size=1, max_size=300), power=st.floats(0, 1))
def test_group_weights_give_each_group_its_share(groups, power):
    groups = np.array(groups)
    weights = C.group_weights(groups, power)
    assert np.isclose(weights.sum(), 1.0) and (weights > 0).all()
    counts = np.bincount(groups, minlength=len(C.GROUPS)).astype(float)
    share = np.array([weights[groups == g].sum() for g in range(len(C.GROUPS))])
    expected = np.where(counts > 0, counts**power, 0)
    np.testing.assert_allclose(share, expected / expected.sum(), rtol=1e-9, atol=1e-12)


@given(num=st.integers(1, 500), cap=st.integers(1, 64))
def test_select_patches(num, cap):
    index = C.select_patches(num, cap)
    assert len(index) <= min(num, cap) and (np.diff(index) > 0).all()
    assert index[0] == 0 and (index[-1] == num - 1 or num == 1 or cap == 1)


@settings(max_examples=30)
@given(snr=st.floats(-10, 20), offset=st.integers(0, 4000), seed=st.integers(0, 1000))
def test_mixture_snr(snr, offset, seed):
    rng = np.random.default_rng(seed)
    bed = (0.05 * rng.standard_normal(8000)).astype(np.float32)
    effect = (0.01 * rng.standard_normal(3000)).astype(np.float32)
    mixed = C.mix_waveforms(effect, bed, snr, offset)
    assert mixed.shape == bed.shape and np.abs(mixed).max() <= 1.0
    if np.abs(mixed).max() < 0.99:  # not rescaled: the added part has the asked SNR
        added = mixed - bed
        piece = added[offset : offset + len(effect)]
        ratio = 20 * np.log10(np.sqrt(np.mean(piece**2)) / np.sqrt(np.mean(bed**2)))
        assert abs(ratio - snr) < 1e-3
        assert np.allclose(added[:offset], 0)


def test_shards_round_trip(tmp_path):
    arrays = {"scores": np.random.default_rng(0).random((25, 4)).astype(np.float16),
              "group": np.arange(25, dtype=np.int8)}  # fmt: skip
    names = C.write_shards(tmp_path, arrays, "train", shard_size=10)
    assert names == ["train-0000.npz", "train-0001.npz", "train-0002.npz"]
    back = C.load_shards(tmp_path, "train")
    for key in arrays:
        np.testing.assert_array_equal(back[key], arrays[key])
    with pytest.raises(FileNotFoundError):
        C.load_shards(tmp_path, "heldout")


def _builder():
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "recipes" / "default_model" / "build_corpus.py"
    spec = importlib.util.spec_from_file_location("default_model_build_corpus", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_builder_mixtures_resume_exactly_and_shards_hold_only_the_recipes_own(tmp_path, yamnet, data_dir):
    """The corpus builder's mixtures (effect over bed, teacher-labelled): a run stopped after 3 of 6 and resumed
    builds the same 6 mixtures, with the same labels, as a run that never stopped (each mixture draws from its own
    generator); the shards hold this recipe's files and mixtures, not other entries of the shared label cache; a new
    version of one file remixes only the mixtures it is in."""

    build = _builder()
    clips = {"dog": "1-100032-A-0.flac", "rain": "1-17367-A-10.flac", "baby": "1-187207-A-20.flac",
             "waves": "1-39901-A-11.flac"}  # fmt: skip
    items = [(C.AudioItem(f"esc:{name}", "esc10", "-", "CC-BY-NC-3.0", str(data_dir / "esc10" / "audio" / f)), 4)
             for name, f in clips.items()]  # fmt: skip
    build.label_all(items, C.LabelCache(tmp_path / "whole"), yamnet, heldout=0.0, seed=0)
    shutil.copytree(tmp_path / "whole", tmp_path / "resumed")
    cfg = {"seed": 0, "mixtures": {"count": 6, "patches": 2, "snr_db": [-5.0, 10.0]}}
    whole = build.mix_all(items, C.LabelCache(tmp_path / "whole"), yamnet, cfg)
    resumed_cache = C.LabelCache(tmp_path / "resumed")
    first = build.mix_all(items, resumed_cache, yamnet, {**cfg, "mixtures": {**cfg["mixtures"], "count": 3}})
    resumed = build.mix_all(items, resumed_cache, yamnet, cfg)
    assert len(set(whole)) == 6 and first == whole[:3] and resumed == whole
    assert build.mix_all(items, resumed_cache, None, cfg) == whole  # keys only (--stage shard), nothing labelled
    for key in whole:
        a, b = C.LabelCache(tmp_path / "whole").get(key)[1], resumed_cache.get(key)[1]
        assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    stray = C.AudioItem("mix:0:another recipe's", "mixture", "-", "mixture", "-")
    resumed_cache.put(stray, resumed_cache.get(whole[0])[1], {"seconds": 1.92, "split": "train"})
    build.write_all(items, resumed_cache, {**cfg, "shards": str(tmp_path / "shards")}, resumed)
    manifest = json.loads((tmp_path / "shards" / "manifest.json").read_text())
    assert [m["key"] for m in manifest] == [item.key for item, _ in items] + whole
    assert len(C.load_shards(tmp_path / "shards", "train")["patches"]) == 4 * 4 + 6 * 2
    # a new version of one file: its mixtures are mixed and labelled again, the others are left as they were
    stamps = {key: resumed_cache.path(key).stat().st_mtime_ns for key in whole}
    items = [(C.AudioItem(i.key, i.source, "2" if i.key == "esc:waves" else i.version, i.license, i.path), cap)
             for i, cap in items]  # fmt: skip
    build.label_all(items, resumed_cache, yamnet, heldout=0.0, seed=0)
    assert build.mix_all(items, resumed_cache, yamnet, cfg) == whole
    redone = {key for key in whole if resumed_cache.path(key).stat().st_mtime_ns != stamps[key]}
    assert redone and redone == {key for key in whole if "esc:waves" in key}


def test_builder_relabels_a_new_version_and_writes_the_recipes_licence(tmp_path, yamnet, data_dir):
    """The label cache is keyed by file: a file whose package has a new version is labelled again (its audio may
    have changed), and the manifest takes source, version and licence from the recipe as it is now, so a licence
    corrected by hand reaches the shards' manifest without relabelling."""
    build = _builder()
    path = str(data_dir / "esc10" / "audio" / "1-100032-A-0.flac")
    old = C.AudioItem("pkg:dog.flac", "pkg", "1.0-1", "GPL-2+", path)
    cache = C.LabelCache(tmp_path / "cache")
    build.label_all([(old, 4)], cache, yamnet, heldout=0.0, seed=0)
    assert build._labelled(cache, old, 4)
    newer = C.AudioItem(old.key, "pkg", "1.0-2", "GPL-2+", path)
    relicensed = C.AudioItem(old.key, "pkg", "1.0-1", "CC-BY-SA-3.0 (checked by hand)", path)
    assert not build._labelled(cache, newer, 4) and build._labelled(cache, relicensed, 4)
    build.label_all([(newer, 4)], cache, yamnet, heldout=0.0, seed=0)
    assert cache.get(old.key)[0]["version"] == "1.0-2" and build._labelled(cache, newer, 4)
    relicensed = C.AudioItem(old.key, "pkg", "1.0-2", "CC-BY-SA-3.0 (checked by hand)", path)
    build.write_all([(relicensed, 4)], cache, {"shards": str(tmp_path / "shards")}, [])
    (row,) = json.loads((tmp_path / "shards" / "manifest.json").read_text())
    assert (row["version"], row["license"]) == ("1.0-2", "CC-BY-SA-3.0 (checked by hand)")
    assert "CC-BY-SA-3.0 (checked by hand)" in (tmp_path / "shards" / "corpus_table.md").read_text()


# ------------------------------------------------------------------------------------------- synthesis
def _read_var_len(data: bytes, pos: int) -> tuple[int, int]:
    value = 0
    while True:
        byte = data[pos]
        value = (value << 7) | (byte & 0x7F)
        pos += 1
        if not byte & 0x80:
            return value, pos


@given(value=st.integers(0, 2**28 - 1))
def test_midi_variable_length(value):
    assert _read_var_len(C._var_len(value), 0) == (value, len(C._var_len(value)))


@given(program=st.integers(0, 127), drums=st.booleans(), notes=st.integers(1, 20))
def test_general_midi_file_structure(program, drums, notes):
    data = C.general_midi_file(program, drums=drums, notes=notes)
    assert data[:4] == b"MThd" and data[14:18] == b"MTrk"
    length = int.from_bytes(data[18:22], "big")
    track = data[22:]
    assert len(track) == length and track.endswith(b"\x00\xff\x2f\x00")
    pos, ons, offs, program_seen = 0, 0, 0, None
    while pos < len(track):
        _, pos = _read_var_len(track, pos)
        status = track[pos]
        if status == 0xFF:
            size = track[pos + 2]
            pos += 3 + size
            continue
        kind, channel = status & 0xF0, status & 0x0F
        assert channel == (9 if drums else 0)
        if kind == 0xC0:
            program_seen = track[pos + 1]
            pos += 2
        else:
            ons += kind == 0x90
            offs += kind == 0x80
            pos += 3
    assert program_seen == program and ons == offs >= notes


def test_sox_recipes_are_deterministic():
    assert C.sox_recipes(12, seed=3) == C.sox_recipes(12, seed=3)
    assert len(C.sox_recipes(12)) == 12 and all(r[0] == "synth" for r in C.sox_recipes(12))


@pytest.mark.skipif(shutil.which("sox") is None, reason="sox is not installed (.ci/run installs it as root)")
def test_sox_renders_every_recipe_to_the_same_samples_each_time(tmp_path):
    """Each kind of recipe (tone, sweep, beeps, noise) renders byte for byte the same twice: sox seeds its noise and
    its dither at random unless told not to, and the corpus labels and mixes these files."""
    for i, args in enumerate(C.sox_recipes(4, seed=1)):
        first, second = tmp_path / f"{i}a.wav", tmp_path / f"{i}b.wav"
        for path in (first, second):
            subprocess.run(C.sox_command(args, path), check=True, capture_output=True)
        assert first.read_bytes() == second.read_bytes(), args
        waveform = audio.load(first)
        assert waveform.ndim == 1 and len(waveform) > 1000 and np.abs(waveform).max() > 0.01


@settings(max_examples=40, deadline=None)
@given(st.lists(st.text(min_size=1, max_size=10), min_size=2, max_size=30, unique=True), st.data())
def test_rendezvous_pick_changes_only_the_draws_of_an_item_that_leaves_or_joins(keys, data):
    """Removing one item from the list (its label moved it out of the effects) changes exactly the draws it won;
    every other draw keeps its item, wherever the removed one stood."""
    gone = data.draw(st.sampled_from(keys))
    rest = [k for k in keys if k != gone]
    draws = [int(d) for d in np.random.default_rng(len(keys)).integers(2**63, size=300)]
    before = [keys[C.rendezvous_pick(C.key_hashes(keys), d)] for d in draws]
    after = [rest[C.rendezvous_pick(C.key_hashes(rest), d)] for d in draws]
    assert all(a == b for a, b in zip(after, before) if b != gone)
    assert gone not in after


def test_rendezvous_pick_is_uniform_over_the_items():
    keys = [f"effect-{i}" for i in range(8)]
    hashes = C.key_hashes(keys)
    draws = np.random.default_rng(0).integers(2**63, size=16000)
    counts = np.bincount([C.rendezvous_pick(hashes, int(d)) for d in draws], minlength=8)
    chi2 = float(((counts - 2000) ** 2 / 2000).sum())
    assert chi2 < 24.3, counts  # 7 degrees of freedom: p = 0.001


@pytest.mark.skipif(shutil.which("sox") is None, reason="sox is not installed (.ci/run installs it as root)")
def test_builder_sox_items_name_their_tool_and_command(tmp_path):
    """The builder's sox sounds: versioned with sox's own version and its repeatable mode (so a cache labelled from
    the old random renders relabels them), named by a digest of their command (so an old render is not reused), and
    not rendered again when present."""
    build = _builder()
    items = build.sox_items({"sox_sounds": 4}, tmp_path)
    assert [i.key for i in items] == [f"synth:sox/{n}" for n in range(4)]
    version = C.parse_tool_version(subprocess.run(["sox", "--version"], capture_output=True, text=True).stdout)
    assert version != "unknown" and all(i.version == f"{version} -R" for i in items)
    assert len({Path(i.path).name for i in items}) == 4 and all(Path(i.path).stem.count("_") == 2 for i in items)
    stamps = [Path(i.path).stat().st_mtime_ns for i in items]
    assert build.sox_items({"sox_sounds": 4}, tmp_path) == items
    assert [Path(i.path).stat().st_mtime_ns for i in items] == stamps


@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng is not installed (.ci/run installs it as root)")
def test_builder_espeak_resume_renders_a_missing_file_as_a_fresh_build_would(tmp_path):
    """Speaking rates are drawn for every file whether or not it exists: a file removed from a finished build (an
    interrupted one, a deleted one) is rendered again with its own rate, byte for byte as before."""
    import random

    build = _builder()
    spec = {"espeak_languages": ["en", "de"]}
    items = build.espeak_items(spec, tmp_path, random.Random(0))
    before = {i.key: Path(i.path).read_bytes() for i in items}
    for i in items[1:7:2]:
        Path(i.path).unlink()
    again = build.espeak_items(spec, tmp_path, random.Random(0))
    assert again == items and {i.key: Path(i.path).read_bytes() for i in again} == before


@pytest.mark.parametrize("text, expected", [("sox:      SoX v14.4.2", "14.4.2"), ("FluidSynth runtime version 2.3.1\n"
    "Copyright (C) 2000-2022 Peter Hanappe", "2.3.1"), ("eSpeak NG text-to-speech: 1.51  Data at: /usr/lib/x86_64-linux"
    "-gnu/espeak-ng-data", "1.51"), ("no version here", "unknown"), ("build 7", "unknown")])  # fmt: skip
def test_parse_tool_version(text, expected):
    assert C.parse_tool_version(text) == expected


# ------------------------------------------------------------------------------------------- agreement
@pytest.fixture(scope="module")
def esc_teacher_scores(yamnet, data_dir):
    """YAMNet's patch scores on 24 real ESC-10 clips (10 patches each at most) and each patch's clip id."""
    files = sorted((data_dir / "esc10" / "audio").glob("1-*.flac"))[:24]
    parts = [C.label_waveform(audio.load(f), yamnet, 10)["scores"].astype(np.float32) for f in files]
    return np.concatenate(parts), np.concatenate([np.full(len(p), 100 + 3 * i) for i, p in enumerate(parts)])


def _clips_shuffled(scores: np.ndarray, files: np.ndarray) -> np.ndarray:
    """Each clip's patches given another clip's scores (a student that hears the wrong clip)."""
    ids = np.unique(files)
    donor = dict(zip(ids, np.roll(ids, 5)))
    out = scores.copy()
    for clip in ids:
        mine, theirs = np.flatnonzero(files == clip), np.flatnonzero(files == donor[clip])
        out[mine] = scores[theirs[np.arange(len(mine)) % len(theirs)]]
    return out


def test_teacher_agreement_is_perfect_for_the_teacher_and_low_for_the_wrong_clips(esc_teacher_scores):
    scores, files = esc_teacher_scores
    itself = C.teacher_agreement(scores, scores, files)
    assert itself["clips"] == 24 and itself["patches"] == len(scores)
    assert itself["patch_top1"] == itself["clip_top1"] == itself["clip_top5"] == 1.0
    assert 0.95 < itself["clip_mAP_top3"] <= 1.0  # below 1 only by ties: the teacher's scores are quantised
    wrong = C.teacher_agreement(_clips_shuffled(scores, files), scores, files)
    assert wrong["clip_top1"] < 0.5 and wrong["clip_mAP_top3"] < 0.6, wrong


def test_agreement_difference_is_paired_and_antisymmetric(esc_teacher_scores):
    """The paired bootstrap of the mAP difference: zero against itself, clearly positive for the teacher against
    a student that hears the wrong clips, and the same figures negated when the two are swapped."""
    scores, files = esc_teacher_scores
    wrong = _clips_shuffled(scores, files)
    same = C.agreement_difference(wrong, wrong, scores, files, resamples=200)
    assert same["difference"] == 0.0 and same["interval"] == [0.0, 0.0]
    better = C.agreement_difference(scores, wrong, scores, files, resamples=200)
    mean_ap = {name: C.teacher_agreement(x, scores, files)["clip_mAP_top3"] for name, x in (("a", scores), ("b", wrong))}
    expected = mean_ap["a"] - mean_ap["b"]
    assert better["difference"] == pytest.approx(expected, abs=1e-6)
    assert 0 < better["interval"][0] <= better["difference"] <= better["interval"][1] <= 1
    worse = C.agreement_difference(wrong, scores, scores, files, resamples=200)
    assert worse["difference"] == pytest.approx(-better["difference"], abs=1e-9)
    assert worse["interval"] == pytest.approx([-better["interval"][1], -better["interval"][0]], abs=1e-9)
