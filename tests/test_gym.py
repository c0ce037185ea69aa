"""reasoning-gym tasks (`grpokd.data.gym`, `dataset=reasoning_gym`): seeded splits that share no item, the task's
own checker behind the marker / lenient reading, errors at start-up, and the task named through a run."""

from __future__ import annotations

import json
import sys

import pytest

from grpokd.data import gym
from grpokd.data.datamodule import held_out
from grpokd.errors import ConfigError

SETTINGS = {"min_terms": 2, "max_terms": 3, "min_digits": 1, "max_digits": 2}


def test_train_val_and_test_share_no_item_and_are_the_same_on_every_call():
    splits = gym.splits("basic_arithmetic", SETTINGS, train_size=600, test_size=100, seed=3)
    assert len(splits.test) == 100 and 0 < len(splits.train) <= 600
    train, val = held_out(splits.train, 50, splits.test)
    prompts = [{ex.prompt for ex in part} for part in (train, val, splits.test)]
    assert not (prompts[0] & prompts[1]) and not (prompts[0] & prompts[2]) and not (prompts[1] & prompts[2])
    again = gym.splits("basic_arithmetic", SETTINGS, train_size=600, test_size=100, seed=3)
    assert again == splits
    other = gym.splits("basic_arithmetic", SETTINGS, train_size=600, test_size=100, seed=4)
    assert [ex.prompt for ex in other.test] != [ex.prompt for ex in splits.test]
    ex = splits.test[0]
    entry = json.loads(ex.answer)
    assert ex.solution == f"#### {entry['answer']}" and gym.gold_answer(ex.answer) == entry["answer"]
    assert entry["metadata"]["source_dataset"] == "basic_arithmetic"


def test_the_answer_after_the_marker_or_leniently_the_stated_or_last_number_goes_to_the_tasks_checker():
    gold = json.dumps({"answer": "1234", "metadata": {}})
    lenient, strict = gym.TaskReward("products"), gym.TaskReward("products", lenient=False)
    cases = [  # completion, lenient reward, strict reward, parsed (lenient), style
        ("3 x 4 = 12\n#### 1,234.", 1.0, 1.0, "1234", "marker"),
        ("#### **1234**\nDone.", 1.0, 1.0, "1234", "marker"),
        ("#### 34 * 36 = 1234", 1.0, 1.0, "1234", "marker"),  # Qwen2.5's way: the answer after the last "="
        ("#### <answer> 1234 </answer>", 1.0, 1.0, "1234", "marker"),
        ("#### 1235", 0.0, 0.0, "1235", "marker"),
        ("The answer is 1234.", 1.0, 0.0, "1234", "answer_is"),
        ("1234, then 7", 0.0, 0.0, "7", "last"),
        ("#### \n", 0.0, 0.0, None, "marker"),
        ("no number", 0.0, 0.0, None, None),
    ]
    for text, want_lenient, want_strict, parsed, style in cases:
        assert lenient(text, gold) == want_lenient and strict(text, gold) == want_strict, text
        assert (lenient.parse(text).value, lenient.parse(text).style) == (parsed, style), text
    assert strict.parse("The answer is 1234.").value is None


def test_partial_credit_passes_the_checkers_score_through():
    gold = json.dumps({"answer": "12", "metadata": {}})
    # basic_arithmetic's checker (reasoning-gym's default): len(gold) / len(answer) when the answer holds the gold
    assert gym.TaskReward("basic_arithmetic", partial_credit=True)("#### 12 apples", gold) == pytest.approx(2 / 9)
    assert gym.TaskReward("basic_arithmetic")("#### 12 apples", gold) == 0.0
    assert gym.TaskReward("basic_arithmetic")("#### 12", gold) == 1.0


def test_a_checker_that_reads_the_entrys_metadata_gets_it():
    """number_format grades against metadata["solution"], not the answer string: the JSON carries it."""
    (ex,) = gym.splits("number_format", None, train_size=5, test_size=1).test
    entry = json.loads(ex.answer)
    assert "solution" in entry["metadata"]
    assert gym.TaskReward("number_format")(f"#### {entry['answer']}", ex.answer) == 1.0


@pytest.mark.parametrize("task,config,message", [
    ("no_such_task", None, "dataset.task=no_such_task: Dataset 'no_such_task' not registered"),
    ("products", {"no_such_key": 1}, "dataset.task_config={'no_such_key': 1} for task products:"),
    ("products", {"min_terms": 5, "max_terms": 2}, "max_terms must be >= min_terms"),
])
def test_a_bad_task_or_setting_is_one_config_error(task, config, message):
    with pytest.raises(ConfigError, match=message.replace("{", r"\{").replace("}", r"\}").replace("(", r"\(")) as err:
        gym.splits(task, config, train_size=5, test_size=5)
    assert "\n" not in str(err.value)


