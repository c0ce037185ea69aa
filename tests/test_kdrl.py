"""Tensor-only tests of KDRL (conf/objective/kdrl.yaml): GRPO + beta_kd * reverse KL(theta || teachers) on the rollouts."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import objective

from grpokd.objectives.base import Batch
from grpokd.objectives.terms.teacher_kl import kd_mask, mixture_logp

# two groups of K=2, T=3; lengths 3, 2, 1, 3
MASK = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0], [1.0, 0.0, 0.0], [1.0, 1.0, 1.0]])
REWARDS = torch.tensor([1.0, 0.0, 0.0, 0.0])
N, T, M = 4, 3, 2


def make_kdrl(*overrides: str):
    """objective=kdrl with max_tokens null (the seq_mean_token_sum_norm constant is T of the batch), then `overrides`."""
    return objective("kdrl", "objective.max_tokens=null", *overrides)


def make_grpo(*overrides: str):
    """objective=grpo at beta 0.04, max_tokens null, then `overrides`."""
    return objective("grpo", "beta=0.04", "objective.max_tokens=null", *overrides)


def make_batch(seed: int = 0, rewards: torch.Tensor = REWARDS, step: int = 0, weights: torch.Tensor | None = None) -> Batch:
    g = torch.Generator().manual_seed(seed)
    logp = (-torch.rand(N, T, generator=g) * 3).requires_grad_()
    teacher_logp = -torch.rand(M, N, T, generator=g) * 3
    return Batch(logp=logp, mask=MASK, group_size=2, rewards=rewards, teacher_logp=teacher_logp,
                 teacher_weights=weights, step=step)


def test_beta_kd_zero_is_grpo():
    b = make_batch()
    kdrl = make_kdrl("beta_kd=0.0", "beta=0.0")(b)
    grpo = make_grpo("beta=0.0")(b)
    assert torch.equal(kdrl.loss, grpo.loss)
    assert not make_kdrl("beta_kd=0.0").needs.teacher_logp


def test_mixture_logp_is_the_log_of_the_weighted_mixture():
    b = make_batch()
    w = torch.tensor([0.25, 0.75])[:, None, None].expand(M, N, T)
    naive = torch.log(0.25 * b.teacher_logp[0].exp() + 0.75 * b.teacher_logp[1].exp())
    assert torch.allclose(mixture_logp(b.teacher_logp, w), naive, atol=1e-6)
    uniform = torch.log(0.5 * b.teacher_logp[0].exp() + 0.5 * b.teacher_logp[1].exp())
    assert torch.allclose(mixture_logp(b.teacher_logp, None), uniform, atol=1e-6)


def test_k2_gradient_is_the_reverse_kl_policy_gradient():
    """With zero advantages (every group's rewards equal) and beta=0, grad = beta_kd * (logp - log pi_T) * token weight."""
    b = make_batch(rewards=torch.ones(N))
    out = make_kdrl("beta_kd=0.3", "objective.terms.teacher_kl.estimator=k2", "beta=0.0")(b)
    (grad,) = torch.autograd.grad(out.loss, b.logp)
    teacher = mixture_logp(b.teacher_logp, None)
    lengths = MASK.sum(-1, keepdim=True)  # seq_mean_token_mean: a token weighs 1 / (N |o_i|)
    expected = 0.3 * (b.logp.detach() - teacher) * MASK / (N * lengths)
    assert torch.allclose(grad, expected, atol=1e-6)


def test_k3_loss_value():
    b = make_batch(rewards=torch.ones(N))
    out = make_kdrl("beta_kd=0.5", "objective.terms.teacher_kl.estimator=k3", "beta=0.0")(b)
    d = b.logp.detach() - mixture_logp(b.teacher_logp, None)
    k3 = torch.exp(-d) + d - 1
    expected = 0.5 * ((k3 * MASK).sum(-1) / MASK.sum(-1)).mean()
    assert torch.allclose(out.loss, expected, atol=1e-6)


def test_k1_is_a_per_token_advantage_term():
    """k1 adds -beta_kd * d_t to each token's advantage: the loss gradient is -(A - beta_kd d_t) grad logp."""
    b = make_batch()
    out = make_kdrl("beta_kd=0.2", "objective.terms.teacher_kl.estimator=k1", "beta=0.0")(b)
    (grad,) = torch.autograd.grad(out.loss, b.logp)
    adv = make_grpo("beta=0.0").advantages(b)[:, None]  # [N, 1]
    d = b.logp.detach() - mixture_logp(b.teacher_logp, None)
    expected = -(adv - 0.2 * d) * MASK / (N * MASK.sum(-1, keepdim=True))
    assert torch.allclose(grad, expected, atol=1e-6)
    assert torch.equal(out.adv, make_grpo("beta=0.0").advantages(b))  # the sequence part is what sample tables show


def test_masks_select_the_right_completions():
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0])  # groups of K=2: mean 0.5, 0, 1
    assert kd_mask(rewards, 2, "none").tolist() == [1, 1, 1, 1, 1, 1]
    assert kd_mask(rewards, 2, "incorrect_only").tolist() == [0, 1, 1, 1, 0, 0]
    assert kd_mask(rewards, 2, "hard_prompts", threshold=0.5).tolist() == [0, 0, 1, 1, 0, 0]
    assert kd_mask(rewards, 2, "hard_prompts", threshold=0.6).tolist() == [1, 1, 1, 1, 0, 0]


