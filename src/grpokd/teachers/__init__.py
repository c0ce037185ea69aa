"""The teachers: their ensemble, how they are weighted, how their distributions are mixed, and how they are scored.

`TeacherEnsemble.score` asks each teacher source (`teachers.sources`: a model
in this process, or one served by a vLLM server, `teachers.served`) for its
signal on (prompt, completion) batches under no_grad, and returns only what
the objective declared it needs: the
per-teacher log-probs of the scored tokens [M, N, T] and weights [M, N, T]
(teacher agreement), and the weighted full-vocabulary mixtures (pbar /
neg-entropy for forward KD, lbar for reverse KD) accumulated by
`TeacherMixer`, so M teachers never hold M [N, T, V] tensors. A teacher's
logits are freed before the next one runs; `chunk_prompts` bounds the rows
scored at once. `score_teachers` asks the ensemble for what one step's
`Needs` ask, on the rollout or on the gold solutions.

Multi-teacher without multiplying memory. With p_i = softmax(z_Ti / tau),
q = softmax(z_S / tau) and weights w_i (sum 1 over teachers at each position,
detached), the weighted sums of Hinton divergences need only running mixtures
(`grpokd.objectives.kd.forward_kd` / `reverse_kd` read them):

    sum_i w_i D_H(T_i || theta) = tau^2 [ sum_i w_i sum_a p_i log p_i - sum_a pbar log q ],  pbar = sum_i w_i p_i
    sum_i w_i D_H(theta || T_i) = tau^2 [ sum_a q log q - sum_a q lbar ],                     lbar = sum_i w_i log p_i

Weightings w_i(s), each an unnormalised log-weight per teacher and position,
normalised over the teachers (softmax) and detached (`conf/weighting/`):
- `Uniform`: 1/M.
- `Static(weights)`: a fixed list.
- `Confidence(temperature)`: softmax_i(-H(p_i) / temperature) at each position.
- `Competence(temperature)`: softmax_i of each teacher's mean token
  log-likelihood of the prompt's gold solution / temperature (per prompt).
- `Route(routes)`: 1 for the teacher each example is routed to (by its data's
  `teacher` field or its dataset component), 0 for the others.

With `model.teacher_top_k` the KD terms get each teacher's top-k log-probs and
a tail bucket (`TopKMixer`, `objectives.base.TopK`) instead of the mixtures.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from grpokd.errors import ConfigError, check_range
from grpokd.models.lm import Tokens
from grpokd.objectives.base import KDStates, Needs, TopK, Unmatched
from grpokd.objectives.functional import masked_mean
from grpokd.objectives.logits import Logits
from grpokd.rollout import Rollout
from grpokd.teachers.sources import Dense, Signal, TeacherSource, Texts


class Mixture(NamedTuple):
    """What the KD terms read of the teachers: the running mixtures of `TeacherMixer.result()` (a field is None when
    it was not requested), or with `model.teacher_top_k` each teacher's sparse signal (`TopKMixer.result()`)."""

    pbar: Tensor | None  # [N, T, V] sum_i w_i p_i
    neg_entropy: Tensor | None  # [N, T] sum_i w_i sum_a p_i log p_i
    lbar: Tensor | None  # [N, T, V] sum_i w_i log p_i
    top_k: TopK | None = None  # each teacher's top-k log-probs and tail, instead of the three above


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
        check_range("tau", tau, low=0, low_open=True)
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
    def add(self, teacher: Signal | Tensor, weight: Tensor | float | None = None, log_weight: Tensor | None = None) -> None:
        """Add one teacher with weight `weight` (normalised) or `log_weight` (unnormalised); give exactly one.

        Args:
            teacher: its signal, whose full [N, T, V] logits are read (`Signal.mixable`), or those logits.
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
        log_p = F.log_softmax(as_signal(teacher).mixable().detach().float() / self.tau, dim=-1)  # [N, T, V]
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
        return KDStates(logits, mask, self.tau, *self.result())


def as_signal(teacher: Signal | Tensor) -> Signal:
    """A teacher's signal, or its [N, T, V] logits taken as one (`Dense`)."""
    return Dense(teacher) if isinstance(teacher, Tensor) else teacher


def _accumulate(total: Tensor | None, term: Tensor) -> Tensor:
    """total + term, in place into total; the first term becomes the total (terms are freshly computed tensors)."""
    if total is None:
        return term
    return total.add_(term)


