"""How each row of a sweep answers the test problems, read from its jobs' predictions.jsonl: answers.md.

Per row, the mean over its seeds of the share of test answers that are right
(the table's accuracy: the reward the test is scored with), right and stated
in a format (`rewards.FORMAT_STYLES`: after "####", boxed or after "answer
is"; the strict reading), stated in each style of `rewards.STYLES` ("last":
only a last number was found; "none": no answer), and ended before the token
limit. What the accuracy table cannot show: whether a method taught the
student to state its answer as asked (a teacher's format) or only to be right
more often.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from grpokd.data.rewards import FORMAT_STYLES, STYLES

COLUMNS = ("right", "right, stated", *STYLES, "none", "ended")


def job_answers(job_dir: Path) -> dict[str, float] | None:
    """One job's shares (0-1) of `COLUMNS` over its predictions.jsonl; None when it has none."""
    try:
        records = [json.loads(line) for line in (Path(job_dir) / "predictions.jsonl").read_text().splitlines() if line.strip()]
    except FileNotFoundError:
        return None
    if not records:
        return None
    styles = [r.get("style") or "none" for r in records]
    return {
        "right": statistics.fmean(r["reward"] for r in records),
        "right, stated": statistics.fmean(r["reward"] if s in FORMAT_STYLES else 0.0 for r, s in zip(records, styles)),
        **{style: styles.count(style) / len(records) for style in (*STYLES, "none")},
        "ended": statistics.fmean(bool(r["ended"]) for r in records),
    }


def markdown(rows: dict[str, list[dict[str, float]]], title: str) -> str:
    """The table: a row per label of `rows` ({label: its seeds' job_answers}), each cell the mean over seeds in %."""
    lines = [f"# {title}: how each row answers the test problems", "",
             "Means over seeds (n) of the share of test answers (%): right (the table's accuracy), right and stated in a "
             f"format ({', '.join(FORMAT_STYLES)}: the strict reading), stated in each style (last: only a last number; "
             "none: no answer), ended before the token limit."]
    header = ["row", "n", *COLUMNS]
    lines += ["", "| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    for label, jobs in rows.items():
        cells = [label, str(len(jobs)), *(f"{100 * statistics.fmean(j[c] for j in jobs):.1f}" for c in COLUMNS)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write(out: Path, jobs_by_row: dict[str, list[Path]], title: str) -> str:
    """answers.md in `out` for the rows whose jobs wrote test predictions ({label: job directories}); returns the
    markdown, "" (and no file) when no job has any (a sweep on the validation split)."""
    rows = {label: found for label, dirs in jobs_by_row.items() if (found := [a for d in dirs if (a := job_answers(d))])}
    if not rows:
        return ""
    text = markdown(rows, title)
    (out / "answers.md").write_text(text)
    return text
