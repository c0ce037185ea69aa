"""TRL's newer policy-loss options as options of the composition (grpo.yaml's keys, on every RL objective):
`objective.surrogate=cispo`, `objective.top_entropy_quantile`, `objective.off_policy_mask_threshold`,
`objective.reward_aggregation=normalize_then_sum`.

Hand-computed values and limiting cases always run; where TRL has the same computation as a function, equality
with TRL's own code on the same tensors runs when TRL is installed (`pip install -e ".[bench]"`).
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from conftest import objective

from grpokd.errors import ConfigError
from grpokd.objectives.base import Batch
from grpokd.objectives.functional import (
    cispo_surrogate,
    clipped_surrogate,
    group_advantages,
    high_entropy_mask,
    normalize_then_sum,
    off_policy_mask,
)

MASK = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0], [1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])


def batch(seed: int = 0, old_shift: float = 0.0, rewards=(1.0, 0.0, 0.0, 1.0)) -> tuple[Batch, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    logp = (-torch.rand(4, 3, generator=g) * 2).requires_grad_()
    old = (logp.detach() + old_shift * torch.randn(4, 3, generator=g))
    entropy = torch.rand(4, 3, generator=g) * 3
    return Batch(logp=logp, mask=MASK, group_size=2, rewards=torch.tensor(rewards), old_logp=old, entropy=entropy), logp


# --- CISPO --------------------------------------------------------------------------------------------------


def test_cispo_by_hand():
    logp = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    log_rho = torch.log(torch.tensor([[0.5, 3.0]]))
    surrogate, low, high = cispo_surrogate(logp, log_rho, torch.tensor([2.0]), 0.2, 0.2)
    # weights min(rho, 1.2) = 0.5, 1.2, detached: 0.5 * 2 * -1 and 1.2 * 2 * -2
    torch.testing.assert_close(surrogate, torch.tensor([[-1.0, -4.8]]))
    assert high.tolist() == [[False, True]] and not low.any()
    surrogate.sum().backward()
    torch.testing.assert_close(logp.grad, torch.tensor([[1.0, 2.4]]))  # every token keeps its gradient, clipped or not


def test_cispo_on_policy_has_the_clipped_surrogates_gradient():
    b, logp = batch()
    grads = []
    for name in ("clipped", "cispo"):
        obj = objective("grpo", f"objective.surrogate={name}")
        (grad,) = torch.autograd.grad(obj(Batch(**{**b.__dict__, "old_logp": None})).loss, logp, retain_graph=True)
        grads.append(grad)
    torch.testing.assert_close(grads[1], grads[0])


def test_cispo_keeps_the_gradient_the_clipped_surrogate_cuts():
    logp = torch.tensor([[-1.0]], requires_grad=True)
    log_rho = logp - (logp.detach() - math.log(2.0))  # rho = 2 > 1 + eps_high, A > 0: clipped
    (clipped_grad,) = torch.autograd.grad(clipped_surrogate(log_rho, torch.tensor([1.0]), 0.2, 0.2)[0].sum(), logp)
    (cispo_grad,) = torch.autograd.grad(cispo_surrogate(logp, log_rho, torch.tensor([1.0]), 0.2, 0.2)[0].sum(), logp)
    assert clipped_grad.item() == 0.0 and cispo_grad.item() == pytest.approx(1.2)


def test_cispo_equals_trls_loss_on_the_same_tensors():
    pytest.importorskip("trl")
    g = torch.Generator().manual_seed(3)
    logp, old = -torch.rand(4, 5, generator=g) * 3, -torch.rand(4, 5, generator=g) * 3
    adv = torch.randn(4, generator=g)
    eps_max = 5.0  # TRL's epsilon_high for cispo is the weight's bound itself: ours is eps_max - 1
    coef_1 = torch.exp(logp - old)  # TRL grpo_trainer.py, loss_type == "cispo"
    trl_loss = -torch.clamp(coef_1, max=eps_max).detach() * adv[:, None] * logp
    ours = -cispo_surrogate(logp, logp - old, adv, 0.2, eps_max - 1.0)[0]
    torch.testing.assert_close(ours, trl_loss)


# --- top_entropy_quantile -----------------------------------------------------------------------------------


def test_high_entropy_mask_by_hand():
    entropy = torch.tensor([[0.1, 0.5, 0.9], [0.3, 0.7, 5.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])  # 5.0 is padding: neither counted nor kept
    # real entropies 0.1 0.3 0.5 0.7 0.9: the 0.5 quantile is 0.5 -> keep 0.5, 0.7, 0.9
    assert high_entropy_mask(entropy, mask, 0.5).tolist() == [[False, True, True], [False, True, False]]
    # the 0.8 quantile (top 20%) is 0.1 + 0.8 * 4 * 0.2 = 0.74 -> keep 0.9 only
    assert high_entropy_mask(entropy, mask, 0.2).tolist() == [[False, False, True], [False, False, False]]
    assert high_entropy_mask(entropy, mask, 1.0).tolist() == mask.bool().tolist()
    assert not high_entropy_mask(entropy, torch.zeros_like(mask), 0.5).any()


def test_high_entropy_mask_equals_trls_on_the_same_tensors():
    trl = pytest.importorskip("trl.trainer.grpo_trainer")

    class OneProcess:  # TRL gathers the entropies over processes: one process gathers its own
        def pad_across_processes(self, t, dim=0, pad_index=0):
            return t

        def gather(self, t):
            return t

    class Host:
        accelerator = OneProcess()

    g = torch.Generator().manual_seed(1)
    entropy, mask = torch.rand(6, 9, generator=g) * 4, (torch.rand(6, 9, generator=g) > 0.3).float()
    for quantile in (0.2, 0.5, 0.8):
        theirs = trl.GRPOTrainer.get_high_entropy_mask(Host(), entropy, mask, 1 - quantile)
        assert torch.equal(high_entropy_mask(entropy, mask, quantile), theirs)


def test_top_entropy_quantile_masks_the_policy_loss_only():
    b, logp = batch()
    kept = high_entropy_mask(b.entropy, b.mask, 0.5)
    plain, masked = objective("grpo"), objective("grpo", "objective.top_entropy_quantile=0.5")
    assert masked.needs.entropy and not plain.needs.entropy
    per_plain, _ = plain.surrogate_loss(b, plain.advantages(b))
    per_masked, metrics = masked.surrogate_loss(b, masked.advantages(b))
    torch.testing.assert_close(per_masked, per_plain * kept)
    assert metrics["entropy_mask_kept"].item() == pytest.approx(kept.sum().item() / b.mask.sum().item())
    # the KL to the reference (a term) is not masked: with the surrogate's gradient off, the KL's remains everywhere
    with_kl = objective("grpo", "beta=0.1", "objective.top_entropy_quantile=0.5")
    ref = b.logp.detach() - 0.3
    out = with_kl(Batch(**{**b.__dict__, "ref_logp": ref}))
    (grad,) = torch.autograd.grad(out.loss, logp)
    assert (grad[b.mask.bool() & ~kept] != 0).all()


def test_top_entropy_quantile_one_is_the_plain_loss():
    b, _ = batch()
    torch.testing.assert_close(objective("grpo", "objective.top_entropy_quantile=1.0")(b).loss, objective("grpo")(b).loss)


# --- off_policy_mask_threshold ------------------------------------------------------------------------------


def test_off_policy_mask_by_hand():
    logp = torch.tensor([[-1.0, -1.0], [-1.0, -1.0], [-1.0, -1.0]])
    old = torch.tensor([[-0.5, -0.7], [-0.5, -0.7], [-0.9, -1.1]])  # mean KL estimates 0.4, 0.4, 0.0
    mask = torch.ones(3, 2)
    adv = torch.tensor([-1.0, 1.0, -1.0])
    # drop: negative advantage and mean KL 0.4 > 0.3; keep the positive one and the on-policy one
    assert off_policy_mask(adv, logp, old, mask, 0.3).tolist() == [[0.0], [1.0], [1.0]]
    assert off_policy_mask(adv, logp, old, mask, 0.4).tolist() == [[1.0], [1.0], [1.0]]  # <= threshold keeps


def test_off_policy_mask_equals_trls_on_the_same_tensors():
    trl = pytest.importorskip("trl.trainer.grpo_trainer")
    g = torch.Generator().manual_seed(2)
    logp, old = -torch.rand(8, 6, generator=g) * 2, -torch.rand(8, 6, generator=g) * 2
    mask, adv = (torch.rand(8, 6, generator=g) > 0.2).float(), torch.randn(8, generator=g)
    for threshold in (0.0, 0.1, 0.5):
        theirs = trl.GRPOTrainer.get_off_policy_mask(adv[:, None], logp, old, mask, threshold)
        torch.testing.assert_close(off_policy_mask(adv, logp, old, mask, threshold), theirs)


def test_off_policy_mask_keeps_everything_on_policy_and_drops_stale_negative_completions():
    on_policy, _ = batch(old_shift=0.0)
    plain, masked = objective("grpo"), objective("grpo", "objective.off_policy_mask_threshold=0.0")
    torch.testing.assert_close(masked(on_policy).loss, plain(on_policy).loss)
    stale, _ = batch(old_shift=1.0, seed=4)
    per, metrics = masked.surrogate_loss(stale, masked.advantages(stale))
    keep = off_policy_mask(masked.advantages(stale), stale.logp, stale.old_logp, stale.mask, 0.0)
    torch.testing.assert_close(per, plain.surrogate_loss(stale, plain.advantages(stale))[0] * keep)
    assert 0 < metrics["off_policy_masked"].item() < 1


# --- reward_aggregation=normalize_then_sum ------------------------------------------------------------------


def test_normalize_then_sum_by_hand():
    """Two rewards on two groups of two: a correctness reward and a 10x larger one. Summed first, the large one
    decides; normalised first, each counts alike."""
    parts = torch.tensor([[1.0, 0.0, 1.0, 1.0], [10.0, 0.0, 5.0, 5.0]])  # [F=2, N=4]
    weights = torch.tensor([1.0, 1.0])
    d = 1e-4
    s = 0.5 / (0.5 + d) + 5.0 / (5.0 + d)  # group 1: each reward normalised to +-1 (to delta), summed; group 2: constant, 0
    total = torch.tensor([s, -s, 0.0, 0.0])
    expected = total / (total.std(unbiased=False) + d)  # batch mean 0
    torch.testing.assert_close(normalize_then_sum(parts, weights, 2, d), expected)
    assert expected[0].item() == pytest.approx(math.sqrt(2), rel=1e-3)
    # a reward weighted 0 does not count; weighting one reward 3x scales its share of the sum
    torch.testing.assert_close(normalize_then_sum(parts, torch.tensor([1.0, 0.0]), 2, d), normalize_then_sum(parts[:1], weights[:1], 2, d))
    flip = torch.tensor([[1.0, 0.0], [0.0, 3.0]])  # the rewards disagree: summed first, the larger one decides
    assert group_advantages(flip.sum(0), 2)[1].item() == pytest.approx(1.0, abs=1e-3)
    assert normalize_then_sum(flip, torch.tensor([3.0, 1.0]), 2)[0].item() > 0  # normalised first, the weights decide
    assert normalize_then_sum(flip, torch.tensor([1.0, 3.0]), 2)[1].item() > 0


def test_normalize_then_sum_of_one_reward_is_its_group_advantage_at_unit_batch_std():
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 0.5, 0.0])
    group = group_advantages(rewards, 4)
    torch.testing.assert_close(normalize_then_sum(rewards[None], torch.ones(1), 4), (group - group.mean()) / (group.std(unbiased=False) + 1e-4))


def test_the_objective_uses_the_parts_when_asked():
    b, _ = batch()
    parts = torch.stack([b.rewards, torch.tensor([0.0, 4.0, 1.0, 1.0])])  # [2, 4]
    with_parts = Batch(**{**b.__dict__, "reward_parts": parts, "reward_weights": torch.tensor([1.0, 0.5])})
    obj = objective("grpo", "objective.reward_aggregation=normalize_then_sum")
    assert obj.needs.reward_parts and not objective("grpo").needs.reward_parts
    torch.testing.assert_close(obj.advantages(with_parts), normalize_then_sum(parts, torch.tensor([1.0, 0.5]), 2))
    with pytest.raises(ValueError, match="needs batch.reward_parts"):
        obj(b)


# --- configs ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "override,message",
    [
        ("objective.surrogate=ppo", "objective.surrogate='ppo' is not one of clipped, cispo"),
        ("objective.top_entropy_quantile=0", "objective.top_entropy_quantile=0 must be > 0"),
        ("objective.top_entropy_quantile=1.5", "objective.top_entropy_quantile=1.5 must be <= 1"),
        ("objective.off_policy_mask_threshold=-0.1", "objective.off_policy_mask_threshold=-0.1 must be >= 0"),
        ("objective.reward_aggregation=mean", "objective.reward_aggregation='mean' is not one of sum_then_normalize, normalize_then_sum"),
    ],
)
def test_bad_values_name_their_key(override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        objective("j3", override)



def test_cispo_with_sequence_ratios_stops_naming_both_keys():
    with pytest.raises(ConfigError, match="^objective.surrogate=cispo with objective.ratio_level=sequence: .*keep objective.ratio_level=token"):
        objective("grpo", "objective.surrogate=cispo", "objective.ratio_level=sequence")
    objective("grpo", "objective.ratio_level=sequence")  # GSPO with the clipped surrogate


def test_cispo_says_an_epsilon_low_it_does_not_use_is_unused():
    """CISPO bounds the weight from above only (TRL's too): the defaults (epsilon_low = epsilon_high = epsilon) pass
    silently; an epsilon_low that differs from epsilon_high is named in a warning, and the run goes on."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        objective("grpo", "objective.surrogate=cispo")
        objective("grpo", "objective.surrogate=cispo", "epsilon=0.3")
        objective("grpo", "objective.epsilon_low=0.1")  # the clipped surrogate uses it
    with pytest.warns(UserWarning, match=r"^objective.epsilon_low=0.1 is unused with objective.surrogate=cispo: .* 1 \+ objective.epsilon_high = 1.2;"):
        objective("grpo", "objective.surrogate=cispo", "objective.epsilon_low=0.1")
    with pytest.warns(UserWarning, match="objective.epsilon_low=0.2 is unused"):
        assert objective("grpo", "objective.surrogate=cispo", "objective.epsilon_high=4.0").epsilon_high == 4.0  # TRL's recommended 5

def test_the_options_train_end_to_end_and_log_what_they_masked(quick_cfg, tmp_path):
    """J''' with CISPO, the top 50% entropy tokens and the off-policy mask, two updates per rollout (so pi_old differs
    from the policy on the second): the run completes and logs the masks' shares every step."""
    import csv

    from grpokd.train import train

    cfg = quick_cfg(
        "objective=j3", "objective.surrogate=cispo", "objective.top_entropy_quantile=0.5", "objective.off_policy_mask_threshold=0.0",
        "updates_per_rollout=2", "optim.lr=1e-2", "eval_before=false", "log.csv=true", "model=tiny_causal",
    )
    assert train(cfg)["status"] == "complete"
    with open(tmp_path / "run" / "csv" / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("train/loss")]
    assert len(rows) == 4
    kept = [float(r["train/entropy_mask_kept"]) for r in rows]
    assert all(0.4 <= k <= 0.7 for k in kept), kept  # about half the tokens (ties at the threshold are kept)
    masked = [float(r["train/off_policy_masked"]) for r in rows]
    assert masked[0] == 0.0 and masked[2] == 0.0  # a rollout's first update is on-policy: nothing is stale


def test_normalize_then_sum_trains_on_two_weighted_rewards(quick_cfg, tmp_path):
    """The rollout carries each reward function's value and weight to the objective (and through the rollout buffer)."""
    from grpokd.train import train

    cfg = quick_cfg("objective=grpo", "objective.reward_aggregation=normalize_then_sum", "reward.weights.format=0.5",
                    "updates_per_rollout=2", "rollout.minibatches=2", "eval_before=false", "model=tiny_causal")
    assert train(cfg)["status"] == "complete"
