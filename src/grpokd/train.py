"""train(cfg) -> results: everything between a composed Hydra config and results.json.

Used by run.py (which wraps it in @hydra.main) and by the tests (which compose
the real config and shrink it). Order matters for users: every check that can
fail on bad input runs first (`prepare`), so a typo ends in one line before
any model is built or trained; results.json is written last and atomically,
so a run directory with it is a complete run.
"""

from __future__ import annotations

import json
import re
import signal
import time
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from lightning.pytorch.callbacks import LearningRateMonitor
from lightning.pytorch.loggers import CSVLogger, WandbLogger
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf

from grpokd import parallel, runtime
from grpokd.data import prompts
from grpokd.data.datamodule import TaskData
from grpokd.data.mix import Component, mix, tagged
from grpokd.data.rewards import ComponentRewards, WeightedRewards
from grpokd.data.sources import Splits
from grpokd.errors import ConfigError, Unavailable, check_range
from grpokd.evaluation import binomial_interval
from grpokd.loggers import continue_csv, csv_logger, logged_config
from grpokd.models import coverage, engines, loading
from grpokd.models.lm import end_token_ids
from grpokd.models.student import LoRA, add_lora, enable_checkpointing, lora_config, save_student
from grpokd.module import GRPOKDModule, Optim
from grpokd.objectives import coefficients
from grpokd.objectives.functional import check_choice
from grpokd.rollout import Sampling
from grpokd.teachers import TeacherEnsemble, align, sources
from grpokd.teachers.cross import UNMATCHED, CrossTokenizer

MODES = ("train", "eval")
EVAL_SPLITS = ("test", "val")  # what mode=eval scores


@dataclass(frozen=True)
class Prepared:
    """What a run needs, checked; models not yet loaded."""

    objective: Any
    data: TaskData
    reward: Any  # the dataset's correctness reward (greedy evaluation)
    train_reward: WeightedRewards  # the rollouts' reward: correctness and the configured extra functions, weighted
    sampling: Sampling
    prompt_formats: dict[str, prompts.PromptFormat]  # each dataset component's plain or chat layout (chosen with the tokenizer)
    optim: Optim
    ckpt_path: str | None  # the checkpoint to resume from (ckpt_path, or the run's own last.ckpt with resume=true)
    resume_step: int | None  # its global step
    lora: LoRA | None  # the student's LoRA adapters (None: full fine-tuning)


def instantiate_group(node: DictConfig | dict, key: str) -> Any:
    """Instantiate a config group node that carries a display `name` besides its `_target_`.

    A node with `terms` (a policy objective) has each term instantiated on its own, so that a bad value is named
    by its full key (objective.terms.kd.tau=...). Every error ends as one ConfigError line naming `key`.
    """
    spec = OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node)
    spec.pop("name", None)
    terms = spec.pop("terms", None)
    try:
        if isinstance(terms, dict):
            built = {name: instantiate_group(term, f"{key}.terms.{name}") for name, term in terms.items() if term is not None}
            return hydra.utils.get_method(spec.pop("_target_"))(terms=built, **spec)
        return hydra.utils.instantiate(spec if terms is None else spec | {"terms": terms})
    except ConfigError as err:
        raise ConfigError(under(key, str(err))) from None
    except hydra.errors.InstantiationException as err:
        cause = err.__cause__ if err.__cause__ is not None else err
        if isinstance(cause, ConfigError):
            raise ConfigError(under(key, str(cause))) from None
        raise ConfigError(f"{key}: {cause}".splitlines()[0]) from None
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{key}: {err}".splitlines()[0]) from None


def under(key: str, message: str) -> str:
    """A ConfigError message from inside the node at `key`, named by its full key: "tau=0 must be > 0" under
    objective.terms.kd is "objective.terms.kd.tau=0 must be > 0"; a message that names a dotted key is kept."""
    first = message.split(" ", 1)[0]
    if message.startswith(key) or ("=" in first and "." in first.split("=", 1)[0]):
        return message
    return f"{key}.{message}" if "=" in first else f"{key}: {message}"


def prepare(cfg: DictConfig) -> Prepared:
    """Every start-up check that needs no model: values, objective, sampling, dataset, model names, checkpoint.

    An error names the key the user types: a key whose value interpolates another (rollout.sampling.max_new_tokens
    is ${dataset.sampling.max_new_tokens}) is named by the key it reads (`as_typed`).
    """
    try:
        return check_all(cfg)
    except ConfigError as err:
        raise ConfigError(as_typed(cfg, str(err))) from None


