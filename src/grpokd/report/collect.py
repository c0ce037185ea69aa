"""Collect results.json files under a directory and summarise them as mean ± std over seeds.

`python -m grpokd.report.collect multirun/<date>/<time>-p<pid>` prints a markdown
table with one row per (objective, dataset, model): test accuracy before and
after training, mean ± std over the seeds found, and n.
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any


def collect(root: str | Path) -> list[dict[str, Any]]:
    """Every complete results.json below `root`."""
    rows = [json.loads(p.read_text()) for p in sorted(Path(root).rglob("results.json"))]
    return [r for r in rows if r.get("status") == "complete"]


def mean_std(values: list[float]) -> str:
    if not values:
        return "-"
    std = statistics.pstdev(values) if len(values) > 1 else 0.0
    return f"{100 * statistics.fmean(values):.1f} ± {100 * std:.1f}"


def summarize(rows: list[dict[str, Any]], keys: tuple[str, ...] = ("test/accuracy_before", "test/accuracy_after")) -> str:
    """A markdown table: accuracies in percent, mean ± population std over seeds."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        groups[(r["objective"], r["dataset"], r["model"])].append(r)
    lines = ["| objective | dataset | model | " + " | ".join(keys) + " | n |", "|---" * (len(keys) + 4) + "|"]
    for (objective, dataset, model), runs in sorted(groups.items()):
        cells = [mean_std([r[k] for r in runs if k in r]) for k in keys]
        lines.append(f"| {objective} | {dataset} | {model} | " + " | ".join(cells) + f" | {len(runs)} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", help="a directory holding run directories (e.g. a Hydra multirun dir)")
    print(summarize(collect(parser.parse_args().root)))


if __name__ == "__main__":
    main()
