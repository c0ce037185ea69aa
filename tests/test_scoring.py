"""Sampling and scoring are the same computation for seq2seq and causal models, padding or not.

Random-initialised tiny models (no training): exact identities only.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from grpokd.data.arith import make_arith
from grpokd.models import loading
from grpokd.models.lm import Tokens, completion_logits, completion_mask, decode, end_token_ids, ended, generate, inverse_cdf, multinomial, token_logp, tokenize_prompts, tokenize_targets
from grpokd.models.tokenizer import build_tokenizer
from grpokd.models.zoo import Recipe, init_model

FAMILIES = ["t5", "llama"]


def tiny(family: str):
    tokenizer = build_tokenizer(family)
    model = init_model(Recipe(family, d_model=32, layers=1, heads=2, d_ff=64, steps=0), tokenizer).eval()
    return model, tokenizer


@pytest.mark.parametrize("family", FAMILIES)
def test_tokenizer_round_trips_the_synthetic_tasks(family):
    tokenizer = build_tokenizer(family)
    for ex in make_arith(50, seed=3):
        for text in (ex.prompt, ex.solution):
            ids = tokenizer(text)["input_ids"]
            assert tokenizer.unk_token_id not in ids
            assert tokenizer.decode(ids, skip_special_tokens=True) == text


def test_completion_mask_keeps_the_first_eos_and_drops_what_follows():
    eos = 1
    ids = torch.tensor([[5, 6, 1, 0, 0], [5, 1, 7, 1, 0], [5, 6, 7, 8, 9]])
    assert completion_mask(ids, eos).tolist() == [[1, 1, 1, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 1]]


def test_prompts_are_left_padded_whatever_side_the_tokenizer_pads():
    """SmolLM2's GGUF tokenizer pads on the right; a right-padded prompt would be continued after its padding."""
    _, tokenizer = tiny("llama")
    tokenizer.padding_side = "right"
    prompts = tokenize_prompts(tokenizer, ["what is 3 + 4 ?", "tom has 6 apples and eats 2 . how many are left ?"], 64)
    assert prompts.mask[:, -1].tolist() == [1, 1] and prompts.mask[0, 0] == 0


def test_completion_mask_and_ended_stop_at_any_declared_end_token():
    """An instruct model declares several end tokens (<|im_end|> = 2, <|endoftext|> = 0 here); padding is the
    first of them, as SmolLM2 pads with <|im_end|>. The first end token of either kind is kept and scored."""
    ends = [2, 0]
    ids = torch.tensor([[5, 0, 2, 2], [5, 6, 2, 2], [5, 6, 7, 8], [2, 2, 2, 2]])
    mask = completion_mask(ids, ends)
    assert mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1], [1, 0, 0, 0]]
    assert ended(Tokens(ids, mask), ends).tolist() == [True, True, False, True]


def test_end_token_ids_unite_the_tokenizer_and_the_generation_config():
    torch.manual_seed(0)
    model, tokenizer = tiny("llama")
    assert end_token_ids(model, tokenizer) == [tokenizer.eos_token_id]
    model.generation_config.eos_token_id = [7, tokenizer.eos_token_id, 9]
    assert end_token_ids(model, tokenizer) == [tokenizer.eos_token_id, 7, 9]
    prompts = tokenize_prompts(tokenizer, ["what is 3 + 4 ?"], 64)
    out = generate(model, tokenizer, prompts, group_size=8, max_new_tokens=12)  # sampled: token 7 or 9 may end a row
    first_end = [next((t for t, i in enumerate(row) if i in (7, 9, tokenizer.eos_token_id)), None) for row in out.ids.tolist()]
    assert [int(m.sum()) for m in out.mask] == [12 if t is None else t + 1 for t in first_end]
    assert any(row[t] in (7, 9) for row, t in zip(out.ids.tolist(), first_end) if t is not None)  # seed 0: the case is exercised


@pytest.mark.parametrize("family", FAMILIES)
def test_batched_padded_scoring_equals_one_sequence_at_a_time(family):
    """Padding (left for causal, right for targets) and group repetition change no log-prob."""
    torch.manual_seed(0)
    model, tokenizer = tiny(family)
    examples = make_arith(3, seed=1)
    prompts = tokenize_prompts(tokenizer, [ex.prompt for ex in examples], 64)  # [B, P]
    targets = tokenize_targets(tokenizer, [ex.solution for ex in examples], 48)  # [B, T]
    group = 2
    completions = Tokens(targets.ids.repeat_interleave(group, 0), targets.mask.repeat_interleave(group, 0))  # [N, T]
    with torch.no_grad():
        batched = token_logp(completion_logits(model, prompts, completions), completions.ids)  # [N, T]
    for n in range(completions.ids.shape[0]):
        b = n // group
        p = prompts.mask[b].bool()
        t = completions.mask[n].bool()
        one_prompt = Tokens(prompts.ids[b][p][None], prompts.mask[b][p][None])
        one = Tokens(completions.ids[n][t][None], completions.mask[n][t][None])
        with torch.no_grad():
            alone = token_logp(completion_logits(model, one_prompt, one), one.ids)[0]  # [T_n]
        torch.testing.assert_close(batched[n][t], alone, atol=1e-5, rtol=1e-5)