INTERPOLATION = re.compile(r"^\$\{([\w.]+)\}$")


def typed_key(cfg: DictConfig, key: str) -> str:
    """The key a user sets to change `key`: the one its value interpolates (followed to the end), else `key`."""
    raw, seen = OmegaConf.to_container(cfg, resolve=False), set()
    while key not in seen:
        seen.add(key)
        value: Any = raw
        for part in key.split("."):
            value = value.get(part) if isinstance(value, dict) else None
        found = INTERPOLATION.match(value) if isinstance(value, str) else None
        if found is None:
            return key
        key = found.group(1)
    return key


def as_typed(cfg: DictConfig, message: str) -> str:
    """`message` ("<key>=<value> ...") with its key named as the user types it (`typed_key`)."""
    key = message.split("=", 1)[0]
    if " " in key or "=" not in message:
        return message
    return typed_key(cfg, key) + message[len(key):]


def check_all(cfg: DictConfig) -> Prepared:
    """`prepare`'s checks, in order; errors name the keys as the config holds them."""
    missing = missing_keys(OmegaConf.to_container(cfg, resolve=False))
    if missing:
        raise ConfigError(f"{missing[0]} is mandatory and has no value; set it, e.g. {missing[0]}=<value>" + (
            f" (also missing: {', '.join(missing[1:])})" if missing[1:] else ""))
    if cfg.mode not in MODES:
        raise ConfigError(f"mode={cfg.mode!r}: allowed values are {', '.join(MODES)}")
    coefficients.check(cfg)
    warn_unread_coefficients(cfg, typed_overrides())
    sampling = Sampling(**cfg.rollout.sampling)
    optim = build_optim(cfg)
    objective = instantiate_group(cfg.objective, "objective")
    check_range("trainer.max_steps", cfg.trainer.max_steps, low=1, integer=True)
    check_range("checkpoint_every", cfg.checkpoint_every, low=1, integer=True)
    check_range("eval_pass_k", cfg.eval_pass_k, low=0, integer=True)
    for key in ("logit_chunk", "teacher_top_k"):
        if cfg.model.get(key) is not None:
            check_range(f"model.{key}", cfg.model[key], low=1, integer=True)
    check_choice("eval_split", cfg.get("eval_split", "test"), EVAL_SPLITS)
    if cfg.get("eval_split", "test") == "val" and cfg.data.val_size == 0:
        raise ConfigError("eval_split=val scores the validation split, and data.val_size=0 holds none out; set data.val_size")
    check_choice("model.teacher_unmatched", cfg.model.get("teacher_unmatched", "tail"), UNMATCHED)
    if cfg.mode == "train" and objective.needs.rollouts and sampling.group_size < 2:
        raise ConfigError(
            f"group_size={sampling.group_size}: objective {cfg.objective.name} compares completions within a group; set group_size>=2"
        )
    check_updates(cfg)
    loading.check_name(cfg.model.student, "model.student")
    lora = student_lora(cfg)
    check_engine(cfg, lora is not None)
    if not isinstance(cfg.model.get("gradient_checkpointing", False), bool):
        raise ConfigError(f"model.gradient_checkpointing={cfg.model.gradient_checkpointing!r} must be true or false")
    if cfg.model.get("reference"):
        loading.check_name(cfg.model.reference, "model.reference")
    if cfg.mode == "train" and objective.needs.teachers:
        if not cfg.model.teachers:
            raise ConfigError(f"model.teachers is empty; objective {cfg.objective.name} needs at least one teacher (e.g. model.teachers=[tiny-t5-teacher-s])")
        weighting = instantiate_group(cfg.weighting, "weighting")
        for i, teacher in enumerate(cfg.model.teachers):
            role = f"model.teachers[{i}]"
            if sources.is_served(teacher):  # what its top-k signal can give this run
                served = sources.build(teacher, role, None)  # nothing is asked of its server yet
                sources.check_sparse(role, served.top_k, objective.needs, cfg.model.get("teacher_top_k"), objective.needs.kd_tau,
                                             sampling.temperature, weighting.uses_logits)
            else:
                loading.check_name(sources.entry(teacher)["name"], role)
        getattr(weighting, "check", lambda m: None)(len(cfg.model.teachers))
    components = dataset_components(cfg)
    splits = mix(components, cfg.seed)
    reward = components[0].reward if len(components) == 1 else ComponentRewards({c.name: c.reward for c in components})
    train_reward = weighted_rewards(cfg, reward)
    if cfg.mode == "train" and objective.needs.rollouts and getattr(objective, "reward_weight", 0) > 0 and not any(train_reward.weights.values()):
        raise ConfigError(
            f"reward.weights are all 0: objective {cfg.objective.name} would train on a reward that is always 0; "
            "give a reward a weight (e.g. reward.weights.correct=1), or set objective.reward_weight=0 for reward-free training"
        )
    data = TaskData(splits, seed=cfg.seed, **cfg.data)  # the templates are the components' (`dataset_components`)
    if cfg.mode == "train" and objective.needs.teachers:
        getattr(weighting, "check_routes", lambda names, examples: None)(teacher_names(cfg), data.train_set + data.val_set)
    ckpt_path = checkpoint_to_resume(cfg)
    resume_step = None
    if ckpt_path:
        checkpoint = runtime.check_checkpoint(ckpt_path)
        runtime.check_same_run(ckpt_path, checkpoint.identity, run_identity(cfg))
        resume_step = checkpoint.step
    formats = {c.name: c.prompt_format for c in components}
    return Prepared(objective, data, reward, train_reward, sampling, formats, optim, ckpt_path, resume_step, lora)


