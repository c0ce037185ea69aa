"""Answer extraction and 0/1 rewards: hand-written cases and every gold solution of the real datasets."""

from __future__ import annotations

import json

import pytest

from grpokd.data.rewards import (
    ChoiceReward,
    FormatReward,
    NumericReward,
    Parsed,
    answer_style,
    boxed_contents,
    extract_choice,
    extract_number,
    numbers_equal,
    parse_choice,
    parse_number,
)
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


# --- answers as instruct models write them: styles and their priority ------------------------------

# Hand-written in the manner of SmolLM2-Instruct and Qwen2.5(-Math)-Instruct on GSM8K-style questions.
MARKER_SOLUTION = """The farm has 3 fields of 400 trees and one of 34 trees.
The large fields hold 3 * 400 = 1,200 trees.
In total there are 1,200 + 34 = 1,234 trees.
#### 1,234"""
ANSWER_IS_DOLLARS = """Janet's ducks lay 16 eggs per day. She eats 3 and bakes with 4, so she uses 3 + 4 = 7 eggs.
That leaves 16 - 7 = 9 eggs, and at $2 each she makes 9 * 2 = $18.

The answer is $18."""
BOXED_LATEX = r"""To find the number of pages, we multiply the pages per day by the number of days:
\[
6 \times 7 = 42
\]
Therefore, the final answer is $\boxed{42}$."""
BOLD_ANSWER_UNIT = """She walks 2.5 km to school and back each day, so over 3 days:

2.5 * 3 = 7.5

**Answer:** 7.5 km"""
MARKER_WITHOUT_NUMBER = """Each box holds 12 apples and there are 4 boxes, so 4 * 12 = 48 apples.
####"""
BOXED_TWICE = r"""First I get $\boxed{12}$ for the red marbles.
Wait, I forgot the 3 blue ones: 12 + 3 = 15. So the answer is $\boxed{15}$."""
ANSWER_IS_TWICE = """At first glance the answer is 12.
But the shop closes on Sunday, so she works 6 days, not 4, at $3 a day: 6 * 3 = 18.
So the answer is 18 dollars."""
FULL_STOP = "He had 10 cookies and ate 3, so he has 10 - 3 = 7 left.\nSo he has 7."
NEGATIVE_ANSWER_IS = "The temperature goes from 5 degrees down by 8: 5 - 8 = -3.\nThe answer is -3."
NEGATIVE_BOXED = r"The change in elevation is $120 - 123 = -3$ metres, so the answer is \(\boxed{-3}\)."


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (MARKER_SOLUTION, Parsed("1234", "marker")),
        (ANSWER_IS_DOLLARS, Parsed("18", "answer_is")),
        (BOXED_LATEX, Parsed("42", "boxed")),
        (BOLD_ANSWER_UNIT, Parsed("7.5", "answer_is")),
        (MARKER_WITHOUT_NUMBER, Parsed(None, "marker")),  # the marker commits: the 48 before it is not the answer
        (BOXED_TWICE, Parsed("15", "boxed")),  # the last box wins
        (ANSWER_IS_TWICE, Parsed("18", "answer_is")),  # the last phrase wins
        (FULL_STOP, Parsed("7", "last")),  # "7." ends the sentence: no decimal point
        (NEGATIVE_ANSWER_IS, Parsed("-3", "answer_is")),
        (NEGATIVE_BOXED, Parsed("-3", "boxed")),
        ("the final answer is: $1,200.", Parsed("1200", "answer_is")),
        ("Answer: 42", Parsed("42", "answer_is")),
        ("x = 3\nANSWER: -4", Parsed("-4", "answer_is")),  # case-insensitive; the sign after the colon is a sign
        ("so the answer is 18 dollars.", Parsed("18", "answer_is")),
        ("The answer is: **$1,200**.", Parsed("1200", "answer_is")),  # Markdown and "$" between phrase and number
        (r"Thus, the answer is \(25\%\).", Parsed("25", "answer_is")),
        ("The answer is 12. Checking that the answer is right: 12 * 2 = 24.", Parsed("12", "answer_is")),  # a phrase without a number is no answer
        ("Answer: add 2 and 3 to get 5", Parsed("5", "last")),
        (r"$\boxed{1,234}$", Parsed("1234", "boxed")),
        (r"$\boxed{1{,}234}$", Parsed("1234", "boxed")),  # LaTeX's thousands separator
        (r"\boxed{18 \text{ dollars}}", Parsed("18", "boxed")),  # nested braces
        (r"\boxed{\$18.50}", Parsed("18.5", "boxed")),
        (r"\boxed{x = 12 \text{ km}}", Parsed("12", "boxed")),
        (r"\boxed{-3}", Parsed("-3", "boxed")),
        (r"\boxed{\frac{1}{2}}", Parsed("0.5", "boxed")),  # a fraction is its quotient
        (r"\boxed{-\dfrac{3}{4}}", Parsed("-0.75", "boxed")),
        (r"The answer is $\frac{3}{2}$.", Parsed("1.5", "answer_is")),
        (r"\boxed{\text{seven}} The answer is 7.", Parsed("7", "answer_is")),  # a box without a number does not commit
        (r"5 + 2 = 7, so \boxed{7", Parsed("7", "last")),  # an unclosed box (truncated) is no box
        ("it is 10-3", Parsed("3", "last")),  # a binary minus is no sign
        ("", Parsed(None, None)),
        ("no digits at all", Parsed(None, None)),
        ("####", Parsed(None, "marker")),
    ],
)
def test_parse_number_reads_each_style(text, expected):
    assert parse_number(text) == expected
    assert extract_number(text) == expected.value
    assert NumericReward().parse(text) == expected


