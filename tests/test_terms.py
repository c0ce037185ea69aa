"""Tensor-only tests of objectives/terms.py: hand-computed values and limiting cases."""

import math

import pytest
import torch

from grpokd.objectives.base import Batch
from grpokd.objectives.functional import (
    aggregate,
    clipped_surrogate,
    entropy,
    group_advantages,
    hinton_kd,
    kl_full,
    kl_sampled,
    kl_to_reference,
    log_ratio,
    masked_mean,
)

DELTA = 1e-4
LN2 = math.log(2.0)


# ---------------------------------------------------------------- advantages

REWARDS = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0])  # two groups of K=4


def test_group_advantages_by_hand():
    # group 1: mean .5, population std .5 -> (R - .5) / (.5 + delta) = +-.5 / (.5 + delta)
    # group 2: constant -> R - mean = 0 -> zeros (delta keeps it from being 0/0)
    a = 0.5 / (0.5 + DELTA)
    expected = torch.tensor([a, -a, -a, a, 0.0, 0.0, 0.0, 0.0])
    torch.testing.assert_close(group_advantages(REWARDS, 4, "group", DELTA), expected)


def test_batch_scale_by_hand():
    # mean stays per group; std is over all 8 rewards: mean .75, var .75 * .25 = .1875
    a = 0.5 / (math.sqrt(0.1875) + DELTA)
    expected = torch.tensor([a, -a, -a, a, 0.0, 0.0, 0.0, 0.0])
    torch.testing.assert_close(group_advantages(REWARDS, 4, "batch", DELTA), expected)


def test_none_scale_is_centred_rewards():
    expected = torch.tensor([0.5, -0.5, -0.5, 0.5, 0.0, 0.0, 0.0, 0.0])
    torch.testing.assert_close(group_advantages(REWARDS, 4, "none"), expected)


def test_integer_rewards_are_accepted():
    torch.testing.assert_close(
        group_advantages(torch.tensor([2, 0]), 2, "none"), torch.tensor([1.0, -1.0])
    )


def test_advantage_validation():
    with pytest.raises(ValueError, match="group_size"):
        group_advantages(REWARDS, 3)
    with pytest.raises(ValueError, match="group, batch, none"):
        group_advantages(REWARDS, 4, scale="std")


# ---------------------------------------------------------------- aggregation

# two sequences of lengths 4 and 1; the padded values (99) must not count
PER_TOKEN = torch.tensor([[1.0, 2.0, 3.0, 4.0], [10.0, 99.0, 99.0, 99.0]])
MASK = torch.tensor([[1.0, 1.0, 1.0, 1.0], [1.0, 0.0, 0.0, 0.0]])


def test_masked_mean():
    assert masked_mean(PER_TOKEN, MASK).item() == pytest.approx(20 / 5)
    torch.testing.assert_close(masked_mean(PER_TOKEN, MASK, dim=-1), torch.tensor([2.5, 10.0]))
    assert masked_mean(PER_TOKEN, torch.zeros_like(MASK)).item() == 0.0  # empty mask: 0, not NaN


def test_aggregation_modes_by_hand_differ():
    # GRPO: sequence means 10/4 = 2.5 and 10/1 = 10, then their mean 6.25
    assert aggregate(PER_TOKEN, MASK, "seq_mean_token_mean").item() == pytest.approx(6.25)
    # DAPO: all 5 tokens weigh the same: (1+2+3+4+10) / 5 = 4
    assert aggregate(PER_TOKEN, MASK, "token_mean").item() == pytest.approx(4.0)
    # Dr. GRPO: token sums 10 and 10, divided by the constant T=4, mean over 2 sequences = 2.5
    assert aggregate(PER_TOKEN, MASK, "seq_mean_token_sum_norm").item() == pytest.approx(2.5)
    # ... or by a given max_tokens=8: (10/8 + 10/8) / 2
    assert aggregate(PER_TOKEN, MASK, "seq_mean_token_sum_norm", max_tokens=8).item() == pytest.approx(1.25)


def test_aggregation_guards_empty_sequences():
    # a third, empty sequence contributes 0 and counts in N for the sequence means
    per_token = torch.cat([PER_TOKEN, torch.full((1, 4), 7.0)])
    mask = torch.cat([MASK, torch.zeros(1, 4)])
    assert aggregate(per_token, mask, "seq_mean_token_mean").item() == pytest.approx((2.5 + 10) / 3)
    assert aggregate(per_token, mask, "token_mean").item() == pytest.approx(4.0)
    assert aggregate(per_token, mask, "seq_mean_token_sum_norm").item() == pytest.approx(20 / 4 / 3)
    for mode in ("seq_mean_token_mean", "token_mean", "seq_mean_token_sum_norm"):
        assert aggregate(PER_TOKEN, torch.zeros_like(MASK), mode).item() == 0.0


