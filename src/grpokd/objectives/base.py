"""What every objective consumes and returns.

An objective is a small pure object: tensors in (`Batch`), a named result out
(`LossOut`). It declares in `needs` which tensors the training module must
compute for it, so nothing unused is loaded or computed (no reference model
when beta=0, no full-vocabulary logits for sampled-token estimators, ...).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor


@dataclass(frozen=True)
class Needs:
    """The inputs an objective asks the training module for."""

    rollouts: bool = True  # sample K completions per prompt; False: score the gold solutions (SFT)
    ref_logp: bool = False  # reference log-probs of the scored tokens [N, T]
    ref_logits: bool = False  # reference full-vocabulary logits [N, T, V]
    logits: bool = False  # student full-vocabulary logits [N, T, V], with grad


@dataclass(frozen=True)
class Batch:
    """Tensors for one optimisation step. Shapes: N completions, T tokens, V vocabulary."""

    logp: Tensor  # [N, T] student log-probs of the scored tokens, with grad
    mask: Tensor  # [N, T] 1.0 on real completion tokens, 0.0 on padding
    group_size: int = 1  # K: completions per prompt, consecutive rows form a group
    rewards: Tensor | None = None  # [N]
    old_logp: Tensor | None = None  # [N, T] behaviour-policy log-probs; None means on-policy (logp.detach())
    logits: Tensor | None = None  # [N, T, V] student logits, with grad
    ref_logp: Tensor | None = None  # [N, T]
    ref_logits: Tensor | None = None  # [N, T, V]
    step: int = 0  # optimiser step, for coefficient schedules


@dataclass(frozen=True)
class LossOut:
    """An objective's result: the scalar to minimise and detached scalar metrics."""

    loss: Tensor  # [] scalar
    metrics: dict[str, Tensor] = field(default_factory=dict)  # unprefixed names, e.g. "policy_loss", "kl"
    adv: Tensor | None = None  # [N] per-completion advantage (for sample tables)