def check_engine(cfg: DictConfig, lora: bool) -> None:
    """rollout.engine names an engine that can sample this student; its sync and correction settings are in range."""
    engines.engine_class(cfg.rollout.engine).check(cfg.model.student, lora)
    check_range("rollout.sync_every", cfg.rollout.sync_every, low=1, integer=True)
    if cfg.rollout.importance_cap is not None:
        check_range("rollout.importance_cap", cfg.rollout.importance_cap, low=0, low_open=True)


def run_identity(cfg: DictConfig) -> dict[str, str]:
    """What a checkpoint of this run must have been written by, to be resumed (`runtime.RunIdentity`)."""
    return {"objective": cfg.objective.name, "dataset": cfg.dataset.name}


def dataset_components(cfg: DictConfig) -> list[Component]:
    """The run's datasets: the components of `dataset=mix` (`dataset.components.<name>`, weighted by
    `dataset.weights.<name>`), else the dataset itself as one component named `dataset.name`. Each is loaded, its
    prompt template applied and its examples tagged with its name; the layout (`dataset.chat`) is the run's."""
    nodes = cfg.dataset.get("components")
    weights = OmegaConf.to_container(cfg.dataset.weights) if cfg.dataset.get("weights") is not None else {}
    if nodes is None:
        nodes, keys = {cfg.dataset.name: cfg.dataset}, {cfg.dataset.name: "dataset"}
    else:
        if not nodes:
            raise ConfigError("dataset.components is empty; give dataset=mix at least one component")
        keys = {name: f"dataset.components.{name}" for name in nodes}
        unknown = sorted(set(weights) - set(nodes))
        if unknown:
            raise ConfigError(f"dataset.weights.{unknown[0]}: no such component; the components are {', '.join(nodes)}")
    components = []
    for name, node in nodes.items():
        key = keys[name]
        splits = instantiate_group(node.source, f"{key}.source")
        template = node.get("prompt_template", "{prompt}")
        splits = Splits(*(tagged(split, name, template, f"{key}.prompt_template") for split in (splits.train, splits.test)))
        reward = instantiate_group(node.reward, f"{key}.reward")
        prompt_format = prompts.PromptFormat(cfg.dataset.get("chat"), node.get("system"), node.get("instruction"), node.get("instruction_in", "user"))
        components.append(Component(name, splits, reward, prompt_format, weights.get(name, 1.0)))
    return components


def teacher_names(cfg: DictConfig) -> list[str]:
    """The names the teachers go by (in metrics and in routes): each model.teachers entry's last path part."""
    return [sources.source_name(item) for item in cfg.model.teachers]


def warn_unread_coefficients(cfg: DictConfig, typed: dict[str, str]) -> str | None:
    """One warning for the paper's coefficients typed on the command line (`typed`: key -> value) that the
    objective does not read (`gamma=0.5` with objective=j1 changes nothing); returns its text, None if none."""
    reads = coefficients.read_by(OmegaConf.to_container(cfg.objective, resolve=False))
    unread = [f"{key}={value}" for key, value in typed.items() if key in coefficients.COEFFICIENTS and key not in reads]
    if not unread:
        return None
    message = f"{', '.join(unread)}: not read by objective {cfg.objective.name}, which reads {', '.join(reads) or 'no coefficient'}"
    warnings.warn(message, stacklevel=2)
    return message


