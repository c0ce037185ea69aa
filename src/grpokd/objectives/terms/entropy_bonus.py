"""An entropy bonus: -entropy of the sampling policy at each rollout token, as a loss term.

TGPO's entropy bonus (see `teacher_guide`), on any objective: `+term@objective.terms.entropy=entropy_bonus
objective.terms.entropy.weight=0.001`. Its weight is named `entropy_coef` in error messages.
"""

from __future__ import annotations

from grpokd.objectives.base import Batch, Needs
from grpokd.objectives.functional import entropy, masked_mean
from grpokd.objectives.logits import per_position
from grpokd.objectives.policy import Term, TermOut


class EntropyBonus(Term):
    """weight * (-H(pi_theta)) at each rollout token (minimising it raises the entropy); metric `entropy_bonus`."""

    def __init__(self, weight: float = 0.01, **schedule) -> None:
        super().__init__(weight, **schedule)

    @property
    def needs(self) -> Needs:
        return Needs(logits=True)

    def __call__(self, batch: Batch) -> TermOut:
        if batch.logits is None:
            raise ValueError("the entropy bonus needs batch.logits")
        ent = per_position(batch.logits, entropy)  # [N, T] of the sampling policy
        return TermOut(-ent, batch.mask, metrics={"entropy_bonus": masked_mean(ent.detach(), batch.mask)})
