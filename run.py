"""Train or evaluate one job: `python run.py [group=option ...] [key=value ...]`, `-m` for a sweep."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from grpokd.errors import ConfigError
from grpokd.train import train


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    try:
        results = train(cfg)
    except ConfigError as err:
        if not (Path(cfg.run_dir) / "results.json").exists():
            shutil.rmtree(cfg.run_dir, ignore_errors=True)  # leave nothing that looks like a run
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    print(f"run directory: {results['run_dir']}")
    return results.get("test/accuracy_after", results.get("test/accuracy"))


if __name__ == "__main__":
    main()