def typed_overrides() -> dict[str, str]:
    """key -> value of this Hydra job's command-line overrides; {} outside a Hydra job (a test's composed config)."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return {}
    pairs = (override.lstrip("+~").split("=", 1) for override in HydraConfig.get().overrides.task)
    return {pair[0]: pair[1] for pair in pairs if len(pair) == 2}


def student_lora(cfg: DictConfig) -> LoRA | None:
    """model.lora, checked; None: the student trains all its weights."""
    node = cfg.model.get("lora")
    return lora_config(OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node)


def build_optim(cfg: DictConfig) -> Optim:
    """The optimiser and scheduler factories (`_partial_` configs), tried on a dummy parameter so that a bad value fails now."""
    if "lr" in cfg.optim:
        check_range("optim.lr", cfg.optim.lr, low=0, low_open=True)
    if "weight_decay" in cfg.optim:
        check_range("optim.weight_decay", cfg.optim.weight_decay, low=0)
    for i, beta in enumerate(cfg.optim.get("betas") or ()):
        check_range(f"optim.betas[{i}]", beta, low=0, high=1, high_open=True)
    optim = Optim(instantiate_group(cfg.optim, "optim"), instantiate_group(cfg.scheduler, "scheduler") if cfg.get("scheduler") else None)
    try:
        probe = optim.optimizer([torch.nn.Parameter(torch.zeros(1))])
    except (TypeError, ValueError) as err:
        raise ConfigError(f"optim: {err}".splitlines()[0]) from None
    if optim.scheduler is not None:
        try:
            optim.scheduler(probe)
        except ConfigError:
            raise
        except (TypeError, ValueError) as err:
            raise ConfigError(f"scheduler: {err}".splitlines()[0]) from None
    return optim


def missing_keys(node: Any, prefix: str = "") -> list[str]:
    """The dotted keys whose value is "???" (mandatory, not given) in a plain, unresolved config container."""
    if node == "???":
        return [prefix]
    if isinstance(node, dict):
        children = [(f"{prefix}.{key}" if prefix else str(key), child) for key, child in node.items()]
    elif isinstance(node, list):
        children = [(f"{prefix}[{i}]", child) for i, child in enumerate(node)]
    else:
        return []
    return [key for path, child in children for key in missing_keys(child, path)]


def checkpoint_to_resume(cfg: DictConfig) -> str | None:
    """ckpt_path; else, with resume=true or in a requeued SLURM job, the run directory's newest checkpoint, if any."""
    if cfg.ckpt_path or cfg.mode != "train" or not (cfg.get("resume") or runtime.requeued()):
        return cfg.ckpt_path
    return runtime.latest_checkpoint(Path(cfg.run_dir))


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
    """Load the student (and the reference only if the objective needs one) into the LightningModule.

    The tokenizer comes first: it renders the prompts (the chat layout, when the dataset asks or the tokenizer has
    a chat template), counts those that `rollout.sampling.max_prompt_len` cuts, and is checked against the
    dataset; then every model's family, then the weights. With LoRA, a reference that is the student
    (model.reference null) is not loaded: it is the student's base model, scored with the adapters disabled.
    """
    tokenizer = loading.load_tokenizer(cfg.model.student, "model.student")
    sampling = render_prompts(prep, tokenizer, cfg.model.student)
    if cfg.check_tokenizer:
        sample = prep.data.train_set[:500] + prep.data.test_set[:500]
        coverage.check(coverage.measure(tokenizer, sample, prep.reward), cfg.dataset.name, cfg.model.student)
    needs = prep.objective.needs
    ref_name = None
    if cfg.mode == "train" and needs.reference:
        ref_name = cfg.model.get("reference") or cfg.model.student
        loading.check_same_family(cfg.model.student, ref_name, "model.reference")
    use_teachers = cfg.mode == "train" and needs.teachers
    top_k = cfg.model.get("teacher_top_k")
    if use_teachers and top_k is not None and top_k > len(tokenizer):
        raise ConfigError(f"model.teacher_top_k={top_k} is larger than the vocabulary of model.student ({len(tokenizer)}); use at most {len(tokenizer)}")
    for i, spec in (in_process_teachers(cfg) if use_teachers else {}).items():
        loading.check_same_family(cfg.model.student, spec["name"], f"model.teachers[{i}]")
    probe = [ex.prompt for ex in prep.data.train_set[:2]] + [tokenizer.eos_token or ""]  # what a served teacher must tokenize as the student does
    solutions = [ex.solution for ex in prep.data.train_set[:8]]  # what a teacher with its own tokenizer must align with the student's
    own = check_tokenizers(cfg, tokenizer, ref_name, use_teachers, probe, solutions)  # before any weights load: a mismatch ends in seconds
    check_own_tokenizers(own, needs, top_k)
    check_positions(cfg, sampling)
    student = loading.load_model(cfg.model.student, "model.student", cfg.model.dtype)
    reference_adapters_off = prep.lora is not None and ref_name == cfg.model.student
    reference = None
    if ref_name is not None and not reference_adapters_off:
        reference = loading.load_model(ref_name, "model.reference", cfg.model.dtype).requires_grad_(False)
    teachers = load_teachers(cfg, own, tokenizer, end_token_ids(student, tokenizer), prep, sampling) if use_teachers else None
    loading.forget_dequantised()
    if cfg.model.disable_dropout:  # the pretrained models' dropout; LoRA's own is model.lora.dropout
        for model in (student, reference):
            disable_dropout(model)
    if cfg.model.get("gradient_checkpointing"):
        enable_checkpointing(student)
    if prep.lora is not None:
        student = add_lora(student, prep.lora)
    student.train()
    return GRPOKDModule(
        student, tokenizer, prep.objective, prep.reward, sampling, prep.optim, reference=reference,
        teachers=teachers, samples_every=cfg.log.samples_every, samples_dir=run_dir,
        updates_per_rollout=cfg.updates_per_rollout, minibatches=cfg.rollout.minibatches,
        train_reward=prep.train_reward, mask_truncated_completions=cfg.rollout.mask_truncated_completions,
        eval_pass_k=cfg.eval_pass_k, logit_chunk=cfg.model.get("logit_chunk"),
        reference_adapters_off=reference_adapters_off, components=prep.data.components,
        engine=engines.build(cfg.rollout.engine, **(cfg.rollout.get(cfg.rollout.engine) or {})),
        sync_every=cfg.rollout.sync_every, importance_cap=cfg.rollout.importance_cap,
    )


