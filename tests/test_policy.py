"""Tensor-only tests of the composed objective (grpokd.objectives.policy and its terms).

The named objectives (conf/objective/*.yaml, built by conftest.objective) have their own tests
(test_grpo.py ... test_tgpo.py) that check each one's loss by hand; here: the composition rules, every
config's objective, and compositions those tests do not cover (on-policy distillation, an entropy bonus
added to any objective, terms that disagree on the teachers' scores).
"""

from __future__ import annotations

import pytest
import torch
from conftest import objective as make_objective
from conftest import objective_config

from grpokd.objectives.base import Batch, KDStates, Needs
from grpokd.objectives.functional import aggregate, entropy
from grpokd.objectives.policy import PolicyObjective, merge_needs
from grpokd.objectives.terms.entropy_bonus import EntropyBonus
from grpokd.objectives.terms.teacher_agreement import TeacherAgreement
from grpokd.objectives.terms.teacher_kl import TeacherKL
from grpokd.sweep import objectives
from grpokd.teachers import TeacherMixer

MASK = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0], [1.0, 0.0, 0.0], [1.0, 1.0, 1.0]])
REWARDS = torch.tensor([1.0, 0.0, 0.0, 1.0])
N, T, V, M = 4, 3, 6, 2
NULL = "objective.max_tokens=null"  # as the tests below were written: the seq_mean_token_sum_norm constant is T of the batch


