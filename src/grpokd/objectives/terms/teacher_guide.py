"""TGPO's guide: cross-entropy on the teachers' next-token choice along the student's own rollout.

TGPO ("Teacher-Guided Policy Optimization for LLM Distillation", 2026; conf/objective/tgpo.yaml) is GRPO
with token-mean aggregation plus this term, "guide", and optionally the paper's entropy bonus (the
`entropy_bonus` term):

    loss = GRPO loss (clipped surrogate, token mean) + lam_t * token-mean of -log pi_theta(y_t | prompt, o_<t)
           - entropy_coef * token-mean entropy of pi_theta

with lam_t the weight (schedule "constant") or max(lam_t - decay * step, 0) ("linear").
The teachers score the rollout by teacher forcing; at each completion position the target is the
mixture's choice given the student's prefix, y_t = argmax_a pbar(a | prompt, o_<t) ("argmax"; pbar =
sum_i w_i pi_Ti, one teacher: that teacher), a sample from pbar ("sampled", global torch RNG, so seeded
runs repeat), or soft targets from pbar's top `target_k` ("topk": the forward KL from the renormalised top-k
mixture to the student). Plain cross-entropy on every completion token: not multiplied by the
importance ratio, not clipped, not gated by the reward. With sparse teacher signals (`model.teacher_top_k`)
pbar is the mixture on the union of the teachers' top-k tokens (`kd.sparse_mixture`). Teachers and the student's guide use
temperature 1 (`batch.kd.logits`, the raw logits); the surrogate and the entropy bonus use the sampling
policy (`batch.logp`, `batch.logits`), as GRPO does.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor

from grpokd.errors import check_range
from grpokd.objectives.base import Batch, Needs
from grpokd.objectives.functional import check_choice, masked_mean
from grpokd.objectives.kd import require_kd, sparse_mixture
from grpokd.objectives.logits import per_position
from grpokd.objectives.policy import Term, TermOut

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


def agrees(logits: Tensor, targets: Tensor) -> Tensor:
    """1.0 where the student's own argmax is the target: [.., V], [..] -> [..]."""
    return (logits.argmax(-1) == targets).float()


def topk_guidance(logits: Tensor, pbar: Tensor, tokens: Tensor | None = None, *, k: int) -> Tensor:
    """Forward KL from the mixture's top-k tokens, renormalised (p~), to the student q: [N, T].

        sum_{a in top-k(pbar)} p~(a) (log p~(a) - log q(a)),   p~ = pbar restricted to the top k, summing to 1.

    `tokens` [N, T, J]: pbar [N, T, J] is given on these tokens only (`kd.sparse_mixture`); None: pbar is [N, T, V].
    """
    values, index = pbar.detach().float().topk(min(k, pbar.shape[-1]), dim=-1)  # [N, T, k]
    if tokens is not None:
        index = tokens.gather(-1, index)  # [N, T, k] token ids
    p = values / values.sum(-1, keepdim=True).clamp(min=1e-30)  # [N, T, k]
    log_q = F.log_softmax(logits.float(), dim=-1).gather(-1, index)  # [N, T, k]
    return (p * (p.clamp(min=1e-30).log() - log_q)).sum(-1)  # [N, T]


class TeacherGuide(Term):
    """weight * CE to the teachers' choice at each rollout token. Metrics: guide, guide_agree (hard targets), lam_t.

    Args:
        weight: lam_t, >= 0.
        target: "argmax" | "sampled" | "topk".
        target_k: k of the "topk" target (the paper tries 5, 20, 100).
        schedule, decay: the coefficient's schedule (see `Term`).
    """

    def __init__(self, weight: float = 0.5, target: str = "argmax", target_k: int = 20, **schedule) -> None:
        super().__init__(weight, **schedule)
        check_choice("target", target, TARGETS)
        check_range("target_k", target_k, low=1, integer=True)
        self.target, self.target_k = target, target_k

    @property
    def needs(self) -> Needs:
        return Needs(teacher_forward=True, kd_tau=1.0, kd_states="rollouts")

    def __call__(self, batch: Batch) -> TermOut:
        kd = require_kd(batch, 1.0, "the teacher guide")
        student = kd.logits  # [N, T, V] raw (temperature 1), with grad; whole or chunked
        # pbar over the vocabulary, or with sparse teacher signals over the union of their top-k tokens
        tokens, pbar = (None, kd.pbar) if kd.top_k is None else sparse_mixture(kd.top_k)  # [N, T, J], [N, T, J or V]
        metrics = {}
        if self.target == "topk":
            guide = per_position(student, partial(topk_guidance, k=self.target_k), pbar, *(() if tokens is None else (tokens,)))  # [N, T]
        else:
            targets = teacher_targets(pbar, self.target)  # [N, T]
            if tokens is not None:
                targets = tokens.gather(-1, targets[..., None]).squeeze(-1)  # [N, T] token ids
            guide = per_position(student, hard_guidance, targets)  # [N, T]
            metrics["guide_agree"] = masked_mean(per_position(student.detach(), agrees, targets), batch.mask)
        metrics |= {"guide": masked_mean(guide.detach(), batch.mask), "lam_t": torch.tensor(self.coefficient(batch.step))}
        return TermOut(guide, batch.mask, metrics=metrics)
