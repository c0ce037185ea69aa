"""TGPO ("Teacher-Guided Policy Optimization for LLM Distillation", 2026).

The teachers score the student's own rollout by teacher forcing; at each
completion position t the target is the teachers' next-token choice given the
student's prefix, y_t = argmax_a pbar(a | prompt, o_<t), with pbar the weighted
mixture sum_i w_i pi_Ti (one teacher: that teacher). The loss is

    loss = GRPO loss (clipped surrogate, token mean) + lam_t * token-mean of -log pi_theta(y_t | prompt, o_<t)
           - entropy_coef * token-mean entropy of pi_theta

The guidance term is plain cross-entropy on every completion token: not
multiplied by the importance ratio, not clipped, not gated by the reward.
lam_t = lam (`lam_schedule=constant`) or max(lam - lam_decay * step, 0) (`linear`).

Options (`target`):
- "argmax" (default): y_t is the mixture's most likely token.
- "sampled": y_t ~ pbar (global torch RNG, so seeded runs repeat).
- "topk": soft targets, the forward KL from the mixture's top-k tokens,
  renormalised, to the student: sum_{a in top-k} p~(a) (log p~(a) - log q(a)).

Temperatures: the teachers and the student's guidance term use temperature 1
(the raw logits, `batch.kd.logits`); the surrogate and the entropy bonus use
the sampling policy (`batch.logp`, `batch.logits`), as GRPO does.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from grpokd.objectives.base import Batch, LossOut, Needs
from grpokd.objectives.grpo import GRPO
from grpokd.objectives.kd import require_kd
from grpokd.objectives.terms import check_choice, check_schedule, entropy, linear_decay, masked_mean

TARGETS = ("argmax", "sampled", "topk")


def teacher_targets(pbar: Tensor, mode: str) -> Tensor:
    """The teachers' next-token choice at each position: argmax of pbar, or a sample from it.

    Args:
        pbar: [N, T, V] the teacher mixture's probabilities (rows sum to 1).
        mode: "argmax" | "sampled".

    Returns:
        [N, T] token ids (long).
    """
    check_choice("target", mode, ("argmax", "sampled"))
    if mode == "argmax":
        return pbar.argmax(-1)  # [N, T]
    flat = pbar.reshape(-1, pbar.shape[-1]).float().clamp(min=0)  # [N*T, V]
    return torch.multinomial(flat, 1).view(pbar.shape[:-1])  # [N, T]


def hard_guidance(logits: Tensor, targets: Tensor) -> Tensor:
    """-log q(y_t) at each position, q = softmax(logits): [N, T] (gradient to logits)."""
    return -F.log_softmax(logits.float(), dim=-1).gather(-1, targets[..., None]).squeeze(-1)  # [N, T]


def topk_guidance(logits: Tensor, pbar: Tensor, k: int) -> Tensor:
    """Forward KL from the mixture's top-k tokens, renormalised (p~), to the student q: [N, T].

        sum_{a in top-k(pbar)} p~(a) (log p~(a) - log q(a)),   p~ = pbar restricted to the top k, summing to 1.
    """
    values, index = pbar.detach().float().topk(min(k, pbar.shape[-1]), dim=-1)  # [N, T, k]
    p = values / values.sum(-1, keepdim=True).clamp(min=1e-30)  # [N, T, k]
    log_q = F.log_softmax(logits.float(), dim=-1).gather(-1, index)  # [N, T, k]
    return (p * (p.clamp(min=1e-30).log() - log_q)).sum(-1)  # [N, T]


class TGPO(GRPO):
    """TGPO loss: GRPO (token mean) + lam_t * CE to the teachers' choices on the rollout - entropy bonus.

    Args:
        lam: guidance coefficient at step 0, >= 0; 0 (with entropy_coef 0) is GRPO.
        target: "argmax" | "sampled" | "topk".
        top_k: k of the "topk" target (the paper tries 5, 20, 100).
        lam_schedule: "constant" | "linear" (max(lam - lam_decay * step, 0)).
        lam_decay: per-step decrease of the linear schedule.
        entropy_coef: weight of the student's entropy bonus, >= 0.
        **grpo_args: GRPO's arguments (aggregation defaults to "token_mean", as the paper).
    """

    def __init__(
        self,
        lam: float = 0.5,
        target: str = "argmax",
        top_k: int = 20,
        lam_schedule: str = "constant",
        lam_decay: float = 0.0,
        entropy_coef: float = 0.0,
        **grpo_args: Any,
    ) -> None:
        super().__init__(**{"aggregation": "token_mean", **grpo_args})
        check_choice("target", target, TARGETS)
        check_schedule("lam", lam, lam_schedule, lam_decay, 0.0)
        if top_k < 1:
            raise ValueError(f"top_k={top_k} must be >= 1")
        if entropy_coef < 0:
            raise ValueError(f"entropy_coef={entropy_coef} must be >= 0")
        self.lam = lam
        self.target = target
        self.top_k = top_k
        self.lam_decay = lam_decay
        self.entropy_coef = entropy_coef

    @property
    def needs(self) -> Needs:
        """GRPO's, plus the teachers' mixture pbar (temperature 1) on the rollouts when lam > 0, and the student's logits for an entropy bonus."""
        base = super().needs
        return replace(base, teacher_forward=self.lam > 0, kd_tau=1.0, kd_states="rollouts",
                       logits=base.logits or self.entropy_coef > 0)

    def coefficient(self, step: int) -> float:
        """lam_t at optimiser step `step`."""
        return linear_decay(self.lam, step, self.lam_decay, 0.0)

    def __call__(self, batch: Batch) -> LossOut:
        adv = self.advantages(batch)  # [N]
        per_token, metrics = self.per_token_loss(batch, adv)  # [N, T]
        loss = self.reduce(per_token, batch.mask)  # []
        if self.lam > 0:
            kd = require_kd(batch, 1.0, "TGPO with lam > 0")
            student = kd.logits  # [N, T, V] raw (temperature 1), with grad
            if self.target == "topk":
                guide = topk_guidance(student, kd.pbar, self.top_k)  # [N, T]
            else:
                targets = teacher_targets(kd.pbar, self.target)  # [N, T]
                guide = hard_guidance(student, targets)  # [N, T]
                metrics["guide_agree"] = masked_mean((student.detach().argmax(-1) == targets).float(), batch.mask)
            lam = self.coefficient(batch.step)
            loss = loss + lam * self.reduce(guide, batch.mask)  # []
            metrics |= {"guide": masked_mean(guide.detach(), batch.mask), "lam": torch.tensor(lam)}
        if self.entropy_coef > 0:
            if batch.logits is None:
                raise ValueError("TGPO's entropy bonus needs batch.logits")
            ent = entropy(batch.logits)  # [N, T] of the sampling policy
            loss = loss - self.entropy_coef * self.reduce(ent, batch.mask)  # []
            metrics["entropy_bonus"] = masked_mean(ent.detach(), batch.mask)
        return LossOut(loss=loss, metrics=metrics, adv=adv)
