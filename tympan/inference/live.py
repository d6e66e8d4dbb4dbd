"""Live tagging: one loop over one source abstraction, whatever the audio comes from.

A :class:`Source` is an iterator of :class:`Block` s: float32 mono samples at 16 kHz, each stamped with the moment
its last sample became available to us (``time.monotonic()``). Three sources exist:

* :class:`MicrophoneSource`: a capture device through ``sounddevice`` (PortAudio), imported lazily;
* :class:`PcmSource`: raw PCM from a byte stream (stdin), read by a thread into a buffer from :meth:`Source.start`
  on, so a pipe never falls behind while the model loads;
* :class:`FileSource`: an audio file replayed at real-time pace (or as fast as possible).

:func:`run_live` pushes every block into a :class:`~tympan.inference.streaming.Streamer` (its public
``reset``/``push``/``flush`` only) and hands each finished chunk to a callback together with its latency: the time
from the chunk's last sample becoming available to the moment the callback runs. Because the same ``Streamer`` cuts
the same samples into the same chunks, the per-chunk outputs equal ``tympan tag FILE --chunk S`` on the same audio.
"""

from __future__ import annotations

import math
import os
import queue
import statistics
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterator

import numpy as np

from tympan.errors import TympanError

__all__ = [
    "Block",
    "FileSource",
    "LiveError",
    "LiveSummary",
    "MicrophoneSource",
    "PcmSource",
    "Source",
    "list_input_devices",
    "run_live",
]

SAMPLE_RATE = 16000
PCM_ENCODINGS = {"s16le": np.dtype("<i2"), "f32le": np.dtype("<f4")}
_POLL_SECONDS = 0.05  # how often a waiting source looks at its stop flag
# Capture/replay block: a chunk closing inside a block waits for the block's end, so this bounds the latency it adds
# (10 ms = 160 samples divides every chunk length in use: 0.48 s, 1 s, 2 s).
BLOCK_SECONDS = 0.01


class LiveError(TympanError, RuntimeError):
    """A live source that cannot run (no PortAudio, no input device, bad PCM settings); one line saying how to fix it."""


@dataclass(frozen=True)
class Block:
    """Consecutive samples of a live source."""

    samples: np.ndarray  # float32 [n], mono, 16 kHz
    time: float  # time.monotonic() when the last sample became available


class _Converter:
    """Raw mono float32 pieces at ``rate`` -> 16 kHz pieces; soxr (quality HQ, as ``tympan.audio``) across pieces."""

    def __init__(self, rate: float):
        self.rate = rate
        self._stream = None
        if rate != SAMPLE_RATE:
            import soxr

            self._stream = soxr.ResampleStream(rate, SAMPLE_RATE, 1, dtype="float32", quality="HQ")

    def __call__(self, samples: np.ndarray, last: bool = False) -> np.ndarray:
        samples = np.ascontiguousarray(samples, dtype=np.float32)
        if self._stream is None:
            return samples
        return self._stream.resample_chunk(samples, last=last)


class Source:
    """An iterable of :class:`Block` s; ``start()`` begins capturing, ``stop()`` ends it (idempotent).

    ``request_stop()`` only sets a flag (safe from a signal handler): iteration ends at the next block boundary.
    ``buffers_early`` says whether the CLI should start the source before loading the model (input that must not be
    lost, e.g. a pipe); ``dropped`` counts blocks the source had to discard (capture overflows).
    """

    description = "audio"
    buffers_early = False

    def __init__(self) -> None:
        self._stop_requested = False
        self.dropped = 0

    def start(self) -> None:
        """Begin capturing (a no-op for sources that read on demand)."""

    def stop(self) -> None:
        """Stop capturing and release the device or stream."""
        self._stop_requested = True

    def request_stop(self) -> None:
        """Ask the iteration to end after the current block (async-signal safe)."""
        self._stop_requested = True

    def __iter__(self) -> Iterator[Block]:  # pragma: no cover - abstract
        raise NotImplementedError

    def __enter__(self) -> "Source":
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


_END = object()


