"""Reverse KL to the teacher mixture on the student's own rollout, from the sampled tokens (KDRL; on-policy distillation).

KDRL (Xu et al. 2025, "KDRL: Post-Training Reasoning LLMs via Unified Knowledge Distillation and RL";
conf/objective/kdrl.yaml) is GRPO plus this term, "teacher_kl":

    J = J_GRPO - beta_kd(step) * D_KL(pi_theta || pi_T),   minimised as   loss = GRPO loss + beta_kd * KD

estimated on the student's own rollouts from the sampled tokens only (no full-vocabulary teacher logits
are kept). With d_t = logp_t - log pi_T(o_t) at each completion token (pi_T the weighted teacher
mixture, log pi_T = logsumexp_i(log w_i + log pi_Ti); one teacher: that teacher):
- "k2" (default): 0.5 d_t^2 as a loss; its gradient d_t grad logp_t is, on-policy, the unbiased
  per-token gradient of the reverse KL (the same reason GRPO's k2 KL is used as a loss);
- "k3": exp(-d_t) + d_t - 1 as a loss (unbiased value, >= 0);
- "k1": -beta_kd * d_t (detached) added to the token's advantage, A_t = A - beta_kd d_t (the "in the
  reward" placement of KDRL and of on-policy distillation, Thinking Machines 2025, conf/objective/opd.yaml),
  no loss term.
A reward-guided mask picks the completions: "none", "incorrect_only" (reward <= 0, the completions the
reward cannot teach) or "hard_prompts" (every completion of a group whose mean reward is below
`hard_threshold`). Schedule: constant beta_kd, or linear, max(beta_kd - decay * step, floor).

Temperatures: the KL is between the policies at the sampling temperature, as GRPO's KL to the reference:
logp is the student's sampling policy (softmax(z / temperature)) and the teachers are scored at the same
temperature, so a student equal to its teacher has zero KD at any temperature (with temperature 1, the
KDRL paper's setting, it is the models' own KL). The loss is reduced with the objective's aggregation
over the completion mask.
"""

from __future__ import annotations

import torch
from torch import Tensor

from grpokd.errors import check_range
from grpokd.objectives.base import Batch, Needs
from grpokd.objectives.functional import check_choice, kl_sampled, masked_mean
from grpokd.objectives.policy import Term, TermOut

ESTIMATORS = ("k1", "k2", "k3")
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


class TeacherKL(Term):
    """weight * reverse KL(theta || teachers) on the rollout: a loss (k2, k3) or a per-token advantage (k1).

    Metrics: `kd_reverse_kl` (the k1 estimate on every token), `kd_mask_frac`, and the coefficient
    under `coef_name` (KDRL: "beta_kd").

    Args:
        weight: the coefficient at step 0, >= 0.
        estimator: "k2" | "k3" (loss) | "k1" (advantage).
        kd_mask: "none" | "incorrect_only" | "hard_prompts".
        hard_threshold: a group is hard when its mean reward is below this.
        schedule, decay, floor: the coefficient's schedule (see `Term`).
    """

    def __init__(
        self, weight: float = 0.1, estimator: str = "k2", kd_mask: str = "none", hard_threshold: float = 0.5,
        coef_name: str = "beta_kd", **schedule,
    ) -> None:
        super().__init__(weight, **schedule)
        check_choice("estimator", estimator, ESTIMATORS)
        check_choice("kd_mask", kd_mask, KD_MASKS)
        check_range("hard_threshold", hard_threshold)
        self.estimator, self.kd_mask, self.hard_threshold, self.coef_name = estimator, kd_mask, hard_threshold, coef_name
        self.placement = "advantage" if estimator == "k1" else "loss"

    @property
    def needs(self) -> Needs:
        return Needs(teacher_logp=True, teacher_logp_at_sampling_temperature=True)

    def __call__(self, batch: Batch) -> TermOut:
        if batch.teacher_logp is None:
            raise ValueError("the reverse KL to the teachers needs batch.teacher_logp")
        if batch.rewards is None and self.kd_mask != "none":
            raise ValueError(f"kd_mask={self.kd_mask!r} needs batch.rewards")
        rewards = batch.rewards if batch.rewards is not None else torch.zeros(batch.mask.shape[0], device=batch.mask.device)
        selected = kd_mask(rewards, batch.group_size, self.kd_mask, self.hard_threshold)[:, None] * batch.mask  # [N, T]
        teacher = mixture_logp(batch.teacher_logp, batch.teacher_weights)  # [N, T]
        diff = batch.logp - teacher  # [N, T] d_t, with grad through logp
        metrics = {
            "kd_reverse_kl": masked_mean(diff.detach(), batch.mask),
            "kd_mask_frac": masked_mean(selected, batch.mask),
            self.coef_name: torch.tensor(self.coefficient(batch.step)),
        }
        if self.estimator == "k1":
            return TermOut(-selected * diff.detach(), metrics=metrics)  # [N, T] added to the advantage
        return TermOut(selected * kl_sampled(batch.logp, teacher, self.estimator), batch.mask, metrics=metrics)
