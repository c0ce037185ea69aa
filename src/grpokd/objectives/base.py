"""What every objective consumes and returns.

An objective is a small pure object: tensors in (`Batch`), a named result out
(`LossOut`). It declares in `needs` which tensors the training module must
compute for it, so nothing unused is loaded or computed (no reference model
when beta=0, no full-vocabulary logits for sampled-token estimators, ...).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from torch import Tensor

from grpokd.objectives.logits import Logits


@dataclass(frozen=True)
class Needs:
    """The inputs an objective asks the training module for."""

    rollouts: bool = True  # sample K completions per prompt; False: score the gold solutions (SFT)
    ref_logp: bool = False  # reference log-probs of the scored tokens [N, T]
    ref_logits: bool = False  # reference full-vocabulary logits [N, T, V]
    logits: bool = False  # student full-vocabulary logits [N, T, V], with grad
    entropy: bool = False  # the student's per-token entropy [N, T] at the sampling temperature, detached
    reward_parts: bool = False  # each reward function's value [F, N] and weight [F], not only their weighted sum
    teacher_logp: bool = False  # each teacher's log-probs of the scored tokens [M, N, T] and the weights [M, N, T]
    teacher_logp_at_sampling_temperature: bool = False  # those log-probs at the sampling temperature (as the reference's), not 1
    teacher_forward: bool = False  # forward-KD mixture at the KD states: pbar and the teachers' mean neg-entropy
    teacher_reverse: bool = False  # reverse-KD mixture at the KD states: lbar
    kd_tau: float = 1.0  # temperature of the teachers' (and student's) distributions in the mixtures
    kd_states: str = "rollouts"  # where the mixtures are evaluated: "rollouts" (the scored tokens) or "gold" solutions

    @property
    def reference(self) -> bool:
        """The reference model is scored (its log-probs or its logits)."""
        return self.ref_logp or self.ref_logits

    @property
    def mixture(self) -> bool:
        """The teachers' full-vocabulary mixture is built (forward or reverse KD)."""
        return self.teacher_forward or self.teacher_reverse

    @property
    def teachers(self) -> bool:
        """The teachers are loaded and scored."""
        return self.teacher_logp or self.mixture

    @property
    def kd_on_gold(self) -> bool:
        """The mixture is taken on the gold solutions: the student is scored on them too, with grad."""
        return self.mixture and self.kd_states == "gold"

    def gold(self, weighting_needs_gold: bool = False) -> bool:
        """The prompts' gold solutions are scored: for SFT (no rollouts), for KD on gold states, and for a
        teacher weighting that rates the teachers on them (competence), when teachers are scored."""
        return not self.rollouts or self.kd_on_gold or (self.teachers and weighting_needs_gold)


class Unmatched(NamedTuple):
    """GOLD's hybrid for teachers with their own tokenizer (`model.teacher_unmatched=uld`): the tokens with no
    counterpart of the same text in the other vocabulary are compared by ULD's sorted-probability L1 distance
    (Boizard et al. 2024), sum_r |q_(r) - p_(r)| over the r-th largest probabilities of each side's unmatched
    tokens, here the k largest. Teacher i's KD is (1 - share_i) times its divergence on the k + 1 outcomes of
    `TopK` plus share_i times that distance, share_i = 1 - (its matched tokens / its vocabulary) as GOLD weighs them.
    A teacher without unmatched tokens (the student's tokenizer) has share 0 and an empty list: its KD is unchanged.
    """

    logp: Tensor  # [N, T, M, k] each teacher's k most likely unmatched tokens' log-probs at tau, descending (-inf: none)
    student: Tensor  # [M, V] bool, the student's tokens that no token of teacher i has the text of
    share: Tensor  # [M] the distance's share of teacher i's KD


class TopK(NamedTuple):
    """Sparse teacher signals: each teacher's k most likely tokens at each position and one tail bucket.

    With p_i = softmax(z_Ti / tau), teacher i keeps its top-k set S_i, log p_i on it and the log of the mass it
    leaves out, log p_i(tail) = log sum_{a not in S_i} p_i(a) (-inf when k = V: nothing is left out). The KD terms
    compare the student with each teacher on the k + 1 outcomes (S_i's tokens and the tail), so the teachers'
    side is O(N*T*M*k) instead of O(N*T*V); with k = V it is the full computation.
    """

    index: Tensor  # [N, T, M, k] the tokens of S_i (long)
    logp: Tensor  # [N, T, M, k] log p_i of them, at tau
    tail: Tensor  # [N, T, M] log p_i(tail)
    weight: Tensor  # [N, T, M] w_i, sum 1 over M, detached
    unmatched: Unmatched | None = None  # GOLD's hybrid, for teachers with their own tokenizer (None: KL on the k + 1 outcomes alone)


