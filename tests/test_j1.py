"""Tensor-only tests of J' (paper Eq. 9, conf/objective/j1.yaml): GRPO + beta KL_full + lam * sum_i w_i D_H(T_i || theta)."""

from dataclasses import replace

import pytest
import torch
from conftest import objective

from grpokd.objectives.base import Batch, KDStates, Needs
from grpokd.objectives.functional import aggregate, hinton_kd, masked_mean
from grpokd.objectives.kd import forward_kd
from grpokd.teachers import TeacherMixer

# one group of K=4 with lengths 3, 2, 1, 3 (T=3), V=5
MASK = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0], [1.0, 0.0, 0.0], [1.0, 1.0, 1.0]])
REWARDS = torch.tensor([1.0, 0.0, 0.0, 1.0])
N, T, V = 4, 3, 5


def make_j1(*overrides: str):
    """objective=j1 at the values these tests were written for (lam 0.1, tau 1; max_tokens null: the
    seq_mean_token_sum_norm constant is T of the batch), then `overrides`."""
    return objective("j1", "lam=0.1", "tau=1.0", "objective.max_tokens=null", *overrides)


def make_grpo(*overrides: str):
    """objective=grpo at beta 0.04, max_tokens null, then `overrides`."""
    return objective("grpo", "beta=0.04", "objective.max_tokens=null", *overrides)


def tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(N, T, V, generator=g, requires_grad=True)
    return {
        "logits": logits,
        "logp": torch.log_softmax(logits, -1)[..., 0],  # [N, T] "sampled" token 0, with grad through logits
        "ref_logits": torch.randn(N, T, V, generator=g),
        "old_logp": torch.log_softmax(logits.detach(), -1)[..., 0] - 0.1 * torch.rand(N, T, generator=g),
        "teachers": [torch.randn(N, T, V, generator=g) * 2 for _ in range(2)],
    }


def kd_states(student: torch.Tensor, teachers: list[torch.Tensor], mask: torch.Tensor, tau: float) -> KDStates:
    mixer = TeacherMixer(tau, forward=True, reverse=False)
    for z in teachers:
        mixer.add(z, weight=1.0 / len(teachers))
    return mixer.kd_states(student, mask)


def batch(t: dict, tau: float = 1.0, with_kd: bool = True) -> Batch:
    kd = kd_states(t["logits"], t["teachers"], MASK, tau) if with_kd else None
    return Batch(
        logp=t["logp"],
        mask=MASK,
        group_size=4,
        rewards=REWARDS,
        old_logp=t["old_logp"],
        logits=t["logits"],
        ref_logits=t["ref_logits"],
        kd=kd,
    )


@pytest.mark.parametrize("estimator", ["full", "k3"])
def test_lam_zero_is_grpo_loss_and_gradient(estimator):
    t = tensors()
    b = batch(t, with_kd=False) if estimator == "full" else replace(batch(t), ref_logp=t["logp"].detach() + 0.3)
    j1_out = make_j1("lam=0.0", "beta=0.1", f"objective.terms.kl.estimator={estimator}")(b)
    (j1_grad,) = torch.autograd.grad(j1_out.loss, t["logits"], retain_graph=True)  # logp shares the graph
    grpo_out = make_grpo("beta=0.1", f"objective.terms.kl.estimator={estimator}")(b)
    (grpo_grad,) = torch.autograd.grad(grpo_out.loss, t["logits"])
    torch.testing.assert_close(j1_out.loss, grpo_out.loss)
    torch.testing.assert_close(j1_grad, grpo_grad)
    torch.testing.assert_close(j1_out.adv, grpo_out.adv)
    assert j1_out.metrics.keys() == grpo_out.metrics.keys()  # no "kd" when lam = 0


@pytest.mark.parametrize("aggregation", ["seq_mean_token_mean", "token_mean", "seq_mean_token_sum_norm"])
def test_rollout_kd_is_added_to_the_per_token_loss_before_aggregation(aggregation):
    # loss = aggregate(grpo_per_token + lam * kd_per_token): the KD term is weighed like every other token term
    t, lam, tau = tensors(), 0.3, 2.0
    b = batch(t, tau)
    objective = make_j1(f"lam={lam}", f"tau={tau}", "beta=0.1", f"objective.aggregation={aggregation}")
    out = objective(b)
    grpo_per_token, _ = make_grpo("beta=0.1", "objective.terms.kl.estimator=full", f"objective.aggregation={aggregation}").per_token_loss(b, out.adv)
    kd = sum(0.5 * hinton_kd(z, t["logits"], tau) for z in t["teachers"])  # [N, T] naive uniform mixture
    expected = aggregate(grpo_per_token + lam * kd, MASK, aggregation)
    torch.testing.assert_close(out.loss, expected)
    torch.testing.assert_close(out.metrics["kd"], masked_mean(kd, MASK).detach())


