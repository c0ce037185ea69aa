"""Train or evaluate one job: `python run.py [group=option ...] [key=value ...]`, `-m` for a sweep.

Exit status: 0 done; 2 a bad config or input, Hydra's unknown options and keys included (one `error:` line; a run
directory this process created is removed, one that existed, such as a killed run's being resumed, is kept); 128 + signal
number (143 SIGTERM, 130 SIGINT) interrupted, with the current step saved for `ckpt_path=` to resume.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from grpokd import cli, runtime
from grpokd.errors import ConfigError
from grpokd.train import train, write_json

runtime.register_resolvers()


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    multirun = HydraConfig.get().mode == RunMode.MULTIRUN
    try:
        results = train(cfg)
    except runtime.Interrupted as stop:
        print(f"{stop}; resume with ckpt_path={stop.checkpoint}" if stop.checkpoint else str(stop), file=sys.stderr)
        sys.exit(1 if stop.signum is None else 128 + stop.signum)
    except Exception as err:
        run_dir = Path(cfg.run_dir)
        if multirun:
            # one job of a sweep: leave a failure record for the sweep's table; Hydra runs the other jobs
            if not runtime.finished(run_dir):
                write_json(run_dir / "results.json", failure(cfg, err))
            raise
        if not isinstance(err, ConfigError):
            raise
        if run_dir.absolute() in runtime.CREATED_HERE:  # leave nothing that looks like a run; never another run's directory
            shutil.rmtree(run_dir, ignore_errors=True)
        else:  # a run's own directory (a resume): its config as it was
            runtime.restore_hydra_files(run_dir)
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    print("\n".join(headline(results)))
    return results.get(cfg.optimized_metric)  # what a Hydra sweeper (hparams_search) optimises: val, never test


def headline(results: dict) -> list[str]:
    """What a finished job prints last: test accuracy (before -> after, with 95% intervals), where its files are."""
    def accuracy(tag: str) -> str | None:
        if f"test/{tag}" not in results:
            return None
        low, high = results[f"test/{tag}_ci95"]
        return f"{100 * results[f'test/{tag}']:.1f}% [{100 * low:.1f}, {100 * high:.1f}]"

    shown = [a for a in (accuracy("accuracy_before"), accuracy("accuracy_after"), accuracy("accuracy")) if a]
    run_dir = Path(results["run_dir"])
    files = [name for name in ("results.json", "predictions.jsonl", "predictions_val.jsonl") if (run_dir / name).is_file()]
    lines = [f"test accuracy ({results['test_size']} problems, 95% intervals): {' -> '.join(shown)}"] if shown else []
    if "val/accuracy_ci95" in results and not shown:  # mode=eval eval_split=val
        low, high = results["val/accuracy_ci95"]
        lines = [f"val accuracy ({results['val_size']} problems, 95% intervals): {100 * results['val/accuracy']:.1f}% [{100 * low:.1f}, {100 * high:.1f}]"]
    return [*lines, f"{' and '.join(files)} are in the run directory", f"run directory: {run_dir}"]


def failure(cfg: DictConfig, err: Exception) -> dict:
    """What results.json holds for a failed sweep job."""
    return {
        "objective": cfg.objective.name, "dataset": cfg.dataset.name, "model": cfg.model.student, "seed": cfg.seed,
        "mode": cfg.mode, "status": "failed", "error": f"{type(err).__name__}: {err}".splitlines()[0],
    }


if __name__ == "__main__":
    cli.hydra_main(main, Path(__file__).parent / "conf", "config")