def render_prompts(prep: Prepared, tokenizer, student: str) -> Sampling:
    """Render `prep.data`'s prompts in the layout `prep.prompt_formats` pick for `tokenizer`, warn once about those
    longer than max_prompt_len (left-truncated everywhere), and return the sampling settings that tokenize them."""
    formats = prep.prompt_formats
    chat = next(iter(formats.values())).uses_chat(tokenizer, student)  # one layout for the run (`dataset.chat`)
    if chat:
        prep.data.render_prompts(lambda ex: formats[ex.component].render(tokenizer, ex.prompt))
    sampling = replace(prep.sampling, prompt_special_tokens=not chat)
    splits = {"train": prep.data.train_set, "val": prep.data.val_set, "test": prep.data.test_set}
    counts = {
        name: (prompts.count_long(tokenizer, [ex.prompt for ex in split], sampling.max_prompt_len, sampling.prompt_special_tokens), len(split))
        for name, split in splits.items() if split
    }
    prompts.warn_long(counts, sampling.max_prompt_len)
    return sampling


def in_process_teachers(cfg: DictConfig) -> dict[int, dict]:
    """The model.teachers entries loaded in this process (not served), by their index, as dicts."""
    return {i: sources.entry(item) for i, item in enumerate(cfg.model.teachers) if not sources.is_served(item)}


def check_tokenizers(cfg: DictConfig, tokenizer, ref_name: str | None, use_teachers: bool, texts: list[str] = (),
                     solutions: list[str] = ()) -> dict[int, Any]:
    """The reference shares the student's tokenizer (the student itself does by definition); a served teacher's
    server answers and tokenizes `texts` (some of the run's prompts) as the student does, or as its entry's
    `tokenizer` does; a teacher with a tokenizer of its own (in process, or served with `tokenizer`) can be aligned
    with the student's on `solutions` (some gold solutions). Returns those teachers' tokenizers, by index
    (`teachers.cross` reads them)."""
    if ref_name and ref_name != cfg.model.student:
        loading.check_same_tokenizer(tokenizer, loading.load_tokenizer(ref_name, "model.reference"), cfg.model.student, "model.reference")
    own = {}
    for i, item in enumerate(cfg.model.teachers if use_teachers else ()):
        role = f"model.teachers[{i}]"
        served = sources.build(item, role, None) if sources.is_served(item) else None
        name = served.tokenizer if served is not None else sources.entry(item)["name"]
        theirs = tokenizer if name is None or name == cfg.model.student else loading.load_tokenizer(name, role)
        if served is not None:
            served.check(theirs, texts, role)
        if theirs is not tokenizer and theirs.get_vocab() != tokenizer.get_vocab():
            align.check_pair(tokenizer, theirs, solutions, role)
            own[i] = theirs
    return own


