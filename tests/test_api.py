"""The top-level ``tympan`` namespace: what a user reaches after ``import tympan`` alone."""

import subprocess
import sys


def test_subpackages_are_reachable_after_import_tympan_alone():
    """``import tympan; tympan.hear.load_model`` works in a fresh interpreter (was an AttributeError)."""
    code = "import tympan; print(tympan.hear.load_model.__name__, tympan.audio.load.__name__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["load_model", "load"]


def test_unknown_attribute_is_an_attribute_error():
    import tympan
    import pytest

    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        tympan.nope  # noqa: B018


def test_import_tympan_and_the_cli_import_no_torch():
    """A command that reads a pipe (``tympan listen -``) starts before torch loads: neither import pulls it in."""
    code = "import sys, tympan, tympan.cli; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_load_without_arguments_is_the_default_model():
    import tympan

    assert tympan.DEFAULT_MODEL in tympan.list_models()
    assert tympan.get_model_entry(tympan.DEFAULT_MODEL).weights.url.startswith("package://")


def test_every_public_name_exists():
    """Each module's ``__all__`` names what it defines (``from tympan.x import *`` must not fail); modules whose
    optional dependency is missing are skipped."""
    import importlib
    import pkgutil

    import tympan

    missing = []
    for info in pkgutil.walk_packages(tympan.__path__, "tympan."):
        if info.name.endswith("__main__"):  # runs the command line
            continue
        try:
            module = importlib.import_module(info.name)
        except ImportError:
            continue
        missing += [f"{info.name}.{name}" for name in getattr(module, "__all__", ()) if not hasattr(module, name)]
    assert not missing
