"""Aligning a completion's tokens under two tokenizers: the student's, which sampled it, and a teacher's.

The student's tokens are decoded to text; each token's span in that text comes from decoding its prefixes (a token
that ends inside a multi-byte character gets an empty span: the character belongs to the token that completes
it). The teacher's tokenizer reads the same text and reports its tokens' spans (offsets). A cut is a position in
the text that no token of a tokenizer straddles; a *chunk* is a run of student tokens between two positions that
are cuts of both, and the teacher tokens inside it. Where the boundaries agree, a chunk is one student token and
the teacher's tokens for exactly its text; where a teacher token straddles two student tokens, the chunk holds
both (and every teacher token it takes). Text the teacher's tokenizer skips (the spaces a word-level tokenizer
splits on) lies in no teacher token: it costs the teacher nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from transformers import PreTrainedTokenizerBase

from grpokd.errors import ConfigError

REPLACEMENT = "\ufffd"  # what a decoder writes for bytes that are not (yet) a whole UTF-8 character


class AlignmentError(ValueError):
    """A completion whose text the two tokenizers do not read alike."""


def decoded_spans(tokenizer: PreTrainedTokenizerBase, ids: list[int]) -> tuple[str, list[tuple[int, int]]]:
    """The text `ids` decode to and each token's [start, end) in it, from the decoded prefixes (one batch decode).

    A prefix that ends inside a multi-byte character decodes with trailing U+FFFD; those are not the token's text
    yet (except at the very end, where they are the text). Raises AlignmentError when a prefix is not the start of
    the whole text (a decoder that rewrites earlier text as it reads more)."""
    if not ids:
        return "", []
    prefixes = tokenizer.batch_decode([ids[: t + 1] for t in range(len(ids))], skip_special_tokens=False, clean_up_tokenization_spaces=False)
    text = prefixes[-1]
    spans, start = [], 0
    for t, prefix in enumerate(prefixes):
        stable = prefix if t == len(ids) - 1 else prefix.rstrip(REPLACEMENT)
        end = max(start, len(stable))
        if not text.startswith(stable):
            raise AlignmentError(f"the student's tokenizer decodes {ids[: t + 1]} to {prefix!r}, which does not start the completion's text {text!r}")
        spans.append((start, end))
        start = end
    return text, spans


def check_offsets(tokenizer: PreTrainedTokenizerBase, role: str) -> None:
    """The tokenizer reports its tokens' offsets in the text (a fast tokenizer), which aligning needs."""
    if not getattr(tokenizer, "is_fast", False):
        raise ConfigError(f"{role}: its tokenizer has no offsets (not a fast tokenizer), so its tokens cannot be aligned with the student's")


def encoded_spans(tokenizer: PreTrainedTokenizerBase, text: str, role: str) -> tuple[list[int], list[tuple[int, int]]]:
    """`text` as the tokenizer reads it (no special tokens added): its ids and each one's [start, end) in `text`."""
    check_offsets(tokenizer, role)
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    return list(encoded["input_ids"]), [tuple(span) for span in encoded["offset_mapping"]]


def check_pair(student: PreTrainedTokenizerBase, teacher: PreTrainedTokenizerBase, texts: list[str], role: str) -> None:
    """At start-up: `texts` (some of the run's gold solutions), as the student tokenizes them, decode to spans the
    teacher's tokens can be aligned with, and the teacher reads them as they are: its tokens decode to the same
    text but for whitespace (which it may skip), so no normaliser or unknown token changes what it scores.
    ConfigError naming `role` otherwise."""
    check_offsets(teacher, role)
    for text in texts:
        try:
            decoded, _ = decoded_spans(student, student(text, add_special_tokens=False)["input_ids"])
        except AlignmentError as err:
            raise ConfigError(f"{role} has its own tokenizer, and the student's completions cannot be aligned with it: {err}") from None
        ids, _ = encoded_spans(teacher, decoded, role)
        read = teacher.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        if read.split() != decoded.split():
            raise ConfigError(f"{role} has its own tokenizer, and it does not read the student's text as it is: {decoded[:60]!r} reads back as {read[:60]!r}")


def cuts(spans: list[tuple[int, int]], length: int) -> Tensor:
    """[length + 1] bool: the positions of a text of `length` characters that no span straddles."""
    inside = torch.zeros(length + 2, dtype=torch.long)
    for start, end in spans:
        if end - start >= 2:
            inside[start + 1] += 1
            inside[end] -= 1
    return inside.cumsum(0)[: length + 1] == 0


