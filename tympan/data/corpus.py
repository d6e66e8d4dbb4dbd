"""Distillation corpus from clearly licensed audio: Debian packages, shared effect sets and a little synthesis.

The builder (``recipes/default_model/build_corpus.py``) drives these pieces:

1. :func:`fetch_package` runs ``apt-get download`` + ``dpkg -x`` (no system install) and reads the package's
   version and its ``debian/copyright`` file, parsed by :func:`parse_copyright` (DEP-5 machine-readable format);
   :func:`license_for` gives each audio file's licence (the last matching ``Files`` paragraph wins, as DEP-5 says).
2. :func:`find_audio` lists audio files on disk and inside zip archives (0 A.D. keeps its sounds in ``public.zip``);
   :func:`decode_bytes` decodes them to 16 kHz mono float32 (libsndfile + soxr).
3. :func:`label_waveform` cuts YAMNet's 0.96 s log-mel patches (hop 0.48 s), keeps at most ``max_patches`` per file
   (evenly spaced) and stores the teacher's per-patch class scores and 1024-d embeddings (float16) in a resumable
   per-file cache (:class:`LabelCache`).
4. :func:`mix_waveforms` overlays an effect on a bed (speech, music, ambience) at a chosen SNR; mixtures are
   labelled by the teacher like any other file, which multiplies the scarce environmental hours.
5. :func:`split_of` puts each *source file* in ``train`` or ``heldout`` by a hash of its key, so held-out agreement
   figures come from files never trained on; :func:`group_weights` balances AudioSet's top-level groups
   (by the teacher's top class per patch) when sampling; :func:`write_shards` writes npz shards plus a manifest.
"""

from __future__ import annotations

import fnmatch
import hashlib
import io
import json
import os
import re
import subprocess
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "AUDIO_EXTENSIONS",
    "GROUPS",
    "AudioItem",
    "CopyrightParagraph",
    "DebianCopyright",
    "LabelCache",
    "Package",
    "agreement_difference",
    "class_groups",
    "decode_bytes",
    "fetch_package",
    "find_audio",
    "group_weights",
    "key_hashes",
    "label_waveform",
    "license_for",
    "load_shards",
    "mix_waveforms",
    "parse_copyright",
    "parse_tool_version",
    "patch_groups",
    "render_copyright",
    "rendezvous_pick",
    "select_patches",
    "split_of",
    "teacher_agreement",
    "tool_version",
    "write_shards",
]

SAMPLE_RATE = 16000
AUDIO_EXTENSIONS = (".wav", ".ogg", ".oga", ".flac", ".mp3")

# AudioSet top-level groups over YAMNet's 521 classes (its class map follows the ontology's order).
GROUPS = ("speech", "human", "animal", "music", "nature", "vehicle", "domestic", "alarm", "tools", "impacts", "other")
_GROUP_RANGES = (
    (0, 5, "speech"), (6, 11, "human"), (12, 12, "speech"), (13, 66, "human"), (67, 131, "animal"),
    (132, 276, "music"), (277, 293, "nature"), (294, 347, "vehicle"), (348, 381, "domestic"), (382, 397, "alarm"),
    (398, 419, "tools"), (420, 493, "impacts"), (494, 520, "other"),
)  # fmt: skip


def class_groups(num_classes: int = 521) -> np.ndarray:
    """``[521]`` group index (into :data:`GROUPS`) of each YAMNet class."""
    out = np.full(num_classes, -1, dtype=np.int64)
    for first, last, name in _GROUP_RANGES:
        out[first : last + 1] = GROUPS.index(name)
    if (out < 0).any():
        raise ValueError(f"group table does not cover {num_classes} classes")
    return out


def patch_groups(scores: np.ndarray) -> np.ndarray:
    """Group of each patch ``[n, 521] -> [n]``: the group of the teacher's top class, skipping the generic
    classes (Speech/Music/Animal... stay; 'other' only when nothing else scores higher)."""
    groups = class_groups(scores.shape[-1])
    return groups[np.asarray(scores, dtype=np.float32).argmax(-1)]


