"""Parity harness: fixture folders made by the original code, and the checks that compare tympan to them.

A fixture folder holds ``meta.json``, ``io.safetensors`` and (usually) ``checkpoint.pt``. Its kind is the
``model_id``/``fixture_id`` in ``meta.json`` (falling back to the folder name), so other sets of the same
layout (other seeds, lengths) are checked the same way. Check functions are registered per kind in the
``tests/parity/check_*.py`` modules with :func:`checks_for`; each one compares every tensor it knows about
that the fixture carries (sets differ in which optional tensors they hold) through :meth:`Fixture.compare`.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Callable

import torch

REPO = Path(__file__).resolve().parents[2]


def fixtures_root() -> Path:
    return Path(os.environ.get("TYMPAN_FIXTURES", REPO.parent / "shared" / "fixtures"))


def fixture_dirs() -> list[Path]:
    root = fixtures_root()
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if (p / "meta.json").is_file())


@dataclass
class Comparison:
    name: str
    max_abs_err: float
    atol: float
    rtol: float
    ok: bool


@dataclass
class Fixture:
    path: Path
    results: list[Comparison] = field(default_factory=list)

    @cached_property
    def meta(self) -> dict:
        return json.loads((self.path / "meta.json").read_text())

    @property
    def kind(self) -> str:
        return self.meta.get("model_id") or self.meta.get("fixture_id") or self.path.name

    @cached_property
    def tensors(self) -> dict[str, torch.Tensor]:
        from safetensors.torch import load_file

        return load_file(str(self.path / "io.safetensors"))

    @property
    def checkpoint(self) -> Path:
        return self.path / "checkpoint.pt"

    def chunk_index(self, name: str) -> int:
        """The chunk that meta.json says tensor ``name`` is: ``NAME = chunk N`` in a ``forward_call(s)`` entry, else
        ``chunk N`` in the tensor's own description; 0 when it names none."""
        import re

        calls = self.meta.get("forward_calls", self.meta.get("forward_call", ""))
        text = " ".join(map(str, calls.values())) if isinstance(calls, dict) else str(calls)
        found = re.search(rf"\b{re.escape(name)}\s*=\s*chunk (\d+)\b", text)
        info = self.meta.get("tensors", {}).get(name)
        meaning = str(info.get("meaning", "") if isinstance(info, dict) else info or "")
        found = found or re.search(r"\bchunk (\d+)\b", meaning)
        return int(found.group(1)) if found else 0

    def lengths_for(self, input_name: str) -> torch.Tensor | None:
        """The lengths tensor given with ``input_name`` (``x_length`` with ``input``, ``masked_x_length`` with
        ``masked_input``), or ``None`` when the fixture holds none."""
        name = input_name[: -len("input")] + "x_length"
        return self.tensors.get(name)

    def has(self, *names: str) -> bool:
        return all(n in self.tensors for n in names)

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.tensors[name]

    def compare(self, name: str, actual: torch.Tensor, atol: float, rtol: float = 0.0) -> None:
        """Record the max abs error of ``actual`` against the stored tensor ``name`` (checked in :meth:`verify`)."""
        expected = self.tensors[name]
        actual = actual.detach().to(torch.float64).cpu()
        expected64 = expected.to(torch.float64)
        if actual.shape != expected64.shape:
            self.results.append(Comparison(f"{name} shape {tuple(actual.shape)} != {tuple(expected.shape)}", float("inf"), atol, rtol, False))
            return
        err = (actual - expected64).abs()
        ok = bool(torch.all(err <= atol + rtol * expected64.abs()))
        self.results.append(Comparison(name, float(err.max()) if err.numel() else 0.0, atol, rtol, ok))

    def verify(self) -> None:
        for r in self.results:
            print(f"{self.path.name}: {r.name:32s} max abs err {r.max_abs_err:.3e} (atol {r.atol:g}, rtol {r.rtol:g})")
        failed = [r for r in self.results if not r.ok]
        assert self.results, f"{self.path.name}: no tensor was compared"
        assert not failed, f"{self.path.name}: parity failed for " + ", ".join(
            f"{r.name} ({r.max_abs_err:.3e})" for r in failed
        )


CheckFn = Callable[[Fixture], None]
_CHECKS: dict[str, list[CheckFn]] = {}


def checks_for(*kinds: str) -> Callable[[CheckFn], CheckFn]:
    """Register a check for fixtures of the given kinds."""

    def register(fn: CheckFn) -> CheckFn:
        for kind in kinds:
            _CHECKS.setdefault(kind, []).append(fn)
        return fn

    return register


def registered_checks(kind: str) -> list[CheckFn]:
    import importlib
    import pkgutil

    for module in pkgutil.iter_modules(__path__):
        if module.name.startswith("check_"):
            importlib.import_module(f"{__name__}.{module.name}")
    return _CHECKS.get(kind, [])
