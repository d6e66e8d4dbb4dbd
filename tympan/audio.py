"""Audio in and out: decode files (soundfile), resample (soxr), stream long files in blocks, save.

Every function returns float32 numpy arrays laid out channels-first, like torch audio: ``[N]`` for mono,
``[channels, N]`` otherwise. Decoded PCM lies in [-1, 1]; resampling is not clipped, so a full-scale
transient may overshoot by a few thousandths (clipping would make us differ from reference pipelines).

Anything wrong with the input (missing, empty, corrupt, truncated, unsupported format, an implausible sample
rate, NaN/inf samples) raises one error type, :class:`AudioError` (a :class:`~tympan.errors.TympanError`), whose
message is a single line ``"{path}: {reason}"``. Sample rates outside ``[MIN_SAMPLE_RATE, MAX_SAMPLE_RATE]``
are refused (a header claiming 1 Hz would ask for 16,000 output samples per stored one), and streaming reads
no more source frames than one output block needs.

>>> from tympan import audio
>>> samples = audio.load(audio.demo_path())                      # [N] float32 at 16 kHz
>>> for block in audio.stream("one_hour.flac", block_seconds=10):  # bounded memory
...     ...
"""

from __future__ import annotations

import atexit
import contextlib
import math
import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Iterable, Iterator, Literal

import numpy as np
import soundfile as sf
import soxr

from tympan.errors import InputError, TympanError

__all__ = [
    "AudioError",
    "AudioInfo",
    "BlockReader",
    "DEFAULT_SAMPLE_RATE",
    "MAX_SAMPLE_RATE",
    "MIN_SAMPLE_RATE",
    "demo_path",
    "from_array",
    "info",
    "load",
    "readable_formats",
    "resample",
    "save",
    "stream",
]

DEFAULT_SAMPLE_RATE = 16000
Quality = Literal["QQ", "LQ", "MQ", "HQ", "VHQ"]
QUALITIES: tuple[str, ...] = ("QQ", "LQ", "MQ", "HQ", "VHQ")
DEMO_FILENAME = "demo_digits_16k.flac"

# File suffixes -> libsndfile major format. libsndfile sniffs the real format from the bytes; the suffix is
# only used to tell "this format is not supported" apart from "this file is corrupt" when opening fails.
_SUFFIX_FORMATS = {
    ".wav": "WAV", ".wave": "WAV", ".flac": "FLAC", ".ogg": "OGG", ".oga": "OGG", ".opus": "OGG",
    ".mp3": "MP3", ".aif": "AIFF", ".aiff": "AIFF", ".au": "AU", ".caf": "CAF", ".w64": "W64", ".rf64": "RF64",
}  # fmt: skip
# Suffixes `save` writes -> (format, subtype used when none is given).
_WRITE_FORMATS = {".wav": ("WAV", "PCM_16"), ".flac": ("FLAC", "PCM_16"), ".ogg": ("OGG", "VORBIS"),
                  ".mp3": ("MP3", "MPEG_LAYER_III")}  # fmt: skip
_MIN_READ_FRAMES = 4096
MIN_SAMPLE_RATE = 1000  # below: no real recording; resampling to 16 kHz would multiply the data > 16x
MAX_SAMPLE_RATE = 1_536_000


class AudioError(TympanError, ValueError):
    """Bad audio input. The message is one line: ``"{path}: {reason}"``."""

    def __init__(self, path: str | Path, reason: str) -> None:
        self.path, self.reason = str(path), reason
        super().__init__(f"{path}: {reason}")


@dataclass(frozen=True)
class AudioInfo:
    """What the header of an audio file says, read without decoding the samples."""

    path: Path
    sample_rate: int
    channels: int
    frames: int
    format: str  # libsndfile major format, e.g. "WAV", "FLAC", "OGG", "MP3"
    subtype: str  # e.g. "PCM_16", "VORBIS"

    @property
    def duration(self) -> float:
        """Length in seconds."""
        return self.frames / self.sample_rate


# ----------------------------------------------------------------------------------------------- helpers
def readable_formats() -> dict[str, str]:
    """The formats the installed libsndfile decodes (MP3 needs libsndfile >= 1.1), name -> description."""
    return dict(sf.available_formats())


