"""A teacher with its own tokenizer against a teacher of the student's: step time and peak memory.

    python bench/cross.py    # j1 on GSM8K, SmolLM2-135M-Instruct taught by Qwen2.5-Coder-0.5B-Instruct (model=smollm2_qwen), or by itself

Runs `python run.py objective=j1 model=smollm2 dataset=gsm8k` twice per repeat, back to back (alternating order):
with SmolLM2 as its own teacher (the direct path), and with Qwen2.5-Coder-0.5B-Instruct (`model=smollm2_qwen`:
prompts rendered in Qwen's chat template, completions re-tokenized and aligned, `teachers/cross.py`). Both take
`model.teacher_top_k=--top-k` and tau = 1, so the KD terms read a top-k list either way. The figures: the median
over the steps after `--warmup` of `train/step_time_s` and of `train/sample_time_s` (median over repeats), and the
run's peak resident memory. The teachers differ in size (Qwen has 3.7x SmolLM2's parameters): the step time is
the cost of the larger teacher and of the alignment together.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

from logged import median_logged, peak_rss_mb

REPO = Path(__file__).resolve().parents[1]


def run(args: argparse.Namespace, model: str, out: Path) -> tuple[float, float, float]:
    """(median step s, median sampling s, peak RSS MB) of one j1 run with `model` (a model config)."""
    command = [sys.executable, str(REPO / "run.py"), "objective=j1", f"model={model}", "dataset=gsm8k", f"dataset.path={args.data}",
               f"trainer.max_steps={args.steps}", f"data.prompts_per_step={args.prompts}", f"group_size={args.group}",
               f"rollout.sampling.max_new_tokens={args.tokens}", "tau=1", f"model.teacher_top_k={args.top_k}", "eval_before=false",
               "eval_test=false", "eval_pass_k=0", "data.val_size=0", "logger=none", "log.csv=true", "callbacks=none", f"hydra.run.dir={out}"]
    peak = peak_rss_mb(command, REPO)
    return median_logged(out, "train/step_time_s", args.warmup), median_logged(out, "train/sample_time_s", args.warmup), peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--prompts", type=int, default=2)
    parser.add_argument("--group", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--top-k", type=int, default=20)
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "gsm8k"))
    args = parser.parse_args()

    teachers = {"SmolLM2-135M-Instruct (the student's tokenizer)": "smollm2", "Qwen2.5-Coder-0.5B-Instruct (its own tokenizer)": "smollm2_qwen"}
    results: dict[str, list[tuple[float, float, float]]] = {name: [] for name in teachers}
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(args.repeats):
            for name, model in (teachers.items() if repeat % 2 == 0 else reversed(teachers.items())):
                results[name].append(run(args, model, Path(tmp) / f"{repeat}-{model}"))
            print(f"repeat {repeat}: " + ", ".join(f"{n} {r[-1][0]:.3f} s/step {r[-1][2]:.0f} MB" for n, r in results.items()), flush=True)
    print(f"\nj1 on GSM8K, SmolLM2-135M-Instruct student, {args.prompts} prompts x {args.group} completions, <= {args.tokens} new tokens, "
          f"teacher top-{args.top_k}, {args.steps} steps (first {args.warmup} left out), median of {args.repeats} repeats")
    print("| teacher | s/step | of which sampling s | peak RSS (MB) |")
    print("|---|---|---|---|")
    for name, runs in results.items():
        print(f"| {name} | {statistics.median(r[0] for r in runs):.3f} | {statistics.median(r[1] for r in runs):.3f} | {statistics.median(r[2] for r in runs):.0f} |")
    own, direct = results[list(teachers)[1]], results[list(teachers)[0]]
    print(f"\nits own tokenizer / the student's, step time per repeat: {', '.join(f'{o[0] / d[0]:.2f}' for o, d in zip(own, direct))}")


if __name__ == "__main__":
    main()
