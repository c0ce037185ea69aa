"""The sweep's table: rows x datasets, mean ± std of accuracy over seeds, failures marked, tests against GRPO.

A cell holds the complete jobs' accuracies (metric `test`: the training rows'
`test/accuracy_after`, the eval rows' `test/accuracy`; metric `val`: the final
`val/accuracy`), their wall times and why the others did not complete. It
renders as "19.4 ± 1.8 [15.0, 23.8] (n=3)" (sample std, n - 1, and the 95%
t-interval of the mean over seeds, cut to [0, 100]), "23.5" for a single value, "failed [1]"
when nothing completed, or "12.0 ± 0.5 [7.5, 16.5] (n=2, 1 failed [1])"
("1 stopped" for an interrupted job, "1 not run" for one with no results.json
yet); the footnotes say why. A last column gives each row's median wall time
per job, in minutes (results.json's `wall_time_s`).

With a baseline row (GRPO), each dataset gets a "vs baseline" column: the
difference of means in points and the two-sided p-value of Welch's t-test
(unequal variances), marked "*" when p < 0.05, i.e. beyond seed noise at
that level. With 3 seeds the test has little power: a real difference of a
few points can read as noise, which the table then says.
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
    errors: list[str] = field(default_factory=list)  # one line per job that did not complete
    unfinished: list[str] = field(default_factory=list)  # how each of those counts: "failed", "stopped" or "not run"
    walls: list[float] = field(default_factory=list)  # wall_time_s of each complete job that recorded it

    @property
    def mean(self) -> float | None:
        return statistics.fmean(self.values) if self.values else None

    @property
    def std(self) -> float | None:
        return statistics.stdev(self.values) if len(self.values) > 1 else None

    @property
    def interval(self) -> tuple[float, float] | None:
        """The 95% t-interval of the mean over seeds, mean ± t(0.975, n - 1) std / sqrt(n), cut to [0, 1]; None under 2 values.

        An accuracy lies in [0, 1], so the cut keeps the interval's coverage; it
        matters with 2 seeds, where t(0.975, 1) = 12.7 can reach below 0.
        """
        if len(self.values) < 2:
            return None
        from scipy import stats

        half = float(stats.t.ppf(1 - ALPHA / 2, len(self.values) - 1)) * self.std / len(self.values) ** 0.5
        return max(0.0, self.mean - half), min(1.0, self.mean + half)


ALPHA = 0.05  # the level at which a difference to the baseline is called beyond noise


def welch(a: list[float], b: list[float]) -> float | None:
    """Two-sided p-value of Welch's t-test of mean(a) = mean(b); None with fewer than 2 values a side.

    Two groups without any spread: 1.0 if their means are equal, else 0.0.
    """
    if len(a) < 2 or len(b) < 2:
        return None
    from scipy import stats

    if statistics.variance(a) == 0 and statistics.variance(b) == 0:
        return 1.0 if statistics.fmean(a) == statistics.fmean(b) else 0.0
    return float(stats.ttest_ind(a, b, equal_var=False).pvalue)


def versus(cell: Cell, base: Cell) -> str:
    """"+5.2 (p=0.01*)": the difference of means in points and Welch's p-value against the baseline cell."""
    if not cell.values or not base.values:
        return "—"
    diff = f"{100 * (cell.mean - base.mean):+.1f}"
    p = welch(cell.values, base.values)
    return diff if p is None else f"{diff} (p={p:.2g}{'*' if p < ALPHA else ''})"


def accuracy(results: dict[str, Any], metric: str = "test", component: str | None = None) -> float | None:
    """The job's headline number: test accuracy after training (or the eval row's), or the final val accuracy;
    of one `dataset=mix` component with `component`."""
    part = f"{component}/" if component else ""
    if metric == "val":
        value = results.get(f"val/{part}accuracy")
    else:
        value = results.get(f"test/{part}accuracy_after", results.get(f"test/{part}accuracy"))
    return float(value) if value is not None else None


def components(results: dict[str, Any]) -> list[str]:
    """The `dataset=mix` components a job reported on (test/<component>/accuracy..., val/<component>/accuracy)."""
    return sorted({key.split("/")[1] for key in results if key.count("/") == 2 and key.split("/")[0] in ("test", "val")})


UNFINISHED = {"missing": "not run", "interrupted": "stopped"}  # a job's status -> how its cell counts it (else "failed")
KINDS = ("failed", "stopped", "not run")  # how a job that did not complete counts, in the order the cell and table.csv give them


def why(results: dict[str, Any]) -> str:
    """A footnote's reason for a job that did not complete."""
    if results.get("status") == "interrupted":
        return f"stopped after step {results.get('steps')}; rerunning the sweep resumes it from its last checkpoint"
    return results.get("error", "no accuracy in results.json")


def build(jobs: list, statuses: list[dict[str, Any]], metric: str = "test") -> tuple[list[str], list[str], dict[tuple[str, str], Cell]]:
    """(row labels, columns, cells keyed by (label, column)) from the jobs and their results: a column per dataset,
    and after a `dataset=mix` column one per component of it ("mix/arith")."""
    labels = list(dict.fromkeys(job.row.label for job in jobs))
    parts = {job.dataset_name: components(results) for job, results in zip(jobs, statuses) if results.get("status") == "complete"}
    datasets = [c for d in dict.fromkeys(job.dataset_name for job in jobs) for c in [d, *(f"{d}/{p}" for p in parts.get(d, []))]]
    cells = {(r, d): Cell() for r in labels for d in datasets}
    for job, results in zip(jobs, statuses):
        for column in [c for c in datasets if c == job.dataset_name or c.startswith(f"{job.dataset_name}/")]:
            component = column.partition("/")[2] or None
            cell = cells[(job.row.label, column)]
            value = accuracy(results, metric, component) if results.get("status") == "complete" else None
            if value is None:
                cell.unfinished.append(UNFINISHED.get(results.get("status"), "failed"))
                cell.errors.append(f"{job.row.label} / {column} / seed {job.seed}: {results.get('status', 'failed')}: {why(results)}")
            else:
                cell.values.append(value)
                if results.get("wall_time_s") is not None:
                    cell.walls.append(float(results["wall_time_s"]))
    return labels, datasets, cells


