r"""Answer parsing and 0/1 correctness rewards.

Two answer kinds cover every dataset here: a number (GSM8K, `arith`) and a
multiple-choice letter A-E (MathInstruct, AQuA-RAT, `arith_mc`). Gold
solutions end in the GSM8K marker "#### <answer>". Instruct models (SmolLM2,
Qwen2.5) answer in other styles too, so a completion is read in the first of
these styles that it uses (`STYLES`, in priority order):

- "marker": the first answer after the last "####". A marker commits: with no
  answer after it the completion has none, whatever the text before says.
- "boxed": the answer inside the last LaTeX `\boxed{...}` (or `\fbox{...}`)
  that holds one: "$\boxed{1,234}$", "\boxed{18 \text{ dollars}}", "\boxed{(B)}".
- "answer_is": the answer right after the last "answer is" / "Answer:" /
  "answer -" phrase (case-insensitive; Markdown "**", ":", "$" and "\(" between
  them are skipped) that is followed by one: "The final answer is: $1,200."
- "last": the last answer anywhere in the text; a fallback, numbers only when
  asked for (`fallback_last_number`), always for choices (as before).

The parsers are pure module-level functions; the reward classes only bind
options so that Hydra can build them from `_target_`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from decimal import Decimal

from grpokd.errors import check_range

MARKER = "####"
STYLES = ("marker", "boxed", "answer_is", "last")  # the parsers' priority order
FORMAT_STYLES = STYLES[:-1]  # the styles in which a model states its answer; "last" is a guess

# A number as written in math text: optional minus (not when it is a binary
# minus as in "10-3"), optional "$", thousands groups "1,234" or plain digits,
# optional decimals. A trailing period ("7.") is not part of the number.
_NUMBER = re.compile(
    r"(?:(?<![\w)])-)?\$?(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?|(?:(?<![\w)])-)?\.\d+"
)
# A number or a LaTeX fraction "\frac{1}{2}" (also \dfrac, \tfrac) of unsigned decimals, read as its quotient.
# A zero denominator is no fraction (its digits are read as plain numbers, as before fractions were known).
_FRACTION = r"(?P<sign>(?<![\w)])-)?\\[dt]?frac\{\s*(?P<num>\d+(?:\.\d+)?)\s*\}\{(?!\s*0*(?:\.0*)?\s*\})\s*(?P<den>\d+(?:\.\d+)?)\s*\}"
_NUMERIC = rf"{_FRACTION}|(?P<number>{_NUMBER.pattern})"
# A choice letter standing alone, optionally in parentheses: "B", "(B)", "B)".
_CHOICE = re.compile(r"(?<![A-Za-z0-9])\(?(?P<letter>[A-E])\)?(?![A-Za-z0-9])")
# "answer is", "Answer:", "answer -", then what may stand between the phrase and the answer: spaces, Markdown
# emphasis "**", colons, "$" and the LaTeX openers "\(", "\[", "\$".
_ANSWER_IS = r"(?i:answer)\s*(?:(?i:is)|[:\-])(?:[\s*_:$]|\\[(\[$])*"
# LaTeX boxes; their contents are read up to the matching brace.
_BOX = re.compile(r"\\(?:boxed|fbox)\s*\{")


@dataclass(frozen=True)
class Parsed:
    """A parsed answer: its canonical value (None: no answer) and the style it was read in (one of `STYLES`; None: none found)."""

    value: str | None
    style: str | None


@dataclass(frozen=True)
class _Kind:
    """How one answer kind is read: its pattern, the pattern after an answer phrase, a match's canonical value."""

    pattern: re.Pattern[str]
    answer_is: re.Pattern[str]
    value: Callable[[re.Match[str]], str]

    def first(self, text: str) -> str | None:
        """The canonical value of the first answer of this kind in `text`, None if there is none."""
        match = self.pattern.search(text)
        return self.value(match) if match else None


def normalize_number(token: str) -> str:
    """Canonical form of a number token: "$1,234.50" -> "1234.5", "-0" -> "0", ".5" -> "0.5"."""
    text = token.replace("$", "").replace(",", "").replace("%", "").strip()
    negative = text.startswith("-")
    whole, _, frac = text.lstrip("-").partition(".")
    whole = whole.lstrip("0") or "0"
    frac = frac.rstrip("0")
    number = f"{whole}.{frac}" if frac else whole
    return "-" + number if negative and number != "0" else number


