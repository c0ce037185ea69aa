"""What a benchmark reads back from a `run.py` run: the median of a logged training metric over its steps, and the
run's peak memory."""

from __future__ import annotations

import csv
import statistics
import subprocess
import sys
from pathlib import Path


def median_logged(run_dir: Path, key: str, skip: int) -> float:
    """The median of `key` (e.g. train/step_time_s) in the run's csv log (`log.csv=true`), its first `skip` steps left out."""
    with open(Path(run_dir) / "csv" / "metrics.csv") as f:
        values = [float(r[key]) for r in csv.DictReader(f) if r.get(key)]
    if len(values) <= skip:
        raise SystemExit(f"{run_dir}: {len(values)} logged {key} values, {skip} of them left out as warm-up: run more steps")
    return statistics.median(values[skip:])


# runs argv[1:] and prints the child's peak resident memory (KiB): the run's own, not this wrapper's
MEASURED = "import resource, subprocess, sys; code = subprocess.run(sys.argv[1:]).returncode; print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(code)"


def peak_rss_mb(command: list[str], cwd: Path) -> float:
    """Run `command` (a `run.py` command line) to its end and return its peak resident memory, MB; SystemExit if it fails."""
    done = subprocess.run([sys.executable, "-c", MEASURED, *command], capture_output=True, text=True, cwd=cwd)
    if done.returncode != 0:
        raise SystemExit(f"run failed:\n{done.stderr[-3000:]}")
    return int(done.stdout.strip().splitlines()[-1]) / 1024
