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
Composition: the `PolicyObjective` with the `parts.reverse_kd` term "kd_reverse" and no KL to a reference.
"""

from __future__ import annotations

from typing import Any

from grpokd.objectives.terms.reverse_kd import ReverseKD
from grpokd.objectives.policy import PolicyObjective


class J2(PolicyObjective):
    """J'' loss (paper Eq. 11): -L_CL + beta_prime * sum_i w_i D_H(theta || T_i); no reference model.

    Args:
        beta_prime: coefficient of the teacher anchor, >= 0; 0 is GRPO without any KL.
        tau: KD temperature, > 0.
        kd_states: "rollouts" | "gold", where the anchor is evaluated.
        **surrogate_args: `PolicyObjective`'s (terms, epsilon_low, epsilon_high, ratio_level, aggregation,
            adv_scale, adv_delta, max_tokens); not beta or kl_estimator.
    """

    def __init__(
        self, beta_prime: float = 0.04, tau: float = 1.0, kd_states: str = "rollouts", terms: dict | None = None, **surrogate_args: Any
    ) -> None:
        for key in ("beta", "kl_estimator"):
            if key in surrogate_args:
                raise ValueError(f"{key} is not an argument of J2 (no reference model); the anchor is beta_prime")
        self.beta_prime, self.tau, self.kd_states = beta_prime, tau, kd_states
        anchor = ReverseKD(beta_prime, tau, kd_states)
        super().__init__(terms={"kd_reverse": anchor, **(terms or {})}, **surrogate_args)
