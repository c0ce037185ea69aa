"""Sparse teacher signals (`model.teacher_top_k`): each teacher's top-k log-probs plus one tail bucket.

With k = V every KD term equals the full-vocabulary computation (values and gradients); hand-computed small
cases for the tail bucket; the ensemble, the TGPO guide and a training run with k < V.
"""

from __future__ import annotations

import math

import pytest
import torch

from grpokd.errors import ConfigError
from grpokd.objectives.base import Batch, KDStates, TopK, Unmatched
from grpokd.objectives.kd import forward_kd, reverse_kd, sparse_mixture
from grpokd.objectives.logits import ChunkedLogits
from grpokd.objectives.terms.teacher_guide import TeacherGuide
from grpokd.teachers import TeacherMixer, TopKMixer
from grpokd.teachers.sources import in_process

N, T, V, M = 3, 4, 7, 2


def teachers_and_student(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    teachers = [torch.randn(N, T, V, generator=g) * 2 for _ in range(M)]
    student = torch.randn(N, T, V, generator=g).requires_grad_()
    log_weights = torch.randn(M, N, T, generator=g)  # unnormalised, per position (as confidence weighting gives)
    return teachers, student, log_weights


def mixed(mixer, teachers, log_weights):
    for z, s in zip(teachers, log_weights):
        mixer.add(z, log_weight=s)
    return mixer.result()


@pytest.mark.parametrize("divergence", [forward_kd, reverse_kd])
@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_top_k_equal_to_the_vocabulary_is_the_full_computation_values_and_gradients(divergence, tau):
    teachers, student, log_weights = teachers_and_student()
    full = mixed(TeacherMixer(tau, forward=True, reverse=True), teachers, log_weights)
    sparse = mixed(TopKMixer(tau, V), teachers, log_weights)
    mask = torch.ones(N, T)
    expected = divergence(KDStates(student, mask, tau, *full))
    (grad_expected,) = torch.autograd.grad(expected.sum(), student)
    value = divergence(KDStates(student, mask, tau, *sparse))
    (grad,) = torch.autograd.grad(value.sum(), student)
    torch.testing.assert_close(value, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, grad_expected, rtol=1e-5, atol=1e-6)


def one_teacher(p: list[float], k: int) -> TopK:
    """One position, one teacher with probabilities p, its top k kept."""
    logits = torch.tensor(p).log().view(1, 1, -1)
    mixer = TopKMixer(1.0, k)
    mixer.add(logits, weight=1.0)
    return mixer.result().top_k


def test_the_tail_bucket_by_hand():
    # teacher p = (0.5, 0.3, 0.2), k = 1 keeps token 0 and a tail of 0.5; student q = (0.2, 0.2, 0.6): q(tail) = 0.8
    top_k = one_teacher([0.5, 0.3, 0.2], 1)
    assert top_k.index.flatten().tolist() == [0]
    assert top_k.tail.exp().item() == pytest.approx(0.5)
    student = torch.tensor([0.2, 0.2, 0.6]).log().view(1, 1, 3)
    kd = KDStates(student, torch.ones(1, 1), 1.0, top_k=top_k)
    forward = 0.5 * math.log(0.5 / 0.2) + 0.5 * math.log(0.5 / 0.8)
    reverse = 0.2 * math.log(0.2 / 0.5) + 0.8 * math.log(0.8 / 0.5)
    assert forward_kd(kd).item() == pytest.approx(forward, rel=1e-5)
    assert reverse_kd(kd).item() == pytest.approx(reverse, rel=1e-5)
    # k = 2: token 1 joins (0.3), the tail is token 2 alone; the student's tail is q(2) = 0.6
    kd2 = KDStates(student, torch.ones(1, 1), 1.0, top_k=one_teacher([0.5, 0.3, 0.2], 2))
    assert forward_kd(kd2).item() == pytest.approx(0.5 * math.log(0.5 / 0.2) + 0.3 * math.log(0.3 / 0.2) + 0.2 * math.log(0.2 / 0.6), rel=1e-5)


@pytest.mark.parametrize("divergence", [forward_kd, reverse_kd])
def test_an_absent_entry_adds_nothing_and_has_no_gradient(divergence):
    """A list of k = 2 holding one token (a served list with one token the student shares: `sources.Sparse.top_k`)
    is filled with that token again at log p = -inf: the same value and gradient as the k = 1 list, both ways."""
    top_1 = one_teacher([0.5, 0.3, 0.2], 1)
    filled = TopK(top_1.index.repeat(1, 1, 1, 2), torch.cat([top_1.logp, torch.full_like(top_1.logp, -math.inf)], -1), top_1.tail, top_1.weight)
    student = torch.tensor([0.2, 0.2, 0.6]).log().view(1, 1, 3).requires_grad_()
    values, grads = [], []
    for top_k in (top_1, filled):
        value = divergence(KDStates(student, torch.ones(1, 1), 1.0, top_k=top_k))
        values.append(value)
        grads.append(torch.autograd.grad(value.sum(), student)[0])
    assert torch.isfinite(values[1]).all() and torch.isfinite(grads[1]).all()
    torch.testing.assert_close(values[1], values[0])
    torch.testing.assert_close(grads[1], grads[0])


def test_two_teachers_are_weighted_each_on_its_own_top_k():
    # teacher A p = (0.7, 0.2, 0.1) keeps {0}; teacher B p = (0.1, 0.6, 0.3) keeps {1}; weights 0.25 / 0.75
    mixer = TopKMixer(1.0, 1)
    for p, w in (([0.7, 0.2, 0.1], 0.25), ([0.1, 0.6, 0.3], 0.75)):
        mixer.add(torch.tensor(p).log().view(1, 1, 3), weight=w)
    student = torch.tensor([0.2, 0.5, 0.3]).log().view(1, 1, 3)
    value = forward_kd(KDStates(student, torch.ones(1, 1), 1.0, *mixer.result()))
    a = 0.7 * math.log(0.7 / 0.2) + 0.3 * math.log(0.3 / 0.8)
    b = 0.6 * math.log(0.6 / 0.5) + 0.4 * math.log(0.4 / 0.5)
    assert value.item() == pytest.approx(0.25 * a + 0.75 * b, rel=1e-5)


def hybrid(share: float, unmatched_p: list[float]) -> TopK:
    """One position, one teacher: its matched list p(0) = 0.5, p(1) = 0.3 and tail 0.2; its unmatched tokens'
    probabilities `unmatched_p` (descending); the student's tokens 2 and 3 have no counterpart in its vocabulary."""
    unmatched = Unmatched(torch.tensor(unmatched_p).log().view(1, 1, 1, -1), torch.tensor([[False, False, True, True]]), torch.tensor([share]))
    logp = torch.tensor([0.5, 0.3]).log().view(1, 1, 1, 2)
    return TopK(torch.tensor([0, 1]).view(1, 1, 1, 2), logp, torch.tensor(0.2).log().view(1, 1, 1), torch.ones(1, 1, 1), unmatched)


@pytest.mark.parametrize("divergence,reverse", [(forward_kd, False), (reverse_kd, True)])
def test_golds_hybrid_by_hand(divergence, reverse):
    """(1 - share) * KL on the matched list and its tail + share * ULD's sorted L1 on the unmatched tokens: the
    student's q = (0.4, 0.3, 0.2, 0.1) has (0.2, 0.1) there, sorted; the teacher (0.15, 0.05) and nothing more."""
    student = torch.tensor([0.4, 0.3, 0.2, 0.1]).log().view(1, 1, 4)
    p, q = [0.5, 0.3, 0.2], [0.4, 0.3, 0.3]  # the k + 1 outcomes: tokens 0, 1 and the tail
    kl = sum(a * math.log(a / b) for a, b in (zip(q, p) if reverse else zip(p, q)))
    uld = abs(0.2 - 0.15) + abs(0.1 - 0.05) + abs(0.0 - 0.0)
    value = divergence(KDStates(student, torch.ones(1, 1), 1.0, top_k=hybrid(0.25, [0.15, 0.05, 0.0])))
    assert value.item() == pytest.approx(0.75 * kl + 0.25 * uld, rel=1e-5)


def test_golds_hybrid_with_share_zero_is_the_plain_sparse_kd_and_its_distance_is_zero_where_the_sorted_lists_agree():
    teachers, student, log_weights = teachers_and_student(2)
    mixed_k = mixed(TopKMixer(1.0, 3), teachers, log_weights).top_k
    empty = Unmatched(torch.full((N, T, M, 3), -math.inf), torch.zeros(M, V, dtype=torch.bool), torch.zeros(M))
    values, grads = [], []
    for top_k in (mixed_k, mixed_k._replace(unmatched=empty)):
        value = forward_kd(KDStates(student, torch.ones(N, T), 1.0, top_k=top_k))
        values.append(value)
        grads.append(torch.autograd.grad(value.sum(), student)[0])
    torch.testing.assert_close(values[1], values[0])
    torch.testing.assert_close(grads[1], grads[0])
    # the distance alone (share 1): the student's unmatched probabilities as the teacher's list, in another order
    q = torch.tensor([0.4, 0.3, 0.2, 0.1])
    top_k = hybrid(1.0, [0.2, 0.1])._replace(logp=torch.full((1, 1, 1, 2), -math.inf))  # no matched entries, tail 0.2
    top_k = top_k._replace(tail=torch.tensor(0.7).log().view(1, 1, 1))  # KL part weighted 0
    value = forward_kd(KDStates(q.log().view(1, 1, 4), torch.ones(1, 1), 1.0, top_k=top_k))
    assert value.item() == pytest.approx(0.0, abs=1e-6)
    moved = forward_kd(KDStates(q.flip(0).log().view(1, 1, 4), torch.ones(1, 1), 1.0, top_k=top_k))  # (0.1, 0.2, 0.3, 0.4): 0.4 and 0.3 there
    assert moved.item() == pytest.approx(abs(0.4 - 0.2) + abs(0.3 - 0.1), rel=1e-5)


def test_the_tail_is_exact_when_the_top_k_hold_nearly_all_the_mass():
    # log(1 - sum) would round to log(0) in float32 here; the tail is the log-sum-exp of the tokens left out
    top_k = one_teacher([1 - 2e-9, 1e-9, 1e-9], 1)
    assert top_k.tail.item() == pytest.approx(math.log(2e-9), rel=1e-4)
    student = torch.tensor([0.5, 0.25, 0.25]).log().view(1, 1, 3)
    assert torch.isfinite(forward_kd(KDStates(student, torch.ones(1, 1), 1.0, top_k=top_k))).all()


def test_kd_is_zero_when_the_student_is_the_teacher_at_any_k():
    teachers, _, _ = teachers_and_student()
    for k in (1, 3, V):
        mixer = TopKMixer(2.0, k)
        mixer.add(teachers[0], weight=1.0)
        kd = KDStates(teachers[0], torch.ones(N, T), 2.0, *mixer.result())
        assert forward_kd(kd).abs().max() < 1e-5 and reverse_kd(kd).abs().max() < 1e-5


@pytest.mark.parametrize("with_hybrid", [False, True])
def test_chunked_student_logits_give_the_same_sparse_kd(with_hybrid):
    teachers, student, log_weights = teachers_and_student(1)
    sparse = mixed(TopKMixer(1.0, 3), teachers, log_weights)
    if with_hybrid:  # GOLD's hybrid: each teacher's 2 unmatched tokens, the student's tokens 5 and 6 without counterpart
        unmatched = torch.rand(N, T, M, 2).sort(-1, descending=True).values * 0.1
        student_side = torch.zeros(M, V, dtype=torch.bool)
        student_side[:, 5:] = True
        sparse = sparse._replace(top_k=sparse.top_k._replace(unmatched=Unmatched(unmatched.log(), student_side, torch.tensor([0.3, 0.6]))))
    hidden = torch.randn(N, T, 5, requires_grad=True)
    head = torch.randn(V, 5)
    whole = forward_kd(KDStates(hidden @ head.T, torch.ones(N, T), 1.0, *sparse))
    chunked = forward_kd(KDStates(ChunkedLogits(hidden, head, None, None, chunk=5), torch.ones(N, T), 1.0, *sparse))
    torch.testing.assert_close(chunked, whole)
    (g_whole,) = torch.autograd.grad(whole.sum(), hidden)
    (g_chunked,) = torch.autograd.grad(chunked.sum(), hidden)
    torch.testing.assert_close(g_chunked, g_whole)


def test_sparse_mixture_sums_a_token_kept_by_several_teachers_once():
    index = torch.tensor([[[[2, 0], [0, 1]]]])  # [1, 1, M=2, k=2]: token 0 is in both top-2 sets
    probs = torch.tensor([[[[0.6, 0.3], [0.5, 0.4]]]])
    top_k = TopK(index, probs.log(), torch.zeros(1, 1, 2), torch.tensor([[[0.5, 0.5]]]))
    tokens, pbar = sparse_mixture(top_k)
    by_token = {}
    for token, p in zip(tokens.flatten().tolist(), pbar.flatten().tolist()):
        by_token[token] = by_token.get(token, 0.0) + p
    assert by_token == pytest.approx({0: 0.5 * 0.3 + 0.5 * 0.5, 1: 0.5 * 0.4, 2: 0.5 * 0.6})
    assert (pbar > 0).sum() == 3  # the duplicate entry of token 0 holds 0


@pytest.mark.parametrize("target", ["argmax", "topk"])
def test_the_tgpo_guide_with_top_k_equal_to_the_vocabulary_is_the_full_guide(target):
    teachers, student, log_weights = teachers_and_student(2)
    mask = torch.ones(N, T)
    guide = TeacherGuide(weight=1.0, target=target, target_k=3)
    out = {}
    for name, mixer in (("full", TeacherMixer(1.0)), ("sparse", TopKMixer(1.0, V))):
        batch = Batch(logp=torch.zeros(N, T), mask=mask, kd=KDStates(student, mask, 1.0, *mixed(mixer, teachers, log_weights)))
        value = guide(batch).value
        out[name] = (value, torch.autograd.grad(value.sum(), student)[0])
    torch.testing.assert_close(out["sparse"][0], out["full"][0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out["sparse"][1], out["full"][1], rtol=1e-5, atol=1e-6)


def test_the_guide_target_comes_from_the_union_of_the_teachers_top_k():
    # teacher A's top-1 is token 3 (0.4), B's is token 5 (0.45); at equal weights the mixture's choice is token 5
    def logits(p):
        return torch.tensor(p).log().view(1, 1, -1)

    mixer = TopKMixer(1.0, 1)
    mixer.add(logits([0.1, 0.1, 0.1, 0.4, 0.1, 0.1, 0.1]), weight=0.5)
    mixer.add(logits([0.05, 0.1, 0.1, 0.1, 0.1, 0.45, 0.1]), weight=0.5)
    student = torch.zeros(1, 1, 7, requires_grad=True)
    batch = Batch(logp=torch.zeros(1, 1), mask=torch.ones(1, 1), kd=KDStates(student, torch.ones(1, 1), 1.0, *mixer.result()))
    value = TeacherGuide(weight=1.0, target="argmax")(batch).value
    (grad,) = torch.autograd.grad(value.sum(), student)
    assert value.item() == pytest.approx(math.log(7))  # -log q(5) for a uniform student
    assert grad[0, 0].argmin().item() == 5  # the step raises token 5


def test_top_k_is_checked():
    with pytest.raises(ConfigError, match="model.teacher_top_k=0 must be >= 1"):
        TopKMixer(1.0, 0)
    with pytest.raises(ConfigError, match="model.teacher_top_k=8 is larger than the vocabulary"):
        TopKMixer(1.0, V + 1).add(torch.zeros(1, 1, V), weight=1.0)


def test_the_ensemble_keeps_top_k_mass_and_the_scored_tokens_exact_log_probs(causal_models):
    from grpokd.models.lm import completion_logits
    from grpokd.teachers import Confidence, TeacherEnsemble

    student, teachers, tokenizer, prompts, completions = causal_models
    vocab = len(tokenizer)
    with torch.no_grad():
        logits = completion_logits(student, prompts, completions, vocab)  # [N, T, V]
    scores = {}
    for k in (None, vocab, 4):
        ensemble = TeacherEnsemble(in_process(teachers, ["a", "b"]), Confidence(), top_k=k)
        scores[k] = ensemble.score(prompts, completions, logits.detach(), vocab, tau=2.0, forward=True, logp=True)
    mask = completions.mask.float()
    full = forward_kd(KDStates(logits, mask, 2.0, *scores[None].mixture))
    same = forward_kd(KDStates(logits, mask, 2.0, *scores[vocab].mixture))
    torch.testing.assert_close(same, full, rtol=1e-4, atol=1e-5)
    assert scores[vocab].metrics["mass"].tolist() == pytest.approx([1.0, 1.0], abs=1e-5)
    assert all(0 < m < 1 for m in scores[4].metrics["mass"].tolist())
    torch.testing.assert_close(scores[4].logp, scores[None].logp)  # J''' and OPD/KDRL read these: exact at any k


@pytest.fixture
def causal_models():
    from grpokd.models import loading
    from grpokd.models.lm import tokenize_prompts, tokenize_targets

    tokenizer = loading.load_tokenizer("tiny-llama-student", "model.student")
    student = loading.load_model("tiny-llama-student", "model.student")
    teachers = [loading.load_model(name, "model.teachers") for name in ("tiny-llama-teacher-s", "tiny-llama-teacher-m")]
    prompts = tokenize_prompts(tokenizer, ["Tom has 3 apples and buys 4 more. How many?", "What is 6 times 7?"], 64)
    completions = tokenize_targets(tokenizer, ["3 + 4 = 7\n#### 7", "6 * 7 = 42\n#### 42", "#### 8", "6 * 7 = 41\n#### 41"], 16)
    return student, teachers, tokenizer, prompts, completions


def test_a_run_with_top_k_teachers_logs_the_kept_mass_and_a_too_large_k_stops_at_start_up(quick_cfg, tmp_path):
    from test_train import read_metrics, train_column

    from grpokd.train import train

    run = tmp_path / "topk"
    results = train(quick_cfg("objective=j1", "model.teacher_top_k=4", "log.csv=true", "eval_before=false", "trainer.max_steps=2", run_dir=run))
    assert results["status"] == "complete"
    mass = train_column(read_metrics(run), "train/teacher_mass")
    assert len(mass) == 2 and all(0 < m < 1 for m in mass)
    with pytest.raises(ConfigError, match=r"model.teacher_top_k=100000 is larger than the vocabulary of model.student \(\d+\)"):
        train(quick_cfg("objective=j1", "model.teacher_top_k=100000", run_dir=tmp_path / "big"))


def test_the_kl_metrics_of_a_listed_teacher_at_k_equal_v_are_the_full_ones_whole_and_chunked():
    """`listed_kl_both_ways` (a served or cross-tokenizer teacher's per-teacher KL metrics, both ways in one pass):
    with the whole vocabulary listed (empty tail) it is the full KL each way; at k < V the tail keeps both
    non-negative and below the full ones (a coarser partition); chunked logits give the same values."""
    from grpokd.teachers.sources import Sparse, kl_both_ways, listed_kl_both_ways, tail_mass

    g = torch.Generator().manual_seed(3)
    teacher, hidden, weight = torch.randn(N, T, V, generator=g) * 2, torch.randn(N, T, 5, generator=g), torch.randn(V, 5, generator=g)
    student = torch.nn.functional.linear(hidden, weight)
    full = kl_both_ways(student, teacher)
    logp, index = teacher.log_softmax(-1).sort(-1, descending=True)
    listed = listed_kl_both_ways(student, index, logp, tail_mass(logp))
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(listed, full))
    assert full[0].min() > 0.05 and full[1].min() > 0.05  # the two differ everywhere, so the check has teeth
    k = 2
    coarse = Sparse(index[..., :k], logp[..., :k], logp[..., 0]).kl_both_ways(student)
    assert all(((c >= -1e-6) & (c <= f + 1e-5)).all() for c, f in zip(coarse, full))
    chunked = Sparse(index[..., :k], logp[..., :k], logp[..., 0]).kl_both_ways(ChunkedLogits(hidden, weight, None, None, 5))
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(chunked, coarse))
