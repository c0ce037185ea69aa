"""What the embedded student's sampled worked steps get wrong, against the gold solution's steps.

    python bench/step_errors.py [--model tiny-llama-student] [--problems 200] [--group 8] [--temperature 1.0] [--seed 0]

Samples `group` completions of each of `problems` fresh `arith` problems (the
task's generator, seed + 1) at the rollout temperature and classifies every worked step "expression = result"
(`rewards.worked_steps`): its arithmetic holds or not, and its expression is the
gold solution's step at that position or not (a miscopied operand, a skipped or
invented step). It prints the share of each class: how sparse a per-step
arithmetic reward (`StepsReward`) is, whether the student's errors are wrong
facts or wrong expressions, and how many of its correct answers rest on wrong
work (a lucky answer that the 0/1 reward reinforces all the same).
"""

from __future__ import annotations

import argparse
import collections


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny-llama-student")
    parser.add_argument("--problems", type=int, default=200)
    parser.add_argument("--group", type=int, default=8)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch", type=int, default=25, help="problems per generate call")
    args = parser.parse_args()

    import torch

    from grpokd.data.arith import make_arith
    from grpokd.data.rewards import NumericReward, evaluate, worked_steps
    from grpokd.models import loading
    from grpokd.rollout import Sampling, sample

    torch.manual_seed(args.seed)
    tokenizer, model = loading.load_tokenizer(args.model), loading.load_model(args.model).eval()
    problems = make_arith(args.problems, seed=args.seed + 1)
    sampling = Sampling(group_size=args.group, temperature=args.temperature)
    counts: collections.Counter[str] = collections.Counter()
    for start in range(0, len(problems), args.batch):
        chunk = problems[start : start + args.batch]
        examples = {"prompt": [p.prompt for p in chunk], "answer": [p.answer for p in chunk]}
        rollout = sample(model, tokenizer, examples, sampling, NumericReward())
        counts["correct answer"] += int(rollout.rewards.sum())
        for i, text in enumerate(rollout.texts):
            right_work = worked_steps(text) == worked_steps(chunk[i // args.group].solution)
            counts["correct answer, gold steps"] += bool(rollout.rewards[i]) and right_work
            gold = [" ".join(expr.split()) for expr, _ in worked_steps(chunk[i // args.group].solution)]
            steps = worked_steps(text)
            counts["completions without a step"] += not steps
            for k, (expression, result) in enumerate(steps):
                holds = "holds" if abs(evaluate(expression) - int(result)) < 1e-6 else "wrong result"
                same = "gold expression" if k < len(gold) and " ".join(expression.split()) == gold[k] else "other expression"
                counts[f"{holds}, {same}"] += 1
    completions = len(problems) * args.group
    classes = ("holds, gold expression", "holds, other expression", "wrong result, gold expression", "wrong result, other expression")
    steps = sum(counts[key] for key in classes)
    print(f"{args.model}: {completions} completions of {len(problems)} arith problems at temperature {args.temperature}, {steps} worked steps")
    print(f"  correct answer: {100 * counts['correct answer'] / completions:.1f}% of completions, "
          f"{100 * counts['correct answer, gold steps'] / completions:.1f}% with exactly the gold steps")
    print(f"  without a step: {100 * counts['completions without a step'] / completions:.1f}% of completions")
    for key in classes:
        print(f"  {key}: {counts[key]} ({100 * counts[key] / max(steps, 1):.1f}% of steps)")


if __name__ == "__main__":
    main()
