"""Chunk-wise tagging of live or long audio: push samples of any size, get one result per chunk.

:class:`Streamer` cuts the incoming 16 kHz audio into consecutive ``chunk_seconds`` chunks, exactly like SAT's
``inference.py`` (each chunk's spectrogram is computed on that chunk alone, its dB floor per stream), and runs the
model on each chunk as soon as it is complete:

* streaming models (``model.streaming``: SAT, TymNet) carry their state through the protocol's ``init_state`` /
  ``steps``, in model steps of exactly ``model.chunk_samples``; all the steps one push completes run in one call
  (a batch for TymNet), so a file is tagged in blocks, not step by step (SAT starts from the original's "silence"
  memory). The reported chunks are independent of the step size: a chunk's output is the mean of the probabilities
  of the steps that end inside it, and samples left over at a chunk's end are carried into the next step, so no
  audio is skipped (``--chunk 3`` on SAT-2s runs 1.92 s steps back to back). A chunk must hold at least one step;
* every other model (the SAT repo's ViTs, Dasheng, AST, DASS, SSAM, ...) sees each chunk independently, through its
  frontend, one stream at a time (so streams never share a batch statistic such as Dasheng's dB floor). A tagger
  yields probabilities (``model.predict``), an encoder its scene embedding per chunk.

Two bugs of the original streaming loop are not copied:

* the memory is NOT kept across files: :meth:`Streamer.reset` (called by :meth:`Streamer.run_file`) restores the
  silence memory;
* a final partial chunk (:meth:`Streamer.flush`) scores its pending samples as one last step zero-padded to
  ``chunk_samples``, but that step does NOT update the memory: the original shifts its flat 48-token memory by only
  the partial chunk's tokens, which scrambles the frequency/time layout the next chunk assumes. A stream that goes
  on after a flush therefore continues from the last full step's memory.

Several streams (e.g. microphones) advance in lockstep as one batch: push ``[streams, n]`` arrays. Memory use is
bounded by one chunk of pending samples per stream plus the model's memory, whatever the input length.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Iterable, Iterator

import numpy as np
import torch
from torch import Tensor, nn

from tympan.models.protocol import State, audio_model

SAMPLE_RATE = 16000
HOP_LENGTH = 160


class ChunkTooShortError(ValueError):
    """A chunk shorter than one step of a streaming model (a usage error: the message names the minimum)."""


@dataclass(frozen=True)
class ChunkResult:
    """The model's output for one chunk of every stream."""

    index: int
    start: float  # seconds from the start of the stream (or since the last reset)
    end: float  # seconds; the true end for a partial final chunk
    output: Tensor  # [streams, classes] probabilities (or [streams, D] scene embedding of an encoder)
    partial: bool = False


