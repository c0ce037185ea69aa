"""J'' (paper Eq. 11): GRPO whose KL anchor is the teacher ensemble instead of a reference model.

    loss = -L_CL + beta_prime * sum_i w_i D_H(theta || T_i)

L_CL is GRPO's clipped surrogate (Eq. 2) with the group advantage (Eq. 1);
D_H(theta || T_i) the reverse Hinton divergence at temperature tau (Eq. 7-8,
with the student first, as the KL(theta || ref) it replaces), w_i the
teachers' weights (detached, sum 1). There is no reference model: the
reverse-KD mixture lbar = sum_i w_i log p_i comes in `batch.kd` (see
`kd.TeacherMixer`). The paper's "+ beta'" regulariser is a penalty here as
GRPO's KL is (DESIGN.md): it is minimised.

Where KD is evaluated: `kd_states="rollouts"` (the sampled completions, where
GRPO's KL is evaluated) or `"gold"`; either way the per-token term is reduced
with this objective's aggregation over `batch.kd.mask` and added.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from grpokd.objectives.base import Batch, LossOut, Needs
from grpokd.objectives.grpo import GRPO
from grpokd.objectives.kd import check_kd_args, require_kd, reverse_kd
from grpokd.objectives.terms import masked_mean


class J2(GRPO):
    """J'' loss (paper Eq. 11): -L_CL + beta_prime * sum_i w_i D_H(theta || T_i); no reference model.

    Args:
        beta_prime: coefficient of the teacher anchor, >= 0; 0 is GRPO without any KL.
        tau: KD temperature, > 0.
        kd_states: "rollouts" | "gold", where the anchor is evaluated.
        **surrogate_args: GRPO's surrogate arguments (epsilon_low, epsilon_high, ratio_level,
            aggregation, adv_scale, adv_delta, max_tokens); not beta or kl_estimator.
    """

    def __init__(
        self, beta_prime: float = 0.04, tau: float = 1.0, kd_states: str = "rollouts", **surrogate_args: Any
    ) -> None:
        for key in ("beta", "kl_estimator"):
            if key in surrogate_args:
                raise ValueError(f"{key} is not an argument of J2 (no reference model); the anchor is beta_prime")
        super().__init__(beta=0.0, **surrogate_args)
        if beta_prime < 0:
            raise ValueError(f"beta_prime={beta_prime} must be >= 0")
        check_kd_args(tau, kd_states)
        self.beta_prime = beta_prime
        self.tau = tau
        self.kd_states = kd_states

    @property
    def needs(self) -> Needs:
        """Rollouts and, when beta_prime > 0, the teachers' reverse mixture; never a reference model."""
        return replace(super().needs, teacher_reverse=self.beta_prime > 0, kd_tau=self.tau, kd_states=self.kd_states)

    def __call__(self, batch: Batch) -> LossOut:
        out = super().__call__(batch)
        if self.beta_prime == 0:
            return out
        kd = require_kd(batch, self.tau, "J2 with beta_prime > 0")
        kd_per_token = reverse_kd(kd)  # [N', T']
        loss = out.loss + self.beta_prime * self.reduce(kd_per_token, kd.mask)  # []
        metrics = {**out.metrics, "kd_reverse": masked_mean(kd_per_token, kd.mask).detach()}
        return LossOut(loss=loss, metrics=metrics, adv=out.adv)