def _check_rate(rate: float, name: str, path: str | Path = "<array>") -> None:
    if isinstance(rate, bool) or not isinstance(rate, (int, float, np.integer, np.floating)) or not math.isfinite(rate):
        raise AudioError(path, f"{name} must be a number of samples per second, got {rate!r}")
    if not MIN_SAMPLE_RATE <= rate <= MAX_SAMPLE_RATE:
        raise AudioError(path, f"implausible {name} {rate:g} Hz (tympan reads {MIN_SAMPLE_RATE}..{MAX_SAMPLE_RATE} Hz)")


def _check_quality(quality: str) -> None:
    if quality not in QUALITIES:
        raise InputError(f"quality must be one of {', '.join(QUALITIES)}, got {quality!r}")


def _libsndfile_reason(err: Exception) -> str:
    """libsndfile's own words, without its "Error opening '<path>':" prefix (we add the path ourselves)."""
    text = getattr(err, "error_string", None) or str(err)
    return " ".join(text.split()).rstrip(".")


def _open_failure_reason(path: Path, err: Exception) -> str:
    fmt = _SUFFIX_FORMATS.get(path.suffix.lower())
    available = readable_formats()
    if fmt is None or fmt not in available:
        if fmt == "MP3":
            return f"MP3 is not supported by the installed libsndfile {sf.__libsndfile_version__} (needs >= 1.1)"
        return (
            f"unsupported or unrecognised audio format {path.suffix or '(no suffix)'!r} "
            f"(libsndfile {sf.__libsndfile_version__} reads {', '.join(sorted(available))})"
        )
    return f"corrupt or undecodable {fmt} file (libsndfile: {_libsndfile_reason(err)})"


def _open(path: str | Path) -> sf.SoundFile:
    """Open an audio file for reading; every failure becomes an AudioError with a precise reason."""
    path = Path(path)
    if not path.exists():
        raise AudioError(path, "file not found")
    if path.is_dir():
        raise AudioError(path, "is a directory, not an audio file")
    if path.stat().st_size == 0:
        raise AudioError(path, "empty file (0 bytes)")
    if not os.access(path, os.R_OK):
        raise AudioError(path, "permission denied")
    try:
        handle = sf.SoundFile(path)
    except (sf.SoundFileError, RuntimeError, TypeError, ValueError) as err:
        raise AudioError(path, _open_failure_reason(path, err)) from None
    if handle.frames == 0:
        handle.close()
        raise AudioError(path, "no audio samples (0 frames)")
    try:
        _check_rate(handle.samplerate, "sample rate in the header", path)
        _check_wav_length(path, handle)
    except AudioError:
        handle.close()
        raise
    return handle


def _check_wav_length(path: Path, handle: sf.SoundFile) -> None:
    """A RIFF WAV whose data chunk promises more bytes than the file holds is truncated (libsndfile silently
    shortens it). Placeholder sizes of streaming writers (0, 0xFFFFFFFF) are not a promise."""
    if handle.format != "WAV":
        return
    try:
        with open(path, "rb") as f:
            head = f.read(12)
            if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
                return
            position, size = 12, path.stat().st_size
            while position + 8 <= size:
                f.seek(position)
                chunk = f.read(8)
                name, length = chunk[:4], int.from_bytes(chunk[4:8], "little")
                if name == b"data":
                    available = size - position - 8
                    if 0 < length < 0xFFFFFFFF and length > available:
                        rate = handle.samplerate
                        promised = handle.frames / rate * length / max(1, available)
                        raise AudioError(path, f"truncated WAV: the header promises {promised:.2f} s, the file "
                                               f"holds {handle.frames / rate:.2f} s")  # fmt: skip
                    return
                position += 8 + length + (length & 1)
    except OSError as err:
        raise AudioError(path, f"cannot read ({err.strerror or err})") from None


def _read(path: Path, handle: sf.SoundFile, frames: int = -1) -> np.ndarray:
    """Decode up to `frames` frames as float32 [frames, channels]; decoder errors become AudioError."""
    try:
        return handle.read(frames, dtype="float32", always_2d=True)
    except (sf.SoundFileError, RuntimeError, ValueError) as err:
        reason = f"corrupt or undecodable {handle.format} file (libsndfile: {_libsndfile_reason(err)})"
        raise AudioError(path, reason) from None


