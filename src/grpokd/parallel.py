"""Scale-out: what data-parallel (DDP) runs need beyond Lightning's defaults.

- `gather`: every rank's copy of a Python object (the sample table; the RNG states and pending rollouts
  in a checkpoint, `rank_entry` reads them back).
- `check_launch`: a multirun job under a Hydra launcher other than the basic one refuses Lightning's
  process launcher, which re-runs the command line.
"""

from __future__ import annotations

from typing import Any, TypeVar

import torch.distributed as dist
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from lightning.fabric.utilities.apply_func import move_data_to_device
from lightning.pytorch import Trainer
from lightning.pytorch.strategies.launchers.subprocess_script import _SubprocessScriptLauncher

from grpokd.errors import ConfigError

T = TypeVar("T")


def gather(obj: T) -> list[T]:
    """Every rank's `obj`, in rank order; [obj] in a single process. A collective: every rank must call it.

    Tensors travel on the CPU (a GPU tensor would be unpickled onto the sender's device).
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [obj]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, move_data_to_device(obj, "cpu"))
    return gathered


def rank_entry(entries: list | dict | None, rank: int) -> Any:
    """Rank `rank`'s entry of a per-rank checkpoint list (`gather`'s); None when it has none.

    A dict is a single process's entry, written before checkpoints held one per rank. A run resumed with more
    processes than wrote the checkpoint finds none for the new ranks, which then start afresh.
    """
    if entries is None or isinstance(entries, dict):
        entries = [] if entries is None else [entries]
    return entries[rank] if rank < len(entries) else None


def check_launch(trainer: Trainer) -> None:
    """Refuse a multirun job whose ranks Lightning would start by re-running a command line that is not run.py.

    Lightning starts the other ranks of `strategy: ddp` on one node by running `sys.argv` again. Under `-m` with
    Hydra's basic launcher that is the whole sweep, which each rank then runs in step with rank 0, in the same
    sweep directory (`runtime.stamp`); inside a joblib or submitit-local worker it is the worker's own command,
    which is not a grpokd job at all. (Under SLURM or torchrun the ranks are started outside: nothing is re-run.)
    """
    if not (HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN):
        return
    launcher = str(HydraConfig.get().launcher.get("_target_", ""))
    if isinstance(trainer.strategy.launcher, _SubprocessScriptLauncher) and not launcher.endswith(".BasicLauncher"):
        raise ConfigError(
            f"{type(trainer.strategy).__name__} under hydra/launcher={launcher.rsplit('.', 1)[-1]}: Lightning starts "
            "the other processes by re-running the worker's command line, which is not run.py; use Hydra's basic "
            "launcher (the default), or SLURM / torchrun, which start the processes themselves"
        )
