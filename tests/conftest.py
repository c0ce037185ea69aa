"""Shared pytest fixtures and helpers (compose the real config, build an objective from it)."""

from __future__ import annotations

import functools
import inspect
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


@functools.cache
def objective_config(name: str, *overrides: str):
    """conf/config.yaml with `objective=<name>` and Hydra `overrides` (command-line strings; a later one for the
    same key wins), composed once per argument list: treat the result as read-only."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from grpokd.sweep import CONF, merge_overrides

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return hydra_compose("config", overrides=merge_overrides([f"objective={name}"], overrides))


def objective(name: str, *overrides: str, terms: dict | None = None):
    """The objective that `python run.py objective=<name> <overrides>` trains with, built as a run builds it.

    e.g. `objective("j1", "lam=0.1", "tau=1.0", "objective.terms.kd.states=gold", "objective.max_tokens=null")`,
    `objective("tgpo", "+term@objective.terms.entropy=entropy_bonus", "objective.terms.entropy.weight=0.1")`.
    A bad value raises what a run raises (grpokd.errors.ConfigError, a ValueError, naming it).
    `terms` (name -> Term built by the test) are added after the config's own (a name the config has replaces
    its term), on a PolicyObjective with the same settings, so that the needs check runs on the union.
    """
    from grpokd.objectives import coefficients
    from grpokd.objectives.policy import PolicyObjective
    from grpokd.train import instantiate_group

    cfg = objective_config(name, *overrides)
    coefficients.check(cfg)  # the paper's top-level keys, by the names typed, as `prepare` checks them first
    built = instantiate_group(cfg.objective, "objective")
    if terms is None:
        return built
    settings = [key for key in inspect.signature(PolicyObjective).parameters if key != "terms"]
    return PolicyObjective(terms={**built.terms, **terms}, **{key: getattr(built, key) for key in settings})


@pytest.fixture
def quick_cfg(tmp_path):
    """compose(QUICK + overrides) in a fresh run directory."""

    def make(*overrides: str, run_dir: Path | None = None):
        return compose([*QUICK, *overrides], run_dir or tmp_path / "run")

    return make
