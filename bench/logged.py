"""What a benchmark reads back from a `run.py` run: the median of a logged training metric over its steps."""

from __future__ import annotations

import csv
import statistics
from pathlib import Path


def median_logged(run_dir: Path, key: str, skip: int) -> float:
    """The median of `key` (e.g. train/step_time_s) in the run's csv log (`log.csv=true`), its first `skip` steps left out."""
    with open(Path(run_dir) / "csv" / "metrics.csv") as f:
        values = [float(r[key]) for r in csv.DictReader(f) if r.get(key)]
    if len(values) <= skip:
        raise SystemExit(f"{run_dir}: {len(values)} logged {key} values, {skip} of them left out as warm-up: run more steps")
    return statistics.median(values[skip:])
