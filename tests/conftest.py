"""Fixtures shared by the test modules."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def phantom_cache(tmp_path_factory) -> Path:
    """One ``VLP_CACHE`` for the training tests of the session: the small phantom that
    ``tests.helpers.training.SMALL`` names is built once and shared."""
    return tmp_path_factory.mktemp("vlp-cache")
