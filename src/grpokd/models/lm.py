"""Uniform tokenising, sampling and scoring for seq2seq (T5) and causal LMs.

Completions are always "the tokens after the prompt": for a seq2seq model the
decoder's tokens, for a causal model the continuation of the left-padded
prompt. Each completion ends with the first end token (included, mask 1: it is
the policy's choice and is scored as such); what follows is padding (mask 0).
The end tokens are every EOS the model declares (`end_token_ids`: an instruct
model's generation config may list several, e.g. `<|im_end|>` and
`<|endoftext|>`). Rows n*K .. n*K+K-1 belong to prompt n.

Each prompt runs once per rollout step, not K times: in sampling and in scoring
a seq2seq model's encoder runs on the B prompts (its states repeated K times), and
a causal model's prompt KV cache is computed on the B prompts and repeated K times.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from transformers import LogitsProcessorList, PreTrainedModel, PreTrainedTokenizerBase, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from grpokd.models.student import checkpointed_layers, checkpointing_off


@dataclass(frozen=True)
class Tokens:
    """Padded token ids with their mask. Shapes: [rows, L]."""

    ids: Tensor  # [R, L] long
    mask: Tensor  # [R, L] long, 1 on real tokens

    def to(self, device: torch.device | str) -> "Tokens":
        return Tokens(self.ids.to(device), self.mask.to(device))


def is_seq2seq(model: PreTrainedModel) -> bool:
    return bool(getattr(model.config, "is_encoder_decoder", False))


def tokenize_prompts(tokenizer: PreTrainedTokenizerBase, texts: list[str], max_len: int, special_tokens: bool = True) -> Tokens:
    """Prompts, left-padded and truncated from the left to keep the question's end (every prompt of a run, in
    training and evaluation alike, goes through here; `data.prompts.count_long` counts the ones cut at start-up).

    `special_tokens`: add the tokenizer's own (T5's closing </s>, a BOS); False for prompts rendered by a chat
    template, which already hold theirs.
    """
    tokenizer.truncation_side = tokenizer.padding_side = "left"  # a tokenizer may default to right padding (SmolLM2's GGUF one does)
    enc = tokenizer(texts, padding=True, truncation=True, max_length=max_len, add_special_tokens=special_tokens, return_tensors="pt")
    return Tokens(enc["input_ids"], enc["attention_mask"])


def end_token_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Every token that ends a completion: the tokenizer's EOS and the model's `generation_config.eos_token_id`
    (an id or a list of them, e.g. SmolLM2's and Qwen2.5's `<|im_end|>` beside `<|endoftext|>`), in that order."""
    declared = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    declared = declared if isinstance(declared, (list, tuple)) else [declared]
    ids = [tokenizer.eos_token_id, *declared]
    return list(dict.fromkeys(i for i in ids if i is not None))


def ended(completions: Tokens, end_ids: list[int]) -> Tensor:
    """[N] bool: the completion stopped at an end token (False: it hit the length limit)."""
    ends = torch.isin(completions.ids, torch.tensor(end_ids, device=completions.ids.device))  # [N, T]
    return (ends & (completions.mask == 1)).any(-1)


def tokenize_targets(tokenizer: PreTrainedTokenizerBase, texts: list[str], max_len: int) -> Tokens:
    """Gold completions: the text's tokens then EOS, right-padded; truncation keeps the start."""
    rows = [tokenizer(t, add_special_tokens=False)["input_ids"][: max_len - 1] + [tokenizer.eos_token_id] for t in texts]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)  # [N, T]
    mask = torch.zeros((len(rows), width), dtype=torch.long)  # [N, T]
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
    return Tokens(ids, mask)


def completion_mask(ids: Tensor, end_ids: int | list[int]) -> Tensor:
    """1 up to and including the first end token (any of `end_ids`) of each row, 0 after; a row without one is
    all 1 (truncated)."""
    is_end = torch.isin(ids, torch.tensor(end_ids, device=ids.device))  # [N, T]
    after_end = (is_end.long().cumsum(-1) - is_end.long()) > 0  # strictly after the first end token
    return (~after_end).long()


