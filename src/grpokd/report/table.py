"""The sweep's table: rows x datasets, mean ± std of test accuracy over seeds, failures marked.

A cell holds the complete jobs' accuracies (the training rows' `test/accuracy_after`,
the eval rows' `test/accuracy`) and the errors of the jobs that failed or are
missing. It renders as "19.4 ± 1.8 (n=3)", "23.5" for a single value,
"failed [1]" when nothing completed, or "12.0 ± 0.5 (n=2, 1 failed [1])"; the
footnotes list the errors.
"""

from __future__ import annotations

import csv
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class Cell:
    values: list[float] = field(default_factory=list)  # test accuracy in [0, 1] of each complete job
    errors: list[str] = field(default_factory=list)  # one line per failed or missing job

    @property
    def mean(self) -> float | None:
        return statistics.fmean(self.values) if self.values else None

    @property
    def std(self) -> float | None:
        return statistics.pstdev(self.values) if len(self.values) > 1 else None


def accuracy(results: dict[str, Any]) -> float | None:
    """The job's headline number: accuracy after training, or the eval row's accuracy."""
    value = results.get("test/accuracy_after", results.get("test/accuracy"))
    return float(value) if value is not None else None


def build(jobs: list, statuses: list[dict[str, Any]]) -> tuple[list[str], list[str], dict[tuple[str, str], Cell]]:
    """(row labels, dataset names, cells keyed by (label, dataset)) from the jobs and their results."""
    labels = list(dict.fromkeys(job.row.label for job in jobs))
    datasets = list(dict.fromkeys(job.dataset_name for job in jobs))
    cells = {(r, d): Cell() for r in labels for d in datasets}
    for job, results in zip(jobs, statuses):
        cell = cells[(job.row.label, job.dataset_name)]
        value = accuracy(results) if results.get("status") == "complete" else None
        if value is None:
            cell.errors.append(f"{job.row.label} / {job.dataset_name} / seed {job.seed}: {results.get('status', 'failed')}: "
                               f"{results.get('error', 'no accuracy in results.json')}")
        else:
            cell.values.append(value)
    return labels, datasets, cells


def render_cell(cell: Cell, notes: list[str]) -> str:
    refs = []
    for error in cell.errors:
        notes.append(error)
        refs.append(f"[{len(notes)}]")
    failed = f"{len(cell.errors)} failed {''.join(refs)}" if cell.errors else ""
    if not cell.values:
        return failed or "—"
    text = f"{100 * cell.mean:.1f}"
    if cell.std is not None:
        text += f" ± {100 * cell.std:.1f}"
    details = [f"n={len(cell.values)}"] if len(cell.values) > 1 or cell.errors else []
    details += [failed] if failed else []
    return text + (f" ({', '.join(details)})" if details else "")


def markdown(labels: list[str], datasets: list[str], cells: dict[tuple[str, str], Cell], title: str) -> str:
    """The table as markdown, with footnotes for failed jobs."""
    notes: list[str] = []
    lines = [f"# {title}", "", "Test accuracy (%), greedy decoding; mean ± std over seeds (population std), n = seeds completed.", ""]
    lines += ["| row | " + " | ".join(datasets) + " |", "|---|" + "---|" * len(datasets)]
    for label in labels:
        lines.append(f"| {label} | " + " | ".join(render_cell(cells[(label, d)], notes) for d in datasets) + " |")
    if notes:
        lines += ["", "Failed or missing jobs:", ""] + [f"[{i}] {note}" for i, note in enumerate(notes, 1)]
    return "\n".join(lines) + "\n"


def write(out: Path, labels: list[str], datasets: list[str], cells: dict[tuple[str, str], Cell], title: str) -> str:
    """Write table.md and table.csv into `out`; returns the markdown."""
    text = markdown(labels, datasets, cells, title)
    (out / "table.md").write_text(text)
    with open(out / "table.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["row", "dataset", "mean", "std", "n", "failed", "values"])
        for label in labels:
            for d in datasets:
                c = cells[(label, d)]
                writer.writerow([
                    label, d, "" if c.mean is None else f"{c.mean:.4f}", "" if c.std is None else f"{c.std:.4f}",
                    len(c.values), len(c.errors), " ".join(f"{v:.4f}" for v in c.values),
                ])
    return text
