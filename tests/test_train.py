"""End-to-end runs of train(cfg) on the embedded tiny models (seconds each once the zoo is cached)."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from grpokd.train import train

pytestmark = pytest.mark.slow


def test_grpo_run_writes_a_complete_run_directory(quick_cfg, tmp_path):
    results = train(quick_cfg("objective=grpo"))
    run_dir = tmp_path / "run"
    saved = json.loads((run_dir / "results.json").read_text())
    assert saved == json.loads(json.dumps(results, default=str))
    for key in ("objective", "dataset", "model", "seed", "steps", "wall_time_s", "test/accuracy_before", "test/accuracy_after"):
        assert key in saved
    assert saved["steps"] == 4 and saved["objective"] == "grpo" and saved["status"] == "complete"
    assert (run_dir / "checkpoints" / "last.ckpt").exists()
    exported = AutoModelForCausalLM.from_pretrained(run_dir / "student")
    assert exported.num_parameters() > 0
    rows = [json.loads(line) for line in (run_dir / "samples.jsonl").read_text().splitlines()]
    assert rows and {"prompt", "completion", "reward", "adv"} <= set(rows[0])
    moved = run_dir.rename(tmp_path / "moved")  # a finished sweep kept elsewhere (docs/runs/)
    again = train(quick_cfg("objective=grpo", "skip_complete=true", run_dir=moved))
    assert again == {**saved, "run_dir": str(moved)}  # returned as it is, where it is now
    assert json.loads((moved / "results.json").read_text()) == saved  # and not run again


def test_resume_reaches_the_same_weights_as_an_uninterrupted_run(quick_cfg, tmp_path):
    straight = tmp_path / "straight"
    train(quick_cfg("eval_before=false", run_dir=straight))
    first = tmp_path / "first"
    train(quick_cfg("eval_before=false", "trainer.max_steps=2", run_dir=first))
    resumed = tmp_path / "resumed"
    results = train(quick_cfg("eval_before=false", f"ckpt_path={first / 'checkpoints' / 'last.ckpt'}", run_dir=resumed))
    assert results["steps"] == 4
    a = AutoModelForCausalLM.from_pretrained(straight / "student").state_dict()
    b = AutoModelForCausalLM.from_pretrained(resumed / "student").state_dict()
    assert all(torch.allclose(a[k], b[k]) for k in a)


def read_metrics(run_dir) -> list[dict[str, str]]:
    import csv

    with open(run_dir / "csv" / "metrics.csv") as f:
        return list(csv.DictReader(f))


def train_column(rows: list[dict[str, str]], key: str) -> list[float]:
    return [float(r[key]) for r in rows if r.get(key)]


def test_several_updates_per_rollout_clip_and_resume_exactly_mid_rollout(quick_cfg, tmp_path):
    """mu = 3: the first update of a rollout is on-policy (rho = 1, nothing clipped), the later ones are clipped;
    a run stopped after step 2 (mid-rollout) and resumed ends with the uninterrupted run's weights."""
    mu = ["objective=grpo", "updates_per_rollout=3", "optim.lr=1e-2", "eval_before=false", "log.csv=true", "trainer.max_steps=6",
          "reward.weights.steps=1.0"]  # a reward that varies within every group, so that every update moves the policy
    straight = tmp_path / "straight"
    train(quick_cfg(*mu, run_dir=straight))
    clip = train_column(read_metrics(straight), "train/clip_region")
    assert len(clip) == 6 and clip[0] == 0 and clip[3] == 0  # steps 0 and 3 sample a new rollout
    assert max(clip[1], clip[2]) > 0 and max(clip[4], clip[5]) > 0
    sampled = train_column(read_metrics(straight), "train/sample_time_s")
    assert sampled[0] > 0 and sampled[3] > 0 and sampled[1] == sampled[2] == sampled[4] == sampled[5] == 0  # only those steps sample
    first = tmp_path / "first"
    train(quick_cfg(*mu, "trainer.max_steps=2", run_dir=first))
    resumed = tmp_path / "resumed"
    train(quick_cfg(*mu, f"ckpt_path={first / 'checkpoints' / 'last.ckpt'}", run_dir=resumed))
    a = AutoModelForCausalLM.from_pretrained(straight / "student").state_dict()
    b = AutoModelForCausalLM.from_pretrained(resumed / "student").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_minibatches_and_a_format_reward_on_a_composed_objective(quick_cfg, tmp_path):
    """Two minibatches per rollout (2 prompts each), j3 plus an entropy bonus, weighted format and step rewards."""
    run = tmp_path / "composed"
    results = train(quick_cfg(
        "objective=j3", "rollout.minibatches=2", "+term@objective.terms.entropy=entropy_bonus", "reward.weights.format=0.5",
        "reward.weights.steps=0.25", "rollout.mask_truncated_completions=true", "eval_before=false", "log.csv=true", run_dir=run,
    ))
    assert results["status"] == "complete" and results["steps"] == 4
    rows = read_metrics(run)
    keys = ("train/rewards/correct/mean", "train/rewards/format/mean", "train/rewards/steps/mean", "train/reward_mean")
    correct, fmt, steps, total = (train_column(rows, k) for k in keys)
    assert len(total) == 4 and all(abs(t - (c + 0.5 * f + 0.25 * s)) < 1e-6 for c, f, s, t in zip(correct, fmt, steps, total))
    assert len(train_column(rows, "train/entropy_bonus")) == 4 and len(train_column(rows, "train/ta_mean")) == 4


