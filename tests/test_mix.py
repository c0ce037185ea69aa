"""Training on a mixture of datasets (`dataset=mix`) and routing each example to its own teacher (`weighting=route`)."""

from __future__ import annotations

import json
import math
from collections import Counter

import pytest
import torch

from grpokd.data.example import Example
from grpokd.data.mix import Component, mix
from grpokd.data.prompts import PromptFormat
from grpokd.data.rewards import ChoiceReward, NumericReward
from grpokd.data.sources import Splits
from grpokd.errors import ConfigError
from grpokd.teachers import Route
from grpokd.teachers.sources import in_process


def examples(name: str, count: int, teacher: str | None = None) -> list[Example]:
    return [Example(f"{name} question {i}", f"#### {i}", str(i), name, teacher) for i in range(count)]


def component(name: str, train: int, test: int, weight: float = 1.0) -> Component:
    return Component(name, Splits(examples(name, train), examples(name, test)), NumericReward(), PromptFormat(), weight)


def test_the_train_split_holds_each_component_by_its_weight_and_the_test_split_alternates():
    splits = mix([component("a", 300, 5, weight=3.0), component("b", 100, 3, weight=1.0)], seed=0)
    counts = Counter(ex.component for ex in splits.train)
    assert counts == {"a": 300, "b": 100}  # 400 examples, 3:1
    equal = mix([component("a", 300, 5), component("b", 100, 3)], seed=0)
    counts = Counter(ex.component for ex in equal.train)
    assert counts == {"a": 200, "b": 200}  # b's 100 examples twice, a's 300 cut to 200
    assert Counter(ex.prompt for ex in equal.train if ex.component == "b") == {f"b question {i}": 2 for i in range(100)}
    assert [ex.component for ex in equal.test] == ["a", "b", "a", "b", "a", "b", "a", "a"]
    assert [ex.component for ex in equal.train[:20]] != ["a"] * 20  # shuffled, not one block per component
    assert mix([component("a", 300, 5), component("b", 100, 3)], seed=0).train == equal.train  # the seed fixes it


def test_one_component_is_its_own_splits_unchanged():
    only = component("a", 50, 5)
    assert mix([only], seed=3) == only.splits


@pytest.mark.parametrize(
    "weights,message",
    [
        ((0.0, 0.0), r"dataset.weights sum to 0.0: give at least one component a positive weight"),
        ((-1.0, 1.0), r"dataset.weights.a=-1.0 must be a number >= 0"),
        ((math.nan, 1.0), r"dataset.weights.a=nan must be a number >= 0"),
    ],
)
def test_bad_weights_are_refused(weights, message):
    with pytest.raises(ConfigError, match=message):
        mix([component("a", 10, 2, weights[0]), component("b", 10, 2, weights[1])])


def test_a_component_without_examples_is_refused():
    with pytest.raises(ConfigError, match="dataset.components.b has no train examples"):
        mix([component("a", 10, 2), component("b", 0, 2)])


def test_route_gives_each_row_its_teacher():
    route = Route({"arith": "t-arith", "arith_mc": "t-mc"})
    teachers = ["t-arith", "t-mc"]
    index = route.assign(teachers, ["arith", "arith_mc", "arith"], [None, None, "t-mc"])  # the row's own field wins
    assert index == [0, 1, 1]
    rows = torch.tensor(index)
    weights = torch.stack([route.log_weight(i, torch.zeros(3, 2, 0), route=rows) for i in range(2)]).softmax(0)  # [M, N, T]
    assert weights[:, :, 0].tolist() == [[1.0, 0.0, 0.0], [0.0, 1.0, 1.0]]


@pytest.mark.parametrize(
    "routes,data,message",
    [
        ({"arith": "t-arith", "gsm8k": "t-mc"}, examples("arith", 2), "weighting.routes.gsm8k: no such dataset component; the components are arith"),
        ({"arith": "t-nope"}, examples("arith", 2), "weighting.routes.arith=t-nope: no such teacher; the teachers are t-arith, t-mc"),
        ({}, examples("arith", 2), r"weighting=route: examples of arith name no teacher; set weighting.routes.arith=<teacher>"),
        ({}, examples("arith", 2, teacher="t-nope"), "an example of arith names teacher 't-nope' in its data; the teachers are t-arith, t-mc"),
    ],
)
def test_bad_routes_are_refused(routes, data, message):
    with pytest.raises(ConfigError, match=message):
        Route(routes).check_routes(["t-arith", "t-mc"], data)


