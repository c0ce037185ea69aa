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

Composition. `advantages(batch)` and `per_token_loss(batch, adv)` are the
two pieces later objectives override or extend (J' adds a KD term to the
per-token loss, J''' adds a teacher score to the advantage, KDRL adds a
reverse-KL term); `__call__` composes them and aggregates.
"""

from __future__ import annotations

from torch import Tensor

from grpokd.objectives.base import Batch, LossOut, Needs
from grpokd.objectives.terms import (
    ADV_SCALES,
    AGGREGATIONS,
    KL_ESTIMATORS,
    RATIO_LEVELS,
    aggregate,
    check_choice,
    clipped_surrogate,
    group_advantages,
    kl_to_reference,
    log_ratio,
    masked_mean,
)


class GRPO:
    """GRPO loss (paper Eq. 4): -L_CL + beta * KL_k3(theta || ref).

    Args:
        beta: KL coefficient, >= 0; 0 needs no reference model.
        kl_estimator: "k1" | "k2" | "k3" (sampled tokens) | "full" (exact over V).
        epsilon_low, epsilon_high: clip range [1 - epsilon_low, 1 + epsilon_high].
        ratio_level: "token" (DeepSeekMath) | "sequence" (GSPO).
        aggregation: "seq_mean_token_mean" | "token_mean" | "seq_mean_token_sum_norm".
        adv_scale: "group" | "batch" | "none" (Dr. GRPO); the std dividing the advantage.
        adv_delta: added to that std, > 0.
        max_tokens: the constant length of "seq_mean_token_sum_norm" (default: T of the batch).
    """

    def __init__(
        self,
        beta: float = 0.04,
        kl_estimator: str = "k3",
        epsilon_low: float = 0.2,
        epsilon_high: float = 0.2,
        ratio_level: str = "token",
        aggregation: str = "seq_mean_token_mean",
        adv_scale: str = "group",
        adv_delta: float = 1e-4,
        max_tokens: int | None = None,
    ) -> None:
        check_choice("kl_estimator", kl_estimator, KL_ESTIMATORS)
        check_choice("ratio_level", ratio_level, RATIO_LEVELS)
        check_choice("aggregation", aggregation, AGGREGATIONS)
        check_choice("adv_scale", adv_scale, ADV_SCALES)
        if beta < 0:
            raise ValueError(f"beta={beta} must be >= 0")
        if not 0 < epsilon_low < 1:
            raise ValueError(f"epsilon_low={epsilon_low} must be in (0, 1)")
        if epsilon_high <= 0:
            raise ValueError(f"epsilon_high={epsilon_high} must be > 0")
        if adv_delta <= 0:
            raise ValueError(f"adv_delta={adv_delta} must be > 0")
        if max_tokens is not None and max_tokens < 1:
            raise ValueError(f"max_tokens={max_tokens} must be >= 1 or None")
        self.beta = beta
        self.kl_estimator = kl_estimator
        self.epsilon_low = epsilon_low
        self.epsilon_high = epsilon_high
        self.ratio_level = ratio_level
        self.aggregation = aggregation
        self.adv_scale = adv_scale
        self.adv_delta = adv_delta
        self.max_tokens = max_tokens

    @property
    def needs(self) -> Needs:
        """Rollouts always; reference log-probs for a sampled KL, full logits for the exact KL."""
        use_kl = self.beta > 0
        full = use_kl and self.kl_estimator == "full"
        return Needs(rollouts=True, ref_logp=use_kl and not full, ref_logits=full, logits=full)

    def advantages(self, batch: Batch) -> Tensor:
        """Group-relative advantage of each completion (Eq. 1), detached. Returns [N]."""
        if batch.rewards is None:
            raise ValueError("GRPO needs batch.rewards")
        adv = group_advantages(batch.rewards, batch.group_size, self.adv_scale, self.adv_delta)  # [N]
        return adv.detach()

    def reduce(self, per_token: Tensor, mask: Tensor) -> Tensor:
        """This objective's aggregation of a per-token loss [N, T] to a scalar []."""
        return aggregate(per_token, mask, self.aggregation, self.max_tokens)

    def per_token_loss(self, batch: Batch, adv: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """-clipped surrogate + beta * KL at each token, and detached scalar metrics.

        Args:
            batch: logp, mask, old_logp (None: on-policy), and the KL's inputs when beta > 0.
            adv: [N] advantages (or [N, T] per-token ones, e.g. KDRL's k1 placement).

        Returns:
            (per-token loss [N, T], metrics: policy_loss, clip_low, clip_high, clip_region, kl if beta > 0).
        """
        mask = batch.mask  # [N, T]
        old_logp = batch.old_logp if batch.old_logp is not None else batch.logp.detach()  # [N, T]
        log_rho = log_ratio(batch.logp, old_logp, mask, self.ratio_level)  # [N, T]
        surrogate, is_low, is_high = clipped_surrogate(log_rho, adv, self.epsilon_low, self.epsilon_high)
        per_token = -surrogate  # [N, T]
        metrics = {
            "policy_loss": self.reduce(per_token, mask).detach(),
            "clip_low": masked_mean(is_low.float(), mask).detach(),
            "clip_high": masked_mean(is_high.float(), mask).detach(),
            "clip_region": masked_mean((is_low | is_high).float(), mask).detach(),
        }
        if self.beta > 0:
            kl = kl_to_reference(batch, self.kl_estimator)  # [N, T]
            per_token = per_token + self.beta * kl  # [N, T]
            metrics["kl"] = masked_mean(kl, mask).detach()
        return per_token, metrics

    def __call__(self, batch: Batch) -> LossOut:
        adv = self.advantages(batch)  # [N]
        per_token, metrics = self.per_token_loss(batch, adv)  # [N, T]
        return LossOut(loss=self.reduce(per_token, batch.mask), metrics=metrics, adv=adv)
