"""`tympan listen`: live tagging from stdin PCM, a file, and a real capture device (a private PulseAudio daemon).

Each test compares the live per-chunk output with `tympan tag FILE --chunk S` on the same audio, both run as real
processes (the same thread settings on both sides).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

SAT_ID = "sat-tiny-2s"
CLIP = "esc10/audio/1-100032-A-0.flac"  # 5.001 s: chunks 0-2, 2-4 and a partial 4-5.001


@pytest.fixture(scope="module")
def sat_checkpoint() -> str:
    from tests.parity import fixtures_root

    path = fixtures_root() / SAT_ID / "checkpoint.pt"
    assert path.is_file(), path
    return str(path)


def model_args(checkpoint: str) -> list[str]:
    return ["--model", SAT_ID, "--checkpoint", checkpoint, "--chunk", "2", "--topk", "5"]


def tympan(*args: str, stdin: bytes | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run the command line in a fresh process."""
    cmd = [sys.executable, "-m", "tympan", *args]
    return subprocess.run(cmd, input=stdin, capture_output=True, env=env, timeout=600)


def tag_chunks(path: str | Path, checkpoint: str) -> list[dict]:
    """The per-chunk records of `tympan tag PATH --chunk 2 --format json`."""
    done = tympan("tag", str(path), *model_args(checkpoint), "--format", "json")
    assert done.returncode == 0, done.stderr.decode()
    return json.loads(done.stdout)[0]["chunks"]


def live_chunks(stdout: bytes) -> list[dict]:
    """JSONL lines -> chunk records; each carries a non-negative latency, removed here."""
    chunks = [json.loads(line) for line in stdout.decode().splitlines()]
    for chunk in chunks:
        assert chunk.pop("latency_ms") >= 0
    return chunks


def assert_same_tags(live: list[dict], tagged: list[dict], atol: float = 0.0) -> None:
    assert [(c["start"], c["end"]) for c in live] == [(c["start"], c["end"]) for c in tagged]
    for a, b in zip(live, tagged):
        assert [(t["label"], t["mid"], t["index"]) for t in a["tags"]] == [
            (t["label"], t["mid"], t["index"]) for t in b["tags"]
        ]
        probs_a = np.array([t["probability"] for t in a["tags"]])
        probs_b = np.array([t["probability"] for t in b["tags"]])
        assert np.abs(probs_a - probs_b).max() <= atol, (probs_a, probs_b)


def test_sources_deliver_the_exact_samples(data_dir):
    import io

    from tympan import audio
    from tympan.inference.live import FileSource, PcmSource

    clip = data_dir / CLIP
    reference = audio.load(clip)
    pcm = sf.read(clip, dtype="int16")[0].tobytes()
    source = PcmSource(io.BytesIO(pcm), read_bytes=333)  # odd reads: samples split across reads are rejoined
    blocks = list(source)
    assert len(blocks) > 100 and all(b.samples.dtype == np.float32 for b in blocks)
    np.testing.assert_array_equal(np.concatenate([b.samples for b in blocks]), reference)
    assert all(a.time <= b.time for a, b in zip(blocks, blocks[1:]))
    played = list(FileSource(clip, realtime=False))
    assert {len(b.samples) for b in played[:-1]} == {160}  # 10 ms blocks, as the microphone's
    np.testing.assert_array_equal(np.concatenate([b.samples for b in played]), reference)


def test_stdin_pcm_equals_tag_chunk(data_dir, sat_checkpoint):
    clip = data_dir / CLIP
    pcm = sf.read(clip, dtype="int16")[0].tobytes()  # what `ffmpeg -f s16le -ac 1 -ar 16000 -` gives for it
    done = tympan("listen", "-", "--format", "jsonl", *model_args(sat_checkpoint), stdin=pcm)
    err = done.stderr.decode()
    assert done.returncode == 0, err
    live = live_chunks(done.stdout)
    assert len(live) == 3 and live[-1]["end"] == pytest.approx(80016 / 16000)
    assert_same_tags(live, tag_chunks(clip, sat_checkpoint))  # bit for bit: same samples, same chunks
    ready, summary = err.splitlines()[0], err.splitlines()[-1]
    assert ready.startswith("tympan listen: listening to stdin (s16le, 16000 Hz mono)")
    assert "3 chunks, 5.00 s of audio" in summary and "latency median" in summary


