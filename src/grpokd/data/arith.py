"""Synthetic word problems for the embedded models: `arith` (numeric) and `arith_mc` (multiple choice).

Built so that a ~1M-parameter T5 with a word-level tokenizer learns them on a
CPU in minutes:
- every token is separated by single spaces, punctuation included
  ("Tom has 5 apples . He buys 3 more . How many apples does Tom have now ?");
- the closed vocabulary is `vocabulary()`: a few dozen words and the numbers
  0..MAX_NUMBER; every operand, intermediate and final value stays in range;
- solutions are GSM8K-style worked steps then the answer marker:
  "5 + 3 = 8 . 8 - 2 = 6 . #### 6";
- `arith_mc` solutions compute the value the same way, then scan the options
  in order up to the one that holds it: "... = 6 . A 9 B 4 C 6 #### C".
  The scan is a procedure a tiny model learns (copying options is an
  induction-style lookup that every scanned token trains); with the bare
  "#### C" the value -> letter look-up stayed at chance for 1200 SFT steps.

Numbers stop at 20 so that the space of arithmetic facts is small (about 430
distinct steps such as "7 * 2 = 14"). An undertrained model's errors on these
tasks are almost all wrong facts (measured: 206 of 229 errors of the earlier
0..99 student); with 0..99 (about 4000 facts) a 100-step RL run met each fact
about once and GRPO did not move the held-out accuracy in 400 steps, although it
raised the reward of a fixed set of 16 prompts from 10% to 46% in 40 steps.
With 0..20 every fact recurs in training several times within 100 RL steps.

`slipped` rewrites an example as a solver with a systematic slip would (a "-"
or "*" result one too high, carried to the answer): the embedded causal
student is trained on such data, so that RL has a shared, half-known error to
fix and the teachers (trained on the true solutions) know the fix.

A problem is a start sentence and 0-2 operation sentences; 40% have one
computation step, 60% two. Generation is a pure function of the seed
(`random.Random(seed)`).
"""

from __future__ import annotations

import operator
import random
from collections.abc import Callable, Collection
from dataclasses import dataclass

from grpokd.data.example import Example
from grpokd.data.rewards import worked_steps

MAX_NUMBER = 20
MAX_FACTOR = 9  # factors of "*" are 2..9, products stay <= MAX_NUMBER
ONE_STEP_FRACTION = 0.4
CHOICE_LETTERS = ("A", "B", "C", "D", "E")
DISTRACTOR_SPREAD = 5  # distractors lie within +-5 of the answer

_NAMES = {"Tom": "He", "Sam": "He", "Ben": "He", "Max": "He", "Ann": "She", "Mia": "She", "Eva": "She", "Lily": "She"}
_ITEMS = ("apples", "pens", "books", "cards", "eggs", "coins")
_SYMBOLS = (".", "?", "+", "-", "*", "=", "####", "Options", ":", ")", *CHOICE_LETTERS)
# Operation sentences by operator; "{p}" is the subject pronoun, "{other}" another name.
_ADD = ("{p} buys {n} more .", "{p} finds {n} more .", "{other} gives {p_obj} {n} more .")
_SUB = ("{p} gives {n} to {other} .", "{p} eats {n} .", "{p} loses {n} .")
_MUL = ("{p} gets {n} times as many .", "{p} makes it {n} times as many .")
_OBJECT = {"He": "him", "She": "her"}


@dataclass(frozen=True)
class Problem:
    """A generated word problem: question tokens, worked steps ("5 + 3 = 8 ."), final value."""

    question: str
    steps: tuple[str, ...]
    value: int


def vocabulary() -> list[str]:
    """Every token any `arith`/`arith_mc` prompt or solution can contain: words sorted, then "0".."MAX_NUMBER"."""
    words = {"has", "How", "many", "does", "have", "now", "bags", "with", "in", "each", "bag", *_NAMES, *_ITEMS}
    words |= set(_OBJECT.values()) | set(_NAMES.values()) | set(_SYMBOLS)
    for template in _ADD + _SUB + _MUL:
        words |= {token for token in template.split() if "{" not in token}
    return sorted(words) + [str(n) for n in range(MAX_NUMBER + 1)]


