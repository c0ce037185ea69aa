"""The engine of `sweep.py`: a grid of rows x datasets x seeds, run as Hydra multiruns of run.py, then reported.

A sweep file (conf/sweep/*.yaml) names:
- `rows`, in table order: `student` (greedy test accuracy of the untrained
  student), `teachers` (one such row per `model.teachers` entry), an objective
  name (a training row), or a custom `{name, objective | eval, overrides}`;
- `datasets` (dataset config options), `seeds`, the `model` option;
- `overrides` for every job and `row_overrides` per row;
- `grid`: hyperparameters to sweep. A top-level one (`gamma`) is expanded only
  in the rows whose composed objective interpolates it (`${gamma}` is in j3's
  terms, not in j1's), so no row is run twice for a value it ignores; a dotted
  key (`optim.lr`) is expanded in every training row;
- `row_grid`: per row, its own grid ({kdrl: {beta_kd: [0.1, 1]}});
- `baseline`: the row every other is compared with (default: the GRPO row);
- `metric`: `test` (the table: test accuracy) or `val` (hyperparameter search:
  final greedy val accuracy; jobs then run with `eval_test=false` and never
  touch the test split, and `best.md` names each row's best grid point).

Each row (and grid point) is one `python run.py -m ...` over its datasets and
seeds, so any Hydra launcher runs the jobs (`launcher=joblib`, a SLURM
launcher, ...). Job directories are fixed, `<out>/<row>/<dataset>/s<seed>`, and
rerunning a sweep only launches the jobs that are not complete (a complete
job's directory, its `.hydra/` config included, is left as it is); they run
with `resume=true`, so a killed job goes on from its last checkpoint. A failed
job leaves `results.json` with `status: failed` and its error; the table marks
it and the sweep exits with status 1.
"""

from __future__ import annotations

import csv
import functools
import itertools
import json
import os
import re
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hydra
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, OmegaConf

from grpokd.errors import ConfigError
from grpokd.objectives.coefficients import interpolates

REPO = Path(__file__).resolve().parents[2]
CONF = REPO / "conf"
LABELS = {"sft": "SFT", "grpo": "GRPO", "j1": "J'", "j2": "J''", "j3": "J'''", "kdrl": "KDRL", "tgpo": "TGPO", "opd": "OPD"}
EVAL_ROWS = ("student", "teachers")


@dataclass(frozen=True)
class Row:
    """One line of the table: a training objective (at one grid point) or an evaluated model."""

    label: str  # as printed, e.g. "J''' (gamma=0.5)"
    key: str  # its directory under the sweep directory
    overrides: tuple[str, ...]  # run.py overrides that make this row
    seeds: tuple[int, ...]
    is_eval: bool = False
    objective: str | None = None


@dataclass(frozen=True)
class Job:
    row: Row
    dataset: str  # the dataset config option (arith, gsm8k, ...)
    dataset_name: str  # its `dataset.name` (the job directory)
    seed: int
    dir: Path


def objectives() -> list[str]:
    return sorted(p.stem for p in (CONF / "objective").glob("*.yaml"))


@functools.cache
def objective_node(objective: str) -> str:
    """The composed `objective` node of `objective=<objective>` (its parents and terms merged), unresolved, as JSON."""
    overrides = [f"objective={objective}"]
    if GlobalHydra.instance().is_initialized():  # inside sweep.py's @hydra.main, whose config dir is CONF
        cfg = hydra.compose(config_name="config", overrides=overrides)
    else:
        with hydra.initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            cfg = hydra.compose(config_name="config", overrides=overrides)
    return json.dumps(OmegaConf.to_container(cfg.objective, resolve=False))


def uses(objective: str, key: str) -> bool:
    """Whether the composed objective interpolates the top-level hyperparameter `key` (e.g. ${gamma})."""
    return interpolates(json.loads(objective_node(objective)), key)


def applies(objective: str, key: str) -> bool:
    """Whether a grid key varies `objective`: a dotted key (optim.lr) always, a top-level one if its config uses it."""
    return "." in key or uses(objective, key)


def override_key(override: str) -> str:
    return override.lstrip("+~").split("=", 1)[0]


def merge_overrides(*groups: list[str] | tuple[str, ...]) -> list[str]:
    """Concatenate override lists; a later value for the same key replaces the earlier one (Hydra rejects repeats)."""
    merged: dict[str, str] = {}
    for group in groups:
        for item in group:
            merged.pop(override_key(item), None)
            merged[override_key(item)] = item
    return list(merged.values())


