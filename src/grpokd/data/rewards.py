"""Answer extraction and 0/1 correctness rewards.

Two answer kinds cover every dataset here: a number (GSM8K, `arith`) and a
multiple-choice letter A-E (MathInstruct, AQuA-RAT, `arith_mc`). Gold
solutions end in the GSM8K marker "#### <answer>"; text after the last marker
is the final answer. Completions without a marker fall back to looser
patterns, so a model that answers in prose is still scored.

The extractors are pure module-level functions; the reward classes only bind
options so that Hydra can build them from `_target_`.
"""

from __future__ import annotations

import math
import re

MARKER = "####"

# A number as written in math text: optional minus (not when it is a binary
# minus as in "10-3"), optional "$", thousands groups "1,234" or plain digits,
# optional decimals. A trailing period ("7.") is not part of the number.
_NUMBER = re.compile(
    r"(?:(?<![\w)])-)?\$?(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?|(?:(?<![\w)])-)?\.\d+"
)
# A choice letter standing alone, optionally in parentheses: "B", "(B)", "B)".
_CHOICE = re.compile(r"(?<![A-Za-z0-9])\(?([A-E])\)?(?![A-Za-z0-9])")
# "answer is (B)", "answer is B", "Answer: B", "Answer : B", "correct answer - B".
_ANSWER_IS = re.compile(r"(?i:answer)\s*(?:(?i:is)\s*|[:\-]\s*)\(?([A-E])\)?(?![A-Za-z0-9])")


def normalize_number(token: str) -> str:
    """Canonical form of a number token: "$1,234.50" -> "1234.5", "-0" -> "0", ".5" -> "0.5"."""
    text = token.replace("$", "").replace(",", "").replace("%", "").strip()
    negative = text.startswith("-")
    whole, _, frac = text.lstrip("-").partition(".")
    whole = whole.lstrip("0") or "0"
    frac = frac.rstrip("0")
    number = f"{whole}.{frac}" if frac else whole
    return "-" + number if negative and number != "0" else number


def extract_number(text: str, fallback_last_number: bool = True) -> str | None:
    """The final numeric answer of `text`, normalised (see `normalize_number`).

    With a "####" marker: the first number after the last marker, or None if
    there is none (a model that wrote the marker committed to that answer).
    Without a marker: the last number in the text if `fallback_last_number`,
    else None. Commas, "$", "%", a trailing period and trailing decimal zeros
    are ignored: "#### $1,234.50." -> "1234.5".
    """
    _, marker, tail = text.rpartition(MARKER)
    if marker:
        match = _NUMBER.search(tail)
        return normalize_number(match.group()) if match else None
    if not fallback_last_number:
        return None
    matches = _NUMBER.findall(text)
    return normalize_number(matches[-1]) if matches else None


def numbers_equal(a: str, b: str) -> bool:
    """Numeric equality within an absolute tolerance of 1e-6 ("7" == "7.0" == "7.0000001").

    Both sides may carry "$", "%" or thousands commas; anything that is not a
    number compares unequal.
    """
    try:
        x, y = (float(s.replace("$", "").replace(",", "").replace("%", "").strip()) for s in (a, b))
    except ValueError:
        return False
    return math.isclose(x, y, rel_tol=0.0, abs_tol=1e-6)


def extract_choice(text: str) -> str | None:
    """The multiple-choice letter (A-E, case-sensitive) that `text` answers with.

    In order: the first standalone letter after the last "####"; else the last
    "answer is (B)" / "answer is B" / "Answer: B" phrase; else the last
    standalone capital A-E in the text (may catch the article "A": it is a
    fallback). Parentheses are stripped: "(B)" -> "B".
    """
    _, marker, tail = text.rpartition(MARKER)
    if marker:
        match = _CHOICE.search(tail)
        return match.group(1) if match else None
    phrases = _ANSWER_IS.findall(text)
    if phrases:
        return phrases[-1]
    letters = _CHOICE.findall(text)
    return letters[-1] if letters else None


class NumericReward:
    """1.0 if the completion's final number equals the gold answer (see `extract_number`), else 0.0."""

    def __init__(self, fallback_last_number: bool = True) -> None:
        self.fallback_last_number = fallback_last_number

    def extract(self, completion: str) -> str | None:
        return extract_number(completion, self.fallback_last_number)

    def __call__(self, completion: str, answer: str) -> float:
        predicted = self.extract(completion)
        return float(predicted is not None and numbers_equal(predicted, answer))


class ChoiceReward:
    """1.0 if the completion's choice letter equals the gold letter (see `extract_choice`), else 0.0."""

    def extract(self, completion: str) -> str | None:
        return extract_choice(completion)

    def __call__(self, completion: str, answer: str) -> float:
        return float(self.extract(completion) == answer.strip().strip("()"))


