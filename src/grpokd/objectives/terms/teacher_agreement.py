"""J'''s teacher-agreement shaper (paper Eq. 12-13): norm_G(TA) added to each completion's advantage.

    TA(o, s) = log sum_i w_i(s) pi_Ti(o | s),    A' = A + gamma * norm_G(TA)

w_i(s) the teachers' sequence weights (the masked mean of the per-position weights, renormalised),
norm_G the group normalisation (population std + delta). Within a group, completions the teachers
find likely are pushed up even when every reward ties. TA is a sequence log-probability, so long
completions dominate it; `length_normalize` uses each teacher's token-mean log-prob instead.
"""

from __future__ import annotations

import torch

from grpokd.objectives.base import Batch, Needs
from grpokd.objectives.kd import group_normalize, sequence_weights, teacher_agreement
from grpokd.objectives.policy import Term, TermOut


class TeacherAgreement(Term):
    """weight * norm_G(TA) per completion, in the advantage. Metrics: ta_mean, ta_std, adv_teacher_std.

    Args:
        weight: gamma, >= 0.
        length_normalize: TA from token-mean log-probs (a departure; the paper sums).
        delta: added to the group std.
        tempered: score the teachers at the sampling temperature (as KDRL's term does) instead of 1;
            needed only to combine this term with `teacher_kl` at a sampling temperature other than 1.
    """

    placement = "advantage"

    def __init__(
        self, weight: float = 0.1, length_normalize: bool = False, delta: float = 1e-4, tempered: bool = False,
        key: str = "gamma", **schedule,
    ) -> None:
        super().__init__(weight, key=key, **schedule)
        if not isinstance(length_normalize, bool):
            raise ValueError(f"length_normalize={length_normalize!r} must be true or false")
        if delta <= 0:
            raise ValueError(f"delta={delta} must be > 0")
        self.length_normalize, self.delta, self.tempered = length_normalize, delta, tempered

    @property
    def needs(self) -> Needs:
        return Needs(teacher_logp=True, teacher_logp_tempered=self.tempered)

    def __call__(self, batch: Batch) -> TermOut:
        if batch.teacher_logp is None:
            raise ValueError("the teacher-agreement advantage needs batch.teacher_logp")
        weights = batch.teacher_weights
        if weights is None:  # uniform
            weights = torch.full_like(batch.teacher_logp, 1.0 / batch.teacher_logp.shape[0])  # [M, N, T]
        ta = teacher_agreement(batch.teacher_logp, sequence_weights(weights, batch.mask), batch.mask, self.length_normalize)  # [N]
        value = group_normalize(ta, batch.group_size, self.delta).detach()  # [N]
        shaped = self.coefficient(batch.step) * value
        metrics = {"ta_mean": ta.mean(), "ta_std": ta.std(unbiased=False), "adv_teacher_std": shaped.std(unbiased=False)}
        return TermOut(value, metrics=metrics)
