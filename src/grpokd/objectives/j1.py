"""J' (paper Eq. 9): GRPO with an exact KL anchor to the reference and a multi-teacher forward-KD penalty.

    loss = -L_CL + beta * KL_full(theta || ref) + lam * sum_i w_i D_H(T_i || theta)

L_CL is GRPO's clipped surrogate (Eq. 2) with the group advantage (Eq. 1),
KL_full the exact per-position KL over the vocabulary (Eq. 6; any of GRPO's
estimators is an option), D_H the Hinton divergence at temperature tau
(Eq. 7-8) and w_i the teachers' weights (detached, sum 1). The teachers'
mixture comes in `batch.kd` (see `kd.TeacherMixer`), so M teachers cost the
memory of one.

Departure from the paper (DESIGN.md): Eq. 9 writes "+ lambda * KD" inside an
objective that is maximised, which would push the student away from the
teachers; the text says the student is "encouraged to match" them, so here
KD is a penalty: it is minimised.

Where KD is evaluated: `kd_states="rollouts"` (the sampled completions, the
on-policy states) or `"gold"` (the gold solutions, classic off-policy
distillation). Either way the KD per-token term is reduced with this
objective's own aggregation over `batch.kd.mask` and added to GRPO's loss;
for rollouts that equals adding it to GRPO's per-token loss before
aggregation, since every aggregation is linear in the per-token loss.

Composition: `loss_with_advantages(batch, adv)` is GRPO's per-token loss
and reduction for given advantages plus the KD term; `__call__` feeds it
`advantages(batch)`, and J''' feeds it A' = A + gamma * norm_G(TA).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from torch import Tensor

from grpokd.objectives.base import Batch, LossOut, Needs
from grpokd.objectives.grpo import GRPO
from grpokd.objectives.kd import check_kd_args, forward_kd, require_kd
from grpokd.objectives.terms import masked_mean


class J1(GRPO):
    """J' loss (paper Eq. 9): -L_CL + beta * KL_full(theta || ref) + lam * sum_i w_i D_H(T_i || theta).

    Args:
        lam: KD coefficient lambda, >= 0; 0 is GRPO and needs no teachers.
        tau: KD temperature, > 0.
        kd_states: "rollouts" | "gold", where KD is evaluated.
        kl_estimator: GRPO's, default "full" (the paper's Eq. 6).
        **grpo_args: the rest of GRPO's arguments (beta, epsilon_low, epsilon_high,
            ratio_level, aggregation, adv_scale, adv_delta, max_tokens).
    """

    def __init__(
        self,
        lam: float = 0.1,
        tau: float = 1.0,
        kd_states: str = "rollouts",
        kl_estimator: str = "full",
        **grpo_args: Any,
    ) -> None:
        super().__init__(kl_estimator=kl_estimator, **grpo_args)
        if lam < 0:
            raise ValueError(f"lam={lam} must be >= 0")
        check_kd_args(tau, kd_states)
        self.lam = lam
        self.tau = tau
        self.kd_states = kd_states

    @property
    def needs(self) -> Needs:
        """GRPO's, plus the teachers' forward mixture at the KD states when lam > 0."""
        return replace(super().needs, teacher_forward=self.lam > 0, kd_tau=self.tau, kd_states=self.kd_states)

    def loss_with_advantages(self, batch: Batch, adv: Tensor) -> LossOut:
        """GRPO's loss for the advantages `adv` [N] plus lam times the aggregated forward KD."""
        per_token, metrics = self.per_token_loss(batch, adv)  # [N, T]
        loss = self.reduce(per_token, batch.mask)  # []
        if self.lam > 0:
            kd = require_kd(batch, self.tau, "J1 with lam > 0")
            kd_per_token = forward_kd(kd)  # [N', T']
            loss = loss + self.lam * self.reduce(kd_per_token, kd.mask)  # []
            metrics["kd"] = masked_mean(kd_per_token, kd.mask).detach()
        return LossOut(loss=loss, metrics=metrics, adv=adv)

    def __call__(self, batch: Batch) -> LossOut:
        return self.loss_with_advantages(batch, self.advantages(batch))
