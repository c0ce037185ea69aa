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

Composition: J' plus the `parts.teacher_agreement` advantage term "ta".
"""

from __future__ import annotations

from typing import Any

from grpokd.objectives.j1 import J1
from grpokd.objectives.terms.teacher_agreement import TeacherAgreement


class J3(J1):
    """J''' loss (paper Eq. 14): J' with A' = A + gamma * norm_G(TA) (Eq. 12-13).

    Args:
        gamma: weight of the teacher-agreement advantage, >= 0; 0 is J'.
        length_normalize: TA from each teacher's token-mean log-prob instead of the sum.
        **j1_args: J1's arguments (lam, tau, kd_states, terms, and GRPO's).
    """

    def __init__(self, gamma: float = 0.1, length_normalize: bool = False, terms: dict | None = None, **j1_args: Any) -> None:
        self.gamma, self.length_normalize = gamma, length_normalize
        ta = TeacherAgreement(gamma, length_normalize, delta=j1_args.get("adv_delta", 1e-4))
        super().__init__(terms={"ta": ta, **(terms or {})}, **j1_args)
