"""A teacher with its own tokenizer, read at the student's tokens.

`CrossTokenizer` wraps any teacher source (in process or served). For each batch it renders the prompts in the
teacher's own layout (its chat template where it has one), decodes each student completion to text, tokenizes
that text with the teacher's tokenizer, lets the teacher score it, and brings the signal back to the student's
tokens through the completion's chunks (`teachers.align`):

- sampled-token log-probs (KDRL, OPD, J''' agreement): a chunk's teacher log-prob is the sum of its teacher
  tokens' (the teacher's log-prob of the chunk's text, by the chain rule), shared evenly by the chunk's student
  tokens. Where the boundaries agree a chunk is one student token and the value is exact; over a chunk of n
  student tokens their sum is exact. A completion's end token is its own chunk, the teacher's end token.
- next-token distributions (J', J'', TGPO's guide, the KL metrics): at a student token that starts a chunk the
  text before it is the teacher's too, so the teacher's next-token distribution there is read; each teacher
  token maps to the student token of the same text (`align.vocabulary_map`; the teacher's end token to the
  student's), and the k most likely mapped tokens are kept, the rest of the teacher's mass (unmapped tokens
  included) in the tail bucket, as `model.teacher_top_k` keeps them. At a student token that starts inside a
  teacher token the teacher has no next-token view: `defined()` is False there and the ensemble gives the
  teacher no weight at that position.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers import PreTrainedTokenizerBase

from grpokd.errors import ConfigError
from grpokd.models.lm import Tokens, tokenize_prompts
from grpokd.objectives.base import Unmatched
from grpokd.objectives.logits import Logits
from grpokd.teachers.align import AlignmentError, Spellings, align, decoded_spans, encoded_spans
from grpokd.teachers.sources import Signal, TeacherSource, Texts, listed_kl_both_ways, tail_mass

UNMATCHED = ("tail", "uld")  # model.teacher_unmatched: where a teacher token with no student token of its text goes
KL_TOP_K = 64  # tokens of the teacher's list the per-teacher KL metrics read (fewer if fewer map)


class Layout(NamedTuple):
    """A batch of completions in the teacher's tokens and where each student token's signal comes from."""

    teacher: Tokens  # [N, T'] the completions as the teacher reads them (its end token where the student's ended)
    student_chunk: Tensor  # [N, T] long, the chunk of each student token (-1: padding)
    teacher_chunk: Tensor  # [N, T'] long, the chunk of each teacher token (-1: padding)
    members: Tensor  # [N, C] student tokens per chunk
    where: Tensor  # [N, T] long, the teacher position whose next-token view a student position takes (0 where none)
    defined: Tensor  # [N, T] bool, where it has one
    spelled: Tensor  # [N, T] bool, where the student token is a chunk of its own that the teacher spells in 2+ tokens


def spread(values: Tensor, layout: Layout) -> Tensor:
    """Teacher-token values [N, T'] summed over each chunk and shared evenly by its student tokens: [N, T]."""
    chunks = layout.members.shape[1]
    real = layout.teacher_chunk >= 0
    sums = values.new_zeros(values.shape[0], chunks).scatter_add_(1, layout.teacher_chunk.clamp(min=0), values.masked_fill(~real, 0))  # [N, C]
    chunk = layout.student_chunk.clamp(min=0)
    shared = sums.gather(1, chunk) / layout.members.gather(1, chunk).clamp(min=1)  # [N, T]
    return shared.masked_fill(layout.student_chunk < 0, 0)


@dataclass(frozen=True)
class Aligned:
    """A teacher-space signal read at the student's tokens and vocabulary (the readings of `sources.Signal`)."""

    inner: Signal  # [N, T', ...] in the teacher's tokens
    layout: Layout
    vocabulary: Tensor  # [V_teacher] long: the student token of each teacher token, -1 where none
    spellings: Spellings
    student_vocab: int  # V, the student's vocabulary
    share: float = 0.0  # GOLD's hybrid: the share of ULD's distance on the unmatched tokens in the KD (0: none, their mass in the tail)

    @cached_property
    def here(self) -> Signal:
        """The teacher's next-token views at the student's positions, [N, T, ...], gathered once for every reading."""
        return self.inner.at(self.layout.where)

    def confidence(self) -> Tensor:
        return self.here.confidence()

    def top_k(self, k: int, tau: float, keep: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        index, values, tail = self.here.top_k(k, tau, keep=self.vocabulary >= 0)  # [N, T, k] in the teacher's vocabulary
        index = self.vocabulary[index]
        if self.layout.spelled.any():
            index, values, tail = self._spell(index, values, tail, k, tau)
        return index, values, tail

    def _spell(self, index: Tensor, values: Tensor, tail: Tensor, k: int, tau: float) -> tuple[Tensor, Tensor, Tensor]:
        """At a student token the teacher spells in several tokens (its "18" is the teacher's "1" then "8"), the
        view before the teacher's first token u puts on u's student token ("1") the mass of every word that starts
        with it. There the next view, after u, splits it: each student token that u and one more teacher token b
        spell gets p(u) p(b | u), u's own student token what is left of p(u), the other tokens of the first view
        keep theirs, and the k most likely of those make the list."""
        layout = self.layout
        rows, cols = layout.spelled.nonzero(as_tuple=True)  # [E] positions
        first_at = layout.where[rows, cols]  # [E] the teacher position of u
        first = layout.teacher.ids[rows, first_at]  # [E] u
        first_p = self.inner.token_logp(layout.teacher.ids, tau)[rows, first_at].exp()  # [E] p(u)
        slot = torch.zeros_like(layout.spelled, dtype=torch.long).index_put_((rows, cols), torch.ones_like(rows)).cumsum(1) - 1  # [N, T]
        nexts = torch.zeros(len(layout.spelled), max(1, int(layout.spelled.sum(1).max())), dtype=torch.long, device=rows.device)  # [N, M]
        nexts[rows, slot[rows, cols]] = first_at + 1
        second, second_logp, _ = self.inner.at(nexts).top_k(k, tau)  # [N, M, k] the teacher's tokens after u
        second, second_p = second[rows, slot[rows, cols]], second_logp[rows, slot[rows, cols]].exp()  # [E, k]
        spelt = torch.tensor(self.spellings.pairs(first.tolist(), second.tolist()), dtype=torch.long, device=rows.device)  # [E, k]
        spelt_p = (first_p[:, None] * second_p).masked_fill(spelt < 0, 0.0)  # [E, k]
        own = self.vocabulary[first]  # [E] u's student token
        probs = values.new_zeros(len(rows), self.student_vocab)  # [E, V]
        listed, listed_p = index[rows, cols], values[rows, cols].exp()  # [E, k]
        probs.scatter_add_(1, listed, listed_p.masked_fill(listed == own[:, None], 0.0))
        probs.scatter_add_(1, spelt.clamp(min=0), spelt_p)
        rest = (first_p - spelt_p.sum(-1)).clamp(min=0).masked_fill(own < 0, 0.0)  # [E]
        probs.scatter_add_(1, own.clamp(min=0)[:, None], rest[:, None])
        top_p, top = probs.topk(k, dim=-1)  # [E, k]
        top = torch.where(top_p > 0, top, top[:, :1])  # an empty entry holds the first token again: absent (log p = -inf)
        top_logp = top_p.log()
        index, values, tail = index.clone(), values.clone(), tail.clone()
        index[rows, cols], values[rows, cols], tail[rows, cols] = top, top_logp, tail_mass(top_logp)
        return index, values, tail

    def unmatched(self, k: int, tau: float) -> Unmatched | None:
        """The teacher's k most likely tokens with no student token of their text, and the student's tokens no
        teacher token has the text of (`objectives.base.Unmatched`, GOLD's hybrid); None without it."""
        if not self.share:
            return None
        keep = self.vocabulary < 0  # [V_teacher]
        kept = min(k, int(keep.sum()), self.inner.listed())
        where = self.layout.where
        listed = self.here.top_k(kept, tau, keep=keep)[1] if kept else torch.empty(*where.shape, 0, device=where.device)  # [N, T, k']
        logp = F.pad(listed, (0, k - kept), value=-math.inf)  # [N, T, k] descending
        student = torch.ones(self.student_vocab, dtype=torch.bool, device=logp.device)
        student[self.vocabulary[self.vocabulary >= 0]] = False  # [V]
        return Unmatched(logp, student, torch.tensor(self.share, device=logp.device))

    def token_logp(self, ids: Tensor, temperature: float) -> Tensor:
        return spread(self.inner.token_logp(self.layout.teacher.ids, temperature), self.layout)

    def kl_both_ways(self, student_logits: Logits) -> tuple[Tensor, Tensor]:
        """On the teacher's mapped top-k list and its tail, where it has a next-token view (0 elsewhere)."""
        k = min(KL_TOP_K, int((self.vocabulary >= 0).sum()), self.inner.listed())
        forward, reverse = listed_kl_both_ways(student_logits, *self.top_k(k, 1.0))
        return forward * self.layout.defined, reverse * self.layout.defined

    def mixable(self) -> Tensor:
        raise ConfigError("a teacher with a tokenizer other than the student's gives top-k lists: set model.teacher_top_k")

    def listed(self) -> int:
        return self.inner.listed()

    def defined(self) -> Tensor:
        return self.layout.defined


class CrossTokenizer(torch.nn.Module):
    """A teacher source whose tokenizer is not the student's (see the module's docstring).

    Args:
        inner: the teacher's own source, fed the teacher's tokens.
        tokenizer, student_tokenizer: the teacher's and the student's.
        render: (question, dataset) -> the prompt text in the teacher's layout.
        special_tokens: whether the rendered prompt is tokenized with the teacher's own special tokens (plain layout).
        max_prompt_len: the teacher's prompts are cut from the left to this many tokens, as the student's are.
        student_end_ids: the tokens that end a student completion.
        role: the teacher's config key, for errors.
        spell: split the first-token mass of the student tokens it spells in several tokens (`Aligned._spell`;
            model.teacher_spelling). False: each teacher token's mass goes to the student token of its own text.
        uld: GOLD's hybrid (model.teacher_unmatched=uld): the tokens with no counterpart of the same text are
            compared by ULD's sorted L1 distance, its share of the KD 1 - (matched tokens / the teacher's vocabulary)
            (`objectives.base.Unmatched`). False: their mass is in the tail bucket.
    """

    def __init__(self, inner: TeacherSource, tokenizer: PreTrainedTokenizerBase, student_tokenizer: PreTrainedTokenizerBase,
                 render: Callable[[str, str], str], special_tokens: bool, max_prompt_len: int, student_end_ids: list[int], role: str,
                 spell: bool = True, uld: bool = False) -> None:
        super().__init__()
        self.spell = spell
        self.inner, self.name = inner, inner.name
        self.tokenizer, self.student_tokenizer = tokenizer, student_tokenizer
        self.render, self.special_tokens, self.max_prompt_len = render, special_tokens, max_prompt_len
        self.student_end_ids, self.role = set(student_end_ids), role
        if tokenizer.eos_token_id is None:
            raise ConfigError(f"{role}: its tokenizer has no end-of-sequence token, so the end of a student's completion has no teacher token")
        self.end_id = tokenizer.eos_token_id
        self.spellings = Spellings(student_tokenizer, tokenizer)
        self.vocabulary = self.spellings.vocabulary()  # [V_teacher]
        self.vocabulary[self.end_id] = student_end_ids[0]
        self.share = 1 - int((self.vocabulary >= 0).sum()) / len(self.vocabulary) if uld else 0.0  # GOLD's adaptive weight

    def signal(self, prompts: Tokens, completions: Tokens, vocab_size: int, texts: Texts | None = None) -> Aligned:
        if texts is None:
            raise ValueError(f"{self.role} has its own tokenizer: it needs the prompts' questions (Texts)")
        device = completions.ids.device
        rendered = [self.render(question, component) for question, component in zip(*texts)]
        teacher_prompts = tokenize_prompts(self.tokenizer, rendered, self.max_prompt_len, self.special_tokens).to(device)  # [B, P']
        layout = self.layout(completions)
        inner = self.inner.signal(teacher_prompts, layout.teacher, len(self.tokenizer))
        return Aligned(inner, layout, self.vocabulary.to(device), self.spellings, vocab_size, self.share)

    def layout(self, completions: Tokens) -> Layout:
        """Each completion's text in the teacher's tokens and its chunks (`align`)."""
        rows = []
        for ids, mask in zip(completions.ids.tolist(), completions.mask.tolist()):
            content = [i for i, m in zip(ids, mask) if m]
            ended = bool(content) and content[-1] in self.student_end_ids
            body = content[:-1] if ended else content
            try:
                text, spans = decoded_spans(self.student_tokenizer, body)
            except AlignmentError as err:
                raise ConfigError(f"{self.role} has its own tokenizer, and a student completion cannot be aligned with it: {err}") from None
            teacher_ids, teacher_spans = encoded_spans(self.tokenizer, text, self.role)
            alignment = align(spans, teacher_spans, len(text))
            if ended:  # the end token: a chunk of its own, the teacher's end token
                alignment, teacher_ids = alignment.ended(), teacher_ids + [self.end_id]
            rows.append((teacher_ids, alignment))
        n, width = completions.ids.shape
        teacher_width = max(1, max(len(ids) for ids, _ in rows))
        chunk_count = max(1, max(alignment.chunks for _, alignment in rows))
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.end_id
        teacher_ids = torch.full((n, teacher_width), pad, dtype=torch.long)  # [N, T']
        teacher_chunk = torch.full((n, teacher_width), -1, dtype=torch.long)  # [N, T']
        student_chunk = torch.full((n, width), -1, dtype=torch.long)  # [N, T]
        where = torch.zeros((n, width), dtype=torch.long)  # [N, T]
        defined = torch.zeros((n, width), dtype=torch.bool)  # [N, T]
        spelled = torch.zeros((n, width), dtype=torch.bool)  # [N, T]
        for row, (ids, alignment) in enumerate(rows):
            teacher_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            teacher_chunk[row, : len(ids)] = torch.tensor(alignment.teacher, dtype=torch.long)
            student_chunk[row, : len(alignment.student)] = torch.tensor(alignment.student, dtype=torch.long)
            views = alignment.views()
            defined[row, : len(views)] = torch.tensor([u is not None for u in views])
            where[row, : len(views)] = torch.tensor([u or 0 for u in views], dtype=torch.long)
            members, theirs = Counter(alignment.student), Counter(alignment.teacher)
            spelled[row, : len(views)] = torch.tensor([self.spell and u is not None and members[c] == 1 and theirs[c] >= 2 for u, c in zip(views, alignment.student)])
        members = torch.zeros((n, chunk_count), dtype=torch.long).scatter_add_(1, student_chunk.clamp(min=0), (student_chunk >= 0).long())  # [N, C]
        device = completions.ids.device
        return Layout(Tokens(teacher_ids.to(device), (teacher_chunk >= 0).long().to(device)), student_chunk.to(device), teacher_chunk.to(device),
                      members.to(device), where.to(device), defined.to(device), spelled.to(device))
