"""An entropy bonus: -entropy of the sampling policy at each rollout token, as a loss term."""

from __future__ import annotations

from grpokd.objectives.base import Batch, Needs
from grpokd.objectives.logits import per_position
from grpokd.objectives.policy import Term, TermOut
from grpokd.objectives.functional import entropy, masked_mean


class EntropyBonus(Term):
    """weight * (-H(pi_theta)) at each rollout token (minimising it raises the entropy); metric `entropy_bonus`."""

    def __init__(self, weight: float = 0.01, key: str = "entropy_coef", **schedule) -> None:
        super().__init__(weight, key=key, **schedule)

    @property
    def needs(self) -> Needs:
        return Needs(logits=True)

    def __call__(self, batch: Batch) -> TermOut:
        if batch.logits is None:
            raise ValueError("the entropy bonus needs batch.logits")
        ent = per_position(batch.logits, entropy)  # [N, T] of the sampling policy
        return TermOut(-ent, batch.mask, metrics={"entropy_bonus": masked_mean(ent.detach(), batch.mask)})
