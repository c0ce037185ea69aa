"""A policy-gradient objective as a composition: an advantage, the clipped surrogate, weighted per-token terms.

    A_i      = reward_weight * A_group(R)_i + sum_{s in sequence shapers} c_s * s_i           (one per completion)
    A_i,t    = A_i + sum_{s in token shapers} c_s * s_i,t                                     (per token)
    loss     = aggregate( -min(rho A, clip(rho) A) + sum_{terms on the rollout} c_j * l_j )
               + sum_{terms on the gold solutions} c_j * aggregate_gold(l_j)

A_group is GRPO's group-relative advantage (paper Eq. 1), rho the importance
ratio pi_theta / pi_old (Eq. 2), `aggregate` GRPO's reduction (see
`functional.aggregate`). Every addition is a `Term`: a small pure module with its
own `Needs`, a coefficient c (constant or linearly decayed with the step),
and a placement:
- "loss": a per-token loss l [N, T] on the rollout (or [N', T'] on the gold
  solutions), e.g. the KL to the reference, forward/reverse Hinton KD, the
  reverse KL to the teachers, TGPO's guide, an entropy bonus;
- "advantage": a detached value added to the advantage, per completion [N]
  (J'''s teacher agreement) or per token [N, T] (KDRL's k1 placement,
  on-policy distillation).

The surrogate (DeepSeekMath GRPO, paper Eq. 2 and 4). A_group(R)_i =
(R_i - mean_G R) / (std_G R + adv_delta), population std (`adv_scale`:
"group", "batch", or "none", Dr. GRPO, which keeps the reward scale); rho is
per token, or per sequence (`ratio_level="sequence"`, GSPO, which uses much
smaller epsilons, ~3e-4 / 4e-4); epsilon_high > epsilon_low is DAPO's
clip-higher.

Reduction. `aggregation` is the one explicit place where GRPO variants
differ in how much each token weighs (see `functional.aggregate`):
"seq_mean_token_mean" (GRPO, default; short completions' tokens weigh more),
"token_mean" (DAPO), "seq_mean_token_sum_norm" (Dr. GRPO; pair it with
adv_scale="none"; its constant is `max_tokens`, which the configs set to the
longest completion allowed, None meaning T of the batch). Every aggregation is
linear in the per-token loss, so a rollout term added to the per-token loss
before aggregation equals that term reduced with the same aggregation and
added; a term on the gold solutions is reduced with it over its own mask.

One update per rollout. When batch.old_logp is None the rollout policy is
the current one: old_logp = logp.detach(), so rho = exp(logp - logp.detach())
is 1 in value (nothing is clipped, the surrogate equals A) but its gradient
is rho * grad logp = grad logp: the loss is then the policy-gradient
estimator -A * grad logp, weighted by the aggregation.

The named objectives are defined once, by their YAML (conf/objective/<name>.yaml:
grpo.yaml's surrogate keys plus terms from conf/term/, built by
`grpokd.train.instantiate_group`); the terms' modules (grpokd.objectives.terms)
hold the rest of the maths. Paper equations are those of "Multi-Teacher
Knowledge Distillation Augmented GRPO"; every "+ KD" the paper writes inside a
maximised objective is a penalty here (minimised), see terms.forward_kd.
- grpo (Eq. 4): the surrogate + "kl" = beta * KL(theta || ref)
  (terms.kl_reference: k3 by default, Eq. 3; k1, k2 or the exact KL, Eq. 6).
  beta = 0 drops the KL and needs no reference model.
- j1, J' (Eq. 9): grpo with the exact KL (Eq. 6) + "kd" = lam * sum_i w_i
  D_H(T_i || theta), Hinton KD to the teachers (terms.forward_kd), on the
  rollouts or the gold solutions.
- j2, J'' (Eq. 11): grpo without "kl" (no reference model is loaded) +
  "kd_reverse" = beta' * sum_i w_i D_H(theta || T_i), the teachers as the
  anchor (terms.reverse_kd), weighted by the top-level beta_prime.
- j3, J''' (Eq. 12-14): j1 + the advantage term "ta": A' = A + gamma *
  norm_G(TA), TA = log sum_i w_i pi_Ti(o | s) (terms.teacher_agreement).
- kdrl (Xu et al. 2025): grpo + "teacher_kl" = beta_kd(step) * KL(theta || pi_T) on
  the rollouts, from the sampled tokens, reward-masked (terms.teacher_kl: k2 or
  k3 in the loss, k1 in the advantage).
- tgpo (2026): grpo with aggregation "token_mean" + "guide" = lam_t * CE to
  the teachers' next-token choice along the rollout (terms.teacher_guide); the
  paper's entropy bonus is `+term@objective.terms.entropy=entropy_bonus`.
- opd (on-policy distillation): grpo without "kl", reward_weight 0,
  "teacher_kl" at k1: each token's advantage is -(logp - log pi_T).
conf/term/ holds one YAML per term, so a run can add one from the command line:
`python run.py objective=j3 +term@objective.terms.rkl=teacher_kl`.
A term whose coefficient is 0 (or that is set to null) is skipped and asks
for nothing, so the module computes only what the chosen terms need.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace

import torch
from torch import Tensor

from grpokd.errors import ConfigError, check_range
from grpokd.objectives.base import Batch, LossOut, Needs
from grpokd.objectives.functional import (
    ADV_SCALES,
    AGGREGATIONS,
    RATIO_LEVELS,
    REWARD_AGGREGATIONS,
    aggregate,
    check_choice,
    check_schedule,
    cispo_surrogate,
    clipped_surrogate,
    group_advantages,
    high_entropy_mask,
    linear_decay,
    log_ratio,
    masked_mean,
    normalize_then_sum,
    off_policy_mask,
)

PLACEMENTS = ("loss", "advantage")
# surrogate name -> (logp, log_rho, adv, eps_low, eps_high) -> (surrogate to maximise [N, T], low-clipped, high-clipped)
SURROGATES = {
    "clipped": lambda logp, log_rho, adv, eps_low, eps_high: clipped_surrogate(log_rho, adv, eps_low, eps_high),
    "cispo": cispo_surrogate,
}
_MIXTURE_KEYS = ("kd_tau", "kd_states")  # one teacher mixture per step: terms that use it must agree on these


@dataclass(frozen=True)
class TermOut:
    """One term's values. `value`: [N, T] or [N', T'] (loss), [N] or [N, T] (advantage, detached)."""

    value: Tensor
    mask: Tensor | None = None  # loss terms: the positions `value` lives on ([N, T] rollout or [N', T'] gold)
    on_rollout: bool = True  # loss terms: False when `value` lives on the gold solutions
    metrics: dict[str, Tensor] = field(default_factory=dict)


