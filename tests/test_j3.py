"""Tensor-only tests of J''' (paper Eq. 12-14, conf/objective/j3.yaml): J' with A' = A + gamma * norm_G(TA)."""

import math
from dataclasses import replace

import pytest
import torch
from conftest import objective

from grpokd.objectives.base import Batch, Needs
from grpokd.objectives.kd import group_normalize
from grpokd.teachers import TeacherMixer

DELTA = 1e-4
INF = math.inf
# one group of K=4 with lengths 3, 2, 1, 3 (T=3)
MASK = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0], [1.0, 0.0, 0.0], [1.0, 1.0, 1.0]])
LENGTHS = MASK.sum(-1)
REWARDS = torch.tensor([1.0, 0.0, 0.0, 1.0])
A = 0.5 / (0.5 + DELTA)  # rewards (1, 0, 0, 1): mean .5, population std .5
# a teacher's token log-probs; sequence sums (-1, -3, -1, -3), token means (-1/3, -1.5, -1, -1); padding -inf
TEACHER_LOGP = torch.tensor([[-0.5, -0.5, 0.0], [-1.0, -2.0, -INF], [-1.0, -INF, -INF], [-1.0, -1.0, -1.0]])
# two identical teachers: TA = log(.5 e^x + .5 e^x) = x, the sequence sum
TEACHERS_LOGP = torch.stack([TEACHER_LOGP, TEACHER_LOGP])  # [M, N, T]
N, T, V = 4, 3, 5


def make_j3(*overrides: str):
    """objective=j3 at the values these tests were written for (lam 0.1, tau 1; max_tokens null: the
    seq_mean_token_sum_norm constant is T of the batch), then `overrides`."""
    return objective("j3", "lam=0.1", "tau=1.0", "objective.max_tokens=null", *overrides)


def make_j1(*overrides: str):
    """objective=j1 at lam 0.1, tau 1, max_tokens null, then `overrides`."""
    return objective("j1", "lam=0.1", "tau=1.0", "objective.max_tokens=null", *overrides)


