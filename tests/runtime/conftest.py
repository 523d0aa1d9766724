"""Fixtures of the runtime tests."""

from __future__ import annotations

import pytest

from tests.runtime.equivalence import References


@pytest.fixture(scope="session")
def reference() -> References:
    """Reference runs by model and training settings, shared by every test of a pytest process (worker)."""
    return References()