def slug(text: str) -> str:
    """A directory name safe inside a Hydra override (no '=', ',', spaces or quotes)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-")


def plan_rows(spec: DictConfig, teachers: list[str]) -> list[Row]:
    """The sweep file's rows, expanded (teachers, grid points), checked; raises ConfigError on an unknown row."""
    from grpokd.teachers.sources import source_name  # torch and transformers: only once a sweep is planned
    known = objectives()
    for key in ("rows", "datasets", "seeds"):
        if not spec.get(key):
            raise ConfigError(f"sweep.{key} is empty; give at least one")
    seeds = tuple(int(s) for s in spec.seeds)
    grid = {str(k): list(v) for k, v in (spec.get("grid") or {}).items()}
    for key, values in grid.items():
        if not values:
            raise ConfigError(f"sweep.grid.{key} is empty; give at least one value")
    extra = {str(k): list(v) for k, v in (spec.get("row_overrides") or {}).items()}
    row_grid = {str(r): {str(k): list(v) for k, v in g.items()} for r, g in (spec.get("row_grid") or {}).items()}
    rows: list[Row] = []
    for entry in spec.rows:
        if isinstance(entry, str) and entry == "student":
            rows.append(Row("student (no training)", "student", ("mode=eval", *extra.get("student", [])), seeds[:1], True))
        elif isinstance(entry, str) and entry == "teachers":
            if not teachers:
                raise ConfigError("sweep row 'teachers': the model config lists no teachers")
            for name in teachers:  # named as in the metrics (a path's last part), loaded by its full name
                overrides = ("mode=eval", f"model.student={name}", *extra.get("teachers", []))
                rows.append(Row(f"teacher: {source_name(name)}", slug(f"teacher-{source_name(name)}"), overrides, seeds[:1], True))
        elif isinstance(entry, str) and entry in known:
            rows.extend(objective_rows(entry, LABELS.get(entry, entry), entry, extra.get(entry, []), grid | row_grid.get(entry, {}), seeds))
        elif isinstance(entry, (dict, DictConfig)) and entry.get("name"):
            rows.extend(custom_rows(entry, grid, seeds, known))
        else:
            raise ConfigError(
                f"sweep row {OmegaConf.to_container(entry) if isinstance(entry, DictConfig) else entry!r} is not one of "
                f"{', '.join(EVAL_ROWS)}, an objective ({', '.join(known)}) or a {{name, objective|eval, overrides}} mapping"
            )
    keys = [r.key for r in rows]
    if len(set(keys)) != len(keys):
        repeated = dict.fromkeys(k for k in keys if keys.count(k) > 1)
        raise ConfigError(f"sweep rows repeat: {', '.join(repeated)}; give custom rows and teachers distinct names")
    unused = [k for k in grid if not any(r.objective and applies(r.objective, k) for r in rows)]
    unused += [f"{r}: {k}" for r, g in row_grid.items() for k, v in g.items() if not v or r not in [e for e in spec.rows if isinstance(e, str)]]
    if unused:
        raise ConfigError(f"sweep.grid / row_grid key(s) {', '.join(unused)} are empty or used by no row (a typo?)")
    return rows


def objective_rows(objective: str, label: str, key: str, overrides: list[str], grid: dict[str, list], seeds: tuple[int, ...]) -> list[Row]:
    """One row per point of the grid restricted to the hyperparameters `objective` uses (dotted keys: all)."""
    used = [k for k in grid if applies(objective, k)]
    rows = []
    for values in itertools.product(*(grid[k] for k in used)):
        point = dict(zip(used, values))
        suffix = ", ".join(f"{k}={v}" for k, v in point.items())
        rows.append(Row(
            label=f"{label} ({suffix})" if suffix else label,
            key=slug(f"{key}-{suffix}") if suffix else slug(key),
            overrides=(f"objective={objective}", *(f"{k}={v}" for k, v in point.items()), *overrides),
            seeds=seeds, objective=objective,
        ))
    return rows


def custom_rows(entry: DictConfig, grid: dict[str, list], seeds: tuple[int, ...], known: list[str]) -> list[Row]:
    name, overrides = str(entry["name"]), list(entry.get("overrides") or [])
    if entry.get("eval"):
        return [Row(name, slug(name), ("mode=eval", *overrides), seeds[:1], True)]
    objective = entry.get("objective")
    if objective not in known:
        raise ConfigError(f"sweep row {name!r}: objective {objective!r} is not one of {', '.join(known)}")
    return objective_rows(objective, name, name, overrides, grid, seeds)


METRICS = {"test": (), "val": ("eval_test=false",)}  # the job overrides each selection metric implies


def metric_overrides(spec: DictConfig) -> tuple[str, ...]:
    metric = spec.get("metric", "test")
    if metric not in METRICS:
        raise ConfigError(f"sweep.metric={metric!r}: allowed values are {', '.join(METRICS)}")
    return METRICS[metric]