class Term:
    """A weighted addition to the policy-gradient loss or advantage.

    Subclasses set `placement` and implement `needs` and `__call__(batch) -> TermOut`.

    Args:
        weight: the coefficient at step 0, >= 0; 0 switches the term off (it then needs nothing).
        schedule: "constant" | "linear" (max(weight - decay * step, floor)).
        decay, floor: the linear schedule's per-step decrease and minimum.
    """

    placement = "loss"

    def __init__(self, weight: float, schedule: str = "constant", decay: float = 0.0, floor: float = 0.0) -> None:
        check_schedule(weight, schedule, decay, floor)
        self.weight, self.decay, self.floor = weight, decay, floor

    @property
    def active(self) -> bool:
        return self.weight > 0

    def coefficient(self, step: int) -> float:
        """The coefficient at optimiser step `step`."""
        return linear_decay(self.weight, step, self.decay, self.floor)

    @property
    def needs(self) -> Needs:
        raise NotImplementedError

    def __call__(self, batch: Batch) -> TermOut:
        raise NotImplementedError


def merge_needs(base: Needs, named: Mapping[str, Needs]) -> Needs:
    """The union of the terms' needs. Terms sharing the teacher mixture or teacher log-probs must agree on how.

    Raises:
        ValueError naming the two terms when they ask for the mixture at different tau or states, or for the
        teachers' log-probs at different temperatures.
    """
    out, owner = base, {}
    for name, needs in named.items():
        flags = {f.name: getattr(out, f.name) or getattr(needs, f.name) for f in fields(Needs) if isinstance(getattr(needs, f.name), bool)}
        shared = {}
        if needs.teacher_forward or needs.teacher_reverse:
            shared |= {key: getattr(needs, key) for key in _MIXTURE_KEYS}
        if needs.teacher_logp:
            shared["teacher_logp_at_sampling_temperature"] = needs.teacher_logp_at_sampling_temperature
        for key, value in shared.items():
            if key in owner and owner[key][1] != value:
                raise ConfigError(
                    f"terms {owner[key][0]!r} and {name!r} disagree on {key} ({owner[key][1]} vs {value}): "
                    "the teachers are scored once per step; give both terms the same setting"
                )
            owner.setdefault(key, (name, value))
        flags |= {key: value for key, value in shared.items() if key != "teacher_logp_at_sampling_temperature"}
        flags["teacher_logp_at_sampling_temperature"] = out.teacher_logp_at_sampling_temperature or (needs.teacher_logp and needs.teacher_logp_at_sampling_temperature)
        out = replace(out, **flags)
    return out


