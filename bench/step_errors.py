"""What the embedded student's sampled worked steps get wrong, against the gold solution's steps.

    python bench/step_errors.py [--model tiny-llama-student] [--problems 200] [--group 8] [--temperature 1.0] [--seed 0]

Samples `group` completions of each of `problems` fresh `arith` problems (the
task's generator, seed + 1) at the rollout temperature and classifies every worked step "expression = result"
(`rewards.worked_steps`): its arithmetic holds or not, and its expression is the
gold solution's step at that position or not (a miscopied operand, a skipped or
invented step), and per operator how often the result holds or is one too high (the embedded
student's trained slip, `grpokd.data.arith.slipped`). It prints the share of each class: how sparse a per-step
arithmetic reward (`StepsReward`) is, whether the student's errors are wrong
facts or wrong expressions, and how many of its correct answers rest on wrong
work (a lucky answer that the 0/1 reward reinforces all the same).

Then, on the same problems, how much room pure sharpening leaves: greedy
accuracy against the majority answer of the `group` samples (maj@K) and pass@K;
and where the greedy completion first leaves the gold solution (teacher-forced
on the gold prefix, which greedy decoding follows up to that point): the kind of
token (a step's result, i.e. an arithmetic fact; an operand; an operator; other)
and the probability the student gives the gold token there. A gold token with
small probability is one RL must discover by sampling, not merely sharpen.
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
    from grpokd.evaluation import greedy
    from grpokd.models import loading
    from grpokd.rollout import Sampling, sample

    torch.manual_seed(args.seed)
    tokenizer, model = loading.load_tokenizer(args.model), loading.load_model(args.model).eval()
    problems = make_arith(args.problems, seed=args.seed + 1)
    sampling = Sampling(group_size=args.group, temperature=args.temperature)
    reward = NumericReward(fallback_last_number=False)  # the arith dataset's reward
    counts: collections.Counter[str] = collections.Counter()
    divergence: dict[str, list[float]] = collections.defaultdict(list)  # token kind -> gold token probabilities
    by_operator: dict[str, collections.Counter[int]] = collections.defaultdict(collections.Counter)  # op -> result - true
    for start in range(0, len(problems), args.batch):
        chunk = problems[start : start + args.batch]
        examples = {"prompt": [p.prompt for p in chunk], "answer": [p.answer for p in chunk]}
        rollout = sample(model, tokenizer, examples, sampling, reward)
        counts["correct answer"] += int(rollout.rewards.sum())
        right_greedy = greedy(model, tokenizer, examples, reward, sampling).rewards
        counts["greedy"] += int(right_greedy.sum())
        for problem, right in zip(chunk, right_greedy.tolist()):
            kind = "with a - or * step" if {"-", "*"} & set(problem.solution.split()) else "with only + steps"
            counts[f"problems {kind}"] += 1
            counts[f"greedy right {kind}"] += int(right)
        counts["pass@k"] += int(rollout.rewards.view(-1, args.group).amax(-1).sum())
        for i, problem in enumerate(chunk):
            answers = [reward.extract(t) for t in rollout.texts[i * args.group : (i + 1) * args.group]]
            votes = collections.Counter(a for a in answers if a is not None).most_common(1)
            counts["majority"] += bool(votes) and reward(f"#### {votes[0][0]}", problem.answer) == 1.0
        for kind, p_gold in first_divergences(model, tokenizer, chunk, sampling):
            divergence[kind].append(p_gold)
        for i, text in enumerate(rollout.texts):
            right_work = worked_steps(text) == worked_steps(chunk[i // args.group].solution)
            counts["correct answer, gold steps"] += bool(rollout.rewards[i]) and right_work
            gold = [" ".join(expr.split()) for expr, _ in worked_steps(chunk[i // args.group].solution)]
            steps = worked_steps(text)
            counts["completions without a step"] += not steps
            for k, (expression, result) in enumerate(steps):
                holds = "holds" if abs(evaluate(expression) - int(result)) < 1e-6 else "wrong result"
                operator = next((op for op in "+-*" if op in expression.split()), "?")
                by_operator[operator][round(int(result) - evaluate(expression))] += 1  # 0: holds, +1: one too high (the slip)
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
    for operator, errors in sorted(by_operator.items()):
        total = sum(errors.values())
        print(f"  '{operator}' steps: {total}, result holds {100 * errors[0] / total:.1f}%, one too high {100 * errors[1] / total:.1f}%")
    n = len(problems)
    print(f"  greedy accuracy {100 * counts['greedy'] / n:.1f}%, majority of the {args.group} samples (maj@{args.group}) "
          f"{100 * counts['majority'] / n:.1f}%, pass@{args.group} {100 * counts['pass@k'] / n:.1f}%")
    for kind in ("with only + steps", "with a - or * step"):
        print(f"  greedy right on {counts[f'greedy right {kind}']} of the {counts[f'problems {kind}']} problems {kind}")
    diverged = sum(len(v) for v in divergence.values())
    print(f"  greedy follows the gold solution to the end on {n - diverged} of {n} problems; where it first leaves it:")
    for kind, probs in sorted(divergence.items(), key=lambda kv: -len(kv[1])):
        probs = sorted(probs)
        print(f"    {kind}: {len(probs)}, gold token probability median {probs[len(probs) // 2]:.2f}, "
              f">= 0.2 on {sum(p >= 0.2 for p in probs)}")


def first_divergences(model, tokenizer, problems, sampling):
    """(kind, gold token probability) at the first position where the student's argmax leaves each gold solution."""
    import torch

    from grpokd.models.lm import completion_logits, tokenize_prompts, tokenize_targets

    prompts = tokenize_prompts(tokenizer, [p.prompt for p in problems], sampling.max_prompt_len)
    targets = tokenize_targets(tokenizer, [p.solution for p in problems], sampling.max_new_tokens)
    with torch.no_grad():
        probs = completion_logits(model, prompts, targets).float().softmax(-1)  # [B, T, V]
    for i in range(len(problems)):
        gold = targets.ids[i][targets.mask[i].bool()]
        wrong = (probs[i, : len(gold)].argmax(-1) != gold).nonzero()
        if len(wrong) == 0:
            continue
        j = int(wrong[0])
        tokens = tokenizer.convert_ids_to_tokens(gold.tolist())
        if j and tokens[j - 1] == "=":
            kind = "a step's result (an arithmetic fact)"
        elif tokens[j] in ("+", "-", "*"):
            kind = "an operator"
        elif tokens[j].isdigit():
            kind = "an operand"
        else:
            kind = f"other ({tokens[j]})"
        yield kind, probs[i, j, gold[j]].item()


if __name__ == "__main__":
    main()
