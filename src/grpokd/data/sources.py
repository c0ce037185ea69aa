"""Dataset loaders: each returns `Splits(train, test)` of `Example`s.

Every loader is a plain function with keyword arguments, the `_target_` of a
`conf/dataset/*.yaml`. Real datasets load from a local copy (`path`) or, when
`path` is None, from the Hugging Face Hub. Offline, a hub id fails in
milliseconds (the hub is probed once, without the retries `datasets` does)
with a `DataError` that says to pass `dataset.path=<local dir>`.

Held-out splits that the source does not provide are drawn by a stable hash
(sha256, not Python's salted `hash`) of the prompt, so they are the same in
every process and on every machine.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from grpokd.data import arith as synthetic
from grpokd.data.example import Example
from grpokd.data.rewards import MARKER, extract_choice, extract_number
from grpokd.errors import ConfigError
from grpokd.network import hub_reachable

_TEST_SEED_OFFSET = 1_000_003  # synthetic test problems come from a different stream than train
_CALCULATOR = re.compile(r"<<[^>]*>>")
_AQUA_OPTION = re.compile(r"\s*([A-E])\s*\)\s*(.*)", re.DOTALL)
_AQUA_FIELDS = frozenset({"question", "options", "rationale", "correct"})
_MATHINSTRUCT_FIELDS = frozenset({"source", "instruction", "output"})


class DataError(ConfigError):
    """A dataset cannot be loaded; the message names the problem and the fix on one line."""


@dataclass(frozen=True)
class Splits:
    """The train and test examples of one dataset."""

    train: list[Example]
    test: list[Example]


@dataclass(frozen=True)
class _Row:
    """One raw record and where it came from ("file.jsonl:12", "openai/gsm8k[test] row 3") for error messages."""

    where: str
    data: Mapping[str, Any]

    def get(self, field: str) -> Any:
        if field not in self.data:
            raise DataError(f"{self.where}: missing field '{field}' (fields present: {sorted(self.data)})")
        return self.data[field]


# --- synthetic ---------------------------------------------------------------------------------


def arith(train_size: int = 20000, test_size: int = 500, seed: int = 0, max_operand: int = 20) -> Splits:
    """Synthetic numeric word problems (see `grpokd.data.arith`); no test prompt occurs in train."""
    test = synthetic.make_arith(test_size, seed + _TEST_SEED_OFFSET, max_operand)
    exclude = {example.prompt for example in test}
    return Splits(synthetic.make_arith(train_size, seed, max_operand, exclude), test)


def arith_mc(train_size: int = 20000, test_size: int = 500, seed: int = 0, max_operand: int = 20) -> Splits:
    """Synthetic multiple-choice word problems (see `grpokd.data.arith`); no test prompt occurs in train."""
    test = synthetic.make_arith_mc(test_size, seed + _TEST_SEED_OFFSET, max_operand)
    exclude = {example.prompt for example in test}
    return Splits(synthetic.make_arith_mc(train_size, seed, max_operand, exclude), test)


# --- GSM8K -------------------------------------------------------------------------------------


def gsm8k(
    path: str | None = None,
    hub_id: str = "openai/gsm8k",
    test_size: int | None = None,
    train_size: int | None = None,
    strip_calculator: bool = True,
) -> Splits:
    """GSM8K: prompt = question, solution = the worked answer, answer = the number after "####".

    `path`: a directory with the official train.jsonl and test.jsonl (fields
    `question`, `answer`); None loads `hub_id` ("main" config). Calculator
    annotations "<<48/2=24>>" are removed from solutions if `strip_calculator`.
    Sizes keep the first n rows of each split.
    """
    if path is None:
        hub = _load_hub(hub_id, "main")
        train_rows, test_rows = (_hub_rows(hub[split], f"{hub_id}[{split}]") for split in ("train", "test"))
    else:
        directory = _existing(path, "gsm8k")
        if not directory.is_dir():
            raise DataError(
                f"gsm8k path {directory} is a file; pass dataset.path=<dir with train.jsonl and test.jsonl>"
            )
        train_rows, test_rows = (_read_rows(directory / f"{split}.jsonl") for split in ("train", "test"))
    return _nonempty(
        Splits(
            train=[_gsm8k_example(row, strip_calculator) for row in _first(train_rows, train_size)],
            test=[_gsm8k_example(row, strip_calculator) for row in _first(test_rows, test_size)],
        ),
        path or hub_id,
    )


def _gsm8k_example(row: _Row, strip_calculator: bool) -> Example:
    solution = str(row.get("answer")).strip()
    answer = extract_number(solution, fallback_last_number=False)
    if answer is None:
        raise DataError(f"{row.where}: field 'answer' has no '{MARKER} <number>'; GSM8K answers end in '{MARKER} N'")
    if strip_calculator:
        solution = _CALCULATOR.sub("", solution)
    return Example(prompt=str(row.get("question")).strip(), solution=solution, answer=answer)


# --- MathInstruct / AQuA-RAT -------------------------------------------------------------------


def mathinstruct(
    path: str | None = None,
    hub_id: str = "TIGER-Lab/MathInstruct",
    test_fraction: float = 0.05,
    test_size: int | None = None,
    train_size: int | None = None,
    seed: int = 0,
) -> Splits:
    """The multiple-choice chain-of-thought subset of MathInstruct, or AQuA-RAT files.

    MathInstruct rows (`source`, `instruction`, `output`) are kept when the
    source is CoT (not PoT) and the instruction lists "Answer Choices"; the gold
    letter is `extract_choice(output)` (rows without one are dropped) and the
    solution is the output, with " #### X" appended when it has no marker.
    AQuA-RAT rows (`question`, `options` ["A)21", ...], `rationale`, `correct`)
    become prompt "question Answer Choices: (A) 21 (B) ...", solution
    "rationale #### C", answer "C".

    `path`: None loads `hub_id`; a json/jsonl file or a directory of them in
    either format (detected per file from its fields). A directory holding
    test.json uses it as the test split and train.json (or, as in the public
    AQuA-RAT copy, dev.json) as train. Otherwise the test split is the rows
    whose hash of (`seed`, prompt) falls below `test_fraction`. Sizes keep the
    first n examples of each split.
    """
    if path is None:
        examples = _mathinstruct_examples(_hub_rows(_load_hub(hub_id, split="train"), hub_id))
        splits = _hash_split(examples, test_fraction, seed)
    else:
        root = _existing(path, "mathinstruct")
        train_file = next((root / name for name in ("train.json", "dev.json") if (root / name).is_file()), None)
        if root.is_dir() and (root / "test.json").is_file() and train_file is not None:
            splits = Splits(_choice_examples(train_file), _choice_examples(root / "test.json"))
        else:
            files = [root] if root.is_file() else sorted(f for f in root.iterdir() if f.suffix in (".json", ".jsonl"))
            splits = _hash_split([e for f in files for e in _choice_examples(f)], test_fraction, seed)
    return _nonempty(Splits(_first(splits.train, train_size), _first(splits.test, test_size)), path or hub_id)


def _choice_examples(file: Path) -> list[Example]:
    """Examples from one MathInstruct- or AQuA-RAT-format file, the format told by its first row's fields."""
    rows = _read_rows(file)
    if not rows:
        return []
    fields = set(rows[0].data)
    if _MATHINSTRUCT_FIELDS <= fields:
        return _mathinstruct_examples(rows)
    if _AQUA_FIELDS <= fields:
        return [_aqua_example(row) for row in rows]
    raise DataError(
        f"{file}: neither MathInstruct ({sorted(_MATHINSTRUCT_FIELDS)}) nor AQuA-RAT ({sorted(_AQUA_FIELDS)}) "
        f"fields (present: {sorted(fields)}); use the `jsonl` dataset for other formats"
    )