@torch.no_grad()
def generate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Tokens,
    group_size: int = 1,
    max_new_tokens: int = 64,
    do_sample: bool = True,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    static_cache: bool = True,
    draw: Callable[[Tensor], Tensor] | None = None,
) -> Tokens:
    """Sample `group_size` completions per prompt ([B, P] -> [B*K, T]); greedy when do_sample=False.

    A plain decoding loop on the model's KV cache, transformers' `generate` step for step, with fewer round
    trips: each prompt runs once (`decoding`), then every step feeds the N tokens just chosen and draws the next
    from softmax(logits / temperature) after top-k and top-p (transformers' own warpers, in generate's order;
    argmax when greedy). The draw is `multinomial`, transformers' own, so that under the same seed it returns
    `generate`'s tokens (a test checks), unless `draw` gives another (`inverse_cdf`: the same distribution from
    N uniforms per step). Rows that have emitted an end token (any of `end_token_ids`) get padding; the loop stops when
    every row has ended or at `max_new_tokens`. Of the model's generation_config only the end tokens are read:
    a repetition penalty or a default top-k there would sample from another distribution than the one the
    rollout is scored under.

    A causal model decodes into a static KV cache (`static_cache`, where transformers has one: 5.0 and later),
    allocated once for the prompt and `max_new_tokens`; each step writes its keys and values in place instead of
    growing the cache by concatenation (SmolLM2-135M, 32 rows: 1.10x the decoding speed; `bench/decoding.py`).
    `static_cache=False` keeps the growing cache (a seq2seq model always does).

    Gradient checkpointing is suspended meanwhile: its layers would drop the KV cache that decoding reads. The loop
    runs in inference mode; the tokens it returns are ordinary tensors, which the student's scoring may save for
    backward.
    """
    warpers = LogitsProcessorList()
    if do_sample:
        warpers += [TemperatureLogitsWarper(temperature)] if temperature != 1.0 else []
        warpers += [TopKLogitsWarper(top_k)] if top_k else []
        warpers += [TopPLogitsWarper(top_p)] if top_p < 1.0 else []
    chosen, end_ids = [], end_token_ids(model, tokenizer)
    with checkpointing_off(model), torch.inference_mode():  # no autograd bookkeeping at all: 5-10% of a tiny model's decoding
        logits, step = decoding(model, prompts, group_size, max_new_tokens if static_cache else None)  # [N, V]
        done = torch.zeros(logits.shape[0], dtype=torch.bool, device=logits.device)  # [N] rows past their end token
        ends = torch.tensor(end_ids, device=logits.device)
        while True:
            scores = warpers(None, logits.float())  # [N, V]
            token = (draw or multinomial)(scores.softmax(-1)) if do_sample else scores.argmax(-1)  # [N]
            token = token.masked_fill(done, tokenizer.pad_token_id)
            chosen.append(token)
            done |= torch.isin(token, ends)
            if len(chosen) == max_new_tokens or bool(done.all()):
                break
            logits = step(token)
    ids = torch.stack(chosen, 1)  # [N, T]: stacked outside inference mode, an ordinary tensor (an inference tensor cannot be saved for backward)
    mask = completion_mask(ids, end_ids)  # [N, T]
    return Tokens(ids.masked_fill(mask == 0, tokenizer.pad_token_id), mask)


def inverse_cdf(probs: Tensor) -> Tensor:
    """One token per row of `probs` [N, V] (each row's weights, summing to 1 or not) -> [N]: the first token whose
    cumulative weight exceeds a uniform draw times the row's total, an exact draw from the row's distribution (a
    token of weight 0 is never drawn). One random number per row, where `multinomial` (transformers') draws an
    exponential per row and token: at SmolLM2's 49,152 tokens and 32 rows, 46 ms of a 164 ms decoding step."""
    cdf = probs.double().cumsum(-1)  # [N, V] float64: a small weight keeps its share of the row
    u = torch.rand(probs.shape[0], 1, dtype=torch.float64, device=probs.device) * cdf[:, -1:]  # [N, 1]
    return torch.searchsorted(cdf, u, right=True).squeeze(1).clamp(max=probs.shape[-1] - 1)


def multinomial(probs: Tensor) -> Tensor:
    """transformers' draw: `torch.multinomial(probs, 1)` per row, [N, V] -> [N]."""
    return torch.multinomial(probs, 1).squeeze(1)


