"""Multi-teacher distillation math: forward/reverse Hinton KD to the teachers' mixtures, teacher agreement.

Pure tensor functions for the GRPO-KD objectives J', J'', J'''
(paper "Multi-Teacher Knowledge Distillation Augmented GRPO", Eq. 7-14).
Shapes: M teachers, N sequences, T tokens, V vocabulary.

Multi-teacher without multiplying memory. With p_i = softmax(z_Ti / tau),
q = softmax(z_S / tau) and weights w_i (sum 1 over teachers at each position,
detached), the weighted sums of Hinton divergences need only running mixtures:

    sum_i w_i D_H(T_i || theta) = tau^2 [ sum_i w_i sum_a p_i log p_i - sum_a pbar log q ],  pbar = sum_i w_i p_i
    sum_i w_i D_H(theta || T_i) = tau^2 [ sum_a q log q - sum_a q lbar ],                     lbar = sum_i w_i log p_i

`grpokd.teachers.TeacherMixer` builds pbar, the weighted neg-entropy and lbar
one teacher at a time, so M teachers' [N, T, V] tensors are never stacked;
they reach the terms here in `KDStates`.
"""

from __future__ import annotations

import math
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor

from grpokd.errors import check_range
from grpokd.objectives.base import Batch, KDStates, TopK
from grpokd.objectives.functional import check_choice, group_advantages, masked_mean
from grpokd.objectives.logits import per_position

KD_STATES = ("rollouts", "gold")  # where KD is evaluated: the sampled completions or the gold solutions

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
    if kd.top_k is not None:
        return sparse_kd(kd, reverse=False)  # [N, T]
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
    if kd.top_k is not None:
        return sparse_kd(kd, reverse=True)  # [N, T]
    if kd.lbar is None:
        raise ValueError("reverse_kd needs kd.lbar (a reverse TeacherMixer)")
    return kd.tau**2 * per_position(kd.logits, partial(_reverse_divergence, tau=kd.tau), kd.lbar.detach())  # [N, T]


def _reverse_divergence(logits: Tensor, lbar: Tensor, tau: float) -> Tensor:
    """sum_a q(a) (log q(a) - lbar(a)), q = softmax(logits / tau): [.., V], [.., V] -> [..]."""
    log_q = F.log_softmax(logits.float() / tau, dim=-1)
    return (log_q.exp() * (log_q - lbar)).sum(-1)


def sparse_kd(kd: KDStates, reverse: bool) -> Tensor:
    """sum_i w_i tau^2 KL(p_i || q) (KL(q || p_i) with `reverse`) on each teacher's k + 1 outcomes (`TopK`); with
    GOLD's hybrid (`Unmatched`) teacher i's term is (1 - share_i) times that plus share_i times ULD's sorted L1
    distance on the unmatched tokens (`sorted_distance`, symmetric, not scaled by tau^2). [N, T]."""
    top = kd.top_k
    divergence = partial(sparse_divergences, tau=kd.tau, reverse=reverse)
    if top.unmatched is None:
        return kd.tau**2 * per_position(kd.logits, divergence, top.index, top.logp, top.tail, top.weight)  # [N, T]
    share = top.unmatched.share.to(top.weight)  # [M]
    matched = kd.tau**2 * per_position(kd.logits, divergence, top.index, top.logp, top.tail, top.weight * (1 - share))  # [N, T]
    distance = partial(sorted_distance, student=top.unmatched.student, tau=kd.tau)
    return matched + per_position(kd.logits, distance, top.unmatched.logp, top.weight * share)  # [N, T]


def sorted_distance(logits: Tensor, logp: Tensor, weight: Tensor, student: Tensor, tau: float) -> Tensor:
    """ULD's distance (Boizard et al. 2024) on the tokens each side has no counterpart for, as GOLD's hybrid uses it:
    sum_i w_i sum_{r<k} |q_(r) - p_i(r)|, q_(r) the r-th largest of the student's probabilities on the tokens in
    `student[i]` (0 past their number), p_i(r) teacher i's r-th largest on its unmatched tokens.

    Args:
        logits: [.., V] the student's (untempered); q = softmax(logits / tau).
        logp: [.., M, k] each teacher's unmatched log-probs at tau, descending (-inf: fewer than k).
        weight: [.., M].
        student: [M, V] bool.

    Returns:
        [..].
    """
    q = F.softmax(logits.float() / tau, dim=-1)  # [.., V]
    k = logp.shape[-1]
    distances = []
    for i in range(logp.shape[-2]):  # one [.., V] at a time
        ranked = q.masked_fill(~student[i].to(q.device), 0.0).topk(min(k, q.shape[-1]), dim=-1).values  # [.., k'] descending
        ranked = F.pad(ranked, (0, k - ranked.shape[-1]))  # [.., k]
        distances.append((ranked - logp[..., i, :].float().exp()).abs().sum(-1))  # [..]
    return (weight.float() * torch.stack(distances, -1)).sum(-1)  # [..]


