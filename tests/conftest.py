"""Shared pytest fixtures."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The read-only real datasets (/work/shared/data beside the repo, or $GRPOKD_SHARED_DATA); skips when absent."""
    default = Path(__file__).resolve().parents[2] / "shared" / "data"
    root = Path(os.environ.get("GRPOKD_SHARED_DATA", default))
    if not root.is_dir():
        pytest.skip(f"shared data not found at {root}; set GRPOKD_SHARED_DATA to the folder with gsm8k/ and aqua/")
    return root