class Streamer:
    """Feed audio in pieces of any size, receive per-chunk results.

    Args:
        model: a tympan model in eval mode (streaming models carry their state; anything else runs per chunk).
        chunk_seconds: reported chunk length; default 2.0 s, or a streaming model's ``chunk_samples`` rounded up
            to whole seconds. A streaming model's chunk must hold at least one step (``chunk_samples``).
        streams: number of parallel streams pushed as ``[streams, n]``.
        silence_memory: start from the model's warm initial state (SAT: the original's silence memory, as
            ``inference.py``) or from an empty one.
        min_tail_seconds: a final partial chunk shorter than this (or than one patch) is dropped by :meth:`flush`.
    """

    def __init__(
        self,
        model: nn.Module,
        chunk_seconds: float | None = None,
        *,
        streams: int = 1,
        silence_memory: bool = True,
        min_tail_seconds: float = 0.0,
    ):
        self.model = model = audio_model(model)
        self.streaming = model.streaming
        if chunk_seconds is None:
            chunk_seconds = math.ceil(model.chunk_samples / SAMPLE_RATE) if self.streaming else 2.0
        self.chunk_samples = round(chunk_seconds * SAMPLE_RATE)
        if self.chunk_samples <= 0:
            raise ValueError(f"chunk_seconds must be positive, got {chunk_seconds}")
        self.step_samples = int(model.chunk_samples) if self.streaming else 0
        if self.streaming and self.chunk_samples < self.step_samples:
            raise ChunkTooShortError(
                f"chunk_seconds {chunk_seconds:g} is shorter than one step of the model; the minimum is "
                f"{self.step_samples / SAMPLE_RATE:g} s"
            )
        if streams < 1:
            raise ValueError(f"streams must be >= 1, got {streams}")
        self.streams = streams
        self.silence_memory = silence_memory
        self.min_tail_samples = max(int(min_tail_seconds * SAMPLE_RATE), model.min_samples - 1)
        self._initial_state: State | None = None
        self.reset()

    # ----------------------------------------------------------------------------------------- state
    def reset(self) -> None:
        """Start a new stream (file): empty buffer, chunk counter 0, a streaming model's state back to its start."""
        self._pending: list[Tensor] = []
        self._pending_samples = 0
        self._index = 0
        self._offset = 0
        self._step: list[Tensor] = []  # streaming: samples of the model step in progress (< step_samples)
        self._step_samples = 0
        self._chunk_probs: list[Tensor] = []  # streaming: probabilities of the steps ended in the current chunk
        self._chunk_filled = 0
        self.state: State = ()
        if self.streaming:
            if self._initial_state is None:  # computed once: SAT's silence memory costs a forward pass
                with torch.no_grad():
                    self._initial_state = self.model.init_state(self.streams, warm=self.silence_memory)
            self.state = self._initial_state

    @property
    def memory(self) -> Tensor | None:
        """The first tensor of a streaming model's state (SAT: its memory), ``None`` for window models."""
        return self.state[0] if self.state else None

    # ----------------------------------------------------------------------------------------- input
    def push(self, audio: Tensor | np.ndarray) -> list[ChunkResult]:
        """Append samples (``[n]`` for one stream, ``[streams, n]``); return the results of chunks completed now."""
        audio = self._as_streams(audio)
        if self.streaming:
            return self._push_steps(audio)
        results = []
        while audio.shape[1]:
            take = min(self.chunk_samples - self._pending_samples, audio.shape[1])
            self._pending.append(audio[:, :take])
            self._pending_samples += take
            audio = audio[:, take:]
            if self._pending_samples == self.chunk_samples:
                results.append(self._run(self._take_pending(), partial=False))
        return results

    def _as_streams(self, audio: Tensor | np.ndarray) -> Tensor:
        """Pushed samples as float32 ``[streams, n]``, their shape checked."""
        audio = torch.as_tensor(np.asarray(audio) if not isinstance(audio, Tensor) else audio, dtype=torch.float32)
        if audio.ndim == 1:
            audio = audio[None]
        if audio.ndim != 2 or audio.shape[0] != self.streams:
            raise ValueError(f"expected audio [{self.streams}, n] (or [n] for one stream), got {tuple(audio.shape)}")
        return audio

    @torch.no_grad()
    def _push_steps(self, audio: Tensor, final: bool = False) -> list[ChunkResult]:
        """Streaming models: the samples are cut into whole model steps; every step this push completes runs in one
        ``model.steps`` call (one batch where the family vectorises it), then each chunk that filled up reports the
        mean of the steps that ended inside it.

        ``final`` (the end of a recording, :meth:`run_blocks`): the final partial chunk that :meth:`flush` would
        score joins the same call as one more zero-padded step; the stream then ends (``reset`` before reuse)."""
        step, chunk = self.step_samples, self.chunk_samples
        pending, incoming = self._step_samples, audio.shape[1]
        count = (pending + incoming) // step  # steps completed now; step j ends at push offset (j + 1) * step - pending
        if count or final:
            joined = torch.cat([*self._step, audio], dim=1) if self._step else audio
            completed, rest = joined[:, : count * step], joined[:, count * step :]
            # the step in progress: a copy, not a view that keeps the whole block alive
            self._step, self._step_samples = ([rest.clone()] if rest.shape[1] else []), rest.shape[1]
        else:  # small pushes (a microphone's 10 ms blocks): gather the pieces, join them once per step
            completed, rest = audio[:, :0], audio[:, :0]
            self._step.append(audio)
            self._step_samples += incoming
        # chunk i of this push ends at push offset (chunk - filled) + i * chunk; a step ending there counts before it
        ends = [chunk - self._chunk_filled + i * chunk for i in range((self._chunk_filled + incoming) // chunk)]
        reports = [(min(count, (end + pending) // step), chunk, False) for end in ends]  # (steps before, size, partial)
        filled = (self._chunk_filled + incoming) % chunk
        if final and filled:
            since_report = count - reports[-1][0] if reports else count + len(self._chunk_probs)
            if filled > self.min_tail_samples or since_report:  # else dropped, as flush drops it
                if rest.shape[1]:  # the pending samples as one zero-padded step
                    padded = torch.nn.functional.pad(rest, (0, step - rest.shape[1]))
                    completed, count = torch.cat([completed, padded], dim=1), count + 1
                reports.append((count, filled, True))
            else:
                self._offset += filled
            self._step, self._step_samples, filled = [], 0, 0
        probs: list[Tensor] = []
        if count:
            logits, self.state = self.model.steps(completed.to(self._device()), self.state)
            # step by step: an activation's SIMD tail must not depend on how many steps a push completed
            probs = [self.model.probabilities(logits[:, j].contiguous()) for j in range(count)]
            if probs[0].dtype != torch.float32 or probs[0].device.type != "cpu":
                probs = [p.float().cpu() for p in probs]
        results, used = [], 0
        for steps_before, chunk_filled, partial in reports:
            self._chunk_probs.extend(probs[used:steps_before])
            used = steps_before
            self._chunk_filled = chunk_filled
            results.append(self._report(partial=partial))
        self._chunk_probs.extend(probs[used:])
        self._chunk_filled = filled
        return results

    def _report(self, partial: bool) -> ChunkResult:
        """The current chunk's result: the mean of its steps' probabilities."""
        start = self._offset / SAMPLE_RATE
        self._offset += self._chunk_filled
        probs = self._chunk_probs  # one step (the default chunk): the mean is that step itself
        output = probs[0] if len(probs) == 1 else torch.stack(probs).mean(0)
        result = ChunkResult(self._index, start, self._offset / SAMPLE_RATE, output, partial)
        self._index += 1
        self._chunk_probs, self._chunk_filled = [], 0
        return result

    @torch.no_grad()
    def _flush_steps(self) -> list[ChunkResult]:
        """The final partial chunk of a streaming model: the end-of-recording rule of :meth:`_push_steps` (pending
        samples as one zero-padded step; too short a chunk with no finished step dropped), but the state stays at the
        last full step so that the stream can go on."""
        state = self.state
        results = self._push_steps(torch.zeros(self.streams, 0), final=True)
        self.state = state
        return results

    def flush(self) -> list[ChunkResult]:
        """Score the pending partial chunk (if long enough) without updating a streaming model's state."""
        if self.streaming:
            return self._flush_steps()
        if self._pending_samples == 0:
            return []
        chunk = self._take_pending()
        if chunk.shape[1] <= self.min_tail_samples:
            self._offset += chunk.shape[1]
            return []
        return [self._run(chunk, partial=True)]

    def run(self, audio: Tensor | np.ndarray) -> list[ChunkResult]:
        """One whole recording: reset, push, flush."""
        self.reset()
        return self.push(audio) + self.flush()

    def run_blocks(self, blocks: Iterable[Tensor | np.ndarray]) -> Iterator[ChunkResult]:
        """Results of a recording given as consecutive blocks (bounded memory); resets first, flushes last.

        A streaming model scores the final partial chunk in the same ``steps`` call as the last block's steps (one
        block of look-ahead), so the recording's end costs no extra model call; the stream has then ended."""
        self.reset()
        if not self.streaming:
            for block in blocks:
                yield from self.push(block)
            yield from self.flush()
            return
        held = None
        for block in blocks:
            if held is not None:
                yield from self.push(held)
            held = block
        if held is None:
            yield from self.flush()
            return
        yield from self._push_steps(self._as_streams(held), final=True)

    def run_file(self, path: str | os.PathLike, block_seconds: float = 30.0) -> Iterator[ChunkResult]:
        """Stream a (possibly hour-long) audio file, mono at 16 kHz, in ``block_seconds`` reads."""
        if self.streams != 1:
            raise ValueError("run_file feeds one stream; build the Streamer with streams=1")
        from tympan import audio

        return self.run_blocks(audio.stream(path, block_seconds=block_seconds, sample_rate=SAMPLE_RATE, mono=True))

    # ----------------------------------------------------------------------------------------- model
    def _take_pending(self) -> Tensor:
        chunk = torch.cat(self._pending, dim=1)
        self._pending, self._pending_samples = [], 0
        return chunk

    @torch.no_grad()
    def _run(self, chunk: Tensor, partial: bool) -> ChunkResult:
        output = self._forward(chunk.to(self._device()), partial)
        start = self._offset / SAMPLE_RATE
        self._offset += chunk.shape[1]
        result = ChunkResult(self._index, start, self._offset / SAMPLE_RATE, output.float().cpu(), partial)
        self._index += 1
        return result

    def _device(self) -> torch.device:
        return self.model.device()

    def _forward(self, chunk: Tensor, partial: bool) -> Tensor:
        return torch.cat([self._score(row[None]) for row in chunk])  # streams independent

    def _score(self, waveform: Tensor) -> Tensor:
        """One stream's chunk: probabilities of a tagger, the scene embedding of an encoder."""
        if self.model.has_head:
            return self.model.predict(waveform)
        return self.model.embed_waveform(waveform).scene