def test_aggregation_unknown_mode():
    with pytest.raises(ValueError, match="aggregation='sum'.*token_mean"):
        aggregate(PER_TOKEN, MASK, "sum")


# ---------------------------------------------------------------- ratio and surrogate


def test_log_ratio_token_and_sequence():
    old = torch.zeros(2, 3)
    logp = torch.tensor([[0.1, 0.2, 0.3], [0.4, 5.0, 5.0]], requires_grad=True)
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    token = log_ratio(logp, old, mask, "token")
    torch.testing.assert_close(token, torch.tensor([[0.1, 0.2, 0.3], [0.4, 0.0, 0.0]]))  # padding -> 0
    seq = log_ratio(logp, old, mask, "sequence")
    # row 0: mean(.1, .2, .3) = .2 on every real token; row 1: .4 on its one token
    torch.testing.assert_close(seq, torch.tensor([[0.2, 0.2, 0.2], [0.4, 0.0, 0.0]]))
    # GSPO: d exp(log s_i) / d logp_{i,t} = s_i / |o_i| on real tokens, 0 on padding
    torch.exp(seq[:, 0]).sum().backward()
    s0, s1 = math.exp(0.2), math.exp(0.4)
    expected = torch.tensor([[s0 / 3, s0 / 3, s0 / 3], [s1, 0.0, 0.0]])
    torch.testing.assert_close(logp.grad, expected)
    with pytest.raises(ValueError, match="token, sequence"):
        log_ratio(logp, old, mask, "seq")


def test_clipped_surrogate_by_hand():
    # clip range [1 - .2, 1 + .3] = [.8, 1.3]; ratios 1.5, .5, 1.1 for A = +2 and A = -2
    rho = torch.tensor([[1.5, 0.5, 1.1], [1.5, 0.5, 1.1]])
    log_rho = rho.log().requires_grad_(True)
    adv = torch.tensor([2.0, -2.0])
    surrogate, low, high = clipped_surrogate(log_rho, adv, 0.2, 0.3)
    expected = torch.tensor(
        [
            # A>0: min(3, 1.3*2)=2.6 (high-clipped); min(1, .8*2)=1 (unclipped branch wins); 2.2
            [2.6, 1.0, 2.2],
            # A<0: min(-3, -2.6)=-3 (unclipped wins); min(-1, -.8*2)=-1.6 (low-clipped); -2.2
            [-3.0, -1.6, -2.2],
        ]
    )
    torch.testing.assert_close(surrogate, expected)
    assert high.tolist() == [[True, False, False], [False, False, False]]
    assert low.tolist() == [[False, False, False], [False, True, False]]
    # clipped tokens get no gradient; the others get d(rho A)/d log rho = rho A
    surrogate.sum().backward()
    torch.testing.assert_close(log_rho.grad, torch.tensor([[0.0, 1.0, 2.2], [-3.0, 0.0, -2.2]]))


# ---------------------------------------------------------------- KL estimators


def test_kl_sampled_by_hand():
    # pi_theta(token) = .25, pi_ref(token) = .5: r = 2, log r = ln 2
    logp = torch.full((1, 2), math.log(0.25))
    ref_logp = torch.full((1, 2), math.log(0.5))
    torch.testing.assert_close(kl_sampled(logp, ref_logp, "k1"), torch.full((1, 2), -LN2))
    torch.testing.assert_close(kl_sampled(logp, ref_logp, "k2"), torch.full((1, 2), 0.5 * LN2**2))
    torch.testing.assert_close(kl_sampled(logp, ref_logp, "k3"), torch.full((1, 2), 2 - LN2 - 1))
    with pytest.raises(ValueError, match="k1, k2, k3"):
        kl_sampled(logp, ref_logp, "full")


def test_k3_and_k2_are_nonnegative_and_zero_at_equality():
    g = torch.Generator().manual_seed(0)
    logp, ref_logp = torch.randn(64, 16, generator=g) * 3, torch.randn(64, 16, generator=g) * 3
    assert (kl_sampled(logp, ref_logp, "k3") >= 0).all()
    assert (kl_sampled(logp, ref_logp, "k2") >= 0).all()
    for estimator in ("k1", "k2", "k3"):
        assert kl_sampled(logp, logp, estimator).abs().max().item() == 0.0


def test_kl_full_by_hand():
    # q = (.5, .5), p_ref = (.8, .2): KL = .5 ln(.5/.8) + .5 ln(.5/.2) = .5 ln(1.5625) = ln 1.25
    logits = torch.zeros(1, 1, 2)
    ref_logits = torch.tensor([[[math.log(0.8), math.log(0.2)]]])
    torch.testing.assert_close(kl_full(logits, ref_logits), torch.tensor([[math.log(1.25)]]))