class TopKMixer:
    """Keep each teacher's top-k log-probabilities and tail bucket at temperature tau (`TopK`), one teacher at a time.

    The same `add` (normalised `weight` or unnormalised `log_weight`) and `result` as `TeacherMixer`; the weights
    are normalised over the teachers in `result`, once all are known. Holds (8 + 4) bytes * k per teacher and
    position instead of one or two float32 [N, T, V] mixtures.

    Args:
        tau: temperature > 0 of the teachers' distributions.
        k: tokens kept per teacher and position, 1 <= k <= V.
    """

    def __init__(self, tau: float, k: int) -> None:
        check_range("tau", tau, low=0, low_open=True)
        check_range("model.teacher_top_k", k, low=1, integer=True)
        self.tau, self.k = tau, k
        self.count = 0
        self._unnormalised: bool | None = None
        self._index: list[Tensor] = []  # [N, T, k] per teacher
        self._logp: list[Tensor] = []  # [N, T, k]
        self._tail: list[Tensor] = []  # [N, T]
        self._weight: list[Tensor] = []  # [N, T] weight or log-weight
        self._defined: list[Tensor | None] = []  # [N, T] where each teacher has a next-token view (None: everywhere)
        self._unmatched: list[Unmatched | None] = []  # GOLD's hybrid part of a teacher with its own tokenizer (None: without)

    @torch.no_grad()
    def add(self, teacher: Signal | Tensor, weight: Tensor | float | None = None, log_weight: Tensor | None = None) -> None:
        """Add one teacher (its signal, or [N, T, V] untempered logits) with `weight` (normalised) or `log_weight`; give exactly one."""
        if (weight is None) == (log_weight is None):
            raise ValueError("give exactly one of weight (normalised) and log_weight (unnormalised)")
        unnormalised = log_weight is not None
        if self._unnormalised not in (None, unnormalised):
            raise ValueError("a TopKMixer takes either weight or log_weight for every teacher, not both")
        self._unnormalised = unnormalised
        signal = as_signal(teacher)
        index, values, tail = signal.top_k(self.k, self.tau)  # [N, T, k] twice, [N, T]
        self._defined.append(signal.defined())
        self._unmatched.append(signal.unmatched(self.k, self.tau))
        self._index.append(index)
        self._logp.append(values)
        self._tail.append(tail)
        given = log_weight if unnormalised else weight
        self._weight.append(torch.as_tensor(given).detach().float().to(values.device).expand(values.shape[:-1]))  # [N, T]
        self.count += 1

    def result(self) -> Mixture:
        """`Mixture(None, None, None, TopK)`, teachers stacked on dim 2. Raises if no teacher was added."""
        if self.count == 0:
            raise ValueError("TopKMixer.result() before any teacher was added")
        weight = torch.stack(self._weight, -1)  # [N, T, M]
        if self._unnormalised:
            weight = weight.softmax(-1)
        if any(d is not None for d in self._defined):  # a teacher without a view at a position gets no weight there
            defined = torch.stack([torch.ones_like(w, dtype=torch.bool) if d is None else d for d, w in zip(self._defined, self._weight)], -1)  # [N, T, M]
            weight = weight * defined
            weight = weight / weight.sum(-1, keepdim=True).clamp(min=torch.finfo(weight.dtype).tiny)  # 0 where no teacher has one
        top_k = TopK(torch.stack(self._index, -2), torch.stack(self._logp, -2), torch.stack(self._tail, -1), weight, self._stacked_unmatched())
        return Mixture(None, None, None, top_k)

    def _stacked_unmatched(self) -> Unmatched | None:
        """The teachers' `Unmatched` parts on dim 2 (dim 0 for student, share); a teacher without one has share 0."""
        given = [u for u in self._unmatched if u is not None]
        if not given:
            return None
        none = Unmatched(torch.full_like(self._logp[0], -math.inf), torch.zeros_like(given[0].student), torch.zeros_like(given[0].share))
        parts = [none if u is None else u for u in self._unmatched]
        return Unmatched(torch.stack([u.logp for u in parts], -2), torch.stack([u.student for u in parts]), torch.stack([u.share for u in parts]))


class Uniform:
    """w_i = 1/M."""

    needs_gold = False
    uses_logits = False  # the weight is known before the teacher runs

    def log_weight(self, index: int, logits: Tensor, gold_score: Tensor | None = None, route: Tensor | None = None) -> Tensor:
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

    def log_weight(self, index: int, logits: Tensor, gold_score: Tensor | None = None, route: Tensor | None = None) -> Tensor:
        return torch.full(logits.shape[:-1], self.weights[index], device=logits.device).log()  # [N, T]


