"""Assemble the demo scene ``tympan/assets/demo_scene_16k.flac``: several kinds of sound in one file, in turn.

    python recipes/default_model/make_demo.py [--shared ../shared] [--soundfont /path/FluidR3_GM.sf2]

Speech (FSDD, CC BY-SA 4.0), a dog barking, rain, a helicopter, a cow, a piano melody (rendered with fluidsynth from
the FluidR3 General MIDI soundfont, MIT) and church bells (from shared/data/mod-sounds: the effects are CC0, the bells
CC BY 3.0 by Jonathan Shaw (InspectorJ)).
Each piece is resampled to 16 kHz, faded in and out (20 ms) and normalised; pieces follow each other with 0.3 s
gaps. As an adaptation of CC BY-SA 4.0 material the clip is licensed CC BY-SA 4.0 (``DEMO_SCENE.md``).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from tympan import audio
from tympan.data.corpus import general_midi_file

REPO = Path(__file__).resolve().parents[2]
RATE = 16000

# (label, path under shared/data or "piano", seconds kept, repeats)
PIECES = [
    ("speech", ["fsdd/recordings/3_jackson_7.wav", "fsdd/recordings/1_jackson_7.wav", "fsdd/recordings/4_jackson_7.wav"], None, 1),
    ("dog", ["mod-sounds/sounds/sounds_dog_bark.ogg"], None, 2),
    ("rain", ["mod-sounds/sounds/sounds_rain_medium.ogg"], 3.0, 1),
    ("helicopter", ["mod-sounds/sounds/sounds_helicopter.ogg"], None, 2),
    ("cow", ["mod-sounds/sounds/sounds_cow_moo_01.ogg"], None, 1),
    ("piano", ["piano"], 3.0, 1),
    ("church bells", ["mod-sounds/sounds/sounds_church_bells_01.ogg"], 3.0, 1),
]


def fade(x: np.ndarray, seconds: float = 0.02) -> np.ndarray:
    n = min(len(x) // 2, int(seconds * RATE))
    ramp = np.linspace(0.0, 1.0, n, dtype=np.float32)
    x = x.copy()
    x[:n] *= ramp
    x[len(x) - n :] *= ramp[::-1]
    return x


def piano(soundfont: Path) -> np.ndarray:
    with tempfile.TemporaryDirectory() as tmp:
        midi, wav = Path(tmp) / "p.mid", Path(tmp) / "p.wav"
        midi.write_bytes(general_midi_file(0, seed=7, notes=8))
        subprocess.run(["fluidsynth", "-ni", "-g", "0.8", "-r", str(RATE), "-F", str(wav), str(soundfont), str(midi)],
                       check=True, capture_output=True)  # fmt: skip
        return audio.load(wav)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shared", default=str(REPO.parent / "shared"))
    parser.add_argument("--soundfont", default="/work/cache/corpus/pkgs/fluid-soundfont-gm/usr/share/sounds/sf2/FluidR3_GM.sf2")
    parser.add_argument("--out", default=str(REPO / "tympan" / "assets" / "demo_scene_16k.flac"))
    args = parser.parse_args(argv)
    data = Path(args.shared) / "data"
    gap = np.zeros(int(0.3 * RATE), dtype=np.float32)
    parts, timeline, t = [], [], 0.0
    for label, paths, keep, repeats in PIECES:
        pieces = [piano(Path(args.soundfont)) if p == "piano" else audio.load(data / p) for p in paths]
        x = np.concatenate([np.concatenate([fade(p), gap[: len(gap) // 3]]) for p in pieces])
        if keep is not None:
            x = x[: int(keep * RATE)]
        x = np.concatenate([fade(x)] * repeats)
        x = 0.7 * x / max(1e-6, float(np.abs(x).max()))
        timeline.append((label, round(t, 2), round(t + len(x) / RATE, 2)))
        parts += [x, gap]
        t += (len(x) + len(gap)) / RATE
    scene = np.concatenate(parts)
    audio.save(args.out, scene, RATE)
    for label, start, end in timeline:
        print(f"{start:6.2f}-{end:6.2f} s  {label}")
    print(f"{args.out}: {len(scene) / RATE:.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
