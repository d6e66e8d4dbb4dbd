"""Frozen teachers and peers run through onnxruntime (optional: ``pip install 'tympan[onnx]'``).

:class:`OnnxTeacher` runs any ONNX audio classifier (waveform in, scores out); :class:`YAMNet` specialises it with
YAMNet's log-mel patch frontend and its 1024-d embedding. onnx/onnxruntime are imported only when a teacher is built.
"""

from tympan.teachers.onnx import OnnxTeacher
from tympan.teachers.yamnet import YAMNet

__all__ = ["OnnxTeacher", "YAMNet"]
