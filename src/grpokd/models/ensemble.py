"""The teacher ensemble: teachers scored one at a time under no_grad, mixed without stacking.

`TeacherEnsemble.score` runs each teacher over (prompt, completion) batches
and returns only what the objective declared it needs: the per-teacher
log-probs of the scored tokens [M, N, T] and weights [M, N, T] (teacher
agreement), and the weighted full-vocabulary mixtures (pbar / neg-entropy for
forward KD, lbar for reverse KD) accumulated by `kd.TeacherMixer`, so M
teachers never hold M [N, T, V] tensors. A teacher's logits are freed before
the next one runs; `chunk_prompts` bounds the rows scored at once.

Weighting w_i(s) (DESIGN.md section 2), each an unnormalised log-weight per
teacher and position, normalised over the teachers (softmax) and detached:
- `Uniform`: 1/M.
- `Static(weights)`: a fixed list.
- `Confidence(temperature)`: softmax_i(-H(p_i) / temperature) at each position.
- `Competence(temperature)`: softmax_i of each teacher's mean token
  log-likelihood of the prompt's gold solution / temperature (per prompt).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor
from transformers import PreTrainedModel

from grpokd.errors import ConfigError, check_range
from grpokd.models.lm import Tokens, completion_logits, token_logp
from grpokd.objectives.kd import Mixture, TeacherMixer
from grpokd.objectives.logits import Logits, per_position
from grpokd.objectives.functional import entropy, masked_mean


class Uniform:
    """w_i = 1/M."""

    needs_gold = False
    uses_logits = False  # the weight is known before the teacher runs

    def log_weight(self, index: int, logits: Tensor, gold_score: Tensor | None) -> Tensor:
        return torch.zeros(logits.shape[:-1], device=logits.device)  # [N, T]


class Static:
    """w_i fixed, from a list (normalised to sum 1)."""

    needs_gold = False
    uses_logits = False

    def __init__(self, weights: list[float]) -> None:
        if not weights or not all(math.isfinite(w) and w >= 0 for w in weights) or sum(weights) <= 0:
            raise ConfigError(f"weighting.weights={list(weights)}: give one non-negative weight per teacher, not all zero")
        total = sum(weights)
        self.weights = [w / total for w in weights]

    def check(self, num_teachers: int) -> None:
        if len(self.weights) != num_teachers:
            raise ConfigError(f"weighting.weights has {len(self.weights)} entries for {num_teachers} teachers; give one per teacher")

    def log_weight(self, index: int, logits: Tensor, gold_score: Tensor | None) -> Tensor:
        return torch.full(logits.shape[:-1], self.weights[index], device=logits.device).log()  # [N, T]


class _Tempered:
    """A weighting whose scores are divided by a temperature > 0 before the softmax over teachers."""

    needs_gold = False
    uses_logits = False

    def __init__(self, temperature: float = 1.0) -> None:
        check_range("weighting.temperature", temperature, low=0, low_open=True)
        self.temperature = temperature


class Confidence(_Tempered):
    """w_i proportional to exp(-H(p_i) / temperature) at each position: confident teachers weigh more."""

    uses_logits = True  # known only once the teacher has run: mixed with online-softmax log-weights

    def log_weight(self, index: int, logits: Tensor, gold_score: Tensor | None) -> Tensor:
        return -entropy(logits) / self.temperature  # [N, T]


class Competence(_Tempered):
    """w_i(s) proportional to exp(mean token log-likelihood of s's gold solution under teacher i / temperature)."""

    needs_gold = True

    def log_weight(self, index: int, logits: Tensor, gold_score: Tensor | None) -> Tensor:
        assert gold_score is not None, "Competence weighting needs the gold solutions' scores"
        return (gold_score[index] / self.temperature)[:, None].expand(logits.shape[:-1])  # [N, T]


@dataclass(frozen=True)
class TeacherScores:
    """What the teachers say about one set of states (N sequences, T tokens)."""

    weights: Tensor  # [M, N, T] normalised over M, detached
    logp: Tensor | None  # [M, N, T] log-probs of the scored tokens (tau = 1)
    mixture: Mixture | None  # tempered mixtures (pbar, neg_entropy, lbar)
    metrics: dict[str, Tensor]  # per teacher: kl_fwd/<name>, kl_rev/<name>, weight/<name>


class _Chunk(NamedTuple):
    """Teacher scores of one chunk of rows (n of the N)."""

    weights: Tensor  # [M, n, T]
    logp: Tensor | None  # [M, n, T]
    mixture: Mixture | None
    tokens: Tensor  # [] real tokens in the chunk
    kl_fwd: Tensor  # [M] KL(T_i || theta), token mean
    kl_rev: Tensor  # [M] KL(theta || T_i), token mean


class TeacherEnsemble(torch.nn.Module):
    """M frozen teachers sharing the student's tokenizer, with a weighting scheme.

    A module (the teachers in a ModuleList), so that the LightningModule holds the teachers as submodules:
    Lightning moves them with the student and FSDP can shard each one (see `grpokd.rollout.Frozen`).
    """

    def __init__(self, teachers: list[PreTrainedModel], names: list[str], weighting, chunk_prompts: int | None = None) -> None:
        super().__init__()
        if not teachers:
            raise ConfigError("model.teachers is empty; this objective needs at least one teacher")
        getattr(weighting, "check", lambda m: None)(len(teachers))
        self.teachers = torch.nn.ModuleList(t.eval().requires_grad_(False) for t in teachers)
        self.names = names
        self.weighting = weighting
        self.chunk_prompts = chunk_prompts

    @torch.no_grad()
    def gold_scores(self, prompts: Tokens, gold: Tokens, vocab_size: int) -> Tensor:
        """Each teacher's mean token log-likelihood of each prompt's gold solution: [M, B]."""
        mask = gold.mask.float()  # [B, T']
        return torch.stack([masked_mean(token_logp(completion_logits(t, prompts, gold, vocab_size), gold.ids), mask, dim=-1) for t in self.teachers])

    @torch.no_grad()
    def score(
        self,
        prompts: Tokens,
        completions: Tokens,
        student_logits: Logits,
        vocab_size: int,
        tau: float = 1.0,
        forward: bool = False,
        reverse: bool = False,
        logp: bool = False,
        gold_scores: Tensor | None = None,
        logp_temperature: float = 1.0,
    ) -> TeacherScores:
        """Score completions [N, T] of prompts [B, P] (N = B*K) with every teacher, one at a time.

        `student_logits` [N, T, V] (detached here; whole or chunked) only feed the per-teacher KL metrics.
        `logp` asks for each teacher's log-probs of the completion tokens at `logp_temperature`.
        `gold_scores` [M, B] are required by competence weighting.
        """
        group = completions.ids.shape[0] // prompts.ids.shape[0]
        chunk = self.chunk_prompts or prompts.ids.shape[0]
        parts = [
            self._score_rows(
                Tokens(prompts.ids[b : b + chunk], prompts.mask[b : b + chunk]),
                Tokens(completions.ids[b * group : (b + chunk) * group], completions.mask[b * group : (b + chunk) * group]),
                student_logits[b * group : (b + chunk) * group].detach(),
                vocab_size, tau, forward, reverse, logp, logp_temperature,
                None if gold_scores is None else gold_scores[:, b : b + chunk].repeat_interleave(group, 1),
            )
            for b in range(0, prompts.ids.shape[0], chunk)
        ]
        return _concat(parts, completions.mask.float())

    def _score_rows(
        self, prompts: Tokens, completions: Tokens, student_logits: Logits, vocab_size: int, tau: float,
        forward: bool, reverse: bool, logp: bool, logp_temperature: float, gold_score: Tensor | None,
    ) -> _Chunk:
        mixer = TeacherMixer(tau, forward=forward, reverse=reverse) if (forward or reverse) else None
        mask = completions.mask.float()  # [n, T]
        log_weights, logps, kl_fwd, kl_rev = [], [], [], []
        fixed = None  # [M, n, T] weights known before the teachers run: mixed directly, no online softmax
        if not self.weighting.uses_logits:
            positions = completions.mask.new_empty(*completions.mask.shape, 0)  # [n, T, 0]: carries the shape only
            fixed = torch.stack([self.weighting.log_weight(i, positions, gold_score) for i in range(len(self.teachers))]).softmax(0)
        for i, teacher in enumerate(self.teachers):
            logits = completion_logits(teacher, prompts, completions, vocab_size)  # [n, T, V]
            if fixed is None:
                log_weights.append(self.weighting.log_weight(i, logits.float(), gold_score))  # [n, T]
            if mixer is not None and fixed is None:
                mixer.add(logits, log_weight=log_weights[-1])
            elif mixer is not None:
                mixer.add(logits, weight=fixed[i])
            if logp:
                logps.append(token_logp(logits / logp_temperature, completions.ids))  # [n, T]
            forward_kl, reverse_kl = per_position(student_logits, kl_both_ways, logits)  # [n, T] each
            kl_fwd.append(masked_mean(forward_kl, mask))
            kl_rev.append(masked_mean(reverse_kl, mask))
            del logits  # one teacher's [n, T, V] at a time
        return _Chunk(
            weights=fixed if fixed is not None else torch.stack(log_weights).softmax(0),  # [M, n, T]
            logp=torch.stack(logps) if logp else None,  # [M, n, T]
            mixture=mixer.result() if mixer is not None else None,
            tokens=mask.sum(),
            kl_fwd=torch.stack(kl_fwd),  # [M]
            kl_rev=torch.stack(kl_rev),  # [M]
        )


def kl_both_ways(student_logits: Tensor, teacher_logits: Tensor) -> tuple[Tensor, Tensor]:
    """KL(T || theta) and KL(theta || T) at each position, from the two models' logits: [.., V] -> [..], [..]."""
    log_q = student_logits.float().log_softmax(-1)
    log_p = teacher_logits.float().log_softmax(-1)
    diff = log_p - log_q
    return torch.linalg.vecdot(log_p.exp(), diff), -torch.linalg.vecdot(log_q.exp(), diff)


def _concat(chunks: list[_Chunk], mask: Tensor) -> TeacherScores:
    """Join the row chunks; per-teacher metrics are token-weighted means over all rows."""
    weights = torch.cat([c.weights for c in chunks], 1)  # [M, N, T]
    logp = torch.cat([c.logp for c in chunks], 1) if chunks[0].logp is not None else None  # [M, N, T]
    mixture = None
    if chunks[0].mixture is not None:
        fields = zip(*(c.mixture for c in chunks))  # (pbar parts, neg_entropy parts, lbar parts)
        mixture = Mixture(*(None if parts[0] is None else torch.cat(parts, 0) for parts in fields))
    tokens = torch.stack([c.tokens for c in chunks])  # [chunks]
    share = (tokens / tokens.sum().clamp(min=1))[:, None]  # [chunks, 1]
    metrics = {
        "kl_fwd": (torch.stack([c.kl_fwd for c in chunks]) * share).sum(0),  # [M]
        "kl_rev": (torch.stack([c.kl_rev for c in chunks]) * share).sum(0),  # [M]
        "weight": masked_mean(weights, mask.expand_as(weights), dim=(1, 2)),  # [M]
    }
    return TeacherScores(weights, logp, mixture, metrics)