def sparse_divergences(
    logits: Tensor, index: Tensor, logp: Tensor, tail: Tensor, weight: Tensor, tau: float, reverse: bool
) -> Tensor:
    """sum_i w_i KL(p_i || q) (or KL(q || p_i) with `reverse`) on each teacher's k + 1 outcomes: its top-k tokens
    S_i and the tail bucket, q(tail) = 1 - q(S_i) taken as the student's mass outside S_i (`TopK`).

    Args:
        logits: [.., V] the student's (untempered); q = softmax(logits / tau).
        index, logp: [.., M, k] each teacher's top-k tokens and their log-probs at tau (-inf: an absent entry).
        tail: [.., M] each teacher's log tail mass (-inf when k = V).
        weight: [.., M] w_i, sum 1 over M.

    Returns:
        [..].
    """
    log_q = F.log_softmax(logits.float() / tau, dim=-1)  # [.., V]
    teachers, k = index.shape[-2:]
    log_q_top = log_q.unsqueeze(-2).expand(*log_q.shape[:-1], teachers, log_q.shape[-1]).gather(-1, index)  # [.., M, k]
    # an entry at log p = -inf is absent (a list of fewer than k tokens is filled so, with a token it holds:
    # `sources.Sparse.top_k`): it adds 0 both ways, and its log p is made finite first so no inf * 0 reaches the gradient
    absent = logp == -math.inf  # [.., M, k]
    kl = _kl_summand(log_q_top, logp.float().masked_fill(absent, 0.0), reverse).masked_fill(absent, 0.0).sum(-1)  # [.., M] over S_i
    if k < log_q.shape[-1]:  # plus the tail; the student's is its mass outside S_i, one teacher at a time ([.., V] each)
        log_q_tail = torch.stack([log_q.scatter(-1, index[..., i, :], -math.inf).logsumexp(-1) for i in range(teachers)], -1)  # [.., M]
        kl = kl + _kl_summand(log_q_tail, tail.float(), reverse)
    return (weight.float() * kl).sum(-1)  # [..]


def _kl_summand(log_q: Tensor, log_p: Tensor, reverse: bool) -> Tensor:
    """One outcome's share of KL(p || q), p (log p - log q), or of KL(q || p) with `reverse`."""
    if reverse:
        log_p, log_q = log_q, log_p
    return log_p.exp() * (log_p - log_q)


def sparse_mixture(top_k: TopK) -> tuple[Tensor, Tensor]:
    """The teachers' mixture pbar restricted to the union of their top-k sets: (tokens, pbar(token)), [N, T, M*k]
    each; a token kept by several teachers appears once (its other entries have probability 0), and a teacher
    contributes nothing to a token outside its own top k (its tail is not spread over the vocabulary).
    Sorting the tokens puts a token's entries side by side; their probabilities are summed there."""
    tokens = top_k.index.flatten(-2)  # [N, T, J], J = M*k
    probs = (top_k.weight.float()[..., None] * top_k.logp.float().exp()).flatten(-2)  # [N, T, J] w_i p_i(a)
    tokens, order = tokens.sort(-1)
    probs = probs.gather(-1, order)
    first = torch.ones_like(tokens, dtype=torch.bool)
    first[..., 1:] = tokens[..., 1:] != tokens[..., :-1]  # the first entry of each distinct token
    segment = first.long().cumsum(-1) - 1  # [N, T, J] which distinct token each entry is
    summed = torch.zeros_like(probs).scatter_add_(-1, segment, probs)  # [N, T, J] pbar of the s-th distinct token
    return tokens, torch.where(first, summed.gather(-1, segment), 0.0)  # pbar at the first entry of each token, 0 elsewhere


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

    Departure from the paper: the sequence log-probability lets long completions
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
    check_range("tau", tau, low=0, low_open=True)
    check_choice("states", kd_states, KD_STATES)


def require_kd(batch: Batch, tau: float, who: str) -> KDStates:
    """batch.kd, checked to be present and mixed at the objective's temperature."""
    if batch.kd is None:
        raise ValueError(f"{who} needs batch.kd (the teachers' mixture at the KD states)")
    if batch.kd.tau != tau:
        raise ValueError(f"batch.kd was mixed at tau={batch.kd.tau}, {who} uses tau={tau}")
    return batch.kd
