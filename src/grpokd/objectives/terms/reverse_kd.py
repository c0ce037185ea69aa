"""Reverse multi-teacher Hinton KD, sum_i w_i D_H(theta || T_i): the teachers as the KL anchor (J'', Eq. 11)."""

from __future__ import annotations

from grpokd.objectives.base import Batch, Needs
from grpokd.objectives.kd import check_kd_args, require_kd, reverse_kd
from grpokd.objectives.policy import Term, TermOut
from grpokd.objectives.functional import masked_mean


class ReverseKD(Term):
    """weight * sum_i w_i D_H(theta || T_i) at the KD states; metric `kd_reverse`.

    Args:
        weight: beta', >= 0.
        tau: KD temperature, > 0.
        states: "rollouts" | "gold".
    """

    def __init__(self, weight: float = 0.04, tau: float = 1.0, states: str = "rollouts", key: str = "beta_prime", **schedule) -> None:
        super().__init__(weight, key=key, **schedule)
        check_kd_args(tau, states)
        self.tau, self.states = tau, states

    @property
    def needs(self) -> Needs:
        return Needs(teacher_reverse=True, kd_tau=self.tau, kd_states=self.states)

    def __call__(self, batch: Batch) -> TermOut:
        kd = require_kd(batch, self.tau, "reverse KD")
        value = reverse_kd(kd)  # [N', T']
        return TermOut(value, kd.mask, self.states == "rollouts", {"kd_reverse": masked_mean(value, kd.mask).detach()})