def check_own_tokenizers(own: dict[int, Any], needs, top_k: int | None) -> None:
    """Teachers with their own tokenizer give next-token views as top-k lists mapped to the student's tokens
    (`teachers.cross`): KD on them needs model.teacher_top_k."""
    if own and needs.mixture and top_k is None:
        i = next(iter(own))
        raise ConfigError(
            f"model.teachers[{i}] has a tokenizer other than the student's: its next-token distributions reach the student as top-k "
            "lists of the tokens both vocabularies share; set model.teacher_top_k (e.g. 20)"
        )


def check_positions(cfg: DictConfig, sampling: Sampling) -> None:
    """A completion of max_new_tokens must fit the student's position table (where it has one) beside a prompt."""
    positions = loading.max_positions(cfg.model.student, "model.student")
    if positions is not None and sampling.max_new_tokens >= positions:
        raise ConfigError(as_typed(cfg,
            f"rollout.sampling.max_new_tokens={sampling.max_new_tokens}: model.student={cfg.model.student} has "
            f"{positions} positions for prompt and completion together; use fewer new tokens (at most {positions - 1})"
        ))


def load_teachers(cfg: DictConfig, own: dict[int, Any], tokenizer, end_ids: list[int], prep: Prepared, sampling: Sampling) -> TeacherEnsemble:
    """Every teacher of model.teachers, in process or served; those with a tokenizer of their own (`own`, from
    `check_tokenizers`) read the completions in their tokens (`teachers.cross.CrossTokenizer`)."""
    load = lambda name, role, dtype: loading.load_model(name, role, dtype or cfg.model.dtype)  # noqa: E731
    teachers = [sources.build(item, f"model.teachers[{i}]", load) for i, item in enumerate(cfg.model.teachers)]
    for i, theirs in own.items():
        render, special_tokens = teacher_layout(prep.prompt_formats, theirs)
        teachers[i] = CrossTokenizer(teachers[i], theirs, tokenizer, render, special_tokens, sampling.max_prompt_len, end_ids, f"model.teachers[{i}]",
                                     cfg.model.get("teacher_spelling", True), cfg.model.get("teacher_unmatched", "tail") == "uld")
        shared, top_k = int((teachers[i].vocabulary >= 0).sum()), cfg.model.get("teacher_top_k")
        if top_k is not None and top_k > shared:
            raise ConfigError(f"model.teacher_top_k={top_k}: only {shared} tokens of model.teachers[{i}] have a student token of the same text; use at most {shared}")
    weighting = instantiate_group(cfg.weighting, "weighting")
    return TeacherEnsemble(teachers, weighting, cfg.model.get("teacher_chunk_prompts"), cfg.model.get("teacher_top_k"))


def teacher_layout(formats: dict[str, prompts.PromptFormat], tokenizer) -> tuple[Any, bool]:
    """How a teacher with its own tokenizer reads a question: in its own chat template where it has one (unless
    dataset.chat=false), with the dataset's system message and instruction, else as the plain text with its own
    special tokens. Returns (render(question, dataset), whether to add its special tokens)."""
    first = next(iter(formats.values()))
    if first.chat is not False and getattr(tokenizer, "chat_template", None):
        return (lambda question, component: formats.get(component, first).render(tokenizer, question)), False
    return (lambda question, component: question), True


def disable_dropout(model: torch.nn.Module | None) -> None:
    """RL fine-tuning samples and scores the same policy: dropout would make them differ."""
    for m in model.modules() if model is not None else ():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0