def test_kd_gradient_pulls_the_student_towards_the_teachers():
    # on-policy with constant rewards and beta = 0 the only gradient is the KD's (the sign check of the
    # departure from the paper: KD is minimised), so one small step down the loss must reduce the forward KD
    g = torch.Generator().manual_seed(1)
    student = torch.randn(N, T, V, generator=g, requires_grad=True)
    teachers = [torch.randn(N, T, V, generator=g) for _ in range(3)]
    logp = torch.log_softmax(student, -1)[..., 0]
    b = Batch(logp=logp, mask=MASK, group_size=4, rewards=torch.ones(4), kd=kd_states(student, teachers, MASK, 1.0))
    out = make_j1("lam=1.0", "beta=0.0")(b)
    out.loss.backward()
    stepped = (student - 0.5 * student.grad).detach()
    after = forward_kd(kd_states(stepped, teachers, MASK, 1.0))
    assert masked_mean(after, MASK) < out.metrics["kd"]


def test_gold_kd_states_are_aggregated_over_their_own_mask():
    # KD on 2 gold solutions of lengths 2 and 4 (T' = 4), independent of the 4 rollouts' shape
    t, lam = tensors(), 0.5
    g = torch.Generator().manual_seed(7)
    gold_student = torch.randn(2, 4, V, generator=g, requires_grad=True)
    gold_teacher = torch.randn(2, 4, V, generator=g)
    gold_mask = torch.tensor([[1.0, 1.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    kd = kd_states(gold_student, [gold_teacher], gold_mask, 1.0)
    b = replace(batch(t, with_kd=False), kd=kd)
    out = make_j1(f"lam={lam}", "beta=0.1", "objective.terms.kd.states=gold")(b)
    grpo_loss = make_grpo("beta=0.1", "objective.terms.kl.estimator=full")(b).loss
    # seq_mean_token_mean over the gold mask: mean of the two sequences' token means
    per_token = hinton_kd(gold_teacher, gold_student, 1.0)  # [2, 4]
    gold_kd = (per_token[0, :2].mean() + per_token[1].mean()) / 2
    torch.testing.assert_close(out.loss, grpo_loss + lam * gold_kd)
    out.loss.backward()
    assert gold_student.grad.abs().sum() > 0
    assert gold_student.grad[0, 2:].abs().max() == 0  # padded gold positions get no gradient


def test_needs():
    assert make_j1("lam=0.1", "tau=2.0").needs == Needs(
        rollouts=True, ref_logits=True, logits=True, teacher_forward=True, kd_tau=2.0, kd_states="rollouts"
    )
    # lam = 0: no teachers; beta = 0: no reference
    assert make_j1("lam=0.0", "beta=0.04").needs == Needs(rollouts=True, ref_logits=True, logits=True)
    assert make_j1("lam=0.1", "beta=0.0", "objective.terms.kd.states=gold").needs == Needs(
        rollouts=True, teacher_forward=True, kd_states="gold"
    )
    assert make_j1("lam=0.1", "objective.terms.kl.estimator=k3").needs == Needs(rollouts=True, ref_logp=True, teacher_forward=True)


def test_missing_or_mismatched_kd_raises():
    t = tensors()
    with pytest.raises(ValueError, match="batch.kd"):
        make_j1("lam=0.1")(batch(t, with_kd=False))
    with pytest.raises(ValueError, match="tau"):
        make_j1("lam=0.1", "tau=1.0")(batch(t, tau=2.0))


@pytest.mark.parametrize(
    "overrides, key",
    [
        (["lam=-0.1"], "lam"),
        (["tau=0.0"], "tau"),
        (["tau=-1.0"], "tau"),
        (["objective.terms.kd.states=teachers"], "objective.terms.kd.states='teachers' is not one of rollouts, gold"),
        (["objective.terms.kl.estimator=k4"], "objective.terms.kl.estimator='k4'"),  # GRPO's own validation still applies
        (["beta=-1.0"], "beta"),
    ],
)
def test_invalid_arguments_name_the_key(overrides, key):
    with pytest.raises(ValueError, match=key):  # grpokd.errors.ConfigError, as a run raises it at start-up
        make_j1(*overrides)


def test_unknown_kd_states_lists_allowed_values():
    with pytest.raises(ValueError, match="rollouts, gold"):
        make_j1("objective.terms.kd.states=teachers")
