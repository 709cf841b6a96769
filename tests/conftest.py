"""Fixtures shared by the test modules."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# The test plugins (tests/plugins) are named by recipes' ``imports``: trust them for the
# whole session, subprocesses included (``vlp.config.trusted_import``).
os.environ["VLP_TRUSTED_IMPORTS"] = ",".join(
    p for p in (os.environ.get("VLP_TRUSTED_IMPORTS", ""), "tests.plugins") if p
)


@pytest.fixture(scope="session")
def phantom_cache(tmp_path_factory) -> Path:
    """One ``VLP_CACHE`` for the training tests of the session: the small phantom that
    ``tests.helpers.training.SMALL`` names is built once and shared."""
    return tmp_path_factory.mktemp("vlp-cache")
