"""Experiment loggers: W&B that never hangs or fails offline, CSV, none.

`wandb_logger` decides the mode once, at start-up: online only when
credentials exist (WANDB_API_KEY or a netrc entry) and the W&B server
answers; otherwise offline, writing a local run that `wandb sync` uploads
later. WANDB_MODE, when set, wins.
"""

from __future__ import annotations

import csv
import hashlib
import netrc
import os
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from lightning.pytorch.loggers import CSVLogger, WandbLogger
from omegaconf import DictConfig, OmegaConf

from grpokd import runtime
from grpokd.network import wandb_reachable
from grpokd.objectives import coefficients

runtime.register_resolvers()  # conf/logger/wandb.yaml's group is ${grpokd_multirun:}


def wandb_credentials() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    try:
        return netrc.netrc().authenticators(host) is not None
    except (FileNotFoundError, netrc.NetrcParseError):
        return False


def wandb_logger(save_dir: str, project: str = "grpokd", name: str | None = None, group: str | None = None,
                 tags: list[str] | None = None, run_tags: list[str] | None = None, offline: bool | None = None,
                 **kwargs) -> WandbLogger:
    """A WandbLogger writing under `save_dir`; offline=None picks offline when W&B is unusable.

    The run id is a hash of the run directory, so a resumed run (same directory) continues its W&B run, and
    the name is `name` plus the id's first 6 characters: readable and unique. Tags are `run_tags` (the
    objective, dataset and model names) then `tags`. val/accuracy and val/pass@k get a best (max) summary.
    """
    if offline is None:
        mode = os.environ.get("WANDB_MODE")
        offline = mode in {"offline", "dryrun", "disabled"} if mode else not (wandb_credentials() and wandb_reachable())
    Path(save_dir).mkdir(parents=True, exist_ok=True)
    kwargs.setdefault("id", hashlib.sha256(str(Path(save_dir).absolute()).encode()).hexdigest()[:16])
    kwargs.setdefault("resume", "allow")
    name = f"{name}-{kwargs['id'][:6]}" if name else None
    tags = list(dict.fromkeys([*(run_tags or []), *(tags or [])]))
    logger = WandbLogger(save_dir=save_dir, project=project, name=name, group=group, tags=tags or None, offline=offline, **kwargs)
    run = logger.experiment
    if hasattr(run, "define_metric"):  # rank 0 (other ranks get a dummy experiment)
        run.define_metric("trainer/global_step")
        for key in ("val/accuracy", "val/pass@*"):
            run.define_metric(key, step_metric="trainer/global_step", summary="max")
        run.define_metric("train/teacher/*", step_metric="trainer/global_step", summary="last")
    return logger


UNLOGGED = ("hydra", "run_dir", "logger", "callbacks", "paths", "debug", "hparams_search")  # where, not what


def flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    """{"a.b.c": value} for every leaf of nested dicts; lists stay values."""
    if not isinstance(node, dict):
        return {prefix: node}
    out: dict[str, Any] = {}
    for key, value in node.items():
        out |= flatten(value, f"{prefix}.{key}" if prefix else str(key))
    return out


def logged_config(cfg: DictConfig, choices: dict[str, str | None] | None = None, git: dict[str, Any] | None = None) -> dict[str, Any]:
    """The config as experiment loggers record it: flat `a.b.c` keys, the config-group choices (`choices/<group>`)
    and the git state; without where the run writes (run_dir, paths, logger, callbacks) and without the paper's
    top-level hyperparameters the objective does not use (gamma in a j1 run)."""
    objective = OmegaConf.to_container(cfg.objective, resolve=False)
    container = OmegaConf.to_container(cfg, resolve=True)
    for key in UNLOGGED:
        container.pop(key, None)
    for key in set(coefficients.COEFFICIENTS) - set(coefficients.read_by(objective)):
        container.pop(key, None)
    flat = flatten(container)
    flat |= {f"choices/{group}": option for group, option in (hydra_choices() if choices is None else choices).items()}
    return flat | (git if git is not None else runtime.git_state())


def hydra_choices() -> dict[str, str | None]:
    """The config-group options of this Hydra job (objective=j1, dataset=arith, ...), without Hydra's own groups."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return {}
    return {k: v for k, v in HydraConfig.get().runtime.choices.items() if not k.startswith("hydra/")}


def csv_logger(save_dir: str, name: str = "csv") -> CSVLogger:
    return CSVLogger(save_dir=save_dir, name=name, version="")


def continue_csv(logger: CSVLogger, resume_step: int) -> None:
    """Keep the earlier parts' rows (steps below `resume_step`, the checkpoint's) of a resumed run's metrics.csv.

    Lightning's CSV writer deletes an existing file when it is created; the
    kept rows are written back, so an interrupted and resumed run has one file.
    """
    path = Path(logger.log_dir) / "metrics.csv"
    if not path.is_file():
        return
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        keys, rows = list(reader.fieldnames or []), [r for r in reader if r.get("step") and int(r["step"]) < resume_step]
    logger.experiment.metrics_keys = keys  # creates the writer, which deletes the file
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)
