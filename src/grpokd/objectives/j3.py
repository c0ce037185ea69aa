"""J''' (paper Eq. 12-14): J' with a teacher-agreement term in the advantage.

    TA(o, s) = log sum_i w_i(s) pi_Ti(o | s)                     (Eq. 12)
    A'       = A + gamma * norm_G(TA)                            (Eq. 13)
    loss     = J' loss with A replaced by A'                     (Eq. 14)

A is the reward's group advantage (Eq. 1), norm_G the same group
normalisation applied to TA (population std, + adv_delta), w_i(s) the
teachers' sequence-level weights (the masked mean of the per-position
weights, renormalised). The teachers thus also act as a reward model: within
a group, completions the ensemble finds likely are pushed up even when all
rewards tie.

Departures from the paper (DESIGN.md): KD is a penalty, as in J' (the paper's
"+ lambda KD" in a maximised objective would repel the teachers); TA is a
sequence log-probability, so long completions dominate it:
`length_normalize=True` uses each teacher's token-mean log-prob instead (the
paper's sum is the default).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor

from grpokd.objectives.base import Batch, LossOut, Needs
from grpokd.objectives.j1 import J1
from grpokd.objectives.kd import group_normalize, sequence_weights, teacher_agreement


@dataclass(frozen=True)
class AdvantageParts:
    """The two parts of A' = reward + teacher, and the agreement they come from. Shapes [N], detached."""

    reward: Tensor  # A, the reward's group advantage
    teacher: Tensor  # gamma * norm_G(TA)
    agreement: Tensor  # TA


class J3(J1):
    """J''' loss (paper Eq. 14): J' with A' = A + gamma * norm_G(TA) (Eq. 12-13).

    Args:
        gamma: weight of the teacher-agreement advantage, >= 0; 0 is J'.
        length_normalize: TA from each teacher's token-mean log-prob instead of the sum.
        **j1_args: J1's arguments (lam, tau, kd_states, and GRPO's).
    """

    def __init__(self, gamma: float = 0.1, length_normalize: bool = False, **j1_args: Any) -> None:
        super().__init__(**j1_args)
        if gamma < 0:
            raise ValueError(f"gamma={gamma} must be >= 0")
        if not isinstance(length_normalize, bool):
            raise ValueError(f"length_normalize={length_normalize!r} must be true or false")
        self.gamma = gamma
        self.length_normalize = length_normalize

    @property
    def needs(self) -> Needs:
        """J1's, plus each teacher's log-probs of the sampled tokens (and weights) when gamma > 0."""
        return replace(super().needs, teacher_logp=self.gamma > 0)

    def advantage_parts(self, batch: Batch) -> AdvantageParts:
        """A, gamma * norm_G(TA) and TA for each completion ([N] each, detached)."""
        reward = super().advantages(batch)  # [N]
        if batch.teacher_logp is None:
            raise ValueError("J3 with gamma > 0 needs batch.teacher_logp")
        weights = batch.teacher_weights
        if weights is None:  # uniform
            weights = torch.full_like(batch.teacher_logp, 1.0 / batch.teacher_logp.shape[0])  # [M, N, T]
        seq_weights = sequence_weights(weights, batch.mask)  # [M, N]
        ta = teacher_agreement(batch.teacher_logp, seq_weights, batch.mask, self.length_normalize)  # [N]
        teacher = self.gamma * group_normalize(ta, batch.group_size, self.adv_delta)  # [N]
        return AdvantageParts(reward=reward, teacher=teacher.detach(), agreement=ta)

    def advantages(self, batch: Batch) -> Tensor:
        """A' = A + gamma * norm_G(TA) (Eq. 13), detached. Returns [N]."""
        if self.gamma == 0:
            return super().advantages(batch)
        parts = self.advantage_parts(batch)
        return parts.reward + parts.teacher  # [N]

    def __call__(self, batch: Batch) -> LossOut:
        if self.gamma == 0:
            return super().__call__(batch)
        parts = self.advantage_parts(batch)
        out = self.loss_with_advantages(batch, parts.reward + parts.teacher)
        metrics = {
            **out.metrics,
            "ta_mean": parts.agreement.mean(),
            "ta_std": parts.agreement.std(unbiased=False),
            "adv_reward_std": parts.reward.std(unbiased=False),
            "adv_teacher_std": parts.teacher.std(unbiased=False),
        }
        return replace(out, metrics=metrics)
