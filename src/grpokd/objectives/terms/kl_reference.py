"""KL(theta || ref) per token, GRPO's anchor (paper Eq. 3 with k3, Eq. 6 exact), as a loss term."""

from __future__ import annotations

from grpokd.objectives.base import Batch, Needs
from grpokd.objectives.policy import Term, TermOut
from grpokd.objectives.functional import KL_ESTIMATORS, check_choice, kl_to_reference, masked_mean


class KLToReference(Term):
    """weight * KL(theta || ref) at each rollout token; metric `kl`.

    Args:
        weight: beta, >= 0; 0 needs no reference model.
        estimator: "k1" | "k2" | "k3" (sampled tokens) | "full" (exact over V).
    """

    def __init__(self, weight: float = 0.04, estimator: str = "k3", key: str = "beta", **schedule) -> None:
        super().__init__(weight, key=key, **schedule)
        check_choice("kl_estimator", estimator, KL_ESTIMATORS)
        self.estimator = estimator

    @property
    def needs(self) -> Needs:
        full = self.estimator == "full"
        return Needs(ref_logp=not full, ref_logits=full, logits=full)

    def __call__(self, batch: Batch) -> TermOut:
        kl = kl_to_reference(batch, self.estimator)  # [N, T]
        return TermOut(kl, batch.mask, metrics={"kl": masked_mean(kl, batch.mask).detach()})
