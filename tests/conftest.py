import inspect
import os
import re
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


def _fixtures() -> Path:
    return Path(os.environ.get("TYMPAN_FIXTURES", SHARED / "fixtures"))


def _missing_ground_truth() -> str | None:
    """Why the shared data/fixtures cannot be used here, or ``None`` when both are present."""
    missing = [f"{name} at {path}" for name, path in (("shared data", SHARED), ("fixtures", _fixtures()))
               if not path.is_dir()]
    if not missing:
        return None
    return f"{' and '.join(missing)} not found (set TYMPAN_SHARED / TYMPAN_FIXTURES)"


def _needs_ground_truth(item: pytest.Item) -> bool:
    """Tests that read ../shared: through the fixtures below, by calling ``fixtures_root()``, or through a module-level
    path under the shared folders (``AST_FIXTURE = fixtures_root() / ...``) that their source names."""
    if {"shared_dir", "data_dir"} & set(getattr(item, "fixturenames", ())):
        return True
    function, module = getattr(item, "function", None), getattr(item, "module", None)
    if function is None or module is None:
        return False
    try:
        source = inspect.getsource(function)
    except (OSError, TypeError):
        return False
    roots = (str(SHARED), str(_fixtures()))
    shared_names = [name for name, value in vars(module).items()
                    if isinstance(value, Path) and str(value).startswith(roots)]
    return "fixtures_root" in source or any(re.search(rf"\b{name}\b", source) for name in shared_names)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """A clone without ../shared skips what needs it, with the reason; CI (which has it) makes absence an error."""
    reason = _missing_ground_truth()
    if reason is None:
        return
    if os.environ.get("CI"):
        raise pytest.UsageError(f"CI needs the ground truth: {reason}")
    skip = pytest.mark.skip(reason=reason)
    for item in items:
        if _needs_ground_truth(item):
            item.add_marker(skip)


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    if not SHARED.is_dir():
        pytest.skip(f"shared data not found at {SHARED} (set TYMPAN_SHARED)")
    return SHARED


@pytest.fixture(scope="session")
def data_dir(shared_dir) -> Path:
    return shared_dir / "data"