class _TemperatureWeighting:
    """A weighting whose scores are divided by a temperature > 0 before the softmax over teachers."""

    needs_gold = False
    uses_logits = False

    def __init__(self, temperature: float = 1.0) -> None:
        check_range("weighting.temperature", temperature, low=0, low_open=True)
        self.temperature = temperature


class Confidence(_TemperatureWeighting):
    """w_i proportional to exp(-H(p_i) / temperature) at each position: confident teachers weigh more."""

    uses_logits = True  # known only once the teacher has run (from its signal): mixed with online-softmax log-weights

    def log_weight(self, index: int, logits: Signal | Tensor, gold_score: Tensor | None = None, route: Tensor | None = None) -> Tensor:
        return as_signal(logits).confidence() / self.temperature  # [N, T]


class Competence(_TemperatureWeighting):
    """w_i(s) proportional to exp(mean token log-likelihood of s's gold solution under teacher i / temperature)."""

    needs_gold = True

    def log_weight(self, index: int, logits: Tensor, gold_score: Tensor | None = None, route: Tensor | None = None) -> Tensor:
        assert gold_score is not None, "Competence weighting needs the gold solutions' scores"
        return (gold_score[index] / self.temperature)[:, None].expand(logits.shape[:-1])  # [N, T]


class Route:
    """w_i = 1 for the one teacher each example is routed to, 0 for the others: per-sample routing, the
    multi-teacher on-policy distillation of verl, NeMo-RL and TRL's async trainer, beside the mixtures above.

    An example goes to the teacher its data names (a jsonl row's `teacher` field), else to its dataset
    component's teacher in `routes` (component -> teacher name; `dataset=mix`'s components, or a single
    dataset's name). Names are the teachers' as in their metrics (teacher/weight/<name>). The weights are
    known before the teachers run; a teacher gets no gradient signal from rows not routed to it.

    Args:
        routes: dataset component -> teacher name (None: no route).
    """

    needs_gold = False
    uses_logits = False

    def __init__(self, routes: dict[str, str | None] | None = None) -> None:
        self.routes = {component: teacher for component, teacher in (routes or {}).items() if teacher is not None}

    def check_routes(self, teachers: list[str], examples: list) -> None:
        """Every route names a teacher and a component of the data, and every example has a teacher: ConfigError if not."""
        components = list(dict.fromkeys(ex.component for ex in examples))
        for component, teacher in self.routes.items():
            if component not in components:
                raise ConfigError(f"weighting.routes.{component}: no such dataset component; the components are {', '.join(components)}")
            if teacher not in teachers:
                raise ConfigError(f"weighting.routes.{component}={teacher}: no such teacher; the teachers are {', '.join(teachers)}")
        for ex in examples:
            if ex.teacher is not None and ex.teacher not in teachers:
                raise ConfigError(f"an example of {ex.component} names teacher {ex.teacher!r} in its data; the teachers are {', '.join(teachers)}")
            if ex.teacher is None and ex.component not in self.routes:
                raise ConfigError(
                    f"weighting=route: examples of {ex.component} name no teacher; set weighting.routes.{ex.component}=<teacher> "
                    f"(the teachers are {', '.join(teachers)})"
                )

    def assign(self, teachers: list[str], components: list[str], named: list[str | None]) -> list[int]:
        """The teacher index of each prompt: its own named teacher, else its component's."""
        return [teachers.index(teacher if teacher is not None else self.routes[component]) for component, teacher in zip(components, named)]

    def log_weight(self, index: int, logits: Tensor, gold_score: Tensor | None = None, route: Tensor | None = None) -> Tensor:
        assert route is not None, "route weighting needs each row's teacher"
        return torch.where(route == index, 0.0, -math.inf)[:, None].expand(logits.shape[:-1])  # [N, T]


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
    """M frozen teachers with a weighting scheme (one with its own tokenizer is read at the student's tokens: `teachers.cross`).

    Each teacher is a source (`teachers.sources`): a model in this process or a served one; the ensemble
    reads their signals through one interface. A module (the sources in a ModuleList), so that the LightningModule
    holds the in-process teachers as submodules: Lightning moves them with the student and FSDP can shard each one
    (see `grpokd.scoring.FrozenModels`).
    """

    def __init__(self, sources: list[TeacherSource], weighting, chunk_prompts: int | None = None, top_k: int | None = None) -> None:
        super().__init__()
        if not sources:
            raise ConfigError("model.teachers is empty; this objective needs at least one teacher")
        if top_k is not None:
            check_range("model.teacher_top_k", top_k, low=1, integer=True)
        getattr(weighting, "check", lambda m: None)(len(sources))
        self.teachers = torch.nn.ModuleList(sources)
        self.names = [source.name for source in sources]
        self.weighting = weighting
        self.chunk_prompts = chunk_prompts
        self.top_k = top_k  # keep each teacher's top-k log-probs and a tail bucket for the KD terms (`TopK`); None: full

    def mixer(self, tau: float, forward: bool, reverse: bool) -> TeacherMixer | TopKMixer | None:
        """What collects the teachers for the KD terms: their top-k signals, or the full-vocabulary mixtures asked for."""
        if not (forward or reverse):
            return None
        return TopKMixer(tau, self.top_k) if self.top_k is not None else TeacherMixer(tau, forward=forward, reverse=reverse)

    @torch.no_grad()
    def gold_scores(self, prompts: Tokens, gold: Tokens, vocab_size: int, texts: Texts | None = None) -> Tensor:
        """Each teacher's mean token log-likelihood of each prompt's gold solution: [M, B]."""
        mask = gold.mask.float()  # [B, T']
        return torch.stack([masked_mean(t.signal(prompts, gold, vocab_size, texts).token_logp(gold.ids, 1.0), mask, dim=-1) for t in self.teachers])

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
        route: Tensor | None = None,
        texts: Texts | None = None,
    ) -> TeacherScores:
        """Score completions [N, T] of prompts [B, P] (N = B*K) with every teacher, one at a time.

        `student_logits` [N, T, V] (detached here; whole or chunked) only feed the per-teacher KL metrics.
        `logp` asks for each teacher's log-probs of the completion tokens at `logp_temperature`.
        `gold_scores` [M, B] are required by competence weighting, `route` [B] (each prompt's teacher index) by routing.
        `texts`: the prompts' questions, for teachers with their own tokenizer (`teachers.cross`).
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
                None if route is None else route[b : b + chunk].repeat_interleave(group),
                None if texts is None else texts.rows(b, b + chunk),
            )
            for b in range(0, prompts.ids.shape[0], chunk)
        ]
        return _concat(parts, completions.mask.float())

    def _score_rows(
        self, prompts: Tokens, completions: Tokens, student_logits: Logits, vocab_size: int, tau: float,
        forward: bool, reverse: bool, logp: bool, logp_temperature: float, gold_score: Tensor | None, route: Tensor | None,
        texts: Texts | None = None,
    ) -> _Chunk:
        mixer = self.mixer(tau, forward, reverse)
        mask = completions.mask.float()  # [n, T]
        log_weights, logps, kl_fwd, kl_rev = [], [], [], []
        fixed = None  # [M, n, T] weights known before the teachers run: mixed directly, no online softmax
        if not self.weighting.uses_logits:
            positions = completions.mask.new_empty(*completions.mask.shape, 0)  # [n, T, 0]: carries the shape only
            fixed = torch.stack([self.weighting.log_weight(i, positions, gold_score, route) for i in range(len(self.teachers))]).softmax(0)
        for i, teacher in enumerate(self.teachers):
            signal = teacher.signal(prompts, completions, vocab_size, texts)  # [n, T, ...]
            if fixed is None:
                log_weights.append(self.weighting.log_weight(i, signal, gold_score, route))  # [n, T]
            if mixer is not None and fixed is None:
                mixer.add(signal, log_weight=log_weights[-1])
            elif mixer is not None:
                mixer.add(signal, weight=fixed[i])
            if logp:
                logps.append(signal.token_logp(completions.ids, logp_temperature))  # [n, T]
            forward_kl, reverse_kl = signal.kl_both_ways(student_logits)  # [n, T] each
            kl_fwd.append(masked_mean(forward_kl, mask))
            kl_rev.append(masked_mean(reverse_kl, mask))
            del signal  # one teacher's [n, T, V] at a time
        return _Chunk(
            weights=fixed if fixed is not None else torch.stack(log_weights).softmax(0),  # [M, n, T]
            logp=torch.stack(logps) if logp else None,  # [M, n, T]
            mixture=mixer.result() if mixer is not None else None,
            tokens=mask.sum(),
            kl_fwd=torch.stack(kl_fwd),  # [M]
            kl_rev=torch.stack(kl_rev),  # [M]
        )


def _concat(chunks: list[_Chunk], mask: Tensor) -> TeacherScores:
    """Join the row chunks; per-teacher metrics are token-weighted means over all rows."""
    weights = torch.cat([c.weights for c in chunks], 1)  # [M, N, T]
    logp = torch.cat([c.logp for c in chunks], 1) if chunks[0].logp is not None else None  # [M, N, T]
    mixture = None if chunks[0].mixture is None else _cat_rows([c.mixture for c in chunks])
    tokens = torch.stack([c.tokens for c in chunks])  # [chunks]
    share = (tokens / tokens.sum().clamp(min=1))[:, None]  # [chunks, 1]
    metrics = {
        "kl_fwd": (torch.stack([c.kl_fwd for c in chunks]) * share).sum(0),  # [M]
        "kl_rev": (torch.stack([c.kl_rev for c in chunks]) * share).sum(0),  # [M]
        "weight": masked_mean(weights, mask.expand_as(weights), dim=(1, 2)),  # [M]
    }
    if mixture is not None and mixture.top_k is not None:  # the top-k mass each teacher keeps, as verl logs it
        metrics["mass"] = masked_mean(mixture.top_k.logp.exp().sum(-1).movedim(-1, 0), mask.expand_as(weights), dim=(1, 2))  # [M]
    return TeacherScores(weights, logp, mixture, metrics)


def _cat_rows(parts: list[tuple]) -> tuple:
    """Row chunks of a (possibly nested) tuple of tensors joined on dim 0; None fields stay None."""
    fields = [None if values[0] is None else torch.cat(values, 0) if isinstance(values[0], Tensor) else _cat_rows(values) for values in zip(*parts)]
    return type(parts[0])(*fields)


def score_teachers(
    teachers: TeacherEnsemble, needs: Needs, raw: Logits, rollout: Rollout, gold: Rollout | None, gold_raw: Logits | None,
    temperature: float, vocab_size: int | None,
) -> tuple[Tensor | None, Tensor | None, Mixture | None, dict[str, Tensor]]:
    """What `needs` asks of the teachers: their log-probs and weights on the rollout [M, N, T] (None unless
    `needs.teacher_logp`), the KD mixture at the KD states (the rollout, or the gold solutions with the student's
    `gold_raw` logits), and the per-teacher metrics teacher/<kl_fwd|kl_rev|weight>/<name>.

    `raw`: the student's raw (temperature 1) logits on the rollout (detached; they feed the KL metrics only); the
    teachers' log-probs are taken at `temperature` when `needs.teacher_logp_at_sampling_temperature`, else at 1.
    """
    on_gold = needs.kd_on_gold
    texts = Texts(rollout.questions, rollout.components)  # the rollout's and its gold solutions' prompts are the same
    gold_scores = teachers.gold_scores(gold.prompts, gold.completions, vocab_size, texts) if teachers.weighting.needs_gold else None  # [M, B]
    route = None
    if hasattr(teachers.weighting, "assign"):  # each prompt's teacher (the rollout's and its gold solutions' prompts are the same)
        route = torch.tensor(teachers.weighting.assign(teachers.names, rollout.components, rollout.teachers), device=rollout.prompts.ids.device)  # [B]
    mixture = scores = None
    if needs.teacher_logp or (needs.mixture and not on_gold):
        scores = teachers.score(
            rollout.prompts, rollout.completions, raw, vocab_size, needs.kd_tau,
            forward=needs.teacher_forward and not on_gold, reverse=needs.teacher_reverse and not on_gold,
            logp=needs.teacher_logp, logp_temperature=temperature if needs.teacher_logp_at_sampling_temperature else 1.0, gold_scores=gold_scores, route=route,
            texts=texts,
        )
        mixture = scores.mixture if needs.mixture and not on_gold else None
    if on_gold:
        gold_side = teachers.score(
            gold.prompts, gold.completions, gold_raw, vocab_size, needs.kd_tau,
            forward=needs.teacher_forward, reverse=needs.teacher_reverse, gold_scores=gold_scores, route=route, texts=texts,
        )
        mixture = gold_side.mixture
        scores = scores or gold_side
    metrics = {f"teacher/{key}/{name}": values[i] for key, values in scores.metrics.items() for i, name in enumerate(teachers.names)}
    if mixture is not None and mixture.top_k is not None:  # train/teacher_mass: the mean over the teachers at the KD states
        source = gold_side if on_gold else scores
        metrics["teacher_mass"] = source.metrics["mass"].mean()
    return (scores.logp, scores.weights if needs.teacher_logp else None, mixture, metrics)
