"""Every YAML composes and instantiates; bad configs fail at start-up with one clear line."""

from __future__ import annotations

import subprocess
import sys

import hydra
import pytest
import torch
from conftest import REPO, compose, objective_config

from grpokd.errors import ConfigError
from grpokd.objectives.base import Needs
from grpokd.train import instantiate_group, prepare

CONF = REPO / "conf"


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


@pytest.mark.parametrize("objective", options("objective"))
def test_objectives_instantiate_and_declare_needs(objective, tmp_path):
    cfg = compose([f"objective={objective}"], tmp_path)
    assert cfg.objective.name == objective
    assert isinstance(instantiate_group(cfg.objective, "objective").needs, Needs)


def test_the_default_objective_is_j1_with_the_embedded_teachers(tmp_path):
    """The paper's primary objective, J', is what `python run.py` trains, on the embedded causal testbed."""
    cfg = compose([], tmp_path)
    assert cfg.objective.name == "j1" and cfg.objective.terms.kl.estimator == "full"
    assert cfg.model.student == "tiny-llama-student"
    assert list(cfg.model.teachers) == ["tiny-llama-teacher-s", "tiny-llama-teacher-m"]
    assert list(compose(["model=tiny"], tmp_path).model.teachers) == ["tiny-t5-teacher-s", "tiny-t5-teacher-m"]


def test_top_level_hyperparameters_reach_the_objective(tmp_path):
    cfg = compose(["objective=grpo", "beta=0.3", "epsilon=0.1"], tmp_path)
    grpo = instantiate_group(cfg.objective, "objective")
    assert (grpo.terms["kl"].weight, grpo.epsilon_low, grpo.epsilon_high) == (0.3, 0.1, 0.1)
    assert compose(["group_size=3"], tmp_path).rollout.sampling.group_size == 3


def test_grpo_with_beta_zero_needs_no_reference(tmp_path):
    grpo = instantiate_group(compose(["objective=grpo", "beta=0"], tmp_path).objective, "objective")
    assert not (grpo.needs.ref_logp or grpo.needs.ref_logits)


@pytest.mark.parametrize("dataset", ["arith", "arith_mc"])
def test_synthetic_datasets_prepare(dataset, tmp_path):
    prep = prepare(compose([f"dataset={dataset}", "data.test_size=10"], tmp_path))
    assert len(prep.data.test_set) == 10 and prep.data.train_set
    ex = prep.data.test_set[0]
    assert prep.reward(ex.solution, ex.answer) == 1.0


def test_real_datasets_prepare_from_local_copies(shared_data, tmp_path):
    gsm = prepare(compose(["dataset=gsm8k", f"dataset.path={shared_data / 'gsm8k'}"], tmp_path))
    assert len(gsm.data.test_set) == 500 and gsm.reward(gsm.data.test_set[0].solution, gsm.data.test_set[0].answer) == 1.0
    mi = prepare(compose(["dataset=mathinstruct", f"dataset.path={shared_data / 'aqua'}", "data.val_size=20"], tmp_path))
    assert mi.data.test_set[0].answer in "ABCDE"


def test_jsonl_dataset(tmp_path):
    rows = "\n".join(f'{{"prompt": "what is {i} plus 1 ?", "answer": "{i + 1}"}}' for i in range(300))
    (tmp_path / "d.jsonl").write_text(rows)
    prep = prepare(compose(["dataset=jsonl", f"dataset.path={tmp_path / 'd.jsonl'}", "data.val_size=10"], tmp_path))
    assert prep.data.test_set and prep.reward("#### " + prep.data.test_set[0].answer, prep.data.test_set[0].answer) == 1.0


@pytest.mark.parametrize("group,option", [(g, o) for g in ("trainer", "model") for o in options(g)])
def test_trainer_and_model_options_compose(group, option, tmp_path):
    own = ["model.student=tiny-llama-student", "model.teachers=[tiny-llama-teacher-m]"] if option == "base" else []  # models of your own
    cfg = compose([f"{group}={option}", *own], tmp_path)
    node = cfg[group]
    if group == "trainer":
        assert node._target_ == "lightning.pytorch.Trainer"
    else:
        assert node.student and len(node.teachers) >= 1


