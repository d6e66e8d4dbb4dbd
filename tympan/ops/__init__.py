"""Numerical kernels shared by model families (selective scan)."""
