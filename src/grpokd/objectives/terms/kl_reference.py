"""KL(theta || ref) per token, GRPO's anchor (paper Eq. 3 with k3, Eq. 6 exact), as a loss term.

GRPO (conf/objective/grpo.yaml, paper Eq. 4) is the surrogate plus this term, "kl". The estimators, with
r = pi_ref / pi_theta at the sampled token: k1 = -log r, k2 = (log r)^2 / 2, k3 = r - log r - 1 (unbiased,
>= 0; Eq. 3, the default); "full" is the exact per-position KL over the vocabulary (Eq. 6; j1's). Weight
beta = 0 drops the term and needs no reference model.
"""

from __future__ import annotations

from grpokd.objectives.base import Batch, Needs
from grpokd.objectives.functional import KL_ESTIMATORS, check_choice, kl_to_reference, masked_mean
from grpokd.objectives.policy import Term, TermOut


class KLToReference(Term):
    """weight * KL(theta || ref) at each rollout token; metric `kl`.

    Args:
        weight: beta, >= 0; 0 needs no reference model.
        estimator: "k1" | "k2" | "k3" (sampled tokens) | "full" (exact over V).
    """

    def __init__(self, weight: float = 0.04, estimator: str = "k3", **schedule) -> None:
        super().__init__(weight, **schedule)
        check_choice("estimator", estimator, KL_ESTIMATORS)
        self.estimator = estimator

    @property
    def needs(self) -> Needs:
        full = self.estimator == "full"
        return Needs(ref_logp=not full, ref_logits=full, logits=full)

    def __call__(self, batch: Batch) -> TermOut:
        kl = kl_to_reference(batch, self.estimator)  # [N, T]
        return TermOut(kl, batch.mask, metrics={"kl": masked_mean(kl, batch.mask).detach()})
