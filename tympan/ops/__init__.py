"""Numerical kernels shared by model families (selective scan)."""

from tympan.ops.export_scan import exporting, selective_scan_export
from tympan.ops.selective_scan import BACKENDS, cuda_kernel_available, selective_scan, selective_scan_reference

__all__ = ["BACKENDS", "cuda_kernel_available", "exporting", "selective_scan", "selective_scan_export",
           "selective_scan_reference"]
