"""Padding can never make the loss or its gradient NaN: masked positions are zeroed before any exp or square.

Every objective that reads per-token log-probs gets a batch whose padded positions hold -inf / +inf /
1e30 (student, behaviour policy, reference, teachers). Its loss and gradient must be finite and equal
to those of the same batch with zeros there.
"""

from __future__ import annotations

import pytest
import torch
from conftest import objective

from grpokd.objectives.base import Batch

MASK = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0], [1.0, 0.0, 0.0], [1.0, 1.0, 0.0]])
N, T, M = 4, 3, 2
PAD = MASK == 0


def tensors(poison: bool) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    t = {
        "logp": -torch.rand(N, T, generator=g) * 3,
        "old_logp": -torch.rand(N, T, generator=g) * 3,
        "ref_logp": -torch.rand(N, T, generator=g) * 3,
        "teacher_logp": -torch.rand(M, N, T, generator=g) * 3,
        "teacher_weights": torch.full((M, N, T), 0.5),
    }
    if poison:
        t["logp"] = t["logp"].masked_fill(PAD, float("-inf"))
        t["old_logp"] = t["old_logp"].masked_fill(PAD, 1e30)
        t["ref_logp"] = t["ref_logp"].masked_fill(PAD, float("inf"))
        t["teacher_logp"] = t["teacher_logp"].masked_fill(PAD, float("-inf"))
        t["teacher_weights"] = t["teacher_weights"].masked_fill(PAD, 0.0)
    return t


NULL = "objective.max_tokens=null"  # as these tests were written: the seq_mean_token_sum_norm constant is T of the batch
OBJECTIVES = {
    "grpo-k1": objective("grpo", "beta=0.1", "objective.terms.kl.estimator=k1", NULL),
    "grpo-k2": objective("grpo", "beta=0.1", "objective.terms.kl.estimator=k2", NULL),
    "grpo-k3": objective("grpo", "beta=0.1", "objective.terms.kl.estimator=k3", NULL),
    "grpo-sequence-ratio": objective("grpo", "beta=0.1", "objective.ratio_level=sequence", NULL),
    "j3-ta": objective("j3", "gamma=0.5", "lam=0.0", "tau=1.0", "beta=0.1", "objective.terms.kl.estimator=k3", NULL),
    "kdrl-k2": objective("kdrl", "beta_kd=0.5", "objective.terms.teacher_kl.estimator=k2", NULL),
    "kdrl-k3": objective("kdrl", "beta_kd=0.5", "objective.terms.teacher_kl.estimator=k3", NULL),
    "kdrl-k1": objective("kdrl", "beta_kd=0.5", "objective.terms.teacher_kl.estimator=k1", NULL),
}


def loss_and_grad(objective, poison: bool) -> tuple[torch.Tensor, torch.Tensor]:
    t = tensors(poison)
    logp = t.pop("logp").requires_grad_()
    batch = Batch(logp=logp, mask=MASK, group_size=2, rewards=torch.tensor([1.0, 0.0, 0.0, 1.0]), **t)
    loss = objective(batch).loss
    (grad,) = torch.autograd.grad(loss, logp)
    return loss, grad


@pytest.mark.parametrize("name", OBJECTIVES)
def test_infinite_values_at_padded_positions_change_nothing(name):
    loss, grad = loss_and_grad(OBJECTIVES[name], poison=True)
    clean_loss, clean_grad = loss_and_grad(OBJECTIVES[name], poison=False)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    # the clean batch has finite random values at padding: they must not matter either
    torch.testing.assert_close(loss, clean_loss)
    torch.testing.assert_close(grad, clean_grad)
    assert torch.all(grad[PAD] == 0)


def test_without_the_masking_the_poisoned_batch_would_be_nan():
    """The guard is needed: the same k3 estimate on raw tensors is NaN (exp(inf) * 0)."""
    from grpokd.objectives.functional import kl_sampled, masked_mean

    t = tensors(poison=True)
    assert torch.isnan(masked_mean(kl_sampled(t["logp"], t["ref_logp"], "k3"), MASK))
