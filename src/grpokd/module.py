"""The LightningModule: rollout -> reward -> score -> objective -> log; greedy evaluation.

Several updates per rollout (GRPO's mu, TRL's num_iterations): with
`updates_per_rollout` = mu and `minibatches` = b, a rollout is sampled every
mu * b optimiser steps; its behaviour log-probs (pi_old) are scored once under
no_grad, then each step trains on one of its b minibatches (whole groups), b
steps per pass, mu passes. The reference's and teachers' scores of a minibatch
are computed on its first use and reused. The prompt batches the data stream
delivers between rollouts are skipped, so a resumed run stays on the same
stream; the pending rollout and its pi_old are saved in the checkpoint.

Only the student is trained and checkpointed. The frozen models the objective
needs (the reference, the teachers) are the submodule `frozen` (`scoring.FrozenModels`):
Lightning places them with the student and FSDP may shard them, but they never
enter the optimizer or the checkpoint, and are reloaded from their source on
resume. A LoRA student's reference can be its own base model (adapters
disabled), which is no extra model. The optimiser holds only the trainable
parameters (with LoRA: the adapters).
"""

from __future__ import annotations

import json
import math
import random
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities.warnings import PossibleUserWarning
from torch import Tensor
from torchmetrics import MeanMetric
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from grpokd import evaluation, parallel, runtime
from grpokd import rollout as ro
from grpokd.data.rewards import WeightedRewards
from grpokd.errors import check_range
from grpokd.models.engines import RolloutEngine
from grpokd.models.engines.builtin import Builtin
from grpokd.scoring import FrozenModels, ScoreRequest, policy_logp, score
from grpokd.teachers import TeacherEnsemble

# The frozen models stay in eval mode on purpose (scoring.FrozenModels); Lightning would count them at every fit.
warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode at the start of training", category=PossibleUserWarning)


@dataclass(frozen=True)
class Optim:
    """How the student is optimised: Hydra `_partial_` configs `optim` and `scheduler`, instantiated.

    `optimizer(params)` builds the optimiser over the trainable parameters; `scheduler(optimizer)`, when set,
    its per-step learning-rate schedule (logged as train/lr by LearningRateMonitor).
    """

    optimizer: Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer]
    scheduler: Callable[[torch.optim.Optimizer], torch.optim.lr_scheduler.LRScheduler] | None = None


