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
import socket
from pathlib import Path
from urllib.parse import urlparse

from lightning.pytorch.loggers import CSVLogger, WandbLogger


def wandb_credentials() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    try:
        return netrc.netrc().authenticators(host) is not None
    except (FileNotFoundError, netrc.NetrcParseError):
        return False


def wandb_reachable(timeout: float = 3.0) -> bool:
    url = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai"))
    try:
        with socket.create_connection((url.hostname, url.port or 443), timeout=timeout):
            return True
    except OSError:
        return False


def wandb_logger(save_dir: str, project: str = "grpokd", name: str | None = None, group: str | None = None,
                 tags: list[str] | None = None, offline: bool | None = None, **kwargs) -> WandbLogger:
    """A WandbLogger writing under `save_dir`; offline=None picks offline when W&B is unusable."""
    if offline is None:
        mode = os.environ.get("WANDB_MODE")
        offline = mode in {"offline", "dryrun", "disabled"} if mode else not (wandb_credentials() and wandb_reachable())
    Path(save_dir).mkdir(parents=True, exist_ok=True)
    # One W&B run per run directory: a resumed run (same directory) continues its W&B run instead of starting another.
    kwargs.setdefault("id", hashlib.sha256(str(Path(save_dir).absolute()).encode()).hexdigest()[:16])
    kwargs.setdefault("resume", "allow")
    return WandbLogger(save_dir=save_dir, project=project, name=name, group=group, tags=tags, offline=offline, **kwargs)


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
