"""Training curves of a sweep: loss with a fitted power-law decay (log axes), reward and accuracy against step.

Curves come from each job's `csv/metrics.csv` (jobs run with `log.csv=true`),
averaged over seeds at the steps every seed logged. The power law
L(t) = a t^(-b) is a least-squares line in log-log space over the steps
t = step + 1 where the mean loss is positive (the paper's Figures 2-3 plot
the same on log axes); a curve with fewer than 3 positive points gets no fit.
"""

from __future__ import annotations

import csv
import math
import statistics
from pathlib import Path

import matplotlib
import numpy as np

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

Curve = tuple[list[int], list[float]]  # steps, values
Band = tuple[list[int], list[float], list[float]]  # steps, mean over seeds, std over seeds (0 for one seed)


def read_metric(job_dir: Path, key: str) -> dict[int, float]:
    """{step: value} of one metric in a job's csv/metrics.csv ({} when absent)."""
    path = job_dir / "csv" / "metrics.csv"
    if not path.exists():
        return {}
    with open(path, newline="") as f:
        return {int(row["step"]): float(row[key]) for row in csv.DictReader(f) if row.get(key) not in (None, "")}


def mean_curve(per_seed: list[dict[int, float]]) -> Curve:
    """The mean over seeds at the steps all of them logged."""
    return band_curve(per_seed)[:2]


def band_curve(per_seed: list[dict[int, float]]) -> Band:
    """Mean and sample std over seeds at the steps all of them logged."""
    per_seed = [c for c in per_seed if c]
    if not per_seed:
        return [], [], []
    steps = sorted(set.intersection(*(set(c) for c in per_seed)))
    columns = [[c[s] for c in per_seed] for s in steps]
    return steps, [statistics.fmean(v) for v in columns], [statistics.stdev(v) if len(v) > 1 else 0.0 for v in columns]


def fit_power_law(steps: list[int], values: list[float]) -> tuple[float, float] | None:
    """(a, b) of L(t) = a t^-b fitted in log-log space at t = step + 1 where L > 0; None with < 3 such points."""
    points = [(math.log(s + 1), math.log(v)) for s, v in zip(steps, values) if v > 0]
    if len(points) < 3 or len({x for x, _ in points}) < 2:
        return None
    slope, intercept = np.polyfit([x for x, _ in points], [y for _, y in points], deg=1)
    return math.exp(intercept), -float(slope)


def smooth(values: list[float], window: int) -> list[float]:
    """Trailing moving average (for reward curves, which are noisy per step)."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def palette(labels: list[str]) -> dict[str, str]:
    """One colour per row label, the same in every figure of a sweep."""
    return {label: f"C{i % 10}" for i, label in enumerate(labels)}


def plot_losses(curves: dict[str, Curve], title: str, path: Path, colors: dict[str, str] | None = None) -> dict[str, tuple[float, float] | None]:
    """One PNG: each row's mean training loss and its power-law fit on log axes; returns the fits."""
    colors = colors or palette(list(curves))
    fig, ax = plt.subplots(figsize=(7, 4.5))
    fits = {}
    for label, (steps, values) in curves.items():
        color = colors[label]
        t = [s + 1 for s, v in zip(steps, values) if v > 0]
        ax.plot(t, [v for v in values if v > 0], color=color, alpha=0.45, linewidth=1)
        fits[label] = fit = fit_power_law(steps, values)
        if fit is not None:
            a, b = fit
            ax.plot(t, [a * x ** -b for x in t], color=color, linestyle="--", linewidth=1.5, label=f"{label}: {a:.3g}·t^{-b:.3f}")
        else:
            ax.plot([], [], color=color, label=f"{label}: no fit (loss <= 0)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("training step t")
    ax.set_ylabel("training loss (mean over seeds)")
    ax.set_title(title)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return fits


def plot_progress(
    reward: dict[str, dict[str, Band]], accuracy: dict[str, dict[str, Band]], path: Path,
    colors: dict[str, str] | None = None, window: int = 10,
) -> None:
    """One PNG: per dataset (columns), sampled reward (top, moving average) and val accuracy (bottom) against step.

    Lines are means over seeds; the shaded bands are ± one std over seeds.
    """
    datasets = list(reward)
    colors = colors or palette(list(dict.fromkeys(k for d in datasets for k in [*reward[d], *accuracy[d]])))
    fig, axes = plt.subplots(2, len(datasets), figsize=(6 * len(datasets), 7), squeeze=False)
    for col, dataset in enumerate(datasets):
        top, bottom = axes[0][col], axes[1][col]
        for label, (steps, values, std) in reward[dataset].items():
            mean, spread = smooth(values, window), smooth(std, window)
            top.plot(steps, mean, color=colors[label], label=label)
            top.fill_between(steps, [m - s for m, s in zip(mean, spread)], [m + s for m, s in zip(mean, spread)], color=colors[label], alpha=0.15)
        for label, (steps, values, std) in accuracy[dataset].items():
            bottom.plot(steps, [100 * v for v in values], color=colors[label], marker="o", label=label)
            bottom.fill_between(steps, [100 * (v - s) for v, s in zip(values, std)], [100 * (v + s) for v, s in zip(values, std)], color=colors[label], alpha=0.15)
        top.set_title(f"{dataset}: sampled reward\n(moving average of {window} steps, band ± std over seeds)", fontsize=10)
        bottom.set_title(f"{dataset}: greedy val accuracy\n(band ± std over seeds)", fontsize=10)
        top.set_xlabel("step")
        bottom.set_xlabel("step")
        top.set_ylabel("reward")
        bottom.set_ylabel("accuracy (%)")
        for ax in (top, bottom):
            if ax.lines:
                ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
