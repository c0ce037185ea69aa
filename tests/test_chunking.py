"""Chunked logits (`model.logit_chunk`): every term that reads the student's full distribution gets the unchunked
values and gradients, and no [N, T, V] tensor is saved for backward."""

from __future__ import annotations

import pytest
import torch
from conftest import objective as make_objective

from grpokd import rollout as ro
from grpokd.errors import ConfigError
from grpokd.models import loading
from grpokd.models.lm import completion_logits, generate, token_logp, tokenize_prompts
from grpokd.objectives.base import KDStates
from grpokd.objectives.functional import entropy
from grpokd.objectives.kd import forward_kd
from grpokd.objectives.logits import ChunkedLogits, per_position
from grpokd.scoring import FrozenModels, ScoreRequest, logits_for, logp_and_entropy, score

STUDENTS = ["tiny-llama-student", "tiny-t5-student"]
PROMPTS = ["Tom has 5 apples . He buys 3 more . How many apples does Tom have now ?", "Ann has 9 pens . She eats 2 . How many pens does Ann have now ?"]


def unchunked(hidden, weight, bias, ids, vocab, temperature):
    logits = torch.nn.functional.linear(hidden, weight, bias)[..., :vocab] / temperature  # [N, T, V]
    return token_logp(logits, ids), entropy(logits.float())


@pytest.mark.parametrize("chunk", [1, 4, 7, 15, 64], ids=lambda c: f"chunk{c}")
def test_chunked_logp_equals_the_unchunked_values_and_gradients(chunk):
    gen = torch.Generator().manual_seed(0)
    n, t, h, v = 3, 5, 8, 20
    hidden = torch.randn(n, t, h, generator=gen, requires_grad=True)
    weight = torch.randn(v + 3, h, generator=gen, requires_grad=True)  # 3 padded embedding rows, sliced off
    bias = torch.randn(v + 3, generator=gen, requires_grad=True)
    ids = torch.randint(0, v, (n, t), generator=gen)
    upstream = torch.randn(n, t, generator=gen)  # an arbitrary loss's gradient per token
    chunked = lambda *a: per_position(ChunkedLogits(*a[:3], a[4], chunk) / a[5], logp_and_entropy, a[3])  # noqa: E731
    grads = []
    for scorer in (unchunked, chunked):
        logp, ent = scorer(hidden, weight, bias, ids, v, 0.7)
        (logp * upstream).sum().backward()
        grads.append([x.grad.clone() for x in (hidden, weight, bias)])
        for x in (hidden, weight, bias):
            x.grad = None
        if scorer is unchunked:
            expected = (logp.detach(), ent)
    torch.testing.assert_close(logp, expected[0])
    torch.testing.assert_close(ent, expected[1])
    assert not ent.requires_grad
    for got, want in zip(grads[1], grads[0]):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("chunk", [1, 4, 64], ids=lambda c: f"chunk{c}")
def test_chunked_forward_kd_equals_the_unchunked_values_and_gradients(chunk):
    """The teacher mixture pbar stays whole (no grad); the student's side is computed chunk by chunk."""
    gen = torch.Generator().manual_seed(1)
    n, t, h, v, tau = 3, 5, 8, 20, 2.0
    hidden = torch.randn(n, t, h, generator=gen, requires_grad=True)
    weight = torch.randn(v, h, generator=gen, requires_grad=True)
    pbar = torch.randn(n, t, v, generator=gen).softmax(-1)
    neg_entropy = (pbar * pbar.log()).sum(-1)
    mask = torch.ones(n, t)
    values, grads = [], []
    for logits in (torch.nn.functional.linear(hidden, weight), ChunkedLogits(hidden, weight, None, None, chunk)):
        value = forward_kd(KDStates(logits, mask, tau, pbar, neg_entropy))  # [N, T]
        values.append(value.detach())
        grads.append(torch.autograd.grad(value.sum(), (hidden, weight)))
    torch.testing.assert_close(values[1], values[0])
    for got, want in zip(grads[1], grads[0]):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_chunked_logp_of_a_one_hot_head_is_exact():
    """Hand-computed: hidden = e_j and weight = identity give logits e_j; log softmax at j is 1 - log(e + V - 1)."""
    v = 4
    hidden = torch.eye(v).unsqueeze(0)  # [1, 4, 4]: position j holds e_j
    ids = torch.tensor([[0, 1, 2, 3]])
    logp, ent = per_position(ChunkedLogits(hidden, torch.eye(v), None, None, 3), logp_and_entropy, ids)
    expected = 1 - torch.log(torch.tensor(torch.e + v - 1))
    torch.testing.assert_close(logp, expected.expand(1, v))
    p = torch.tensor([torch.e, 1, 1, 1]) / (torch.e + v - 1)
    torch.testing.assert_close(ent, (-(p * p.log()).sum()).expand(1, v))