def test_masked_completions_get_no_kd_gradient():
    b = make_batch(rewards=torch.tensor([1.0, 0.0, 1.0, 1.0]))  # only row 1 is incorrect; groups 0 and 1
    out = make_kdrl("beta_kd=1.0", "objective.terms.teacher_kl.estimator=k2", "objective.terms.teacher_kl.kd_mask=incorrect_only", "beta=0.0")(b)
    (grad,) = torch.autograd.grad(out.loss, b.logp)
    plain = make_grpo("beta=0.0")(b)
    (grpo_grad,) = torch.autograd.grad(plain.loss, b.logp)
    kd_grad = grad - grpo_grad
    assert torch.all(kd_grad[[0, 2, 3]] == 0)
    assert torch.all(kd_grad[1, :2] != 0)
    assert out.metrics["kd_mask_frac"] == pytest.approx(2 / 9)


def test_linear_schedule_values():
    kdrl = make_kdrl("beta_kd=0.1", "objective.terms.teacher_kl.schedule=linear", "objective.terms.teacher_kl.decay=1e-3", "objective.terms.teacher_kl.floor=0.02", "beta=0.0")
    kd = kdrl.terms["teacher_kl"]  # beta_kd at a step is the KD term's coefficient
    assert kd.coefficient(0) == pytest.approx(0.1)
    assert kd.coefficient(40) == pytest.approx(0.06)
    assert kd.coefficient(80) == pytest.approx(0.02)
    assert kd.coefficient(1000) == pytest.approx(0.02)
    assert make_kdrl("beta_kd=0.1").terms["teacher_kl"].coefficient(10**6) == pytest.approx(0.1)
    out = kdrl(make_batch(step=40))
    assert out.metrics["beta_kd"] == pytest.approx(0.06)


def test_teacher_weights_change_the_target():
    w = torch.tensor([1.0, 0.0])[:, None, None].expand(M, N, T).clone()
    b = make_batch(rewards=torch.ones(N), weights=w)
    out = make_kdrl("beta_kd=1.0", "objective.terms.teacher_kl.estimator=k2", "beta=0.0")(b)
    d = b.logp.detach() - b.teacher_logp[0]  # all the weight on teacher 0
    assert math.isclose(float(out.loss.detach()), float((0.5 * d**2 * MASK).sum(-1).div(MASK.sum(-1)).mean()), rel_tol=1e-5)


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["objective.terms.teacher_kl.estimator=full"], "estimator='full' is not one of k1, k2, k3"),
        (["objective.terms.teacher_kl.kd_mask=wrong"], "kd_mask='wrong' is not one of none, incorrect_only, hard_prompts"),
        (["objective.terms.teacher_kl.schedule=cosine"], "objective.terms.teacher_kl.schedule='cosine' is not one of constant, linear"),
        (["objective.terms.teacher_kl.decay=0.01"], "objective.terms.teacher_kl.schedule=constant with decay=0.01: set schedule=linear"),
        (["beta_kd=-1.0"], "must be >= 0"),
        (["objective.terms.teacher_kl.schedule=linear", "objective.terms.teacher_kl.floor=0.5"], "below its floor"),
    ],
)
def test_bad_arguments(overrides, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):  # grpokd.errors.ConfigError
        make_kdrl(*overrides)