def test_the_routed_mixture_is_each_rows_own_teacher():
    from grpokd.models import loading
    from grpokd.models.lm import completion_logits, tokenize_prompts, tokenize_targets
    from grpokd.teachers import TeacherEnsemble

    tokenizer = loading.load_tokenizer("tiny-llama-student", "model.student")
    names = ["tiny-llama-teacher-s", "tiny-llama-teacher-m"]
    teachers = [loading.load_model(name, "model.teachers") for name in names]
    prompts = tokenize_prompts(tokenizer, ["What is 6 times 7?", "Tom has 3 apples and buys 4 more. How many?"], 64)
    completions = tokenize_targets(tokenizer, ["6 * 7 = 42\n#### 42", "#### 41", "3 + 4 = 7\n#### 7", "#### 8"], 16)  # K = 2
    vocab = len(tokenizer)
    ensemble = TeacherEnsemble(in_process(teachers, names), Route({"x": names[0], "y": names[1]}))
    route = torch.tensor(ensemble.weighting.assign(names, ["x", "y"], [None, None]))  # prompt 0 -> teacher-s, prompt 1 -> teacher-m
    scores = ensemble.score(prompts, completions, torch.zeros(4, completions.ids.shape[1], vocab), vocab, forward=True, route=route)
    own = [completion_logits(t, prompts, completions, vocab).softmax(-1) for t in teachers]  # [N, T, V] each
    for row, teacher in ((0, 0), (1, 0), (2, 1), (3, 1)):
        torch.testing.assert_close(scores.mixture.pbar[row], own[teacher][row])
    assert scores.metrics["weight"].tolist() == pytest.approx([0.5, 0.5])


def test_a_mix_run_reports_each_component_and_routes_each_to_its_teacher(quick_cfg, tmp_path):
    from test_train import read_metrics, train_column

    from grpokd.train import train

    run = tmp_path / "mix"
    results = train(quick_cfg(
        "dataset=mix", "objective=j1", "weighting=route", "weighting.routes.arith=tiny-llama-teacher-s",
        "weighting.routes.arith_mc=tiny-llama-teacher-m", "log.csv=true", "data.prompts_per_step=8", run_dir=run,
    ))
    assert results["status"] == "complete"
    for split, tag in (("test", "accuracy_after"), ("test", "accuracy_before"), ("val", "accuracy")):
        for name in ("arith", "arith_mc"):
            assert 0 <= results[f"{split}/{name}/{tag}"] <= 1
    rows = read_metrics(run)
    assert len(train_column(rows, "train/arith/reward_mean")) + len(train_column(rows, "train/arith_mc/reward_mean")) >= 4
    predictions = [json.loads(line) for line in (run / "predictions.jsonl").read_text().splitlines()]
    assert Counter(p["component"] for p in predictions) == {"arith": 16, "arith_mc": 16}
    assert {p["parsed"] for p in predictions if p["component"] == "arith_mc"} <= {None, "A", "B", "C", "D", "E"}


def test_a_jsonl_teacher_field_routes_its_row_and_an_unknown_name_stops_at_start_up(tmp_path):
    from conftest import compose

    from grpokd.train import prepare

    rows = [{"prompt": f"What is {i} + 1?", "answer": str(i + 1), "teacher": "tiny-llama-teacher-s" if i % 2 else "tiny-llama-teacher-m"} for i in range(80)]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    base = ["dataset=jsonl", f"dataset.path={tmp_path / 'd.jsonl'}", "data.val_size=10", "weighting=route"]
    prep = prepare(compose(base, tmp_path / "ok"))
    assert {ex.teacher for ex in prep.data.train_set} == {"tiny-llama-teacher-s", "tiny-llama-teacher-m"}
    for row in rows[::7]:  # some of them in train (the test split is drawn by hash and is not routed)
        row["teacher"] = "no-such-teacher"
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ConfigError, match="names teacher 'no-such-teacher' in its data; the teachers are tiny-llama-teacher-s, tiny-llama-teacher-m"):
        prepare(compose(base, tmp_path / "bad"))


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["dataset=mix", "dataset.weights.arith=0", "dataset.weights.arith_mc=0"], "dataset.weights sum to 0"),
        (["dataset=mix", "+dataset.weights.gsm8k=1"], "dataset.weights.gsm8k: no such component; the components are arith, arith_mc"),
        (["dataset=mix", "dataset.components.arith.source.train_size=0"], "dataset.components.arith has no train examples"),
        (["dataset=mix", "weighting=route", "weighting.routes.arith=tiny-llama-teacher-s"], "examples of arith_mc name no teacher"),
        (["weighting=route", "weighting.routes.arith_mc=tiny-llama-teacher-s"], "weighting.routes.arith_mc: no such dataset component"),
        (["model.teacher_top_k=0"], "^model.teacher_top_k=0 must be >= 1$"),
    ],
)
def test_bad_mix_route_and_top_k_configs_stop_at_start_up(overrides, message, tmp_path):
    from conftest import compose

    from grpokd.train import prepare

    with pytest.raises(ConfigError, match=message):
        prepare(compose(overrides, tmp_path))


def test_the_mix_rewards_score_each_component_in_its_own_answer_kind(tmp_path):
    from conftest import compose

    from grpokd.data.rewards import WeightedRewards
    from grpokd.train import prepare

    prep = prepare(compose(["dataset=mix", "data.test_size=10"], tmp_path))
    assert prep.data.components == ["arith", "arith_mc"] or set(prep.data.components) == {"arith", "arith_mc"}
    parts = WeightedRewards.of(prep.reward).parts(["#### 7", "#### B"], ["7", "B"], ["arith", "arith_mc"])
    assert parts["correct"] == [1.0, 1.0]
    assert WeightedRewards.of(prep.reward).parts(["#### B"], ["B"], ["arith"])["correct"] == [0.0]  # a number was asked for
    assert isinstance(prep.reward.of("arith"), NumericReward) and isinstance(prep.reward.of("arith_mc"), ChoiceReward)
    assert [ex.component for ex in prep.data.test_set] == ["arith", "arith_mc"] * 5