def wall_minutes(label: str, datasets: list[str], cells: dict[tuple[str, str], Cell]) -> float | None:
    """The median wall time of a row's complete jobs in minutes (a `dataset=mix` job counted once, not per component)."""
    walls = [w for d in datasets if "/" not in d for w in cells[(label, d)].walls]
    return statistics.median(walls) / 60 if walls else None


def render_cell(cell: Cell, notes: list[str]) -> str:
    refs = []
    for error in cell.errors:
        notes.append(error)
        refs.append(f"[{len(notes)}]")
    counts = [f"{n} {what}" for what in KINDS if (n := cell.unfinished.count(what))]
    failed = f"{', '.join(counts)} {''.join(refs)}" if cell.errors else ""
    if not cell.values:
        return failed or "—"
    text = f"{100 * cell.mean:.1f}"
    if cell.std is not None:
        low, high = cell.interval
        text += f" ± {100 * cell.std:.1f} [{100 * low:.1f}, {100 * high:.1f}]"
    details = [f"n={len(cell.values)}"] if len(cell.values) > 1 or cell.errors else []
    details += [failed] if failed else []
    return text + (f" ({', '.join(details)})" if details else "")


def markdown(
    labels: list[str], datasets: list[str], cells: dict[tuple[str, str], Cell], title: str,
    metric: str = "test", baseline: str | None = None,
) -> str:
    """The table as markdown, with a column per dataset against `baseline` and footnotes for failed jobs."""
    notes: list[str] = []
    what = "Test accuracy" if metric == "test" else "Final greedy val accuracy"
    lines = [f"# {title}", "", f"{what} (%), greedy decoding; mean ± std over seeds (sample std) [95% t-interval of the mean], "
             "n = seeds completed."]
    if baseline:
        lines.append(f"vs {baseline}: difference of means (points) and Welch's t-test p-value; * marks p < {ALPHA}.")
    walls = {label: wall_minutes(label, datasets, cells) for label in labels}
    columns = [c for d in datasets for c in ([d, f"{d} vs {baseline}"] if baseline else [d])]
    columns += ["wall, min per job (median)"] if any(w is not None for w in walls.values()) else []
    lines += ["", "| row | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
    for label in labels:
        row = []
        for d in datasets:
            row.append(render_cell(cells[(label, d)], notes))
            if baseline:
                row.append("" if label == baseline else versus(cells[(label, d)], cells[(baseline, d)]))
        if any(w is not None for w in walls.values()):
            row.append("—" if walls[label] is None else f"{walls[label]:.1f}")
        lines.append(f"| {label} | " + " | ".join(row) + " |")
    if notes:
        lines += ["", "Jobs that did not complete:", ""] + [f"[{i}] {note}" for i, note in enumerate(notes, 1)]
    return "\n".join(lines) + "\n"


def write(
    out: Path, labels: list[str], datasets: list[str], cells: dict[tuple[str, str], Cell], title: str,
    metric: str = "test", baseline: str | None = None,
) -> str:
    """Write table.md and table.csv into `out`; returns the markdown."""
    text = markdown(labels, datasets, cells, title, metric, baseline)
    (out / "table.md").write_text(text)
    with open(out / "table.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["row", "dataset", "mean", "std", "ci95_low", "ci95_high", "n", "failed", "stopped", "not_run", "values", "p_vs_baseline", "wall_s"])
        for label in labels:
            for d in datasets:
                c = cells[(label, d)]
                p = welch(c.values, cells[(baseline, d)].values) if baseline and label != baseline else None
                ci = [f"{x:.4f}" for x in c.interval] if c.interval else ["", ""]
                writer.writerow([
                    label, d, "" if c.mean is None else f"{c.mean:.4f}", "" if c.std is None else f"{c.std:.4f}", *ci,
                    len(c.values), *(c.unfinished.count(what) for what in KINDS), " ".join(f"{v:.4f}" for v in c.values), "" if p is None else f"{p:.4g}",
                    " ".join(f"{w:.1f}" for w in c.walls),
                ])
    return text


def write_best(out: Path, groups: dict[str, str], datasets: list[str], cells: dict[tuple[str, str], Cell]) -> str:
    """best.md: per group of rows (one objective over its grid) and dataset, the row with the highest mean; returns it."""
    lines = ["# Best grid point per objective (highest mean)", "", "| objective | dataset | best row | mean (%) |", "|---|---|---|---|"]
    for group in dict.fromkeys(groups.values()):
        for d in datasets:
            scored = [(cells[(label, d)].mean, label) for label, g in groups.items() if g == group and cells[(label, d)].values]
            if scored:
                mean, label = max(scored)
                lines.append(f"| {group} | {d} | {label} | {100 * mean:.1f} |")
    text = "\n".join(lines) + "\n"
    (out / "best.md").write_text(text)
    return text
