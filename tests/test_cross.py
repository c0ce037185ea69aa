"""A teacher with its own tokenizer (`grpokd.teachers.cross`): the same-tokenizer teacher forced through the
cross-tokenizer path gives the direct path's signal, and hand-built chunks share their log-probs as documented."""

from __future__ import annotations

from typing import NamedTuple

import pytest
import torch

from grpokd.models import loading
from grpokd.models.lm import Tokens, completion_logits, generate, tokenize_prompts
from grpokd.objectives.kd import sparse_divergences
from grpokd.teachers import TeacherEnsemble, Uniform
from grpokd.teachers.cross import CrossTokenizer, Layout, spread
from grpokd.teachers.sources import InProcess, Texts

QUESTIONS = ["what is 3 + 4 ?", "what is 12 - 5 ?", "tom has 6 apples and eats 2 . how many are left ?"]


@pytest.fixture(scope="module")
def rollout():
    """3 prompts x 4 sampled completions of the embedded causal student, and its logits on them."""
    torch.manual_seed(0)
    tokenizer = loading.load_tokenizer("tiny-llama-student")
    student = loading.load_model("tiny-llama-student")
    prompts = tokenize_prompts(tokenizer, QUESTIONS, 64)
    completions = generate(student, tokenizer, prompts, 4, 24, do_sample=True, temperature=1.0, top_k=0)
    with torch.no_grad():
        logits = completion_logits(student, prompts, completions, len(tokenizer))  # [12, T, V]
    return tokenizer, prompts, completions, logits


def forced(tokenizer, teacher) -> CrossTokenizer:
    """The teacher through the cross-tokenizer path although its tokenizer is the student's."""
    return CrossTokenizer(InProcess(teacher, "m"), tokenizer, tokenizer, lambda question, _: question, True, 64, [tokenizer.eos_token_id], "model.teachers[0]")


def test_a_same_tokenizer_teacher_through_the_cross_path_equals_the_direct_path(rollout):
    tokenizer, prompts, completions, student_logits = rollout
    teacher = loading.load_model("tiny-llama-teacher-m")
    texts = Texts(QUESTIONS, [""] * 3)
    assert (completions.mask.sum(-1) > 1).all() and (completions.mask == 0).any()  # completions of several lengths
    direct = TeacherEnsemble([InProcess(teacher, "m")], Uniform(), top_k=8)
    cross = TeacherEnsemble([forced(tokenizer, teacher)], Uniform(), top_k=8)
    a = direct.score(prompts, completions, student_logits, len(tokenizer), forward=True, logp=True)
    b = cross.score(prompts, completions, student_logits, len(tokenizer), forward=True, logp=True, texts=texts)
    mask = completions.mask.bool()
    assert torch.allclose(a.logp[:, mask], b.logp[:, mask], atol=1e-5)  # every chunk is one token: exact
    top_a, top_b = a.mixture.top_k, b.mixture.top_k
    # the cross path keeps tokens with a text (no <s>, <pad>, <unk>): where the direct list holds none, the lists are equal
    mapped = cross.teachers[0].vocabulary
    mask = mask & (mapped[top_a.index] >= 0).all(-1).all(-1)  # [N, T]
    assert mask.sum() > 0.8 * completions.mask.sum()
    assert torch.equal(top_a.index[mask], top_b.index[mask])
    assert torch.allclose(top_a.logp[mask], top_b.logp[mask], atol=1e-5) and torch.allclose(top_a.tail[mask], top_b.tail[mask], atol=1e-5)
    assert torch.equal(top_b.weight[mask], torch.ones_like(top_b.weight[mask]))  # a view at every position
    assert torch.allclose(a.metrics["kl_fwd"], b.metrics["kl_fwd"], rtol=0.05)  # the metric reads a top-64 list, the direct one all V

    def kd(top_k, logits):  # forward KD from the student's logits, and its gradient
        logits = logits.clone().requires_grad_(True)
        loss = (sparse_divergences(logits, top_k.index, top_k.logp, top_k.tail, top_k.weight, 1.0, False) * mask).sum()
        loss.backward()
        return loss, logits.grad

    (loss_a, grad_a), (loss_b, grad_b) = kd(top_a, student_logits), kd(top_b, student_logits)
    assert loss_a > 0 and torch.allclose(loss_a, loss_b, atol=1e-4) and torch.allclose(grad_a, grad_b, atol=1e-6)


