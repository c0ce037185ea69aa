"""KDRL (Xu et al. 2025, "KDRL: Post-Training Reasoning LLMs via Unified Knowledge Distillation and RL").

    J = J_GRPO - beta_kd(step) * D_KL(pi_theta || pi_T),   minimised as   loss = GRPO loss + beta_kd * KD

The reverse KL to the teacher is estimated on the student's own rollouts, from
the sampled tokens only (no full-vocabulary teacher logits are kept). With
d_t = logp_t - log pi_T(o_t) at each completion token:

- `estimator="k2"` (default): KD_t = 0.5 d_t^2 as a loss. Its gradient is
  d_t * grad logp_t, which on-policy is the unbiased per-token gradient of
  the reverse KL (the same reason GRPO's k2 KL is used as a loss).
- `estimator="k3"`: KD_t = exp(-d_t) + d_t - 1 as a loss (unbiased value, >= 0).
- `estimator="k1"`: the "in the reward" placement: the detached term
  -beta_kd * d_t is added to every token's advantage, A_t = A - beta_kd d_t,
  and there is no separate loss term.

Reward-guided mask (which completions get KD): `none` (all), `incorrect_only`
(reward <= 0, the completions the reward cannot teach), `hard_prompts` (every
completion of a group whose mean reward is below `hard_threshold`).

Schedule: `constant` beta_kd, or `linear`: beta_t = max(beta_kd - decay * step, beta_kd_min).

Multiple teachers: pi_T is the weighted mixture at each token,
log pi_T = logsumexp_i(log w_i + log pi_Ti), with the ensemble's weighting.

Temperatures: the KL is between the tempered policies, as GRPO's KL to the
reference: logp is the student's sampling policy (softmax(z / temperature))
and the teachers are scored at the same temperature, so a student equal to
its teacher has zero KD at any temperature (with temperature 1, the KDRL
paper's setting, it is the models' own KL). The KD term is reduced with this
objective's aggregation over the completion mask.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch
from torch import Tensor

from grpokd.objectives.base import Batch, LossOut, Needs
from grpokd.objectives.grpo import GRPO
from grpokd.objectives.terms import check_choice, check_schedule, kl_sampled, linear_decay, masked_mean

KDRL_ESTIMATORS = ("k1", "k2", "k3")
KD_MASKS = ("none", "incorrect_only", "hard_prompts")


def mixture_logp(teacher_logp: Tensor, weights: Tensor | None) -> Tensor:
    """log pi_T of the scored tokens under the weighted teacher mixture: logsumexp_i(log w_i + log pi_Ti).

    Args:
        teacher_logp: [M, N, T] each teacher's log-probs of the scored tokens.
        weights: [M, N, T] w_i per position (sum 1 over M), or None for uniform 1/M.

    Returns:
        [N, T] detached.
    """
    logp = teacher_logp.detach().float()  # [M, N, T]
    if weights is None:
        return torch.logsumexp(logp, 0) - torch.log(torch.tensor(float(logp.shape[0])))  # [N, T]
    return torch.logsumexp(logp + weights.detach().float().log(), 0)  # [N, T]


def kd_mask(rewards: Tensor, group_size: int, mode: str, threshold: float = 0.5) -> Tensor:
    """Which completions get KD: [N] float, 1.0 where KD applies.

    "none": all; "incorrect_only": reward <= 0; "hard_prompts": all completions of a
    group whose mean reward is below `threshold`.
    """
    check_choice("kd_mask", mode, KD_MASKS)
    if mode == "none":
        return torch.ones_like(rewards, dtype=torch.float32)  # [N]
    if mode == "incorrect_only":
        return (rewards <= 0).float()  # [N]
    group_mean = rewards.float().view(-1, group_size).mean(-1, keepdim=True)  # [N/K, 1]
    return (group_mean < threshold).float().expand(-1, group_size).reshape(-1)  # [N]


class KDRL(GRPO):
    """KDRL loss: GRPO loss + beta_kd(step) * reverse KL(theta || teachers) on the rollouts, masked by reward.

    Args:
        beta_kd: KD coefficient at step 0, >= 0; 0 is GRPO.
        estimator: "k2" (loss, default) | "k3" (loss) | "k1" (per-token advantage term).
        kd_mask: "none" | "incorrect_only" | "hard_prompts".
        hard_threshold: a group is hard when its mean reward is below this ("hard_prompts").
        beta_kd_schedule: "constant" | "linear".
        beta_kd_decay: per-step decrease of the linear schedule, >= 0.
        beta_kd_min: the linear schedule's floor.
        **grpo_args: GRPO's arguments (beta and kl_estimator for the reference KL, clipping, aggregation, ...).
    """

    def __init__(
        self,
        beta_kd: float = 0.1,
        estimator: str = "k2",
        kd_mask: str = "none",
        hard_threshold: float = 0.5,
        beta_kd_schedule: str = "constant",
        beta_kd_decay: float = 0.0,
        beta_kd_min: float = 0.0,
        **grpo_args: Any,
    ) -> None:
        super().__init__(**grpo_args)
        check_choice("estimator", estimator, KDRL_ESTIMATORS)
        check_choice("kd_mask", kd_mask, KD_MASKS)
        check_schedule("beta_kd", beta_kd, beta_kd_schedule, beta_kd_decay, beta_kd_min)
        self.beta_kd = beta_kd
        self.estimator = estimator
        self.kd_mask = kd_mask
        self.hard_threshold = hard_threshold
        self.beta_kd_decay = beta_kd_decay
        self.beta_kd_min = beta_kd_min

    @property
    def needs(self) -> Needs:
        """GRPO's, plus each teacher's log-probs of the sampled tokens (tempered as the policy) and weights when beta_kd > 0."""
        return replace(super().needs, teacher_logp=self.beta_kd > 0, teacher_logp_tempered=True)

    def coefficient(self, step: int) -> float:
        """beta_kd at optimiser step `step`."""
        return linear_decay(self.beta_kd, step, self.beta_kd_decay, self.beta_kd_min)

    def __call__(self, batch: Batch) -> LossOut:
        if self.beta_kd == 0:
            return super().__call__(batch)
        adv = self.advantages(batch)  # [N]
        if batch.teacher_logp is None:
            raise ValueError("KDRL with beta_kd > 0 needs batch.teacher_logp")
        beta = self.coefficient(batch.step)
        selected = kd_mask(batch.rewards, batch.group_size, self.kd_mask, self.hard_threshold)[:, None] * batch.mask  # [N, T]
        teacher = mixture_logp(batch.teacher_logp, batch.teacher_weights)  # [N, T]
        diff = batch.logp - teacher  # [N, T] d_t = logp - log pi_T, with grad through logp
        if self.estimator == "k1":
            token_adv = adv[:, None] - beta * selected * diff.detach()  # [N, T] reward-side placement
            per_token, metrics = self.per_token_loss(batch, token_adv)  # [N, T]
            loss = self.reduce(per_token, batch.mask)  # []
        else:
            per_token, metrics = self.per_token_loss(batch, adv)  # [N, T]
            kd = kl_sampled(batch.logp, teacher, self.estimator)  # [N, T] k2: 0.5 d^2, k3: e^-d + d - 1
            loss = self.reduce(per_token + beta * selected * kd, batch.mask)  # []
        metrics |= {
            "kd_reverse_kl": masked_mean(diff.detach(), batch.mask),  # k1 estimate of KL(theta || T) on all tokens
            "kd_mask_frac": masked_mean(selected, batch.mask),
            "beta_kd": torch.tensor(beta),
        }
        return LossOut(loss=loss, metrics=metrics, adv=adv)
