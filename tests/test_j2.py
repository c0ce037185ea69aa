"""Tensor-only tests of J'' (paper Eq. 11, conf/objective/j2.yaml): GRPO anchored to the teacher ensemble, beta' sum_i w_i D_H(theta || T_i)."""

from dataclasses import replace

import pytest
import torch
from conftest import objective

from grpokd.objectives.base import Batch, KDStates, Needs
from grpokd.objectives.functional import aggregate, hinton_kd, masked_mean
from grpokd.teachers import TeacherMixer

MASK = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0], [1.0, 0.0, 0.0], [1.0, 1.0, 1.0]])
REWARDS = torch.tensor([1.0, 0.0, 0.0, 1.0])
N, T, V = 4, 3, 5


def make_j2(*overrides: str):
    """objective=j2 at the values these tests were written for (beta_prime 0.04, tau 1; max_tokens null: the
    seq_mean_token_sum_norm constant is T of the batch), then `overrides`."""
    return objective("j2", "beta_prime=0.04", "tau=1.0", "objective.max_tokens=null", *overrides)


def make_grpo(*overrides: str):
    """objective=grpo at beta 0.04, max_tokens null, then `overrides`."""
    return objective("grpo", "beta=0.04", "objective.max_tokens=null", *overrides)


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
    out = make_j2("beta_prime=0.5", f"tau={tau}")(b)
    expected_kd = hinton_kd(student, teacher, tau)  # [N, T]
    grpo = make_grpo("beta=0.0")(b)
    torch.testing.assert_close(out.loss, grpo.loss + 0.5 * aggregate(expected_kd, MASK, "seq_mean_token_mean"))
    torch.testing.assert_close(out.metrics["kd_reverse"], masked_mean(expected_kd, MASK).detach())


def test_loss_and_gradient_equal_naive_multi_teacher_sum():
    b, student, teachers, weights = make_batch(3, 1.5)
    out = make_j2("beta_prime=0.2", "tau=1.5", "objective.aggregation=token_mean")(b)
    (grad,) = torch.autograd.grad(out.loss, student, retain_graph=True)
    naive_kd = sum(w * hinton_kd(student, z, 1.5) for z, w in zip(teachers, weights))  # [N, T]
    naive = make_grpo("beta=0.0", "objective.aggregation=token_mean")(b).loss + 0.2 * masked_mean(naive_kd, MASK)
    (naive_grad,) = torch.autograd.grad(naive, student)
    torch.testing.assert_close(out.loss, naive)
    torch.testing.assert_close(grad, naive_grad)


def test_beta_prime_zero_is_grpo_without_kl():
    b, student, _, _ = make_batch(2, 1.0)
    out = make_j2("beta_prime=0.0")(replace(b, kd=None))  # no teachers needed
    torch.testing.assert_close(out.loss, make_grpo("beta=0.0")(b).loss)
    assert "kd_reverse" not in out.metrics and "kl" not in out.metrics


def test_needs_no_reference_model():
    needs = make_j2("beta_prime=0.1", "tau=2.0", "objective.terms.kd_reverse.states=gold").needs
    assert needs == Needs(rollouts=True, teacher_reverse=True, kd_tau=2.0, kd_states="gold")
    assert not needs.ref_logp and not needs.ref_logits and not needs.teacher_forward
    assert make_j2("beta_prime=0.0").needs == Needs(rollouts=True)


def test_missing_kd_raises():
    b, _, _, _ = make_batch(1, 1.0)
    with pytest.raises(ValueError, match="batch.kd"):
        make_j2("beta_prime=0.1")(replace(b, kd=None))


@pytest.mark.parametrize(
    "overrides, key",
    [
        (["beta_prime=-0.1"], "beta_prime"),
        (["tau=0.0"], "tau"),
        (["objective.terms.kd_reverse.states=both"], "objective.terms.kd_reverse.states='both'"),
        (["+objective.beta=0.04"], "beta"),  # j2 has no reference model: the surrogate takes no KL coefficient
        (["+objective.kl_estimator=k3"], "kl_estimator"),
        (["objective.aggregation=mean"], "aggregation"),  # GRPO's validation still applies
    ],
)
def test_invalid_arguments_name_the_key(overrides, key):
    with pytest.raises(ValueError, match=key):  # grpokd.errors.ConfigError, as a run raises it at start-up
        make_j2(*overrides)