def make_logp(seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (-torch.rand(N, T, generator=g) * 3).requires_grad_(True)


def ta_batch(logp: torch.Tensor, rewards: torch.Tensor = REWARDS, **fields) -> Batch:
    return Batch(logp=logp, mask=MASK, group_size=4, rewards=rewards, teacher_logp=TEACHERS_LOGP, **fields)


def test_advantage_by_hand():
    # TA = (-1, -3, -1, -3): mean -2, population std 1 -> norm_G(TA) = (1, -1, 1, -1) / (1 + delta)
    # A = (a, -a, -a, a) -> A' = A + gamma * norm_G(TA)
    gamma, b = 0.5, 1 / (1 + DELTA)
    objective = make_j3(f"gamma={gamma}", "lam=0.0", "beta=0.0")
    expected = torch.tensor([A + gamma * b, -A - gamma * b, -A + gamma * b, A - gamma * b])
    torch.testing.assert_close(objective.advantages(ta_batch(make_logp())), expected)
    logp = make_logp()
    out = objective(ta_batch(logp))
    torch.testing.assert_close(out.adv, expected)
    # on-policy the surrogate is A' at every token: loss = -mean_i A'_i = 0 (both parts are centred),
    # gradient -A'_i / (N |o_i|) on real tokens (seq_mean_token_mean)
    assert out.loss.item() == pytest.approx(0.0, abs=1e-6)
    out.loss.backward()
    torch.testing.assert_close(logp.grad, -expected[:, None] / (4 * LENGTHS[:, None]) * MASK)
    # metrics: TA mean -2, std 1; std of (a, -a, -a, a) is a; of gamma * norm_G(TA) is gamma b
    assert out.metrics["ta_mean"].item() == pytest.approx(-2.0)
    assert out.metrics["ta_std"].item() == pytest.approx(1.0)
    assert out.metrics["adv_reward_std"].item() == pytest.approx(A, rel=1e-5)
    assert out.metrics["adv_teacher_std"].item() == pytest.approx(gamma * b, rel=1e-5)
    assert all(not m.requires_grad and m.dim() == 0 for m in out.metrics.values())


def test_length_normalize_uses_token_means():
    # TA = (-1/3, -1.5, -1, -1) (token means): the teacher part is gamma * norm_G of that
    ta = torch.tensor([-1 / 3, -1.5, -1.0, -1.0])
    objective = make_j3("gamma=1.0", "lam=0.0", "beta=0.0", "objective.terms.ta.length_normalize=true")
    expected = torch.tensor([A, -A, -A, A]) + group_normalize(ta, 4, DELTA)
    torch.testing.assert_close(objective.advantages(ta_batch(make_logp())), expected)


def test_constant_rewards_with_disagreeing_teachers_still_move_the_policy():
    # all rewards tie -> A = 0, GRPO's gradient vanishes; TA varies -> A' = gamma * norm_G(TA) != 0
    logp = make_logp()
    out = make_j3("gamma=0.2", "lam=0.0", "beta=0.0")(ta_batch(logp, rewards=torch.ones(4)))
    torch.testing.assert_close(out.adv, 0.2 * torch.tensor([1.0, -1.0, 1.0, -1.0]) / (1 + DELTA))
    assert out.metrics["adv_reward_std"].item() == 0.0
    assert out.metrics["adv_teacher_std"].item() > 0.0
    out.loss.backward()
    assert logp.grad.abs().max() > 0


def test_sequence_weights_come_from_the_position_weights():
    # teacher 0 scores (-1, -3, -1, -3), teacher 1 is 2 nats worse on every sequence (first token -2 lower);
    # weights (1, 0) at every position -> TA is teacher 0's; (0, 1) -> teacher 1's (the same after norm_G)
    other = TEACHER_LOGP.clone()
    other[:, 0] -= 2.0
    teacher_logp = torch.stack([TEACHER_LOGP, other])  # [M, N, T]
    only_first = torch.stack([torch.ones(N, T), torch.zeros(N, T)])  # [M, N, T]
    objective = make_j3("gamma=1.0", "lam=0.0", "beta=0.0")
    b = ta_batch(make_logp(), teacher_weights=only_first)
    out = objective(replace(b, teacher_logp=teacher_logp))
    assert out.metrics["ta_mean"].item() == pytest.approx(-2.0)
    out = objective(replace(b, teacher_logp=teacher_logp, teacher_weights=only_first.flip(0)))
    assert out.metrics["ta_mean"].item() == pytest.approx(-4.0)


def test_gamma_zero_is_j1_loss_and_gradient():
    g = torch.Generator().manual_seed(3)
    student = torch.randn(N, T, V, generator=g, requires_grad=True)
    teachers = [torch.randn(N, T, V, generator=g) for _ in range(2)]
    mixer = TeacherMixer(2.0)
    for z in teachers:
        mixer.add(z, weight=0.5)
    logp = torch.log_softmax(student, -1)[..., 0]  # [N, T]
    b = Batch(
        logp=logp,
        mask=MASK,
        group_size=4,
        rewards=REWARDS,
        old_logp=logp.detach() - 0.1,
        logits=student,
        ref_logits=torch.randn(N, T, V, generator=g),
        kd=mixer.kd_states(student, MASK),
    )
    j3 = make_j3("gamma=0.0", "lam=0.3", "tau=2.0")(b)  # no teacher_logp in the batch: not needed when gamma = 0
    (j3_grad,) = torch.autograd.grad(j3.loss, student, retain_graph=True)
    j1 = make_j1("lam=0.3", "tau=2.0")(b)
    (j1_grad,) = torch.autograd.grad(j1.loss, student)
    torch.testing.assert_close(j3.loss, j1.loss)
    torch.testing.assert_close(j3_grad, j1_grad)
    assert j3.metrics.keys() == j1.metrics.keys()
    assert "kd" in j3.metrics


def test_needs():
    assert make_j3("gamma=0.1", "lam=0.1", "tau=2.0").needs == Needs(
        rollouts=True, ref_logits=True, logits=True, teacher_logp=True, teacher_forward=True, kd_tau=2.0
    )
    assert make_j3("gamma=0.0", "lam=0.1").needs == make_j1("lam=0.1").needs
    assert make_j3("gamma=0.1", "lam=0.0", "beta=0.0").needs == Needs(rollouts=True, teacher_logp=True)


def test_missing_teacher_logp_raises():
    with pytest.raises(ValueError, match="teacher_logp"):
        make_j3("gamma=0.1", "lam=0.0", "beta=0.0")(Batch(logp=make_logp(), mask=MASK, group_size=4, rewards=REWARDS))


@pytest.mark.parametrize(
    "overrides, key",
    [
        (["gamma=-0.1"], "gamma"),
        (["objective.terms.ta.length_normalize=yes"], "length_normalize"),
        (["lam=-1.0"], "lam"),  # J1's validation still applies
        (["tau=0.0"], "tau"),
        (["objective.terms.kd.states=nowhere"], "objective.terms.kd.states='nowhere'"),
    ],
)
def test_invalid_arguments_name_the_key(overrides, key):
    with pytest.raises(ValueError, match=key):  # grpokd.errors.ConfigError, as a run raises it at start-up
        make_j3(*overrides)
