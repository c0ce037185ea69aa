"""Teacher sources: where a teacher's view of (prompt, completion) pairs comes from, behind one interface.

A source scores completions [N, T] of prompts [B, P] and returns a teacher signal, of kinds with the same
readings (`Signal`): `Dense`, the full next-token logits [N, T, V] of a model held in this process
(`InProcess`); `Sparse`, each position's top-k log-probs and the scored token's log-prob, all a served model
returns (`grpokd.teachers.served.Served`: vLLM's OpenAI server); `teachers.cross.Aligned`, either of them
read at the student's tokens when the teacher has a tokenizer of its own (`teachers.cross.CrossTokenizer`
wraps its source). The ensemble (`grpokd.teachers`) reads a signal only through those readings, so it never
asks which kind of teacher it holds; a source of another kind (an SGLang server, say) is one more class with a
`signal` method and one more case in `build`.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, NamedTuple, Protocol

import torch
from torch import Tensor
from transformers import PreTrainedModel

from grpokd.errors import ConfigError
from grpokd.models.lm import Tokens, completion_logits, token_logp
from grpokd.objectives.base import Unmatched
from grpokd.objectives.functional import entropy
from grpokd.objectives.kd import sparse_divergences
from grpokd.objectives.logits import Logits, per_position


class Signal(Protocol):
    """What the ensemble reads of one teacher's signal at N x T positions."""

    def confidence(self) -> Tensor:
        """[N, T] the teacher's negative entropy at each position (`weighting=confidence`)."""

    def top_k(self, k: int, tau: float, keep: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """Its k most likely tokens at temperature tau: (index [N, T, k], log-probs [N, T, k], log tail mass [N, T]);
        with `keep` [V] bool, the k most likely of the kept tokens (the others' mass is in the tail)."""

    def unmatched(self, k: int, tau: float) -> "Unmatched | None":
        """GOLD's hybrid part (`objectives.base.Unmatched`, one teacher: logp [N, T, k], student [V], share []) for a
        teacher with its own tokenizer read so (`model.teacher_unmatched=uld`); None: every token has its counterpart."""

    def token_logp(self, ids: Tensor, temperature: float) -> Tensor:
        """[N, T] log-probs of the scored tokens `ids` at `temperature`."""

    def kl_both_ways(self, student_logits: Logits) -> tuple[Tensor, Tensor]:
        """KL(teacher || student) and KL(student || teacher) at each position, [N, T] each (logging)."""

    def mixable(self) -> Tensor:
        """[N, T, V] logits for the full-vocabulary mixtures (`teachers.TeacherMixer`)."""

    def at(self, positions: Tensor) -> "Signal":
        """The signal at `positions` [N, T'] of each row (indices into its T positions): [N, T', ...]."""

    def listed(self) -> int:
        """The most tokens its `top_k` gives per position."""

    def defined(self) -> Tensor | None:
        """[N, T] where its next-token readings (`top_k`, `confidence`, `mixable`) hold; None: everywhere. A teacher
        with its own tokenizer has none where a student token starts inside one of its tokens (`teachers.cross`)."""


class Dense(NamedTuple):
    """A teacher's full next-token logits [N, T, V]: every reading is exact."""

    logits: Tensor

    def confidence(self) -> Tensor:
        return -entropy(self.logits.float())

    def top_k(self, k: int, tau: float, keep: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        vocab = self.logits.shape[-1]
        if k > vocab:
            raise ConfigError(f"model.teacher_top_k={k} is larger than the vocabulary ({vocab}); use at most {vocab}")
        if keep is not None and k > int(keep.sum()):
            raise ConfigError(f"model.teacher_top_k={k}: only {int(keep.sum())} of a teacher's tokens have a student token of the same text; use at most that")
        log_p = torch.log_softmax(self.logits.detach().float() / tau, dim=-1)  # [N, T, V]
        candidates = log_p if keep is None else log_p.masked_fill(~keep.to(log_p.device), -math.inf)  # [N, T, V]
        index = candidates.topk(k, dim=-1).indices  # [N, T, k]
        values = log_p.gather(-1, index)  # [N, T, k]
        # the tail's log-mass over the tokens left out, exactly (not log(1 - sum), which rounds to -inf near 1)
        tail = log_p.scatter_(-1, index, -math.inf).logsumexp(-1) if k < vocab else torch.full_like(values[..., 0], -math.inf)
        return index, values, tail

    def unmatched(self, k: int, tau: float) -> None:
        return None

    def token_logp(self, ids: Tensor, temperature: float) -> Tensor:
        return token_logp(self.logits / temperature, ids)

    def kl_both_ways(self, student_logits: Logits) -> tuple[Tensor, Tensor]:
        return per_position(student_logits, kl_both_ways, self.logits)

    def mixable(self) -> Tensor:
        return self.logits

    def at(self, positions: Tensor) -> "Dense":
        return Dense(self.logits.gather(1, positions[..., None].expand(-1, -1, self.logits.shape[-1])))

    def listed(self) -> int:
        return self.logits.shape[-1]

    def defined(self) -> None:
        return None


class Sparse(NamedTuple):
    """A served teacher's top-k log-probs at temperature 1 (sorted, most likely first) and the scored token's.

    Readings at temperature 1 only (a top-k list cannot be re-tempered: the tail's tempered mass is unknown), at
    most k tokens, and no full-vocabulary mixture or entropy; `check_sparse` refuses other settings at start-up.
    """

    index: Tensor  # [N, T, k] long
    logp: Tensor  # [N, T, k] float32
    scored: Tensor  # [N, T] float32, the log-prob of the completion token at each position

    def confidence(self) -> Tensor:
        raise ConfigError("weighting=confidence needs each teacher's full distribution; a served teacher gives its top-k log-probs only")

    def top_k(self, k: int, tau: float, keep: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """The first k of its list; with `keep`, the first k kept ones. Where fewer than k are kept, the list is
        filled with its first kept token (any kept token where it lists none) at log-prob -inf: absent entries,
        which add nothing to a divergence (`objectives.kd.sparse_divergences`)."""
        if tau != 1 or k > self.index.shape[-1]:
            raise ConfigError(f"a served teacher gives {self.index.shape[-1]} log-probs per position at temperature 1; asked for {k} at {tau}")
        if keep is None:
            values = self.logp[..., :k]  # [N, T, k]
            return self.index[..., :k], values, tail_mass(values)
        keep = keep.to(self.index.device)
        kept = keep[self.index]  # [N, T, K]
        order = torch.sort((~kept).to(torch.uint8), dim=-1, stable=True).indices[..., :k]  # kept entries first, in list order
        index, logp, listed = self.index.gather(-1, order), self.logp.gather(-1, order), kept.gather(-1, order)  # [N, T, k]
        first = torch.where(listed[..., :1], index[..., :1], keep.nonzero()[0, 0])  # [N, T, 1]
        index = torch.where(listed, index, first)
        logp = logp.masked_fill(~listed, -math.inf)
        return index, logp, tail_mass(logp)

    def unmatched(self, k: int, tau: float) -> None:
        return None

    def token_logp(self, ids: Tensor, temperature: float) -> Tensor:
        if temperature != 1:
            raise ConfigError(f"a served teacher gives log-probs at temperature 1, not {temperature}")
        return self.scored

    def kl_both_ways(self, student_logits: Logits) -> tuple[Tensor, Tensor]:
        """On the teacher's k + 1 outcomes, its top k and the tail (`objectives.kd.sparse_divergences`)."""
        return listed_kl_both_ways(student_logits, self.index, self.logp, tail_mass(self.logp))

    def mixable(self) -> Tensor:
        raise ConfigError("a served teacher gives its top-k log-probs only: set model.teacher_top_k (at most the server's top_k)")

    def at(self, positions: Tensor) -> "Sparse":
        k = self.index.shape[-1]
        return Sparse(self.index.gather(1, positions[..., None].expand(-1, -1, k)), self.logp.gather(1, positions[..., None].expand(-1, -1, k)),
                      self.scored.gather(1, positions))

    def listed(self) -> int:
        return self.index.shape[-1]

    def defined(self) -> None:
        return None


def tail_mass(logp: Tensor) -> Tensor:
    """log(1 - sum exp(logp)) over the last dim: the log-mass outside the listed tokens (-inf when they hold it all).

    Summed in float64; still, from float32 log-probs the tail is known to about 1e-7 in absolute terms, so a tail
    of mass m carries a relative error of about 1e-7 / m (the dense signal takes it exactly, from the logits)."""
    return torch.log((1 - logp.double().exp().sum(-1)).clamp(min=0)).float()


def listed_kl_both_ways(student_logits: Logits, index: Tensor, logp: Tensor, tail: Tensor) -> tuple[Tensor, Tensor]:
    """KL(T || theta) and KL(theta || T) on one teacher's k + 1 outcomes, its list index, logp [N, T, k] and tail [N, T]
    (`objectives.kd.sparse_divergences`), in one pass over the student's logits: [N, T] each."""
    signal = (index[..., None, :], logp[..., None, :], tail[..., None], torch.ones_like(tail[..., None]))  # one teacher
    return per_position(student_logits, lambda z, *sig: (sparse_divergences(z, *sig, tau=1.0, reverse=False),
                                                         sparse_divergences(z, *sig, tau=1.0, reverse=True)), *signal)


def kl_both_ways(student_logits: Tensor, teacher_logits: Tensor) -> tuple[Tensor, Tensor]:
    """KL(T || theta) and KL(theta || T) at each position, from the two models' logits: [.., V] -> [..], [..]."""
    log_q = student_logits.float().log_softmax(-1)
    log_p = teacher_logits.float().log_softmax(-1)
    diff = log_p - log_q
    return torch.linalg.vecdot(log_p.exp(), diff), -torch.linalg.vecdot(log_q.exp(), diff)


class Texts(NamedTuple):
    """What a teacher with its own tokenizer reads of a batch's prompts (`teachers.cross`): each prompt's question
    before any chat layout, and the dataset it comes from (whose layout renders it)."""

    questions: list[str]  # B
    components: list[str]  # B

    def rows(self, start: int, stop: int) -> "Texts":
        return Texts(self.questions[start:stop], self.components[start:stop])


class TeacherSource(Protocol):
    """One teacher: scores completions of prompts."""

    name: str

    def signal(self, prompts: Tokens, completions: Tokens, vocab_size: int, texts: Texts | None = None) -> Signal:
        """The teacher's signal at every completion position of `completions` [N, T] (prompts [B, P], N = B*K);
        `texts`: the prompts' questions, for a teacher that tokenizes them itself."""


class InProcess(torch.nn.Module):
    """A Hugging Face model held in this process (a submodule: Lightning places it, FSDP may shard it)."""

    def __init__(self, model: PreTrainedModel, name: str) -> None:
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.name = name

    def signal(self, prompts: Tokens, completions: Tokens, vocab_size: int, texts: Texts | None = None) -> Dense:
        return Dense(completion_logits(self.model, prompts, completions, vocab_size))


def entry(item: Any) -> dict[str, Any]:
    """A `model.teachers` entry as a dict: a model name or path (a string, or {name: ..., dtype: ...}), or a
    served teacher {url: ..., model: ..., top_k: ...} (`grpokd.teachers.served.Served`'s arguments)."""
    if isinstance(item, str):
        return {"name": item}
    return dict(item)


def is_served(item: Any) -> bool:
    """The entry names a server (`url`), not a model to load."""
    return "url" in entry(item)


def in_process(models: list[PreTrainedModel], names: list[str]) -> list[InProcess]:
    """Models held in this process as teacher sources, named."""
    return [InProcess(model, name) for model, name in zip(models, names, strict=True)]


def source_name(item: Any) -> str:
    """The name a teacher goes by in metrics and routes: a model's last path part; a served one's `name`, else its `model`, else its url."""
    spec = entry(item)
    if is_served(spec):
        return spec.get("name") or spec.get("model") or spec["url"]
    return Path(spec["name"]).name


def build(item: Any, role: str, load: Any) -> TeacherSource:
    """The source of one `model.teachers` entry: a served teacher, or `load(name, role, dtype)`'s model in process."""
    from grpokd.teachers.served import Served  # it reads this module's Sparse

    spec = entry(item)
    if is_served(spec):
        spec.setdefault("name", source_name(spec))
        try:
            return Served(**spec)
        except TypeError as err:
            raise ConfigError(f"{role}: {err}; a served teacher takes url, model, name, top_k, timeout_s, retries, tokenizer") from None
    return InProcess(load(spec["name"], role, spec.get("dtype")), source_name(spec))


def check_sparse(role: str, served_k: int, needs: Any, top_k: int | None, kd_tau: float, temperature: float, confidence: bool) -> None:
    """A served teacher's top-k signal (`Sparse`) gives what the run reads of it: KD on model.teacher_top_k <= its
    top_k at temperature 1, log-probs at temperature 1, no entropy-based weighting. ConfigError otherwise."""
    if needs.mixture and top_k is None:
        raise ConfigError(f"{role} is served (top-k log-probs only): set model.teacher_top_k (at most its top_k={served_k})")
    if needs.mixture and top_k > served_k:
        raise ConfigError(f"model.teacher_top_k={top_k}: {role} serves top_k={served_k} log-probs per position; use at most {served_k}")
    if needs.mixture and kd_tau != 1:
        raise ConfigError(f"tau={kd_tau}: {role} is served and gives log-probs at temperature 1 (a top-k list cannot be re-tempered); set tau=1")
    if needs.teacher_logp and needs.teacher_logp_at_sampling_temperature and temperature != 1:
        raise ConfigError(f"rollout.sampling.temperature={temperature}: {role} is served and gives log-probs at temperature 1; sample at temperature 1")
    if confidence:
        raise ConfigError(f"weighting=confidence needs each teacher's entropy; {role} is served (top-k only): use another weighting")