def as_number(text: str) -> str | None:
    """`text` normalised (`normalize_number`) when it is exactly one number, as math text writes it; else None."""
    return normalize_number(text) if _NUMBER.fullmatch(text.strip()) else None


def _number_value(match: re.Match[str]) -> str:
    """The canonical value of a `_NUMERIC` match: "1,234.50" -> "1234.5", "\\frac{1}{4}" -> "0.25" (28 digits for 1/3)."""
    if match["number"] is not None:
        return normalize_number(match["number"])
    quotient = Decimal(match["num"]) / Decimal(match["den"])
    return normalize_number(f"{match['sign'] or ''}{quotient:f}")


_NUMBERS = _Kind(re.compile(_NUMERIC), re.compile(rf"{_ANSWER_IS}(?:{_NUMERIC})"), _number_value)
_CHOICES = _Kind(
    _CHOICE, re.compile(rf"{_ANSWER_IS}\(?(?P<letter>[A-E])\)?(?![A-Za-z0-9])"), lambda match: match["letter"]
)


def boxed_contents(text: str) -> list[str]:
    """The contents of every `\\boxed{...}` / `\\fbox{...}` in `text`, in order: nested braces kept, unclosed boxes dropped."""
    contents = []
    for box in _BOX.finditer(text):
        depth = 1
        for end in range(box.end(), len(text)):
            depth += {"{": 1, "}": -1}.get(text[end], 0)
            if depth == 0:
                contents.append(text[box.end() : end])
                break
    return contents


def _first_of(texts: Iterable[str], kind: _Kind) -> str | None:
    """The first answer of `kind` found in `texts`, each text read with `kind.first`."""
    return next((value for text in texts if (value := kind.first(text)) is not None), None)


def _parse(text: str, kind: _Kind, fallback_last: bool) -> Parsed:
    """`text`'s answer of `kind` in the first style of `STYLES` that it uses (see the module docstring)."""
    _, marker, tail = text.rpartition(MARKER)
    if marker:
        return Parsed(kind.first(tail), "marker")
    boxed = _first_of(reversed(boxed_contents(text)), kind)
    if boxed is not None:
        return Parsed(boxed, "boxed")
    phrases = list(kind.answer_is.finditer(text))
    if phrases:
        return Parsed(kind.value(phrases[-1]), "answer_is")
    values = list(kind.pattern.finditer(text)) if fallback_last else []
    return Parsed(kind.value(values[-1]), "last") if values else Parsed(None, None)


def parse_number(text: str, fallback_last_number: bool = True) -> Parsed:
    """The final numeric answer of `text` and its style: marker, boxed, answer_is, then last (if `fallback_last_number`).

    Values are normalised (see `normalize_number`): commas, "$", "%", a unit
    word or a full stop after the number and trailing decimal zeros are ignored
    ("#### $1,234.50." -> "1234.5", "**Answer:** 7.5 km" -> "7.5"); a minus
    is a sign only when it does not follow a word or ")" ("10-3" -> "3"). A
    LaTeX fraction reads as its quotient: "\\boxed{\\frac{1}{2}}" -> "0.5"; a
    LaTeX thousands group "1{,}234" as "1,234". A marker with no number after it
    gives Parsed(None, "marker"); no answer at all gives Parsed(None, None).
    """
    return _parse(text.replace("{,}", ","), _NUMBERS, fallback_last_number)


def extract_number(text: str, fallback_last_number: bool = True) -> str | None:
    """The final numeric answer of `text`, normalised: `parse_number(text, fallback_last_number).value`."""
    return parse_number(text, fallback_last_number).value


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


def parse_choice(text: str) -> Parsed:
    """The multiple-choice letter (A-E, case-sensitive) that `text` answers with, and its style.

    Styles as in `parse_number`: the first standalone letter after the last
    "####"; else the letter in the last box holding one ("\\boxed{(B)}"); else
    the letter right after the last answer phrase ("The answer is (B)",
    "**Answer:** B"); else the last standalone capital A-E in the text (may
    catch the article "A": it is a fallback). Parentheses are stripped:
    "(B)" -> "B".
    """
    return _parse(text, _CHOICES, fallback_last=True)


def extract_choice(text: str) -> str | None:
    """The multiple-choice letter that `text` answers with: `parse_choice(text).value`."""
    return parse_choice(text).value