def test_a_chunk_shares_its_teacher_log_prob_evenly_and_positions_inside_a_teacher_token_have_no_view():
    # one row, student tokens s0 s1 | s2 (chunks 0, 0, 1), teacher tokens u0 | u1 u2 (chunks 0, 1, 1), then padding
    layout = Layout(
        teacher=Tokens(torch.zeros(1, 4, dtype=torch.long), torch.tensor([[1, 1, 1, 0]])),
        student_chunk=torch.tensor([[0, 0, 1, -1]]), teacher_chunk=torch.tensor([[0, 1, 1, -1]]),
        members=torch.tensor([[2, 1]]), where=torch.tensor([[0, 0, 1, 0]]), defined=torch.tensor([[True, False, True, False]]),
    )
    shared = spread(torch.tensor([[-1.0, -0.5, -0.25, -7.0]]), layout)
    assert shared.tolist() == [[-0.5, -0.5, -0.75, 0.0]]  # chunk 0: -1 shared by two; chunk 1: -0.5 - 0.25; padding 0


def test_the_teachers_end_token_answers_for_the_students(rollout):
    tokenizer, _, completions, _ = rollout
    source = forced(tokenizer, loading.load_model("tiny-llama-teacher-m"))
    layout = source.layout(completions)
    ended = (completions.ids == tokenizer.eos_token_id) & completions.mask.bool()
    assert ended.any()
    assert torch.equal(layout.teacher.ids[layout.teacher.mask.bool()], completions.ids[completions.mask.bool()])  # the same tokens, ends included
    assert source.vocabulary[tokenizer.eos_token_id] == tokenizer.eos_token_id


def test_a_teacher_without_a_view_at_a_position_gets_no_weight_there_and_the_others_share_it():
    """TopKMixer with two teachers, the second defined at positions 0 and 2 only: uniform weights where both
    have a view, the first alone where only it has one; with no teacher defined, no weight (no KD there)."""
    from grpokd.teachers import TopKMixer
    from grpokd.teachers.sources import Dense

    class Partly(NamedTuple):  # a signal with a view at some positions only, as a teacher with its own tokenizer has
        dense: Dense
        where: torch.Tensor

        def top_k(self, k, tau, keep=None):
            return self.dense.top_k(k, tau)

        def defined(self):
            return self.where

    torch.manual_seed(0)
    a, b = Dense(torch.randn(1, 3, 10)), Dense(torch.randn(1, 3, 10))
    for given in ("weight", "log_weight"):
        mixer = TopKMixer(1.0, 4)
        for signal in (a, Partly(b, torch.tensor([[True, False, True]]))):
            mixer.add(signal, **{given: torch.full((1, 3), 0.5 if given == "weight" else 0.0)})
        assert mixer.result().top_k.weight.tolist() == [[[0.5, 0.5], [1.0, 0.0], [0.5, 0.5]]]
    mixer = TopKMixer(1.0, 4)
    mixer.add(Partly(b, torch.tensor([[True, False, False]])), weight=torch.ones(1, 3))
    top_k = mixer.result().top_k
    assert top_k.weight.tolist() == [[[1.0], [0.0], [0.0]]]
    kd = sparse_divergences(torch.randn(1, 3, 10), top_k.index, top_k.logp, top_k.tail, top_k.weight, 1.0, False)
    assert kd[0, 0] > 0 and kd[0, 1:].tolist() == [0.0, 0.0]


def test_an_empty_completion_has_no_teacher_tokens_and_zero_log_probs(rollout):
    """A completion masked out whole (`rollout.mask_truncated_completions`) reads as empty text."""
    tokenizer, prompts, completions, _ = rollout
    masked = Tokens(completions.ids, completions.mask.clone())
    masked.mask[0] = 0
    source = forced(tokenizer, loading.load_model("tiny-llama-teacher-m"))
    signal = source.signal(prompts, masked, len(tokenizer), Texts(QUESTIONS, [""] * 3))
    assert signal.layout.teacher.mask[0].sum() == 0 and not signal.layout.defined[0].any()
    logp = signal.token_logp(masked.ids, 1.0)
    assert logp[0].eq(0).all() and logp[1:][masked.mask[1:].bool()].lt(0).all()