class _QueuedSource(Source):
    """A source whose producer (a thread or an audio callback) puts ``(raw samples, time)`` on a queue."""

    def __init__(self, rate: float) -> None:
        super().__init__()
        self._queue: queue.Queue = queue.Queue()
        self._convert = _Converter(rate)
        self._started = False

    def _put(self, samples: np.ndarray, stamp: float) -> None:
        self._queue.put((samples, stamp))

    def __iter__(self) -> Iterator[Block]:
        if not self._started:
            self.start()
        stamp = time.monotonic()
        while not self._stop_requested:
            try:
                item = self._queue.get(timeout=_POLL_SECONDS)
            except queue.Empty:
                continue
            if item is _END:
                break
            if isinstance(item, BaseException):
                raise item
            raw, stamp = item
            samples = self._convert(raw)
            if len(samples):
                yield Block(samples, stamp)
        tail = self._convert(np.zeros(0, np.float32), last=True)
        if len(tail):
            yield Block(tail, stamp)


class PcmSource(_QueuedSource):
    """Raw mono PCM from a byte stream (``s16le`` or ``f32le``) at ``rate``, resampled to 16 kHz if needed.

    A daemon thread reads the stream from :meth:`start` on into an unbounded buffer, so a pipe is drained at its
    own pace whatever the consumer does (e.g. while the model loads). End of stream ends the iteration.
    """

    buffers_early = True

    def __init__(self, stream: BinaryIO, encoding: str = "s16le", rate: float = SAMPLE_RATE, read_bytes: int = 1 << 15):
        if encoding not in PCM_ENCODINGS:
            raise LiveError(f"unknown PCM encoding {encoding!r} (use {', '.join(PCM_ENCODINGS)})")
        if not (isinstance(rate, (int, float)) and math.isfinite(rate) and rate > 0):
            raise LiveError(f"the PCM sample rate must be a positive number, got {rate!r}")
        super().__init__(rate)
        self.stream = stream
        self.dtype = PCM_ENCODINGS[encoding]
        self.read_bytes = read_bytes
        self.description = f"stdin ({encoding}, {rate:g} Hz mono)"
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._started:
            return
        self._started = True
        self._thread = threading.Thread(target=self._read_all, name="tympan-pcm-reader", daemon=True)
        self._thread.start()

    def _read_all(self) -> None:
        read = getattr(self.stream, "read1", None) or self.stream.read
        width = self.dtype.itemsize
        rest = b""
        try:
            while True:
                data = read(self.read_bytes)
                if not data:
                    break
                stamp = time.monotonic()
                data = rest + data
                usable = len(data) - len(data) % width
                rest = data[usable:]
                if usable:
                    self._put(self._decode(data[:usable]), stamp)
            self._queue.put(_END)
        except LiveError as err:  # surfaced in the consumer's thread
            self._queue.put(err)
        except Exception as err:
            self._queue.put(LiveError(f"reading PCM input failed: {err}"))

    def _decode(self, data: bytes) -> np.ndarray:
        pcm = np.frombuffer(data, dtype=self.dtype)
        if self.dtype.kind == "i":  # as tympan.audio and libsndfile read 16-bit PCM: x / 32768
            return (pcm.astype(np.float64) / 32768.0).astype(np.float32)
        samples = pcm.astype(np.float32)
        if not np.isfinite(samples).all():
            raise LiveError("the f32le PCM input holds NaN or inf samples")
        return samples


class FileSource(Source):
    """An audio file replayed in ``block_seconds`` blocks, each released when real time reaches its end (or at once
    with ``realtime=False``); decoded and resampled as ``tympan tag`` does (``tympan.audio.stream``)."""

    def __init__(self, path: str | os.PathLike, realtime: bool = True, block_seconds: float = BLOCK_SECONDS):
        super().__init__()
        from tympan import audio

        self.path = Path(path)
        self.reader = audio.stream(self.path, block_seconds=block_seconds, sample_rate=SAMPLE_RATE, mono=True)
        self.realtime = realtime
        pace = "real-time pace" if realtime else "as fast as possible"
        self.description = f"{self.path} ({pace})"

    def __iter__(self) -> Iterator[Block]:
        origin = time.monotonic()
        released = 0
        for samples in self.reader:
            if self._stop_requested:
                return
            released += len(samples)
            if self.realtime:
                due = origin + released / SAMPLE_RATE
                while not self._stop_requested and (wait := due - time.monotonic()) > 0:
                    time.sleep(min(wait, _POLL_SECONDS))
                if self._stop_requested:
                    return
            yield Block(np.asarray(samples, dtype=np.float32), time.monotonic())


