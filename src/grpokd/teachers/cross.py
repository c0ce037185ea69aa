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

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor
from transformers import PreTrainedTokenizerBase

from grpokd.errors import ConfigError
from grpokd.models.lm import Tokens, tokenize_prompts
from grpokd.objectives.kd import sparse_divergences
from grpokd.objectives.logits import Logits, per_position
from grpokd.teachers.align import AlignmentError, align, decoded_spans, encoded_spans, vocabulary_map
from grpokd.teachers.sources import Signal, TeacherSource, Texts

KL_TOP_K = 64  # tokens of the teacher's list the per-teacher KL metrics read (fewer if fewer map)


class Layout(NamedTuple):
    """A batch of completions in the teacher's tokens and where each student token's signal comes from."""

    teacher: Tokens  # [N, T'] the completions as the teacher reads them (its end token where the student's ended)
    student_chunk: Tensor  # [N, T] long, the chunk of each student token (-1: padding)
    teacher_chunk: Tensor  # [N, T'] long, the chunk of each teacher token (-1: padding)
    members: Tensor  # [N, C] student tokens per chunk
    where: Tensor  # [N, T] long, the teacher position whose next-token view a student position takes (0 where none)
    defined: Tensor  # [N, T] bool, where it has one


def spread(values: Tensor, layout: Layout) -> Tensor:
    """Teacher-token values [N, T'] summed over each chunk and shared evenly by its student tokens: [N, T]."""
    chunks = layout.members.shape[1]
    real = layout.teacher_chunk >= 0
    sums = values.new_zeros(values.shape[0], chunks).scatter_add_(1, layout.teacher_chunk.clamp(min=0), values.masked_fill(~real, 0))  # [N, C]
    chunk = layout.student_chunk.clamp(min=0)
    shared = sums.gather(1, chunk) / layout.members.gather(1, chunk).clamp(min=1)  # [N, T]
    return shared.masked_fill(layout.student_chunk < 0, 0)


class Aligned(NamedTuple):
    """A teacher-space signal read at the student's tokens and vocabulary (the readings of `sources.Signal`)."""

    inner: Signal  # [N, T', ...] in the teacher's tokens
    layout: Layout
    vocabulary: Tensor  # [V_teacher] long: the student token of each teacher token, -1 where none

    def _here(self) -> Signal:
        return self.inner.at(self.layout.where)  # [N, T, ...]

    def confidence(self) -> Tensor:
        return self._here().confidence()

    def top_k(self, k: int, tau: float, keep: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        index, values, tail = self._here().top_k(k, tau, keep=self.vocabulary >= 0)  # [N, T, k] in the teacher's vocabulary
        return self.vocabulary[index], values, tail

    def token_logp(self, ids: Tensor, temperature: float) -> Tensor:
        return spread(self.inner.token_logp(self.layout.teacher.ids, temperature), self.layout)

    def kl_both_ways(self, student_logits: Logits) -> tuple[Tensor, Tensor]:
        """On the teacher's mapped top-k list and its tail, where it has a next-token view (0 elsewhere)."""
        k = min(KL_TOP_K, int((self.vocabulary >= 0).sum()))
        index, logp, tail = self.top_k(k, 1.0)
        signal = (index[..., None, :], logp[..., None, :], tail[..., None], torch.ones_like(tail[..., None]))
        forward = per_position(student_logits, lambda z, *sig: sparse_divergences(z, *sig, tau=1.0, reverse=False), *signal)
        reverse = per_position(student_logits, lambda z, *sig: sparse_divergences(z, *sig, tau=1.0, reverse=True), *signal)
        return forward * self.layout.defined, reverse * self.layout.defined

    def mixable(self) -> Tensor:
        raise ConfigError("a teacher with a tokenizer other than the student's gives top-k lists: set model.teacher_top_k")

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
    """

    def __init__(self, inner: TeacherSource, tokenizer: PreTrainedTokenizerBase, student_tokenizer: PreTrainedTokenizerBase,
                 render: Callable[[str, str], str], special_tokens: bool, max_prompt_len: int, student_end_ids: list[int], role: str) -> None:
        super().__init__()
        self.inner, self.name = inner, inner.name
        self.tokenizer, self.student_tokenizer = tokenizer, student_tokenizer
        self.render, self.special_tokens, self.max_prompt_len = render, special_tokens, max_prompt_len
        self.student_end_ids, self.role = set(student_end_ids), role
        if tokenizer.eos_token_id is None:
            raise ConfigError(f"{role}: its tokenizer has no end-of-sequence token, so the end of a student's completion has no teacher token")
        self.end_id = tokenizer.eos_token_id
        self.vocabulary = vocabulary_map(student_tokenizer, tokenizer)  # [V_teacher]
        self.vocabulary[self.end_id] = student_end_ids[0]

    def signal(self, prompts: Tokens, completions: Tokens, vocab_size: int, texts: Texts | None = None) -> Aligned:
        if texts is None:
            raise ValueError(f"{self.role} has its own tokenizer: it needs the prompts' questions (Texts)")
        device = completions.ids.device
        rendered = [self.render(question, component) for question, component in zip(*texts)]
        teacher_prompts = tokenize_prompts(self.tokenizer, rendered, self.max_prompt_len, self.special_tokens).to(device)  # [B, P']
        layout = self.layout(completions)
        inner = self.inner.signal(teacher_prompts, layout.teacher, len(self.tokenizer))
        return Aligned(inner, layout, self.vocabulary.to(device))

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
            student_chunk, teacher_chunk, chunks = list(alignment.student), list(alignment.teacher), alignment.chunks
            if ended:  # the end token: a chunk of its own, the teacher's end token
                student_chunk, teacher_chunk, teacher_ids, chunks = student_chunk + [chunks], teacher_chunk + [chunks], teacher_ids + [self.end_id], chunks + 1
            rows.append((teacher_ids, student_chunk, teacher_chunk, chunks))
        n, width = completions.ids.shape
        teacher_width = max(1, max(len(r[0]) for r in rows))
        chunk_count = max(1, max(r[3] for r in rows))
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.end_id
        teacher_ids = torch.full((n, teacher_width), pad, dtype=torch.long)  # [N, T']
        teacher_chunk = torch.full((n, teacher_width), -1, dtype=torch.long)  # [N, T']
        student_chunk = torch.full((n, width), -1, dtype=torch.long)  # [N, T]
        where = torch.zeros((n, width), dtype=torch.long)  # [N, T]
        defined = torch.zeros((n, width), dtype=torch.bool)  # [N, T]
        for row, (ids, s_chunk, t_chunk, _) in enumerate(rows):
            teacher_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            teacher_chunk[row, : len(t_chunk)] = torch.tensor(t_chunk, dtype=torch.long)
            student_chunk[row, : len(s_chunk)] = torch.tensor(s_chunk, dtype=torch.long)
            first_teacher = {}
            for u, c in enumerate(t_chunk):
                first_teacher.setdefault(c, u)
            for t, c in enumerate(s_chunk):
                if (t == 0 or s_chunk[t - 1] != c) and c in first_teacher:  # starts its chunk, which has teacher tokens
                    where[row, t], defined[row, t] = first_teacher[c], True
        members = torch.zeros((n, chunk_count), dtype=torch.long).scatter_add_(1, student_chunk.clamp(min=0), (student_chunk >= 0).long())  # [N, C]
        device = completions.ids.device
        return Layout(Tokens(teacher_ids.to(device), (teacher_chunk >= 0).long().to(device)), student_chunk.to(device), teacher_chunk.to(device),
                      members.to(device), where.to(device), defined.to(device))