# ----------------------------------------------------------------------------------- Debian copyright (DEP-5)
@dataclass(frozen=True)
class CopyrightParagraph:
    """One ``Files`` paragraph of a DEP-5 copyright file."""

    files: tuple[str, ...]
    license: str  # the short name (first line of the License field)
    copyright: str = ""


@dataclass(frozen=True)
class DebianCopyright:
    """A parsed ``debian/copyright``: its ``Files`` paragraphs in order and whether it is machine-readable."""

    machine_readable: bool
    paragraphs: tuple[CopyrightParagraph, ...]
    header_license: str | None = None


def _paragraphs(text: str) -> Iterator[dict[str, str]]:
    """RFC-822-style stanzas: ``Field: value`` lines, continuation lines start with white space."""
    for block in re.split(r"\n[ \t]*\n", text.replace("\r\n", "\n")):
        fields: dict[str, str] = {}
        current: str | None = None
        for line in block.split("\n"):
            if not line.strip() or line.startswith("#"):
                continue
            if line[0] in " \t":
                if current is not None:
                    fields[current] += "\n" + line.strip()
                continue
            name, sep, value = line.partition(":")
            if not sep:
                current = None
                continue
            current = name.strip().lower()
            fields[current] = value.strip()
        if fields:
            yield fields


def parse_copyright(text: str) -> DebianCopyright:
    """Parse a Debian copyright file; non-DEP-5 files give ``machine_readable=False`` and no paragraphs."""
    stanzas = list(_paragraphs(text))
    if not stanzas or "format" not in stanzas[0]:
        return DebianCopyright(False, ())
    header = stanzas[0]
    header_license = header["license"].split("\n")[0].strip() if "license" in header else None
    paragraphs = []
    for stanza in stanzas[1:]:
        if "files" not in stanza:
            continue
        patterns = tuple(stanza["files"].split())
        license_name = stanza.get("license", "").split("\n")[0].strip()
        paragraphs.append(CopyrightParagraph(patterns, license_name, stanza.get("copyright", "")))
    return DebianCopyright(True, tuple(paragraphs), header_license)


def render_copyright(copyright: DebianCopyright) -> str:
    """DEP-5 text of `copyright` (inverse of :func:`parse_copyright` for what it keeps)."""
    lines = ["Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/"]
    if copyright.header_license:
        lines.append(f"License: {copyright.header_license}")
    for p in copyright.paragraphs:
        lines += ["", "Files: " + "\n ".join(p.files)]
        if p.copyright:
            lines.append("Copyright: " + "\n ".join(p.copyright.split("\n")))
        lines.append(f"License: {p.license}")
    return "\n".join(lines) + "\n"


def _dep5_regex(pattern: str) -> str:
    """DEP-5 glob as a regex: ``*`` matches any characters including ``/``, ``?`` one character; no other
    metacharacters."""
    return "".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern)


@lru_cache(maxsize=4096)
def _paragraph_regex(patterns: tuple[str, ...]) -> re.Pattern[str]:
    """One compiled regex per ``Files`` paragraph that matches a path when any pattern matches the path or one of
    its suffixes after a ``/`` (compiled once: a package's paragraphs are matched against thousands of paths)."""
    return re.compile("(?:.*/)?(?:" + "|".join(_dep5_regex(p) for p in patterns) + ")", flags=re.DOTALL)


def license_for(copyright: DebianCopyright, path: str) -> str | None:
    """Licence of `path` (a source-tree path or an installed path such as ``usr/share/games/x/sounds/a.ogg``).

    Installed paths differ from source paths, so every suffix of `path` (after a ``/``) is tried; the last
    matching paragraph wins (DEP-5). ``None`` when the file is not machine-readable or nothing matches.
    """
    path = re.sub(r"^(?:\./|/)+", "", path)  # "./a/b.ogg", "/a/b.ogg" -> "a/b.ogg" (".a/b.ogg" stays)
    for paragraph in reversed(copyright.paragraphs):
        if paragraph.files and _paragraph_regex(paragraph.files).fullmatch(path):
            return paragraph.license
    return None


