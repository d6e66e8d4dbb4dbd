"""Build the default model's distillation corpus (see ``recipes/default_model.yaml``); run from the repository root.

    python recipes/default_model/build_corpus.py recipes/default_model.yaml [--stage all|label|mix|shard]

Stages: list sources (Debian packages via apt-get download + dpkg -x, shared folders, synthesis), label every
file with YAMNet (per-file cache, resumable), label effect-over-bed mixtures, then write shards, the per-file
manifest (package, version, licence, split) and the corpus table. One onnxruntime thread; run it niced.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import shutil
import subprocess
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from tympan.data import corpus as C
from tympan.teachers.yamnet import MIN_SAMPLES, PATCH_HOP_SAMPLES, YAMNet

ENV_GROUPS = {C.GROUPS.index(g) for g in ("animal", "nature", "vehicle", "domestic", "alarm", "tools", "impacts", "human")}
BED_GROUPS = {C.GROUPS.index(g) for g in ("speech", "music", "nature")}


def log(*args: Any) -> None:
    print(time.strftime("%H:%M:%S"), *args, flush=True)


def package_items(spec: dict[str, Any], root: Path, rng: random.Random) -> list[C.AudioItem]:
    """Audio items of one package entry, each with the licence from the package's copyright file."""
    package = C.fetch_package(spec["name"], root)
    copyright = package.copyright
    files = C.find_audio(package.root, spec.get("include", ()), spec.get("exclude", ()), spec.get("zips", ()))
    if spec.get("max_files") and len(files) > spec["max_files"]:
        files = sorted(rng.sample(files, spec["max_files"]))
    items = []
    for relative, path in files:
        license_name = C.license_for(copyright, relative) if copyright.machine_readable else None
        if license_name is None:
            license_name = spec.get("license") or copyright.header_license
        if not license_name:
            raise SystemExit(f"{spec['name']}: no licence for {relative}; set `license` in the recipe after checking")
        items.append(C.AudioItem(f"{spec['name']}:{relative}", spec["name"], package.version, license_name, path))
    return items


def shared_items(spec: dict[str, Any], rng: random.Random) -> list[C.AudioItem]:
    files = C.find_audio(spec["dir"], spec.get("include", ()), spec.get("exclude", ()))
    if spec.get("max_files") and len(files) > spec["max_files"]:
        files = sorted(rng.sample(files, spec["max_files"]))
    return [C.AudioItem(f"{spec['name']}:{rel}", spec["name"], "shared", spec["license"], path) for rel, path in files]


def synth_items(spec: dict[str, Any], root: Path, rng: random.Random) -> list[C.AudioItem]:
    """Synthetic audio (minor share): General MIDI programs through fluidsynth, espeak-ng speech, sox sounds, each
    when its tool is installed. Each item's version names the tool that rendered it (for sox also its repeatable
    mode), so a new tool, or sox files rendered before ``-R``, are labelled again."""
    out = root / "synth"
    out.mkdir(parents=True, exist_ok=True)
    items: list[C.AudioItem] = []
    if shutil.which("fluidsynth"):
        items += midi_items(spec, root, out)
    if shutil.which("espeak-ng"):
        items += espeak_items(spec, out, rng)
    if shutil.which("sox"):
        items += sox_items(spec, out)
    return items


def midi_items(spec: dict[str, Any], root: Path, out: Path) -> list[C.AudioItem]:
    """Every General MIDI program (and the drum kit) rendered by fluidsynth with the recipe's soundfont package."""
    sf_package = C.fetch_package(spec["soundfont_package"], root)
    version = f"{sf_package.version}; fluidsynth {C.tool_version('fluidsynth')}"
    license_name = f"generated; soundfont {spec['soundfont_package']} ({sf_package.copyright.header_license or 'MIT'})"
    soundfont = next(sf_package.root.rglob("FluidR3_GM.sf2"))
    items = []
    for program in range(spec["midi_programs"] + 1):
        drums = program == spec["midi_programs"]
        midi, wav = out / f"gm_{program:03d}.mid", out / f"gm_{program:03d}.wav"
        if not wav.exists():
            midi.write_bytes(C.general_midi_file(program, drums=drums, seed=program))
            subprocess.run(["fluidsynth", "-ni", "-g", "0.8", "-r", "16000", "-F", str(wav), str(soundfont), str(midi)],
                           check=True, capture_output=True)  # fmt: skip
        items.append(C.AudioItem(f"synth:gm/{program:03d}", "synth-fluidsynth", version, license_name, str(wav)))
    return items


