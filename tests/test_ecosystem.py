"""Lightning/Hydra conventions and W&B runs: config groups, the logged config, offline W&B files, Optuna, debug runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import QUICK, REPO, compose

from grpokd import evaluation
from grpokd import rollout as ro
from grpokd.callbacks import teacher_series
from grpokd.errors import ConfigError
from grpokd.loggers import flatten, logged_config
from grpokd.models import loading
from grpokd.module import warmup_constant
from grpokd.train import build_optim, build_trainer

CLI_QUICK = [o for o in QUICK if not o.startswith("logger=")] + ["eval_before=false"]


def run_cli(*args: str, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, str(REPO / "run.py"), *args], cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", **(env or {})}, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


# --- pure pieces ---------------------------------------------------------------------------------

def test_warmup_constant_ramps_then_holds():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.3)
    sched = warmup_constant(opt, warmup_steps=2)
    lrs = []
    for _ in range(4):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([0.1, 0.2, 0.3, 0.3])  # lr * (s + 1) / (warmup + 1), then lr


def test_flatten_and_teacher_series():
    assert flatten({"a": {"b": 1, "c": {"d": [1, 2]}}, "e": None}) == {"a.b": 1, "a.c.d": [1, 2], "e": None}
    history = [
        (0, {"train/teacher/kl_fwd/s": 1.0, "train/teacher/kl_fwd/m": 2.0, "train/loss": 5.0}),
        (1, {"train/teacher/kl_fwd/s": 0.5, "train/teacher/kl_fwd/m": 1.5, "train/teacher/weight/s": 0.4, "train/teacher/weight/m": 0.6}),
        (2, {"train/teacher/kl_fwd/s": 0.2}),  # a step without every teacher: left out, the lines share the x axis
    ]
    series = teacher_series(history)
    assert series["kl_fwd"] == ([0, 1], {"s": [1.0, 0.5], "m": [2.0, 1.5]})
    assert series["weight"] == ([1], {"s": [0.4], "m": [0.6]})


def test_logged_config_is_flat_with_choices_and_only_the_objectives_keys(tmp_path):
    git = {"git_commit": "abc", "git_dirty": False}
    j1 = logged_config(compose(["objective=j1"], tmp_path), choices={"objective": "j1", "dataset": "arith"}, git=git)
    j3 = logged_config(compose(["objective=j3"], tmp_path), choices={}, git=git)
    assert j1["choices/objective"] == "j1" and j1["git_commit"] == "abc" and j1["git_dirty"] is False
    assert "gamma" not in j1 and j3["gamma"] == 0.1  # J' ignores gamma; J''' uses it (tuned: 0.1)
    assert j1["lam"] == 0.5 and j1["optim.lr"] == pytest.approx(1e-4)
    assert not any(k == "run_dir" or k.split(".")[0] in {"logger", "callbacks", "paths", "hydra"} for k in j1)
    assert all(not isinstance(v, dict) for v in j1.values())


def test_optimiser_and_scheduler_are_configs(tmp_path):
    sgd = build_optim(compose(["optim._target_=torch.optim.SGD", "~optim.betas", "scheduler=null"], tmp_path))
    opt = sgd.optimizer([torch.nn.Parameter(torch.zeros(1))])
    assert isinstance(opt, torch.optim.SGD) and sgd.scheduler is None
    cosine = build_optim(compose([
        "scheduler._target_=transformers.get_cosine_schedule_with_warmup", "~scheduler.warmup_steps",
        "+scheduler.num_warmup_steps=2", "+scheduler.num_training_steps=10"], tmp_path))
    assert cosine.scheduler(cosine.optimizer([torch.nn.Parameter(torch.zeros(1))])).get_last_lr() == [0.0]
    for bad in (["+optim.momentum_typo=0.9"], ["optim.lr=-1"], ["scheduler.warmup_steps=-2"]):
        with pytest.raises(ConfigError):
            build_optim(compose(bad, tmp_path))


def test_config_groups_compose(tmp_path):
    paper = compose(["experiment=paper_table1"], tmp_path)
    assert (paper.model.name, paper.dataset.name, paper.trainer.precision, paper.trainer.max_steps) == ("flan_t5", "gsm8k", "bf16-mixed", 1000)
    stop = compose(["callbacks=early_stopping"], tmp_path)
    assert stop.callbacks.early_stopping.monitor == "val/accuracy" and "model_checkpoint" in stop.callbacks
    assert compose(["debug=fdr"], tmp_path).trainer.fast_dev_run is True
    trainer = build_trainer(compose([*QUICK, "log.csv=true"], tmp_path), tmp_path, [])
    kinds = {type(c).__name__ for c in trainer.callbacks}
    assert {"ModelCheckpoint", "LearningRateMonitor", "ThroughputMonitor", "RichProgressBar", "TeacherCharts"} <= kinds


def test_pass_at_k_leaves_the_training_rng_alone():
    model = loading.load_model("tiny-llama-student", "model.student")
    tokenizer = loading.load_tokenizer("tiny-llama-student", "model.student")
    from grpokd.data import sources
    from grpokd.data.rewards import NumericReward

    val = sources.arith(seed=0).train[-16:]
    examples = {"prompt": [e.prompt for e in val], "answer": [e.answer for e in val]}
    sampling = ro.Sampling(group_size=2, max_prompt_len=64, max_new_tokens=32)
    torch.manual_seed(3)
    before = torch.get_rng_state()
    first = evaluation.pass_at_k(model, tokenizer, examples, NumericReward(), sampling, k=8, seed=11)
    assert torch.equal(torch.get_rng_state(), before)
    assert torch.equal(first, evaluation.pass_at_k(model, tokenizer, examples, NumericReward(), sampling, k=8, seed=11))
    greedy = evaluation.greedy(model, tokenizer, examples, NumericReward(), sampling).rewards
    assert first.shape == (16,) and set(first.tolist()) <= {0.0, 1.0}
    assert first.sum() >= 1 and first.sum() >= greedy.sum() - 4  # 8 samples find most of what greedy finds, and more


# --- end to end ----------------------------------------------------------------------------------

def wandb_records(path: Path) -> list:
    """The protobuf records of an offline run's run-<id>.wandb (LevelDB log blocks of 32 KiB after a 7-byte header)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, records, chunks, block = path.read_bytes(), [], b"", 32768
    pos = 7
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # the block's tail is padding
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(data[pos + 4 : pos + 6], "little"), data[pos + 6]
        chunks += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST: a whole record
            record = pb.Record()
            record.ParseFromString(chunks)
            records.append(record)
            chunks = b""
        elif kind == 0:
            break
    return records