def test_parse_number_priority_marker_then_boxed_then_answer_is_then_last():
    text = "I tried 2 first.\nThe answer is 3.\n$\\boxed{4}$\n#### 5"
    assert parse_number(text) == Parsed("5", "marker")
    without_marker = text.rpartition("\n####")[0]
    assert parse_number(without_marker) == Parsed("4", "boxed")
    without_box = without_marker.rpartition("\n$\\boxed")[0]
    assert parse_number(without_box) == Parsed("3", "answer_is")
    assert parse_number("I tried 2 first.\nThe total is 3.") == Parsed("3", "last")
    # the order holds wherever each style stands in the text
    assert parse_number("#### 5\n$\\boxed{4}$ The answer is 3.") == Parsed("5", "marker")
    assert parse_number("$\\boxed{4}$ The answer is 3. Then 2") == Parsed("4", "boxed")


def test_without_the_fallback_only_a_stated_answer_counts():
    assert parse_number("so she has 5 apples", fallback_last_number=False) == Parsed(None, None)
    assert parse_number("", fallback_last_number=False) == Parsed(None, None)
    assert parse_number(BOXED_LATEX, fallback_last_number=False) == Parsed("42", "boxed")
    assert parse_number(ANSWER_IS_DOLLARS, fallback_last_number=False) == Parsed("18", "answer_is")
    assert NumericReward(fallback_last_number=False)(BOXED_LATEX, "42") == 1.0


def test_boxed_contents_match_braces_in_order():
    assert boxed_contents(r"\boxed{1} and \boxed{\frac{1}{2}} and \fbox{B} and \boxed{open") == ["1", r"\frac{1}{2}", "B"]
    assert boxed_contents("no box") == []


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("The speed is 60 km/hr, so the time is 120 / 60 = 2 hours.\nThe answer is (B).", Parsed("B", "answer_is")),
        ("Let the number be x. Then 3x = 63, so x = 21.\n**Answer:** (D) 21", Parsed("D", "answer_is")),
        (r"So the correct option is $\boxed{C}$.", Parsed("C", "boxed")),
        (r"Therefore, the answer is \(\boxed{(E)}\).", Parsed("E", "boxed")),
        (r"First $\boxed{A}$, but rechecking: $\boxed{B}$", Parsed("B", "boxed")),  # the last box wins
        (r"$\boxed{21}$, which is option (B). The answer is B.", Parsed("B", "answer_is")),  # a box without a letter does not commit
        ("The answer is (A). Hmm, no: the answer is (C).", Parsed("C", "answer_is")),
        ("x = 21 . #### D", Parsed("D", "marker")),
        ("x = 21 .\n####", Parsed(None, "marker")),
        ("A train covers 60 km, which is option D", Parsed("D", "last")),
        ("", Parsed(None, None)),
        ("no choice here", Parsed(None, None)),
    ],
)
def test_parse_choice_reads_each_style(text, expected):
    assert parse_choice(text) == expected
    assert extract_choice(text) == expected.value
    assert ChoiceReward().parse(text) == expected


