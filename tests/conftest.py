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


REPO = Path(__file__).resolve().parents[1]

# Short-run overrides: a few steps, small eval sets, no W&B.
QUICK = [
    "trainer.max_steps=4",
    "trainer.val_check_interval=2",
    "data.val_size=16",
    "data.test_size=32",
    "data.prompts_per_step=4",
    "group_size=4",
    "logger=none",
    "checkpoint_every=2",
]


def compose(overrides: list[str], run_dir: Path):
    """The real Hydra config with `overrides`, writing to `run_dir`."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return hydra_compose("config", overrides=[*overrides, f"run_dir={run_dir}"])


@pytest.fixture
def quick_cfg(tmp_path):
    """compose(QUICK + overrides) in a fresh run directory."""

    def make(*overrides: str, run_dir: Path | None = None):
        return compose([*QUICK, *overrides], run_dir or tmp_path / "run")

    return make
