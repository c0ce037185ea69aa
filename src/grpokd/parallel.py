"""Scale-out: what data-parallel (DDP) and sharded (FSDP) runs need beyond Lightning's defaults.

- `gather`: every rank's copy of a Python object (the sample table; the RNG states and pending rollouts
  in a checkpoint, `rank_entry` reads them back); `reduce_over_ranks`: the step's training metrics.
- `check_launch`: a multirun job under a Hydra launcher other than the basic one refuses Lightning's
  process launcher, which re-runs the command line.
- `FSDP`: Lightning's FSDPStrategy with a choice for the frozen models (`scoring.FrozenModels`: the reference and
  the teachers): `replicate` (FSDP's `ignored_modules`: whole on every rank) or `shard` (each one an FSDP
  unit of its own). `frozen_placement` computes the FSDP arguments. FSDP needs GPUs (Lightning and torch
  refuse CPU); the placement is tested on CPU, FSDP runs are not.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from lightning.fabric.utilities.apply_func import move_data_to_device
from lightning.pytorch import Trainer
from lightning.pytorch.strategies import FSDPStrategy
from lightning.pytorch.strategies.launchers.subprocess_script import _SubprocessScriptLauncher
from torch import Tensor
from torch.distributed.fsdp import FullyShardedDataParallel
from torch.distributed.fsdp.wrap import CustomPolicy, ModuleWrapPolicy

from grpokd.errors import ConfigError
from grpokd.scoring import FrozenModels

T = TypeVar("T")
PLACEMENTS = ("replicate", "shard")


def gather(obj: T) -> list[T]:
    """Every rank's `obj`, in rank order; [obj] in a single process. A collective: every rank must call it.

    Tensors travel on the CPU (a GPU tensor would be unpickled onto the sender's device).
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [obj]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, move_data_to_device(obj, "cpu"))
    return gathered


def reduce_over_ranks(gathered: Tensor, names: list[str]) -> Tensor:
    """Every rank's per-step metrics [R, n] (an all-gather of each rank's [n]) -> the step's [n]: maxima (names
    ending `_max`) by max, rates of the whole job (`_per_s`) by sum, the rest by mean. Every rank holds as many
    prompts and completions, so the mean of the ranks' means is the mean over the step, as DDP's gradient is the
    ranks' mean; a standard deviation (`reward_std`) is the mean of the ranks' own, not the spread over all
    ranks' completions. A dataset component's `<component>/reward_mean` is the mean over the ranks that sampled
    it (NaN where none did)."""
    is_max = torch.tensor([name.endswith("_max") for name in names], device=gathered.device)  # [n]
    is_sum = torch.tensor([name.endswith("_per_s") for name in names], device=gathered.device)  # [n]
    is_part = torch.tensor([name.endswith("/reward_mean") for name in names], device=gathered.device)  # [n] a component's
    mean = torch.where(is_part, gathered.nanmean(0), gathered.mean(0))  # a rank without the component's prompts has NaN
    return torch.where(is_max, gathered.amax(0), torch.where(is_sum, gathered.sum(0), mean))


def rank_entry(entries: list | dict | None, rank: int) -> Any:
    """Rank `rank`'s entry of a per-rank checkpoint list (`gather`'s); None when it has none.

    A dict is a single process's entry, written before checkpoints held one per rank. A run resumed with more
    processes than wrote the checkpoint finds none for the new ranks, which then start afresh.
    """
    if entries is None or isinstance(entries, dict):
        entries = [] if entries is None else [entries]
    return entries[rank] if rank < len(entries) else None


def check_accelerator(trainer_cfg: Any) -> None:
    """Refuse, before any model is built, a trainer config that asks for GPUs on a machine without CUDA
    (trainer=gpu, trainer=fsdp, trainer=ddp: Lightning would fail after the models are loaded)."""
    accelerator = str(trainer_cfg.get("accelerator", "auto"))
    if accelerator in {"gpu", "cuda"} and not torch.cuda.is_available():
        raise ConfigError(
            f"trainer.accelerator={accelerator}: no CUDA GPU is visible on this machine; on CPU use trainer=default "
            "(one process) or trainer=ddp_cpu (several processes over gloo)"
        )


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


