"""Parity of ``tympan.ops.selective_scan`` with DASS's selective scan (fixture kind ``dass-selective-scan``).

Cases are the name prefixes in io.safetensors (``<case>.u``, ``<case>.output``, ...), discovered, not listed.
"""

from __future__ import annotations

from tests.parity import Fixture, checks_for
from tympan.ops import selective_scan

OPTIONAL = ("D", "z", "delta_bias")


def scan_cases(fx: Fixture) -> list[str]:
    return sorted({name.rsplit(".", 1)[0] for name in fx.tensors if name.endswith(".output")})


@checks_for("dass-selective-scan")
def check_selective_scan(fx: Fixture) -> None:
    layout = fx.meta.get("layout", {})
    tol = fx.meta.get("suggested_tolerance", {})
    atol, rtol = tol.get("atol", 1e-5), tol.get("rtol", 1e-5)
    softplus = bool(layout.get("delta_softplus", True))
    cases = scan_cases(fx)
    assert cases, "no '<case>.output' tensors in the fixture"
    for case in cases:
        inputs = {k: fx[f"{case}.{k}"] for k in ("u", "delta", "A", "B", "C")}
        inputs.update({k: fx[f"{case}.{k}"] for k in OPTIONAL if fx.has(f"{case}.{k}")})
        for backend in ("chunked", "reference"):
            y = selective_scan(**inputs, delta_softplus=softplus, backend=backend)
            fx.compare(f"{case}.output", y, atol=atol, rtol=rtol)