@pytest.mark.parametrize("name", STUDENTS)
def test_chunked_logits_equal_completion_logits_on_the_tiny_models(name):
    tokenizer, model = loading.load_tokenizer(name), loading.load_model(name)
    torch.manual_seed(0)
    prompts = tokenize_prompts(tokenizer, PROMPTS, 64)
    completions = generate(model, tokenizer, prompts, 3, 12)
    vocab = len(tokenizer)
    grads = []
    for chunk in (None, 5):
        model.zero_grad()
        logits = logits_for(model, prompts, completions, vocab, chunk) / 0.7
        assert isinstance(logits, ChunkedLogits) == (chunk is not None)
        logp, ent = per_position(logits, logp_and_entropy, completions.ids)
        (logp * completions.mask).sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        if chunk is None:
            expected = (logp.detach(), ent)
    torch.testing.assert_close(logp, expected[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ent, expected[1], rtol=1e-5, atol=1e-5)
    assert grads[0].keys() == grads[1].keys()
    for key in grads[0]:  # float32 sums in another order: measured up to 1.6e-5 on 1 of 32768 entries (gradients ~1e-2)
        torch.testing.assert_close(grads[1][key], grads[0][key], rtol=1e-4, atol=3e-5)
    assert "forward" not in vars(model.get_output_embeddings())  # the head is itself again
    assert completion_logits(model, prompts, completions).shape[-1] == model.get_output_embeddings().out_features


def saved_new_numel(score, inputs=()) -> int:
    """Elements of the storages autograd saves for backward while `score` runs, those of `inputs` left out."""
    given = {x.untyped_storage().data_ptr() for x in inputs}
    storages = {}

    def keep(x):
        if x.untyped_storage().data_ptr() not in given:
            storages[x.untyped_storage().data_ptr()] = x.untyped_storage().nbytes() // x.element_size()
        return x

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda x: x):
        score()
    return sum(storages.values())


def test_no_full_vocabulary_tensor_is_saved_for_backward():
    """A randomly initialised Llama whose vocabulary dwarfs its width (as real ones do): the unchunked log-probs and
    forward KD save [N, T, V] for backward; chunked, only the weights and the hidden states are (counted once per
    storage; the teachers' mixture, an input without grad, left out)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    vocab, width, n, t = 5000, 8, 8, 16
    config = LlamaConfig(vocab_size=vocab, hidden_size=width, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2)
    model = LlamaForCausalLM(config)
    prompts = ro.Tokens(torch.randint(0, vocab, (2, 6)), torch.ones(2, 6, dtype=torch.long))
    completions = ro.Tokens(torch.randint(0, vocab, (n, t)), torch.ones(n, t, dtype=torch.long))  # 2 prompts x 4
    pbar = torch.randn(n, t, vocab).softmax(-1)
    mixture = (pbar, (pbar * pbar.log()).sum(-1))
    for chunk, bound in ((None, lambda saved: saved >= n * t * vocab), (8, lambda saved: saved < n * t * vocab / 2)):
        logp = saved_new_numel(lambda: per_position(logits_for(model, prompts, completions, None, chunk), token_logp, completions.ids))
        kd = saved_new_numel(lambda: forward_kd(KDStates(logits_for(model, prompts, completions, None, chunk), completions.mask.float(), 1.0, *mixture)), mixture)
        assert bound(logp) and bound(kd), (chunk, logp, kd)  # chunked: a lost checkpoint would add N T V


def test_score_with_chunks_gives_grpos_batch_and_gradients():
    """`rollout.score` for GRPO (k3 KL to a reference): the same log-probs, reference log-probs, loss and gradients."""
    name = "tiny-llama-student"
    tokenizer, student = loading.load_tokenizer(name), loading.load_model(name)
    reference = loading.load_model(name).requires_grad_(False)
    with torch.no_grad():  # a reference that differs from the student, so that the KL term is not zero
        for p in reference.parameters():
            p.add_(0.01 * torch.randn_like(p))
    torch.manual_seed(0)
    examples = {"prompt": PROMPTS, "answer": ["8", "7"]}
    rollout = ro.sample(student, tokenizer, examples, ro.Sampling(group_size=4, max_new_tokens=16), lambda c, a: float(sum(map(ord, c)) % 2))  # any reward that varies
    objective = make_objective("grpo", "beta=0.1", "objective.max_tokens=null")
    results = []
    for chunk in (None, 6):
        student.zero_grad()
        batch, metrics, _ = score(student, ScoreRequest(rollout, objective.needs, temperature=0.7), FrozenModels(reference), len(tokenizer), chunk)
        loss = objective(batch).loss
        loss.backward()
        grads = {n: p.grad.clone() for n, p in student.named_parameters()}
        results.append((batch.logp.detach(), batch.ref_logp, metrics["entropy"], loss.detach(), grads))
    (logp0, ref0, ent0, loss0, g0), (logp1, ref1, ent1, loss1, g1) = results
    assert float(rollout.rewards.std()) > 0
    torch.testing.assert_close(logp1, logp0, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ref1, ref0, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ent1, ent0, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loss1, loss0, rtol=1e-5, atol=1e-6)
    for key in g0:
        torch.testing.assert_close(g1[key], g0[key], rtol=1e-4, atol=1e-6)


def test_score_times_the_frozen_models_once_per_rollout():
    """`train/frozen_time_s`: the reference's scoring takes time on a fresh request, none on one that reuses its scores."""
    name = "tiny-llama-student"
    tokenizer, student = loading.load_tokenizer(name), loading.load_model(name)
    frozen = FrozenModels(loading.load_model(name).requires_grad_(False))
    torch.manual_seed(0)
    rollout = ro.sample(student, tokenizer, {"prompt": PROMPTS, "answer": ["8", "7"]}, ro.Sampling(group_size=2, max_new_tokens=8), lambda c, a: 0.0)
    needs = make_objective("grpo", "beta=0.1").needs
    _, fresh, scores = score(student, ScoreRequest(rollout, needs), frozen, len(tokenizer))
    _, reused, _ = score(student, ScoreRequest(rollout, needs, frozen_scores=scores), frozen, len(tokenizer))
    assert float(fresh["frozen_time_s"]) > 0 and float(reused["frozen_time_s"]) == 0.0