def full_batch(seed: int = 0, tau: float = 2.0, old_shift: float = 0.0) -> tuple[Batch, torch.Tensor]:
    """Every input any term reads, from random student / reference / teacher logits. Returns (batch, student logits)."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(N, T, V, generator=g).requires_grad_()
    ref = torch.randn(N, T, V, generator=g)
    teachers = [torch.randn(N, T, V, generator=g) for _ in range(M)]
    ids = torch.randint(0, V, (N, T), generator=g)
    logp = torch.log_softmax(logits, -1).gather(-1, ids[..., None]).squeeze(-1)
    teacher_logp = torch.stack([torch.log_softmax(z, -1).gather(-1, ids[..., None]).squeeze(-1) for z in teachers])
    mixer = TeacherMixer(tau, forward=True, reverse=True)
    for z in teachers:
        mixer.add(z, weight=torch.full((N, T), 1.0 / M))
    batch = Batch(
        logp=logp, mask=MASK, group_size=2, rewards=REWARDS, old_logp=logp.detach() + old_shift, logits=logits,
        ref_logp=torch.log_softmax(ref, -1).gather(-1, ids[..., None]).squeeze(-1), ref_logits=ref,
        teacher_logp=teacher_logp, teacher_weights=torch.full((M, N, T), 1.0 / M), kd=mixer.kd_states(logits, MASK),
    )
    return batch, logits


def composed(name: str):
    return make_objective(name, "tau=2.0"), objective_config(name, "tau=2.0")


def test_every_config_objective_gives_a_finite_loss_and_gradient():
    for name in objectives():
        if name == "sft":
            continue
        objective, _ = composed(name)
        batch, logits = full_batch(tau=objective.needs.kd_tau)
        out = objective(batch)
        (grad,) = torch.autograd.grad(out.loss, logits)
        assert torch.isfinite(out.loss) and torch.isfinite(grad).all(), name


def test_needs_are_the_union_of_the_active_terms():
    objective = make_objective(
        "j3", "gamma=0.1", "lam=0.0", "tau=1.0", "beta=0.04", "objective.terms.kl.estimator=k3", NULL, terms={"ent": EntropyBonus(0.01)}
    )
    assert objective.needs == Needs(rollouts=True, ref_logp=True, logits=True, teacher_logp=True)
    assert make_objective("grpo", "beta=0.0", NULL, terms={"ent": EntropyBonus(0.0)}).needs == Needs(rollouts=True)  # zero weight: nothing


def test_terms_that_disagree_on_the_teacher_scores_fail_at_construction():
    with pytest.raises(ValueError, match="'ta' and 'rkl' disagree on teacher_logp_at_sampling_temperature"):
        make_objective("j3", "gamma=0.1", "lam=0.1", "tau=1.0", NULL, terms={"rkl": TeacherKL(0.1)})
    ok = make_objective("j3", "gamma=0.1", "lam=0.1", "tau=1.0", NULL, terms={"ta": TeacherAgreement(0.1, at_sampling_temperature=True), "rkl": TeacherKL(0.1)})
    assert ok.needs.teacher_logp_at_sampling_temperature
    from grpokd.objectives.terms.forward_kd import ForwardKD

    with pytest.raises(ValueError, match="kd_tau"):
        merge_needs(Needs(), {"a": ForwardKD(0.1, tau=1.0).needs, "b": ForwardKD(0.1, tau=2.0).needs})


def test_an_entropy_bonus_on_j1_subtracts_its_weighted_aggregate():
    batch, logits = full_batch()
    plain = make_objective("j1", "lam=0.1", "tau=2.0", NULL)(batch).loss
    bonus = make_objective("j1", "lam=0.1", "tau=2.0", NULL, "+term@objective.terms.ent=entropy_bonus", "objective.terms.ent.weight=0.05")(batch)
    expected = plain - 0.05 * aggregate(entropy(logits.detach()), MASK, "seq_mean_token_mean")
    torch.testing.assert_close(bonus.loss, expected)
    assert "entropy_bonus" in bonus.metrics


def test_on_policy_distillation_by_hand():
    """Reward-free OPD with k1: A_t = -(logp_t - log pi_T(o_t)); on-policy the loss value is the aggregate of d_t."""
    batch, _ = full_batch()
    batch = Batch(logp=batch.logp, mask=MASK, group_size=2, rewards=REWARDS, teacher_logp=batch.teacher_logp[:1])
    opd = PolicyObjective(terms={"teacher_kl": TeacherKL(1.0, estimator="k1")}, reward_weight=0.0)
    out = opd(batch)
    d = (batch.logp - batch.teacher_logp[0]).detach()  # one teacher: the mixture is that teacher
    torch.testing.assert_close(out.loss, aggregate(d, MASK, "seq_mean_token_mean"))
    (grad,) = torch.autograd.grad(out.loss, batch.logp)
    torch.testing.assert_close(grad, d * MASK / MASK.sum(-1, keepdim=True) / N)  # d_t * grad logp_t, per-sequence mean
    assert torch.equal(out.adv, torch.zeros(N))  # no reward part


def test_on_policy_distillation_from_a_copy_of_the_student_is_zero():
    batch, _ = full_batch()
    copy = Batch(logp=batch.logp, mask=MASK, group_size=2, rewards=REWARDS, teacher_logp=batch.logp.detach()[None])
    for estimator in ("k1", "k2"):
        out = PolicyObjective(terms={"teacher_kl": TeacherKL(1.0, estimator=estimator)}, reward_weight=0.0)(copy)
        (grad,) = torch.autograd.grad(out.loss, batch.logp, retain_graph=True)
        assert torch.allclose(grad, torch.zeros_like(grad), atol=1e-7)


def test_opd_with_the_reward_adds_the_group_advantage():
    batch, _ = full_batch()
    base = PolicyObjective(terms={"teacher_kl": TeacherKL(1.0, estimator="k1")}, reward_weight=0.0)(batch)
    both = PolicyObjective(terms={"teacher_kl": TeacherKL(1.0, estimator="k1")}, reward_weight=1.0)(batch)
    grpo = make_objective("grpo", "beta=0.0", NULL)(batch)
    torch.testing.assert_close(both.loss, base.loss + grpo.loss)  # on-policy the surrogate is linear in A


def test_a_non_term_is_rejected_with_its_name():
    with pytest.raises(ValueError, match="'bad'"):
        PolicyObjective(terms={"bad": object()})


def test_kd_states_value_on_gold_is_reduced_over_its_own_mask():
    """A gold-state term is aggregated over the gold mask, not added to the rollout's per-token loss."""
    batch, _ = full_batch()
    gold_mask = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    g = torch.Generator().manual_seed(1)
    student = torch.randn(2, 2, V, generator=g).requires_grad_()
    mixer = TeacherMixer(1.0, forward=True)
    mixer.add(torch.randn(2, 2, V, generator=g), weight=torch.ones(2, 2))
    kd = mixer.kd_states(student, gold_mask)
    b = Batch(logp=batch.logp, mask=MASK, group_size=2, rewards=REWARDS, kd=kd)
    from grpokd.objectives.kd import forward_kd

    out = make_objective("j1", "lam=0.5", "tau=1.0", "beta=0.0", "objective.terms.kd.states=gold", NULL)(b)
    expected = make_objective("grpo", "beta=0.0", NULL)(b).loss + 0.5 * aggregate(forward_kd(kd), gold_mask, "seq_mean_token_mean")
    torch.testing.assert_close(out.loss, expected)
    assert isinstance(kd, KDStates)


