"""Parity with the original implementations, one test per fixture folder of ``$TYMPAN_FIXTURES``."""

import pytest

from tests.parity import Fixture, fixture_dirs, fixtures_root, registered_checks

FIXTURES = fixture_dirs()


def test_fixture_root_present():
    assert FIXTURES, f"no fixture folders under {fixtures_root()} (set TYMPAN_FIXTURES)"


@pytest.mark.parametrize("folder", FIXTURES, ids=[p.name for p in FIXTURES])
def test_parity(folder):
    fixture = Fixture(folder)
    checks = registered_checks(fixture.kind)
    assert checks, f"{folder.name}: no parity checks for fixture kind {fixture.kind!r}"
    for check in checks:
        check(fixture)
    fixture.verify()
