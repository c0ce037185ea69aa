"""Multi-teacher distillation terms: teacher mixtures, forward/reverse Hinton KD, teacher agreement.

Pure tensor functions (and one accumulator) for the GRPO-KD objectives J', J'', J'''
(paper "Multi-Teacher Knowledge Distillation Augmented GRPO", Eq. 7-14;
DESIGN.md section 2). Shapes: M teachers, N sequences, T tokens, V vocabulary.

Multi-teacher without multiplying memory. With p_i = softmax(z_Ti / tau),
q = softmax(z_S / tau) and weights w_i (sum 1 over teachers at each position,
detached), the weighted sums of Hinton divergences need only running mixtures:

    sum_i w_i D_H(T_i || theta) = tau^2 [ sum_i w_i sum_a p_i log p_i - sum_a pbar log q ],  pbar = sum_i w_i p_i
    sum_i w_i D_H(theta || T_i) = tau^2 [ sum_a q log q - sum_a q lbar ],                     lbar = sum_i w_i log p_i

`TeacherMixer` builds pbar, the weighted neg-entropy and lbar one teacher at a
time, so M teachers' [N, T, V] tensors are never stacked.
"""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from grpokd.objectives.base import Batch, KDStates
from grpokd.objectives.logits import Logits, per_position
from grpokd.objectives.functional import check_choice, group_advantages, masked_mean

KD_STATES = ("rollouts", "gold")  # where KD is evaluated: the sampled completions or the gold solutions

class Mixture(NamedTuple):
    """The running mixtures of `TeacherMixer.result()`; a field is None when it was not requested."""

    pbar: Tensor | None  # [N, T, V] sum_i w_i p_i
    neg_entropy: Tensor | None  # [N, T] sum_i w_i sum_a p_i log p_i
    lbar: Tensor | None  # [N, T, V] sum_i w_i log p_i