@dataclass(frozen=True)
class Alignment:
    """Which chunk each student token and each teacher token of one completion belongs to (chunks in text order)."""

    student: list[int]  # [T_s] chunk of each student token
    teacher: list[int]  # [T_t] chunk of each teacher token
    chunks: int

    def firsts(self) -> list[bool]:
        """[T_s] whether each student token starts its chunk: where the teacher's next-token view is the student's."""
        return [t == 0 or self.student[t - 1] != c for t, c in enumerate(self.student)]

    def views(self) -> list[int | None]:
        """[T_s] the teacher token whose next-token view each student token takes: the first of its chunk's where the
        student token starts the chunk and the chunk has teacher tokens, else None (no view there)."""
        first: dict[int, int] = {}
        for u, c in enumerate(self.teacher):
            first.setdefault(c, u)
        return [first.get(c) if starts else None for starts, c in zip(self.firsts(), self.student)]

    def ended(self) -> "Alignment":
        """With one more chunk at the end: the student's end token read as the teacher's."""
        return Alignment(self.student + [self.chunks], self.teacher + [self.chunks], self.chunks + 1)


def align(student: list[tuple[int, int]], teacher: list[tuple[int, int]], length: int) -> Alignment:
    """The chunks of a text of `length` characters read as student spans (contiguous, in order, from
    `decoded_spans`) and teacher spans (offsets, possibly with gaps or overlapping where a character's bytes
    split). A chunk closes after a student token whose end is a teacher cut and leaves the chunk non-empty."""
    teacher_cuts = cuts(teacher, length)
    chunk_of, ends, chunk, start = [], [], 0, 0
    for t, (_, end) in enumerate(student):
        chunk_of.append(chunk)
        if end > start and bool(teacher_cuts[end]) or t == len(student) - 1:
            ends.append(end)
            chunk, start = chunk + 1, end
    bounds = torch.tensor(ends, dtype=torch.long)
    # a teacher token belongs to the chunk its text ends in (one that ends at 0, before any text: the first)
    teacher_of = [min(int(torch.searchsorted(bounds, end)), len(ends) - 1) if ends else 0 for _, end in teacher]
    return Alignment(chunk_of, teacher_of, len(ends))


def token_texts(tokenizer: PreTrainedTokenizerBase) -> list[str | None]:
    """Each token's text where it follows other text (a leading space as such: "Ġx" and "▁x" both read " x"), from
    decoding it after an anchor token; None for special tokens and for bytes that are not a whole character."""
    anchor = tokenizer("a", add_special_tokens=False)["input_ids"][:1]
    head = tokenizer.decode(anchor, clean_up_tokenization_spaces=False)
    decoded = tokenizer.batch_decode([anchor + [i] for i in range(len(tokenizer))], skip_special_tokens=False, clean_up_tokenization_spaces=False)
    special = set(tokenizer.all_special_ids) | {i for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items() if t.special}
    return [
        None if i in special or not text.startswith(head) or REPLACEMENT in text[len(head):] or len(text) == len(head) else text[len(head):]
        for i, text in enumerate(decoded)
    ]


class Spellings:
    """Which student token a teacher token, or two in a row, spell (by their texts, `token_texts`); where several
    student tokens share a text, the lowest id."""

    def __init__(self, student: PreTrainedTokenizerBase, teacher: PreTrainedTokenizerBase) -> None:
        self.student: dict[str, int] = {}
        for i, text in enumerate(token_texts(student)):
            if text is not None:
                self.student.setdefault(text, i)
        self.teacher = token_texts(teacher)

    def vocabulary(self) -> Tensor:
        """[V_teacher] long: the student token with the same text as each teacher token, -1 where none has it."""
        return torch.tensor([self.student.get(text, -1) if text is not None else -1 for text in self.teacher], dtype=torch.long)

    def pairs(self, first: list[int], seconds: list[list[int]]) -> list[list[int]]:
        """For each teacher token `first[e]` and each `seconds[e][j]` after it: the student token of the two texts
        together (" 1" then "8": " 18"), -1 where none is."""
        out = []
        for a, row in zip(first, seconds):
            head = self.teacher[a]
            out.append([-1 if head is None or self.teacher[b] is None else self.student.get(head + self.teacher[b], -1) for b in row])
        return out


def vocabulary_map(student: PreTrainedTokenizerBase, teacher: PreTrainedTokenizerBase) -> Tensor:
    """[V_teacher] long: the student token with the same text as each teacher token (`token_texts`), -1 where none
    has it (`Spellings.vocabulary`)."""
    return Spellings(student, teacher).vocabulary()
