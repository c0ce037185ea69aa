"""SFT: supervised fine-tuning on the gold solutions, the baseline (and how the embedded models are trained).

loss = -sum_{i,t} logp_{i,t} mask_{i,t} / sum_{i,t} mask_{i,t}: the token-mean
negative log-likelihood of the gold solution tokens (every token weighs the
same, as in the usual cross-entropy with ignored padding).
"""

from __future__ import annotations

from grpokd.objectives.base import Batch, LossOut, Needs
from grpokd.objectives.functional import masked_mean


class SFT:
    """Token-mean NLL of the gold solution; needs no rollouts, no reference, no teachers."""

    @property
    def needs(self) -> Needs:
        """Score the gold solutions instead of sampling completions."""
        return Needs(rollouts=False)

    def __call__(self, batch: Batch) -> LossOut:
        loss = -masked_mean(batch.logp, batch.mask)  # []
        return LossOut(loss=loss, metrics={"nll": loss.detach()})
