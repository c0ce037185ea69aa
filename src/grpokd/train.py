"""train(cfg) -> results: everything between a composed Hydra config and results.json.

Used by run.py (which wraps it in @hydra.main) and by the tests (which compose
the real config and shrink it). Order matters for users: every check that can
fail on bad input runs first (`prepare`), so a typo ends in one line before
any model is built or trained; results.json is written last and atomically,
so a run directory with it is a complete run.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from omegaconf import DictConfig, OmegaConf

from grpokd.data.datamodule import TaskData
from grpokd.data.rewards import WeightedRewards
from grpokd.errors import ConfigError
from grpokd.loggers import csv_logger
from grpokd.models import loading
from grpokd.models.ensemble import TeacherEnsemble
from grpokd.module import GRPOKDModule, Optim
from grpokd.rollout import Sampling, needs_teachers

MODES = ("train", "eval")


@dataclass(frozen=True)
class Prepared:
    """What a run needs, checked; models not yet loaded."""

    objective: Any
    data: TaskData
    reward: Any  # the dataset's correctness reward (greedy evaluation)
    train_reward: WeightedRewards  # the rollouts' reward: correctness and the configured extra functions, weighted
    sampling: Sampling


def instantiate_group(node: DictConfig, key: str) -> Any:
    """Instantiate a config group node that carries a display `name` besides its `_target_`."""
    spec = OmegaConf.to_container(node, resolve=True)
    spec.pop("name", None)
    try:
        return hydra.utils.instantiate(spec)
    except hydra.errors.InstantiationException as err:
        cause = err.__cause__ if err.__cause__ is not None else err
        if isinstance(cause, ConfigError):
            raise cause from None
        raise ConfigError(f"{key}: {cause}".splitlines()[0]) from None


def prepare(cfg: DictConfig) -> Prepared:
    """Every start-up check that needs no model: objective, sampling, dataset, model names."""
    if cfg.mode not in MODES:
        raise ConfigError(f"mode={cfg.mode!r}: allowed values are {', '.join(MODES)}")
    objective = instantiate_group(cfg.objective, "objective")
    sampling = Sampling(**cfg.rollout.sampling)
    if cfg.mode == "train" and objective.needs.rollouts and sampling.group_size < 2:
        raise ConfigError(
            f"group_size={sampling.group_size}: objective {cfg.objective.name} compares completions within a group; set group_size>=2"
        )
    check_updates(cfg)
    loading.check_name(cfg.model.student, "model.student")
    if cfg.model.get("reference"):
        loading.check_name(cfg.model.reference, "model.reference")
    if cfg.mode == "train" and needs_teachers(objective.needs):
        if not cfg.model.teachers:
            raise ConfigError(f"model.teachers is empty; objective {cfg.objective.name} needs at least one teacher (e.g. model.teachers=[tiny-t5-teacher-s])")
        for i, teacher in enumerate(cfg.model.teachers):
            loading.check_name(teacher_spec(teacher)[0], f"model.teachers[{i}]")
        weighting = instantiate_group(cfg.weighting, "weighting")
        getattr(weighting, "check", lambda m: None)(len(cfg.model.teachers))
    splits = instantiate_group(cfg.dataset.source, "dataset.source")
    reward = instantiate_group(cfg.dataset.reward, "dataset.reward")
    train_reward = weighted_rewards(cfg, reward)
    data = TaskData(splits, seed=cfg.seed, prompt_template=cfg.dataset.prompt_template, **cfg.data)
    return Prepared(objective, data, reward, train_reward, sampling)


def weighted_rewards(cfg: DictConfig, correct: Any) -> WeightedRewards:
    """reward.functions (name -> config) besides "correct" (the dataset's), weighted by reward.weights."""
    functions = {"correct": correct}
    for name, node in (cfg.reward.get("functions") or {}).items():
        if name == "correct":
            raise ConfigError("reward.functions.correct: 'correct' is the dataset's reward (dataset.reward); name yours otherwise")
        functions[name] = instantiate_group(node, f"reward.functions.{name}")
    try:
        return WeightedRewards(functions, OmegaConf.to_container(cfg.reward.weights))
    except ValueError as err:
        raise ConfigError(str(err)) from None


def check_updates(cfg: DictConfig) -> None:
    """updates_per_rollout and rollout.minibatches: positive, whole-prompt minibatches, no gradient accumulation."""
    mu, parts = cfg.updates_per_rollout, cfg.rollout.minibatches
    if not (isinstance(mu, int) and mu >= 1 and isinstance(parts, int) and parts >= 1):
        raise ConfigError(f"updates_per_rollout={mu} and rollout.minibatches={parts} must be integers >= 1")
    if cfg.data.prompts_per_step % parts:
        raise ConfigError(f"rollout.minibatches={parts} must divide data.prompts_per_step={cfg.data.prompts_per_step} (minibatches hold whole groups)")
    if mu * parts > 1 and cfg.trainer.get("accumulate_grad_batches", 1) != 1:
        raise ConfigError("updates_per_rollout / rollout.minibatches > 1 with trainer.accumulate_grad_batches > 1: use minibatches instead")


def build_module(cfg: DictConfig, prep: Prepared, run_dir: Path) -> GRPOKDModule:
    """Load the student (and the reference only if the objective needs one) into the LightningModule."""
    tokenizer = loading.load_tokenizer(cfg.model.student, "model.student")
    student = loading.load_model(cfg.model.student, "model.student", cfg.model.dtype)
    needs = prep.objective.needs
    reference = None
    if cfg.mode == "train" and (needs.ref_logp or needs.ref_logits):
        ref_name = cfg.model.get("reference") or cfg.model.student
        reference = loading.load_model(ref_name, "model.reference", cfg.model.dtype).requires_grad_(False)
        if ref_name != cfg.model.student:
            loading.check_same_tokenizer(tokenizer, loading.load_tokenizer(ref_name, "model.reference"), cfg.model.student, ref_name)
    teachers = load_teachers(cfg, tokenizer) if cfg.mode == "train" and needs_teachers(needs) else None
    if cfg.model.disable_dropout:
        for model in (student, reference):
            disable_dropout(model)
    student.train()
    return GRPOKDModule(
        student, tokenizer, prep.objective, prep.reward, prep.sampling, Optim(**cfg.optim), reference=reference,
        teachers=teachers, samples_every=cfg.log.samples_every, samples_dir=run_dir,
        updates_per_rollout=cfg.updates_per_rollout, minibatches=cfg.rollout.minibatches,
        train_reward=prep.train_reward, mask_truncated_completions=cfg.rollout.mask_truncated_completions,
    )


def teacher_spec(item: Any) -> tuple[str, str | None]:
    """A teacher entry is a name, or {name: ..., dtype: ...} for per-teacher options."""
    if isinstance(item, str):
        return item, None
    return item["name"], item.get("dtype")


def load_teachers(cfg: DictConfig, tokenizer) -> TeacherEnsemble:
    """Every teacher of model.teachers, checked to share the student's tokenizer."""
    models, names = [], []
    for i, item in enumerate(cfg.model.teachers):
        name, dtype = teacher_spec(item)
        role = f"model.teachers[{i}]"
        loading.check_same_tokenizer(tokenizer, loading.load_tokenizer(name, role), cfg.model.student, f"{role}={name}")
        models.append(loading.load_model(name, role, dtype or cfg.model.dtype))
        names.append(Path(name).name)
    return TeacherEnsemble(models, names, instantiate_group(cfg.weighting, "weighting"), cfg.model.get("teacher_chunk_prompts"))


def disable_dropout(model: torch.nn.Module | None) -> None:
    """RL fine-tuning samples and scores the same policy: dropout would make them differ."""
    for m in model.modules() if model is not None else ():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0


def build_trainer(cfg: DictConfig, run_dir: Path) -> L.Trainer:
    loggers = [hydra.utils.instantiate(cfg.logger)] if cfg.get("logger") else []
    if cfg.log.get("csv") and not any(isinstance(lg, CSVLogger) for lg in loggers):
        loggers.append(csv_logger(str(run_dir)))
    for lg in loggers:
        lg.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
    callbacks = [
        ModelCheckpoint(dirpath=run_dir / "checkpoints", save_last=True, save_top_k=0, every_n_train_steps=cfg.checkpoint_every)
    ]
    return hydra.utils.instantiate(cfg.trainer, logger=loggers or False, callbacks=callbacks, default_root_dir=str(run_dir))


def evaluate(trainer: L.Trainer, module: GRPOKDModule, data: TaskData, tag: str) -> float:
    """Greedy test accuracy, logged as test/<tag>."""
    module.eval_tag = tag
    return float(trainer.test(module, datamodule=data, verbose=False)[0][f"test/{tag}"])


def write_json(path: Path, payload: dict[str, Any]) -> None:
    """Atomic write: a reader sees the old file or the whole new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=str))
    os.replace(tmp, path)


def read_results(run_dir: str | Path) -> dict[str, Any]:
    """The run's results.json, or {} when there is none (or it cannot be read)."""
    try:
        return json.loads((Path(run_dir) / "results.json").read_text())
    except (OSError, ValueError):
        return {}


def train(cfg: DictConfig) -> dict[str, Any]:
    """Run one job (train or eval) described by `cfg`; returns what results.json holds.

    With `skip_complete`, a run directory whose results.json says complete is returned as is.
    """
    run_dir = Path(cfg.run_dir)
    if cfg.get("skip_complete"):
        done = read_results(run_dir)
        if done.get("status") == "complete":
            return done
    prep = prepare(cfg)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    start = time.time()
    module = build_module(cfg, prep, run_dir)
    trainer = build_trainer(cfg, run_dir)
    results: dict[str, Any] = {
        "objective": cfg.objective.name,
        "dataset": cfg.dataset.name,
        "model": cfg.model.student,
        "seed": cfg.seed,
        "mode": cfg.mode,
    }
    if cfg.mode == "eval":
        results["test/accuracy"] = evaluate(trainer, module, prep.data, "accuracy")
    else:
        if cfg.eval_before and cfg.eval_test:
            results["test/accuracy_before"] = evaluate(trainer, module, prep.data, "accuracy_before")
        trainer.fit(module, datamodule=prep.data, ckpt_path=cfg.ckpt_path)
        if prep.data.val_set and trainer.limit_val_batches != 0:  # the final greedy val accuracy: what `sweep=tune` selects on
            results["val/accuracy"] = float(trainer.validate(module, datamodule=prep.data, verbose=False)[0]["val/accuracy"])
        if cfg.eval_test:
            results["test/accuracy_after"] = evaluate(trainer, module, prep.data, "accuracy_after")
        export = run_dir / "student"
        module.student.save_pretrained(export)
        module.tokenizer.save_pretrained(export)
        results["student_dir"] = str(export)
    results |= {
        "steps": trainer.global_step,
        "wall_time_s": round(time.time() - start, 1),
        "test_size": len(prep.data.test_set),
        "run_dir": str(run_dir),
        "status": "complete",
    }
    if trainer.is_global_zero:
        write_json(run_dir / "results.json", results)
    return results
