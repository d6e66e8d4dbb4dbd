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
