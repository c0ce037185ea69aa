"""Synthetic tasks and dataset loaders: determinism, closed vocabulary, gold answers, splits and errors."""

from __future__ import annotations

import json
import random
import time

import pytest

from grpokd.data import arith as synthetic
from grpokd.data import sources
from grpokd.data.example import Example
from grpokd.data.rewards import ChoiceReward, NumericReward
from grpokd.data.sources import DataError, Splits
from grpokd.errors import ConfigError

# --- synthetic tasks ---------------------------------------------------------------------------


@pytest.mark.parametrize("make", [synthetic.make_arith, synthetic.make_arith_mc])
def test_synthetic_is_deterministic_per_seed(make):
    assert make(200, seed=3) == make(200, seed=3)
    assert make(200, seed=3) != make(200, seed=4)


@pytest.mark.parametrize("make", [synthetic.make_arith, synthetic.make_arith_mc])
def test_synthetic_tokens_are_in_the_vocabulary_and_single_spaced(make):
    vocabulary = set(synthetic.vocabulary())
    for example in make(3000, seed=0):
        for text in (example.prompt, example.solution):
            tokens = text.split(" ")
            assert all(tokens), f"empty token (double space) in {text!r}"
            assert set(tokens) <= vocabulary, set(tokens) - vocabulary


def steps_of(solution: str) -> list[tuple[int, str, int, int]]:
    """The worked steps of a solution as (a, op, b, result)."""
    tokens = solution.split(" #### ")[0].split()
    return [(int(tokens[i]), tokens[i + 1], int(tokens[i + 2]), int(tokens[i + 4])) for i in range(0, len(tokens) - 5, 6) if tokens[i + 3] == "="]


@pytest.mark.parametrize("make", [synthetic.make_arith, synthetic.make_arith_mc])
def test_slipped_at_rate_zero_is_the_example_itself(make):
    rng = random.Random(0)
    examples = make(300, seed=7)
    assert [synthetic.slipped(ex, rng, 0.0) for ex in examples] == examples


def test_slipped_at_rate_one_writes_every_minus_and_times_result_one_too_high_and_carries_it():
    rng, changed = random.Random(0), 0
    for example in synthetic.make_arith(500, seed=8):
        slipped = synthetic.slipped(example, rng, 1.0)
        assert slipped.prompt == example.prompt and slipped.answer == example.answer  # the reward still wants the truth
        if slipped == example:  # kept: a carried value would have left 0..MAX_NUMBER, or no - / * step
            continue
        changed += 1
        steps, value = steps_of(slipped.solution), None
        for a, op, b, result in steps:
            assert value is None or a == value  # each later step starts from the value written before
            true = {"+": a + b, "-": a - b, "*": a * b}[op]
            assert result == true + (op in synthetic.SLIP_OPS) and 0 <= result <= synthetic.MAX_NUMBER
            value = result
        assert slipped.solution.endswith(f"#### {value}") and str(value) != example.answer
        assert [(op, b) for _, op, b, _ in steps] == [(op, b) for _, op, b, _ in steps_of(example.solution)]
    assert changed > 300


def test_slipped_choice_examples_scan_to_the_slipped_value_and_keep_the_true_answer_among_the_options():
    rng, changed = random.Random(0), 0
    for example in synthetic.make_arith_mc(500, seed=9):
        slipped = synthetic.slipped(example, rng, 1.0)
        if slipped == example:
            continue
        changed += 1
        values = slipped.prompt.split(" Options : ")[1].split()[2::3]
        true_values = example.prompt.split(" Options : ")[1].split()[2::3]
        written = str(steps_of(slipped.solution)[-1][-1])
        letter = slipped.solution.split(" #### ")[1]
        assert len(set(values)) == 5 and values[synthetic.CHOICE_LETTERS.index(letter)] == written
        assert slipped.answer == example.answer and values["ABCDE".index(example.answer)] == true_values["ABCDE".index(example.answer)]
        assert sum(v != t for v, t in zip(values, true_values)) <= 1  # at most one distractor replaced
        assert ChoiceReward()(slipped.solution, slipped.answer) == 0.0
    assert changed > 300


def test_vocabulary_is_words_sorted_then_numbers():
    vocabulary = synthetic.vocabulary()
    numbers = [str(n) for n in range(synthetic.MAX_NUMBER + 1)]
    words = vocabulary[: -len(numbers)]
    assert vocabulary[-len(numbers) :] == numbers
    assert words == sorted(words) and len(set(words)) == len(words)
    assert {"####", "Options", ":", ")", "A", "E"} <= set(words)
    assert len(words) < 80  # a small closed vocabulary keeps the embedded models cheap