def build_trainer(cfg: DictConfig, run_dir: Path, callbacks: list[L.Callback], resume_step: int | None = None) -> L.Trainer:
    """The configured Trainer with the loggers, the configured callbacks (conf/callbacks/), `callbacks` and atomic checkpoints."""
    loggers = [hydra.utils.instantiate(cfg.logger)] if cfg.get("logger") else []
    if cfg.log.get("csv") and not any(isinstance(lg, CSVLogger) for lg in loggers):
        loggers.append(csv_logger(str(run_dir)))
    for lg in loggers:
        if resume_step is not None and isinstance(lg, CSVLogger):
            continue_csv(lg, resume_step)
        lg.log_hyperparams(logged_config(cfg))
    configured = [hydra.utils.instantiate(node) for node in (cfg.get("callbacks") or {}).values() if node is not None]
    if not loggers:  # LearningRateMonitor refuses to run without a logger; with logger=none it has nothing to do
        configured = [c for c in configured if not isinstance(c, LearningRateMonitor)]
    trainer = hydra.utils.instantiate(
        cfg.trainer, logger=loggers or False, callbacks=[*configured, *callbacks], default_root_dir=str(run_dir),
        plugins=[runtime.AtomicCheckpointIO()],
    )
    parallel.check_launch(trainer)
    return trainer


def evaluate(trainer: L.Trainer, module: GRPOKDModule, data: TaskData, tag: str, split: str = "test") -> dict[str, Any]:
    """Greedy accuracy on `split` (test, or val), logged as <split>/<tag>, with its 95% interval (<split>/<tag>_ci95),
    and per component of a `dataset=mix` (<split>/<component>/<tag>); predictions.jsonl (predictions_val.jsonl)."""
    module.eval_tag, module.eval_split, data.evaluated = tag, split, split
    examples = data.val_set if split == "val" else data.test_set
    logged = trainer.test(module, datamodule=data, verbose=False)[0]
    accuracy = float(logged[f"{split}/{tag}"])
    results = {f"{split}/{tag}": accuracy, f"{split}/{tag}_ci95": with_interval(accuracy, len(examples))}
    for name in module.components:
        count = sum(ex.component == name for ex in examples)
        results[f"{split}/{name}/{tag}"] = float(logged[f"{split}/{name}/{tag}"])
        results[f"{split}/{name}/{tag}_ci95"] = with_interval(results[f"{split}/{name}/{tag}"], count)
    return results


def with_interval(accuracy: float, n: int) -> list[float]:
    """The exact binomial 95% interval of an accuracy over `n` problems (each scored 0 or 1), rounded to 4 places."""
    return [round(bound, 4) for bound in binomial_interval(round(accuracy * n), n)]


def write_json(path: Path, payload: dict[str, Any]) -> None:
    """Atomic write (temp file, fsync, rename): a reader sees the old file or the whole new one."""
    runtime.atomic_write(path, json.dumps(payload, indent=2, default=str).encode())


def train(cfg: DictConfig) -> dict[str, Any]:
    """Run one job (train or eval) described by `cfg`; returns what results.json holds.

    With `skip_complete`, a run directory whose results.json says complete is returned as is.
    A SIGTERM or SIGINT ends it with results.json `status: interrupted` and `runtime.Interrupted`.
    """
    runtime.quiet_libraries()
    run_dir = Path(cfg.run_dir)
    if cfg.get("skip_complete"):
        done = runtime.read_results(run_dir)
        if done.get("status") == "complete":
            return {**done, "run_dir": str(run_dir)}  # where it is now (a finished sweep may have been moved)
    prep = prepare(cfg)
    parallel.check_accelerator(cfg.trainer)  # here, not in prepare: a sweep may be planned on one machine and run on another
    share = runtime.CpuShare(cfg.get("threads"))
    try:
        return run_job(cfg, prep, run_dir, share)
    finally:
        share.close()