def test_seq2seq_scoring_matches_the_models_own_teacher_forced_loss():
    torch.manual_seed(0)
    model, tokenizer = tiny("t5")
    ex = make_arith(1, seed=2)[0]
    prompts = tokenize_prompts(tokenizer, [ex.prompt], 64)
    target = tokenize_targets(tokenizer, [ex.solution], 48)
    with torch.no_grad():
        ours = -token_logp(completion_logits(model, prompts, target), target.ids).mean()
        theirs = model(input_ids=prompts.ids, attention_mask=prompts.mask, labels=target.ids).loss
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


def test_causal_scoring_shares_each_prompt_and_matches_the_models_own_loss_on_the_whole_sequences():
    """The prompt's KV cache is computed once on B rows and shared by its K completions: the log-probs and their
    gradients are those of the model's own loss on the N concatenated (unpadded) sequences."""
    torch.manual_seed(0)
    model, tokenizer = tiny("llama")
    model.train()
    examples = make_arith(3, seed=1)
    prompts = tokenize_prompts(tokenizer, [ex.prompt for ex in examples], 64)  # [B, P], left-padded, unequal lengths
    assert (prompts.mask == 0).any()
    group = 2
    targets = tokenize_targets(tokenizer, [ex.solution for ex in examples for _ in range(group)], 48)  # [N, T]
    targets = Tokens(targets.ids, targets.mask.clone())
    targets.mask[1, 3:] = 0  # one row ends early: its own padding
    rows_seen = []
    model.get_input_embeddings().register_forward_hook(lambda mod, args, out: rows_seen.append(tuple(out.shape[:2])))
    logp = token_logp(completion_logits(model, prompts, targets), targets.ids)  # [N, T]
    assert rows_seen == [tuple(prompts.ids.shape), tuple(targets.ids.shape)]  # prompts once ([B, P]), then the completions
    shared = (logp * targets.mask).sum()
    shared_grads = torch.autograd.grad(shared, list(model.parameters()))
    whole = 0.0
    for n in range(targets.ids.shape[0]):
        prompt = prompts.ids[n // group][prompts.mask[n // group].bool()]
        completion = targets.ids[n][targets.mask[n].bool()]
        ids = torch.cat([prompt, completion])[None]
        labels = ids.masked_fill(torch.arange(ids.shape[1]) < len(prompt), -100)
        whole = whole - model(input_ids=ids, labels=labels).loss * len(completion)  # the sum of the completion's log-probs
    whole_grads = torch.autograd.grad(whole, list(model.parameters()))
    torch.testing.assert_close(shared, whole, atol=1e-4, rtol=1e-5)
    for a, b in zip(shared_grads, whole_grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def hf_generate(model, tokenizer, prompts: Tokens, group_size: int, max_new_tokens: int, **sampling) -> Tensor:
    """transformers' own `generate`, the completion ids only ([N, T])."""
    out = model.generate(input_ids=prompts.ids, attention_mask=prompts.mask, num_return_sequences=group_size, max_new_tokens=max_new_tokens,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, **sampling)
    return out[:, 1:] if model.config.is_encoder_decoder else out[:, prompts.ids.shape[1]:]


SAMPLINGS = {
    "greedy": dict(do_sample=False),
    "t1": dict(do_sample=True, temperature=1.0, top_k=0, top_p=1.0),
    "t0.7-k8-p0.9": dict(do_sample=True, temperature=0.7, top_k=8, top_p=0.9),
}


@pytest.mark.parametrize("static_cache", [True, False], ids=["static-cache", "growing-cache"])
@pytest.mark.parametrize("sampling", SAMPLINGS, ids=list(SAMPLINGS))
@pytest.mark.parametrize("name", ["tiny-t5-student", "tiny-llama-student"])
def test_generate_draws_the_tokens_transformers_generate_draws_under_the_same_seed(name, sampling, static_cache):
    """The decoding loop is transformers' sampling step for step (same warpers, and with `draw=multinomial` the
    same random draws), on the shipped students, whose completions end at EOS at different lengths; the causal
    student's with its static KV cache and with the growing one (the seq2seq one grows its cache either way)."""
    model, tokenizer = loading.load_model(name).train(), loading.load_tokenizer(name)
    prompts = tokenize_prompts(tokenizer, [ex.prompt for ex in make_arith(5, seed=8)], 64)
    group = 4 if SAMPLINGS[sampling]["do_sample"] else 1  # transformers has no K greedy completions
    for seed in range(3):
        torch.manual_seed(seed)
        ours = generate(model, tokenizer, prompts, group, 24, **SAMPLINGS[sampling], static_cache=static_cache, draw=multinomial)
        torch.manual_seed(seed)
        theirs = hf_generate(model, tokenizer, prompts, group, 24, **SAMPLINGS[sampling])
        assert group == 1 or ours.mask.sum(-1).min() < ours.mask.sum(-1).max()  # ragged: rows stop at their own EOS
        assert torch.equal(ours.ids, theirs.masked_fill(ours.mask == 0, tokenizer.pad_token_id))


def test_the_inverse_cdf_draw_samples_each_rows_distribution():
    """200,000 draws from rows with zero weights, a tiny weight and an unnormalised row: each token's frequency is
    its probability within 4 standard errors, and a token of weight 0 is never drawn."""
    probs = torch.tensor([[0.0, 0.5, 0.0, 0.3, 0.2], [1e-3, 0.0, 0.999, 0.0, 0.0], [2.0, 1.0, 1.0, 0.0, 0.0]])
    torch.manual_seed(0)
    draws = torch.stack([inverse_cdf(probs) for _ in range(200_000)])  # [S, 3]
    expected = probs / probs.sum(-1, keepdim=True)
    for row in range(3):
        freq = torch.bincount(draws[:, row], minlength=5).double() / len(draws)
        assert (freq[expected[row] == 0] == 0).all()
        stderr = (expected[row] * (1 - expected[row]) / len(draws)).sqrt().double()
        assert ((freq - expected[row].double()).abs() <= 4 * stderr + 1e-12).all(), (row, freq, expected[row])


def test_seq2seq_encoder_runs_once_per_prompt_when_sampling_and_scoring():
    torch.manual_seed(0)
    model, tokenizer = tiny("t5")
    rows_seen = []
    model.get_encoder().register_forward_hook(lambda mod, args, kwargs, out: rows_seen.append(out.last_hidden_state.shape[0]), with_kwargs=True)
    prompts = tokenize_prompts(tokenizer, [ex.prompt for ex in make_arith(3, seed=4)], 64)  # B = 3
    completions = generate(model, tokenizer, prompts, group_size=4, max_new_tokens=8)  # N = 12
    assert completions.ids.shape[0] == 12
    completion_logits(model, prompts, completions)
    assert rows_seen == [3, 3]  # one encoder pass of B rows for sampling, one for scoring


@pytest.mark.parametrize("family", FAMILIES)
def test_generate_returns_k_masked_completions_per_prompt(family):
    torch.manual_seed(0)
    model, tokenizer = tiny(family)
    prompts = tokenize_prompts(tokenizer, [ex.prompt for ex in make_arith(2, seed=5)], 64)
    out = generate(model, tokenizer, prompts, group_size=3, max_new_tokens=6)
    assert out.ids.shape[0] == 6 and out.ids.shape[1] <= 6
    assert ((out.ids == tokenizer.pad_token_id) | (out.mask == 1)).all()  # masked-out positions are padding
    assert len(decode(tokenizer, out)) == 6
    greedy = generate(model, tokenizer, prompts, do_sample=False, max_new_tokens=6)
    assert torch.equal(greedy.ids, generate(model, tokenizer, prompts, do_sample=False, max_new_tokens=6).ids)


def test_logits_are_sliced_to_the_tokenizer_length_when_the_embedding_is_padded():
    """Qwen-style families pad embeddings to different sizes; scores must live on the shared vocabulary."""
    torch.manual_seed(0)
    tokenizer = build_tokenizer("t5")
    model = init_model(Recipe("t5", d_model=32, layers=1, heads=2, d_ff=64, steps=0), tokenizer)
    model.resize_token_embeddings(len(tokenizer) + 8)
    prompts = tokenize_prompts(tokenizer, [make_arith(1, seed=6)[0].prompt], 64)
    target = tokenize_targets(tokenizer, [make_arith(1, seed=6)[0].solution], 48)
    assert completion_logits(model, prompts, target).shape[-1] == len(tokenizer) + 8
    assert completion_logits(model, prompts, target, vocab_size=len(tokenizer)).shape[-1] == len(tokenizer)