def test_two_updates_by_hand_clip_what_left_the_trust_region():
    """Update 1 is on-policy (rho = 1: nothing clipped); after one SGD step, update 2 scores rho = pi / pi_old
    and the clip flags are exactly the tokens whose ratio left [1 - eps, 1 + eps] on the side of their advantage."""
    g = torch.Generator().manual_seed(3)
    z = torch.randn(N, T, V, generator=g).requires_grad_()
    ids = torch.randint(0, V, (N, T), generator=g)
    objective = make_objective("grpo", "beta=0.0", "objective.epsilon_low=0.2", "objective.epsilon_high=0.2", NULL)

    def logp() -> torch.Tensor:
        return torch.log_softmax(z, -1).gather(-1, ids[..., None]).squeeze(-1)

    old = logp().detach()
    first = objective(Batch(logp=logp(), mask=MASK, group_size=2, rewards=REWARDS, old_logp=old))
    assert float(first.metrics["clip_region"]) == 0.0
    (grad,) = torch.autograd.grad(first.loss, z)
    with torch.no_grad():
        z -= 30.0 * grad  # one large step, so that some ratios leave the region
    second = objective(Batch(logp=logp(), mask=MASK, group_size=2, rewards=REWARDS, old_logp=old))
    rho = (logp().detach() - old).exp()  # [N, T]
    adv = first.adv[:, None]  # [N, 1]
    low, high = (rho < 0.8) & (adv < 0), (rho > 1.2) & (adv > 0)
    region = ((low | high).float() * MASK).sum() / MASK.sum()
    assert float(region) > 0
    torch.testing.assert_close(second.metrics["clip_region"], region)
    torch.testing.assert_close(second.metrics["clip_low"], (low.float() * MASK).sum() / MASK.sum())
    # the clipped tokens get no gradient: perturbing only their log-probs leaves the loss unchanged
    clipped = (low | high) & (MASK > 0)
    bumped = logp().detach() + 0.01 * clipped.float()
    same = objective(Batch(logp=bumped, mask=MASK, group_size=2, rewards=REWARDS, old_logp=old)).loss
    torch.testing.assert_close(same, second.loss.detach())


def test_dr_grpo_normaliser_is_the_configured_constant_not_the_batch_width():
    """seq_mean_token_sum_norm divides by max_tokens: padding the batch wider changes nothing."""
    batch, _ = full_batch()
    wide = Batch(
        logp=torch.cat([batch.logp, torch.zeros(N, 5)], 1), mask=torch.cat([MASK, torch.zeros(N, 5)], 1), group_size=2, rewards=REWARDS
    )
    narrow = Batch(logp=batch.logp, mask=MASK, group_size=2, rewards=REWARDS)
    dr_grpo = ("beta=0.0", "objective.aggregation=seq_mean_token_sum_norm", "objective.adv_scale=none")
    dr = make_objective("grpo", *dr_grpo, "objective.max_tokens=48")
    torch.testing.assert_close(dr(wide).loss, dr(narrow).loss)
    by_width = make_objective("grpo", *dr_grpo, "objective.max_tokens=null")  # the tensor API's fallback: T
    assert not torch.allclose(by_width(wide).loss, by_width(narrow).loss)
    for name in objectives():
        if name != "sft":
            objective, cfg = composed(name)
            assert objective.max_tokens == cfg.rollout.sampling.max_new_tokens == 48, name
