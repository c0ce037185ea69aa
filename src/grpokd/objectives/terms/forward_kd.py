"""Forward multi-teacher Hinton KD, sum_i w_i D_H(T_i || theta) (paper Eq. 7-9, J'), as a loss term.

J' (conf/objective/j1.yaml, paper Eq. 9) is GRPO with the exact KL anchor plus this term, "kd":

    loss = -L_CL + beta * KL_full(theta || ref) + lam * sum_i w_i D_H(T_i || theta)

D_H is the Hinton divergence at temperature tau (Eq. 7-8), w_i the teachers' weights (detached, sum 1).
The teachers' mixture comes in `batch.kd` (built by `grpokd.teachers.TeacherMixer`), so M teachers cost the memory of one.

Departure from the paper: Eq. 9 writes "+ lambda * KD" inside an objective that is maximised, which would
push the student away from the teachers; the text says the student is "encouraged to match" them, so
here KD is a penalty: it is minimised (so is the KD of J''', which contains this term, and the reverse
KD of J'').

Where KD is evaluated: `states="rollouts"` (the sampled completions, the on-policy states) or "gold"
(the gold solutions, classic off-policy distillation). Either way the per-token term is reduced with the
objective's own aggregation over `batch.kd.mask` and added; on the rollouts that equals adding it to
GRPO's per-token loss before aggregation, since every aggregation is linear in the per-token loss.
"""

from __future__ import annotations

from grpokd.objectives.base import Batch, Needs
from grpokd.objectives.functional import masked_mean
from grpokd.objectives.kd import check_kd_args, forward_kd, require_kd
from grpokd.objectives.policy import Term, TermOut


class ForwardKD(Term):
    """weight * sum_i w_i D_H(T_i || theta) at the KD states; metric `kd`.

    Args:
        weight: lambda, >= 0.
        tau: KD temperature, > 0.
        states: "rollouts" (the sampled completions) | "gold" (the gold solutions, off-policy distillation).
    """

    def __init__(self, weight: float = 0.1, tau: float = 1.0, states: str = "rollouts", **schedule) -> None:
        super().__init__(weight, **schedule)
        check_kd_args(tau, states)
        self.tau, self.states = tau, states

    @property
    def needs(self) -> Needs:
        return Needs(teacher_forward=True, kd_tau=self.tau, kd_states=self.states)

    def __call__(self, batch: Batch) -> TermOut:
        kd = require_kd(batch, self.tau, "forward KD")
        value = forward_kd(kd)  # [N', T']
        return TermOut(value, kd.mask, self.states == "rollouts", {"kd": masked_mean(value, kd.mask).detach()})