_APPLY = {"+": operator.add, "-": operator.sub, "*": operator.mul}


def _step(a: int, op: str, b: int) -> tuple[str, int]:
    value = _APPLY[op](a, b)
    assert 0 <= value <= MAX_NUMBER, (a, op, b)
    return f"{a} {op} {b} = {value} .", value


def _operation(rng: random.Random, value: int, max_operand: int) -> tuple[str, int]:
    """Choose an operator that keeps the value in 0..MAX_NUMBER and an operand for it."""
    ops = []
    if value + 1 <= MAX_NUMBER:
        ops.append("+")
    if value >= 1:
        ops.append("-")
    if 2 <= value <= MAX_NUMBER // 2:
        ops.append("*")
    op = rng.choice(ops)
    if op == "+":
        return op, rng.randint(1, min(max_operand, MAX_NUMBER - value))
    if op == "-":
        return op, rng.randint(1, min(max_operand, value))
    return op, rng.randint(2, min(MAX_FACTOR, MAX_NUMBER // value))


def make_problem(rng: random.Random, max_operand: int = 20) -> Problem:
    """One random word problem with one or two computation steps."""
    name, other = rng.sample(sorted(_NAMES), 2)
    pronoun, item = _NAMES[name], rng.choice(_ITEMS)
    n_steps = 1 if rng.random() < ONE_STEP_FRACTION else 2
    sentences, steps = [], []
    if rng.random() < 0.25:  # the bags start: a product is the first step
        bags = rng.randint(2, min(MAX_FACTOR, max_operand, MAX_NUMBER // 2))
        per_bag = rng.randint(2, min(MAX_FACTOR, MAX_NUMBER // bags))
        sentences.append(f"{name} has {bags} bags with {per_bag} {item} in each bag .")
        step, value = _step(bags, "*", per_bag)
        steps.append(step)
    else:
        value = rng.randint(2, max_operand)
        sentences.append(f"{name} has {value} {item} .")
    while len(steps) < n_steps:
        op, operand = _operation(rng, value, max_operand)
        template = rng.choice({"+": _ADD, "-": _SUB, "*": _MUL}[op])
        sentences.append(template.format(p=pronoun, p_obj=_OBJECT[pronoun], other=other, n=operand))
        step, value = _step(value, op, operand)
        steps.append(step)
    sentences.append(f"How many {item} does {name} have now ?")
    return Problem(question=" ".join(sentences), steps=tuple(steps), value=value)


def _numeric_example(rng: random.Random, max_operand: int) -> Example:
    problem = make_problem(rng, max_operand)
    return Example(problem.question, " ".join([*problem.steps, "####", str(problem.value)]), str(problem.value))


def _choice_example(rng: random.Random, max_operand: int) -> Example:
    """Five distinct options (the answer at a random letter, four distractors within +-5); the solution scans them."""
    problem = make_problem(rng, max_operand)
    low, high = problem.value - DISTRACTOR_SPREAD, problem.value + DISTRACTOR_SPREAD
    near = [v for v in range(max(0, low), min(MAX_NUMBER, high) + 1) if v != problem.value]
    options = [*rng.sample(near, len(CHOICE_LETTERS) - 1), problem.value]
    rng.shuffle(options)
    letter = CHOICE_LETTERS[options.index(problem.value)]
    listed = " ".join(f"{label} ) {value}" for label, value in zip(CHOICE_LETTERS, options))
    prompt = f"{problem.question} Options : {listed}"
    scan = " ".join(f"{label} {value}" for label, value in zip(CHOICE_LETTERS, options[: options.index(problem.value) + 1]))
    return Example(prompt, " ".join([*problem.steps, scan, "####", letter]), letter)


SLIP_OPS = ("-", "*")  # the operators whose results `slipped` writes one too high


def slipped(example: Example, rng: random.Random, rate: float) -> Example:
    """`example` as a solver with a systematic slip writes it: each "-" or "*" step's result one too high with
    probability `rate`, the error carried through the later steps to the answer ("8 - 3 = 6 . 6 + 2 = 8 . #### 8").

    Only the solution changes (and, for multiple choice, a distractor becomes the slipped value when it is not
    an option, so that the scan finds it); `answer` stays the correct one. A draw whose carried values would
    leave 0..MAX_NUMBER keeps the example as it is. This is the embedded student's training data: it half-holds
    the slip, so the correct result is in its distribution but not its mode (see docs/testbed.md).
    """
    written, value = [], None
    for expression, _ in worked_steps(example.solution):  # the "a op b = v ." steps, not the multiple-choice scan
        a, op, b = expression.split()
        a = int(a) if value is None else value  # later steps start from the value written before
        value = _APPLY[op](a, int(b)) + (op in SLIP_OPS and rng.random() < rate)
        if not 0 <= value <= MAX_NUMBER:
            return example
        written.append(f"{a} {op} {b} = {value} .")
    if example.answer.isdigit():
        return Example(example.prompt, " ".join([*written, "####", str(value)]), example.answer)
    question, listed = example.prompt.split(" Options : ")
    values = listed.split()[2::3]  # "A ) 9 B ) 4 ..." -> ["9", "4", ...]
    if str(value) not in values:
        correct = CHOICE_LETTERS.index(example.answer)
        values[rng.choice([i for i in range(len(values)) if i != correct])] = str(value)
    chosen = values.index(str(value))
    scan = " ".join(f"{label} {v}" for label, v in zip(CHOICE_LETTERS, values[: chosen + 1]))
    prompt = f"{question} Options : " + " ".join(f"{label} ) {v}" for label, v in zip(CHOICE_LETTERS, values))
    return Example(prompt, " ".join([*written, scan, "####", CHOICE_LETTERS[chosen]]), example.answer)


def _generate(
    make: Callable[[random.Random, int], Example], n: int, seed: int, max_operand: int, exclude: Collection[str]
) -> list[Example]:
    if not 2 <= max_operand <= MAX_NUMBER:
        raise ValueError(f"max_operand must be in 2..{MAX_NUMBER}, got {max_operand}")
    rng = random.Random(seed)
    out: list[Example] = []
    tries = 20 * n + 1000  # bounded so that an `exclude` covering the problem space cannot loop forever
    while len(out) < n and tries:
        tries -= 1
        example = make(rng, max_operand)
        if example.prompt not in exclude:
            out.append(example)
    if len(out) < n:
        raise ValueError(f"drew only {len(out)} of {n} problems outside the excluded prompts; raise max_operand")
    return out


def make_arith(n: int, seed: int, max_operand: int = 20, exclude: Collection[str] = frozenset()) -> list[Example]:
    """`n` numeric word problems from `random.Random(seed)`, skipping prompts in `exclude`.

    answer is the final value ("6"); solution is "5 + 3 = 8 . 8 - 2 = 6 . #### 6".
    Additive operands are 1..max_operand (start 2..max_operand), factors 2..9.
    """
    return _generate(_numeric_example, n, seed, max_operand, exclude)


def make_arith_mc(n: int, seed: int, max_operand: int = 20, exclude: Collection[str] = frozenset()) -> list[Example]:
    """`n` multiple-choice word problems: prompt ends in "Options : A ) 5 B ) 8 C ) 11 D ) 3 E ) 7".

    Problems from the same generator as `make_arith`; answer is the correct letter and the
    solution is the worked steps, the options scanned up to the answer, then "#### B".
    """
    return _generate(_choice_example, n, seed, max_operand, exclude)
