"""A model's logits at N x T positions, whole or chunked, and `per_position`, which maps a function over either.

The full-vocabulary terms (the KD divergences, TGPO's guide, the exact KL, the entropy bonus, the log-probs
themselves) are functions of the logits at each position. With `model.logit_chunk=C` the student's logits are
a `ChunkedLogits`: its final hidden states and output head, never multiplied out whole. `per_position` then
applies the head C positions at a time, each chunk inside a non-reentrant checkpoint when grad is on: the
forward keeps no chunk's [C, V] logits and the backward recomputes them, so memory is O(N*T*H + C*V) instead
of O(N*T*V), as cut-cross-entropy and Liger's fused losses do. Values and gradients equal the whole ones.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint


@dataclass(frozen=True)
class ChunkedLogits:
    """Logits `linear(hidden, weight, bias)[..., :vocab_size] / temperature` at N x T positions, held as their factors.

    Behaves as a [N, T, V] logits tensor where the terms use one: divided by a temperature, detached, sliced by
    rows; its values come out only through `per_position`.
    """

    hidden: Tensor  # [N, T, H] the model's final hidden states (with grad for the student)
    weight: Tensor  # [V', H] the output head
    bias: Tensor | None  # [V']
    vocab_size: int | None  # keep the first vocab_size logits (the tokenizer's length); None: all V'
    chunk: int  # positions per chunk
    temperature: float = 1.0

    @property
    def shape(self) -> torch.Size:
        return torch.Size((*self.hidden.shape[:-1], self.vocab_size or self.weight.shape[0]))

    def __truediv__(self, temperature: float) -> "ChunkedLogits":
        return replace(self, temperature=self.temperature * temperature)

    def __getitem__(self, rows: slice) -> "ChunkedLogits":
        return replace(self, hidden=self.hidden[rows])

    def detach(self) -> "ChunkedLogits":
        return replace(self, hidden=self.hidden.detach(), weight=self.weight.detach(), bias=None if self.bias is None else self.bias.detach())

    def at(self, hidden: Tensor) -> Tensor:
        """The logits of some positions' hidden states: [C, H] -> [C, V]."""
        return F.linear(hidden, self.weight, self.bias)[..., : self.vocab_size] / self.temperature


Logits = Tensor | ChunkedLogits


def per_position(logits: Logits, fn: Callable[..., Tensor | tuple[Tensor, ...]], *aligned: Tensor) -> Tensor | tuple[Tensor, ...]:
    """`fn(logits, *aligned)` for logits [N, T, V] and tensors aligned on the positions ([N, T, ...]); fn maps each
    position to a value ([.., V] -> [..]) and returns one tensor or a tuple of them: [N, T] each.

    A tensor is passed to fn whole. `ChunkedLogits` are materialised `chunk` positions at a time: fn sees [C, V]
    logits and the aligned tensors' matching rows [C, ...], inside a non-reentrant checkpoint when grad is on.
    """
    if isinstance(logits, Tensor):
        return fn(logits, *aligned)
    positions = logits.hidden.shape[:-1]  # (N, T)
    hidden = logits.hidden.reshape(-1, logits.hidden.shape[-1])  # [N*T, H]
    flat = [a.reshape(-1, *a.shape[len(positions) :]) for a in aligned]  # [N*T, ...] each
    grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (logits.hidden, logits.weight, logits.bias))
    parts = []
    for start in range(0, hidden.shape[0], logits.chunk):
        rows = slice(start, start + logits.chunk)
        args = (fn, logits, hidden[rows], *(a[rows] for a in flat))
        parts.append(checkpoint(_on_chunk, *args, use_reentrant=False) if grad else _on_chunk(*args))
    if isinstance(parts[0], Tensor):
        return torch.cat(parts).reshape(*positions, *parts[0].shape[1:])
    return tuple(torch.cat(values).reshape(*positions, *values[0].shape[1:]) for values in zip(*parts))


def _on_chunk(fn: Callable[..., Tensor | tuple[Tensor, ...]], logits: ChunkedLogits, hidden: Tensor, *aligned: Tensor) -> Tensor | tuple[Tensor, ...]:
    return fn(logits.at(hidden), *aligned)  # [C, V] logits live only in here