def frozen_models(module: torch.nn.Module) -> list[torch.nn.Module]:
    """The frozen models held anywhere in `module` (each `scoring.FrozenModels`' reference and teachers)."""
    return [model for holder in module.modules() if isinstance(holder, FrozenModels) for model in holder.models()]


def frozen_placement(module: torch.nn.Module, placement: str, layers: set[type[torch.nn.Module]] | None = None) -> dict[str, Any]:
    """FSDP keyword arguments that place `module`'s frozen models, with `layers` (module classes) as FSDP units.

    replicate: the frozen models are FSDP's `ignored_modules`: every rank holds each whole, as under DDP; no
        all-gather per forward, the memory of all of them on every GPU.
    shard: each frozen model (the reference, each teacher) is an FSDP unit of its own (`fsdp_unit`), so a GPU
        holds 1/W of it at rest and all-gathers it whole for its own forward only; its parameters never share a
        unit with the student's (they do not require grad).
    """
    frozen = frozen_models(module)
    if check_placement(placement) == "replicate":
        return {"ignored_modules": frozen} | ({"auto_wrap_policy": ModuleWrapPolicy(set(layers))} if layers else {})
    return {"auto_wrap_policy": CustomPolicy(fsdp_unit(frozen, layers))}


def check_placement(placement: str) -> str:
    """`placement` if it is one of PLACEMENTS, else ConfigError naming the key and the choices."""
    if placement not in PLACEMENTS:
        raise ConfigError(f"trainer.strategy.frozen={placement!r}: allowed values are {', '.join(PLACEMENTS)}")
    return placement


def fsdp_unit(frozen: list[torch.nn.Module], layers: set[type[torch.nn.Module]] | None = None) -> Callable[[torch.nn.Module], bool]:
    """Whether a module becomes an FSDP unit of its own: one of the `frozen` models, or an instance of `layers`."""
    units, classes = {id(model) for model in frozen}, tuple(layers or ())
    return lambda module: id(module) in units or isinstance(module, classes)


class FSDP(FSDPStrategy):
    """Lightning's FSDPStrategy; the LightningModule's frozen models replicated or sharded (`frozen_placement`).

    GPUs only, and not run in this project's tests (no GPU). A known Lightning limit: a module that holds
    auto-wrapped FSDP units after one stage (`frozen=shard`'s frozen models, `auto_wrap_policy`'s layers) is
    "already wrapped" at the next, and Lightning then wraps no root (Lightning issue #19015, validate/test
    after fit), so the student would train unsynchronised; `setup` refuses that stage instead. grpokd runs
    several stages (test before, fit, validate, test after): with units, run fit alone (`eval_before=false
    eval_test=false data.val_size=0`) and score the export with `mode=eval`. `replicate` with no
    `auto_wrap_policy` wraps the root alone at every stage and is not affected.

    Args:
        frozen: "replicate" (default) or "shard".
        auto_wrap_policy: module classes that become FSDP units (e.g. the student's decoder layer), or None.
        **kwargs: Lightning's FSDPStrategy arguments (sharding_strategy, state_dict_type, ...).
    """

    def __init__(self, frozen: str = "replicate", auto_wrap_policy: set[type[torch.nn.Module]] | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.frozen, self.layers = check_placement(frozen), auto_wrap_policy

    def setup(self, trainer: Trainer) -> None:
        """Place the frozen models before Lightning wraps the module; replicated ones are moved to the GPU here
        (FSDP moves only what it manages)."""
        if any(isinstance(m, FullyShardedDataParallel) for m in trainer.lightning_module.modules()):
            raise ConfigError(
                "trainer=fsdp: the module still holds the FSDP units of an earlier stage (trainer.strategy.frozen=shard or "
                "an auto_wrap_policy) and Lightning would not wrap the student again (Lightning issue #19015); train in one "
                "stage (eval_before=false eval_test=false data.val_size=0, then mode=eval on the exported student) or use "
                "trainer.strategy.frozen=replicate without auto_wrap_policy"
            )
        if hasattr(trainer.lightning_module.student, "peft_config"):
            raise ConfigError("trainer=fsdp with model.lora is not supported (never run here: no GPU); use trainer=ddp, which LoRA's small optimiser state suits")
        placement = frozen_placement(trainer.lightning_module, self.frozen, self.layers)
        self.kwargs |= placement
        super().setup(trainer)
        for model in placement.get("ignored_modules", ()):
            model.to(self.root_device)
