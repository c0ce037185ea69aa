"""Evaluation: greedy accuracy with the predictions behind it, pass@k, and the binomial interval of an accuracy.

The one implementation of each metric, for the LightningModule's val and test
steps (batches as dicts of lists, tensors per prompt) and for the embedded
zoo's build reports (`grpokd.zoo`: lists of Examples, `accuracy` and
`pass_rates`, floats).

Greedy evaluation (val and test) decodes one completion per prompt with argmax
at the rollout's lengths and scores it with the dataset's correctness reward.
Every test evaluation writes what it saw, one JSON line per problem
(`prediction_rows`): the prompt as rendered (chat template included), the
completion, the answer parsed from it and the style it was written in, the gold
answer, the reward, and whether the completion stopped at an end token or hit
the length limit. An accuracy is reported with its exact (Clopper-Pearson) 95%
interval, so that 0/20 reads as "0 to 17%", not as "zero".
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from grpokd.data.datamodule import collate
from grpokd.data.example import Example
from grpokd.data.rewards import for_component
from grpokd.models.engines import Decoding, RolloutEngine
from grpokd.models.engines.builtin import Builtin
from grpokd.models.lm import decode, end_token_ids, ended, tokenize_prompts
from grpokd.rollout import Sampling, origins, sample


@dataclass(frozen=True)
class Greedy:
    """One greedy completion per prompt, scored. B prompts."""

    completions: list[str]  # B completion texts (special tokens dropped)
    rewards: Tensor  # [B] the correctness reward of each
    ended: Tensor  # [B] bool: stopped at an end token (False: hit max_new_tokens)


@torch.no_grad()
def greedy(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, examples: dict[str, list[str]],
    reward: Callable[[str, str], float], sampling: Sampling, engine: RolloutEngine | None = None,
) -> Greedy:
    """The greedy completion of each prompt at the rollout's lengths (decoded by `engine`; None: the built-in
    decoder), its reward and whether it ended."""
    device = next(model.parameters()).device
    prompts = tokenize_prompts(tokenizer, examples["prompt"], sampling.max_prompt_len, sampling.prompt_special_tokens).to(device)  # [B, P]
    decoding = Decoding(1, sampling.max_new_tokens, do_sample=False)
    completions = (engine or Builtin()).generate(model, tokenizer, prompts, decoding).tokens  # [B, T]
    texts = decode(tokenizer, completions)
    components, _ = origins(examples)
    scores = [for_component(reward, c)(t, a) for t, a, c in zip(texts, examples["answer"], components)]
    rewards = torch.tensor(scores, dtype=torch.float32, device=device)  # [B] each by its component's reward
    return Greedy(texts, rewards, ended(completions, end_token_ids(model, tokenizer)))


def accuracy(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, examples: list[Example],
    reward: Callable[[str, str], float], sampling: Sampling, batch_size: int = 100,
) -> float:
    """Mean reward of the greedy completions (`greedy`) of `examples`, `batch_size` prompts at a time:
    the fraction answered correctly, for a 0/1 correctness reward."""
    batches = (collate(examples[i : i + batch_size]) for i in range(0, len(examples), batch_size))
    return sum(greedy(model, tokenizer, batch, reward, sampling).rewards.sum().item() for batch in batches) / len(examples)


@torch.no_grad()
def sampled_rewards(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, examples: dict[str, list[str]],
    reward: Callable[[str, str], float], sampling: Sampling, k: int, seed: int, engine: RolloutEngine | None = None,
) -> Tensor:
    """[B, k]: the reward of each of k completions sampled per prompt at the rollout settings.

    Sampled under a forked RNG seeded with `seed`: evaluation never shifts the training's random stream, so
    turning pass@k on or off leaves a run's training unchanged.
    """
    device = next(model.parameters()).device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        rollout = sample(model, tokenizer, examples, replace(sampling, group_size=k), reward, engine)
    return rollout.rewards.view(-1, k)


def pass_at_k(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, examples: dict[str, list[str]],
    reward: Callable[[str, str], float], sampling: Sampling, k: int, seed: int, engine: RolloutEngine | None = None,
) -> Tensor:
    """[B]: 1 where any of k completions sampled at the rollout settings earns `reward` (pass@k from n = k samples)."""
    return solved(sampled_rewards(model, tokenizer, examples, reward, sampling, k, seed, engine))


def solved(rewards: Tensor) -> Tensor:
    """[B, K] -> [B]: whether any of a prompt's K samples earned the reward (its best reward)."""
    return rewards.amax(-1)


def pass_rates(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, examples: list[Example],
    reward: Callable[[str, str], float], sampling: Sampling, k: int, seed: int,
) -> tuple[float, float]:
    """(pass@1, pass@k) of `examples` from one draw of k samples per prompt (`sampled_rewards`, all prompts in one
    batch): the mean reward, and the fraction of prompts `solved`."""
    rewards = sampled_rewards(model, tokenizer, collate(examples), reward, sampling, k, seed)  # [B, K]
    return rewards.mean().item(), solved(rewards).mean().item()


def prediction_rows(examples: dict[str, list[str]], result: Greedy, reward: Any, indices: list[int]) -> list[dict[str, Any]]:
    """One record per prompt: index in the split, its component (the dataset it comes from), prompt as rendered,
    completion, parsed answer and its style (when its reward can parse: `parse(text) -> (value, style)`), gold
    answer (as its reward shows it, when it can: `gold(answer) -> str`), reward, and whether it ended."""
    rows = []
    components, _ = origins(examples)
    for i, (index, completion) in enumerate(zip(indices, result.completions)):
        scorer = for_component(reward, components[i])
        parsed = scorer.parse(completion) if hasattr(scorer, "parse") else None
        rows.append({
            "index": index,
            "component": components[i],
            "prompt": examples["prompt"][i],
            "completion": completion,
            "parsed": None if parsed is None else parsed.value,
            "style": None if parsed is None else parsed.style,
            "gold": scorer.gold(examples["answer"][i]) if hasattr(scorer, "gold") else examples["answer"][i],
            "reward": float(result.rewards[i]),
            "ended": bool(result.ended[i]),
        })
    return rows


def binomial_interval(successes: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """The exact (Clopper-Pearson) `level` interval of a proportion from `successes` of `n` trials.

    0 of 20 -> (0.0, 0.168); 10 of 20 -> (0.272, 0.728); n = 0 -> (0.0, 1.0).
    """
    from scipy import stats

    if n == 0:
        return 0.0, 1.0
    alpha = 1 - level
    low = 0.0 if successes == 0 else float(stats.beta.ppf(alpha / 2, successes, n - successes + 1))
    high = 1.0 if successes == n else float(stats.beta.ppf(1 - alpha / 2, successes + 1, n - successes))
    return low, high
