"""The ablation table: `python sweep.py [sweep=default|quick|paper_table1] [launcher=joblib] [wandb=true] [key=value ...]`.

Runs every (row, dataset, seed) job of conf/sweep/<sweep>.yaml through Hydra
multiruns of run.py (see grpokd.sweep), skipping complete ones, then writes
table.md, table.csv and the figures into the sweep directory (`out`); with
`report_only=true` it only writes them, from the jobs already there.
Exit status 0 when every job completed, 1 when some failed, were stopped or did not run
(they are marked in the table), 2 on a bad sweep file or override (nothing runs).
"""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from grpokd import cli, runtime
from grpokd import sweep as sw
from grpokd.errors import ConfigError

runtime.register_resolvers()  # the model configs' file paths (model=smollm2, smollm2_qwen), read when the rows are planned


@hydra.main(version_base="1.3", config_path="conf", config_name="sweeps")
def main(cfg: DictConfig) -> None:
    spec, out = cfg.sweep, Path(cfg.out).resolve()
    try:
        rows, jobs = sw.plan(spec, out, lambda overrides: hydra.compose(config_name="config", overrides=overrides))
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    print(f"sweep {spec.name}: {len(rows)} rows x {len(spec.datasets)} datasets, {len(jobs)} jobs -> {out}")
    logger = ["logger=wandb", f"logger.group={cfg.wandb_group}"] if cfg.wandb else ["logger=none"]
    launcher = [f"hydra/launcher={cfg.launcher}", *cfg.launcher_overrides]
    if not cfg.report_only:
        sw.run_rows(spec, rows, jobs, out, launcher, logger)
    text, figures, failed = sw.report(rows, jobs, out, f"sweep {spec.name}", spec.get("metric", "test"), spec.get("baseline"))
    if cfg.wandb:
        sw.log_summary(out, cfg.wandb_group, text, figures)
    print(text)
    print(f"table: {out / 'table.md'}, {out / 'table.csv'}; figures: {', '.join(p.name for p in figures) or 'none'}")
    if failed:
        print(f"{failed} of {len(jobs)} jobs did not complete (failed, stopped, or not run yet); they are marked in the table", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    cli.hydra_main(main, Path(__file__).parent / "conf", "sweeps")