def job_overrides(spec: DictConfig, row: Row, dataset: str) -> list[str]:
    """run.py overrides of one (row, dataset) job, without the seed and the Hydra settings."""
    return merge_overrides(
        [f"model={spec.model}", f"dataset={dataset}"], list(spec.get("overrides") or []), list(row.overrides), metric_overrides(spec)
    )


def check(spec: DictConfig, rows: list[Row], compose: Callable[[list[str]], DictConfig]) -> dict[str, str]:
    """Every start-up check of every (row, dataset) before anything runs; returns {dataset option: dataset.name}.

    Raises ConfigError naming the row and dataset (bad override, unknown model,
    missing data, a dataset without a test split, ...).
    """
    from grpokd.train import prepare

    names = {}
    for row, dataset in itertools.product(rows, spec.datasets):
        where = f"sweep row {row.label!r}, dataset {dataset!r}"
        try:
            cfg = compose(job_overrides(spec, row, dataset))
            prep = prepare(cfg)
        except ConfigError as err:
            raise ConfigError(f"{where}: {err}") from err
        except Exception as err:  # Hydra's composition errors: unknown key or group option
            raise ConfigError(f"{where}: {type(err).__name__}: {str(err).splitlines()[0]}") from err
        if not prep.data.test_set:
            raise ConfigError(f"{where}: the dataset has no test examples; the table needs a test split")
        names[dataset] = cfg.dataset.name
    return names


def plan(spec: DictConfig, out: Path, compose: Callable[[list[str]], DictConfig]) -> tuple[list[Row], list[Job]]:
    """The sweep's rows and jobs, every job's config checked first (ConfigError: nothing may run)."""
    from grpokd.teachers.sources import entry, source_name

    rows = plan_rows(spec, [entry(t).get("name") or source_name(t) for t in compose([f"model={spec.model}"]).model.teachers or []])
    metric_overrides(spec)
    baseline = spec.get("baseline")
    if baseline is not None and not any(baseline in (r.label, r.key) for r in rows):
        raise ConfigError(f"sweep.baseline={baseline!r} is not a row; the rows are {', '.join(r.label for r in rows)}")
    return rows, plan_jobs(spec, rows, check(spec, rows, compose), out)


def plan_jobs(spec: DictConfig, rows: list[Row], names: dict[str, str], out: Path) -> list[Job]:
    return [
        Job(row, dataset, names[dataset], seed, out / row.key / names[dataset] / f"s{seed}")
        for row in rows for dataset in spec.datasets for seed in row.seeds
    ]


def multirun_command(
    spec: DictConfig, row: Row, datasets: list[str], seeds: list[int], out: Path, launcher: list[str], logger: list[str],
) -> list[str]:
    """`python run.py -m ...` for one row over `datasets` x `seeds`.

    `launcher`: the Hydra launcher's overrides, e.g. ["hydra/launcher=joblib", "hydra.launcher.n_jobs=2"].
    """
    overrides = merge_overrides(
        [f"model={spec.model}"], list(spec.get("overrides") or []), list(row.overrides), metric_overrides(spec),
        [
            f"dataset={','.join(datasets)}", f"seed={','.join(str(s) for s in seeds)}",
            "skip_complete=true", "resume=true", "log.csv=true", *logger, f"run_name={row.key}-${{dataset.name}}-s${{seed}}",
            f"hydra.sweep.dir='{out / row.key}'", "hydra.sweep.subdir=${dataset.name}/s${seed}", *launcher,
        ],
    )
    return [sys.executable, str(REPO / "run.py"), "-m", *overrides]


def todo_multiruns(todo: list[Job]) -> list[tuple[list[str], list[int]]]:
    """A row's jobs left as multiruns (datasets x seeds) that launch no other job: datasets missing the same seeds
    share one, in the order they come."""
    seeds: dict[str, list[int]] = {}
    for job in todo:
        seeds.setdefault(job.dataset, []).append(job.seed)
    grouped: dict[tuple[int, ...], list[str]] = {}
    for dataset, missing in seeds.items():
        grouped.setdefault(tuple(missing), []).append(dataset)
    return [(datasets, list(missing)) for missing, datasets in grouped.items()]


def status(job: Job) -> dict[str, Any]:
    from grpokd.runtime import read_results

    results = read_results(job.dir)
    return results or {"status": "missing", "error": "no results.json (the job did not run or was killed)"}


def run_rows(spec: DictConfig, rows: list[Row], jobs: list[Job], out: Path, launcher: list[str], logger: list[str], echo: Callable[[str], None] = print) -> None:
    """Launch one multirun per row that has jobs left; a failing row does not stop the others."""
    for i, row in enumerate(rows, 1):
        mine = [j for j in jobs if j.row == row]
        todo = [j for j in mine if status(j).get("status") != "complete"]
        echo(f"[{i}/{len(rows)}] {row.label}: {len(mine)} jobs, {len(mine) - len(todo)} complete" + ("" if todo else ", skipped"))
        for datasets, seeds in todo_multiruns(todo):
            done = subprocess.run(multirun_command(spec, row, datasets, seeds, out, launcher, logger), cwd=REPO)
            if done.returncode != 0:
                echo(f"[{i}/{len(rows)}] {row.label}: some jobs failed (exit status {done.returncode}); see the table")


