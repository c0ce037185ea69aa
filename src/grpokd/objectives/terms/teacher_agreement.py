"""J'''s teacher-agreement shaper (paper Eq. 12-13): norm_G(TA) added to each completion's advantage.

    TA(o, s) = log sum_i w_i(s) pi_Ti(o | s)                     (Eq. 12)
    A'       = A + gamma * norm_G(TA)                            (Eq. 13)
    loss     = J' loss with A replaced by A'                     (Eq. 14)

J''' (conf/objective/j3.yaml) is J' (j1.yaml: GRPO, the exact KL, forward KD; see `forward_kd`) plus
this term, "ta". A is the reward's group advantage (Eq. 1), w_i(s) the teachers' sequence weights (the
masked mean of the per-position weights, renormalised), norm_G the same group normalisation as A's
(population std + delta). The teachers thus also act as a reward model: within a group, completions
they find likely are pushed up even when every reward ties.

Departures from the paper: KD is a penalty, as in J' (see `forward_kd`); TA is a sequence
log-probability, so long completions dominate it: `length_normalize` uses each teacher's token-mean
log-prob instead (the paper's sum is the default).
"""

from __future__ import annotations

import torch

from grpokd.errors import ConfigError, check_range
from grpokd.objectives.base import Batch, Needs
from grpokd.objectives.kd import group_normalize, sequence_weights, teacher_agreement
from grpokd.objectives.policy import Term, TermOut


class TeacherAgreement(Term):
    """weight * norm_G(TA) per completion, in the advantage. Metrics: ta_mean, ta_std, adv_teacher_std.

    Args:
        weight: gamma, >= 0.
        length_normalize: TA from token-mean log-probs (a departure; the paper sums).
        delta: added to the group std.
        at_sampling_temperature: score the teachers at the sampling temperature (as KDRL's term does) instead of
            1; needed only to combine this term with `teacher_kl` at a sampling temperature other than 1.
    """

    placement = "advantage"

    def __init__(
        self, weight: float = 0.1, length_normalize: bool = False, delta: float = 1e-4,
        at_sampling_temperature: bool = False, **schedule,
    ) -> None:
        super().__init__(weight, **schedule)
        for name, flag in (("length_normalize", length_normalize), ("at_sampling_temperature", at_sampling_temperature)):
            if not isinstance(flag, bool):
                raise ConfigError(f"{name}={flag!r} must be true or false")
        check_range("delta", delta, low=0, low_open=True)
        self.length_normalize, self.delta, self.at_sampling_temperature = length_normalize, delta, at_sampling_temperature

    @property
    def needs(self) -> Needs:
        return Needs(teacher_logp=True, teacher_logp_at_sampling_temperature=self.at_sampling_temperature)

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