def _sounddevice() -> Any:
    """Import ``sounddevice``, turning a missing package or PortAudio library into one actionable line."""
    try:
        import sounddevice
    except ImportError:
        raise LiveError("microphone capture needs the sounddevice package: pip install 'tympan[live]' "
                        "(or pipe raw PCM in: tympan listen -)") from None
    except OSError as err:
        raise LiveError(f"{err}: install the PortAudio library (Debian/Ubuntu: apt-get install libportaudio2; "
                        "macOS: brew install portaudio), or pipe raw PCM in: tympan listen -") from None
    return sounddevice


def _parse_device(device: str | int | None) -> str | int | None:
    if isinstance(device, str) and device.strip().isdigit():
        return int(device)
    return device


def list_input_devices() -> list[dict]:
    """The capture devices PortAudio sees: ``index``, ``name``, ``channels``, ``rate``, ``default`` (bool)."""
    sd = _sounddevice()
    try:
        default_in = sd.default.device[0]
        devices = sd.query_devices()
    except sd.PortAudioError as err:
        raise LiveError(f"PortAudio cannot list devices: {err}") from None
    return [
        {"index": d["index"], "name": d["name"], "channels": d["max_input_channels"],
         "rate": d["default_samplerate"], "default": d["index"] == default_in}
        for d in devices
        if d["max_input_channels"] > 0
    ]


class MicrophoneSource(_QueuedSource):
    """A capture device (``device``: name substring or index; ``None``: the default input) through PortAudio.

    Opened at 16 kHz mono when the device allows it, otherwise at its default rate and channel count (downmixed and
    resampled here). Blocks of ``block_seconds`` arrive from PortAudio's callback; overflows are counted in
    :attr:`dropped`.
    """

    def __init__(self, device: str | int | None = None, block_seconds: float = BLOCK_SECONDS):
        self._sd = _sounddevice()
        self.device = _parse_device(device)
        try:
            self.info = self._sd.query_devices(self.device, kind="input")
        except (ValueError, self._sd.PortAudioError) as err:
            what = f"no input device matching {device!r}" if device is not None else f"no default audio input ({err})"
            raise LiveError(f"{what}: see 'tympan listen --list-devices', pass --device NAME|INDEX, "
                            "or pipe raw PCM in: tympan listen -") from None
        self.block_seconds = block_seconds
        self.channels, rate = 1, SAMPLE_RATE
        try:
            self._sd.check_input_settings(self.info["index"], channels=1, samplerate=SAMPLE_RATE, dtype="float32")
        except (ValueError, self._sd.PortAudioError):
            self.channels = max(1, min(2, int(self.info["max_input_channels"])))
            rate = self.info["default_samplerate"]
        super().__init__(rate)
        self.rate = rate
        self.description = f"input device {self.info['index']}: {self.info['name']} ({rate:g} Hz)"
        self._stream = None

    def _callback(self, indata: np.ndarray, frames: int, time_info: Any, status: Any) -> None:
        if status.input_overflow:
            self.dropped += 1
        samples = indata[:, 0].copy() if indata.shape[1] == 1 else indata.mean(axis=1, dtype=np.float32)
        self._put(samples, time.monotonic())

    def start(self) -> None:
        if self._started:
            return
        self._started = True
        try:
            self._stream = self._sd.InputStream(
                device=self.info["index"], samplerate=self.rate, channels=self.channels, dtype="float32",
                blocksize=max(1, round(self.block_seconds * self.rate)), callback=self._callback,
            )
            self._stream.start()
        except self._sd.PortAudioError as err:
            raise LiveError(f"cannot open {self.description}: {err}") from None

    def stop(self) -> None:
        super().stop()
        stream, self._stream = self._stream, None
        if stream is not None:
            stream.stop()
            stream.close()