class TeacherMixer:
    """Accumulate teachers' tempered distributions into weighted mixtures, one teacher at a time.

    Keeps (float32, only what was asked for): pbar = sum_i w_i p_i [N, T, V] and
    neg_entropy = sum_i w_i sum_a p_i log p_i [N, T] (forward KD), and
    lbar = sum_i w_i log p_i [N, T, V] (reverse KD), with p_i = softmax(z_Ti / tau).
    Memory: one or two [N, T, V] buffers plus one teacher's temporaries,
    whatever M is. Inputs are detached (teachers and weights get no gradient).

    Two ways to give the weights; one mixer uses one of them:
    - `add(z, weight=w)`: w_i already normalised across teachers (sum_i w_i = 1
      at each position), e.g. uniform 1/M, a static list, or competence weights.
    - `add(z, log_weight=s)`: w_i = exp(s_i) / sum_j exp(s_j) per position,
      known only up to normalisation until every teacher has been seen (e.g.
      confidence weighting, s_i = -H(p_i)). The buffers hold sums scaled by
      exp(s_i - m) with m the running max of s over the teachers so far
      (online softmax); when a larger s arrives the buffers are rescaled by
      exp(m_old - m_new). `result()` divides by the running normaliser, so it
      equals the normalised mixture. Log-weights may be -inf for some
      teachers, not for all of them at one position.

    Args:
        tau: temperature > 0 of the teachers' distributions.
        forward: keep pbar and neg_entropy.
        reverse: keep lbar.
    """

    def __init__(self, tau: float, forward: bool = True, reverse: bool = False) -> None:
        if tau <= 0:
            raise ValueError(f"tau={tau} must be > 0")
        if not (forward or reverse):
            raise ValueError("forward=False and reverse=False: the mixer would keep nothing")
        self.tau = tau
        self.forward = forward
        self.reverse = reverse
        self.count = 0  # teachers added
        self._unnormalised: bool | None = None  # which weighting this mixer uses, fixed by the first add
        self._pbar: Tensor | None = None  # [N, T, V]
        self._neg_entropy: Tensor | None = None  # [N, T]
        self._lbar: Tensor | None = None  # [N, T, V]
        self._max: Tensor | None = None  # [N, T] running max of the log-weights (unnormalised mode)
        self._norm: Tensor | None = None  # [N, T] running sum of exp(log_weight - max) (unnormalised mode)

    @torch.no_grad()
    def add(
        self, teacher_logits: Tensor, weight: Tensor | float | None = None, log_weight: Tensor | None = None
    ) -> None:
        """Add one teacher with weight `weight` (normalised) or `log_weight` (unnormalised); give exactly one.

        Args:
            teacher_logits: [N, T, V] the teacher's untempered logits.
            weight: [N, T] or broadcastable (a float, [N, 1], ...), sum 1 over the teachers.
            log_weight: [N, T] or broadcastable, log of an unnormalised weight.
        """
        if (weight is None) == (log_weight is None):
            raise ValueError("give exactly one of weight (normalised) and log_weight (unnormalised)")
        unnormalised = log_weight is not None
        if self._unnormalised is None:
            self._unnormalised = unnormalised
        elif self._unnormalised != unnormalised:
            raise ValueError("a TeacherMixer takes either weight or log_weight for every teacher, not both")
        log_p = F.log_softmax(teacher_logits.detach().float() / self.tau, dim=-1)  # [N, T, V]
        position_shape = log_p.shape[:-1]  # (N, T)
        given = log_weight if unnormalised else weight
        given = torch.as_tensor(given).detach().float().to(log_p.device).expand(position_shape)  # [N, T]
        scale = self._rescale(given) if unnormalised else given  # [N, T]
        # p and log_p are this teacher's own fresh tensors: scaled in place to hold one [N, T, V] temporary less
        if self.forward:
            p = log_p.exp()  # [N, T, V]
            self._neg_entropy = _accumulate(self._neg_entropy, scale * (p * log_p).sum(-1))  # [N, T]
            self._pbar = _accumulate(self._pbar, p.mul_(scale[..., None]))  # [N, T, V]
        if self.reverse:
            self._lbar = _accumulate(self._lbar, log_p.mul_(scale[..., None]))  # [N, T, V]
        self.count += 1

    def _rescale(self, log_weight: Tensor) -> Tensor:
        """Online-softmax step: update the running max and normaliser, rescale the buffers.

        Returns this teacher's scale exp(s_i - m_new) [N, T].
        """
        new_max = log_weight if self._max is None else torch.maximum(self._max, log_weight)  # [N, T]
        safe_max = torch.where(torch.isfinite(new_max), new_max, torch.zeros_like(new_max))  # [N, T] no (-inf) - (-inf)
        if self._max is not None:
            decay = torch.exp(self._max - safe_max)  # [N, T] exp(m_old - m_new) <= 1
            self._decay(decay)
            self._norm = self._norm * decay  # [N, T]
        self._max = new_max
        scale = torch.exp(log_weight - safe_max)  # [N, T] exp(s_i - m_new)
        self._norm = _accumulate(self._norm, scale)  # [N, T]
        return scale

    def _decay(self, decay: Tensor) -> None:
        """Multiply the buffers by `decay` [N, T] in place."""
        if self.forward:
            self._pbar.mul_(decay[..., None])
            self._neg_entropy.mul_(decay)
        if self.reverse:
            self._lbar.mul_(decay[..., None])

    def result(self) -> Mixture:
        """The mixtures (normalised); None for those not requested. Raises if no teacher was added."""
        if self.count == 0:
            raise ValueError("TeacherMixer.result() before any teacher was added")
        if not self._unnormalised:
            return Mixture(self._pbar, self._neg_entropy, self._lbar)
        norm = self._norm  # [N, T]
        return Mixture(
            self._pbar / norm[..., None] if self.forward else None,  # [N, T, V]
            self._neg_entropy / norm if self.forward else None,  # [N, T]
            self._lbar / norm[..., None] if self.reverse else None,  # [N, T, V]
        )

    def kd_states(self, logits: Logits, mask: Tensor) -> KDStates:
        """The student's logits [N, T, V] (with grad) and mask [N, T] bundled with this mixture."""
        pbar, neg_entropy, lbar = self.result()
        return KDStates(logits=logits, mask=mask, tau=self.tau, pbar=pbar, neg_entropy=neg_entropy, lbar=lbar)


def _accumulate(total: Tensor | None, term: Tensor) -> Tensor:
    """total + term, in place into total; the first term becomes the total (terms are freshly computed tensors)."""
    if total is None:
        return term
    return total.add_(term)


def forward_kd(kd: KDStates) -> Tensor:
    """Weighted forward Hinton KD at each position: sum_i w_i D_H(T_i || theta) (paper Eq. 7-9).

        sum_i w_i tau^2 KL(p_i || q) = tau^2 (neg_entropy - sum_a pbar(a) log q(a)),  q = softmax(z_S / tau)

    valid because sum_i w_i = 1. Gradient flows to kd.logits only
    (d/dz_S = tau (q - pbar)). Computed in float32.

    Args:
        kd: logits [N, T, V] (student, with grad; whole or `ChunkedLogits`), tau, pbar [N, T, V], neg_entropy [N, T].

    Returns:
        [N, T].
    """
    if kd.pbar is None or kd.neg_entropy is None:
        raise ValueError("forward_kd needs kd.pbar and kd.neg_entropy (a forward TeacherMixer)")
    cross = per_position(kd.logits, partial(_cross_entropy_sum, tau=kd.tau), kd.pbar.detach())  # [N, T]
    return kd.tau**2 * (kd.neg_entropy.detach() - cross)  # [N, T]


def _cross_entropy_sum(logits: Tensor, pbar: Tensor, tau: float) -> Tensor:
    """sum_a pbar(a) log q(a), q = softmax(logits / tau): [.., V], [.., V] -> [..]."""
    return (pbar * F.log_softmax(logits.float() / tau, dim=-1)).sum(-1)