def test_stdin_f32le_at_another_rate_is_resampled(tmp_path, data_dir, sat_checkpoint):
    samples = sf.read(data_dir / CLIP, dtype="float32")[0]
    import soxr

    slow = soxr.resample(samples, 16000, 22050).astype(np.float32)
    wav = tmp_path / "clip22k.wav"
    sf.write(wav, slow, 22050, subtype="FLOAT")
    done = tympan("listen", "-", "--pcm", "f32le", "--rate", "22050", "--format", "jsonl",
                  *model_args(sat_checkpoint), stdin=slow.astype("<f4").tobytes())
    assert done.returncode == 0, done.stderr.decode()
    assert_same_tags(live_chunks(done.stdout), tag_chunks(wav, sat_checkpoint), atol=1e-4)


def test_file_source_seconds_and_record(tmp_path, data_dir, sat_checkpoint):
    clip = data_dir / CLIP
    out = tmp_path / "rec.wav"
    done = tympan("listen", str(clip), "--fast", "--seconds", "4.5", "--record", str(out), "--format", "jsonl",
                  *model_args(sat_checkpoint))
    assert done.returncode == 0, done.stderr.decode()
    recorded, rate = sf.read(out, dtype="float32")
    assert rate == 16000 and np.array_equal(recorded, sf.read(clip, dtype="float32")[0][:72000])
    live = live_chunks(done.stdout)
    assert [c["end"] for c in live] == [2.0, 4.0, 4.5]
    assert_same_tags(live, tag_chunks(out, sat_checkpoint))


def test_ctrl_c_flushes_and_summarises(tmp_path, data_dir, sat_checkpoint):
    out = tmp_path / "interrupted.wav"
    cmd = [sys.executable, "-m", "tympan", "listen", str(data_dir / CLIP), "--record", str(out), "--format", "jsonl",
           *model_args(sat_checkpoint)]
    listen = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        first = listen.stdout.readline()  # the first chunk is out: interrupt mid-stream (real-time pace)
        threading.Event().wait(0.5)  # let a partial chunk build up (not a timing assertion: any delay passes)
        listen.send_signal(signal.SIGINT)
        rest, err = listen.communicate(timeout=120)
    finally:
        if listen.poll() is None:
            listen.kill()
            listen.wait()
    assert listen.returncode == 0, err.decode()
    summary = err.decode().splitlines()[-1]
    live = live_chunks(first + rest)
    assert summary.startswith(f"tympan listen: {len(live)} chunks, ") and "latency median" in summary
    duration = len(sf.read(out)[0]) / 16000
    # the partial chunk was flushed, unless shorter than a SAT patch (0.15 s), which `tag` drops too
    assert live[-1]["end"] == pytest.approx(duration) or duration - live[-1]["end"] <= 0.15
    assert_same_tags(live, tag_chunks(out, sat_checkpoint))


def test_text_output_and_user_errors(data_dir, sat_checkpoint, tmp_path):
    clip = data_dir / CLIP
    done = tympan("listen", str(clip), "--fast", *model_args(sat_checkpoint)[:-2], "--topk", "2")
    assert done.returncode == 0, done.stderr.decode()
    lines = done.stdout.decode().splitlines()
    assert len(lines) == 6 and lines[0].startswith("[0.0s]-[2.0s] Topk-1 ") and lines[0].endswith(" ms)")
    assert lines[1].startswith("[0.0s]-[2.0s] Topk-2 ") and lines[4].startswith("[4.0s]-[5.0s] Topk-1 ")

    bad = tympan("listen", "-", "--fast", *model_args(sat_checkpoint), stdin=b"")
    assert bad.returncode == 2 and b"--fast applies to a file SOURCE only" in bad.stderr


def test_missing_capture_device_is_one_line(tmp_path, sat_checkpoint):
    # no sound server in this private runtime dir: PortAudio finds no input (or is missing): one line, which and how
    env = dict(os.environ, XDG_RUNTIME_DIR=str(tmp_path), PULSE_SERVER=f"unix:{tmp_path}/none")
    devices = tympan("listen", "--list-devices", env=env)
    if devices.returncode == 0 and devices.stdout.strip():
        pytest.skip(f"this machine has a capture device: {devices.stdout.decode().splitlines()[0]}")
    mic = tympan("listen", *model_args(sat_checkpoint), env=env)
    message = mic.stderr.decode().strip()
    assert mic.returncode == 2 and len(message.splitlines()) == 1, message
    assert any(hint in message for hint in ("pip install 'tympan[live]'", "libportaudio2", "--list-devices"))