class FormatReward:
    """1.0 if the completion ends its work with the answer line, "#### <answer>", and the answer parses, else 0.0.

    The answer parses as a number (numeric tasks) or a choice letter A-E; correctness is not checked.
    """

    def __call__(self, completion: str, answer: str) -> float:
        _, marker, tail = completion.rpartition(MARKER)
        return float(bool(marker) and bool(_NUMBER.search(tail) or _CHOICE.search(tail)))


# A worked step "expression = result" over integers: "5 + 3 = 8", "4 x 15 = 60", GSM8K's "<<100-50-30-15=5>>" and
# "$<<10/2=5>>5". The expression starts where no operator, number, word or decimal point precedes it (never the tail
# of a longer chain, nor the fraction of a mixed number "1 1/2"); a result followed by a decimal part, a fraction or a
# word is not an integer result, so the step is skipped.
_OPERATOR = r"[-+*/x×÷]"
_EQUATION = re.compile(
    rf"(?<![\w.$])(?<!\d\s)(?<!{_OPERATOR})(?<!{_OPERATOR}\s)((?:\$?\d+\s*{_OPERATOR}\s*)+\$?\d+)\s*=\s*\$?(-?\d+)(?![\w./]*\d)"
)


def evaluate(expression: str) -> float:
    """The value of an integer expression with + - * / (x, × and ÷ as * and /), usual precedence; nan on division by 0."""
    tokens = re.findall(rf"\d+|{_OPERATOR}", expression.replace("$", ""))
    total, term, sign = 0.0, float(tokens[0]), 1.0
    for op, number in zip(tokens[1::2], map(float, tokens[2::2])):
        if op in "+-":
            total, term, sign = total + sign * term, number, 1.0 if op == "+" else -1.0
        elif op in "*x×":
            term *= number
        else:
            term = term / number if number else math.nan
    return total + sign * term


def worked_steps(text: str) -> list[tuple[str, str]]:
    """The (expression, result) of every worked step before the answer marker: "5 + 3 = 8 . #### 8" -> [("5 + 3", "8")]."""
    return _EQUATION.findall(text.rpartition(MARKER)[0] if MARKER in text else text)


def step_accuracy(text: str) -> float:
    """The fraction of `text`'s worked steps "expression = result" (integers) whose arithmetic holds; 0 with none.

    A process reward for arithmetic: it checks each step on its own (a wrong fact "6 * 3 = 21" scores 0 for
    that step even when an earlier error already spoiled the answer), so the completions of a group differ in
    it more often than in final-answer correctness. Only the work before the answer marker counts.
    """
    steps = worked_steps(text)
    if not steps:
        return 0.0
    return sum(math.isclose(evaluate(expression), int(result), abs_tol=1e-6) for expression, result in steps) / len(steps)


class StepsReward:
    """The fraction of the completion's worked steps whose arithmetic holds (`step_accuracy`); the answer is not used.

    A shaping reward (`reward.weights.steps`), denser than 0/1 correctness. It rewards true statements, not
    useful ones: with a large weight a policy may learn to write easy true steps; keep it below "correct".
    """

    def __call__(self, completion: str, answer: str) -> float:
        return step_accuracy(completion)


class WeightedRewards:
    """The training reward: a weighted sum of named reward functions, each also reported on its own.

    `functions["correct"]` is the dataset's correctness reward (greedy evaluation scores only it);
    the others (e.g. "format") shape training. Weights default to 1 for "correct" and must name
    known functions.

    Args:
        functions: name -> (completion, answer) -> float.
        weights: name -> weight; a function without a weight gets 0 (reported, not rewarded).
    """

    def __init__(self, functions: dict, weights: dict[str, float] | None = None) -> None:
        weights = dict(weights or {"correct": 1.0})
        unknown = sorted(set(weights) - set(functions))
        if unknown:
            raise ValueError(f"reward.weights names {', '.join(unknown)}; the reward functions are {', '.join(functions)}")
        self.functions, self.weights = dict(functions), {name: float(weights.get(name, 0.0)) for name in functions}

    def parts(self, completions: list[str], answers: list[str]) -> dict[str, list[float]]:
        """Each function's reward of every completion."""
        return {name: [f(c, a) for c, a in zip(completions, answers)] for name, f in self.functions.items()}

    def total(self, parts: dict[str, list[float]]) -> list[float]:
        """The weighted sum of `parts`."""
        return [sum(self.weights[name] * values[i] for name, values in parts.items()) for i in range(len(next(iter(parts.values()))))]
