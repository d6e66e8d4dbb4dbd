"""YAMNet (AudioSet, 521 classes) as a teacher and peer: Qualcomm AI Hub's w8a8 ONNX export plus its frontend.

The graph (MobileNet-v1 in QDQ form) takes one uint8 log-mel patch ``[1, 1, 96, 64]`` and gives uint8 logits
``[1, 521]``. :class:`YAMNet` patches it in memory for a symbolic batch (the ``Reshape`` before the classifier
hard-codes ``[1, -1]``; it becomes ``[-1, 1024]``) and exposes the 1024-d embedding (the classifier's input,
``/model/Reshape_output_0_qdq``). Scores are ``sigmoid`` of the dequantised logits.

The frontend is the original TF YAMNet's (``features.py`` / ``params.py``), written here in float64 numpy:

1. zero-pad to at least 15,600 samples (0.96 + 0.025 - 0.010 s), then to a whole number of 0.48 s hops after the
   first patch (a 5 s clip becomes 84,720 samples, 10 patches);
2. STFT: 400-sample periodic Hann window, 160-sample hop, 512-point FFT, no centring; magnitude;
3. 64 HTK-mel triangles over 125-7500 Hz built like ``tf.signal.linear_to_mel_weight_matrix`` (257 bins, zeroed
   DC row, no area normalisation);
4. ``log(mel + 0.001)``; patches of 96 frames with a 48-frame hop (patch ``i`` covers samples
   ``[7680 i, 7680 i + 15600)``, one prediction every 0.48 s);
5. the graph's input quantisation (scale 0.0479, zero point 144, read from the graph): log-mel range [-6.90, 5.32].

>>> yamnet = YAMNet("YamNet_w8a8.onnx.zip")          # class map: yamnet_class_map.csv beside the zip
>>> scores, embeddings = yamnet.frames(waveform_16k)  # [n_patches, 521] probabilities, [n_patches, 1024]
>>> scores, embedding = yamnet.clip(waveform_16k)     # [521], [1024] (mean over patches)
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from tympan.labels import LabelSet
from tympan.teachers.onnx import OnnxTeacher, require

__all__ = [
    "EMBEDDING_TENSOR",
    "FEATURE_MAP_SHAPE",
    "FEATURE_MAP_TENSOR",
    "YAMNet",
    "log_mel_spectrogram",
    "log_mel_patches",
    "mel_weight_matrix",
    "pad_waveform",
]

SAMPLE_RATE = 16000
WINDOW_SAMPLES = 400  # 25 ms
HOP_SAMPLES = 160  # 10 ms
FFT_SIZE = 512
NUM_MELS = 64
MEL_LOW_HZ, MEL_HIGH_HZ = 125.0, 7500.0
LOG_OFFSET = 0.001
PATCH_FRAMES, PATCH_HOP_FRAMES = 96, 48  # 0.96 s, 0.48 s
PATCH_HOP_SAMPLES = PATCH_HOP_FRAMES * HOP_SAMPLES  # 7680
MIN_SAMPLES = (PATCH_FRAMES - 1) * HOP_SAMPLES + WINDOW_SAMPLES  # 15600 = 0.96 + 0.025 - 0.010 s
EMBEDDING_TENSOR = "/model/Reshape_output_0_qdq"
EMBEDDING_SIZE = 1024
# the last pointwise block's ReLU map before the global average pool, ``[batch, 1024, 3, 2]`` (time x frequency):
# per-position targets for distillation; its mean over the 6 positions is the embedding before re-quantisation
FEATURE_MAP_TENSOR = "/model/layer14/pointwise_conv/relu/Relu_output_0_updated"
FEATURE_MAP_SHAPE = (EMBEDDING_SIZE, 3, 2)
CLASS_MAP_NAME = "yamnet_class_map.csv"


def _hz_to_mel(hz: np.ndarray) -> np.ndarray:
    """HTK mel scale, as YAMNet/TF: ``1127 ln(1 + f / 700)``."""
    return 1127.0 * np.log1p(hz / 700.0)


@lru_cache(maxsize=None)
def mel_weight_matrix(
    num_mels: int = NUM_MELS,
    num_bins: int = FFT_SIZE // 2 + 1,
    sample_rate: int = SAMPLE_RATE,
    low_hz: float = MEL_LOW_HZ,
    high_hz: float = MEL_HIGH_HZ,
) -> np.ndarray:
    """``[num_bins, num_mels]`` mel-space triangles, DC row zeroed, as ``tf.signal.linear_to_mel_weight_matrix``."""
    bin_mels = _hz_to_mel(np.linspace(0.0, sample_rate / 2, num_bins)[1:])[:, None]
    edges = np.linspace(_hz_to_mel(np.float64(low_hz)), _hz_to_mel(np.float64(high_hz)), num_mels + 2)
    lower, centre, upper = edges[:-2], edges[1:-1], edges[2:]
    rising = (bin_mels - lower) / (centre - lower)
    falling = (upper - bin_mels) / (upper - centre)
    weights = np.maximum(0.0, np.minimum(rising, falling))
    weights = np.concatenate([np.zeros((1, num_mels)), weights])
    weights.flags.writeable = False
    return weights


@lru_cache(maxsize=None)
def _periodic_hann(length: int) -> np.ndarray:
    window = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(length) / length)
    window.flags.writeable = False
    return window


def pad_waveform(waveform: np.ndarray) -> np.ndarray:
    """Zero-pad the end to >= 15,600 samples and then to a whole number of 7,680-sample hops after the first patch."""
    length = max(len(waveform), MIN_SAMPLES)
    hops = -(-(length - MIN_SAMPLES) // PATCH_HOP_SAMPLES)  # ceil
    return np.pad(waveform, (0, MIN_SAMPLES + hops * PATCH_HOP_SAMPLES - len(waveform)))


def _frame(x: np.ndarray, size: int, hop: int) -> np.ndarray:
    """``[..., N] -> [..., n_frames, size]`` strided view, frames starting at 0, no padding."""
    count = (x.shape[-1] - size) // hop + 1
    return np.lib.stride_tricks.sliding_window_view(x, size, axis=-1)[..., : count * hop : hop, :]


def log_mel_spectrogram(waveform: np.ndarray) -> np.ndarray:
    """``[N]`` 16 kHz waveform (already padded) -> ``[frames, 64]`` float64 ``log(mel + 0.001)``."""
    frames = _frame(np.asarray(waveform, dtype=np.float64), WINDOW_SAMPLES, HOP_SAMPLES)
    frames = frames * _periodic_hann(WINDOW_SAMPLES)
    magnitude = np.abs(np.fft.rfft(frames, n=FFT_SIZE, axis=-1))
    return np.log(magnitude @ mel_weight_matrix() + LOG_OFFSET)


def log_mel_patches(waveform: np.ndarray) -> np.ndarray:
    """``[N]`` 16 kHz waveform -> ``[n_patches, 1, 96, 64]`` float32 log-mel patches (YAMNet's model input)."""
    log_mel = log_mel_spectrogram(pad_waveform(np.asarray(waveform)))
    patches = _frame(log_mel.T, PATCH_FRAMES, PATCH_HOP_FRAMES).transpose(1, 2, 0)  # [n, 96, 64]
    return np.ascontiguousarray(patches[:, None], dtype=np.float32)


class YAMNet(OnnxTeacher):
    """YAMNet's quantised ONNX graph behind its own log-mel patch frontend; see the module docstring.

    Args:
        model: ``YamNet_w8a8.onnx.zip`` (unzipped once into the cache) or the unzipped ``model.onnx``.
        num_threads: onnxruntime threads.
        batch_size: patches per ``session.run`` call.
        class_map: ``yamnet_class_map.csv``; by default the one beside `model` (or beside the zip), if any.
        embedding_output: the tensor :meth:`run` returns beside the scores: the 1024-d embedding, or
            :data:`FEATURE_MAP_TENSOR` for the last map flattened to ``[n, 1024 * 3 * 2]`` (reshape it to
            ``[n, *FEATURE_MAP_SHAPE]``).
    """

    embedding_size = EMBEDDING_SIZE
    patch_hop_seconds = PATCH_HOP_SAMPLES / SAMPLE_RATE
    patch_seconds = MIN_SAMPLES / SAMPLE_RATE

    def __init__(
        self,
        model: str | os.PathLike,
        num_threads: int = 2,
        batch_size: int = 256,
        class_map: str | os.PathLike | LabelSet | None = None,
        cache: str | os.PathLike | None = None,
        embedding_output: str = EMBEDDING_TENSOR,
    ) -> None:
        if embedding_output not in (EMBEDDING_TENSOR, FEATURE_MAP_TENSOR):
            raise ValueError(f"embedding_output must be {EMBEDDING_TENSOR!r} or {FEATURE_MAP_TENSOR!r}, "
                             f"got {embedding_output!r}")  # fmt: skip
        if class_map is None and (Path(model).parent / CLASS_MAP_NAME).is_file():
            class_map = Path(model).parent / CLASS_MAP_NAME
        super().__init__(
            model,
            sample_rate=SAMPLE_RATE,
            labels=class_map,
            activation="sigmoid",
            embedding_output=embedding_output,
            num_threads=num_threads,
            batch_size=batch_size,
            cache=cache,
        )
        self.embedding_size = EMBEDDING_SIZE if embedding_output == EMBEDDING_TENSOR else int(np.prod(FEATURE_MAP_SHAPE))

    def prepare_graph(self, model: Any) -> None:
        """The classifier's ``Reshape`` target ``[1, -1]`` becomes ``[-1, 1024]`` so the batch can vary; an exposed
        last map is declared with its own 4-d shape."""
        onnx = require("onnx")
        for output in model.graph.output:
            if output.name == FEATURE_MAP_TENSOR:
                output.CopyFrom(onnx.helper.make_tensor_value_info(FEATURE_MAP_TENSOR, onnx.TensorProto.FLOAT,
                                                                   ["batch", *FEATURE_MAP_SHAPE]))  # fmt: skip
        reshapes = [node for node in model.graph.node if node.op_type == "Reshape"]
        if len(reshapes) != 1:
            raise ValueError(f"expected YAMNet's single Reshape node, found {len(reshapes)}: not the YAMNet graph?")
        shape_name = reshapes[0].input[1]
        for i, tensor in enumerate(model.graph.initializer):
            if tensor.name == shape_name:
                shape = np.array([-1, EMBEDDING_SIZE], dtype=np.int64)
                model.graph.initializer[i].CopyFrom(onnx.numpy_helper.from_array(shape, shape_name))
                return
        raise ValueError(f"YAMNet's Reshape target {shape_name!r} is not an initializer")

    def windows(self, waveform: np.ndarray) -> np.ndarray:
        return log_mel_patches(waveform)

    def timestamps(self, num_patches: int) -> np.ndarray:
        """Centre of each patch in seconds (patch ``i`` spans ``[0.48 i, 0.48 i + 0.975)`` s)."""
        return np.arange(num_patches) * self.patch_hop_seconds + self.patch_seconds / 2
