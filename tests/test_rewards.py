"""Answer extraction and 0/1 rewards: hand-written cases and every gold solution of the real datasets."""

from __future__ import annotations

import json

import pytest

from grpokd.data.rewards import ChoiceReward, NumericReward, extract_choice, extract_number, numbers_equal
from grpokd.data.sources import mathinstruct


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("so she pays 18 dollars.\n#### 18", "18"),
        ("#### 1,234", "1234"),
        ("#### $1,234,567", "1234567"),
        ("#### $5.", "5"),  # trailing period is punctuation
        ("#### 3.50", "3.5"),  # trailing decimal zeros dropped
        ("#### 7.0", "7"),
        ("#### -3", "-3"),
        ("#### -0", "0"),
        ("#### .5", "0.5"),
        ("#### 50%", "50"),
        ("#### 12 apples", "12"),
        ("first #### 3 then #### 4", "4"),  # the last marker wins
        ("#### ", None),  # a marker without a number is no answer, even with numbers before it
        ("5 + 3 = 8 #### no idea", None),
        ("5 + 3 = 8 . 8 - 2 = 6 .", "6"),  # fallback: last number
        ("10-3=7", "7"),
        ("it is 10-3", "3"),  # a binary minus does not make the number negative
        ("the value is -4", "-4"),
        ("totals: 1,234, then 56", "56"),
        ("no numbers here", None),
    ],
)
def test_extract_number(text, expected):
    assert extract_number(text) == expected


def test_extract_number_without_fallback_needs_the_marker():
    assert extract_number("5 + 3 = 8", fallback_last_number=False) is None
    assert extract_number("5 + 3 = 8 #### 8", fallback_last_number=False) == "8"


def test_numbers_equal_is_numeric_with_tolerance():
    assert numbers_equal("7", "7.0")
    assert numbers_equal("1,600", "1600")
    assert numbers_equal("0.1", "0.1000000001")
    assert not numbers_equal("7", "7.01")
    assert not numbers_equal("7", "seven")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("5 + 3 = 8 . #### B", "B"),
        ("#### (C)", "C"),
        ("#### D)", "D"),
        ("The answer is (B).", "B"),
        ("So the answer is E", "E"),
        ("x = 3\nAnswer: D", "D"),
        ("Answer : A", "A"),
        ("Correct answer - C", "C"),
        ("The answer is (B). Wait, the answer is (C).", "C"),  # the last answer phrase wins
        ("A car travels 60 km . so it is D", "D"),  # fallback: last standalone capital A-E
        ("The correct option is C.", "C"),
        ("#### b", None),  # letters are case-sensitive
        ("#### F", None),
        ("Apples and Bananas", None),  # letters inside words do not count
        ("no choice", None),
    ],
)
def test_extract_choice(text, expected):
    assert extract_choice(text) == expected


def test_reward_classes():
    numeric, choice = NumericReward(), ChoiceReward()
    assert numeric("2 + 2 = 4 . #### 4", "4") == 1.0
    assert numeric("2 + 2 = 4 . #### 5", "4") == 0.0
    assert numeric("no answer", "4") == 0.0
    assert numeric("the result is 4", "4") == 1.0
    assert NumericReward(fallback_last_number=False)("the result is 4", "4") == 0.0
    assert numeric.extract("#### 1,000") == "1000"
    assert choice("#### B", "B") == 1.0
    assert choice("#### B", "C") == 0.0
    assert choice.extract("the answer is (E)") == "E"


def _gsm8k_gold(solution: str) -> str:
    """The gold answer read independently of the extractor: the text after '####' without commas."""
    return solution.split("####")[-1].strip().replace(",", "")


@pytest.mark.parametrize("split", ["train", "test"])
def test_every_gsm8k_gold_solution_scores_one(shared_data, split):
    reward = NumericReward()
    rows = [json.loads(line) for line in (shared_data / "gsm8k" / f"{split}.jsonl").read_text().splitlines()]
    assert len(rows) > 1000
    for row in rows:
        gold = _gsm8k_gold(row["answer"])
        assert reward(row["answer"], gold) == 1.0, row["answer"]
        head, _, _ = row["answer"].rpartition("####")
        corrupted = f"{head}#### {int(gold) + 1}"
        assert reward(corrupted, gold) == 0.0, corrupted


def test_every_aqua_gold_rationale_scores_one(shared_data):
    splits = mathinstruct(path=str(shared_data / "aqua"))
    reward = ChoiceReward()
    for example in splits.train + splits.test:
        assert reward(example.solution, example.answer) == 1.0, example.solution
        wrong = next(letter for letter in "ABCDE" if letter != example.answer)
        assert reward(example.solution.rpartition("####")[0] + f"#### {wrong}", example.answer) == 0.0


