"""The plain functions objectives and their terms are built from: pure tensor functions, no state.

Shapes: N completions, K group size (consecutive rows of N form a group),
T completion tokens, V vocabulary. `mask` is [N, T], 1.0 on real completion
tokens and 0.0 on padding. The functions multiply by the mask, so padded
positions must hold finite values: `Batch` zeroes its per-token log-probs there
(an exp or square of an infinite padded value would be NaN, gradient included). Equation numbers refer to the
paper "Multi-Teacher Knowledge Distillation Augmented GRPO".
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from grpokd.errors import ConfigError, check_range
from grpokd.objectives.base import Batch
from grpokd.objectives.logits import per_position

ADV_SCALES = ("group", "batch", "none")
REWARD_AGGREGATIONS = ("sum_then_normalize", "normalize_then_sum")
AGGREGATIONS = ("seq_mean_token_mean", "token_mean", "seq_mean_token_sum_norm")
RATIO_LEVELS = ("token", "sequence")
SAMPLED_KL_ESTIMATORS = ("k1", "k2", "k3")
KL_ESTIMATORS = (*SAMPLED_KL_ESTIMATORS, "full")
SCHEDULES = ("constant", "linear")


def check_choice(key: str, value: str, allowed: tuple[str, ...]) -> None:
    """Raise a ConfigError naming `key` and the allowed values if `value` is not one of them."""
    if value not in allowed:
        raise ConfigError(f"{key}={value!r} is not one of {', '.join(allowed)}")


def group_advantages(rewards: Tensor, group_size: int, scale: str = "group", delta: float = 1e-4) -> Tensor:
    """Group-relative advantage, paper Eq. 1: A_k = (R_k - mean_G R) / (std R + delta).

    The std is the population std (unbiased=False). `scale` picks the std:
    "group" (of the completion's own group, the paper and DeepSeekMath),
    "batch" (of all N rewards, as in REINFORCE++-style batch normalisation),
    or "none" (no division, Dr. GRPO: keeps the reward scale and does not
    up-weight near-constant groups). The mean is always the group's.

    Args:
        rewards: [N] one scalar reward per completion; rows k*K .. k*K+K-1 share a prompt.
        group_size: K.
        scale: "group" | "batch" | "none".
        delta: added to the std so that constant groups give 0, not NaN.

    Returns:
        [N] advantages, float32 or the rewards' floating dtype.
    """
    check_choice("scale", scale, ADV_SCALES)
    n = rewards.shape[0]
    if group_size < 1 or n % group_size != 0:
        raise ValueError(f"group_size={group_size} must be >= 1 and divide the number of rewards ({n})")
    r = rewards.float() if not rewards.is_floating_point() else rewards  # [N]
    grouped = r.reshape(-1, group_size)  # [N/K, K]
    centred = grouped - grouped.mean(dim=1, keepdim=True)  # [N/K, K]
    if scale == "none":
        return centred.view(-1)  # [N]
    if scale == "group":
        std = grouped.std(dim=1, unbiased=False, keepdim=True)  # [N/K, 1]
    else:
        std = r.std(unbiased=False)  # []
    return (centred / (std + delta)).view(-1)  # [N]


def normalize_then_sum(parts: Tensor, weights: Tensor, group_size: int, delta: float = 1e-4) -> Tensor:
    """GDPO-style multi-reward advantage (TRL's `multi_objective_aggregation="normalize_then_sum"`): each reward
    normalised within its group, weighted and summed, the sum then normalised over the batch:

        A = (S - mean_batch S) / (std_batch S + delta),  S = sum_k w_k (r_k - mean_G r_k) / (std_G r_k + delta)

    so a reward with a large scale or spread cannot drown the others (with one reward: the group advantage,
    rescaled to unit batch std). The batch normalisation rescales whatever is left: rewards that cancel
    (S near 0 everywhere) give advantages of order S / (std S + delta), not 0. Population stds, as
    `group_advantages` (TRL's are Bessel-corrected).

    Args:
        parts: [F, N] each reward function's value; weights: [F]; group_size: K.

    Returns:
        [N].
    """
    grouped = parts.float().reshape(parts.shape[0], -1, group_size)  # [F, N/K, K]
    centred = grouped - grouped.mean(-1, keepdim=True)
    normed = centred / (grouped.std(-1, unbiased=False, keepdim=True) + delta)  # [F, N/K, K]
    total = (normed.reshape(parts.shape[0], -1) * weights.float()[:, None]).sum(0)  # [N]
    return (total - total.mean()) / (total.std(unbiased=False) + delta)  # [N]


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean of `x` over the positions where `mask` is 1; 0 (not NaN) where the mask is empty.

    Args:
        x: any shape; mask: same shape as x (or broadcastable to it).
        dim: reduce this dimension only; None reduces everything to a scalar.
    """
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1.0)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1.0)


def aggregate(per_token: Tensor, mask: Tensor, mode: str, max_tokens: int | None = None) -> Tensor:
    """Reduce a per-token loss to the scalar that is minimised.

    This is where GRPO variants quietly differ (how much each token weighs):
    - "seq_mean_token_mean" (GRPO, DeepSeekMath): mean over each sequence's
      tokens, then mean over sequences. A token of sequence i weighs
      1 / (N |o_i|): tokens of short completions weigh more.
    - "token_mean" (DAPO): sum over all tokens / number of tokens; every
      token weighs the same, 1 / sum_i |o_i|.
    - "seq_mean_token_sum_norm" (Dr. GRPO): each sequence's token sum divided
      by the constant `max_tokens` (default T), then mean over sequences;
      every token weighs 1 / (N * max_tokens), no length bias.
    Sequences with no tokens (mask sum 0) contribute 0 and still count in N.

    Args:
        per_token: [N, T]; mask: [N, T].
        mode: one of the three names above.
        max_tokens: the constant of "seq_mean_token_sum_norm"; ignored by the others.

    Returns:
        [] scalar.
    """
    check_choice("aggregation", mode, AGGREGATIONS)
    if mode == "seq_mean_token_mean":
        return masked_mean(per_token, mask, dim=-1).mean()
    if mode == "token_mean":
        return masked_mean(per_token, mask)
    norm = per_token.shape[-1] if max_tokens is None else max_tokens
    return ((per_token * mask).sum(-1) / norm).mean()


def log_ratio(logp: Tensor, old_logp: Tensor, mask: Tensor, level: str = "token") -> Tensor:
    """Log importance ratio log(pi_theta / pi_old) at each token.

    "token": log rho_{i,t} = logp_{i,t} - old_logp_{i,t} (DeepSeekMath GRPO).
    "sequence" (GSPO, Zheng et al. 2025): log s_i = masked mean over t of
    (logp - old_logp), the log of the length-normalised sequence ratio,
    broadcast to every token of the sequence; exp of it is s_i, and the
    gradient flows to every token through the mean. Padded positions are 0.

    Args:
        logp: [N, T] with grad; old_logp: [N, T] detached; mask: [N, T].
        level: "token" | "sequence".

    Returns:
        [N, T].
    """
    check_choice("ratio_level", level, RATIO_LEVELS)
    diff = (logp - old_logp) * mask  # [N, T]
    if level == "token":
        return diff
    seq = masked_mean(diff, mask, dim=-1)  # [N]
    return seq[:, None] * mask  # [N, T]


def clipped_surrogate(
    log_ratio: Tensor, adv: Tensor, eps_low: float, eps_high: float
) -> tuple[Tensor, Tensor, Tensor]:
    """PPO/GRPO clipped surrogate, paper Eq. 2: min(rho A, clip(rho, 1-eps_low, 1+eps_high) A).

    Separate low/high epsilons as DAPO's clip-higher. The result is to be
    maximised (the loss uses its negative). Clip flags follow TRL: a token is
    low-clipped when rho < 1-eps_low and A < 0, high-clipped when
    rho > 1+eps_high and A > 0 (the cases where the clipped branch is the min
    and the gradient is cut).

    Args:
        log_ratio: [N, T] log rho; adv: [N] one advantage per completion, or [N, T] one per token.
        eps_low, eps_high: the clip range's distances below and above 1.

    Returns:
        (surrogate [N, T], is_low_clipped [N, T] bool, is_high_clipped [N, T] bool).
    """
    rho = torch.exp(log_ratio)  # [N, T]
    a = adv[:, None] if adv.dim() == 1 else adv  # [N, 1] or [N, T]
    unclipped = rho * a  # [N, T]
    clipped = torch.clamp(rho, 1.0 - eps_low, 1.0 + eps_high) * a  # [N, T]
    surrogate = torch.minimum(unclipped, clipped)  # [N, T]
    is_low = (rho < 1.0 - eps_low) & (a < 0)  # [N, T]
    is_high = (rho > 1.0 + eps_high) & (a > 0)  # [N, T]
    return surrogate, is_low, is_high


def cispo_surrogate(
    logp: Tensor, log_ratio: Tensor, adv: Tensor, eps_low: float, eps_high: float
) -> tuple[Tensor, Tensor, Tensor]:
    """CISPO (MiniMax-M1, 2025): sg(min(rho, 1 + eps_high)) * A * log pi_theta, to be maximised.

    The importance weight is clipped and detached instead of the update: every token keeps a gradient
    (A * min(rho, 1+eps_high) * grad log pi), where the clipped surrogate drops the clipped tokens' gradient.
    On-policy (rho = 1) its gradient is the clipped surrogate's. TRL's `loss_type="cispo"` clamps at its
    `epsilon_high` itself (the eps_max of ScaleRL): TRL's epsilon_high = E is eps_high = E - 1 here.
    `eps_low` is unused (the signature is the clipped surrogate's). A token counts as clipped where
    rho > 1+eps_high and A > 0, as TRL counts it (`cispo_clip_ratio`).

    Args:
        logp: [N, T] log pi_theta of the sampled tokens, with grad; log_ratio: [N, T] log rho;
        adv: [N] or [N, T].

    Returns:
        (surrogate [N, T], no low clipping [N, T] bool (all False), is_high_clipped [N, T] bool).
    """
    rho = torch.exp(log_ratio.detach())  # [N, T]
    a = adv[:, None] if adv.dim() == 1 else adv  # [N, 1] or [N, T]
    weight = torch.clamp(rho, max=1.0 + eps_high)  # [N, T], detached
    is_high = (rho > 1.0 + eps_high) & (a > 0)  # [N, T]
    return weight * a * logp, torch.zeros_like(is_high), is_high


def high_entropy_mask(entropy: Tensor, mask: Tensor, quantile: float) -> Tensor:
    """The tokens among the `quantile` fraction of highest entropy (Wang et al. 2025, "the 80/20 rule"; TRL's
    `top_entropy_quantile`): entropy >= the (1 - quantile) quantile of the real tokens' entropies, [N, T] bool.

    The quantile is taken over this batch's real tokens (under DDP: each rank's own; TRL gathers them over the
    processes first). quantile = 1 keeps every real token. Padding is never kept.
    """
    values = entropy[mask.bool()].float()  # [real tokens]
    if values.numel() == 0:
        return torch.zeros_like(mask, dtype=torch.bool)
    threshold = torch.quantile(values, 1.0 - quantile)
    return (entropy * mask >= threshold) & mask.bool()  # [N, T]


def off_policy_mask(adv: Tensor, logp: Tensor, old_logp: Tensor, mask: Tensor, threshold: float) -> Tensor:
    """DeepSeek-V3.2's off-policy sequence mask (TRL's `off_policy_mask_threshold`): a completion with a negative
    advantage whose mean per-token KL(pi_old || pi_theta) estimate, mean_t (log pi_old - log pi_theta), exceeds
    `threshold` gets no policy loss; every other is kept. [N, 1] (or [N, T] with per-token advantages), 1.0 keep.
    """
    kl = (old_logp - logp.detach()) * mask  # [N, T]
    mean_kl = kl.sum(-1, keepdim=True) / mask.sum(-1, keepdim=True).clamp(min=1.0)  # [N, 1]
    a = adv[:, None] if adv.dim() == 1 else adv  # [N, 1] or [N, T]
    return ((a >= 0) | (mean_kl <= threshold)).to(mask.dtype)


def kl_sampled(logp: Tensor, ref_logp: Tensor, estimator: str) -> Tensor:
    """Per-token estimate of KL(pi_theta || pi_ref) from the sampled token (Schulman 2020).

    With log r = ref_logp - logp (r = pi_ref / pi_theta at the sampled token):
    k1 = -log r (unbiased, high variance, can be negative);
    k2 = 0.5 (log r)^2 (biased, >= 0; its gradient is the per-token reverse-KL gradient);
    k3 = r - log r - 1 (unbiased, >= 0; paper Eq. 3, GRPO's default).

    Args:
        logp: [N, T] student log-probs of the sampled tokens (with grad).
        ref_logp: [N, T] reference log-probs of the same tokens.
        estimator: "k1" | "k2" | "k3".

    Returns:
        [N, T].
    """
    check_choice("kl_estimator", estimator, SAMPLED_KL_ESTIMATORS)
    log_r = ref_logp - logp  # [N, T]
    if estimator == "k1":
        return -log_r
    if estimator == "k2":
        return 0.5 * log_r**2
    return torch.exp(log_r) - log_r - 1.0


def linear_decay(start: float, step: int, decay: float = 0.0, floor: float = 0.0) -> float:
    """A coefficient schedule: max(start - decay * step, floor); decay = 0 is a constant.

    Args:
        start: the value at step 0; step: optimiser step >= 0; decay: >= 0 per step; floor: the minimum.
    """
    return max(start - decay * step, floor)


def check_schedule(start: float, schedule: str, decay: float, floor: float) -> None:
    """Validate a `linear_decay` coefficient: weight `start`, schedule "constant" (decay 0) or "linear", `floor`."""
    check_range("weight", start, low=0)
    check_choice("schedule", schedule, SCHEDULES)
    check_range("decay", decay, low=0)
    check_range("floor", floor, low=0)
    if floor > start:
        raise ConfigError(f"weight={start} is below its floor={floor}")
    if schedule == "constant" and decay != 0:
        raise ConfigError(f"schedule=constant with decay={decay}: set schedule=linear to decay")


def kl_full(logits: Tensor, ref_logits: Tensor) -> Tensor:
    """Exact KL(pi_theta || pi_ref) at each position, paper Eq. 6: sum_a q (log q - log p_ref).

    Computed in float32 from log_softmax.

    Args:
        logits: [N, T, V] student logits (q = softmax); ref_logits: [N, T, V].

    Returns:
        [N, T].
    """
    log_q = F.log_softmax(logits.float(), dim=-1)  # [N, T, V]
    log_p = F.log_softmax(ref_logits.float(), dim=-1)  # [N, T, V]
    return (log_q.exp() * (log_q - log_p)).sum(-1)  # [N, T]


def hinton_kd(p_logits: Tensor, q_logits: Tensor, tau: float) -> Tensor:
    """Hinton distillation divergence, paper Eq. 7-8: D_H(P||Q) = tau^2 KL(softmax(z_P/tau) || softmax(z_Q/tau)).

    The tau^2 factor keeps gradient magnitudes comparable across temperatures
    (Hinton et al. 2015). Forward KD (teacher -> student) is
    hinton_kd(teacher_logits, student_logits); reverse is the swap.
    Computed in float32.

    Args:
        p_logits: [N, T, V]; q_logits: [N, T, V]; tau: temperature > 0.

    Returns:
        [N, T].
    """
    log_p = F.log_softmax(p_logits.float() / tau, dim=-1)  # [N, T, V]
    log_q = F.log_softmax(q_logits.float() / tau, dim=-1)  # [N, T, V]
    return tau**2 * (log_p.exp() * (log_p - log_q)).sum(-1)  # [N, T]


def entropy(logits: Tensor) -> Tensor:
    """Entropy -sum_a p log p of softmax(logits) at each position, in float32.

    Args:
        logits: [N, T, V].

    Returns:
        [N, T].
    """
    log_p = F.log_softmax(logits.float(), dim=-1)  # [N, T, V]
    return -(log_p.exp() * log_p).sum(-1)  # [N, T]


def kl_to_reference(batch: Batch, estimator: str) -> Tensor:
    """Per-token KL(pi_theta || pi_ref) with the named estimator.

    "k1" | "k2" | "k3" use the sampled tokens (batch.logp, batch.ref_logp);
    "full" is exact over the vocabulary (batch.logits, batch.ref_logits).

    Returns:
        [N, T].
    """
    check_choice("kl_estimator", estimator, KL_ESTIMATORS)
    if estimator == "full":
        if batch.logits is None or batch.ref_logits is None:
            raise ValueError("kl_estimator='full' needs batch.logits and batch.ref_logits")
        return per_position(batch.logits, kl_full, batch.ref_logits)
    if batch.ref_logp is None:
        raise ValueError(f"kl_estimator={estimator!r} needs batch.ref_logp")
    return kl_sampled(batch.logp, batch.ref_logp, estimator)