def test_loggers_instantiate_offline(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    cfg = compose(["logger=wandb"], tmp_path)
    logger = hydra.utils.instantiate(cfg.logger)
    logger.experiment.finish()  # a W&B run left open would take in the next test's logging (wandb.run is global)
    assert logger._offline  # no credentials here: offline, never a hang
    assert type(hydra.utils.instantiate(compose(["logger=csv"], tmp_path).logger)).__name__ == "CSVLogger"
    assert not compose(["logger=none"], tmp_path).get("logger")


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["objective=grpo", "group_size=1"], "group_size=1"),
        (["objective.terms.kl.estimator=k9"], "objective.terms.kl.estimator='k9' is not one of k1, k2, k3, full"),
        (["model.student=/no/such/model"], "model.student"),
        (["model.student=some-org/some-model-that-is-not-here"], "hf download"),
        (["dataset=gsm8k", "dataset.path=/no/such/dir"], "/no/such/dir"),
        (["mode=predict"], "mode"),
        (["objective=kdrl", "objective.terms.teacher_kl.kd_mask=easy"], "kd_mask='easy' is not one of none, incorrect_only, hard_prompts"),
        (["objective=tgpo", "objective.terms.guide.target=beam"], "target='beam' is not one of argmax, sampled, topk"),
        (["objective=kdrl", "model.teachers=[]"], "model.teachers is empty"),
        (["+reward.weights.lenght=1"], "reward.weights names lenght"),
        (["updates_per_rollout=0"], "updates_per_rollout=0"),
        (["rollout.minibatches=3"], "rollout.minibatches=3 must divide data.prompts_per_step=16"),
        (["updates_per_rollout=2", "+trainer.accumulate_grad_batches=2"], "accumulate_grad_batches"),
        (["objective=j3", "+term@objective.terms.rkl=teacher_kl"], "disagree on teacher_logp_at_sampling_temperature"),
        # the paper's hyperparameters by the names typed, the terms' own values by their full keys, NaN included
        (["tau=nan"], "^tau=nan must be a number$"),
        (["objective=j3", "gamma=nan"], "^gamma=nan must be a number$"),
        (["objective=j2", "beta_prime=-1"], "^beta_prime=-1 must be >= 0$"),
        (["lam=-0.5"], "^lam=-0.5 must be >= 0$"),
        (["epsilon=1.5"], "^epsilon=1.5 must be < 1$"),
        (["objective.terms.kd.tau=0"], "^objective.terms.kd.tau=0 must be > 0$"),
        (["objective.terms.kd.weight=nan"], "^objective.terms.kd.weight=nan must be a number$"),
        (["objective=j3", "objective.terms.ta.delta=nan"], "^objective.terms.ta.delta=nan must be a number$"),
        (["objective=tgpo", "objective.terms.guide.target_k=0"], "^objective.terms.guide.target_k=0 must be >= 1$"),
        (["objective=kdrl", "objective.terms.teacher_kl.hard_threshold=nan"], "^objective.terms.teacher_kl.hard_threshold=nan must be a number$"),
        (["objective.adv_delta=0"], "^objective.adv_delta=0 must be > 0$"),
        (["objective.epsilon_high=nan"], "^objective.epsilon_high=nan must be a number$"),
        (["weighting=confidence", "weighting.temperature=nan"], "^weighting.temperature=nan must be a number$"),
        (["objective=grpo", "reward.weights.correct=0"], "reward.weights are all 0: objective grpo would train on a reward that is always 0"),
        (["reward.weights.format=nan"], "^reward.weights.format=nan must be a number$"),
    ],
)
def test_bad_configs_fail_at_start_up_with_the_key_named(overrides, message, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from grpokd import network

    network.hub_reachable.cache_clear()
    with pytest.raises(ConfigError, match=message.replace("/", ".")):
        prepare(compose(overrides, tmp_path))
    network.hub_reachable.cache_clear()


def test_cli_bad_input_is_one_line_and_leaves_no_run_directory(tmp_path):
    out = subprocess.run(
        [sys.executable, "run.py", "model.student=/no/such/model", f"hydra.run.dir={tmp_path / 'run'}", "logger=none"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert out.returncode == 2
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "model.student" in errors[0]
    assert not (tmp_path / "run").exists()


def test_a_reward_free_objective_may_leave_every_reward_unweighted(tmp_path):
    prepare(compose(["objective=opd", "reward.weights.correct=0"], tmp_path))  # on-policy distillation needs no reward


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["hydra.run.dir=/proc/no/such/place"], "hydra.run.dir=/proc/no/such/place: cannot create it"),
        (["paths.outputs=run.py/inside-a-file"], "cannot create it (Not a directory)"),
        (["model.student=run.py"], "is not a GGUF file"),
        pytest.param(["trainer=fsdp"], "no CUDA GPU is visible on this machine; on CPU use trainer=default",
                     marks=pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is visible")),
        (["dataset=mix", "weighting=route", "weighting.routes.arith=no-such-teacher"], "weighting.routes.arith=no-such-teacher: no such teacher"),
        (["model.teacher_top_k=1000"], "model.teacher_top_k=1000 is larger than the vocabulary of model.student (81)"),
    ],
    ids=["unwritable-run-dir", "run-dir-under-a-file", "student-is-a-file", "fsdp-on-cpu", "route-to-unknown-teacher", "top-k-above-vocabulary"],
)
def test_cli_start_up_failures_are_one_line_exit_2_and_leave_no_run_directory(overrides, message, tmp_path):
    outputs = tmp_path / "outputs"
    where = [] if any(o.startswith("paths.outputs=") for o in overrides) else [f"paths.outputs={outputs}"]
    out = subprocess.run(
        [sys.executable, "run.py", *overrides, *where, "logger=none", "trainer.max_steps=1"], cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert out.returncode == 2, out.stderr[-2000:]
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], out.stderr[-2000:]
    assert "Traceback" not in out.stderr
    assert not any(outputs.rglob("*_s0")), "a run directory was left behind"


def test_cli_unknown_group_option_names_the_choices():
    out = subprocess.run([sys.executable, "run.py", "objective=nope"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and "objective/nope" in out.stderr and "grpo" in out.stderr


def test_the_coefficient_table_is_what_the_configs_interpolate():
    """One table of the paper's coefficients (grpokd.objectives.coefficients): every top-level key an objective or
    term config interpolates is in it, each has a value in conf/config.yaml, and nothing else is in it."""
    import re

    from omegaconf import OmegaConf

    from grpokd.objectives.coefficients import COEFFICIENTS

    texts = [p.read_text() for folder in ("objective", "term") for p in sorted((REPO / "conf" / folder).glob("*.yaml"))]
    interpolated = {key for text in texts for key in re.findall(r"\$\{(\w+)\}", text)}
    assert interpolated == set(COEFFICIENTS)
    top_level = OmegaConf.load(REPO / "conf" / "config.yaml")
    assert all(isinstance(top_level[key], float) for key in COEFFICIENTS), {key: top_level.get(key) for key in COEFFICIENTS}


def test_a_typed_coefficient_the_objective_does_not_read_is_named(recwarn):
    from grpokd.objectives import coefficients
    from grpokd.train import warn_unread_coefficients

    cfg = objective_config("tgpo")
    message = warn_unread_coefficients(cfg, {"lam": "0.3", "beta": "0.1", "data.val_size": "8"})
    assert message == "lam=0.3: not read by objective tgpo, which reads beta, lam_t, epsilon"
    assert [str(w.message) for w in recwarn] == [message]
    assert warn_unread_coefficients(cfg, {"lam_t": "0.3", "beta": "0.1"}) is None
    assert warn_unread_coefficients(objective_config("sft"), {"beta": "0"}) == "beta=0: not read by objective sft, which reads no coefficient"
    assert coefficients.read_by({"a": "${gamma}", "b": ["${lam}"]}) == ["gamma", "lam"]