# --- the training reward: weighted functions -----------------------------------------------------


def test_format_reward_needs_a_parseable_answer_line_not_a_correct_one():
    from grpokd.data.rewards import FormatReward

    fmt = FormatReward()
    assert fmt("5 + 3 = 8 . #### 8", "6") == 1.0
    assert fmt("... #### C", "A") == 1.0
    assert fmt("5 + 3 = 8 .", "8") == 0.0  # no answer line
    assert fmt("5 + 3 = 8 . ####", "8") == 0.0  # nothing parseable after it


def test_weighted_rewards_sum_by_weight_and_keep_each_part():
    from grpokd.data.rewards import FormatReward, NumericReward, WeightedRewards

    rewards = WeightedRewards({"correct": NumericReward(False), "format": FormatReward()}, {"correct": 1.0, "format": 0.25})
    texts, answers = ["#### 8", "#### 7", "8"], ["8", "8", "8"]
    parts = rewards.parts(texts, answers)
    assert parts == {"correct": [1.0, 0.0, 0.0], "format": [1.0, 1.0, 0.0]}
    assert rewards.total(parts) == [1.25, 0.25, 0.0]
    assert WeightedRewards({"correct": NumericReward(), "format": FormatReward()}).weights == {"correct": 1.0, "format": 0.0}
    with pytest.raises(ValueError, match="reward.weights names lenght"):
        WeightedRewards({"correct": NumericReward()}, {"lenght": 1.0})


def test_truncated_completions_are_masked_out_entirely_and_parts_are_logged():
    import torch

    from grpokd import rollout as ro
    from grpokd.models.scoring import Tokens

    mask = torch.ones(4, 3, dtype=torch.long)
    r = ro.Rollout(
        Tokens(torch.ones(2, 2, dtype=torch.long), torch.ones(2, 2, dtype=torch.long)), Tokens(torch.ones(4, 3, dtype=torch.long), mask),
        ["a"] * 4, ["1"] * 4, torch.tensor([1.0, 0.0, 1.0, 0.0]), 2, torch.tensor([False, True, False, False]),
        {"correct": torch.tensor([1.0, 0.0, 1.0, 0.0]), "format": torch.tensor([1.0, 0.0, 1.0, 1.0])},
    )
    masked = ro.mask_truncated(r)
    assert masked.completions.mask.sum(-1).tolist() == [3, 0, 3, 3]
    metrics = ro.rollout_metrics(r)
    assert float(metrics["rewards/format/mean"]) == 0.75 and float(metrics["rewards/correct/mean"]) == 0.5
    part = ro.select(r, 1, 2)
    assert part.texts == ["a", "a"] and part.reward_parts["format"].tolist() == [1.0, 1.0]


# --- the arithmetic step reward -------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        ("5 + 3 = 8 . 8 - 2 = 6 . #### 6", 1.0),
        ("5 + 3 = 9 . 9 - 2 = 7 . #### 7", 0.5),  # a wrong fact, then a right step on the wrong value
        ("6 * 3 = 21 . #### 21", 0.0),
        ("#### 6", 0.0),  # no steps
        ("2 + 3 * 4 = 14 . 12 / 4 / 3 = 1 . 10 - 2 - 3 = 5", 1.0),  # precedence, left to right
        ("4 x 15 = 60 and 100 / 2 = $<<100/2=50>>50", 1.0),  # x, "$", GSM8K's calculator annotation
        ("<<100-50-30-15=5>>5", 1.0),  # a chain is one step, never its tail "30-15=5"
        ("5 / 0 = 1", 0.0),
        ("8 x 1 1/2 = 12 . 1/2 * 1/2 = 1/4 . 2 + 2 = 5", 0.0),  # mixed numbers and fractions are not integer steps
        ("5 + 3 = 8 . #### 9 = 4 + 4", 1.0),  # only the work before the answer marker
    ],
)
def test_step_accuracy(text, expected):
    from grpokd.data.rewards import StepsReward, step_accuracy

    assert step_accuracy(text) == expected
    assert StepsReward()(text, "unused") == expected


def test_gsm8k_gold_steps_hold(shared_data):
    """The GSM8K reference solutions' integer steps hold (the few that do not are the dataset's own slips, e.g. 192*100=1920)."""
    from grpokd.data.rewards import step_accuracy, worked_steps

    rows = [json.loads(line) for line in (shared_data / "gsm8k" / "train.jsonl").read_text().splitlines()]
    assert worked_steps("5 + 3 = 8 . 8 - 2 = 6 . #### 6") == [("5 + 3", "8"), ("8 - 2", "6")]
    scored = [step_accuracy(row["answer"]) for row in rows if worked_steps(row["answer"])]
    assert len(scored) > 7000
    assert sum(score == 1.0 for score in scored) / len(scored) > 0.98