def _check_finite(path: str | Path, frames: np.ndarray, start_seconds: float = 0.0, rate: float = 1.0) -> None:
    finite = np.isfinite(frames)
    if not finite.all():
        first = int(np.argmin(finite.all(axis=-1) if frames.ndim > 1 else finite))
        raise AudioError(path, f"non-finite samples (NaN or inf) from {start_seconds + first / rate:.3f} s on")


def _downmix(frames: np.ndarray, mono: bool) -> np.ndarray:
    """[frames, channels] -> [frames] (channel average) if mono, else unchanged (one channel: a view, no pass)."""
    if not mono:
        return frames
    return frames[:, 0] if frames.shape[1] == 1 else frames.mean(axis=1, dtype=np.float32)


def _resample_frames(frames: np.ndarray, rate: float, target_rate: float, quality: str) -> np.ndarray:
    """soxr on frame-major data ([frames] or [frames, channels]); a no-op at equal rates."""
    if rate == target_rate:
        return frames
    return soxr.resample(frames, rate, target_rate, quality=quality)


def _channels_first(frames: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(frames.T) if frames.ndim == 2 else frames


# ----------------------------------------------------------------------------------------------- reading
def info(path: str | Path) -> AudioInfo:
    """Read an audio file's header: sample rate, channels, frames, duration, format."""
    with _open(path) as handle:
        return _info(Path(path), handle)


def _info(path: Path, handle: sf.SoundFile) -> AudioInfo:
    return AudioInfo(path, handle.samplerate, handle.channels, handle.frames, handle.format, handle.subtype)


def load(
    path: str | Path,
    sample_rate: int | None = DEFAULT_SAMPLE_RATE,
    mono: bool = True,
    quality: Quality = "HQ",
) -> np.ndarray:
    """Decode a whole audio file (WAV/FLAC/OGG/MP3/...) to float32, resampled to `sample_rate`.

    Returns ``[N]`` if `mono` (channels averaged), else ``[channels, N]``. ``sample_rate=None`` keeps the
    file's rate. `quality` is the soxr preset ("HQ" default; "VHQ" for reference pipelines that used it).
    For files too long to hold in memory use :func:`stream`.
    """
    if sample_rate is not None:
        _check_rate(sample_rate, "sample_rate")
    _check_quality(quality)
    path = Path(path)
    with _open(path) as handle:
        rate = handle.samplerate
        frames = _read(path, handle)
    _check_finite(path, frames, rate=rate)
    frames = _downmix(frames, mono)
    return _channels_first(_resample_frames(frames, rate, sample_rate or rate, quality))


def resample(samples: np.ndarray, sample_rate: float, target_rate: float, quality: Quality = "HQ") -> np.ndarray:
    """Resample float32 ``[N]`` or ``[channels, N]`` along the last axis with soxr.

    The output has ``round(N * target_rate / sample_rate)`` samples (soxr's own length rule).
    """
    _check_rate(sample_rate, "sample_rate")
    _check_rate(target_rate, "target_rate")
    _check_quality(quality)
    samples = np.asarray(samples, dtype=np.float32)
    if samples.ndim not in (1, 2):
        raise AudioError("<array>", f"expected samples of shape [N] or [channels, N], got shape {tuple(samples.shape)}")
    frames = samples.T if samples.ndim == 2 else samples
    return _channels_first(_resample_frames(np.ascontiguousarray(frames), sample_rate, target_rate, quality))


def _as_float32(samples: Any) -> np.ndarray:
    """numpy array / torch tensor / sequence -> float32 ndarray; integer PCM is scaled to [-1, 1)."""
    if hasattr(samples, "detach"):  # torch.Tensor, without importing torch here
        samples = samples.detach().cpu().numpy()
    array = np.asarray(samples)
    if array.dtype == np.bool_ or not np.issubdtype(array.dtype, np.number) or np.iscomplexobj(array):
        raise AudioError("<array>", f"expected real-valued audio samples, got dtype {array.dtype}")
    if np.issubdtype(array.dtype, np.unsignedinteger):  # e.g. 8-bit WAV: offset binary
        half = (np.iinfo(array.dtype).max + 1) / 2
        return ((array.astype(np.float64) - half) / half).astype(np.float32)
    if np.issubdtype(array.dtype, np.integer):
        return (array.astype(np.float64) / -float(np.iinfo(array.dtype).min)).astype(np.float32)
    return array.astype(np.float32, copy=False)


def from_array(
    samples: Any,
    sample_rate: float,
    target_rate: int | None = DEFAULT_SAMPLE_RATE,
    mono: bool = True,
    quality: Quality = "HQ",
) -> np.ndarray:
    """Bring in-memory audio to what models take: float32 at `target_rate`, mono by default.

    `samples` is a numpy array or torch tensor laid out ``[N]`` or ``[channels, N]`` (channels-first), at
    `sample_rate`; integer PCM (int16, int32, uint8) is scaled to [-1, 1). Returns the same layouts as
    :func:`load`. ``target_rate=None`` keeps `sample_rate`.
    """
    _check_rate(sample_rate, "sample_rate")
    array = _as_float32(samples)
    if array.ndim not in (1, 2) or array.shape[-1] == 0 or (array.ndim == 2 and array.shape[0] == 0):
        raise AudioError("<array>", f"expected a non-empty [N] or [channels, N] array, got shape {array.shape}")
    _check_finite("<array>", array.T if array.ndim == 2 else array, rate=sample_rate)
    if mono and array.ndim == 2:
        array = array.mean(axis=0, dtype=np.float32)
    return resample(array, sample_rate, target_rate or sample_rate, quality)


# --------------------------------------------------------------------------------------------- streaming
def _regroup(pieces: Iterable[np.ndarray], block_frames: int) -> Iterator[np.ndarray]:
    """Regroup frame-major pieces of any lengths into blocks of exactly `block_frames` (the last may be short)."""
    buffer: list[np.ndarray] = []
    buffered = 0
    for piece in pieces:
        if not len(piece):
            continue
        buffer.append(piece)
        buffered += len(piece)
        if buffered < block_frames:
            continue
        joined = np.concatenate(buffer)
        full = len(joined) // block_frames
        for i in range(full):
            yield joined[i * block_frames : (i + 1) * block_frames]
        rest = joined[full * block_frames :]
        buffer, buffered = [rest], len(rest)
    if buffered:
        yield np.concatenate(buffer)


class BlockReader:
    """Iterate over a long audio file in consecutive float32 blocks with bounded memory.

    Each block holds exactly ``round(block_seconds * sample_rate)`` samples (``[n]`` if `mono`, else
    ``[channels, n]``), except the last. Resampling runs through one ``soxr.ResampleStream`` across block
    boundaries, so the concatenated blocks equal :func:`load` of the whole file (bit-identical with the
    installed soxr). The file is opened (and its header checked) at construction; the first iteration reads
    through that handle, later ones open the file again. Decoding errors and NaN/inf samples met mid-file raise
    :class:`AudioError`. ``close()`` (or a ``with`` block) releases a handle never iterated.
    """

    def __init__(
        self,
        path: str | Path,
        block_seconds: float = 10.0,
        sample_rate: int | None = DEFAULT_SAMPLE_RATE,
        mono: bool = True,
        quality: Quality = "HQ",
    ) -> None:
        if sample_rate is not None:
            _check_rate(sample_rate, "sample_rate")
        _check_quality(quality)
        self.path = Path(path)
        # one open for the header and the first pass (tagging many short files pays per open)
        self._handle: sf.SoundFile | None = _open(self.path)
        self.info = _info(self.path, self._handle)
        self.sample_rate = sample_rate or self.info.sample_rate
        self.block_frames = round(block_seconds * self.sample_rate)
        if not math.isfinite(block_seconds) or self.block_frames < 1:
            raise InputError(f"block_seconds must give at least one sample per block, got {block_seconds!r}")
        self.mono, self.quality = mono, quality
        self.channels = 1 if mono else self.info.channels

    def _decoded(self) -> Iterator[np.ndarray]:
        """The file's frames, downmixed, as frame-major pieces of about one block each."""
        rate = self.info.sample_rate
        needed = max(1, math.ceil(self.block_frames * rate / self.sample_rate))
        # when upsampling, read no more than one output block needs (bounded work per step, whatever the rate)
        read_frames = needed if self.sample_rate > rate else max(needed, _MIN_READ_FRAMES)
        handle, self._handle = (self._handle or _open(self.path)), None
        with handle:
            position = 0
            while True:
                frames = _read(self.path, handle, read_frames)
                if not len(frames):
                    return
                _check_finite(self.path, frames, position / rate, rate)
                position += len(frames)
                yield _downmix(frames, self.mono)

    def _resampled(self) -> Iterator[np.ndarray]:
        pieces = self._decoded()
        if self.info.sample_rate == self.sample_rate:
            yield from pieces
            return
        resampler = soxr.ResampleStream(
            self.info.sample_rate, self.sample_rate, self.channels, dtype="float32", quality=self.quality
        )
        for piece in pieces:
            yield resampler.resample_chunk(piece)
        tail_shape = (0,) if self.mono else (0, self.channels)
        yield resampler.resample_chunk(np.zeros(tail_shape, np.float32), last=True)

    def __iter__(self) -> Iterator[np.ndarray]:
        for block in _regroup(self._resampled(), self.block_frames):
            yield _channels_first(block)

    def close(self) -> None:
        """Release the handle opened at construction if no iteration has taken it."""
        handle, self._handle = self._handle, None
        if handle is not None:
            handle.close()

    def __enter__(self) -> BlockReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        seconds = self.block_frames / self.sample_rate
        return f"BlockReader({str(self.path)!r}, block_seconds={seconds:g}, sample_rate={self.sample_rate})"


def stream(
    path: str | Path,
    block_seconds: float = 10.0,
    sample_rate: int | None = DEFAULT_SAMPLE_RATE,
    mono: bool = True,
    quality: Quality = "HQ",
) -> BlockReader:
    """Blocks of `block_seconds` of a long file, resampled continuously; see :class:`BlockReader`."""
    return BlockReader(path, block_seconds, sample_rate, mono, quality)


# ------------------------------------------------------------------------------------------------ saving
def save(
    path: str | Path,
    samples: Any,
    sample_rate: int = DEFAULT_SAMPLE_RATE,
    subtype: str | None = None,
) -> Path:
    """Write ``[N]`` or ``[channels, N]`` float samples to WAV/FLAC/OGG (or MP3 if libsndfile can), by suffix.

    `subtype` is a libsndfile subtype (default PCM_16 for WAV/FLAC, VORBIS for OGG); values beyond
    [-1, 1] clip in integer subtypes. Returns the path written.
    """
    path = Path(path)
    if isinstance(sample_rate, bool) or not isinstance(sample_rate, (int, np.integer)) or sample_rate <= 0:
        raise AudioError(path, f"sample_rate must be a positive integer to write a file, got {sample_rate!r}")
    writable = {suffix: fs for suffix, fs in _WRITE_FORMATS.items() if fs[0] in readable_formats()}
    if path.suffix.lower() not in writable:
        reason = f"cannot write format {path.suffix or '(no suffix)'!r} (use {', '.join(writable)})"
        raise AudioError(path, reason)
    fmt, default_subtype = writable[path.suffix.lower()]
    if not path.parent.is_dir():
        raise AudioError(path, f"directory {str(path.parent)!r} does not exist")
    array = _as_float32(samples)
    if array.ndim not in (1, 2) or array.shape[-1] == 0:
        raise AudioError(path, f"expected non-empty samples of shape [N] or [channels, N], got {array.shape}")
    _check_finite(path, array.T if array.ndim == 2 else array, rate=sample_rate)
    subtype = subtype or default_subtype
    try:
        sf.write(path, array.T if array.ndim == 2 else array, int(sample_rate), subtype=subtype, format=fmt)
    except (sf.SoundFileError, RuntimeError, TypeError, ValueError) as err:
        raise AudioError(path, f"cannot write {fmt} with subtype {subtype!r} ({_libsndfile_reason(err)})") from None
    return path


# -------------------------------------------------------------------------------------------------- demo
_extracted = contextlib.ExitStack()
atexit.register(_extracted.close)


def demo_path() -> Path:
    """A 16 kHz mono FLAC shipped with the package: spoken digits from the Free Spoken Digit Dataset
    (CC BY-SA 4.0; see ``tympan/assets/DEMO_AUDIO.md`` for attribution)."""
    resource = resources.files("tympan") / "assets" / DEMO_FILENAME
    if isinstance(resource, Path):
        return resource
    return _extracted.enter_context(resources.as_file(resource))  # zipped install: extract once
