"""Training step time of the objectives and of several updates per rollout, through `train()` as a user runs it.

    python bench/updates.py [--steps 40] [--repeats 3] [--objectives grpo,j1,j3,kdrl,tgpo] [--mu 1,2,4] [--repo PATH]

Each configuration is one `python run.py` process on the embedded default (tiny_causal, 16 prompts x 8
completions, logger none, no evaluation), repeated `--repeats` times. Its time per optimiser step is the
mean of the logged train/step_time_s (sampling, scoring, objective, backward, update) over the steps
after the first 5; the table prints the median over repeats. With mu > 1 a rollout is sampled every
mu steps and reused, so the per-step time falls; "per rollout" multiplies by mu.
`--repo` runs another checkout's run.py (e.g. the commit before a change) for a before/after comparison;
`--mu` applies only where that checkout knows `updates_per_rollout`. Every configuration gets the same
`--overrides` (default: one learning rate and beta for all), so that the policies, and hence the
completion lengths the step time depends on, drift alike.
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parents[1]


def step_time(repo: Path, overrides: list[str], steps: int) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [
            sys.executable, "run.py", *overrides, f"trainer.max_steps={steps}", "logger=none", "log.csv=true", "eval_before=false",
            "eval_test=false", "data.val_size=0", f"checkpoint_every={10 * steps}",
            "log.samples_every=0", f"hydra.run.dir={tmp}",
        ]
        env = {**os.environ, "PYTHONPATH": str(repo / "src")}
        subprocess.run(cmd, cwd=repo, env=env, check=True, capture_output=True, text=True)
        with open(Path(tmp) / "csv" / "metrics.csv") as f:
            times = [float(r["train/step_time_s"]) for r in csv.DictReader(f) if r.get("train/step_time_s")]
    return statistics.mean(times[5:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--objectives", default="grpo,j1,j3,kdrl,tgpo")
    parser.add_argument("--mu", default="1,2,4")
    parser.add_argument("--repo", type=Path, default=HERE)
    parser.add_argument("--overrides", default="optim.lr=1e-4,beta=0.04", help="run.py overrides for every configuration, comma-separated")
    args = parser.parse_args()
    common = [o for o in args.overrides.split(",") if o]
    configs = [(o, 1) for o in args.objectives.split(",")]
    configs += [("grpo", int(m)) for m in args.mu.split(",") if int(m) > 1]
    print(f"repo={args.repo} steps={args.steps} repeats={args.repeats} overrides={common} (median over repeats of the mean step time)")
    print("| objective | updates_per_rollout | step ms | per rollout ms |")
    print("|---|---|---|---|")
    for objective, mu in configs:
        overrides = [f"objective={objective}", *common] + ([f"updates_per_rollout={mu}"] if mu > 1 else [])
        ms = 1000 * statistics.median(step_time(args.repo, overrides, args.steps) for _ in range(args.repeats))
        print(f"| {objective} | {mu} | {ms:.0f} | {ms * mu:.0f} |", flush=True)


if __name__ == "__main__":
    main()