# ----------------------------------------------------------------------------------- packages and audio files
@dataclass(frozen=True)
class Package:
    """A Debian package unpacked under ``root`` (with ``dpkg -x``), its version and parsed copyright file."""

    name: str
    version: str
    root: Path
    copyright_text: str

    @property
    def copyright(self) -> DebianCopyright:
        return parse_copyright(self.copyright_text)


def fetch_package(name: str, cache: str | os.PathLike) -> Package:
    """``apt-get download`` the package into ``cache/debs`` and ``dpkg -x`` it into ``cache/pkgs/<name>`` (both
    skipped when already done). Needs only apt's package lists, not root."""
    cache = Path(cache)
    debs, root = cache / "debs", cache / "pkgs" / name
    debs.mkdir(parents=True, exist_ok=True)
    candidates = sorted(debs.glob(f"{name}_*.deb"))
    if not candidates:
        subprocess.run(["apt-get", "download", name], cwd=debs, check=True, capture_output=True)
        candidates = sorted(debs.glob(f"{name}_*.deb"))
    deb = candidates[-1]
    version = subprocess.run(["dpkg-deb", "-f", str(deb), "Version"], check=True, capture_output=True,
                             text=True).stdout.strip()  # fmt: skip
    marker = root / ".extracted"
    if not marker.exists():
        root.mkdir(parents=True, exist_ok=True)
        subprocess.run(["dpkg", "-x", str(deb), str(root)], check=True)
        marker.write_text(version)
    copyright_path = root / "usr" / "share" / "doc" / name / "copyright"
    text = copyright_path.read_text(errors="replace") if copyright_path.is_file() else ""
    return Package(name, version, root, text)


@dataclass(frozen=True)
class AudioItem:
    """One audio file: where it lives (a file, or a member of a zip archive) and its provenance."""

    key: str  # stable id, e.g. "0ad-data:audio/ambient/weather/rain.ogg"
    source: str  # package name or shared set
    version: str
    license: str
    path: str  # file path, or "archive.zip::member"

    def read_bytes(self) -> bytes:
        if "::" in self.path:
            archive, member = self.path.split("::", 1)
            return _open_zip(archive).read(member)
        return Path(self.path).read_bytes()


@lru_cache(maxsize=4)
def _open_zip(path: str) -> zipfile.ZipFile:
    """Zip archives stay open: reading the directory of 0 A.D.'s 3 GB ``public.zip`` takes half a second."""
    return zipfile.ZipFile(path)


def _selected(relative: str, include: Sequence[str], exclude: Sequence[str]) -> bool:
    if include and not any(fnmatch.fnmatch(relative, p) for p in include):
        return False
    return not any(fnmatch.fnmatch(relative, p) for p in exclude)


def find_audio(root: str | os.PathLike, include: Sequence[str] = (), exclude: Sequence[str] = (),
               zips: Sequence[str] = ()) -> list[tuple[str, str]]:  # fmt: skip
    """``(relative name, readable path)`` of audio files under `root` and inside the listed zip archives
    (relative to `root`), filtered by shell patterns on the relative name; sorted for determinism."""
    root = Path(root)
    found: list[tuple[str, str]] = []
    for path in sorted(root.rglob("*")):
        if path.suffix.lower() in AUDIO_EXTENSIONS and path.is_file():
            relative = path.relative_to(root).as_posix()
            if _selected(relative, include, exclude):
                found.append((relative, str(path)))
    for archive in zips:
        with zipfile.ZipFile(root / archive) as z:
            for member in sorted(z.namelist()):
                if Path(member).suffix.lower() in AUDIO_EXTENSIONS and _selected(member, include, exclude):
                    found.append((member, f"{root / archive}::{member}"))
    return found