def test_offline_wandb_run_records_names_group_tags_config_and_summaries(tmp_path):
    """A 2-job multirun with W&B offline: each job its own run, with what a dashboard reader needs."""
    run_cli("-m", "objective=j1,j3", *CLI_QUICK, "logger=wandb", "tags=[ci]", f"paths.multirun={tmp_path}/mr", cwd=tmp_path)
    runs = sorted((tmp_path / "mr").glob("*/*/*/wandb/offline-run-*"))
    assert len(runs) == 2  # one W&B run per job: each job finishes its own
    names = set()
    for run in runs:
        records = wandb_records(next(run.glob("run-*.wandb")))
        (info,) = [r.run for r in records if r.HasField("run")][:1]
        config = {}
        for r in records:
            if r.HasField("config"):
                config |= {item.key: json.loads(item.value_json) for item in r.config.update}
        metrics = {r.metric.name or r.metric.glob_name: r.metric for r in records if r.HasField("metric")}
        objective = config["choices/objective"]
        group = "/".join(run.parents[2].parts[-2:])  # the multirun directory: <date>/<time>-p<pid>
        assert info.run_group == group and set(info.tags) == {objective, "arith", "tiny_causal", "ci"}
        assert info.display_name.startswith(f"{objective}-arith-s0-") and len(info.display_name) == len(f"{objective}-arith-s0-") + 6
        names.add(info.display_name)
        assert config["objective.name"] == objective and ("gamma" in config) == (objective == "j3")
        assert config["git_commit"] and isinstance(config["git_dirty"], bool)
        assert "run_dir" not in config and not any(k.startswith(("logger.", "hydra.", "callbacks.")) for k in config)
        assert metrics["val/accuracy"].summary.max and metrics["val/pass@*"].summary.max
        history = [item.key or "/".join(item.nested_key) for r in records if r.HasField("history") for item in r.history.item]
        assert {"val/accuracy", "val/pass@8", "train/lr"} <= set(history)  # throughput needs a full window (20 steps)
        assert any(k.startswith("charts/teacher_") for k in history)  # one chart per teacher quantity
        results = json.loads((run.parents[1] / "results.json").read_text())
        assert results["git_commit"] == config["git_commit"]
    assert len(names) == 2


def test_debug_fdr_runs_every_piece_once(tmp_path):
    run_cli("debug=fdr", "objective=j1", "data.val_size=16", "data.test_size=16", "eval_pass_k=2", f"paths.outputs={tmp_path}/out", cwd=tmp_path)
    (result,) = (tmp_path / "out").glob("*/*/results.json")
    results = json.loads(result.read_text())
    assert results["status"] == "complete" and results["steps"] == 1 and "val/accuracy" in results


def test_optuna_search_optimises_val_accuracy(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    run_cli("hparams_search=optuna", "objective=grpo", *CLI_QUICK, "logger=none", "eval_pass_k=0", "hydra.sweeper.n_trials=2",
            "hydra.sweeper.sampler.n_startup_trials=2", f"paths.multirun={tmp_path}/mr", cwd=tmp_path)
    (best,) = (tmp_path / "mr").glob("*/*/optimization_results.yaml")
    found = yaml.safe_load(best.read_text())
    jobs = [json.loads(p.read_text()) for p in (tmp_path / "mr").glob("*/*/*/results.json")]
    assert len(jobs) == 2 and all("test/accuracy_after" not in j for j in jobs)  # the test split is never scored
    assert found["best_value"] == pytest.approx(max(j["val/accuracy"] for j in jobs))
    assert set(found["best_params"]) == {"optim.lr", "beta"}