def espeak_items(spec: dict[str, Any], out: Path, rng: random.Random) -> list[C.AudioItem]:
    """Four sentences in each of the recipe's espeak-ng languages, each at a speaking rate drawn from `rng`. The
    rates are drawn whether or not a file exists, so a build that resumes renders a missing file as a fresh build
    would."""
    version = C.tool_version("espeak-ng")
    sentences = ["The quick brown fox jumps over the lazy dog.", "Please leave a message after the tone.",
                 "One two three four five six seven eight nine ten.", "Where is the railway station?"]  # fmt: skip
    items = []
    for lang in spec["espeak_languages"]:
        rates = [rng.randint(130, 190) for _ in sentences]
        for i, (text, rate) in enumerate(zip(sentences, rates)):
            wav = out / f"espeak_{lang}_{i}.wav"
            if not wav.exists():
                subprocess.run(["espeak-ng", "-v", lang, "-s", str(rate), "-w", str(wav), text], check=True,
                               capture_output=True)  # fmt: skip
            items.append(C.AudioItem(f"synth:espeak/{lang}/{i}", "synth-espeak-ng", version, "generated (espeak-ng)",
                                     str(wav)))  # fmt: skip
    return items


def sox_items(spec: dict[str, Any], out: Path) -> list[C.AudioItem]:
    """The recipe's sox sounds (:func:`tympan.data.corpus.sox_recipes`), rendered repeatably; a file's name carries
    a digest of its command line, so a changed command renders it afresh instead of reusing an old file."""
    version = f"{C.tool_version('sox')} -R"
    items = []
    for i, args in enumerate(C.sox_recipes(spec["sox_sounds"], seed=0)):
        digest = hashlib.sha256(" ".join(C.sox_command(args, "-")).encode()).hexdigest()[:8]
        wav = out / f"sox_{i:03d}_{digest}.wav"
        if not wav.exists():
            subprocess.run(C.sox_command(args, wav), check=True, capture_output=True)
        items.append(C.AudioItem(f"synth:sox/{i}", "synth-sox", version, "generated (sox)", str(wav)))
    return items


def list_items(cfg: dict[str, Any]) -> list[tuple[C.AudioItem, int]]:
    root = Path(cfg["root"])
    rng = random.Random(cfg["seed"])
    items: list[tuple[C.AudioItem, int]] = []
    for spec in cfg["packages"]:
        found = package_items(spec, root, rng)
        log(f"{spec['name']}{'/' + spec['tag'] if spec.get('tag') else ''}: {len(found)} files")
        items += [(item, spec["max_patches"]) for item in found]
    for spec in cfg["shared"]:
        found = shared_items(spec, rng)
        log(f"{spec['name']}: {len(found)} files")
        items += [(item, spec["max_patches"]) for item in found]
    if cfg.get("synth"):
        found = synth_items(cfg["synth"], root, rng)
        log(f"synthetic: {len(found)} files")
        items += [(item, cfg["synth"]["max_patches"]) for item in found]
    return items


def label_all(items: list[tuple[C.AudioItem, int]], cache: C.LabelCache, teacher: YAMNet, heldout: float,
              seed: int, first: list[str] = ()) -> None:  # fmt: skip
    """Label every item not in the cache yet. Sources named in `first` go first (scarce environmental sound); the
    rest are interleaved round-robin over sources in a seeded random order, so a run stopped at any point has
    labelled a balanced sample of every source."""
    rng = random.Random(seed)
    per_source: dict[str, list[int]] = defaultdict(list)
    for n, (item, _) in enumerate(items):
        per_source[item.source].append(n)
    rank = {}
    for source, members in per_source.items():
        order = members[:]
        rng.shuffle(order)
        rank.update({n: r for r, n in enumerate(order)})
    order = sorted(range(len(items)), key=lambda n: (items[n][0].source not in first, rank[n], n))
    todo = [items[n] for n in order if not _labelled(cache, *items[n])]
    log(f"labelling {len(todo)} of {len(items)} files")
    for n, (item, cap) in enumerate(todo):
        try:
            waveform = C.decode_bytes(item.read_bytes())
        except Exception as err:  # noqa: BLE001 (a file libsndfile cannot read is reported and skipped)
            log(f"skip {item.key}: {err}")
            continue
        if len(waveform) < 1600 or float(np.abs(waveform).max()) < 1e-4:
            log(f"skip {item.key}: too short or silent")
            continue
        arrays = C.label_waveform(waveform, teacher, cap)
        cache.put(item, arrays, {"seconds": len(waveform) / C.SAMPLE_RATE, "split": C.split_of(item.key, heldout, seed),
                                 "max_patches": cap})  # fmt: skip
        if n % 200 == 0:
            log(f"  {n}/{len(todo)} {item.key}")


