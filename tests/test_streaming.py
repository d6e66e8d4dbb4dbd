"""The streaming engine on real ESC-10 audio with the SAT-T fixture checkpoint (a full-size SAT-T)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tympan
from tympan import audio
from tympan.inference import Streamer
from tympan.models import create_model


@pytest.fixture(scope="module")
def sat(shared_dir):
    return tympan.load("sat-tiny-2s", checkpoint=shared_dir / "fixtures" / "sat-tiny-2s" / "checkpoint.pt")


@pytest.fixture(scope="module")
def clips(data_dir):
    files = sorted((data_dir / "esc10" / "audio").glob("*.flac"))
    return [torch.from_numpy(audio.load(files[i])) for i in (0, 100)], files[0]


def _outputs(results):
    return torch.stack([r.output for r in results])


def _step_loop(model, clip, step):
    """Reference: whole model steps carrying the state, then one zero-padded step for the tail (state untouched)."""
    state, probs, ends = model.init_state(1), [], []
    for start in range(0, clip.numel(), step):
        piece = clip[None, start:start + step]
        padded = torch.nn.functional.pad(piece, (0, step - piece.shape[1]))
        logits, new_state = model.step(padded, state)
        if piece.shape[1] == step:
            state = new_state
        probs.append(model.probabilities(logits)[0])
        ends.append(start + piece.shape[1])
    return probs, ends


@torch.no_grad()
def test_sat_chunks_run_whole_steps_and_skip_no_audio(sat, clips):
    """Issue 14 item 4: --chunk 3 on SAT-2s (1.92 s steps) used to drop the last 1.08 s of every chunk."""
    (clip, _), _ = clips
    clip = torch.cat([clip, clip[:11000]])  # 5.69 s: chunks [0, 3) and a partial [3, 5.69)
    results = Streamer(sat, 3.0).run(clip)
    assert [(r.start, r.end, r.partial) for r in results] == [(0, 3, False), (3, clip.numel() / 16000, True)]
    probs, ends = _step_loop(sat, clip, sat.chunk_samples)  # steps end at 1.92, 3.84, 5.69 (padded tail)
    assert len(probs) == 3
    expected = torch.stack([probs[0], (probs[1] + probs[2]) / 2])
    torch.testing.assert_close(_outputs(results)[:, 0], expected, atol=1e-6, rtol=1e-5)


@torch.no_grad()
def test_streaming_chunk_longer_than_step_feeds_exact_steps():
    """TymNet's step takes exactly 7680 samples: 1 s chunks run two steps each and carry the 0.04 s remainder."""
    torch.manual_seed(0)
    model = create_model("tymnet-s").eval()
    clip = torch.randn(16000 * 3 + 5000) * 0.1
    results = Streamer(model, 1.0).run(clip)
    probs, ends = _step_loop(model, clip, model.chunk_samples)
    assert [r.end for r in results] == [1.0, 2.0, 3.0, clip.numel() / 16000]
    for result, (lo, hi) in zip(results, [(0, 16000), (16000, 32000), (32000, 48000), (48000, clip.numel())]):
        inside = [p for p, end in zip(probs, ends) if lo < end <= hi]
        torch.testing.assert_close(result.output[0], torch.stack(inside).mean(0), atol=1e-6, rtol=1e-5)


@torch.no_grad()
def test_partial_chunk_does_not_update_memory(sat, clips):
    (clip, other), _ = clips
    step = sat.chunk_samples
    streamer = Streamer(sat, step / 16000)
    streamer.push(clip[:step])
    memory = streamer.memory.clone()
    streamer.push(clip[step:step + 8000])
    assert streamer.flush()[0].partial
    torch.testing.assert_close(streamer.memory, memory)
    # continuing after the flush equals never having seen the tail
    after = streamer.push(other[:step])[0].output
    reference = Streamer(sat, step / 16000)
    reference.push(clip[:step])
    torch.testing.assert_close(after, reference.push(other[:step])[0].output)


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cuts=st.lists(st.integers(min_value=1, max_value=79999), min_size=1, max_size=6))
@torch.no_grad()
def test_push_sizes_do_not_matter(sat, clips, cuts):
    (clip, _), _ = clips
    whole = Streamer(sat, 2.0).run(clip)
    streamer = Streamer(sat, 2.0)
    bounds = [0, *sorted(set(cuts)), clip.numel()]
    pieces = [clip[a:b].numpy() for a, b in zip(bounds, bounds[1:])]  # numpy pieces: any array type works
    results = list(streamer.run_blocks(pieces))
    assert [(r.index, r.start, r.end) for r in results] == [(r.index, r.start, r.end) for r in whole]
    assert torch.equal(_outputs(results), _outputs(whole))


@torch.no_grad()
def test_reset_between_files_and_run_file(sat, clips):
    (first, second), path = clips
    streamer = Streamer(sat, 2.0)
    streamer.run(first)
    fresh = Streamer(sat, 2.0).run(second)
    assert torch.equal(_outputs(streamer.run(second)), _outputs(fresh))  # run() resets: no memory carried over
    carried = Streamer(sat, 2.0)
    carried.push(first[:64000])
    assert not torch.allclose(carried.push(second[:32000])[0].output, fresh[0].output)
    from_file = list(streamer.run_file(path, block_seconds=0.7))
    assert torch.equal(_outputs(from_file), _outputs(streamer.run(first)))


@torch.no_grad()
def test_streams_in_lockstep_are_independent(sat, clips):
    (first, second), _ = clips
    n = min(first.numel(), second.numel())
    both = Streamer(sat, 2.0, streams=2).run(torch.stack([first[:n], second[:n] * 0.01]))
    for i, clip in enumerate((first[:n], second[:n] * 0.01)):
        alone = Streamer(sat, 2.0).run(clip)
        torch.testing.assert_close(_outputs(both)[:, i], _outputs(alone)[:, 0], atol=1e-5, rtol=1e-4)


@torch.no_grad()
def test_independent_models_score_each_chunk(clips):
    (clip, _), _ = clips
    torch.manual_seed(0)
    vit = create_model("audiotransformer-tiny", embed_dim=32, depth=1, num_heads=2).eval()
    results = Streamer(vit, 1.5).run(clip)
    expected = torch.stack([vit.probabilities(vit(p)) for p in clip[None].split(24000, dim=-1)])
    torch.testing.assert_close(_outputs(results), expected, atol=1e-6, rtol=1e-5)
    encoder = create_model("dasheng-base", embed_dim=32, depth=1, num_heads=2).eval()
    embeddings = Streamer(encoder, 1.0).run(clip)
    # 80016 samples: five 1 s chunks; the 16-sample tail is shorter than one patch and dropped
    assert len(embeddings) == 5 and embeddings[0].output.shape == (1, 32)


def test_bad_arguments(sat):
    with pytest.raises(ValueError, match="minimum is 1.92 s"):
        Streamer(sat, 1.0)
    with pytest.raises(ValueError, match="expected audio"):
        Streamer(sat, 2.0, streams=2).push(np.zeros(100))
