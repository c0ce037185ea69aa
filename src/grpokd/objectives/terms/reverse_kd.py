"""Reverse multi-teacher Hinton KD, sum_i w_i D_H(theta || T_i): the teachers as the KL anchor (J'', Eq. 11).

J'' (conf/objective/j2.yaml) is GRPO whose KL anchor is the teacher ensemble instead of a reference model:

    loss = -L_CL + beta_prime * sum_i w_i D_H(theta || T_i)

D_H(theta || T_i) is the reverse Hinton divergence at temperature tau (Eq. 7-8, the student first, as in
the KL(theta || ref) it replaces), w_i the teachers' weights (detached, sum 1). There is no reference
model: the reverse-KD mixture lbar = sum_i w_i log p_i comes in `batch.kd` (built by `grpokd.teachers.TeacherMixer`). The
paper's "+ beta'" regulariser is a penalty here, as GRPO's KL is: it is minimised. Where it is evaluated
(`states`: "rollouts", where GRPO's KL is, or "gold") and how it is reduced are as for `forward_kd`.
"""

from __future__ import annotations

from grpokd.objectives.base import Batch, Needs
from grpokd.objectives.functional import masked_mean
from grpokd.objectives.kd import check_kd_args, require_kd, reverse_kd
from grpokd.objectives.policy import Term, TermOut


class ReverseKD(Term):
    """weight * sum_i w_i D_H(theta || T_i) at the KD states; metric `kd_reverse`.

    Args:
        weight: beta', >= 0.
        tau: KD temperature, > 0.
        states: "rollouts" | "gold".
    """

    def __init__(self, weight: float = 0.04, tau: float = 1.0, states: str = "rollouts", **schedule) -> None:
        super().__init__(weight, **schedule)
        check_kd_args(tau, states)
        self.tau, self.states = tau, states

    @property
    def needs(self) -> Needs:
        return Needs(teacher_reverse=True, kd_tau=self.tau, kd_states=self.states)

    def __call__(self, batch: Batch) -> TermOut:
        kd = require_kd(batch, self.tau, "reverse KD")
        value = reverse_kd(kd)  # [N', T']
        return TermOut(value, kd.mask, self.states == "rollouts", {"kd_reverse": masked_mean(value, kd.mask).detach()})
