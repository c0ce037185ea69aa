"""Tensor-only tests of TGPO (conf/objective/tgpo.yaml): GRPO + lam_t * CE to the teachers' next-token choice along the student's rollout."""

from __future__ import annotations

import pytest
import torch
from conftest import objective

from grpokd.objectives.base import Batch
from grpokd.objectives.terms.teacher_guide import hard_guidance, teacher_targets, topk_guidance
from grpokd.teachers import TeacherMixer

MASK = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0], [1.0, 0.0, 0.0], [1.0, 1.0, 1.0]])
REWARDS = torch.tensor([1.0, 0.0, 0.0, 1.0])
N, T, V = 4, 3, 6


def make_tgpo(*overrides: str):
    """objective=tgpo with max_tokens null (the seq_mean_token_sum_norm constant is T of the batch), then `overrides`."""
    return objective("tgpo", "objective.max_tokens=null", *overrides)


def make_grpo(*overrides: str):
    """objective=grpo at beta 0.04, max_tokens null, then `overrides`."""
    return objective("grpo", "beta=0.04", "objective.max_tokens=null", *overrides)


def make_batch(seed: int = 0, step: int = 0, teachers: list[torch.Tensor] | None = None, weights: list[float] | None = None) -> Batch:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(N, T, V, generator=g, requires_grad=True)
    teachers = teachers or [torch.randn(N, T, V, generator=g) * 2 for _ in range(2)]
    weights = weights or [1.0 / len(teachers)] * len(teachers)
    mixer = TeacherMixer(1.0, forward=True)
    for z, w in zip(teachers, weights):
        mixer.add(z, weight=w)
    ids = torch.randint(V, (N, T), generator=g)
    logp = torch.log_softmax(logits, -1).gather(-1, ids[..., None]).squeeze(-1)
    return Batch(logp=logp, mask=MASK, group_size=4, rewards=REWARDS, logits=logits,
                 kd=mixer.kd_states(logits, MASK), step=step)


def test_lam_t_zero_is_grpo():
    b = make_batch()
    out = make_tgpo("lam_t=0.0", "beta=0.0", "objective.aggregation=token_mean")(b)
    ref = make_grpo("beta=0.0", "objective.aggregation=token_mean")(b)
    assert torch.equal(out.loss, ref.loss)
    (g1,) = torch.autograd.grad(out.loss, b.logits, retain_graph=True)
    (g2,) = torch.autograd.grad(ref.loss, b.logits)
    assert torch.equal(g1, g2)
    assert not make_tgpo("lam_t=0.0").needs.teacher_forward


def test_target_is_the_mixture_argmax_not_either_teachers():
    # teacher A prefers token 0, teacher B token 2; their even mixture prefers token 1
    a = torch.log(torch.tensor([0.50, 0.45, 0.05, 1e-6, 1e-6, 1e-6])).expand(N, T, V)
    b = torch.log(torch.tensor([0.05, 0.45, 0.50, 1e-6, 1e-6, 1e-6])).expand(N, T, V)
    batch = make_batch(teachers=[a, b])
    assert torch.all(teacher_targets(batch.kd.pbar, "argmax") == 1)
    assert torch.all(a.argmax(-1) == 0) and torch.all(b.argmax(-1) == 2)
    skewed = make_batch(teachers=[a, b], weights=[0.9, 0.1])
    assert torch.all(teacher_targets(skewed.kd.pbar, "argmax") == 0)  # the weights move the choice


def test_loss_adds_lam_t_times_token_mean_cross_entropy():
    b = make_batch()
    out = make_tgpo("lam_t=0.7", "beta=0.0")(b)
    targets = b.kd.pbar.argmax(-1)
    ce = -torch.log_softmax(b.logits.detach(), -1).gather(-1, targets[..., None]).squeeze(-1)
    grpo = make_grpo("beta=0.0", "objective.aggregation=token_mean")(b).loss
    expected = grpo + 0.7 * (ce * MASK).sum() / MASK.sum()
    assert torch.allclose(out.loss, expected, atol=1e-6)