# ------------------------------------------------------------------------------------- a real capture device
PULSE_CONFIG = """\
load-module module-native-protocol-unix
load-module module-null-sink sink_name=tympan_sink rate=16000 channels=1
load-module module-remap-source source_name=tympan_mic master=tympan_sink.monitor
set-default-sink tympan_sink
set-default-source tympan_mic
"""


def _capture_unavailable() -> str | None:
    """Why a PulseAudio capture cannot be set up here (None when it can)."""
    for tool in ("pulseaudio", "pactl", "paplay"):
        if shutil.which(tool) is None:
            return f"{tool} not installed (Debian: pulseaudio pulseaudio-utils libasound2-plugins libportaudio2)"
    try:
        import sounddevice  # noqa: F401
    except (ImportError, OSError) as err:
        return f"sounddevice/PortAudio unavailable: {err}"
    return None


@pytest.fixture
def pulse_env():
    """A private PulseAudio daemon whose default input records its own null sink; yields the client environment."""
    reason = _capture_unavailable()
    if reason:
        pytest.skip(reason)
    runtime = Path(tempfile.mkdtemp(prefix="tympan-pa-"))  # short: the socket path must fit in sun_path
    runtime.chmod(0o700)
    (runtime / "default.pa").write_text(PULSE_CONFIG)
    env = dict(os.environ, XDG_RUNTIME_DIR=str(runtime), HOME=str(runtime),
               PULSE_SERVER=f"unix:{runtime}/pulse/native")
    log = (runtime / "daemon.log").open("wb")
    daemon = subprocess.Popen(
        ["pulseaudio", "-n", "-F", str(runtime / "default.pa"), "--daemonize=no", "--exit-idle-time=-1"],
        env=env, stdout=log, stderr=subprocess.STDOUT,
    )
    try:
        for _ in range(100):
            if subprocess.run(["pactl", "info"], env=env, capture_output=True).returncode == 0:
                break
            if daemon.poll() is not None:
                pytest.fail(f"pulseaudio exited: {(runtime / 'daemon.log').read_text()}")
            threading.Event().wait(0.1)
        else:
            pytest.fail("pulseaudio did not come up")
        yield env
    finally:
        daemon.terminate()
        try:
            daemon.wait(timeout=10)
        except subprocess.TimeoutExpired:
            daemon.kill()
            daemon.wait()
        log.close()
        shutil.rmtree(runtime, ignore_errors=True)


def test_microphone_capture_equals_tag_on_the_recording(pulse_env, tmp_path, data_dir, sat_checkpoint):
    clip = data_dir / CLIP
    out = tmp_path / "mic.wav"
    cmd = [sys.executable, "-m", "tympan", "listen", "--seconds", "9", "--record", str(out), "--format", "jsonl",
           *model_args(sat_checkpoint)]
    listen = subprocess.Popen(cmd, env=pulse_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    stdout: list[bytes] = []
    reader = threading.Thread(target=lambda: stdout.append(listen.stdout.read()), daemon=True)
    reader.start()
    try:
        seen = []  # PortAudio/ALSA may print notices before the readiness line
        while not (seen and seen[-1].startswith("tympan listen: listening to input device")):
            line = listen.stderr.readline().decode()
            assert line, "listen ended before it was ready:\n" + "".join(seen)
            seen.append(line)
        play = subprocess.run(["paplay", str(clip)], env=pulse_env, capture_output=True, timeout=60)
        assert play.returncode == 0, play.stderr.decode()
        rest = listen.stderr.read().decode()
        assert listen.wait(timeout=120) == 0, rest
    finally:
        if listen.poll() is None:
            listen.kill()
            listen.wait()
    reader.join()
    assert "chunks, 9.00 s of audio" in rest.splitlines()[-1]

    recorded, rate = sf.read(out, dtype="float32")
    reference = sf.read(clip, dtype="float32")[0]
    assert rate == 16000 and len(recorded) == 9 * 16000
    offset = int(np.flatnonzero(recorded)[0] - np.flatnonzero(reference)[0])
    assert 0 <= offset and offset + len(reference) <= len(recorded)
    np.testing.assert_array_equal(recorded[offset:offset + len(reference)], reference)  # the clip, bit for bit

    live = live_chunks(stdout[0])
    assert len(live) == 5 and live[-1]["end"] == 9.0
    assert_same_tags(live, tag_chunks(out, sat_checkpoint))