def _mathinstruct_examples(rows: Iterable[_Row]) -> list[Example]:
    examples = []
    for row in rows:
        source, instruction, output = (str(row.get(f)) for f in ("source", "instruction", "output"))
        if "CoT" not in source or "Answer Choices" not in instruction:
            continue
        letter = extract_choice(output)
        if letter is None:
            continue
        solution = output.strip() if MARKER in output else f"{output.strip()} {MARKER} {letter}"
        examples.append(Example(prompt=instruction.strip(), solution=solution, answer=letter))
    return examples


def _aqua_example(row: _Row) -> Example:
    choices = []
    for option in row.get("options"):
        match = _AQUA_OPTION.fullmatch(str(option))
        if match is None:
            raise DataError(f"{row.where}: option {option!r} is not of the form 'A)21'; fix or drop the row")
        choices.append(f"({match.group(1)}) {match.group(2).strip()}")
    correct = str(row.get("correct")).strip()
    if len(correct) != 1 or correct not in "ABCDE":
        raise DataError(f"{row.where}: field 'correct' is {correct!r}, expected one letter A-E")
    prompt = f"{str(row.get('question')).strip()} Answer Choices: {' '.join(choices)}"
    return Example(prompt=prompt, solution=f"{str(row.get('rationale')).strip()} {MARKER} {correct}", answer=correct)


# --- any jsonl ---------------------------------------------------------------------------------


def jsonl(
    path: str,
    prompt_field: str = "prompt",
    answer_field: str = "answer",
    solution_field: str | None = None,
    test_path: str | None = None,
    test_fraction: float = 0.1,
    seed: int = 0,
    teacher_field: str | None = "teacher",
) -> Splits:
    """Any json-lines (or JSON array) file with a prompt and a final answer per row.

    solution = the `solution_field` text, with " #### answer" appended when it
    has no marker; without a `solution_field` it is just "#### answer". The test
    split is `test_path` if given, else the rows whose hash of (`seed`, prompt)
    falls below `test_fraction`. A row's `teacher_field`, when present, names the
    teacher `weighting=route` sends it to (rows without one follow their component's route).
    """

    def examples(file: str) -> list[Example]:
        return [
            _jsonl_example(row, prompt_field, answer_field, solution_field, teacher_field)
            for row in _read_rows(_existing(file, "jsonl"))
        ]

    train = examples(path)
    splits = Splits(train, examples(test_path)) if test_path else _hash_split(train, test_fraction, seed)
    return _nonempty(splits, path)