def reverse_kd(kd: KDStates) -> Tensor:
    """Weighted reverse Hinton KD at each position: sum_i w_i D_H(theta || T_i) (paper Eq. 10-11).

        sum_i w_i tau^2 KL(q || p_i) = tau^2 (sum_a q log q - sum_a q(a) lbar(a)),  lbar = sum_i w_i log p_i

    valid because sum_i w_i = 1. Gradient flows to kd.logits only. Float32.

    Args:
        kd: logits [N, T, V] (student, with grad; whole or `ChunkedLogits`), tau, lbar [N, T, V].

    Returns:
        [N, T].
    """
    if kd.lbar is None:
        raise ValueError("reverse_kd needs kd.lbar (a reverse TeacherMixer)")
    return kd.tau**2 * per_position(kd.logits, partial(_reverse_divergence, tau=kd.tau), kd.lbar.detach())  # [N, T]


def _reverse_divergence(logits: Tensor, lbar: Tensor, tau: float) -> Tensor:
    """sum_a q(a) (log q(a) - lbar(a)), q = softmax(logits / tau): [.., V], [.., V] -> [..]."""
    log_q = F.log_softmax(logits.float() / tau, dim=-1)
    return (log_q.exp() * (log_q - lbar)).sum(-1)


def sequence_weights(teacher_weights: Tensor, mask: Tensor) -> Tensor:
    """Sequence-level teacher weights w_i(s) from per-position ones: masked mean over tokens, renormalised.

    Equal to the weights themselves when they are constant along a sequence
    (uniform, static, competence). A sequence with no tokens gets uniform 1/M.

    Args:
        teacher_weights: [M, N, T], sum 1 over M at each position.
        mask: [N, T].

    Returns:
        [M, N], sum 1 over M, detached.
    """
    w = masked_mean(teacher_weights.detach().float(), mask, dim=-1)  # [M, N]
    total = w.sum(0, keepdim=True)  # [1, N]
    uniform = torch.full_like(w, 1.0 / w.shape[0])  # [M, N]
    return torch.where(total > 0, w / total.clamp(min=1e-30), uniform)  # [M, N]


def teacher_agreement(teacher_logp: Tensor, weights: Tensor, mask: Tensor, length_normalize: bool = False) -> Tensor:
    """Teacher agreement, paper Eq. 12: TA(o, s) = log sum_i w_i(s) pi_Ti(o | s), in log space.

        TA = logsumexp_i ( log w_i + sum_t log pi_Ti(o_t | s, o_<t) )

    Departure (DESIGN.md): the sequence log-probability lets long completions
    dominate; `length_normalize=True` uses the token mean of log pi_Ti instead
    of the sum (the log of the mixture of per-token geometric means). The sum
    is the paper's and the default. Padded positions are ignored.

    Args:
        teacher_logp: [M, N, T] each teacher's log-probs of the completion tokens.
        weights: [M, N] sequence-level w_i(s), sum 1 over M.
        mask: [N, T].
        length_normalize: token mean instead of token sum.

    Returns:
        [N] detached (the teachers' score is a reward-like signal, not differentiated).
    """
    logp = torch.where(mask.bool(), teacher_logp.detach().float(), 0.0)  # [M, N, T] padding may hold -inf
    if length_normalize:
        seq = masked_mean(logp, mask, dim=-1)  # [M, N]
    else:
        seq = logp.sum(-1)  # [M, N]
    return torch.logsumexp(seq + weights.detach().float().log(), dim=0)  # [N]


def group_normalize(x: Tensor, group_size: int, delta: float = 1e-4) -> Tensor:
    """Group normalisation of a per-completion score, paper Eq. 13: norm_G(x) = (x - mean_G x) / (std_G x + delta).

    Population std over each group of `group_size` consecutive rows; a
    constant group gives 0. (The same as the reward advantage, Eq. 1.)

    Args:
        x: [N]; group_size: K; delta: > 0.

    Returns:
        [N].
    """
    return group_advantages(x, group_size, "group", delta)  # [N]



def check_kd_args(tau: float, kd_states: str) -> None:
    """Validate the temperature and where KD is evaluated (shared by J', J'', J''')."""
    if tau <= 0:
        raise ValueError(f"tau={tau} must be > 0")
    check_choice("kd_states", kd_states, KD_STATES)


def require_kd(batch: Batch, tau: float, who: str) -> KDStates:
    """batch.kd, checked to be present and mixed at the objective's temperature."""
    if batch.kd is None:
        raise ValueError(f"{who} needs batch.kd (the teachers' mixture at the KD states)")
    if batch.kd.tau != tau:
        raise ValueError(f"batch.kd was mixed at tau={batch.kd.tau}, {who} uses tau={tau}")
    return batch.kd