def test_training_metrics_reach_the_loggers_every_n_steps_and_callbacks_that_monitor_them(quick_cfg, tmp_path):
    """The stacked training metrics follow `trainer.log_every_n_steps` as Lightning's own do, and a callback can
    monitor one (early stopping on the sampled reward, checked at each validation, strict: a missing key fails)."""
    run = tmp_path / "every2"
    results = train(quick_cfg(
        "objective=grpo", "eval_before=false", "log.csv=true", "trainer.log_every_n_steps=2", "trainer.val_check_interval=2",
        "callbacks=early_stopping", "callbacks.early_stopping.monitor=train/reward_mean", "callbacks.early_stopping.patience=100", run_dir=run,
    ))
    assert results["status"] == "complete" and results["steps"] == 4
    rows = read_metrics(run)
    logged = sorted({int(r["step"]) for r in rows if r.get("train/loss")})
    assert logged == [1, 3]
    every = [r for r in rows if r.get("train/loss")]
    keys = ("train/reward_mean", "train/completion_len_max", "train/entropy", "train/grad_norm", "train/step_time_s", "train/tokens_per_s", "train/sample_time_s",
            "train/frozen_time_s")
    assert all(r.get(key) for r in every for key in keys)
    assert all(0 < float(r["train/sample_time_s"]) < float(r["train/step_time_s"]) for r in every)  # sampling is part of the step
    assert all(float(r["train/sample_time_s"]) + float(r["train/frozen_time_s"]) < float(r["train/step_time_s"]) for r in every)  # and so is scoring


def test_sft_on_the_causal_family_and_eval_mode(quick_cfg, tmp_path):
    results = train(quick_cfg("objective=sft", "model=tiny_causal", run_dir=tmp_path / "sft"))
    assert results["model"] == "tiny-llama-student" and results["steps"] == 4
    evaluated = train(quick_cfg("mode=eval", f"model.student={tmp_path / 'sft' / 'student'}", run_dir=tmp_path / "eval"))
    assert evaluated["test/accuracy"] == pytest.approx(results["test/accuracy_after"])
    assert not (tmp_path / "eval" / "checkpoints").exists()
    # every test evaluation leaves its predictions, one line per problem in split order, and an exact 95% interval
    read = lambda path: [json.loads(line) for line in path.read_text().splitlines()]  # noqa: E731
    after, again = read(tmp_path / "sft" / "predictions.jsonl"), read(tmp_path / "eval" / "predictions.jsonl")
    assert len(read(tmp_path / "sft" / "predictions_before.jsonl")) == len(after) == 32
    assert [r["index"] for r in after] == list(range(32))
    assert [r["completion"] for r in again] == [r["completion"] for r in after]  # the exported student, the same greedy answers
    assert sum(r["reward"] for r in again) / 32 == pytest.approx(evaluated["test/accuracy"])
    row = again[0]
    assert set(row) == {"index", "component", "prompt", "completion", "parsed", "style", "gold", "reward", "ended"}
    assert row["reward"] == float(row["parsed"] == row["gold"]) and isinstance(row["ended"], bool)
    low, high = evaluated["test/accuracy_ci95"]
    assert 0 <= low <= evaluated["test/accuracy"] <= high <= 1 and high - low > 0.1  # 32 problems: a wide interval


