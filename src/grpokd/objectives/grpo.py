"""GRPO: group-relative policy optimisation with a KL anchor to a reference model.

The loss minimised is the paper's Eq. 4 (DeepSeekMath GRPO):

    loss = aggregate( -min(rho A, clip(rho, 1-eps_low, 1+eps_high) A) + beta * KL(theta || ref) )

with A the group-relative advantage of each completion (Eq. 1), rho the
importance ratio pi_theta / pi_old per token (or per sequence, GSPO-style),
and KL estimated per token with k3 = r - log r - 1, r = pi_ref / pi_theta
(Eq. 3) by default; k1, k2 or the exact full-vocabulary KL (Eq. 6) are
options. beta = 0 drops the KL term and needs no reference model.

Reduction. `aggregation` is the one explicit place where GRPO variants
differ in how much each token weighs (see `terms.aggregate`):
"seq_mean_token_mean" (GRPO, default; short completions' tokens weigh more),
"token_mean" (DAPO), "seq_mean_token_sum_norm" (Dr. GRPO; pair it with
adv_scale="none"). epsilon_high > epsilon_low is DAPO's clip-higher; GSPO
(ratio_level="sequence") uses much smaller epsilons (~3e-4 / 4e-4).

One update per rollout. When batch.old_logp is None the rollout policy is
the current one: old_logp = logp.detach(), so rho = exp(logp - logp.detach())
is 1 in value (nothing is clipped, the surrogate equals A) but its gradient
is rho * grad logp = grad logp: the loss is then the policy-gradient
estimator -A * grad logp, weighted by the aggregation.

Composition. GRPO is the `PolicyObjective` (grpokd.objectives.policy) with
one term, "kl", the KL to the reference (`parts.kl_reference`); the other
objectives add terms to it.
"""

from __future__ import annotations

from typing import Any

from grpokd.objectives.terms.kl_reference import KLToReference
from grpokd.objectives.policy import PolicyObjective


class GRPO(PolicyObjective):
    """GRPO loss (paper Eq. 4): -L_CL + beta * KL_k3(theta || ref).

    Args:
        beta: KL coefficient, >= 0; 0 needs no reference model.
        kl_estimator: "k1" | "k2" | "k3" (sampled tokens) | "full" (exact over V).
        terms: further terms (name -> Term) besides "kl".
        **surrogate_args: `PolicyObjective`'s (epsilon_low, epsilon_high, ratio_level, aggregation,
            adv_scale, adv_delta, max_tokens, reward_weight).
    """

    def __init__(self, beta: float = 0.04, kl_estimator: str = "k3", terms: dict | None = None, **surrogate_args: Any) -> None:
        self.beta, self.kl_estimator = beta, kl_estimator
        super().__init__(terms={"kl": KLToReference(beta, kl_estimator), **(terms or {})}, **surrogate_args)