@dataclass
class LiveSummary:
    """What a live run did: chunks, audio and wall time, model compute time, per-chunk latencies."""

    chunks: int = 0
    audio_seconds: float = 0.0
    wall_seconds: float = 0.0
    compute_seconds: float = 0.0
    cpu_seconds: float = 0.0
    dropped: int = 0
    latencies: list[float] = field(default_factory=list)

    @property
    def real_time_factor(self) -> float:
        """Model compute time per second of audio (below 1: keeps up with real time)."""
        return self.compute_seconds / self.audio_seconds if self.audio_seconds else 0.0

    @property
    def cpu_share(self) -> float:
        """Process CPU time over wall time during the run (1.0 = one core busy)."""
        return self.cpu_seconds / self.wall_seconds if self.wall_seconds else 0.0

    def latency(self, q: float) -> float:
        """The ``q`` quantile (0-1) of the per-chunk latencies in seconds (nearest rank)."""
        if not self.latencies:
            return math.nan
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]

    def line(self) -> str:
        """One human-readable line."""
        text = (f"{self.chunks} chunks, {self.audio_seconds:.2f} s of audio in {self.wall_seconds:.2f} s; "
                f"real-time factor {self.real_time_factor:.3f}; ")
        if self.latencies:
            text += (f"latency median {statistics.median(self.latencies) * 1e3:.1f} ms, "
                     f"max {max(self.latencies) * 1e3:.1f} ms; ")
        text += f"CPU {self.cpu_share:.0%} of one core"
        return text + (f"; {self.dropped} capture overflows" if self.dropped else "")


def _open_recording(path: Path) -> Any:
    import soundfile as sf

    subtype = "FLOAT" if path.suffix.lower() == ".wav" else None  # WAV keeps the float32 samples exactly
    try:
        return sf.SoundFile(path, "w", samplerate=SAMPLE_RATE, channels=1, subtype=subtype)
    except (sf.SoundFileError, RuntimeError, TypeError, ValueError) as err:
        raise LiveError(f"cannot record to {path}: {err}") from None


def run_live(
    source: Source,
    streamer: Any,
    on_chunk: Callable[[Any, float], None],
    *,
    max_seconds: float | None = None,
    record: str | os.PathLike | None = None,
    on_ready: Callable[[], None] | None = None,
) -> LiveSummary:
    """Feed ``source`` through ``streamer`` until the source ends, ``max_seconds`` of audio or a stop request.

    ``on_chunk(result, latency_seconds)`` runs for every :class:`~tympan.inference.streaming.ChunkResult` as soon
    as it exists (the final partial chunk comes from ``streamer.flush()``); ``on_ready()`` runs once, when the
    first block arrives; ``record`` writes the samples pushed (float WAV: exactly what the model saw).
    The source is stopped on return.
    """
    limit = None if max_seconds is None else round(max_seconds * SAMPLE_RATE)
    summary = LiveSummary()
    writer = _open_recording(Path(record)) if record is not None else None
    streamer.reset()
    pushed = 0
    last_time = time.monotonic()
    wall0 = cpu0 = None

    def deliver(results: list, block_end: int, block_time: float) -> None:
        for result in results:
            end_sample = round(result.end * SAMPLE_RATE)
            available = block_time - max(0, block_end - end_sample) / SAMPLE_RATE
            latency = time.monotonic() - available
            summary.latencies.append(latency)
            summary.chunks += 1
            on_chunk(result, latency)

    try:
        with source:
            for block in source:
                if wall0 is None:
                    wall0, cpu0 = time.monotonic(), time.process_time()
                    if on_ready is not None:
                        on_ready()
                samples = block.samples if limit is None else block.samples[: limit - pushed]
                if writer is not None and len(samples):
                    writer.write(samples)
                pushed += len(samples)
                last_time = block.time
                started = time.perf_counter()
                results = streamer.push(samples)
                summary.compute_seconds += time.perf_counter() - started
                deliver(results, pushed, block.time)
                if limit is not None and pushed >= limit:
                    break
        started = time.perf_counter()
        results = streamer.flush()
        summary.compute_seconds += time.perf_counter() - started
        deliver(results, pushed, last_time)
    finally:
        if writer is not None:
            writer.close()
    if wall0 is not None:
        summary.wall_seconds = time.monotonic() - wall0
        summary.cpu_seconds = time.process_time() - cpu0
    summary.audio_seconds = pushed / SAMPLE_RATE
    summary.dropped = source.dropped
    return summary
