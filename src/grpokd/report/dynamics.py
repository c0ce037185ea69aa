"""How each row of a sweep trained, read from its jobs' csv logs (`log.csv=true`): dynamics.md.

Per row, averaged over its seeds: the greedy val accuracy at each val check
("after step s": the model after s updates), the sampled reward, the mean
completion length and the KD term (where logged) over the first and the last
`window` steps, and the median seconds of a step, of its sampling
(`train/sample_time_s`) and of its scoring by the reference and the teachers
(`train/frozen_time_s`). What the accuracy table cannot show: whether a row
was still rising, collapsed, or drifted in length, and where its time went.
"""

from __future__ import annotations

import statistics
from pathlib import Path

from grpokd.report.curves import read_metric

WINDOWS = {"reward": "train/reward_mean", "completion tokens": "train/completion_len_mean", "KD": "train/kd"}  # first -> last
MEDIANS = {"s/step": "train/step_time_s", "sampling s": "train/sample_time_s", "reference + teachers s": "train/frozen_time_s"}


def first_last(curve: dict[int, float], window: int) -> tuple[float, float] | None:
    """The mean of the first and of the last `window` logged values (by step); None without a value."""
    values = [curve[s] for s in sorted(curve)]
    if not values:
        return None
    return statistics.fmean(values[:window]), statistics.fmean(values[-window:])


def job_dynamics(job_dir: Path, window: int) -> dict[str, object]:
    """One job: {"val": {steps done: accuracy}, <WINDOWS name>: (first, last), <MEDIANS name>: median}, what it logged."""
    out: dict[str, object] = {"val": {step + 1: v for step, v in read_metric(job_dir, "val/accuracy").items()}}
    for name, key in WINDOWS.items():
        if (pair := first_last(read_metric(job_dir, key), window)) is not None:
            out[name] = pair
    for name, key in MEDIANS.items():
        if values := list(read_metric(job_dir, key).values()):
            out[name] = statistics.median(values)
    return out


def mean_over_seeds(jobs: list[dict[str, object]]) -> dict[str, object]:
    """Each quantity's mean over the seeds that logged it (val: at the checks every seed made)."""
    steps = sorted(set.intersection(*(set(j["val"]) for j in jobs))) if jobs else []
    out: dict[str, object] = {"val": {s: statistics.fmean(j["val"][s] for j in jobs) for s in steps}, "seeds": len(jobs)}
    for name in WINDOWS:
        pairs = [j[name] for j in jobs if name in j]
        if pairs:
            out[name] = (statistics.fmean(p[0] for p in pairs), statistics.fmean(p[1] for p in pairs))
    for name in MEDIANS:
        values = [j[name] for j in jobs if name in j]
        if values:
            out[name] = statistics.fmean(values)
    return out


def markdown(rows: dict[str, dict[str, object]], title: str, window: int) -> str:
    """The table: a row per (row label, dataset) key of `rows` ({label: mean_over_seeds(...)})."""
    lines = [f"# {title}: how each row trained", "",
             f"Means over seeds (n). Val: greedy accuracy (%) after that many steps. Reward, completion tokens, KD: the mean "
             f"of the first and of the last {window} steps. Times: each job's median over its steps."]
    header = ["row", "n", "val (%) after steps", *WINDOWS, *MEDIANS]
    lines += ["", "| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    for label, d in rows.items():
        val = d["val"]
        cells = [label, str(d["seeds"]),
                 " / ".join(f"{s}: {100 * v:.1f}" for s, v in val.items()) or "—"]
        cells += [f"{d[name][0]:.3g} -> {d[name][1]:.3g}" if name in d else "—" for name in WINDOWS]
        cells += [f"{d[name]:.1f}" if name in d else "—" for name in MEDIANS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write(out: Path, jobs_by_row: dict[str, list[Path]], title: str, window: int = 10) -> str:
    """dynamics.md in `out` for the trained rows ({label: job directories}); returns the markdown."""
    rows = {}
    for label, dirs in jobs_by_row.items():
        logged = [j for j in (job_dynamics(d, window) for d in dirs) if j["val"] or len(j) > 1]
        if logged:
            rows[label] = mean_over_seeds(logged)
    text = markdown(rows, title, window)
    (out / "dynamics.md").write_text(text)
    return text