def test_guidance_is_not_gated_by_reward_or_ratio():
    """The CE gradient is the same whatever the rewards: every completion token is guided."""
    b = make_batch()
    constant = Batch(**{**b.__dict__, "rewards": torch.ones(N)})  # zero advantages: only the guidance remains
    out = make_tgpo("lam_t=1.0", "beta=0.0")(constant)
    (grad,) = torch.autograd.grad(out.loss, b.logits)
    targets = b.kd.pbar.argmax(-1)
    q = torch.softmax(b.logits.detach(), -1)
    expected = (q - torch.nn.functional.one_hot(targets, V)) * MASK[..., None] / MASK.sum()
    assert torch.allclose(grad, expected, atol=1e-6)


def test_sampled_targets_follow_the_mixture():
    torch.manual_seed(0)
    pbar = torch.tensor([0.7, 0.2, 0.1, 0.0]).expand(2000, 1, 4)
    counts = torch.bincount(teacher_targets(pbar, "sampled").view(-1), minlength=4).float() / 2000
    assert torch.allclose(counts, torch.tensor([0.7, 0.2, 0.1, 0.0]), atol=0.04)


def test_topk_guidance_is_the_renormalised_forward_kl():
    g = torch.Generator().manual_seed(1)
    pbar = torch.softmax(torch.randn(2, 3, V, generator=g), -1)
    logits = torch.randn(2, 3, V, generator=g)
    top = pbar.topk(2, -1)
    p = top.values / top.values.sum(-1, keepdim=True)
    log_q = torch.log_softmax(logits, -1).gather(-1, top.indices)
    assert torch.allclose(topk_guidance(logits, pbar, k=2), (p * (p.log() - log_q)).sum(-1), atol=1e-6)
    # k = V is the full forward KL; a student equal to the teachers gets 0
    assert torch.allclose(topk_guidance(pbar.log(), pbar, k=V), torch.zeros(2, 3), atol=1e-5)
    # k = 1 is the argmax cross-entropy
    assert torch.allclose(topk_guidance(logits, pbar, k=1), hard_guidance(logits, pbar.argmax(-1)), atol=1e-6)


def test_linear_lambda_schedule_values():
    tgpo = make_tgpo("lam_t=1.0", "objective.terms.guide.schedule=linear", "objective.terms.guide.decay=0.01", "beta=0.0")
    guide = tgpo.terms["guide"]  # lam_t is the guide term's coefficient
    assert guide.coefficient(0) == pytest.approx(1.0)
    assert guide.coefficient(50) == pytest.approx(0.5)
    assert guide.coefficient(100) == pytest.approx(0.0)
    assert guide.coefficient(150) == pytest.approx(0.0)
    assert tgpo(make_batch(step=50)).metrics["lam_t"] == pytest.approx(0.5)


def test_entropy_bonus_lowers_the_loss_by_the_entropy():
    b = make_batch()
    plain = make_tgpo("lam_t=0.5", "beta=0.0")(b).loss
    bonus = make_tgpo("lam_t=0.5", "beta=0.0", "+term@objective.terms.entropy=entropy_bonus", "objective.terms.entropy.weight=0.1")(b)
    log_q = torch.log_softmax(b.logits.detach(), -1)
    ent = -(log_q.exp() * log_q).sum(-1)
    assert torch.allclose(bonus.loss, plain - 0.1 * (ent * MASK).sum() / MASK.sum(), atol=1e-6)
    assert make_tgpo("+term@objective.terms.entropy=entropy_bonus", "objective.terms.entropy.weight=0.1").needs.logits


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["objective.terms.guide.target=beam"], "target='beam' is not one of argmax, sampled, topk"),
        (["objective.terms.guide.schedule=step"], "objective.terms.guide.schedule='step' is not one of constant, linear"),
        (["objective.terms.guide.target_k=0"], "target_k=0 must be >= 1"),
        (["+term@objective.terms.entropy=entropy_bonus", "objective.terms.entropy.weight=-0.1"], "objective.terms.entropy.weight=-0.1 must be >= 0"),
    ],
)
def test_bad_arguments(overrides, message):
    with pytest.raises(ValueError, match=message):  # grpokd.errors.ConfigError, as a run raises it at start-up
        make_tgpo(*overrides)