def decoding(model: PreTrainedModel, prompts: Tokens, group_size: int, static_len: int | None = None) -> tuple[Tensor, Callable[[Tensor], Tensor]]:
    """Start decoding K continuations of each prompt: the first next-token logits [N, V], and a step function
    (the N tokens just chosen [N] -> the next logits [N, V]) that extends the KV cache it holds.

    Each prompt runs once: for seq2seq the encoder on the B prompts, its states repeated K times; for a causal
    model the prompt's cache is computed on the B prompts and repeated K times. `static_len`: a causal model's
    cache and attention mask are allocated for the prompt and that many new tokens and written in place
    (`static_cache`); None, or no static cache in this transformers, grows them by concatenation.
    """
    cache = None
    if is_seq2seq(model):
        encoded = model.get_encoder()(input_ids=prompts.ids, attention_mask=prompts.mask).last_hidden_state.repeat_interleave(group_size, 0)  # [N, P, D]
        encoder_mask = prompts.mask.repeat_interleave(group_size, 0)  # [N, P]

        def step(tokens: Tensor) -> Tensor:
            nonlocal cache
            out = model(encoder_outputs=(encoded,), attention_mask=encoder_mask, decoder_input_ids=tokens[:, None], use_cache=True, **cache_arg(model, cache))
            cache = cache_of(out)
            return out.logits[:, -1]

        return step(torch.full_like(encoder_mask[:, 0], model.config.decoder_start_token_id)), step
    static = static_cache(model, prompts.ids.shape[1] + static_len) if static_len is not None else None
    logits, cache = prompt_cache(model, prompts, group_size, static)  # [N, V]
    mask = prompts.mask.repeat_interleave(group_size, 0)  # [N, P]; grows by a column per step, or preallocated [N, P+T]
    length, position = mask.shape[1], mask.sum(-1, keepdim=True) - 1  # [N, 1]: the last prompt token's position
    if static is not None:
        mask = torch.cat([mask, mask.new_zeros(mask.shape[0], static_len)], 1)

    def step(tokens: Tensor) -> Tensor:
        nonlocal cache, mask, position, length
        if static is None:
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
        else:
            mask[:, length] = 1
        length, position = length + 1, position + 1
        out = model(input_ids=tokens[:, None], attention_mask=mask[:, :length], position_ids=position, use_cache=True, **cache_arg(model, cache))
        cache = cache_of(out)
        return out.logits[:, -1]

    return logits, step


def static_cache(model: PreTrainedModel, length: int) -> Any:
    """An empty static KV cache of `length` positions for `model` (transformers' StaticCache, every layer a full
    attention one, written in place), or None before transformers 5 or where the model's layers are not all of
    that kind (sliding-window or hybrid models keep the growing cache)."""
    if transformers_major() < 5:
        return None
    from transformers.cache_utils import StaticCache, StaticLayer

    cache = StaticCache(config=model.config, max_cache_len=length)
    return cache if all(type(layer) is StaticLayer for layer in cache.layers) else None


@functools.cache
def transformers_major() -> int:
    import transformers

    return int(transformers.__version__.split(".")[0])


def prompt_cache(model: PreTrainedModel, prompts: Tokens, group_size: int, static: Any = None) -> tuple[Tensor, Any]:
    """A causal model on the B left-padded prompts once: the last position's logits, repeated K times [N, V], and
    the prompts' KV cache, each row repeated K times (N rows), for K continuations of each prompt. The output head
    runs on the last position only (`logits_to_keep`): no [B, P, V] logits, which at a real vocabulary and with
    grad would be the prompt's largest tensor. `static`: an empty static cache to fill (`static_cache`); None, a
    new growing one."""
    out = model(input_ids=prompts.ids, attention_mask=prompts.mask, position_ids=positions(prompts.mask), use_cache=True, logits_to_keep=1,
                **cache_arg(model, static))
    cache = cache_of(out)
    if static is None:
        cache.batch_repeat_interleave(group_size)
    else:  # transformers' static layers have no batch_repeat_interleave
        for layer in cache.layers:
            layer.keys, layer.values = layer.keys.repeat_interleave(group_size, 0), layer.values.repeat_interleave(group_size, 0)
            layer.batch_size *= group_size
    return out.logits[:, -1].repeat_interleave(group_size, 0), cache


def cache_arg(model: PreTrainedModel, cache: Any) -> dict[str, Any]:
    """The KV cache as the model's forward takes it: `cache` from transformers 5.2x on, `past_key_values` before
    (the old name warns on every call there and goes in 5.40)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # a peft model passes it on
    return {_cache_key(type(base)): cache}


@functools.cache
def _cache_key(model_class: type) -> str:
    return "cache" if "cache" in inspect.signature(model_class.forward).parameters else "past_key_values"


def cache_of(out: Any) -> Any:
    """The KV cache a forward returned, under either name (`cache_arg`)."""
    return out["cache"] if "cache" in out else out["past_key_values"]


def positions(mask: Tensor) -> Tensor:
    """Position ids under left padding: each row's real tokens count from 0 (padding gets 0 too, and is masked)."""
    return (mask.cumsum(-1) - 1).clamp(min=0)