def _jsonl_example(row: _Row, prompt_field: str, answer_field: str, solution_field: str | None, teacher_field: str | None = None) -> Example:
    answer = str(row.get(answer_field)).strip()
    solution = str(row.get(solution_field)).strip() if solution_field else ""
    if MARKER not in solution:
        solution = f"{solution} {MARKER} {answer}".strip()
    teacher = row.data.get(teacher_field) if teacher_field else None
    if teacher is not None and not (isinstance(teacher, str) and teacher.strip()):
        raise DataError(f"{row.where}: field '{teacher_field}' must name a teacher (a non-empty string), got {teacher!r}")
    return Example(prompt=str(row.get(prompt_field)).strip(), solution=solution, answer=answer, teacher=teacher and teacher.strip())


# --- shared helpers ----------------------------------------------------------------------------


def _existing(path: str, dataset: str) -> Path:
    resolved = Path(path).expanduser()
    if not resolved.exists():
        raise DataError(f"{dataset} path {resolved} does not exist; pass dataset.path=<existing local file or dir>")
    return resolved


def _read_rows(file: Path) -> list[_Row]:
    """Rows of a JSON-lines file or of a JSON array (told apart by the first character); blank lines skipped."""
    if file.is_dir():
        raise DataError(f"{file} is a directory; pass dataset.path=<a .jsonl or .json file>")
    if not file.is_file():
        raise DataError(f"{file} does not exist; pass dataset.path=<dir that contains {file.name}>")
    text = _utf8(file)
    if text.lstrip().startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as err:
            raise DataError(f"{file}: invalid JSON array ({err}); fix the file") from None
        return [_as_row(item, f"{file} item {i}") for i, item in enumerate(items)]
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            try:
                item = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{file}:{number}: invalid JSON ({err}); expected one object per line") from None
            rows.append(_as_row(item, f"{file}:{number}"))
    return rows


def _utf8(file: Path) -> str:
    """The file's text, less a leading byte-order mark (Excel and Notepad write one); a non-UTF-8 byte is reported with its line and column."""
    data = file.read_bytes()
    try:
        return data.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        column = err.start - (data.rfind(b"\n", 0, err.start) + 1) + 1
        raise DataError(
            f"{file}:{line}: byte 0x{data[err.start]:02x} at column {column} is not UTF-8; re-save the file as UTF-8"
        ) from None


def _as_row(item: Any, where: str) -> _Row:
    if not isinstance(item, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(item).__name__}")
    return _Row(where, item)


def _hub_rows(dataset: Iterable[Mapping[str, Any]], name: str) -> list[_Row]:
    return [_Row(f"{name} row {i}", row) for i, row in enumerate(dataset)]


def _load_hub(hub_id: str, config: str | None = None, split: str | None = None) -> Any:
    """`datasets.load_dataset(hub_id, config, split=split)`, failing fast and clearly when the hub is unreachable.

    `load_dataset` retries an unreachable hub for ~25 s before giving up, so
    the hub is probed once first. In offline mode (HF_HUB_OFFLINE or
    HF_DATASETS_OFFLINE set before `datasets` is imported) only the local
    cache is read, which fails fast by itself.
    """
    import datasets

    fix = f"pass dataset.path=<local dir with a copy of {hub_id}>"
    if not datasets.config.HF_HUB_OFFLINE and not hub_reachable():
        raise DataError(
            f"cannot load dataset '{hub_id}': the Hugging Face Hub is unreachable; {fix}, or set HF_HUB_OFFLINE=1 to use a cached copy"
        )
    try:
        return datasets.load_dataset(hub_id, config, split=split)
    except (OSError, ValueError) as err:  # ConnectionError, DatasetNotFoundError (a FileNotFoundError), bad config
        raise DataError(f"cannot load dataset '{hub_id}' from the Hub ({type(err).__name__}: {err}); {fix}") from None


def _stable_fraction(text: str, seed: int) -> float:
    """A uniform number in [0, 1) fixed by (seed, text) on every machine."""
    digest = hashlib.sha256(f"{seed}\n{text}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def _hash_split(examples: list[Example], test_fraction: float, seed: int) -> Splits:
    in_test = [_stable_fraction(example.prompt, seed) < test_fraction for example in examples]
    return Splits(
        train=[example for example, held_out in zip(examples, in_test) if not held_out],
        test=[example for example, held_out in zip(examples, in_test) if held_out],
    )


def _first(items: list, n: int | None) -> list:
    return items if n is None else items[:n]


def _nonempty(splits: Splits, source: str | Path) -> Splits:
    for name in ("train", "test"):
        if not getattr(splits, name):
            raise DataError(
                f"dataset {source}: the {name} split is empty; check the file contents, sizes and test_fraction"
            )
    return splits