OBJECTIVES = {  # every term that reads the student's full distribution, and the teachers' per-teacher KL metrics
    "j1": ["objective=j1"],
    "j1-gold-confidence": ["objective=j1", "objective.terms.kd.states=gold", "weighting=confidence"],
    "j2": ["objective=j2"],
    "j3": ["objective=j3"],
    "kdrl": ["objective=kdrl"],
    "tgpo": ["objective=tgpo"],
    "tgpo-topk": ["objective=tgpo", "objective.terms.guide.target=topk", "objective.terms.guide.target_k=5"],
    "opd": ["objective=opd"],
    "grpo-full-kl-entropy": ["objective=grpo", "objective.terms.kl.estimator=full", "+term@objective.terms.entropy=entropy_bonus"],
}


@pytest.mark.parametrize("name", OBJECTIVES)
def test_every_objective_gets_the_unchunked_loss_metrics_and_gradients(name, quick_cfg, tmp_path):
    """`scoring.score` and the objective on one rollout, whole and with 6-position chunks: the same loss, metrics
    (per-teacher KL included) and student gradients."""
    from grpokd.train import build_module, prepare

    results = []
    for chunk in ("null", "6"):
        cfg = quick_cfg(*OBJECTIVES[name], "model=tiny_causal", f"model.logit_chunk={chunk}", "beta=0.1")
        prep = prepare(cfg)
        module = build_module(cfg, prep, tmp_path / f"chunk-{chunk}")
        examples = prep.data.train_set[:2]
        batch = {"prompt": [e.prompt for e in examples], "answer": [e.answer for e in examples], "solution": [e.solution for e in examples]}
        torch.manual_seed(0)
        rollout = module.new_rollout(batch)
        needs = module.objective.needs
        scored, metrics, _ = score(module.student, ScoreRequest(rollout.rollout, needs, 0, module.temperature(needs), rollout.gold), module.frozen,
                                   module.vocab_size, module.logit_chunk)
        out = module.objective(scored)
        out.loss.backward()
        grads = {n: p.grad.clone() for n, p in module.student.named_parameters() if p.grad is not None}
        results.append((out.loss.detach(), {k: v.detach() for k, v in (metrics | out.metrics).items()}, grads))
    (loss0, metrics0, grads0), (loss1, metrics1, grads1) = results
    assert loss0 != 0 and grads0
    torch.testing.assert_close(loss1, loss0, rtol=1e-4, atol=1e-6)
    assert metrics1.keys() == metrics0.keys()
    for key in [k for k in metrics0 if not k.endswith("_time_s")]:  # seconds differ from run to run
        torch.testing.assert_close(metrics1[key], metrics0[key], rtol=1e-4, atol=1e-6, msg=key)
    assert grads1.keys() == grads0.keys()
    for key in grads0:
        torch.testing.assert_close(grads1[key], grads0[key], rtol=1e-3, atol=1e-5, msg=key)


def test_a_chunked_run_logs_the_same_losses_and_a_bad_chunk_is_refused(quick_cfg, tmp_path):
    from test_train import read_metrics, train_column

    from grpokd.train import prepare, train

    logged = []
    for chunk in ("null", "16"):
        run = tmp_path / f"chunk-{chunk}"
        results = train(quick_cfg("objective=j1", "model=tiny_causal", f"model.logit_chunk={chunk}", "log.csv=true", "eval_before=false", run_dir=run))
        assert results["status"] == "complete"
        rows = read_metrics(run)
        logged.append([train_column(rows, key) for key in ("train/loss", "train/kd", "train/teacher/kl_fwd/tiny-llama-teacher-s")])
    assert all(len(column) == 4 for column in logged[0])
    for whole, chunked in zip(*logged):
        assert chunked == pytest.approx(whole, rel=1e-4, abs=1e-6)
    with pytest.raises(ConfigError, match="model.logit_chunk"):
        prepare(quick_cfg("objective=grpo", "model.logit_chunk=0"))