def decode_bytes(data: bytes, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Encoded audio (WAV/OGG/FLAC/MP3) -> float32 mono at `sample_rate` (libsndfile, soxr HQ)."""
    import soundfile as sf

    from tympan.audio import from_array

    samples, rate = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
    if samples.shape[0] == 0:
        raise ValueError("empty audio")
    return from_array(samples.T, rate, sample_rate)


def split_of(key: str, heldout_fraction: float, seed: int = 0) -> str:
    """``"heldout"`` or ``"train"`` for a source file, from a hash of its key (stable across machines)."""
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return "heldout" if int.from_bytes(digest[:8], "big") / 2**64 < heldout_fraction else "train"


def key_hashes(keys: Sequence[str]) -> np.ndarray:
    """A stable 64-bit hash of each key (``uint64 [len(keys)]``), for :func:`rendezvous_pick`."""
    return np.array([int.from_bytes(hashlib.sha256(k.encode()).digest()[:8], "little") for k in keys], dtype=np.uint64)


def _mix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser: a bijection of uint64 whose output bits each depend on every input bit."""
    with np.errstate(over="ignore"):
        x = x + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def rendezvous_pick(hashes: np.ndarray, draw: int) -> int:
    """Index of the item that wins draw `draw` (highest ``mix(hash ^ draw)``; ``hashes`` from :func:`key_hashes`).

    Uniform over the items like ``rng.integers(len(items))``, but stable under changes to the list: adding or
    removing one item changes only the draws that item wins (about 1/n of them), where an index into the list would
    shift every later item and change most draws. The corpus builder picks each mixture's effect and bed this way,
    so a file whose teacher label moves it in or out of the effect list does not redraw every mixture."""
    return int(np.argmax(_mix64(hashes ^ np.uint64(draw))))


# ------------------------------------------------------------------------------------------- labelling
def select_patches(num_patches: int, max_patches: int) -> np.ndarray:
    """Indices of at most `max_patches` patches, evenly spaced over the file (all of them when it is short)."""
    if num_patches <= max_patches:
        return np.arange(num_patches)
    return np.unique(np.linspace(0, num_patches - 1, max_patches).round().astype(np.int64))


def mix_waveforms(effect: np.ndarray, bed: np.ndarray, snr_db: float, offset: int = 0) -> np.ndarray:
    """`effect` added to `bed` (at sample `offset`) so that their RMS ratio is `snr_db`; the result has the bed's
    length and is scaled down when it would clip."""
    out = bed.astype(np.float32).copy()
    piece = effect[: max(0, len(out) - offset)].astype(np.float32)
    rms_e = float(np.sqrt(np.mean(piece**2))) if len(piece) else 0.0
    rms_b = float(np.sqrt(np.mean(out**2)))
    if rms_e > 0 and rms_b > 0:
        piece = piece * (rms_b * 10 ** (snr_db / 20) / rms_e)
    out[offset : offset + len(piece)] += piece
    peak = float(np.abs(out).max()) if len(out) else 0.0
    return out / peak * 0.99 if peak > 0.99 else out


def label_waveform(waveform: np.ndarray, teacher: Any, max_patches: int) -> dict[str, np.ndarray]:
    """YAMNet log-mel patches of `waveform` (at most `max_patches`, evenly spaced) with the teacher's per-patch
    scores and embeddings, all float16: ``patches [n, 96, 64]``, ``scores [n, 521]``, ``embeddings [n, 1024]``,
    ``index [n]`` (patch number in the file)."""
    from tympan.teachers.yamnet import log_mel_patches

    patches = log_mel_patches(waveform)
    index = select_patches(len(patches), max_patches)
    patches = patches[index]
    scores, embeddings = teacher.run(patches)
    return {"patches": patches[:, 0].astype(np.float16), "scores": scores.astype(np.float16),
            "embeddings": embeddings.astype(np.float16), "index": index}  # fmt: skip


def _key_file(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()[:24]


@dataclass
class LabelCache:
    """Per-file teacher outputs under ``root/labels/<hash>.npz`` with the item's provenance inside, so a
    builder run that stops can resume (files already labelled are not decoded or labelled again)."""

    root: Path
    _seen: set[str] = field(default_factory=set)

    def __post_init__(self) -> None:
        self.root = Path(self.root)
        (self.root / "labels").mkdir(parents=True, exist_ok=True)

    def path(self, key: str) -> Path:
        return self.root / "labels" / f"{_key_file(key)}.npz"

    def has(self, key: str) -> bool:
        return self.path(key).exists()

    def put(self, item: AudioItem, arrays: dict[str, np.ndarray], extra: dict[str, Any]) -> None:
        meta = json.dumps({**asdict(item), **extra})
        tmp = self.path(item.key).with_suffix(".tmp.npz")
        np.savez(tmp, meta=np.array(meta), **arrays)
        tmp.replace(self.path(item.key))

    def get(self, key: str, names: Sequence[str] | None = None) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """Provenance and arrays of `key`: all of them, or only `names` (the others are not read: a check that
        needs one array reads a fifth of the file's time)."""
        with np.load(self.path(key)) as z:
            wanted = [k for k in z.files if k != "meta"] if names is None else list(names)
            arrays = {k: z[k] for k in wanted}
            meta = json.loads(str(z["meta"]))
        return meta, arrays

    def meta(self, key: str) -> dict[str, Any]:
        """The entry's provenance alone (its arrays are not read: a third of the time of :meth:`get`)."""
        return self.get(key, ())[0]


# ------------------------------------------------------------------------------------------- balancing, shards
def group_weights(groups: np.ndarray, power: float = 0.5, exclude: Sequence[int] = ()) -> np.ndarray:
    """Sampling weight of each patch so that group ``g`` with ``n_g`` patches gets a share ``∝ n_g ** power``
    (``power=0``: equal shares per group, 1: as found); weights sum to 1. Groups in `exclude` get weight 0."""
    groups = np.asarray(groups)
    counts = np.bincount(groups, minlength=len(GROUPS)).astype(np.float64)
    share = np.where(counts > 0, counts**power, 0.0)
    share[list(exclude)] = 0.0
    if share.sum() == 0:
        raise ValueError("no patch in any group that may be sampled")
    per_patch = share[groups] / np.maximum(counts[groups], 1)
    return per_patch / per_patch.sum()


def write_shards(out_dir: str | os.PathLike, arrays: dict[str, np.ndarray], split: str,
                 shard_size: int = 8192) -> list[str]:  # fmt: skip
    """Write equal-length `arrays` (first axis = patches) as ``{split}-NNNN.npz`` shards; returns their names."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    lengths = {len(v) for v in arrays.values()}
    if len(lengths) != 1:
        raise ValueError(f"arrays of different lengths: {sorted(lengths)}")
    total = lengths.pop()
    names = []
    for i, start in enumerate(range(0, total, shard_size)):
        name = f"{split}-{i:04d}.npz"
        np.savez(out_dir / name, **{k: v[start : start + shard_size] for k, v in arrays.items()})
        names.append(name)
    return names


def load_shards(out_dir: str | os.PathLike, split: str) -> dict[str, np.ndarray]:
    """All ``{split}-*.npz`` shards of `out_dir` concatenated (in shard order)."""
    paths = sorted(Path(out_dir).glob(f"{split}-*.npz"))
    if not paths:
        raise FileNotFoundError(f"no {split} shards in {out_dir}")
    parts: dict[str, list[np.ndarray]] = {}
    for path in paths:
        with np.load(path) as z:
            for k in z.files:
                parts.setdefault(k, []).append(z[k])
    return {k: np.concatenate(v) for k, v in parts.items()}


# ------------------------------------------------------------------------------------------- synthesis
def _var_len(value: int) -> bytes:
    """MIDI variable-length quantity."""
    out = [value & 0x7F]
    value >>= 7
    while value:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    return bytes(reversed(out))


def general_midi_file(program: int, drums: bool = False, seed: int = 0, notes: int = 12) -> bytes:
    """A small Standard MIDI File (format 0, 480 ticks per beat, 120 bpm): `notes` random notes and a chord on
    General MIDI `program` (or the drum kit on channel 10 when `drums`), for fluidsynth to render."""
    rng = np.random.default_rng(seed)
    channel = 9 if drums else 0
    events: list[tuple[int, bytes]] = [(0, bytes([0xC0 | channel, program % 128]))]
    tick = 0
    for i in range(notes):
        length = int(rng.choice([240, 360, 480, 720]))
        pitches = [int(rng.integers(35, 82))] if drums else [int(rng.integers(45, 80))]
        if not drums and i == notes - 1:
            pitches = [pitches[0], pitches[0] + 4, pitches[0] + 7]
        velocity = int(rng.integers(60, 120))
        for p in pitches:
            events.append((tick, bytes([0x90 | channel, p, velocity])))
        for p in pitches:
            events.append((tick + length, bytes([0x80 | channel, p, 0])))
        tick += length
    events.sort(key=lambda e: (e[0], e[1][0] & 0xF0 != 0x80))
    track, last = bytearray(b"\x00\xff\x51\x03\x07\xa1\x20"), 0  # tempo 500000 us per beat
    for when, message in events:
        track += _var_len(when - last) + message
        last = when
    track += b"\x00\xff\x2f\x00"
    header = b"MThd" + (6).to_bytes(4, "big") + (0).to_bytes(2, "big") + (1).to_bytes(2, "big") + (480).to_bytes(2, "big")
    return header + b"MTrk" + len(track).to_bytes(4, "big") + bytes(track)


def tool_version(program: str) -> str:
    """The version `program --version` prints (``"14.4.2"`` for sox, ``"1.51"`` for espeak-ng, ``"2.3.1"`` for
    fluidsynth), or ``"unknown"``: generated audio records the tool that made it, as a file records its package."""
    try:
        out = subprocess.run([program, "--version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return parse_tool_version(out.stdout + out.stderr)


def parse_tool_version(text: str) -> str:
    """The first dotted version number in a tool's ``--version`` text (an optional ``v`` before it), else
    ``"unknown"``."""
    match = re.search(r"(?<![\w.])v?(\d+(?:\.\d+)+)", text)
    return match.group(1) if match else "unknown"


def sox_command(args: list[str], path: str | os.PathLike, sample_rate: int = 16000) -> list[str]:
    """The ``sox`` command line that renders recipe `args` (from :func:`sox_recipes`) to a 16-bit mono WAV at `path`.
    ``-R`` (repeatable) seeds sox's noise generators and its dither with fixed values; without it every run writes
    different samples (even a plain tone differs in its dither), so the corpus's labels and mixtures would change
    from one build to the next."""
    return ["sox", "-R", "-n", "-r", str(sample_rate), "-c", "1", "-b", "16", str(path), *args]


def sox_recipes(count: int, seed: int = 0) -> list[list[str]]:
    """``sox -n out.wav <args>`` effect chains: tones, sweeps, beeps and coloured noises (a minor synthetic share)."""
    rng = np.random.default_rng(seed)
    out: list[list[str]] = []
    shapes = ["sine", "square", "triangle", "sawtooth"]
    noises = ["whitenoise", "pinknoise", "brownnoise"]
    for i in range(count):
        kind = i % 4
        if kind == 0:
            out.append(["synth", f"{rng.uniform(1, 3):.2f}", shapes[i // 4 % 4], f"{int(rng.integers(200, 3000))}", "vol", "0.5"])
        elif kind == 1:
            lo, hi = sorted(int(x) for x in rng.integers(100, 4000, 2))
            out.append(["synth", f"{rng.uniform(1, 3):.2f}", shapes[i // 4 % 4], f"{lo}-{hi + 1}", "vol", "0.5"])
        elif kind == 2:
            beep = f"{rng.uniform(0.08, 0.3):.2f}"
            out.append(["synth", beep, "sine", f"{int(rng.integers(500, 3000))}", "pad", "0", beep, "repeat",
                        str(int(rng.integers(3, 8))), "vol", "0.5"])  # fmt: skip
        else:
            out.append(["synth", f"{rng.uniform(1, 3):.2f}", noises[i // 4 % 3], "vol", f"{rng.uniform(0.1, 0.6):.2f}"])
    return out


# ------------------------------------------------------------------------------------------- agreement
def _clip_means(per_patch: Any, files: Any) -> Any:
    """``[P, C]`` per-patch values -> ``[clips, C]`` means per source file (clips in ascending file id)."""
    import torch

    values = torch.as_tensor(np.asarray(per_patch), dtype=torch.float32)
    _, inverse = torch.unique(torch.as_tensor(np.asarray(files).astype(np.int64)), return_inverse=True)
    clips = int(inverse.max()) + 1 if len(inverse) else 0
    count = torch.zeros(clips).index_add_(0, inverse, torch.ones(len(inverse)))[:, None]
    return torch.zeros(clips, values.shape[1]).index_add_(0, inverse, values) / count


def _top3_targets(teacher_clip: Any) -> Any:
    import torch

    return torch.zeros_like(teacher_clip).scatter_(1, teacher_clip.topk(3, -1).indices, 1.0)


def _mean_ap(scores: Any, targets: Any) -> Any:
    """Mean average precision over the classes that have a positive: ``[N, C]`` -> a scalar, or ``[R, N, C]`` (R
    resamples) -> ``[R]``."""
    from tympan.eval.metrics import average_precision

    if scores.dim() == 3:  # one call: the R resamples side by side as R * C columns
        r, n, c = scores.shape
        columns = [x.transpose(0, 1).reshape(n, r * c) for x in (scores, targets)]
        ap = average_precision(*columns).view(r, c)
    else:
        ap = average_precision(scores, targets)
    return ap.nan_to_num(0.0).sum(-1) / (~ap.isnan()).sum(-1)


def teacher_agreement(student_probs: Any, teacher_scores: Any, files: Any) -> dict[str, float]:
    """How a student agrees with the teacher on labelled patches (``[P, C]`` each) grouped into clips by `files`
    (``[P]`` source-file ids): patch top-1 match, and per clip (mean over its patches) the top-1 match, the top-5
    match (the teacher's top class among the student's 5 best) and the mAP of the student's clip scores against
    the teacher's top-3 classes of that clip (classes never in anyone's top 3 are left out of the mean)."""
    import torch

    probs = torch.as_tensor(np.asarray(student_probs), dtype=torch.float32)
    teacher = torch.as_tensor(np.asarray(teacher_scores), dtype=torch.float32)
    student_clip, teacher_clip = _clip_means(probs, files), _clip_means(teacher, files)
    top = teacher_clip.argmax(-1)
    return {
        "patch_top1": float((probs.argmax(-1) == teacher.argmax(-1)).float().mean()),
        "clip_top1": float((student_clip.argmax(-1) == top).float().mean()),
        "clip_top5": float((student_clip.topk(5, -1).indices == top[:, None]).any(-1).float().mean()),
        "clip_mAP_top3": float(_mean_ap(student_clip, _top3_targets(teacher_clip))),
        "clips": len(student_clip),
        "patches": len(probs),
    }


def agreement_difference(student_probs: Any, other_probs: Any, teacher_scores: Any, files: Any,
                         resamples: int = 1000, level: float = 0.95, seed: int = 0) -> dict[str, Any]:  # fmt: skip
    """Whether one student agrees with the teacher better than another beyond the choice of clips: the difference of
    :func:`teacher_agreement`'s clip mAP (``student - other``, both ``[P, C]`` on the same patches) and its paired
    bootstrap interval (the clips drawn with replacement `resamples` times, the same clips for both; a class with
    no positive among the drawn clips is left out, as in the metric).

    Only the difference gets an interval: a draw leaves out the classes whose few positive clips it misses, so a
    single model's resampled mAP is biased (v11 on the held-out clips: 0.507-0.569 around its 0.506 on all of
    them); in a paired difference the same classes drop out for both."""
    import torch

    targets = _top3_targets(_clip_means(teacher_scores, files))
    present = targets.sum(0) > 0  # the only classes that can have a positive in any draw
    targets = targets[:, present]
    a, b = _clip_means(student_probs, files)[:, present], _clip_means(other_probs, files)[:, present]
    generator = torch.Generator().manual_seed(seed)
    draws = torch.randint(0, len(targets), (resamples, len(targets)), generator=generator)
    # [r, N] clips -> [r, N, C] resampled scores: 32 draws per average-precision call
    differences = torch.cat([_mean_ap(a[c], targets[c]) - _mean_ap(b[c], targets[c]) for c in draws.split(32)])
    tail = (1 - level) / 2
    low, high = torch.quantile(differences.double(), torch.tensor([tail, 1 - tail], dtype=torch.float64)).tolist()
    return {"difference": float(_mean_ap(a, targets) - _mean_ap(b, targets)), "interval": [low, high],
            "level": level, "resamples": resamples, "clips": len(targets)}  # fmt: skip
