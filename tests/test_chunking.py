"""Chunked scoring (`model.logit_chunk`): log-probs and entropies without the [N, T, V] logits, equal to the
unchunked values and gradients, and no [N, T, V] tensor saved for backward."""

from __future__ import annotations

import pytest
import torch

from grpokd import rollout as ro
from grpokd.errors import ConfigError
from grpokd.models import loading
from grpokd.models.scoring import chunked_logp, completion_logits, completion_logp, generate, token_logp, tokenize_prompts
from grpokd.objectives.base import Needs
from grpokd.objectives.grpo import GRPO
from grpokd.objectives.terms import entropy

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
    grads = []
    for scorer in (unchunked, lambda *a: chunked_logp(*a, chunk)):
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


def test_chunked_logp_of_a_one_hot_head_is_exact():
    """Hand-computed: hidden = e_j and weight = identity give logits e_j; log softmax at j is 1 - log(e + V - 1)."""
    v = 4
    hidden = torch.eye(v).unsqueeze(0)  # [1, 4, 4]: position j holds e_j
    ids = torch.tensor([[0, 1, 2, 3]])
    logp, ent = chunked_logp(hidden, torch.eye(v), None, ids, None, 1.0, 3)
    expected = 1 - torch.log(torch.tensor(torch.e + v - 1))
    torch.testing.assert_close(logp, expected.expand(1, v))
    p = torch.tensor([torch.e, 1, 1, 1]) / (torch.e + v - 1)
    torch.testing.assert_close(ent, (-(p * p.log()).sum()).expand(1, v))


@pytest.mark.parametrize("name", STUDENTS)
def test_completion_logp_equals_completion_logits_on_the_tiny_models(name):
    tokenizer, model = loading.load_tokenizer(name), loading.load_model(name)
    torch.manual_seed(0)
    prompts = tokenize_prompts(tokenizer, PROMPTS, 64)
    completions = generate(model, tokenizer, prompts, 3, 12)
    vocab = len(tokenizer)
    grads = []
    for chunked in (False, True):
        model.zero_grad()
        if chunked:
            logp, ent = completion_logp(model, prompts, completions, vocab, 0.7, 5)
        else:
            logits = completion_logits(model, prompts, completions, vocab) / 0.7  # [N, T, V]
            logp, ent = token_logp(logits, completions.ids), entropy(logits.detach())
        (logp * completions.mask).sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        if not chunked:
            expected = (logp.detach(), ent)
    torch.testing.assert_close(logp, expected[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ent, expected[1], rtol=1e-5, atol=1e-5)
    assert grads[0].keys() == grads[1].keys()
    for key in grads[0]:
        torch.testing.assert_close(grads[1][key], grads[0][key], rtol=1e-4, atol=1e-5)
    assert "forward" not in vars(model.get_output_embeddings())  # the head is itself again
    assert completion_logits(model, prompts, completions).shape[-1] == model.get_output_embeddings().out_features


def test_no_full_vocabulary_tensor_is_saved_for_backward():
    """A randomly initialised Llama whose vocabulary dwarfs its width (as real ones do): the unchunked scoring saves
    [N, T, V] for backward, the chunked one only the weights and the hidden states (counted once per storage)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    vocab, width, n, t = 5000, 8, 8, 16
    config = LlamaConfig(vocab_size=vocab, hidden_size=width, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2)
    model = LlamaForCausalLM(config)
    prompts = ro.Tokens(torch.randint(0, vocab, (2, 6)), torch.ones(2, 6, dtype=torch.long))
    completions = ro.Tokens(torch.randint(0, vocab, (n, t)), torch.ones(n, t, dtype=torch.long))  # 2 prompts x 4

    def saved_numel(score):
        storages = {}
        def keep(x):
            storages[x.untyped_storage().data_ptr()] = x.untyped_storage().nbytes() // x.element_size()
            return x
        with torch.autograd.graph.saved_tensors_hooks(keep, lambda x: x):
            score()
        return sum(storages.values())

    whole = saved_numel(lambda: token_logp(completion_logits(model, prompts, completions), completions.ids))
    chunked = saved_numel(lambda: completion_logp(model, prompts, completions, None, 1.0, 8))
    assert whole >= n * t * vocab  # at least one [N, T, V]
    assert chunked < n * t * vocab / 2  # weights (2 V H) and hidden states, no logits: a lost checkpoint would add N T V


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
    rollout = ro.sample(student, tokenizer, examples, ro.Sampling(group_size=4, max_new_tokens=16), lambda c, a: float(len(c) % 3 == 0))
    objective = GRPO(beta=0.1)
    results = []
    for chunk in (None, 6):
        student.zero_grad()
        batch, metrics, _ = ro.score(student, rollout, objective.needs, len(tokenizer), 0, ro.Frozen(reference), 0.7, logit_chunk=chunk)
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


def test_objectives_that_need_full_distributions_are_refused():
    ro.check_chunkable(Needs(ref_logp=True))  # grpo with a k1-k3 estimator
    ro.check_chunkable(Needs(rollouts=False))  # sft
    for needs, what in [(Needs(logits=True), "student's full logits"), (Needs(ref_logits=True), "reference's full logits"),
                        (Needs(teacher_logp=True), "teachers"), (Needs(teacher_forward=True), "teachers")]:
        with pytest.raises(ConfigError, match=what):
            ro.check_chunkable(needs)


def test_a_chunked_grpo_run_logs_the_same_losses_and_j1_is_refused_at_start_up(quick_cfg, tmp_path):
    from test_train import read_metrics, train_column

    from grpokd.train import prepare, train

    losses = []
    for chunk in ("null", "16"):
        run = tmp_path / f"chunk-{chunk}"
        results = train(quick_cfg("objective=grpo", "model=tiny_causal", f"model.logit_chunk={chunk}", "log.csv=true", "eval_before=false", run_dir=run))
        assert results["status"] == "complete"
        losses.append(train_column(read_metrics(run), "train/loss"))
    assert len(losses[0]) == 4
    assert losses[1] == pytest.approx(losses[0], rel=1e-4, abs=1e-6)
    with pytest.raises(ConfigError, match="model.logit_chunk: this objective needs"):
        prepare(quick_cfg("objective=j1", "model.logit_chunk=16"))
    with pytest.raises(ConfigError, match="model.logit_chunk"):
        prepare(quick_cfg("objective=grpo", "model.logit_chunk=0"))