def test_parse_choice_priority_marker_then_boxed_then_answer_is_then_last():
    assert parse_choice("Option A fails. The answer is (B). $\\boxed{C}$ #### D") == Parsed("D", "marker")
    assert parse_choice("Option A fails. The answer is (B). $\\boxed{C}$") == Parsed("C", "boxed")
    assert parse_choice("Option A fails. The answer is (B).") == Parsed("B", "answer_is")
    assert parse_choice("Option A fails.") == Parsed("A", "last")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (MARKER_SOLUTION, "marker"),
        ("x = 21 . #### D", "marker"),
        (BOXED_LATEX, "boxed"),
        (r"So the correct option is $\boxed{C}$.", "boxed"),
        (ANSWER_IS_DOLLARS, "answer_is"),
        ("The answer is (B).", "answer_is"),
        (r"$\boxed{4}$ #### 5", "marker"),  # the highest-priority style
        (MARKER_WITHOUT_NUMBER, None),  # a marker with nothing parseable after it
        (r"$\boxed{12}$" + "\n####", None),  # ... commits even after a box
        ("so she has 5 apples", None),  # the last number is not a stated answer
        ("A train covers 60 km, which is option D", None),  # nor is the last letter
        ("", None),
    ],
)
def test_answer_style_names_the_style_of_a_stated_number_or_letter(text, expected):
    assert answer_style(text) == expected


def test_format_reward_accepts_the_configured_styles():
    marker, boxed, answer_is = "5 + 3 = 8 . #### 8", BOXED_LATEX, ANSWER_IS_DOLLARS
    assert [FormatReward()(t, "0") for t in (marker, boxed, answer_is)] == [1.0, 0.0, 0.0]  # the default: the marker only
    assert [FormatReward(["boxed"])(t, "0") for t in (marker, boxed, answer_is)] == [0.0, 1.0, 0.0]
    every = FormatReward(("marker", "boxed", "answer_is"))
    assert [every(t, "0") for t in (marker, boxed, answer_is, "so 8", MARKER_WITHOUT_NUMBER)] == [1.0, 1.0, 1.0, 0.0, 0.0]
    assert every(r"So the correct option is $\boxed{C}$.", "A") == 1.0  # letters too; correctness is not checked
    for wrong in (["last"], ["boxd"]):
        with pytest.raises(ValueError, match="choose from marker, boxed, answer_is"):
            FormatReward(wrong)


def test_format_reward_default_is_the_marker_rule():
    """The default is the former rule: a "####" and, after the last one, a number or a standalone letter A-E."""
    cases = {
        "#### 8": 1.0, "#### -3.5": 1.0, "#### $1,234": 1.0, "#### (B)": 1.0, "#### 12 apples": 1.0, r"#### \frac{1}{2}": 1.0,
        "#### 3 then ####": 0.0, "#### b": 0.0, "#### none": 0.0, "####": 0.0, "the answer is 8": 0.0, r"\boxed{8}": 0.0, "": 0.0,
    }
    assert {text: FormatReward()(text, "8") for text in cases} == cases


def test_format_reward_styles_from_a_hydra_list():
    from omegaconf import OmegaConf

    assert FormatReward(OmegaConf.create({"styles": ["marker", "boxed"]}).styles)(BOXED_LATEX, "42") == 1.0


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
    fmt = FormatReward()
    assert fmt("5 + 3 = 8 . #### 8", "6") == 1.0
    assert fmt("... #### C", "A") == 1.0
    assert fmt("5 + 3 = 8 .", "8") == 0.0  # no answer line
    assert fmt("5 + 3 = 8 . ####", "8") == 0.0  # nothing parseable after it


def test_weighted_rewards_sum_by_weight_and_keep_each_part():
    from grpokd.data.rewards import WeightedRewards

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
    from grpokd.models.lm import Tokens

    mask = torch.ones(4, 3, dtype=torch.long)
    r = ro.Rollout(
        Tokens(torch.ones(2, 2, dtype=torch.long), torch.ones(2, 2, dtype=torch.long)), Tokens(torch.ones(4, 3, dtype=torch.long), mask),
        ["so 3 + 4 = 7 . #### 7", "the answer is 7.", "$\\boxed{7}$ #### 7", "7"], ["7"] * 4, torch.tensor([1.0, 0.0, 1.0, 0.0]), 2,
        torch.tensor([False, True, False, False]),
        {"correct": torch.tensor([1.0, 0.0, 1.0, 0.0]), "format": torch.tensor([1.0, 0.0, 1.0, 1.0])},
    )
    masked = ro.mask_truncated(r)
    assert masked.completions.mask.sum(-1).tolist() == [3, 0, 3, 3]
    metrics = ro.rollout_metrics(r)
    assert float(metrics["rewards/format/mean"]) == 0.75 and float(metrics["rewards/correct/mean"]) == 0.5
    styles = {key: float(metrics[f"answer_style/{key}"]) for key in ("marker", "boxed", "answer_is", "none")}
    assert styles == {"marker": 0.5, "boxed": 0.0, "answer_is": 0.25, "none": 0.25}  # the marker after a box wins
    part = ro.select(r, 1, 2)
    assert part.texts == r.texts[2:] and part.reward_parts["format"].tolist() == [1.0, 1.0]


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
