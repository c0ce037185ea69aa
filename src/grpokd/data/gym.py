"""reasoning-gym tasks (`dataset=reasoning_gym dataset.task=NAME`; `pip install -e ".[reasoning]"`).

reasoning-gym generates seeded procedural problems (basic_arithmetic, products, chain_sum, leg_counting,
gsm_symbolic and a hundred more), each task with its own answer checker, `score_answer(answer, entry)`.
`splits` draws train and test from two seeds and drops from train every question test holds (the validation
split is held out of train by `TaskData`, so the three never share an item). `TaskReward` reads the answer
after the last "####" (or, when lenient, the number stated otherwise) and grades it with the task's checker.

Some checkers read the entry's metadata besides its answer (calendar_arithmetic, number_format, ...), so
each example's `answer` is the entry as JSON, {"answer": ..., "metadata": ...}; `gold_answer` reads the answer
back. The tasks have no worked solutions: an example's `solution` is "#### <answer>", what SFT and KD on gold
states see.
"""

from __future__ import annotations

import json
import re
from typing import Any

from grpokd.data.example import Example
from grpokd.data.rewards import MARKER, Parsed, as_number, parse_number
from grpokd.data.sources import DataError, Splits
from grpokd.errors import ConfigError

INSTALL = 'pip install -e ".[reasoning]"'
_TEST_SEED_OFFSET = 1_000_003  # test problems come from another seed than train's
_TAG = re.compile(r"</?\w+>")  # "<answer>", "</answer>"


def task_dataset(task: str, config: dict[str, Any], seed: int, size: int):
    """reasoning-gym's dataset of `task` with its settings `config`; a ConfigError naming the key on a bad one."""
    try:
        import reasoning_gym
    except ImportError:
        raise ConfigError(f"dataset=reasoning_gym needs the reasoning-gym package: {INSTALL}") from None
    try:
        return reasoning_gym.create_dataset(task, seed=seed, size=size, **config)
    except ValueError as err:
        raise ConfigError(f"dataset.task={task}: {err}") from None
    except (TypeError, AssertionError) as err:
        raise ConfigError(f"dataset.task_config={config} for task {task}: {err}") from None


def splits(task: str, config: dict[str, Any] | None = None, train_size: int = 5000, test_size: int = 500, seed: int = 0) -> Splits:
    """Train and test examples of `task`: test from seed + 1000003, train from `seed` without the questions test holds."""
    config = dict(config or {})
    test = [example(entry, task) for entry in task_dataset(task, config, seed + _TEST_SEED_OFFSET, test_size)]
    held = {ex.prompt for ex in test}
    train = [ex for ex in (example(entry, task) for entry in task_dataset(task, config, seed, train_size)) if ex.prompt not in held]
    if not train:
        raise DataError(f"dataset.task={task}: every train question is also a test question; the task's settings allow too few problems")
    return Splits(train, test)


def example(entry: dict[str, Any], task: str) -> Example:
    """One reasoning-gym entry as an `Example` (the module's docstring says what its fields hold)."""
    try:
        answer = json.dumps({"answer": entry["answer"], "metadata": entry["metadata"]})
    except TypeError as err:
        raise DataError(f"dataset.task={task}: an entry's metadata is not JSON ({err})") from None
    return Example(prompt=entry["question"], solution=f"{MARKER} {entry['answer']}", answer=answer)


def gold_answer(answer: str) -> str:
    """The gold answer of an example's `answer` (the entry as JSON)."""
    return json.loads(answer)["answer"]


class TaskReward:
    """The task's own checker on the completion's answer: 1.0 if it scores it fully right, else 0.0 (or its score
    itself with `partial_credit`: basic_arithmetic's, for one, gives len(gold) / len(answer) when the answer holds
    the gold).

    The answer is the first line after the last "####", without tags ("<answer>"), after its last "=" when it has
    one (Qwen2.5 writes "#### 9 + -6 = 3"), stripped of spaces, "*", "$" and a closing full stop, and normalised
    when it is a number ("1,234.0" -> "1234"). Without "####": when `lenient`, the number the
    completion states in another style or else its last number (`rewards.parse_number`); strict, none (format and
    answer both count).

    Args:
        task, config: the task and its settings (as `splits` got them).
        lenient: grade completions without "####" by their stated or last number.
        partial_credit: pass the checker's score through instead of 0/1.
    """

    def __init__(self, task: str, config: dict[str, Any] | None = None, lenient: bool = True, partial_credit: bool = False) -> None:
        self.dataset = task_dataset(task, dict(config or {}), 0, 1)
        self.lenient, self.partial_credit = lenient, partial_credit

    def parse(self, completion: str) -> Parsed:
        _, marker, tail = completion.rpartition(MARKER)
        if marker:
            line = _TAG.sub("", next((line for line in tail.splitlines() if line.strip()), "")).rpartition("=")[2]
            line = line.strip().strip("*$ ").removesuffix(".").strip()
            return Parsed(as_number(line) or line or None, "marker")
        return parse_number(completion, fallback_last_number=True) if self.lenient else Parsed(None, None)

    def extract(self, completion: str) -> str | None:
        return self.parse(completion).value

    def gold(self, answer: str) -> str:
        """The gold answer as predictions show it (an example's `answer` is the whole entry as JSON)."""
        return gold_answer(answer)

    def __call__(self, completion: str, answer: str) -> float:
        score = float(self.dataset.score_answer(self.extract(completion), json.loads(answer)))
        return score if self.partial_credit else float(score >= 1.0)