def test_arith_numbers_stay_in_range_and_mix_one_and_two_steps():
    examples = synthetic.make_arith(2000, seed=1)
    numbers = [int(t) for e in examples for t in (e.prompt + " " + e.solution).split() if t.isdigit()]
    assert 0 <= min(numbers) and max(numbers) <= synthetic.MAX_NUMBER
    one_step = sum(e.solution.count(" = ") == 1 for e in examples) / len(examples)
    assert 0.3 < one_step < 0.5
    assert {"+", "-", "*"} <= {t for e in examples for t in e.solution.split()}
    assert all(len(e.solution.split(" = ")) <= 3 for e in examples)


def test_arith_gold_solutions_score_one_and_steps_are_correct():
    reward = NumericReward()
    for example in synthetic.make_arith(1000, seed=2):
        assert reward(example.solution, example.answer) == 1.0
        for step in example.solution.split(" . ")[:-1]:  # "5 + 3 = 8"
            a, op, b, _, result = step.split()
            assert {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}[op] == int(result)


def test_arith_mc_options_hold_the_answer_exactly_once_at_its_letter():
    reward, numeric = ChoiceReward(), NumericReward()
    for example in synthetic.make_arith_mc(1000, seed=5):
        assert reward(example.solution, example.answer) == 1.0
        options = example.prompt.split(" Options : ")[1].split()
        assert options[0::3] == ["A", "B", "C", "D", "E"] and set(options[1::3]) == {")"}
        values = [int(v) for v in options[2::3]]
        assert len(set(values)) == 5 and min(values) >= 0
        value = example.solution.split(" . ")[-2].split()[-1]  # the last step's result
        assert values.count(int(value)) == 1
        assert values["ABCDE".index(example.answer)] == int(value)
        # the solution scans the options in order up to the answer: "... = 6 . A 9 B 4 C 6 #### C"
        scan = example.solution.split(" . ")[-1].split(" #### ")[0].split()
        k = "ABCDE".index(example.answer)
        assert scan[0::2] == list("ABCDE"[: k + 1]) and [int(v) for v in scan[1::2]] == values[: k + 1]
        assert numeric(example.solution.replace(f"#### {example.answer}", f"#### {value}"), value) == 1.0


@pytest.mark.parametrize("loader", [sources.arith, sources.arith_mc])
def test_synthetic_loader_sizes_and_disjoint_splits(loader):
    # max_operand=6 makes the arith problem space small, so some train draws hit test prompts and are skipped
    splits = loader(train_size=3000, test_size=300, seed=0, max_operand=6)
    assert (len(splits.train), len(splits.test)) == (3000, 300)
    assert not {e.prompt for e in splits.train} & {e.prompt for e in splits.test}
    assert splits == loader(train_size=3000, test_size=300, seed=0, max_operand=6)


# --- real data loaders -------------------------------------------------------------------------


def test_gsm8k_local_copy(shared_data):
    splits = sources.gsm8k(path=str(shared_data / "gsm8k"))
    assert (len(splits.train), len(splits.test)) == (7473, 1319)
    first = splits.test[0]
    assert first.answer == "18" and first.solution.endswith("#### 18") and "<<" not in first.solution
    assert first.prompt.startswith("Janet")
    assert all("<<" not in e.solution for e in splits.train)
    kept = sources.gsm8k(path=str(shared_data / "gsm8k"), strip_calculator=False, test_size=5, train_size=7)
    assert "<<16-3-4=9>>" in kept.test[0].solution
    assert (len(kept.train), len(kept.test)) == (7, 5)
    assert [e.prompt for e in kept.test] == [e.prompt for e in splits.test[:5]]
    assert any(e.answer == "1600" for e in splits.train)  # "#### 1,600" is normalised


def test_mathinstruct_from_aqua_directory_uses_dev_as_train(shared_data):
    splits = sources.mathinstruct(path=str(shared_data / "aqua"))
    assert (len(splits.train), len(splits.test)) == (254, 254)
    example = splits.train[0]
    assert example.prompt.endswith("Answer Choices: (A) 32400 (B) 6000 (C) 600 (D) 60000 (E) 10")
    assert example.solution.endswith("Correct answer - A #### A") and example.answer == "A"


def test_mathinstruct_from_a_single_aqua_file_is_hash_split(shared_data):
    first = sources.mathinstruct(path=str(shared_data / "aqua" / "test.json"), test_fraction=0.2)
    again = sources.mathinstruct(path=str(shared_data / "aqua" / "test.json"), test_fraction=0.2)
    assert first == again and len(first.train) + len(first.test) == 254
    assert 20 < len(first.test) < 80


