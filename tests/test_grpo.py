"""Tensor-only tests of the GRPO objective (conf/objective/grpo.yaml): gradients and values by hand, needs, validation."""

import math

import pytest
import torch
from conftest import objective

from grpokd.objectives.base import Batch, Needs
from grpokd.objectives.functional import kl_full
from grpokd.objectives.policy import PolicyObjective

DELTA = 1e-4
LN2 = math.log(2.0)
# one group of K=4 with lengths 3, 2, 1, 3 (T=3)
MASK = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0], [1.0, 0.0, 0.0], [1.0, 1.0, 1.0]])
LENGTHS = MASK.sum(-1)  # [N]
REWARDS = torch.tensor([1.0, 0.0, 0.0, 1.0])
# mean .5, population std .5 -> A = +-.5 / (.5 + delta)
A = 0.5 / (0.5 + DELTA)
ADV = torch.tensor([A, -A, -A, A])


def make_grpo(*overrides: str) -> PolicyObjective:
    """objective=grpo at the values these tests were written for (beta 0.04; max_tokens null: the
    seq_mean_token_sum_norm constant is T of the batch), then `overrides`."""
    return objective("grpo", "beta=0.04", "objective.max_tokens=null", *overrides)


def make_logp(seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (-torch.rand(4, 3, generator=g) * 3).requires_grad_(True)


def grad_of_loss(objective: PolicyObjective, **batch_fields) -> torch.Tensor:
    logp = make_logp()
    out = objective(Batch(logp=logp, mask=MASK, group_size=4, **batch_fields))
    out.loss.backward()
    return logp.grad


def test_constant_rewards_give_zero_gradient():
    # every completion equally good: A = 0, so the surrogate and its gradient vanish
    logp = make_logp()
    out = make_grpo("beta=0.0")(Batch(logp=logp, mask=MASK, group_size=4, rewards=torch.ones(4)))
    out.loss.backward()
    assert out.loss.item() == 0.0
    assert logp.grad.abs().max().item() == 0.0


def test_on_policy_gradient_seq_mean_token_mean():
    # rho = exp(logp - logp.detach()) = 1 in value, d rho / d logp = 1; loss = -(1/N) sum_i (1/|o_i|) sum_t rho A_i
    # -> d loss / d logp_{i,t} = -A_i / (N |o_i|) on real tokens, 0 on padding
    grad = grad_of_loss(make_grpo("beta=0.0"), rewards=REWARDS)
    expected = -ADV[:, None] / (4 * LENGTHS[:, None]) * MASK
    torch.testing.assert_close(grad, expected)


def test_on_policy_gradient_other_aggregations():
    # DAPO: every token weighs 1 / sum_i |o_i| = 1/9
    grad = grad_of_loss(make_grpo("beta=0.0", "objective.aggregation=token_mean"), rewards=REWARDS)
    torch.testing.assert_close(grad, -ADV[:, None] / 9 * MASK)
    # Dr. GRPO: every token weighs 1 / (N * T) = 1/12, and the advantage is not divided by the std
    objective = make_grpo("beta=0.0", "objective.aggregation=seq_mean_token_sum_norm", "objective.adv_scale=none")
    grad = grad_of_loss(objective, rewards=REWARDS)
    torch.testing.assert_close(grad, -(REWARDS - 0.5)[:, None] / 12 * MASK)


def test_sequence_ratio_matches_token_ratio_on_policy():
    # on-policy under seq_mean_token_mean: d s_i / d logp_{i,t} = 1/|o_i|, the same weight the
    # token-level mean gives each token's ratio, so the two gradients coincide
    token = grad_of_loss(make_grpo("beta=0.0", "objective.ratio_level=token"), rewards=REWARDS)
    sequence = grad_of_loss(make_grpo("beta=0.0", "objective.ratio_level=sequence"), rewards=REWARDS)
    torch.testing.assert_close(sequence, token)


def test_off_policy_loss_with_k3_by_hand():
    # N=2, K=2, rewards (1, 0): A = (a, -a), a = .5 / (.5 + delta); lengths 2 and 1
    # ratios: seq 0 tokens 1.1 and 1.5, seq 1 token .5; clip range [.8, 1.2]
    # seq 0 surrogate: 1.1a, min(1.5a, 1.2a) = 1.2a (high-clipped) -> mean 1.15a
    # seq 1 surrogate: min(-.5a, -.8a) = -.8a (low-clipped)
    # policy loss = -(1.15a - .8a) / 2 = -.175a
    # ref_logp = logp + ln 2 everywhere: k3 = 2 - ln 2 - 1 on every token -> KL part beta (1 - ln 2)
    a = 0.5 / (0.5 + DELTA)
    beta = 0.1
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    logp = torch.tensor([[-1.0, -2.0], [-0.5, 0.0]], requires_grad=True)
    old_logp = logp.detach() - torch.tensor([[1.1, 1.5], [0.5, 1.0]]).log()
    batch = Batch(
        logp=logp,
        mask=mask,
        group_size=2,
        rewards=torch.tensor([1.0, 0.0]),
        old_logp=old_logp,
        ref_logp=logp.detach() + LN2,
    )
    out = make_grpo(f"beta={beta}", "objective.terms.kl.estimator=k3")(batch)
    assert out.loss.item() == pytest.approx(-0.175 * a + beta * (1 - LN2), rel=1e-5)
    assert out.metrics["policy_loss"].item() == pytest.approx(-0.175 * a, rel=1e-5)
    assert out.metrics["kl"].item() == pytest.approx(1 - LN2, rel=1e-5)
    assert out.metrics["clip_low"].item() == pytest.approx(1 / 3)
    assert out.metrics["clip_high"].item() == pytest.approx(1 / 3)
    assert out.metrics["clip_region"].item() == pytest.approx(2 / 3)
    torch.testing.assert_close(out.adv, torch.tensor([a, -a]))
    assert all(not m.requires_grad and m.dim() == 0 for m in out.metrics.values())


def test_full_kl_loss_is_policy_part_plus_beta_full_kl():
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(4, 3, 6, generator=g, requires_grad=True)
    ref_logits = torch.randn(4, 3, 6, generator=g)
    batch = Batch(logp=make_logp(), mask=MASK, group_size=4, rewards=REWARDS, logits=logits, ref_logits=ref_logits)
    out = make_grpo("beta=0.5", "objective.terms.kl.estimator=full")(batch)
    # on-policy: surrogate = A, so policy part = -mean_i A_i = 0 (advantages are centred per group)
    kl_seq_mean = ((kl_full(logits, ref_logits) * MASK).sum(-1) / LENGTHS).mean()
    torch.testing.assert_close(out.loss, 0.5 * kl_seq_mean)


def test_needs():
    assert make_grpo("beta=0.0").needs == Needs(rollouts=True)  # beta = 0: no reference model at all
    assert make_grpo("beta=0.0", "objective.terms.kl.estimator=full").needs == Needs(rollouts=True)
    assert make_grpo("beta=0.04").needs == Needs(rollouts=True, ref_logp=True)
    assert make_grpo("beta=0.04", "objective.terms.kl.estimator=full").needs == Needs(rollouts=True, ref_logits=True, logits=True)


def test_beta_zero_runs_without_reference():
    out = make_grpo("beta=0.0")(Batch(logp=make_logp(), mask=MASK, group_size=4, rewards=REWARDS))
    assert "kl" not in out.metrics


def test_missing_inputs_raise():
    with pytest.raises(ValueError, match="rewards"):
        make_grpo()(Batch(logp=make_logp(), mask=MASK, group_size=4))
    with pytest.raises(ValueError, match="ref_logp"):
        make_grpo("beta=0.04")(Batch(logp=make_logp(), mask=MASK, group_size=4, rewards=REWARDS))


@pytest.mark.parametrize(
    "overrides, key",
    [
        (["objective.terms.kl.estimator=k4"], "objective.terms.kl.estimator='k4' is not one of k1, k2, k3, full"),
        (["objective.ratio_level=seq"], "ratio_level"),
        (["objective.aggregation=mean"], "aggregation"),
        (["objective.adv_scale=std"], "adv_scale"),
        (["beta=-0.1"], "beta"),
        (["objective.epsilon_low=0.0"], "epsilon_low"),
        (["objective.epsilon_low=1.0"], "epsilon_low"),
        (["objective.epsilon_high=0.0"], "epsilon_high"),
        (["objective.adv_delta=0.0"], "adv_delta"),
        (["objective.max_tokens=0"], "max_tokens"),
    ],
)
def test_invalid_arguments_name_the_key(overrides, key):
    with pytest.raises(ValueError, match=key):  # grpokd.errors.ConfigError, as a run raises it at start-up
        make_grpo(*overrides)


def test_invalid_choice_lists_allowed_values():
    with pytest.raises(ValueError, match="seq_mean_token_mean, token_mean, seq_mean_token_sum_norm"):
        make_grpo("objective.aggregation=mean")