@dataclass(frozen=True)
class KDStates:
    """Full-vocabulary teacher mixtures and the student's logits at the positions where KD is evaluated.

    Shapes: N' sequences (the rollouts, or the gold solutions), T' tokens, V vocabulary.
    With p_i = softmax(z_Ti / tau) and weights w_i (sum to 1 at each position, detached):
      pbar = sum_i w_i p_i                 (forward KD, D_H(T_i || theta))
      neg_entropy = sum_i w_i sum_a p_i log p_i
      lbar = sum_i w_i log p_i             (reverse KD, D_H(theta || T_i))
    so no M x [N', T', V] stack is ever held.
    """

    logits: Logits  # [N', T', V] student logits at these positions, with grad, untempered (whole or chunked)
    mask: Tensor  # [N', T']
    tau: float
    pbar: Tensor | None = None  # [N', T', V]
    neg_entropy: Tensor | None = None  # [N', T']
    lbar: Tensor | None = None  # [N', T', V]
    top_k: TopK | None = None  # with model.teacher_top_k: each teacher's sparse signal, instead of pbar, neg_entropy, lbar


@dataclass(frozen=True)
class Batch:
    """Tensors for one optimisation step. Shapes: N completions, T tokens, V vocabulary."""

    logp: Tensor  # [N, T] student log-probs of the scored tokens, with grad
    mask: Tensor  # [N, T] 1.0 on real completion tokens, 0.0 on padding
    group_size: int = 1  # K: completions per prompt, consecutive rows form a group
    rewards: Tensor | None = None  # [N]
    reward_parts: Tensor | None = None  # [F, N] each reward function's value (their weighted sum is `rewards`)
    reward_weights: Tensor | None = None  # [F] their weights
    old_logp: Tensor | None = None  # [N, T] behaviour-policy log-probs; None means on-policy (logp.detach())
    behaviour_weight: Tensor | None = None  # [N, T] truncated importance weight of each token's policy loss (pi_old / pi_engine, capped), detached
    logits: Logits | None = None  # [N, T, V] student logits, with grad (whole or chunked: read them with `per_position`)
    entropy: Tensor | None = None  # [N, T] the student's entropy at each position (of the scored distribution), detached
    ref_logp: Tensor | None = None  # [N, T]
    ref_logits: Tensor | None = None  # [N, T, V]
    teacher_logp: Tensor | None = None  # [M, N, T] each teacher's log-probs of the scored tokens
    teacher_weights: Tensor | None = None  # [M, N, T] w_i at each scored position, detached, sum 1 over M
    kd: KDStates | None = None
    step: int = 0  # optimiser step, for coefficient schedules

    def __post_init__(self) -> None:
        """Zero every per-token log-prob at masked positions, so no exp or square of padding can make NaN.

        A padded position may hold -inf or a huge value (a log-prob of a pad token the reference or a
        teacher rules out); multiplying the loss by the mask afterwards is too late: exp(inf) * 0 and
        its gradient are NaN. torch.where also stops the gradient there. The [N, T, V] logits are the
        models' outputs and are left as they are (finite; masking them would copy the largest tensors).
        """
        keep = self.mask > 0  # [N, T]
        for name in ("logp", "old_logp", "ref_logp", "teacher_logp"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, torch.where(keep, value, torch.zeros((), dtype=value.dtype, device=value.device)))
        if self.teacher_weights is not None:  # uniform where masked: log w stays finite in the teachers' mixture
            uniform = torch.full((), 1.0 / self.teacher_weights.shape[0], dtype=self.teacher_weights.dtype, device=self.teacher_weights.device)
            object.__setattr__(self, "teacher_weights", torch.where(keep, self.teacher_weights, uniform))


@dataclass(frozen=True)
class LossOut:
    """An objective's result: the scalar to minimise and detached scalar metrics."""

    loss: Tensor  # [] scalar
    metrics: dict[str, Tensor] = field(default_factory=dict)  # unprefixed names, e.g. "policy_loss", "kl"
    adv: Tensor | None = None  # [N] per-completion advantage (for sample tables)