def run_job(cfg: DictConfig, prep: Prepared, run_dir: Path, share: runtime.CpuShare) -> dict[str, Any]:
    """Build the models and the Trainer, run the stages, write results.json (complete or interrupted)."""
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    clock, stop = runtime.RunClock(time.time()), runtime.GracefulStop(run_dir / "checkpoints")
    module = build_module(cfg, prep, run_dir)
    trainer = build_trainer(cfg, run_dir, [clock, stop, share, runtime.RunIdentity(run_identity(cfg))], prep.resume_step)
    if trainer.world_size > 1:  # Lightning re-seeds each rank with this at every stage: rank r samples with seed + r
        L.seed_everything(cfg.seed + trainer.global_rank, workers=True, verbose=False)
    results: dict[str, Any] = {
        "objective": cfg.objective.name,
        "dataset": cfg.dataset.name,
        "model": cfg.model.student,
        "seed": cfg.seed,
        "mode": cfg.mode,
        **runtime.git_state(),
    }
    try:
        results |= run_stages(cfg, prep, module, trainer, stop, run_dir)
    except Unavailable:  # a served teacher lost mid-run: GracefulStop saved the last whole step
        if stop.lost is None:
            raise
    except SystemExit as exit_:
        # Lightning ends an evaluation on SIGTERM with SIGTERMException and a Ctrl-C outside the training
        # loop (or a second one inside it) with sys.exit(1); GracefulStop covers the training loop itself.
        if not isinstance(exit_, SIGTERMException) and exit_.code != 1:
            raise
        stop.signum = stop.signum or (signal.SIGTERM if isinstance(exit_, SIGTERMException) else signal.SIGINT)
    finally:
        finish_wandb(trainer)  # also when the job fails: the next job of a multirun must not log into this run
        module.engine.close()  # a vLLM engine's memory and its copy of the weights
    results |= {
        "steps": trainer.global_step,
        "wall_time_s": round(clock.elapsed(), 1),
        "test_size": len(prep.data.test_set),
        "val_size": len(prep.data.val_set),
        "run_dir": str(run_dir),
        "status": "complete" if stop.signum is None and stop.lost is None else "interrupted",
    }
    if stop.signum is not None:
        results["signal"] = signal.Signals(stop.signum).name
    if stop.lost is not None:
        results["error"] = stop.lost
    if results["status"] == "interrupted":
        results["checkpoint"] = str(stop.checkpoint) if stop.checkpoint else None
    if trainer.is_global_zero:
        write_json(run_dir / "results.json", results)
    if results["status"] == "interrupted":
        raise runtime.Interrupted(stop.signum, trainer.global_step, stop.checkpoint, stop.lost)
    return results


def finish_wandb(trainer: L.Trainer) -> None:
    """End this job's W&B run. Lightning leaves it open, and the next job of a multirun (same process) would log into it."""
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger) and trainer.is_global_zero and hasattr(logger.experiment, "finish"):
            logger.experiment.finish()


def run_stages(cfg: DictConfig, prep: Prepared, module: GRPOKDModule, trainer: L.Trainer, stop: runtime.GracefulStop,
               run_dir: Path) -> dict[str, Any]:
    """Evaluate (mode=eval), or evaluate before, fit, validate, test and export the student (mode=train)."""
    if cfg.mode == "eval":
        return evaluate(trainer, module, prep.data, "accuracy", cfg.get("eval_split", "test"))
    results: dict[str, Any] = {}
    earlier = runtime.read_results(run_dir) if prep.ckpt_path else {}  # a resumed run keeps the first part's "before"
    if "test/accuracy_before" in earlier:
        results |= {key: earlier[key] for key in ("test/accuracy_before", "test/accuracy_before_ci95") if key in earlier}
    elif cfg.eval_before and cfg.eval_test and prep.ckpt_path is None:
        results |= evaluate(trainer, module, prep.data, "accuracy_before")
    trainer.fit(module, datamodule=prep.data, ckpt_path=prep.ckpt_path)
    if stop.signum is not None:
        return results
    if prep.data.val_set and trainer.limit_val_batches != 0:  # the final greedy val accuracy: what `sweep=tune` selects on
        if module.validated_at != trainer.global_step:  # unless fit validated the final weights at its last step
            trainer.validate(module, datamodule=prep.data, verbose=False)
        logged = trainer.callback_metrics
        results["val/accuracy"] = float(logged["val/accuracy"])
        results["val/accuracy_ci95"] = with_interval(results["val/accuracy"], len(prep.data.val_set))
        results |= {f"val/{name}/accuracy": float(logged[f"val/{name}/accuracy"]) for name in module.components}
    if cfg.eval_test:
        results |= evaluate(trainer, module, prep.data, "accuracy_after")
    results["student_dir"] = str(export_student(trainer, module, run_dir / "student", prep.lora))
    return results


def export_student(trainer: L.Trainer, module: GRPOKDModule, export: Path, lora: LoRA | None) -> Path:
    """The student in Hugging Face format (`save_student`), written by rank 0 from the strategy's full state dict.

    Every rank must call it: under FSDP the state dict gathers the shards (under DDP and in one process it is
    the module's own). A LoRA student is saved from its own weights (FSDP refuses LoRA, so they are whole).
    """
    state = trainer.strategy.lightning_module_state_dict()
    if trainer.is_global_zero:
        prefix = "student."
        weights = None if lora is not None else {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        save_student(module.student, module.tokenizer, export, lora, weights)
    trainer.strategy.barrier("export_student")
    return export
