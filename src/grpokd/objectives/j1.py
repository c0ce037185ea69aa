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

Composition: GRPO plus the `parts.forward_kd` term "kd".
"""

from __future__ import annotations

from typing import Any

from grpokd.objectives.grpo import GRPO
from grpokd.objectives.terms.forward_kd import ForwardKD


class J1(GRPO):
    """J' loss (paper Eq. 9): -L_CL + beta * KL_full(theta || ref) + lam * sum_i w_i D_H(T_i || theta).

    Args:
        lam: KD coefficient lambda, >= 0; 0 is GRPO and needs no teachers.
        tau: KD temperature, > 0.
        kd_states: "rollouts" | "gold", where KD is evaluated.
        kl_estimator: GRPO's, default "full" (the paper's Eq. 6).
        **grpo_args: the rest of GRPO's arguments (beta, terms, and the surrogate's).
    """

    def __init__(
        self, lam: float = 0.1, tau: float = 1.0, kd_states: str = "rollouts", kl_estimator: str = "full",
        terms: dict | None = None, **grpo_args: Any,
    ) -> None:
        self.lam, self.tau, self.kd_states = lam, tau, kd_states
        kd = ForwardKD(lam, tau, kd_states)
        super().__init__(kl_estimator=kl_estimator, terms={"kd": kd, **(terms or {})}, **grpo_args)
