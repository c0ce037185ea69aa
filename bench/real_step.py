"""experiment=real's training step under variants of its settings: step time, sampling time and peak memory.

    python bench/real_step.py --objectives j1 grpo --variants model.logit_chunk=64 model.logit_chunk=null

Each (objective, variant) is one `python run.py experiment=real objective=NAME VARIANT` run of `--steps` steps
with no evaluation (SmolLM2-135M-Instruct taught by Qwen2.5-Coder-0.5B-Instruct on chain_sum, 4 prompts x 4
completions of at most 128 tokens: conf/experiment/real.yaml). A variant is a space-separated list of run.py
overrides. Within a repeat the variants of an objective run back to back, in alternating order across repeats.
The figures: the median over the steps after `--warmup` of `train/step_time_s` and `train/sample_time_s` (median
over repeats), the run's peak resident memory, and each variant's step time over the first variant's per repeat.
The same seed samples the same first rollout under every variant; later ones may differ as the updates do.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

from logged import median_logged, peak_rss_mb

REPO = Path(__file__).resolve().parents[1]


def run(args: argparse.Namespace, objective: str, variant: str, out: Path) -> tuple[float, float, float]:
    """(median step s, median sampling s, peak RSS MB) of one run."""
    command = [sys.executable, str(REPO / "run.py"), "experiment=real", f"objective={objective}", *variant.split(),
               f"trainer.max_steps={args.steps}", "eval_test=false", "data.val_size=0", "logger=none", "log.csv=true",
               "callbacks=none", f"checkpoint_every={args.steps}", f"hydra.run.dir={out}"]
    peak = peak_rss_mb(command, REPO)
    return median_logged(out, "train/step_time_s", args.warmup), median_logged(out, "train/sample_time_s", args.warmup), peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--objectives", nargs="+", default=["j1"])
    parser.add_argument("--variants", nargs="+", default=["model.logit_chunk=64", "model.logit_chunk=null"])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    results = {(o, v): [] for o in args.objectives for v in args.variants}
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(args.repeats):
            for objective in args.objectives:
                for variant in (args.variants if repeat % 2 == 0 else args.variants[::-1]):
                    out = Path(tmp) / f"{repeat}-{objective}-{args.variants.index(variant)}"
                    results[objective, variant].append(run(args, objective, variant, out))
                    step, sample, peak = results[objective, variant][-1]
                    print(f"repeat {repeat}: {objective} [{variant}] {step:.1f} s/step, sampling {sample:.1f} s, {peak:.0f} MB", flush=True)
    print(f"\nexperiment=real, {args.steps} steps (first {args.warmup} left out), median of {args.repeats} repeat(s)")
    print("| objective | variant | s/step | of which sampling s | peak RSS (MB) | step / first variant's |")
    print("|---|---|---|---|---|---|")
    for (objective, variant), runs in results.items():
        first = results[objective, args.variants[0]]
        ratios = ", ".join(f"{r[0] / f[0]:.2f}" for r, f in zip(runs, first))
        print(f"| {objective} | {variant} | {statistics.median(r[0] for r in runs):.1f} | {statistics.median(r[1] for r in runs):.1f} "
              f"| {statistics.median(r[2] for r in runs):.0f} | {ratios} |")


if __name__ == "__main__":
    main()