def _labelled(cache: C.LabelCache, item: C.AudioItem, cap: int) -> bool:
    """In the cache, from the same version of its source, with at least `cap` patches kept (or all of a shorter
    file): a new package version or a raised cap relabels the file."""
    if not cache.has(item.key):
        return False
    meta, arrays = cache.get(item.key, ["index"])
    if meta.get("version") != item.version:
        return False
    samples = max(round(meta["seconds"] * C.SAMPLE_RATE), MIN_SAMPLES)
    total = 1 + -(-(samples - MIN_SAMPLES) // PATCH_HOP_SAMPLES)  # patches in the whole file
    return len(arrays["index"]) >= min(cap, total)


def mixture_sources(items: list[tuple[C.AudioItem, int]], cache: C.LabelCache) -> tuple[list[C.AudioItem], list[C.AudioItem]]:
    """Labelled training files whose patches fall mostly in an environmental group (effects) or in speech, music or
    nature and that last at least 2 s (beds), in the recipe's item order."""
    effects, beds = [], []
    for item, _ in items:
        if not cache.has(item.key):
            continue
        meta, arrays = cache.get(item.key, ["scores"])
        if meta["split"] != "train":
            continue
        group = np.bincount(C.patch_groups(arrays["scores"]), minlength=len(C.GROUPS)).argmax()
        if group in ENV_GROUPS:
            effects.append(item)
        if group in BED_GROUPS and meta["seconds"] >= 2.0:
            beds.append(item)
    return effects, beds


def mix_all(items: list[tuple[C.AudioItem, int]], cache: C.LabelCache, teacher: YAMNet | None,
            cfg: dict[str, Any]) -> list[str]:  # fmt: skip
    """Effects over beds (training files only), labelled by the teacher; returns this recipe's mixture keys.

    Mixture ``i`` draws everything from its own generator seeded by ``(seed + 1, i)``, so a run that stops and
    resumes (mixtures already in the cache are skipped) builds exactly the mixtures an uninterrupted run would; its
    effect and bed are rendezvous picks (:func:`tympan.data.corpus.rendezvous_pick`), so a file that joins or leaves
    the effect or bed list (its teacher label moved) changes only the mixtures that file wins. A mixture is mixed and
    labelled again when either file's version changed. With
    ``teacher=None`` nothing is labelled: only the keys (for ``--stage shard``)."""
    spec = cfg["mixtures"]
    effects, beds = mixture_sources(items, cache)
    log(f"mixtures: {len(effects)} effects, {len(beds)} beds")
    if not effects or not beds:
        return []
    length = MIN_SAMPLES + (spec["patches"] - 1) * PATCH_HOP_SAMPLES
    decoded: dict[str, np.ndarray] = {}

    def audio(item: C.AudioItem) -> np.ndarray:
        if item.key not in decoded:
            if len(decoded) > 400:
                decoded.pop(next(iter(decoded)))
            decoded[item.key] = C.decode_bytes(item.read_bytes())
        return decoded[item.key]

    effect_hashes, bed_hashes = C.key_hashes([e.key for e in effects]), C.key_hashes([b.key for b in beds])
    keys = []
    for i in range(spec["count"]):
        rng = np.random.default_rng([cfg["seed"] + 1, i])
        effect = effects[C.rendezvous_pick(effect_hashes, int(rng.integers(2**63)))]
        bed = beds[C.rendezvous_pick(bed_hashes, int(rng.integers(2**63)))]
        snr = float(rng.uniform(*spec["snr_db"]))
        key = f"mix:{i}:{effect.key}+{bed.key}"
        keys.append(key)
        versions = [effect.version, bed.version]
        if teacher is None or (cache.has(key) and cache.meta(key).get("versions") == versions):
            continue  # labelled already, from the same versions of its two files
        e, b = audio(effect), audio(bed)
        start = int(rng.integers(0, max(1, len(b) - length)))
        bed_cut = np.pad(b[start : start + length], (0, max(0, length - len(b[start : start + length]))))
        e_start = int(rng.integers(0, max(1, len(e) - length // 2)))
        offset = int(rng.integers(0, length // 2))
        mixed = C.mix_waveforms(e[e_start:], bed_cut, snr, offset)
        item = C.AudioItem(key, "mixture", "-", f"mixture of {effect.key} [{effect.license}] and {bed.key} [{bed.license}]",
                           f"{effect.path} + {bed.path}")  # fmt: skip
        extra = {"seconds": length / C.SAMPLE_RATE, "split": "train", "snr_db": snr, "versions": versions}
        cache.put(item, C.label_waveform(mixed, teacher, spec["patches"]), extra)
        if i % 500 == 0:
            log(f"  mixture {i}/{spec['count']}")
    return keys


def write_all(items: list[tuple[C.AudioItem, int]], cache: C.LabelCache, cfg: dict[str, Any],
              mixture_keys: list[str]) -> None:  # fmt: skip
    """Shards, manifest and corpus table of this recipe's files and mixtures (other entries of a shared label cache,
    e.g. another recipe's mixtures, are left out). A file's source, version and licence are the recipe's now, not
    what the cache recorded when it was labelled (a licence corrected in the recipe reaches the manifest)."""
    keys = [item.key for item, _ in items] + list(mixture_keys)
    current = {item.key: item for item, _ in items}
    per_split: dict[str, dict[str, list[np.ndarray]]] = defaultdict(lambda: defaultdict(list))
    manifest, table = [], defaultdict(lambda: {"files": 0, "seconds": 0.0, "patches": 0, "licenses": Counter(),
                                                "groups": Counter()})  # fmt: skip
    file_ids: dict[str, int] = {}
    for key in keys:
        if not cache.has(key):
            continue
        meta, arrays = cache.get(key)
        if key in current:
            item = current[key]
            meta = {**meta, "source": item.source, "version": item.version, "license": item.license}
        split = meta["split"]
        fid = file_ids.setdefault(key, len(file_ids))
        groups = C.patch_groups(arrays["scores"])
        for name in ("patches", "scores", "embeddings"):
            per_split[split][name].append(arrays[name])
        per_split[split]["file_id"].append(np.full(len(groups), fid, dtype=np.int32))
        per_split[split]["group"].append(groups.astype(np.int8))
        manifest.append({"id": fid, "key": key, "source": meta["source"], "version": meta["version"],
                         "license": meta["license"], "seconds": round(meta["seconds"], 3), "split": split,
                         "patches": int(len(groups))})  # fmt: skip
        row = table[meta["source"]]
        row["files"] += 1
        row["seconds"] += meta["seconds"]
        row["patches"] += len(groups)
        row["licenses"][meta["license"] if meta["source"] != "mixture" else "mixture of the above"] += 1
        row["groups"].update(C.GROUPS[g] for g in groups)
    out = Path(cfg["shards"])
    if out.exists():
        shutil.rmtree(out)
    for split, parts in per_split.items():
        arrays = {k: np.concatenate(v) for k, v in parts.items()}
        names = C.write_shards(out, arrays, split)
        log(f"{split}: {len(arrays['group'])} patches in {len(names)} shards")
    (out / "manifest.json").write_text(json.dumps(manifest, indent=0))
    rows = []
    for source, row in sorted(table.items(), key=lambda kv: -kv[1]["seconds"]):
        top = ", ".join(f"{g} {n}" for g, n in row["groups"].most_common(4))
        lic = "; ".join(f"{name}" for name, _ in row["licenses"].most_common(3))
        rows.append(f"| {source} | {lic} | {row['files']} | {row['seconds'] / 3600:.2f} | {row['patches']} | {top} |")
    totals = {g: sum(r["groups"][g] for r in table.values()) for g in C.GROUPS}
    text = ("| source | licence | files | hours | patches | top groups (patches) |\n|---|---|---|---|---|---|\n"
            + "\n".join(rows) + "\n\nPatches per group: " + ", ".join(f"{g} {n}" for g, n in totals.items()) + "\n")  # fmt: skip
    (out / "corpus_table.md").write_text(text)
    log("\n" + text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("recipe")
    parser.add_argument("--stage", default="all", choices=["all", "label", "mix", "shard"])
    args = parser.parse_args(argv)
    cfg = yaml.safe_load(Path(args.recipe).read_text())["corpus"]
    cache = C.LabelCache(Path(cfg["root"]))
    items = list_items(cfg)
    teacher = YAMNet(cfg["teacher"], num_threads=1, batch_size=64)
    if args.stage in ("all", "label"):
        label_all(items, cache, teacher, cfg["heldout_fraction"], cfg["seed"], cfg.get("label_first", []))
    mixture_keys = mix_all(items, cache, teacher if args.stage in ("all", "mix") else None, cfg)
    if args.stage in ("all", "shard"):
        write_all(items, cache, cfg, mixture_keys)
    return 0


if __name__ == "__main__":
    sys.exit(main())