def test_without_the_package_the_error_is_the_install_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "reasoning_gym", None)  # import reasoning_gym raises ImportError
    with pytest.raises(ConfigError, match=r'dataset=reasoning_gym needs the reasoning-gym package: pip install -e "\.\[reasoning\]"'):
        gym.splits("products")


def test_several_tasks_mix_and_each_is_named_and_graded_by_its_own_checker(tmp_path):
    from conftest import compose

    from grpokd.data.rewards import WeightedRewards
    from grpokd.train import prepare

    overrides = [
        "dataset=mix", "~dataset.components.arith", "~dataset.components.arith_mc", "~dataset.weights",
        "+dataset@dataset.components.products=reasoning_gym", "+dataset@dataset.components.chain_sum=reasoning_gym",
        "dataset.components.products.task=products", "dataset.components.chain_sum.task=chain_sum",
        "model=smollm2", "data.test_size=10", "data.val_size=10",
    ]
    prep = prepare(compose(overrides, tmp_path))
    assert set(prep.data.components) == {"products", "chain_sum"}
    assert {ex.component for ex in prep.data.test_set} == {"products", "chain_sum"}
    for ex in prep.data.test_set[:4]:
        right = WeightedRewards.of(prep.reward).parts([f"#### {gym.gold_answer(ex.answer)}"], [ex.answer], [ex.component])
        assert right["correct"] == [1.0]


def test_predictions_show_the_gold_answer_not_the_entry_behind_it():
    """An example's `answer` is the whole entry as JSON (some checkers read its metadata); its prediction row's
    gold is the answer the task's checker grades against."""
    import torch

    from grpokd.evaluation import Greedy, prediction_rows

    ex = gym.splits("chain_sum", SETTINGS, train_size=20, test_size=2).test[0]
    gold = gym.gold_answer(ex.answer)
    examples = {"prompt": [ex.prompt] * 2, "answer": [ex.answer] * 2, "component": ["chain_sum"] * 2}
    result = Greedy([f"#### {gold}", "#### -1"], torch.tensor([1.0, 0.0]), torch.tensor([True, True]))
    rows = prediction_rows(examples, result, gym.TaskReward("chain_sum", SETTINGS), [0, 1])
    assert [row["gold"] for row in rows] == [gold, gold] and ex.answer.startswith("{")
    assert [row["parsed"] for row in rows] == [gold, "-1"]


def test_mode_eval_scores_the_validation_split_when_asked(tmp_path):
    """mode=eval eval_split=val: val/accuracy with its interval and predictions_val.jsonl, no test key, no predictions.jsonl."""
    from conftest import compose

    from grpokd.train import train

    results = train(compose(["mode=eval", "eval_split=val", "data.val_size=6", "logger=none", "model.student=tiny-llama-teacher-m"], tmp_path))
    assert results["val/accuracy"] == pytest.approx(1.0) and results["val_size"] == 6 and len(results["val/accuracy_ci95"]) == 2
    assert not any(key.startswith("test/") for key in results)
    rows = [json.loads(line) for line in (tmp_path / "predictions_val.jsonl").read_text().splitlines()]
    assert len(rows) == 6 and not (tmp_path / "predictions.jsonl").exists()


@pytest.mark.slow
def test_smollm2_on_a_reasoning_gym_task_as_a_user_types_it(tmp_path):
    """The real student on products, the instruction in the system message: predictions name the task."""
    from conftest import compose

    from grpokd.train import train

    results = train(compose([
        "mode=eval", "eval_split=val", "model=smollm2", "dataset=reasoning_gym", "dataset.task=products", "dataset.instruction_in=system",
        "dataset.task_config={min_terms: 2, max_terms: 2, max_digits: 2}", "data.val_size=4", "dataset.sampling.max_new_tokens=32", "logger=none",
    ], tmp_path))
    assert results["dataset"] == "products" and 0.0 <= results["val/accuracy"] <= 1.0
    rows = [json.loads(line) for line in (tmp_path / "predictions_val.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and {row["component"] for row in rows} == {"products"}
    assert all(row["prompt"].startswith("<|im_start|>system\nSolve the problem step by step.") for row in rows)
    reward = gym.TaskReward("products")
    assert all(row["gold"].lstrip("-").isdigit() for row in rows)  # the answer itself, not the entry's JSON
    entry = lambda gold: json.dumps({"answer": gold, "metadata": {}})  # noqa: E731 (products' checker reads the answer alone)
    assert all(row["reward"] == reward(row["completion"], entry(row["gold"])) for row in rows)
