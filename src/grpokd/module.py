"""The LightningModule: rollout -> reward -> score -> objective -> log; greedy evaluation.

Only the student is a registered submodule (trained, checkpointed, wrapped by
DDP). Frozen models the objective needs (the reference) are held aside: they
are moved to the student's device when used, never enter the optimizer or
the checkpoint, and are reloaded from their source on resume.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import grad_norm
from torch import Tensor
from torchmetrics import MeanMetric
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from grpokd import rollout as ro
from grpokd.models.ensemble import TeacherEnsemble


@dataclass(frozen=True)
class Optim:
    """AdamW with linear warm-up to a constant learning rate."""

    lr: float = 1e-4
    weight_decay: float = 0.0
    warmup_steps: int = 0
    betas: tuple[float, float] = (0.9, 0.999)


class GRPOKDModule(L.LightningModule):
    """Trains `student` with `objective`; scores greedy accuracy on val/test.

    Args:
        student: the policy (seq2seq or causal).
        tokenizer: shared by every model.
        objective: callable Batch -> LossOut with a `needs` attribute.
        reward: (completion text, gold answer) -> 0/1.
        sampling: rollout settings (K, lengths, temperature...).
        optim: optimiser settings.
        reference: frozen reference policy, only when the objective needs one.
        teachers: the teacher ensemble, only when the objective needs teachers.
        samples_every: log a table of sample completions every this many steps (0: never).
        samples_dir: where samples.jsonl is written (besides W&B tables).
    """

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
    ) -> None:
        super().__init__()
        self.student = student
        self.tokenizer = tokenizer
        self.objective = objective
        self.reward = reward
        self.sampling = sampling
        self.optim = optim
        self.frozen = ro.Frozen(reference, teachers)  # not submodules: not in the optimizer or the checkpoint
        self.samples_every = samples_every
        self.samples_dir = Path(samples_dir) if samples_dir is not None else None
        self.vocab_size = len(tokenizer)
        self.eval_tag = "accuracy"  # test metric key: test/<eval_tag>
        self.val_accuracy = MeanMetric()
        self.test_accuracy = MeanMetric()
        self._step_start = 0.0  # perf_counter at the start of the current training batch
        self._step_tokens = 0.0  # prompt + completion tokens processed in it

    # --- training -------------------------------------------------------------------------------

    def frozen_on_device(self) -> ro.Frozen:
        """The frozen models, moved to the student's device on first use."""
        reference, teachers = self.frozen.reference, self.frozen.teachers
        if reference is not None and next(reference.parameters()).device != self.device:
            reference.to(self.device)
        if teachers is not None:
            teachers.to(self.device)
        return self.frozen

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        self._step_start = time.perf_counter()

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        """Step time from batch start to after the optimiser step (sampling, scoring, backward, update)."""
        elapsed = time.perf_counter() - self._step_start
        self.log_dict({"train/step_time_s": elapsed, "train/tokens_per_s": self._step_tokens / elapsed}, batch_size=1)

    def training_step(self, examples: dict[str, list[str]], batch_idx: int) -> Tensor:
        needs = self.objective.needs
        gold = ro.gold(self.tokenizer, examples, self.sampling, self.device) if ro.needs_gold(needs, self.frozen.teachers) else None
        if needs.rollouts:
            rollout = ro.sample(self.student, self.tokenizer, examples, self.sampling, self.reward)
            temperature = self.sampling.temperature
        else:
            rollout, temperature = gold, 1.0
        batch, score_metrics = ro.score(
            self.student, rollout, needs, self.vocab_size, self.global_step, self.frozen_on_device(), temperature, gold
        )
        out = self.objective(batch)
        self._step_tokens = float(rollout.completions.mask.sum() + rollout.prompts.mask.sum() * rollout.group_size)
        metrics = {"loss": out.loss.detach(), **score_metrics, **out.metrics, **ro.rollout_metrics(rollout)}
        metrics["lr"] = torch.tensor(self.optimizers().param_groups[0]["lr"])
        self.log_dict({f"train/{k}": v.float() for k, v in metrics.items()}, batch_size=len(examples["prompt"]))
        self.log("reward", metrics.get("reward_mean", out.loss.detach()), prog_bar=True, logger=False, batch_size=1)
        if self.samples_every and self.global_step % self.samples_every == 0:
            self.log_samples(rollout, out.adv)
        return out.loss

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        norms = grad_norm(self.student, norm_type=2)
        if "grad_2.0_norm_total" in norms:
            self.log("train/grad_norm", norms["grad_2.0_norm_total"])

    def log_samples(self, rollout: ro.Rollout, adv: Tensor | None, limit: int = 8) -> None:
        """A table of sample completions with reward and advantage: W&B table and samples.jsonl."""
        prompts = self.tokenizer.batch_decode(rollout.prompts.ids, skip_special_tokens=True)
        rows = []
        for i, text in enumerate(rollout.texts[:limit]):
            rows.append({
                "step": self.global_step,
                "prompt": prompts[i // rollout.group_size],
                "completion": text,
                "answer": rollout.answers[i],
                "reward": None if rollout.rewards is None else float(rollout.rewards[i]),
                "adv": None if adv is None else float(adv[i]),
            })
        if self.samples_dir is not None and self.trainer.is_global_zero:
            self.samples_dir.mkdir(parents=True, exist_ok=True)
            with open(self.samples_dir / "samples.jsonl", "a") as f:
                f.writelines(json.dumps(r) + "\n" for r in rows)
        for logger in self.loggers:
            if isinstance(logger, WandbLogger):
                columns = list(rows[0])
                logger.log_table(key="train/samples", columns=columns, data=[[r[c] for c in columns] for r in rows], step=self.global_step)

    def configure_optimizers(self) -> dict:
        opt = torch.optim.AdamW(self.student.parameters(), lr=self.optim.lr, weight_decay=self.optim.weight_decay, betas=tuple(self.optim.betas))
        warmup = self.optim.warmup_steps
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / (warmup + 1)))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # --- evaluation -----------------------------------------------------------------------------

    def greedy_rewards(self, examples: dict[str, list[str]]) -> Tensor:
        return ro.greedy_rewards(self.student, self.tokenizer, examples, self.reward, self.sampling)

    def validation_step(self, examples: dict[str, list[str]], batch_idx: int) -> None:
        self.val_accuracy.update(self.greedy_rewards(examples))
        self.log("val/accuracy", self.val_accuracy, prog_bar=True, batch_size=len(examples["prompt"]))

    def test_step(self, examples: dict[str, list[str]], batch_idx: int) -> None:
        self.test_accuracy.update(self.greedy_rewards(examples))
        self.log(f"test/{self.eval_tag}", self.test_accuracy, batch_size=len(examples["prompt"]))

    # --- checkpoints: RNG state, no frozen models -------------------------------------------------

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["rng"] = {
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "python": random.getstate(),
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        rng = checkpoint.get("rng")
        if rng is None:
            return
        torch.set_rng_state(rng["torch"])
        if rng["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
        random.setstate(rng["python"])
