"""Scoring: what one training step needs scored, and the scores packed into the objective's `Batch`.

The student runs with grad on the rollout (and on the gold solutions when KD is evaluated there); the frozen
models (`FrozenModels`: the reference and the teachers) run under no_grad, only for what the objective's
`Needs` ask. A step's request travels as one `ScoreRequest`; `score` answers it with the `Batch`, the
logging metrics and the `FrozenScores`, which later updates on the same rollout reuse.

Logits are whole [N, T, V] tensors, or with `logit_chunk` the student's and the reference's are
`ChunkedLogits` that every term reads `logit_chunk` positions at a time (`objectives.logits.per_position`).
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from transformers import PreTrainedModel

from grpokd.models.lm import Tokens, completion_logits, head_skipped, token_logp
from grpokd.models.student import adapters_off
from grpokd.objectives.base import Batch, KDStates, Needs
from grpokd.objectives.functional import entropy, masked_mean
from grpokd.objectives.logits import ChunkedLogits, Logits, per_position
from grpokd.rollout import Rollout
from grpokd.teachers import Mixture, TeacherEnsemble, score_teachers


class FrozenModels(torch.nn.Module):
    """The no-grad models an objective may need besides the student: the reference and the teachers.

    A submodule of the LightningModule, so that Lightning moves it with the student and FSDP can shard or
    replicate it (`trainer=fsdp`), but never trained and never checkpointed: its parameters do not
    require grad, it stays in eval mode whatever `train()` asks, and it adds nothing to `state_dict` (the
    models are reloaded from their source on resume, so a checkpoint holds the student alone and does not grow
    with the teachers); loading a state dict without its keys, as every checkpoint is, is not an error.

    With `reference_adapters_off`, `reference` is the LoRA-wrapped student itself, scored with its adapters
    disabled: its base model, the student as loaded, without a second copy in memory. It is then held but
    not registered here, since it is the student: trained, checkpointed and placed as such.
    """

    def __init__(self, reference: PreTrainedModel | None = None, teachers: TeacherEnsemble | None = None, reference_adapters_off: bool = False) -> None:
        super().__init__()
        if reference_adapters_off:
            self.__dict__["reference"] = reference  # a plain attribute, not a submodule: requires_grad_(False) must not reach it
        else:
            self.reference = reference
        self.teachers = teachers
        self.reference_adapters_off = reference_adapters_off
        self.requires_grad_(False)
        self.eval()
        self._prefix = ""  # where the last load_state_dict found this module (its keys' prefix)
        self.register_load_state_dict_pre_hook(self._note_prefix)
        self.register_load_state_dict_post_hook(self._forgive_missing)

    def reference_scope(self) -> contextlib.AbstractContextManager:
        """The context in which `reference` scores as the reference policy."""
        return adapters_off(self.reference) if self.reference_adapters_off else contextlib.nullcontext()

    def models(self) -> list[torch.nn.Module]:
        """The frozen models, each a unit that FSDP may shard: the reference (unless it is the student), then each
        teacher held in this process."""
        teachers = [t for t in self.teachers.teachers if any(True for _ in t.parameters())] if self.teachers is not None else []  # served ones hold none
        own_reference = self.reference is not None and not self.reference_adapters_off
        return ([self.reference] if own_reference else []) + teachers

    def train(self, mode: bool = True) -> "FrozenModels":
        return super().train(False)

    def state_dict(self, *args: Any, destination: dict | None = None, prefix: str = "", keep_vars: bool = False) -> dict:
        return {} if destination is None else destination

    def _note_prefix(self, module: torch.nn.Module, state_dict: dict, prefix: str, *args: Any) -> None:
        self._prefix = prefix

    def _forgive_missing(self, module: torch.nn.Module, incompatible: Any) -> None:
        incompatible.missing_keys[:] = [k for k in incompatible.missing_keys if not k.startswith(self._prefix)]


@dataclass(frozen=True)
class FrozenScores:
    """What the reference and the teachers say about one rollout: computed once, reused by every update on it.

    Shapes: N completions, T tokens, V vocabulary, M teachers; the mixture is at the KD states
    (the rollout, or the gold solutions [B, T', ...]).
    """

    ref_logp: Tensor | None = None  # [N, T]
    ref_logits: Tensor | None = None  # [N, T, V]
    teacher_logp: Tensor | None = None  # [M, N, T]
    teacher_weights: Tensor | None = None  # [M, N, T]
    mixture: Mixture | None = None  # (pbar, neg_entropy, lbar)
    metrics: dict[str, Tensor] = field(default_factory=dict)  # per-teacher KL and weight


@dataclass(frozen=True)
class ScoreRequest:
    """What one optimiser step needs scored.

    `temperature`: the policy terms' (the sampling temperature for rollouts, 1 for gold ones); KD terms read the
    student's raw logits, tempered by their own tau. `gold`: the prompts' gold solutions, when KD is evaluated
    on them or the weighting needs them. `old_logp` [N, T]: the behaviour policy's log-probs (None: on-policy).
    `frozen_scores`: what an earlier update on the same rollout got from the frozen models (None: score them now).
    `importance_cap`: with a rollout engine that reports its log-probs, weight each token's policy loss by
    min(pi_old / pi_engine, cap) (truncated importance sampling; None: no weight).
    """

    rollout: Rollout
    needs: Needs
    step: int = 0
    temperature: float = 1.0
    gold: Rollout | None = None
    old_logp: Tensor | None = None
    frozen_scores: FrozenScores | None = None
    importance_cap: float | None = None


def score(
    student: PreTrainedModel, request: ScoreRequest, frozen: FrozenModels | None = None,
    vocab_size: int | None = None, logit_chunk: int | None = None,
) -> tuple[Batch, dict[str, Tensor], FrozenScores]:
    """The objective's `Batch`, detached logging metrics (entropy, per-teacher KL and weight, the seconds the
    reference and the teachers took: `frozen_time_s`), and the frozen scores.

    The student runs once with grad on the rollout (and once more on the gold solutions only when KD is
    evaluated there). The reference and each teacher run under no_grad, only when the request's needs ask for
    them, unless it carries their scores. `vocab_size`: the tokenizer's length (logits are sliced to it);
    `logit_chunk`: score the student and the reference that many positions at a time, never holding their
    [N, T, V] logits with grad. What the frozen models hand the terms (the teachers' mixtures, the reference's
    logits for the exact KL) is held whole, without grad.
    """
    rollout, needs, gold = request.rollout, request.needs, request.gold
    ids, mask = rollout.completions.ids, rollout.completions.mask.float()  # [N, T]
    raw = logits_for(student, rollout.prompts, rollout.completions, vocab_size, logit_chunk)  # [N, T, V], whole or chunked
    logits = raw / request.temperature  # [N, T, V]
    logp, token_entropy = per_position(logits, logp_and_entropy, ids)  # [N, T]
    gold_raw = logits_for(student, gold.prompts, gold.completions, vocab_size, logit_chunk) if needs.kd_on_gold else None  # [B, T', V] with grad
    frozen_scores, frozen_time = request.frozen_scores, 0.0  # 0 s on a minibatch that reuses its frozen scores
    if frozen_scores is None:
        start = time.perf_counter()
        frozen_scores = score_frozen(raw.detach(), request, frozen or FrozenModels(), vocab_size, gold_raw, logit_chunk)
        frozen_time = time.perf_counter() - start
    behaviour_weight, engine_metrics = engine_correction(request, logp, mask)
    with torch.no_grad():
        metrics = {"entropy": masked_mean(token_entropy, mask), "frozen_time_s": torch.tensor(frozen_time)} | frozen_scores.metrics | engine_metrics
    parts = weights = None
    if needs.reward_parts:  # in reward_weights' order: the names every part has a weight under
        names = list(rollout.reward_weights)
        parts = torch.stack([rollout.reward_parts[name] for name in names])  # [F, N]
        weights = torch.tensor([rollout.reward_weights[name] for name in names], device=parts.device)  # [F]
    kd = None
    if frozen_scores.mixture is not None:
        states, kd_raw = (gold, gold_raw) if needs.kd_on_gold else (rollout, raw)
        kd = KDStates(kd_raw, states.completions.mask.float(), needs.kd_tau, *frozen_scores.mixture)
    batch = Batch(
        logp=logp,  # [N, T]
        mask=mask,
        group_size=rollout.group_size,
        rewards=rollout.rewards,
        reward_parts=parts,
        reward_weights=weights,
        old_logp=request.old_logp,
        behaviour_weight=behaviour_weight,
        logits=logits if needs.logits else None,
        entropy=token_entropy if needs.entropy else None,
        ref_logp=frozen_scores.ref_logp,
        ref_logits=frozen_scores.ref_logits,
        teacher_logp=frozen_scores.teacher_logp,
        teacher_weights=frozen_scores.teacher_weights,
        kd=kd,
        step=request.step,
    )
    return batch, metrics, frozen_scores


@torch.no_grad()
def engine_correction(request: ScoreRequest, logp: Tensor, mask: Tensor) -> tuple[Tensor | None, dict[str, Tensor]]:
    """How far the rollout engine's log-probs of its samples are from the trainer's pi_old (the request's
    old_logp, or the student's own on the first update), and the truncated importance weights
    min(exp(old - engine), cap) [N, T] when `importance_cap` is set (TRL's vLLM importance-sampling correction).

    Metrics (train/engine/...): logp_gap, the mean |log pi_old - log pi_engine| over the completion tokens, and
    logp_gap_max; is_weight_mean with a cap. Nothing when the engine reports no log-probs."""
    engine_logp = request.rollout.engine_logp
    if engine_logp is None:
        return None, {}
    old = request.old_logp if request.old_logp is not None else logp.detach()  # [N, T]
    gap = (old - engine_logp) * mask  # [N, T]
    metrics = {"engine/logp_gap": masked_mean(gap.abs(), mask), "engine/logp_gap_max": gap.abs().max()}
    if request.importance_cap is None:
        return None, metrics
    weight = gap.exp().clamp(max=request.importance_cap) * mask  # [N, T]
    return weight, metrics | {"engine/is_weight_mean": masked_mean(weight, mask)}


@torch.no_grad()
def score_frozen(
    student_raw: Logits, request: ScoreRequest, frozen: FrozenModels, vocab_size: int | None,
    gold_raw: Logits | None = None, logit_chunk: int | None = None,
) -> FrozenScores:
    """The reference's and the teachers' scores of the request's rollout, as its needs ask (the student's logits
    feed the per-teacher KL metrics only)."""
    rollout, needs = request.rollout, request.needs
    ref_logp = ref_logits = None
    if needs.reference:
        if frozen.reference is None:
            raise ValueError("the objective needs a reference model but none was loaded")
        with frozen.reference_scope():
            if needs.ref_logits:
                ref_logits = completion_logits(frozen.reference, rollout.prompts, rollout.completions, vocab_size) / request.temperature  # [N, T, V]
                ref_logp = token_logp(ref_logits, rollout.completions.ids) if needs.ref_logp else None  # [N, T]
            else:
                ref_logp = policy_logp(frozen.reference, rollout, vocab_size, request.temperature, logit_chunk)  # [N, T]
    if not needs.teachers:
        return FrozenScores(ref_logp, ref_logits)
    if frozen.teachers is None:
        raise ValueError("the objective needs teachers but none were loaded")
    teacher_logp, weights, mixture, metrics = score_teachers(
        frozen.teachers, needs, student_raw, rollout, request.gold, gold_raw, request.temperature, vocab_size,
    )
    return FrozenScores(ref_logp, ref_logits, teacher_logp, weights, mixture, metrics)


@torch.no_grad()
def policy_logp(model: PreTrainedModel, rollout: Rollout, vocab_size: int | None, temperature: float, logit_chunk: int | None = None) -> Tensor:
    """A policy's log-probs of the completion tokens at `temperature`, without grad, [N, T]: the reference's, or
    pi_old's (the student that sampled them, before any update on them); `logit_chunk` positions at a time."""
    logits = logits_for(model, rollout.prompts, rollout.completions, vocab_size, logit_chunk) / temperature  # [N, T, V]
    return per_position(logits, token_logp, rollout.completions.ids)


def logits_for(model: PreTrainedModel, prompts: Tokens, completions: Tokens, vocab_size: int | None, chunk: int | None = None) -> Logits:
    """A model's logits at the completion positions, as scoring reads them: `completion_logits` [N, T, V], or with
    `chunk` the same logits as `ChunkedLogits`: the model runs to its final hidden states [N, T, H] (its output
    head made the identity by `head_skipped`), and the head is applied `chunk` positions at a time wherever the
    logits are used (`objectives.logits.per_position`)."""
    if not chunk:
        return completion_logits(model, prompts, completions, vocab_size)
    with head_skipped(model) as head:
        hidden = completion_logits(model, prompts, completions)  # [N, T, H]: the head is the identity here
    return ChunkedLogits(hidden, head.weight, head.bias, vocab_size, chunk)


def logp_and_entropy(logits: Tensor, ids: Tensor) -> tuple[Tensor, Tensor]:
    """log softmax(logits) at `ids` (with grad) and the entropy there (detached): [.., V], [..] -> [..], [..]."""
    with torch.no_grad():
        ent = entropy(logits)
    return token_logp(logits, ids), ent