class PolicyObjective:
    """Group-relative policy gradient with a clipped surrogate and a dict of weighted terms.

    Args:
        terms: name -> Term (None entries are ignored); names prefix nothing, each term names its metrics.
        reward_weight: weight of the reward's group advantage, >= 0 (0: reward-free, e.g. pure distillation).
        epsilon_low, epsilon_high: clip range [1 - epsilon_low, 1 + epsilon_high]. CISPO uses epsilon_high alone
            (its weight min(rho, 1 + epsilon_high) has no lower bound, as TRL's); an epsilon_low that differs
            from epsilon_high is then unused, and a warning says so.
        ratio_level: "token" (DeepSeekMath) | "sequence" (GSPO).
        aggregation: "seq_mean_token_mean" | "token_mean" | "seq_mean_token_sum_norm".
        adv_scale: "group" | "batch" | "none" (Dr. GRPO); the std dividing the advantage.
        adv_delta: added to that std, > 0.
        max_tokens: the constant of "seq_mean_token_sum_norm" (the configs pass the longest completion
            allowed, Dr. GRPO's constant; None: T of the batch).
        surrogate: "clipped" (PPO/GRPO, `functional.clipped_surrogate`) | "cispo" (the clipped, detached
            importance weight times log pi, `functional.cispo_surrogate`; token-level ratios only: a ConfigError
            with ratio_level="sequence").
        top_entropy_quantile: in (0, 1]; below 1 only the tokens among that fraction of highest entropy get
            policy loss (`functional.high_entropy_mask`; the terms are not masked).
        off_policy_mask_threshold: >= 0, or None (off); a completion with a negative advantage and a mean
            KL(pi_old || pi_theta) above it gets no policy loss (`functional.off_policy_mask`).
        reward_aggregation: "sum_then_normalize" (the weighted reward's group advantage, `adv_scale`) |
            "normalize_then_sum" (each reward normalised in its group, then summed: `functional.normalize_then_sum`,
            which ignores `adv_scale`).
    """

    def __init__(
        self,
        terms: Mapping[str, Term | None] | None = None,
        reward_weight: float = 1.0,
        epsilon_low: float = 0.2,
        epsilon_high: float = 0.2,
        ratio_level: str = "token",
        aggregation: str = "seq_mean_token_mean",
        adv_scale: str = "group",
        adv_delta: float = 1e-4,
        max_tokens: int | None = None,
        surrogate: str = "clipped",
        top_entropy_quantile: float = 1.0,
        off_policy_mask_threshold: float | None = None,
        reward_aggregation: str = "sum_then_normalize",
    ) -> None:
        check_choice("ratio_level", ratio_level, RATIO_LEVELS)
        check_choice("surrogate", surrogate, tuple(SURROGATES))
        if surrogate == "cispo" and ratio_level != "token":
            raise ConfigError(
                f"objective.surrogate=cispo with objective.ratio_level={ratio_level}: CISPO truncates each token's importance weight "
                "(MiniMax-M1); keep objective.ratio_level=token with cispo, or use objective.surrogate=clipped for GSPO's sequence ratio"
            )
        check_choice("reward_aggregation", reward_aggregation, REWARD_AGGREGATIONS)
        check_range("top_entropy_quantile", top_entropy_quantile, low=0, high=1, low_open=True)
        if off_policy_mask_threshold is not None:
            check_range("off_policy_mask_threshold", off_policy_mask_threshold, low=0)
        check_choice("aggregation", aggregation, AGGREGATIONS)
        check_choice("adv_scale", adv_scale, ADV_SCALES)
        check_range("reward_weight", reward_weight, low=0)
        check_range("epsilon_low", epsilon_low, low=0, high=1, low_open=True, high_open=True)
        check_range("epsilon_high", epsilon_high, low=0, low_open=True)
        check_range("adv_delta", adv_delta, low=0, low_open=True)
        if max_tokens is not None:
            check_range("max_tokens", max_tokens, low=1, integer=True)
        for name, term in (terms or {}).items():
            if term is not None and (not isinstance(term, Term) or term.placement not in PLACEMENTS):
                raise ValueError(f"objective term {name!r} is not a Term with a placement in {', '.join(PLACEMENTS)}: {term!r}")
        self.terms = {name: term for name, term in (terms or {}).items() if term is not None}
        self.reward_weight = reward_weight
        self.epsilon_low = epsilon_low
        self.epsilon_high = epsilon_high
        self.ratio_level = ratio_level
        self.aggregation = aggregation
        self.adv_scale = adv_scale
        self.adv_delta = adv_delta
        self.max_tokens = max_tokens
        self.surrogate = surrogate
        self.top_entropy_quantile = top_entropy_quantile
        self.off_policy_mask_threshold = off_policy_mask_threshold
        self.reward_aggregation = reward_aggregation
        self.needs  # fail at construction when terms disagree
        if surrogate == "cispo" and epsilon_low != epsilon_high:
            warnings.warn(
                f"objective.epsilon_low={epsilon_low} is unused with objective.surrogate=cispo: CISPO (as TRL's loss_type=cispo) bounds the "
                f"importance weight from above only, at 1 + objective.epsilon_high = {1 + epsilon_high:g}; set objective.epsilon_high to move it",
                stacklevel=2,
            )

    def active(self, placement: str) -> dict[str, Term]:
        return {name: t for name, t in self.terms.items() if t.active and t.placement == placement}

    @property
    def needs(self) -> Needs:
        """Rollouts, plus what every active term needs."""
        base = Needs(rollouts=True, entropy=self.top_entropy_quantile < 1, reward_parts=self.reward_aggregation == "normalize_then_sum")
        return merge_needs(base, {name: t.needs for name, t in self.terms.items() if t.active})

    def reduce(self, per_token: Tensor, mask: Tensor) -> Tensor:
        """This objective's aggregation of a per-token loss [N, T] to a scalar []."""
        return aggregate(per_token, mask, self.aggregation, self.max_tokens)

    def reward_advantages(self, batch: Batch) -> Tensor:
        """reward_weight times the reward's group-relative advantage (Eq. 1), detached. Returns [N]."""
        if batch.rewards is None:
            raise ValueError("a policy objective needs batch.rewards")
        if self.reward_aggregation == "normalize_then_sum":
            if batch.reward_parts is None:
                raise ValueError("reward_aggregation=normalize_then_sum needs batch.reward_parts")
            adv = normalize_then_sum(batch.reward_parts, batch.reward_weights, batch.group_size, self.adv_delta)  # [N]
        else:
            adv = group_advantages(batch.rewards, batch.group_size, self.adv_scale, self.adv_delta)  # [N]
        return (self.reward_weight * adv).detach()

    def shaped_advantages(self, batch: Batch) -> tuple[Tensor, Tensor | None, dict[str, Tensor]]:
        """(sequence advantage [N], per-token additions [N, T] or None, metrics) from the reward and the advantage terms."""
        seq = self.reward_advantages(batch)  # [N]
        token, metrics = None, {}
        reward_std = seq.std(unbiased=False)
        for term in self.active("advantage").values():
            out = term(batch)
            shaped = term.coefficient(batch.step) * out.value.detach()  # [N] or [N, T]
            metrics |= out.metrics
            if shaped.dim() == 1:
                seq = seq + shaped
                metrics["adv_reward_std"] = reward_std
            else:
                token = shaped if token is None else token + shaped
        return seq, token, metrics

    def advantages(self, batch: Batch) -> Tensor:
        """The per-completion advantage (reward part plus sequence-level shapers), detached. Returns [N]."""
        return self.shaped_advantages(batch)[0]

    def per_token_loss(self, batch: Batch, adv: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """-clipped surrogate + the rollout's loss terms at each token, and detached scalar metrics.

        Args:
            batch: logp, mask, old_logp (None: on-policy, rho = 1 in value), and what the terms read.
            adv: [N] advantages (or [N, T] per-token ones).

        Returns:
            (per-token loss [N, T], metrics: policy_loss, clip_low, clip_high, clip_region and the terms').
        """
        per_token, metrics = self.surrogate_loss(batch, adv)
        on_rollout, _, term_metrics = self.term_losses(batch)
        return per_token + on_rollout, metrics | term_metrics

    def term_losses(self, batch: Batch) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        """The active loss terms, weighted: (their sum on the rollout [N, T], the gold-state ones aggregated [], metrics)."""
        on_rollout = torch.zeros_like(batch.mask)  # [N, T]
        on_gold = torch.zeros((), device=batch.mask.device)  # []
        metrics = {}
        for term in self.active("loss").values():
            out = term(batch)
            c = term.coefficient(batch.step)
            if out.on_rollout:
                on_rollout = on_rollout + c * out.value  # [N, T]
            else:
                on_gold = on_gold + c * self.reduce(out.value, out.mask)  # []
            metrics |= out.metrics
        return on_rollout, on_gold, metrics

    def surrogate_loss(self, batch: Batch, adv: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """The negated surrogate at each token [N, T] (-min(rho A, clip(rho) A), or CISPO's), zeroed where the
        entropy or off-policy masks drop the token, and the clip metrics (TRL's definitions)."""
        mask = batch.mask  # [N, T]
        old_logp = batch.old_logp if batch.old_logp is not None else batch.logp.detach()  # [N, T]
        log_rho = log_ratio(batch.logp, old_logp, mask, self.ratio_level)  # [N, T]
        surrogate, is_low, is_high = SURROGATES[self.surrogate](batch.logp, log_rho, adv, self.epsilon_low, self.epsilon_high)
        per_token = -surrogate  # [N, T]
        metrics = {}
        if self.top_entropy_quantile < 1:
            if batch.entropy is None:
                raise ValueError("top_entropy_quantile < 1 needs batch.entropy")
            keep = high_entropy_mask(batch.entropy, mask, self.top_entropy_quantile)  # [N, T]
            per_token = per_token * keep
            metrics["entropy_mask_kept"] = masked_mean(keep.float(), mask).detach()
        if self.off_policy_mask_threshold is not None:
            keep = off_policy_mask(adv, batch.logp, old_logp, mask, self.off_policy_mask_threshold)  # [N, 1] or [N, T]
            per_token = per_token * keep
            metrics["off_policy_masked"] = masked_mean(1 - keep.expand_as(mask), mask).detach()
        if batch.behaviour_weight is not None:  # the rollout engine's samples reweighted to pi_old (truncated IS), as TRL does
            per_token = per_token * batch.behaviour_weight
        return per_token, {
            "policy_loss": self.reduce(per_token, mask).detach(),
            "clip_low": masked_mean(is_low.float(), mask).detach(),
            "clip_high": masked_mean(is_high.float(), mask).detach(),
            "clip_region": masked_mean((is_low | is_high).float(), mask).detach(),
        } | metrics

    def __call__(self, batch: Batch) -> LossOut:
        seq, token, adv_metrics = self.shaped_advantages(batch)
        adv = seq if token is None else seq[:, None] + token  # [N] or [N, T]
        per_token, metrics = self.surrogate_loss(batch, adv)  # [N, T]
        on_rollout, on_gold, term_metrics = self.term_losses(batch)
        loss = self.reduce(per_token + on_rollout, batch.mask) + on_gold  # []
        return LossOut(loss=loss, metrics=metrics | adv_metrics | term_metrics, adv=seq)
