import os
from pathlib import Path

import pytest
import torch
from hypothesis import settings

# CI runs the same examples every time (a red CI lands nothing); locally hypothesis explores new ones each run.
settings.register_profile("ci", derandomize=True, deadline=None, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("TYMPAN_SHARED", REPO.parent / "shared"))

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    assert SHARED.is_dir(), f"shared data not found at {SHARED} (set TYMPAN_SHARED)"
    return SHARED


@pytest.fixture(scope="session")
def data_dir(shared_dir) -> Path:
    return shared_dir / "data"