def answer_style(text: str) -> str | None:
    """The style ("marker", "boxed" or "answer_is") in which `text` states an answer, number or letter; None if none.

    The first style of `FORMAT_STYLES` in which `parse_number` (without the
    last-number fallback) or `parse_choice` finds an answer; a choice found only
    as the last capital letter is no stated answer. A marker commits, so "####"
    with nothing parseable after it gives None even when a box precedes it.
    """
    found = {parsed.style for parsed in (parse_number(text, fallback_last_number=False), parse_choice(text)) if parsed.value is not None}
    return next((style for style in FORMAT_STYLES if style in found), None)


class NumericReward:
    """1.0 if the completion's final number equals the gold answer (see `parse_number`), else 0.0."""

    def __init__(self, fallback_last_number: bool = True) -> None:
        self.fallback_last_number = fallback_last_number

    def parse(self, completion: str) -> Parsed:
        return parse_number(completion, self.fallback_last_number)

    def extract(self, completion: str) -> str | None:
        return self.parse(completion).value

    def __call__(self, completion: str, answer: str) -> float:
        predicted = self.extract(completion)
        return float(predicted is not None and numbers_equal(predicted, answer))


class ChoiceReward:
    """1.0 if the completion's choice letter equals the gold letter (see `parse_choice`), else 0.0."""

    def parse(self, completion: str) -> Parsed:
        return parse_choice(completion)

    def extract(self, completion: str) -> str | None:
        return self.parse(completion).value

    def __call__(self, completion: str, answer: str) -> float:
        return float(self.extract(completion) == answer.strip().strip("()"))


class FormatReward:
    """1.0 if the completion states a parseable answer in one of `styles` (see `answer_style`), else 0.0.

    The answer may be a number (numeric tasks) or a choice letter A-E; correctness is not checked. The default,
    ("marker",), asks for the answer line "#### <answer>" with a parseable answer after the last marker; adding
    "boxed" or "answer_is" also accepts the answers instruct models write without being taught the marker.

    Args:
        styles: accepted styles, a subset of `FORMAT_STYLES` ("marker", "boxed", "answer_is").
    """

    def __init__(self, styles: Iterable[str] = ("marker",)) -> None:
        self.styles = tuple(styles)
        unknown = sorted(set(self.styles) - set(FORMAT_STYLES))
        if unknown:
            raise ValueError(f"FormatReward styles {', '.join(unknown)} unknown; choose from {', '.join(FORMAT_STYLES)}")

    def __call__(self, completion: str, answer: str) -> float:
        return float(answer_style(completion) in self.styles)


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


class ComponentRewards:
    """The correctness reward of a mixture of datasets (`dataset=mix`): each example is scored by its own
    component's reward (a number for `arith`, a letter for `arith_mc`). Callers that know an example's component
    take its reward with `for_component`.

    Args:
        rewards: component name -> (completion, answer) -> float.
    """

    def __init__(self, rewards: dict[str, Callable[[str, str], float]]) -> None:
        self.rewards = dict(rewards)

    def of(self, component: str) -> Callable[[str, str], float]:
        if component not in self.rewards:
            raise KeyError(f"no reward for component {component!r}; the components are {', '.join(self.rewards)}")
        return self.rewards[component]


def for_component(reward: Callable[[str, str], float] | ComponentRewards, component: str | None) -> Callable[[str, str], float]:
    """The reward that scores an example of `component`: its component's for a mixture, else `reward` itself."""
    return reward.of(component) if isinstance(reward, ComponentRewards) else reward


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
        for name, weight in weights.items():
            check_range(f"reward.weights.{name}", weight)  # any finite number: a negative weight is a penalty
        self.functions, self.weights = dict(functions), {name: float(weights.get(name, 0.0)) for name in functions}

    @classmethod
    def of(cls, reward: Callable[[str, str], float] | "WeightedRewards") -> "WeightedRewards":
        """`reward` itself when it is a WeightedRewards, else `reward` alone as "correct" with weight 1."""
        return reward if isinstance(reward, WeightedRewards) else cls({"correct": reward})

    def parts(self, completions: list[str], answers: list[str], components: list[str] | None = None) -> dict[str, list[float]]:
        """Each function's reward of every completion (of each completion's component, for a mixture's rewards)."""
        components = components or [None] * len(completions)
        return {
            name: [for_component(f, k)(c, a) for c, a, k in zip(completions, answers, components)] for name, f in self.functions.items()
        }

    def total(self, parts: dict[str, list[float]]) -> list[float]:
        """The weighted sum of `parts`."""
        return [sum(self.weights[name] * values[i] for name, values in parts.items()) for i in range(len(next(iter(parts.values()))))]
