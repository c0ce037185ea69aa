"""TeacherEnsemble on the embedded T5 teachers: its metrics, chunking and mixtures against direct computations."""

from __future__ import annotations

import pytest
import torch

from grpokd.models import loading
from grpokd.models.lm import completion_logits, generate, token_logp, tokenize_prompts
from grpokd.objectives.functional import hinton_kd, masked_mean
from grpokd.teachers import Confidence, Static, TeacherEnsemble, Uniform
from grpokd.teachers.sources import in_process

pytestmark = pytest.mark.slow

NAMES = ["tiny-t5-teacher-s", "tiny-t5-teacher-m"]


@pytest.fixture(scope="module")
def scored():
    """Sampled completions of 3 prompts x 4, the student's logits on them, and each teacher's logits."""
    torch.manual_seed(0)
    tokenizer = loading.load_tokenizer("tiny-t5-student")
    student = loading.load_model("tiny-t5-student")
    prompts = tokenize_prompts(tokenizer, ["what is 3 + 4 ?", "what is 12 - 5 ?", "tom has 6 apples and eats 2 . how many are left ?"], 64)
    completions = generate(student, tokenizer, prompts, 4, 24, do_sample=True, temperature=1.0, top_k=0)
    with torch.no_grad():
        student_logits = completion_logits(student, prompts, completions, len(tokenizer))  # [12, T, V]
        teacher_logits = [completion_logits(loading.load_model(n), prompts, completions, len(tokenizer)) for n in NAMES]
    return tokenizer, prompts, completions, student_logits, teacher_logits


def test_per_teacher_metrics_are_the_kls_to_the_student(scored):
    tokenizer, prompts, completions, student_logits, teacher_logits = scored
    ensemble = TeacherEnsemble(in_process([loading.load_model(n) for n in NAMES], NAMES), Uniform())
    scores = ensemble.score(prompts, completions, student_logits, len(tokenizer), logp=True)
    mask = completions.mask.float()
    for i, z in enumerate(teacher_logits):
        assert torch.allclose(scores.metrics["kl_fwd"][i], masked_mean(hinton_kd(z, student_logits, 1.0), mask), atol=1e-5)
        assert torch.allclose(scores.metrics["kl_rev"][i], masked_mean(hinton_kd(student_logits, z, 1.0), mask), atol=1e-5)
        assert torch.allclose(scores.logp[i], token_logp(z, completions.ids), atol=1e-5)
    assert torch.allclose(scores.metrics["weight"], torch.tensor([0.5, 0.5]))
    assert scores.metrics["kl_fwd"].min() > 0.01  # the teachers differ from the student, so the check above has teeth


@pytest.mark.parametrize("top_k", [None, 4])
def test_chunked_scoring_equals_one_pass(scored, top_k):
    """chunk_prompts bounds memory without changing any output (confidence weights: per position), with the
    full mixtures or with each teacher's top-k signals."""
    tokenizer, prompts, completions, student_logits, _ = scored
    teachers = [loading.load_model(n) for n in NAMES]
    whole = TeacherEnsemble(in_process(teachers, NAMES), Confidence(), top_k=top_k).score(
        prompts, completions, student_logits, len(tokenizer), tau=2.0, forward=True, reverse=True, logp=True)
    chunked = TeacherEnsemble(in_process(teachers, NAMES), Confidence(), chunk_prompts=2, top_k=top_k).score(
        prompts, completions, student_logits, len(tokenizer), tau=2.0, forward=True, reverse=True, logp=True)
    mixtures = [t for t in (*whole.mixture[:3], *(whole.mixture.top_k or ())) if t is not None]
    chunked_mixtures = [t for t in (*chunked.mixture[:3], *(chunked.mixture.top_k or ())) if t is not None]
    assert len(mixtures) == (4 if top_k else 3)
    for a, b in zip([whole.weights, whole.logp, *mixtures], [chunked.weights, chunked.logp, *chunked_mixtures]):
        assert torch.equal(a, b) if a.dtype == torch.long else torch.allclose(a, b, atol=1e-5)
    for key in whole.metrics:
        assert torch.allclose(whole.metrics[key], chunked.metrics[key], atol=1e-5), key


@pytest.mark.parametrize("weighting", ["confidence", "static"])
def test_mixture_equals_the_naive_weighted_sum(scored, weighting):
    """Confidence weights (per position, online softmax) and static ones (mixed directly) against a naive sum."""
    tokenizer, prompts, completions, student_logits, teacher_logits = scored
    scheme = Confidence(temperature=0.5) if weighting == "confidence" else Static([1.0, 3.0])
    ensemble = TeacherEnsemble(in_process([loading.load_model(n) for n in NAMES], NAMES), scheme)
    scores = ensemble.score(prompts, completions, student_logits, len(tokenizer), tau=2.0, forward=True, reverse=True)
    log_p = torch.stack([z.log_softmax(-1) for z in teacher_logits])  # [M, N, T, V]
    if weighting == "confidence":
        weights = ((log_p.exp() * log_p).sum(-1) / 0.5).softmax(0)  # [M, N, T] softmax of -H / temperature
    else:
        weights = torch.tensor([0.25, 0.75])[:, None, None].expand(log_p.shape[:-1])
    tempered = torch.stack([(z / 2.0).log_softmax(-1) for z in teacher_logits])  # [M, N, T, V]
    assert torch.allclose(scores.weights, weights, atol=1e-5)
    assert torch.allclose(scores.mixture.pbar, (weights[..., None] * tempered.exp()).sum(0), atol=1e-5)
    assert torch.allclose(scores.mixture.lbar, (weights[..., None] * tempered).sum(0), atol=1e-4)
    assert not torch.allclose(weights[0], weights[1])  # unequal weights, so the check has teeth


@pytest.mark.parametrize("temperature", [0.5, 1.0])
def test_kdrl_kd_is_zero_when_the_teacher_is_the_student(temperature):
    """Teachers are scored at the sampling temperature for KDRL, so a copy of the student gives exactly GRPO."""
    from conftest import objective

    from grpokd import rollout as ro
    from grpokd.data.datamodule import collate
    from grpokd.data.rewards import NumericReward
    from grpokd.data.sources import arith
    from grpokd.scoring import FrozenModels, ScoreRequest, score

    torch.manual_seed(0)
    tokenizer = loading.load_tokenizer("tiny-t5-student")
    student = loading.load_model("tiny-t5-student")
    ensemble = TeacherEnsemble(in_process([loading.load_model("tiny-t5-student")], ["copy"]), Uniform())
    sampling = ro.Sampling(group_size=4, max_new_tokens=24, temperature=temperature)
    rollout = ro.sample(student, tokenizer, collate(arith(test_size=4).test), sampling, NumericReward())
    kdrl = objective("kdrl", "beta_kd=1.0", "beta=0.0", "objective.max_tokens=null")
    batch, _, _ = score(student, ScoreRequest(rollout, kdrl.needs, temperature=temperature), FrozenModels(None, ensemble), len(tokenizer))
    out = kdrl(batch)
    assert abs(float(out.metrics["kd_reverse_kl"])) < 1e-5
    assert torch.allclose(out.loss, objective("grpo", "beta=0.0", "objective.max_tokens=null")(batch).loss, atol=1e-6)