def test_mathinstruct_format_keeps_multiple_choice_cot_rows(tmp_path):
    choices = "Answer Choices: (A) 1 (B) 2"
    rows = [
        {"source": "data/CoT/aqua_rat.json", "instruction": f"Q1? {choices}", "output": "so 2. The answer is (B)."},
        {"source": "data/CoT/aqua_rat.json", "instruction": f"Q2? {choices}", "output": "x #### A"},
        {"source": "data/PoT/mathqa.json", "instruction": f"Q3? {choices}", "output": "print(1)"},
        {"source": "data/CoT/gsm_rft.json", "instruction": "Q4 with no choices", "output": "The answer is 7"},
        {"source": "data/CoT/aqua_rat.json", "instruction": f"Q5? {choices}", "output": "no letter"},
    ]
    (tmp_path / "mathinstruct.json").write_text(json.dumps(rows))  # a JSON array, as on the hub
    # with seed 1 the two kept rows fall one in each split (both must be non-empty)
    splits = sources.mathinstruct(path=str(tmp_path / "mathinstruct.json"), test_fraction=0.5, seed=1)
    kept = sorted(splits.train + splits.test, key=lambda e: e.prompt)
    assert [(e.prompt[:2], e.answer) for e in kept] == [("Q1", "B"), ("Q2", "A")]
    assert kept[0].solution == "so 2. The answer is (B). #### B"
    assert kept[1].solution == "x #### A"


def test_jsonl_loader(tmp_path):
    rows = [{"q": f"what is {i} + 1 ?", "a": i + 1, "why": f"{i} + 1 = {i + 1}"} for i in range(200)]
    (tmp_path / "data.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    splits = sources.jsonl(path=str(tmp_path / "data.jsonl"), prompt_field="q", answer_field="a", test_fraction=0.25)
    assert len(splits.train) + len(splits.test) == 200 and 25 < len(splits.test) < 75
    example = splits.train[0]
    assert example.solution == f"#### {example.answer}"
    with_solution = sources.jsonl(
        path=str(tmp_path / "data.jsonl"), prompt_field="q", answer_field="a", solution_field="why",
        test_path=str(tmp_path / "data.jsonl"),
    )
    assert with_solution.test[3] == Example("what is 3 + 1 ?", "3 + 1 = 4 #### 4", "4")
    assert NumericReward()(with_solution.test[3].solution, with_solution.test[3].answer) == 1.0



def test_a_byte_order_mark_and_crlf_load_in_every_file_reader(tmp_path):
    """Excel and Notepad save UTF-8 with a byte-order mark (and CRLF line ends); json and jsonl both load."""
    bom = "\ufeff".encode()
    rows = [{"prompt": f"what is {i} + 1 ?", "answer": i + 1} for i in range(40)]
    (tmp_path / "excel.jsonl").write_bytes(bom + "\r\n".join(json.dumps(r) for r in rows).encode() + b"\r\n")
    splits = sources.jsonl(path=str(tmp_path / "excel.jsonl"), test_path=str(tmp_path / "excel.jsonl"))
    assert splits.test[0] == Example("what is 0 + 1 ?", "#### 1", "1") and len(splits.test) == 40
    aqua = [{"question": f"Q{i}?", "options": ["A)1", "B)2"], "rationale": "so", "correct": "B"} for i in range(20)]
    (tmp_path / "aqua.json").write_bytes(bom + json.dumps(aqua).encode())  # a JSON array
    assert len(sources.mathinstruct(path=str(tmp_path / "aqua.json"), test_fraction=0.5).train) > 0
    for split in ("train", "test"):
        (tmp_path / f"{split}.jsonl").write_bytes(bom + b'{"question": "q", "answer": "x #### 1"}\r\n')
    assert sources.gsm8k(path=str(tmp_path)).test == [Example("q", "x #### 1", "1")]

# --- errors ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "load",
    [
        lambda p: sources.gsm8k(path=p),
        lambda p: sources.mathinstruct(path=p),
        lambda p: sources.jsonl(path=p),
    ],
)
def test_missing_path_names_it_and_the_fix(tmp_path, load):
    missing = str(tmp_path / "nowhere")
    with pytest.raises(DataError, match="nowhere.*does not exist.*dataset.path"):
        load(missing)


def test_missing_field_names_file_line_and_field(tmp_path):
    file = tmp_path / "rows.jsonl"
    file.write_text('{"prompt": "a", "answer": "1"}\n{"prompt": "b", "label": "2"}\n')
    with pytest.raises(DataError) as err:
        sources.jsonl(path=str(file))
    message = str(err.value)
    assert "rows.jsonl:2" in message and "'answer'" in message and "label" in message
    assert "\n" not in message


def test_gsm8k_missing_field_and_missing_split(tmp_path):
    (tmp_path / "train.jsonl").write_text('{"question": "q", "solution": "#### 1"}\n')
    (tmp_path / "test.jsonl").write_text('{"question": "q", "answer": "#### 1"}\n')
    with pytest.raises(DataError, match=r"train.jsonl:1: missing field 'answer'"):
        sources.gsm8k(path=str(tmp_path))
    (tmp_path / "train.jsonl").unlink()
    with pytest.raises(DataError, match="train.jsonl does not exist"):
        sources.gsm8k(path=str(tmp_path))


