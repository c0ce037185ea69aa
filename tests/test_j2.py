"""Tensor-only tests of J'' (paper Eq. 11): GRPO anchored to the teacher ensemble, beta' sum_i w_i D_H(theta || T_i)."""

from dataclasses import replace

import pytest
import torch

from grpokd.objectives.base import Batch, KDStates, Needs
from grpokd.objectives.grpo import GRPO
from grpokd.objectives.j2 import J2
from grpokd.objectives.kd import TeacherMixer
from grpokd.objectives.functional import aggregate, hinton_kd, masked_mean

MASK = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0], [1.0, 0.0, 0.0], [1.0, 1.0, 1.0]])
REWARDS = torch.tensor([1.0, 0.0, 0.0, 1.0])
N, T, V = 4, 3, 5


def reverse_states(student: torch.Tensor, teachers: list, weights: torch.Tensor, tau: float) -> KDStates:
    mixer = TeacherMixer(tau, forward=False, reverse=True)
    for z, w in zip(teachers, weights):
        mixer.add(z, weight=w)
    return mixer.kd_states(student, MASK)


def make_batch(m: int, tau: float, seed: int = 0) -> tuple:
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(N, T, V, generator=g, requires_grad=True)
    teachers = [torch.randn(N, T, V, generator=g) * 2 for _ in range(m)]
    weights = torch.softmax(torch.randn(m, N, T, generator=g), 0)  # [M, N, T]
    logp = torch.log_softmax(student, -1)[..., 0]  # [N, T]
    old_logp = logp.detach() - 0.2 * torch.rand(N, T, generator=g)
    kd = reverse_states(student, teachers, weights, tau)
    b = Batch(logp=logp, mask=MASK, group_size=4, rewards=REWARDS, old_logp=old_logp, kd=kd)
    return b, student, teachers, weights


@pytest.mark.parametrize("tau", [0.5, 1.0, 2.0])
def test_one_teacher_regulariser_is_reverse_hinton_kd(tau):
    # M = 1, w = 1: lbar = log p, so beta' sum_i w_i D_H(theta || T_i) = beta' D_H(theta || T),
    # which is beta' * hinton_kd(student, teacher, tau)
    b, student, (teacher,), _ = make_batch(1, tau)
    b = replace(b, kd=reverse_states(student, [teacher], torch.ones(1, N, T), tau))
    out = J2(beta_prime=0.5, tau=tau)(b)
    expected_kd = hinton_kd(student, teacher, tau)  # [N, T]
    grpo = GRPO(beta=0.0)(b)
    torch.testing.assert_close(out.loss, grpo.loss + 0.5 * aggregate(expected_kd, MASK, "seq_mean_token_mean"))
    torch.testing.assert_close(out.metrics["kd_reverse"], masked_mean(expected_kd, MASK).detach())


def test_loss_and_gradient_equal_naive_multi_teacher_sum():
    b, student, teachers, weights = make_batch(3, 1.5)
    out = J2(beta_prime=0.2, tau=1.5, aggregation="token_mean")(b)
    (grad,) = torch.autograd.grad(out.loss, student, retain_graph=True)
    naive_kd = sum(w * hinton_kd(student, z, 1.5) for z, w in zip(teachers, weights))  # [N, T]
    naive = GRPO(beta=0.0, aggregation="token_mean")(b).loss + 0.2 * masked_mean(naive_kd, MASK)
    (naive_grad,) = torch.autograd.grad(naive, student)
    torch.testing.assert_close(out.loss, naive)
    torch.testing.assert_close(grad, naive_grad)


def test_beta_prime_zero_is_grpo_without_kl():
    b, student, _, _ = make_batch(2, 1.0)
    out = J2(beta_prime=0.0)(replace(b, kd=None))  # no teachers needed
    torch.testing.assert_close(out.loss, GRPO(beta=0.0)(b).loss)
    assert "kd_reverse" not in out.metrics and "kl" not in out.metrics


def test_needs_no_reference_model():
    needs = J2(beta_prime=0.1, tau=2.0, kd_states="gold").needs
    assert needs == Needs(rollouts=True, teacher_reverse=True, kd_tau=2.0, kd_states="gold")
    assert not needs.ref_logp and not needs.ref_logits and not needs.teacher_forward
    assert J2(beta_prime=0.0).needs == Needs(rollouts=True)


def test_missing_kd_raises():
    b, _, _, _ = make_batch(1, 1.0)
    with pytest.raises(ValueError, match="batch.kd"):
        J2(beta_prime=0.1)(replace(b, kd=None))


@pytest.mark.parametrize(
    "kwargs, key",
    [
        ({"beta_prime": -0.1}, "beta_prime"),
        ({"tau": 0.0}, "tau"),
        ({"kd_states": "both"}, "kd_states"),
        ({"beta": 0.04}, "beta"),  # J2 has no reference model
        ({"kl_estimator": "k3"}, "kl_estimator"),
        ({"aggregation": "mean"}, "aggregation"),  # GRPO's validation still applies
    ],
)
def test_invalid_arguments_name_the_key(kwargs, key):
    with pytest.raises(ValueError, match=key):
        J2(**kwargs)
