"""Inference engines: chunk-wise streaming of live or long audio (:class:`Streamer`)."""

from tympan.inference.streaming import ChunkResult, Streamer

__all__ = ["ChunkResult", "Streamer"]