def test_empty_dataset_is_an_error(tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(DataError, match="empty"):
        sources.jsonl(path=str(tmp_path / "empty.jsonl"))


def test_unknown_multiple_choice_format_is_an_error(tmp_path):
    (tmp_path / "rows.jsonl").write_text('{"prompt": "a", "answer": "B"}\n')
    with pytest.raises(DataError, match="neither MathInstruct"):
        sources.mathinstruct(path=str(tmp_path / "rows.jsonl"))


@pytest.mark.parametrize("loader", [sources.gsm8k, sources.mathinstruct])
def test_hub_id_fails_fast_and_says_how_to_use_a_local_copy(loader):
    # Offline the hub is unreachable; online this id does not exist. Either way: a quick, clear DataError.
    start = time.monotonic()
    with pytest.raises(DataError, match="dataset.path") as err:
        loader(hub_id="grpokd-tests/no-such-dataset")
    assert time.monotonic() - start < 10
    assert "grpokd-tests/no-such-dataset" in str(err.value)


def test_splits_is_a_frozen_bundle():
    splits = Splits(train=[], test=[])
    with pytest.raises(AttributeError):
        splits.train = []  # type: ignore[misc]


# --- the data module's splits ------------------------------------------------------------------


def test_training_never_sees_a_val_or_test_prompt():
    """arith's generator repeats prompts: without `held_out`, 33 of the 200 val prompts were also trained on."""
    from grpokd.data.datamodule import TaskData

    splits = sources.arith(seed=0)
    data = TaskData(splits, prompts_per_step=16, val_size=200, test_size=500)
    trained = {ex.prompt for ex in data.train_set}
    assert len(data.val_set) == 200 and len(data.test_set) == 500
    assert not trained & {ex.prompt for ex in data.val_set}
    assert not trained & {ex.prompt for ex in data.test_set}
    raw_train = {ex.prompt for ex in splits.train[:-200]}
    assert sum(ex.prompt in raw_train for ex in data.val_set) > 10  # the duplicates this guards against exist
    assert len(data.train_set) > 19000


def test_held_out_keeps_order_and_drops_only_evaluated_prompts():
    from grpokd.data.datamodule import held_out

    ex = [Example(p, "s", "1") for p in ["a", "b", "c", "a", "d", "e"]]
    train, val = held_out(ex, 2, [Example("b", "s", "1")])
    assert [e.prompt for e in val] == ["d", "e"]
    assert [e.prompt for e in train] == ["a", "c", "a"]


def test_too_few_train_prompts_after_holding_out_is_a_config_error():
    from grpokd.data.datamodule import TaskData

    same = [Example("q", "s", "1")] * 30
    with pytest.raises(ConfigError, match="differ from the val and test prompts"):
        TaskData(Splits(train=same, test=[Example("q", "s", "1")]), prompts_per_step=4, val_size=5)


# --- tokenizer coverage (grpokd.models.coverage) ---------------------------------------------------------------------


def test_coverage_counts_unknown_tokens_and_unwritable_solutions_by_hand():
    from grpokd.models import coverage
    from grpokd.models.tokenizer import build_tokenizer

    tokenizer = build_tokenizer("llama")
    examples = [Example("5 + 3 banana", "#### 8", "8"), Example("1 + 1", "#### 1,234", "1,234")]
    # tokens: "5 + 3 banana" (banana unknown), "1 + 1", "#### 8", "#### 1,234" (1,234 unknown): 2 of 4 + 3 + 2 + 2
    got = coverage.measure(tokenizer, examples, NumericReward())
    assert got == coverage.Coverage(unk_share=2 / 11, unwritable=1, examples=2)
    with pytest.raises(ConfigError, match=r"dataset toy: the tokenizer of model.student=m does not cover it \(18% of tokens unknown, 1 of 2"):
        coverage.check(got, "toy", "m")


def test_the_embedded_tokenizer_covers_its_tasks_and_not_gsm8k(shared_data):
    from grpokd.models import coverage
    from grpokd.models.tokenizer import build_tokenizer

    tokenizer = build_tokenizer("llama")
    arith = sources.arith(train_size=500, test_size=100)
    assert coverage.measure(tokenizer, arith.train + arith.test, NumericReward()) == coverage.Coverage(0.0, 0, 600)
    gsm8k = sources.gsm8k(path=str(shared_data / "gsm8k"), train_size=500, test_size=100)
    measured = coverage.measure(tokenizer, gsm8k.train + gsm8k.test, NumericReward())
    assert measured.unk_share > 0.5 and measured.unwritable > 0.02 * 600
    with pytest.raises(ConfigError, match="dataset gsm8k"):
        coverage.check(measured, "gsm8k", "tiny-llama-student")