def test_grpo_on_the_causal_family_with_wandb_offline(quick_cfg, tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    train(quick_cfg("model=tiny_causal", "logger=wandb", "objective.terms.kl.estimator=full"))
    runs = list((tmp_path / "run" / "wandb").glob("offline-run-*"))
    assert runs
    logged = sorted(runs[0].glob("files/media/table/test/predictions/**/*.table.json"))
    assert len(logged) == 2, logged  # the test evaluations' predictions, before and after training
    table = json.loads(logged[0].read_text())
    assert table["columns"] == ["index", "component", "prompt", "completion", "parsed", "style", "gold", "reward", "ended"] and len(table["data"]) == 32


def test_cli_multirun_sweeps_top_level_hyperparameters(tmp_path):
    import subprocess
    import sys

    from conftest import REPO

    sweep = tmp_path / "sweep"
    cmd = [
        sys.executable, "run.py", "-m", "objective=j1,j2,j3", "gamma=0.1,0.5", "experiment=smoke", "logger=none",
        "trainer.max_steps=2", "data.test_size=16", "data.val_size=8", "eval_before=false", f"hydra.sweep.dir={sweep}",
    ]
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-2000:]
    results = [json.loads(p.read_text()) for p in sorted(sweep.rglob("results.json"))]
    assert len(results) == 6  # the paper's `-m objective=j1,j2,j3 gamma=0.1,0.5`
    assert sorted(r["objective"] for r in results) == ["j1", "j1", "j2", "j2", "j3", "j3"]
    configs = [p.read_text() for p in sorted(sweep.rglob(".hydra/config.yaml"))]
    assert sum("gamma: 0.5" in c for c in configs) == 3
    assert out.stdout.count("run directory:") == 6


def test_validation_switched_off_by_the_trainer_still_completes(quick_cfg, tmp_path):
    results = train(quick_cfg("objective=grpo", "+trainer.limit_val_batches=0", "eval_before=false", run_dir=tmp_path / "noval"))
    assert results["status"] == "complete" and "val/accuracy" not in results


def test_kd_from_a_teacher_with_another_tokenizer_without_top_k_is_refused_before_any_weights_load(quick_cfg, tmp_path, monkeypatch):
    """The tokenizers are compared first: a GGUF student with the embedded teachers took 78 s to say so when the
    student's weights loaded before the check. A teacher with its own tokenizer reaches the student as top-k lists
    (`teachers.cross`), so KD on it needs model.teacher_top_k; any weight load before the check fails the test."""
    import shutil

    from transformers import AutoTokenizer

    from grpokd.errors import ConfigError
    from grpokd.models import loading, zoo

    teacher = tmp_path / "teacher-with-another-vocabulary"
    shutil.copytree(zoo.ensure("tiny-llama-teacher-s"), teacher)
    tokenizer = AutoTokenizer.from_pretrained(teacher)
    tokenizer.add_tokens(["zyzzyva"])
    tokenizer.save_pretrained(teacher)

    def no_weights(name, *args, **kwargs):
        raise AssertionError(f"the weights of {name} loaded before the tokenizers were compared")

    monkeypatch.setattr(loading, "load_model", no_weights)
    cfg = quick_cfg("objective=j1", f"model.teachers=[tiny-llama-teacher-s,{teacher}]")
    with pytest.raises(ConfigError, match=r"^model\.teachers\[1\] has a tokenizer other than the student's.*set model\.teacher_top_k"):
        train(cfg)
    with pytest.raises(ConfigError, match=r"^model\.reference does not share the student's tokenizer"):
        train(quick_cfg("objective=grpo", "beta=0.04", f"model.reference={teacher}"))


def test_the_validation_at_the_last_step_is_the_final_one_and_is_not_run_again(quick_cfg, tmp_path):
    """With val_check_interval dividing max_steps, Lightning validates the final weights at the last step; the run's
    val/accuracy is that validation's, not a second pass over the same weights (each pass logs one CSV row)."""
    run = tmp_path / "twice"
    results = train(quick_cfg("objective=grpo", "eval_before=false", "log.csv=true", run_dir=run))  # 4 steps, val every 2
    validated = [r for r in read_metrics(run) if r.get("val/accuracy")]
    assert [int(r["step"]) for r in validated] == [1, 3]  # steps 2 and 4 (fit logs them at global_step - 1, trainer.validate at global_step)
    assert results["val/accuracy"] == pytest.approx(float(validated[-1]["val/accuracy"]))
    off_interval = train(quick_cfg("objective=grpo", "eval_before=false", "log.csv=true", "trainer.max_steps=3", run_dir=tmp_path / "three"))
    assert [int(r["step"]) for r in read_metrics(tmp_path / "three") if r.get("val/accuracy")] == [1, 3]  # step 2, then a final pass at step 3
    assert "val/accuracy" in off_interval