def report(
    rows: list[Row], jobs: list[Job], out: Path, title: str, metric: str = "test", spec_baseline: str | None = None,
) -> tuple[str, list[Path], int]:
    """table.md, table.csv, dynamics.md, answers.md, the figures and loss_fits.csv in `out` (and best.md for
    metric=val). The rows are compared with the row `spec_baseline` (the sweep file's `baseline`, a row name), else with the GRPO row if there is one.

    Returns (markdown, figure paths, failed jobs).
    """
    from grpokd.report import answers, curves, dynamics, table

    statuses = [status(j) for j in jobs]
    labels, datasets, cells = table.build(jobs, statuses, metric)
    baseline = next((r.label for r in rows if (spec_baseline in (r.label, r.key) if spec_baseline else r.objective == "grpo") and metric == "test"), None)
    text = table.write(out, labels, datasets, cells, title, metric, baseline)
    if metric == "val":
        groups = {r.label: (r.objective or r.label) for r in rows if not r.is_eval}
        text += "\n" + table.write_best(out, groups, datasets, cells)
    trained = [r for r in rows if not r.is_eval]
    names = list(dict.fromkeys(j.dataset_name for j in jobs))
    finished = {  # a row's label (with the dataset's name when there are several) -> (row, its complete jobs' directories)
        r.label if len(names) == 1 else f"{r.label} / {name}":
            (r, [j.dir for j, s in zip(jobs, statuses) if j.row == r and j.dataset_name == name and s.get("status") == "complete"])
        for name in names for r in rows
    }
    dynamics.write(out, {label: dirs for label, (r, dirs) in finished.items() if not r.is_eval}, title)
    answers.write(out, {label: dirs for label, (_, dirs) in finished.items()}, title)
    colors = curves.palette([r.label for r in trained])
    figures: list[Path] = []
    rewards: dict[str, dict[str, curves.Band]] = {}
    accuracy: dict[str, dict[str, curves.Band]] = {}
    fits: list[list[str]] = [["dataset", "row", "a", "b"]]  # L(t) = a t^-b
    for dataset in dict.fromkeys(j.dataset_name for j in jobs):
        def per_seed(row: Row, key: str) -> list[dict[int, float]]:
            return [curves.read_metric(j.dir, key) for j in jobs if j.row == row and j.dataset_name == dataset]

        losses = {r.label: curves.mean_curve(per_seed(r, "train/loss")) for r in trained}
        losses = {k: v for k, v in losses.items() if v[0]}
        if losses:
            path = out / f"loss_{slug(dataset)}.png"
            fitted = curves.plot_losses(losses, f"{title}: training loss on {dataset} (dashed: power-law fit)", path, colors)
            fits += [[dataset, label, *(f"{x:.4g}" for x in fit)] if fit else [dataset, label, "", ""] for label, fit in fitted.items()]
            figures.append(path)
        rewards[dataset] = {r.label: c for r in trained if (c := curves.band_curve(per_seed(r, "train/reward_mean")))[0]}
        accuracy[dataset] = {r.label: c for r in trained if (c := curves.band_curve(per_seed(r, "val/accuracy")))[0]}
    with open(out / "loss_fits.csv", "w", newline="") as f:
        csv.writer(f).writerows(fits)
    if any(rewards.values()) or any(accuracy.values()):
        path = out / "reward_accuracy.png"
        curves.plot_progress(rewards, accuracy, path, colors)
        figures.append(path)
    failed = sum(1 for s in statuses if s.get("status") != "complete")
    return text, figures, failed


def log_summary(out: Path, group: str, text: str, figures: list[Path], project: str = "grpokd") -> None:
    """A W&B run in the sweep's group holding the table (as a W&B table and markdown) and the figures."""
    import wandb

    from grpokd.loggers import wandb_credentials
    from grpokd.network import wandb_reachable

    mode = None if os.environ.get("WANDB_MODE") else ("online" if wandb_credentials() and wandb_reachable() else "offline")
    run = wandb.init(project=project, group=group, name=f"{group}-summary", job_type="summary", dir=str(out), mode=mode, reinit="finish_previous")
    with open(out / "table.csv", newline="") as f:
        rows = list(csv.reader(f))
    run.log({
        "table": wandb.Table(columns=rows[0], data=rows[1:]),
        "table_md": wandb.Html(f"<pre>{text}</pre>"),
        **{f"figures/{p.stem}": wandb.Image(str(p)) for p in figures},
    })
    run.finish()
