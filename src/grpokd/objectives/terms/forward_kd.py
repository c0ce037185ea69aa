"""Forward multi-teacher Hinton KD, sum_i w_i D_H(T_i || theta) (paper Eq. 7-9, J'), as a loss term."""

from __future__ import annotations

from grpokd.objectives.base import Batch, Needs
from grpokd.objectives.kd import check_kd_args, forward_kd, require_kd
from grpokd.objectives.policy import Term, TermOut
from grpokd.objectives.functional import masked_mean


class ForwardKD(Term):
    """weight * sum_i w_i D_H(T_i || theta) at the KD states; metric `kd`.

    Args:
        weight: lambda, >= 0.
        tau: KD temperature, > 0.
        states: "rollouts" (the sampled completions) | "gold" (the gold solutions, off-policy distillation).
    """

    def __init__(self, weight: float = 0.1, tau: float = 1.0, states: str = "rollouts", key: str = "lam", **schedule) -> None:
        super().__init__(weight, key=key, **schedule)
        check_kd_args(tau, states)
        self.tau, self.states = tau, states

    @property
    def needs(self) -> Needs:
        return Needs(teacher_forward=True, kd_tau=self.tau, kd_states=self.states)

    def __call__(self, batch: Batch) -> TermOut:
        kd = require_kd(batch, self.tau, "forward KD")
        value = forward_kd(kd)  # [N', T']
        return TermOut(value, kd.mask, self.states == "rollouts", {"kd": masked_mean(value, kd.mask).detach()})