@contextlib.contextmanager
def head_skipped(model: PreTrainedModel) -> Iterator[torch.nn.Linear]:
    """Inside, the model's output head is the identity, so its "logits" are the final hidden states [.., H] (T5's
    tied-embedding rescaling included); yields the head. Refused for models that transform the logits after the
    head (final logit soft-capping), whose hidden states the head alone would not turn into their logits."""
    head = model.get_output_embeddings()
    if not isinstance(head, torch.nn.Linear) or getattr(model.config, "final_logit_softcapping", None):
        raise ValueError(f"chunked log-probs need a plain linear output head without logit soft-capping; {type(model).__name__} has none")
    head.forward = lambda hidden: hidden  # an instance attribute shadows Linear.forward
    try:
        yield head
    finally:
        del head.forward


def completion_logits(model: PreTrainedModel, prompts: Tokens, completions: Tokens, vocab_size: int | None = None) -> Tensor:
    """Next-token logits at every completion position: [B, P] prompts, [N, T] completions -> [N, T, V].

    N must be a multiple of B (K completions per prompt). Logits are sliced to
    `vocab_size` (the tokenizer's length) where the embedding is padded.

    Each prompt runs once: a seq2seq model's encoder on the B prompts; a causal model's prompt KV cache, with grad,
    computed on the B prompts and shared by their K completions, which run on it (the values of scoring the N
    concatenated sequences, to float rounding, at a fraction of the tokens). Under gradient checkpointing, whose
    layers drop the cache, a causal model runs the N whole sequences instead.
    """
    group_size = completions.ids.shape[0] // prompts.ids.shape[0]
    if is_seq2seq(model):
        encoded = model.get_encoder()(input_ids=prompts.ids, attention_mask=prompts.mask).last_hidden_state  # [B, P, D]
        start = torch.full_like(completions.ids[:, :1], model.config.decoder_start_token_id)  # [N, 1]
        out = model(
            encoder_outputs=(encoded.repeat_interleave(group_size, 0),),  # [N, P, D]: encoder ran once per prompt
            attention_mask=prompts.mask.repeat_interleave(group_size, 0),  # [N, P]
            decoder_input_ids=torch.cat([start, completions.ids[:, :-1]], 1),  # [N, T] teacher forcing
            decoder_attention_mask=torch.cat([torch.ones_like(start), completions.mask[:, :-1]], 1),
            use_cache=False,
        )
        logits = out.logits  # [N, T, V]
    elif checkpointed_layers(model):  # its layers drop the KV cache: the N whole sequences, prompts repeated
        ids = torch.cat([prompts.ids.repeat_interleave(group_size, 0), completions.ids], 1)  # [N, P+T]
        mask = torch.cat([prompts.mask.repeat_interleave(group_size, 0), completions.mask], 1)  # [N, P+T]
        out = model(input_ids=ids, attention_mask=mask, position_ids=positions(mask), use_cache=False)
        logits = out.logits[:, prompts.ids.shape[1] - 1 : -1]  # [N, T, V]: position t predicts completion token t
    else:  # the prompt once, its cache (with grad) shared by its K completions
        first, cache = prompt_cache(model, prompts, group_size)  # [N, V]: the last prompt position predicts token 0
        mask = torch.cat([prompts.mask.repeat_interleave(group_size, 0), completions.mask], 1)  # [N, P+T]
        out = model(input_ids=completions.ids, attention_mask=mask, position_ids=positions(mask)[:, prompts.ids.shape[1] :],
                    use_cache=False, **cache_arg(model, cache))
        logits = torch.cat([first[:, None], out.logits[:, :-1]], 1)  # [N, T, V]: completion position t predicts token t+1
    return logits[..., :vocab_size] if vocab_size is not None else logits


def token_logp(logits: Tensor, ids: Tensor) -> Tensor:
    """log softmax(logits) at the given tokens, in float32: [N, T, V], [N, T] -> [N, T]."""
    logits = logits.float()
    return logits.gather(-1, ids.unsqueeze(-1)).squeeze(-1) - logits.logsumexp(-1)  # [N, T]


def decode(tokenizer: PreTrainedTokenizerBase, completions: Tokens) -> list[str]:
    """Completion texts without special tokens."""
    return tokenizer.batch_decode(completions.ids.masked_fill(completions.mask == 0, tokenizer.pad_token_id), skip_special_tokens=True)