def warmup_constant(optimizer: torch.optim.Optimizer, warmup_steps: int = 0) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up from lr / (warmup_steps + 1) at the first step to lr after `warmup_steps` steps, then constant.

    transformers' get_constant_schedule_with_warmup is the same ramp shifted by one step: its first step has
    lr 0 and changes nothing. This one is kept so that the measured tables (docs/results.md) reproduce; any
    transformers schedule plugs in as `scheduler._target_=transformers.get_cosine_schedule_with_warmup`.
    """
    check_range("scheduler.warmup_steps", warmup_steps, low=0, integer=True)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / (warmup_steps + 1)))


class GRPOKDModule(L.LightningModule):
    """Trains `student` with `objective`; scores greedy accuracy on val/test.

    Args:
        student: the policy (seq2seq or causal).
        tokenizer: shared by every model.
        objective: callable Batch -> LossOut with a `needs` attribute.
        reward: (completion text, gold answer) -> 0/1, the correctness that greedy evaluation scores.
        sampling: rollout settings (K, lengths, temperature...).
        optim: optimiser settings.
        reference: frozen reference policy, only when the objective needs one.
        reference_adapters_off: the reference is the LoRA-wrapped student's base model (its adapters disabled);
            `reference` is then not given.
        teachers: the teacher ensemble, only when the objective needs teachers.
        samples_every: log a table of sample completions every this many steps (0: never).
        samples_dir: where samples.jsonl (training samples) and predictions.jsonl (test evaluations) are written
            (besides W&B tables).
        updates_per_rollout: optimiser passes over each rollout (mu >= 1; 1: on-policy, no pi_old).
        minibatches: each pass splits the rollout's prompts into this many minibatches, one step each.
        train_reward: the rollouts' reward, a weighted sum of named functions (default: `reward` alone).
        mask_truncated_completions: completions that hit max_new_tokens get no loss at all (their mask is zeroed).
        eval_pass_k: also log val/pass@k, k completions per val prompt sampled at the rollout settings (0: off).
        logit_chunk: score the student and the reference this many completion positions at a time, never holding
            their [N, T, V] logits (`scoring.score`); None: whole.
        components: the datasets of a `dataset=mix` run: each gets train/<name>/reward_mean,
            val/<name>/accuracy and test/<name>/accuracy (nothing extra for one dataset).
        engine: what samples rollouts and evaluations (`models.engines`; None: the built-in decoder).
        sync_every: the engine takes the student's weights before it samples, when this many optimiser steps
            have passed since it last took them (1: every rollout samples the current policy).
        importance_cap: weight each token's policy loss by min(pi_old / pi_engine, cap), truncated importance
            sampling for an engine whose log-probs differ from the trainer's (None: no correction).
    """

    flops_per_batch = None  # for ThroughputMonitor: a step's FLOPs depend on the sampled lengths, so none are claimed

    def __init__(
        self,
        student: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        objective: Any,
        reward: Callable[[str, str], float],
        sampling: ro.Sampling,
        optim: Optim,
        reference: PreTrainedModel | None = None,
        teachers: TeacherEnsemble | None = None,
        samples_every: int = 50,
        samples_dir: str | Path | None = None,
        updates_per_rollout: int = 1,
        minibatches: int = 1,
        train_reward: WeightedRewards | None = None,
        mask_truncated_completions: bool = False,
        eval_pass_k: int = 0,
        logit_chunk: int | None = None,
        reference_adapters_off: bool = False,
        components: list[str] = (),
        engine: RolloutEngine | None = None,
        sync_every: int = 1,
        importance_cap: float | None = None,
    ) -> None:
        super().__init__()
        if updates_per_rollout < 1 or minibatches < 1:
            raise ValueError(f"updates_per_rollout={updates_per_rollout} and minibatches={minibatches} must be >= 1")
        if reference_adapters_off and reference is not None:
            raise ValueError("reference_adapters_off: the reference is the student's base model; pass no other reference")
        self.student = student
        self.tokenizer = tokenizer
        self.objective = objective
        self.reward = reward
        self.sampling = sampling
        self.optim = optim
        # a submodule, never trained or checkpointed (a base-model reference is the student itself, not registered there)
        self.frozen = FrozenModels(student if reference_adapters_off else reference, teachers, reference_adapters_off)
        self.samples_every = samples_every
        self.samples_dir = Path(samples_dir) if samples_dir is not None else None
        self.vocab_size = len(tokenizer)
        self.eval_tag = "accuracy"  # test metric key: <eval_split>/<eval_tag>
        self.eval_split = "test"  # the split trainer.test scores: test, or val (mode=eval eval_split=val)
        self.val_accuracy = MeanMetric()
        self.validated_at: int | None = None  # the optimiser step whose weights the last validation scored (None: none yet)
        self.test_accuracy = MeanMetric()
        self._step_start = 0.0  # perf_counter at the start of the current training batch
        self._step_tokens = 0.0  # prompt + completion tokens processed in it
        self._step_metrics: dict[str, Tensor] = {}  # the current step's training metrics, logged after its update
        self._step_metrics_at = 0  # the step they belong to (the optimiser steps taken before it)
        self.updates_per_rollout, self.minibatches = updates_per_rollout, minibatches
        self.buffer: ro.RolloutBuffer | None = None  # the rollout being reused (several updates per rollout)
        self.train_reward = WeightedRewards.of(train_reward or reward)
        self.mask_truncated_completions = mask_truncated_completions
        self.eval_pass_k = eval_pass_k
        self.logit_chunk = logit_chunk
        self.val_pass = MeanMetric()
        self.components = list(components) if len(components) > 1 else []
        self.val_by_component = torch.nn.ModuleDict({name: MeanMetric() for name in self.components})
        self.test_by_component = torch.nn.ModuleDict({name: MeanMetric() for name in self.components})
        self._predictions: list[dict[str, Any]] = []  # the current test evaluation's prediction rows on this rank
        self.engine = engine or Builtin()
        self.sync_every, self.importance_cap = sync_every, importance_cap
        self._synced_at = 0  # the optimiser step whose weights the engine holds (it starts from the weights it first samples with)

    # --- training -------------------------------------------------------------------------------

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        self._step_start = time.perf_counter()

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        """The update (Lightning's, which runs `training_step` and backward in its closure), then the step's
        training metrics (`log_train`), with its grad norm and its time from batch start to after the update.

        Under DDP: the ranks' mean step time and the sum of their token rates (the job's throughput).
        """
        super().optimizer_step(*args, **kwargs)
        elapsed = time.perf_counter() - self._step_start
        timing = {"step_time_s": torch.tensor(elapsed), "tokens_per_s": torch.tensor(self._step_tokens / elapsed)}
        self.log_train(self._step_metrics | timing, self._step_metrics_at)

    @property
    def steps_per_rollout(self) -> int:
        return self.updates_per_rollout * self.minibatches

    def new_rollout(self, examples: dict[str, list[str]]) -> ro.RolloutBuffer:
        """Sample (or take the gold solutions of) `examples`; pi_old's log-probs when the rollout is reused."""
        needs = self.objective.needs
        teachers = self.frozen.teachers
        with_gold = needs.gold(teachers is not None and teachers.weighting.needs_gold)
        gold = ro.gold(self.tokenizer, examples, self.sampling, self.device) if with_gold else None
        rollout = ro.sample(self.student, self.tokenizer, examples, self.sampling, self.train_reward, self.synced_engine()) if needs.rollouts else gold
        if self.mask_truncated_completions and needs.rollouts:
            rollout = ro.mask_truncated(rollout)
        old_logp = None
        if self.steps_per_rollout > 1:
            old_logp = policy_logp(self.student, rollout, self.vocab_size, self.temperature(needs), self.logit_chunk)
        return ro.RolloutBuffer(rollout, gold, old_logp)

    def synced_engine(self) -> RolloutEngine:
        """The rollout engine, given the student's weights first when `sync_every` steps have passed since it took them."""
        if self.global_step - self._synced_at >= self.sync_every:
            self.engine.sync(self.student)
            self._synced_at = self.global_step
        return self.engine

    def temperature(self, needs) -> float:
        """Rollouts are scored at the sampling temperature, gold solutions at 1."""
        return self.sampling.temperature if needs.rollouts else 1.0

    def training_step(self, examples: dict[str, list[str]], batch_idx: int) -> Tensor:
        needs = self.objective.needs
        phase = self.global_step % self.steps_per_rollout
        sample_time = 0.0  # on a step that reuses its rollout
        if phase == 0 or self.buffer is None:
            sampling = time.perf_counter()
            self.buffer = self.new_rollout(examples)
            sample_time = time.perf_counter() - sampling
        part = phase % self.minibatches
        rollout, gold, old_logp = self.buffer.minibatch(part, self.minibatches)
        request = ScoreRequest(rollout, needs, self.global_step, self.temperature(needs), gold, old_logp, self.buffer.scores.get(part), self.importance_cap)
        batch, score_metrics, self.buffer.scores[part] = score(self.student, request, self.frozen, self.vocab_size, self.logit_chunk)
        out = self.objective(batch)
        self._step_tokens = float(rollout.completions.mask.sum() + rollout.prompts.mask.sum() * rollout.group_size)
        metrics = {"loss": out.loss.detach(), **score_metrics, **out.metrics, **ro.rollout_metrics(rollout, self.components),
                   "sample_time_s": torch.tensor(sample_time)}
        self._step_metrics, self._step_metrics_at = metrics, self.global_step  # logged once the update is done (`optimizer_step`)
        self.log("reward", metrics.get("reward_mean", out.loss.detach()), prog_bar=True, logger=False, batch_size=1, sync_dist=True)
        if self.samples_every and self.global_step % self.samples_every == 0:
            self.log_samples(rollout, out.adv)
        return out.loss

    def log_train(self, metrics: dict[str, Tensor], step: int) -> None:
        """train/<name> for each metric: stacked into one tensor, reduced over ranks in one collective
        (`parallel.reduce_over_ranks`), put in `trainer.callback_metrics` (for callbacks that monitor them) and
        handed to the loggers in one call at `step`, every `trainer.log_every_n_steps` steps as Lightning logs.

        Not `self.log`: Lightning's result collection costs about half a millisecond per key and step, a tenth of
        a small model's step at twenty keys, for epoch aggregation that per-step values do not use.
        """
        names = [f"train/{k}" for k in metrics]
        local = torch.stack([v.detach().float().reshape(()).to(self.device) for v in metrics.values()])  # [n]
        values = parallel.reduce_over_ranks(self.all_gather(local).reshape(-1, len(names)), names)  # [n]
        self.trainer.callback_metrics.update(zip(names, values))
        if (step + 1) % self.trainer.log_every_n_steps == 0 or self.trainer.should_stop:
            floats = {name: value for name, value in zip(names, values.tolist()) if not math.isnan(value) or not name.endswith("/reward_mean")}
            floats["epoch"] = self.current_epoch  # a component no rank sampled this step (NaN) is left out
            for logger in self.loggers:
                logger.log_metrics(floats, step=step)

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """The gradient's 2-norm before clipping (after DDP's all-reduce: the same on every rank)."""
        grads = [p.grad for p in self.student.parameters() if p.grad is not None]
        if grads:
            self._step_metrics["grad_norm"] = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))

    def log_samples(self, rollout: ro.Rollout, adv: Tensor | None, limit: int = 8) -> None:
        """A table of sample completions with reward and advantage: W&B table and samples.jsonl.

        The first `limit` completions of every rank, with its `rank` (under DDP each rank samples its own prompts).
        """
        prompts = rollout.prompt_texts  # as rendered (the chat template's special tokens included)
        rows = []
        for i, text in enumerate(rollout.texts[:limit]):
            rows.append({
                "step": self.global_step,
                "rank": self.global_rank,
                "prompt": prompts[i // rollout.group_size],
                "completion": text,
                "answer": rollout.answers[i],
                "reward": None if rollout.rewards is None else float(rollout.rewards[i]),
                "adv": None if adv is None else float(adv[i]),
            })
        rows = [row for rank_rows in parallel.gather(rows) for row in rank_rows]
        if self.samples_dir is not None and self.trainer.is_global_zero:
            self.samples_dir.mkdir(parents=True, exist_ok=True)
            with open(self.samples_dir / "samples.jsonl", "a") as f:
                f.writelines(json.dumps(r) + "\n" for r in rows)
        for logger in self.loggers:
            if isinstance(logger, WandbLogger):
                columns = list(rows[0])
                logger.log_table(key="train/samples", columns=columns, data=[[r[c] for c in columns] for r in rows], step=self.global_step)

    def configure_optimizers(self) -> Any:
        opt = self.optim.optimizer([p for p in self.student.parameters() if p.requires_grad])
        if self.optim.scheduler is None:
            return opt
        return {"optimizer": opt, "lr_scheduler": {"scheduler": self.optim.scheduler(opt), "interval": "step", "name": "train/lr"}}

    # --- evaluation -----------------------------------------------------------------------------

    def greedy(self, examples: dict[str, list[str]]) -> evaluation.Greedy:
        return evaluation.greedy(self.student, self.tokenizer, examples, self.reward, self.sampling, self.synced_engine())

    def validation_step(self, examples: dict[str, list[str]], batch_idx: int) -> None:
        rewards = self.greedy(examples).rewards
        self.val_accuracy.update(rewards)
        self.log("val/accuracy", self.val_accuracy, prog_bar=True, batch_size=len(examples["prompt"]))
        self.log_by_component("val", "accuracy", self.val_by_component, examples, rewards)
        if self.eval_pass_k:
            seed = 7919 * self.global_step + batch_idx  # the same samples for the same checkpoint
            self.val_pass.update(evaluation.pass_at_k(self.student, self.tokenizer, examples, self.reward, self.sampling, self.eval_pass_k, seed,
                                                      self.synced_engine()))
            self.log(f"val/pass@{self.eval_pass_k}", self.val_pass, batch_size=len(examples["prompt"]))

    def on_validation_epoch_end(self) -> None:
        if not self.trainer.sanity_checking:
            self.validated_at = self.global_step

    def log_by_component(self, split: str, tag: str, metrics: torch.nn.ModuleDict, examples: dict[str, list], rewards: Tensor) -> None:
        """<split>/<component>/<tag>: each component's mean reward over the epoch (epoch-level: a batch may lack a component)."""
        for name, metric in metrics.items():
            rows = torch.tensor([c == name for c in examples["component"]], device=rewards.device)  # [B]
            if rows.any():
                metric.update(rewards[rows])
            self.log(f"{split}/{name}/{tag}", metric, on_step=False, on_epoch=True, batch_size=int(rows.sum()))

    def on_test_epoch_start(self) -> None:
        self._predictions = []

    def test_step(self, examples: dict[str, list[str]], batch_idx: int) -> None:
        result = self.greedy(examples)
        self.test_accuracy.update(result.rewards)
        self.log(f"{self.eval_split}/{self.eval_tag}", self.test_accuracy, batch_size=len(examples["prompt"]))
        self.log_by_component(self.eval_split, self.eval_tag, self.test_by_component, examples, result.rewards)
        world, done = self.trainer.world_size, len(self._predictions)  # rank r of W evaluates examples r, r+W, ...
        indices = [(done + j) * world + self.global_rank for j in range(len(result.completions))]
        self._predictions += evaluation.prediction_rows(examples, result, self.reward, indices)

    def on_test_epoch_end(self) -> None:
        """The test evaluation's predictions, one JSON line per problem in split order: <run_dir>/predictions.jsonl
        (predictions_before.jsonl for the evaluation before training, predictions_val.jsonl for mode=eval
        eval_split=val), and a W&B table <split>/predictions."""
        rows = sorted((row for rank_rows in parallel.gather(self._predictions) for row in rank_rows), key=lambda row: row["index"])
        if not rows:
            return
        name = "predictions_before.jsonl" if self.eval_tag == "accuracy_before" else "predictions.jsonl" if self.eval_split == "test" else "predictions_val.jsonl"
        if self.samples_dir is not None and self.trainer.is_global_zero:
            runtime.atomic_write(self.samples_dir / name, "".join(json.dumps(row) + "\n" for row in rows).encode())
        for logger in self.loggers:
            if isinstance(logger, WandbLogger):
                columns = list(rows[0])
                logger.log_table(key=f"{self.eval_split}/predictions/{self.eval_tag}", columns=columns, data=[[r[c] for c in columns] for r in rows])

    # --- checkpoints: each rank's RNG state and pending rollout, no frozen models -------------------

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Per-rank lists, in rank order: under DDP rank r resumes with its own rollout and random stream."""
        if self.buffer is not None and self.steps_per_rollout > 1:  # mid-rollout: its next updates need it
            checkpoint["rollout_buffer"] = parallel.gather(self.buffer.state())
        rng = {
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "python": random.getstate(),
        }
        checkpoint["rng"] = parallel.gather(rng)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        buffer = parallel.rank_entry(checkpoint.get("rollout_buffer"), self.global_rank)
        if buffer is not None:
            self.buffer = ro.RolloutBuffer.from_state(buffer, self.device)
        rng = parallel.rank_entry(checkpoint.get("rng"), self.global_rank)
        if rng is None:
            return
        torch.set_rng_state(rng["torch"])
        if rng["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
        random.setstate(rng["python"])