def test_kl_full_matches_direct_sum_and_is_zero_for_equal_logits():
    g = torch.Generator().manual_seed(1)
    logits, ref_logits = torch.randn(2, 3, 7, generator=g), torch.randn(2, 3, 7, generator=g)
    q, p = logits.softmax(-1), ref_logits.softmax(-1)
    torch.testing.assert_close(kl_full(logits, ref_logits), (q * (q / p).log()).sum(-1))
    torch.testing.assert_close(kl_full(logits, logits), torch.zeros(2, 3))
    assert kl_full(logits.bfloat16(), ref_logits.bfloat16()).dtype == torch.float32


def test_sampled_estimators_approximate_full_kl_on_policy():
    # tokens sampled from pi_theta: E[k1] = E[k3] = KL(theta || ref) (both unbiased)
    g = torch.Generator().manual_seed(2)
    logits, ref_logits = torch.randn(5, generator=g), torch.randn(5, generator=g)
    log_q, log_p = logits.log_softmax(-1), ref_logits.log_softmax(-1)
    tokens = torch.multinomial(log_q.exp(), 200_000, replacement=True, generator=g)  # [S]
    logp, ref_logp = log_q[tokens][:, None], log_p[tokens][:, None]  # [S, 1]
    exact = kl_full(logits[None, None], ref_logits[None, None]).item()
    assert kl_sampled(logp, ref_logp, "k1").mean().item() == pytest.approx(exact, abs=0.02)
    assert kl_sampled(logp, ref_logp, "k3").mean().item() == pytest.approx(exact, abs=0.02)


# ---------------------------------------------------------------- Hinton KD and entropy


@pytest.mark.parametrize("tau", [1.0, 2.0, 0.5])
def test_hinton_kd_matches_direct_computation(tau):
    g = torch.Generator().manual_seed(3)
    z_p, z_q = torch.randn(2, 3, 6, generator=g), torch.randn(2, 3, 6, generator=g)
    p, q = (z_p / tau).softmax(-1), (z_q / tau).softmax(-1)
    direct = tau**2 * (p * (p.log() - q.log())).sum(-1)
    torch.testing.assert_close(hinton_kd(z_p, z_q, tau), direct)
    torch.testing.assert_close(hinton_kd(z_p, z_p, tau), torch.zeros(2, 3))


def test_hinton_kd_tau_scaling_by_hand():
    # z_P = (0, 0), z_Q = (2 ln 2, 0), tau = 2: P = (.5, .5), Q = softmax(ln 2, 0) = (2/3, 1/3)
    # KL = .5 ln(.5 / (2/3)) + .5 ln(.5 / (1/3)) = .5 ln(.75 * 1.5) = .5 ln 1.125; times tau^2 = 4
    z_p = torch.zeros(1, 1, 2)
    z_q = torch.tensor([[[2 * LN2, 0.0]]])
    torch.testing.assert_close(hinton_kd(z_p, z_q, 2.0), torch.tensor([[2 * math.log(1.125)]]))
    # tau = 1 is the plain KL
    torch.testing.assert_close(hinton_kd(z_p, z_q, 1.0), kl_full(z_p, z_q))


def test_entropy():
    # uniform over 4 -> ln 4; a near one-hot distribution -> ~0
    logits = torch.stack([torch.zeros(4), torch.tensor([50.0, 0.0, 0.0, 0.0])])[None]  # [1, 2, 4]
    torch.testing.assert_close(entropy(logits), torch.tensor([[math.log(4.0), 0.0]]), atol=1e-6, rtol=0)


# ---------------------------------------------------------------- dispatch


def test_kl_to_reference_dispatch():
    g = torch.Generator().manual_seed(4)
    logits, ref_logits = torch.randn(2, 3, 5, generator=g), torch.randn(2, 3, 5, generator=g)
    logp, ref_logp = torch.randn(2, 3, generator=g), torch.randn(2, 3, generator=g)
    batch = Batch(logp=logp, mask=torch.ones(2, 3), ref_logp=ref_logp, logits=logits, ref_logits=ref_logits)
    for estimator in ("k1", "k2", "k3"):
        torch.testing.assert_close(kl_to_reference(batch, estimator), kl_sampled(logp, ref_logp, estimator))
    torch.testing.assert_close(kl_to_reference(batch, "full"), kl_full(logits, ref_logits))
    with pytest.raises(ValueError, match="kl_estimator='k4'.*k1, k2, k3, full"):
        kl_to_reference(batch, "k4")


def test_kl_to_reference_missing_inputs():
    batch = Batch(logp=torch.zeros(1, 2), mask=torch.ones(1, 2))
    with pytest.raises(ValueError, match="ref_logp"):
        kl_to_reference(batch, "k3")
    with pytest.raises(ValueError, match="ref_logits"):
        kl_to_reference(batch, "full")
