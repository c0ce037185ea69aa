"""One step's data: sample K completions per prompt, reward them, score them into an objective `Batch`.

`sample` (policy rollouts, GRPO family) and `gold` (the dataset's solutions,
SFT) both return a `Rollout`; `score` runs the student with grad and, only
where the objective's `Needs` ask for them, the frozen reference under
no_grad, and packs the tensors the objective consumes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from grpokd.models.scoring import Tokens, completion_logits, decode, generate, token_logp, tokenize_prompts, tokenize_targets
from grpokd.objectives.base import Batch, Needs
from grpokd.objectives.terms import entropy, masked_mean


@dataclass(frozen=True)
class Sampling:
    """How completions are sampled.

    Rollouts are scored under the sampling distribution, softmax(logits / temperature),
    as TRL does: the policy GRPO optimises is the one that produced the samples, and
    greedy decoding (evaluation) is unchanged by the temperature.
    """

    group_size: int = 8  # K completions per prompt
    max_prompt_len: int = 256
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: no top-k truncation (transformers' default of 50 would bias the policy gradient)


@dataclass(frozen=True)
class Rollout:
    """Prompts, their completions and rewards. Rows k*K..k*K+K-1 of completions belong to prompt k."""

    prompts: Tokens  # [B, P]
    completions: Tokens  # [N, T]
    texts: list[str]  # N completion texts
    answers: list[str]  # N gold answers (repeated per group)
    rewards: Tensor | None  # [N], None for gold rollouts
    group_size: int  # K
    truncated: Tensor  # [N] bool: hit max_new_tokens without EOS


def sample(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    examples: dict[str, list[str]],
    sampling: Sampling,
    reward: Callable[[str, str], float],
) -> Rollout:
    """K sampled completions per prompt, each rewarded against the prompt's gold answer."""
    device = next(model.parameters()).device
    prompts = tokenize_prompts(tokenizer, examples["prompt"], sampling.max_prompt_len).to(device)  # [B, P]
    completions = generate(
        model, tokenizer, prompts, sampling.group_size, sampling.max_new_tokens,
        do_sample=True, temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k,
    )  # [N, T]
    texts = decode(tokenizer, completions)
    answers = [a for a in examples["answer"] for _ in range(sampling.group_size)]
    rewards = torch.tensor([reward(t, a) for t, a in zip(texts, answers)], dtype=torch.float32, device=device)  # [N]
    ends = (completions.ids == tokenizer.eos_token_id) & (completions.mask == 1)  # [N, T]
    return Rollout(prompts, completions, texts, answers, rewards, sampling.group_size, truncated=~ends.any(-1))


def gold(tokenizer: PreTrainedTokenizerBase, examples: dict[str, list[str]], sampling: Sampling, device: torch.device) -> Rollout:
    """The gold solutions as completions (K = 1), for objectives that need no rollouts."""
    prompts = tokenize_prompts(tokenizer, examples["prompt"], sampling.max_prompt_len).to(device)  # [B, P]
    completions = tokenize_targets(tokenizer, examples["solution"], sampling.max_new_tokens).to(device)  # [B, T]
    none = torch.zeros(completions.ids.shape[0], dtype=torch.bool, device=device)
    return Rollout(prompts, completions, examples["solution"], examples["answer"], None, 1, truncated=none)


def score(
    student: PreTrainedModel,
    rollout: Rollout,
    needs: Needs,
    vocab_size: int,
    step: int,
    reference: PreTrainedModel | None = None,
    temperature: float = 1.0,
) -> tuple[Batch, Tensor]:
    """The objective's `Batch` and the student's mean token entropy (detached, for logging).

    The student runs once with grad; the reference runs once under no_grad, only
    when `needs` asks for its log-probs or logits. Both are scored at the
    sampling `temperature` (1.0 for gold rollouts).
    """
    ids, mask = rollout.completions.ids, rollout.completions.mask.float()  # [N, T]
    logits = completion_logits(student, rollout.prompts, rollout.completions, vocab_size) / temperature  # [N, T, V]
    ref_logp = ref_logits = None
    if needs.ref_logp or needs.ref_logits:
        if reference is None:
            raise ValueError("the objective needs a reference model but none was loaded")
        with torch.no_grad():
            ref_all = completion_logits(reference, rollout.prompts, rollout.completions, vocab_size) / temperature  # [N, T, V]
        ref_logp = token_logp(ref_all, ids) if needs.ref_logp else None  # [N, T]
        ref_logits = ref_all if needs.ref_logits else None
    batch = Batch(
        logp=token_logp(logits, ids),  # [N, T]
        mask=mask,
        group_size=rollout.group_size,
        rewards=rollout.rewards,
        logits=logits if needs.logits else None,
        ref_logp=ref_logp,
        ref_logits=ref_logits,
        step=step,
    )
    with torch.no_grad():
        mean_entropy = masked_mean(entropy(logits.detach()), mask)  # []
    return batch, mean_entropy


@torch.no_grad()
def greedy_rewards(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    examples: dict[str, list[str]],
    reward: Callable[[str, str], float],
    sampling: Sampling,
) -> Tensor:
    """Reward of each prompt's greedy completion: [B] (evaluation)."""
    device = next(model.parameters()).device
    prompts = tokenize_prompts(tokenizer, examples["prompt"], sampling.max_prompt_len).to(device)  # [B, P]
    texts = decode(tokenizer, generate(model, tokenizer, prompts, do_sample=False, max_new_tokens=sampling.max_new_tokens))
    return torch.tensor([reward(t, a) for t, a in zip(texts, examples["answer"])], dtype=torch.float32, device=device)


def rollout_metrics(rollout: Rollout) -> dict[str, Tensor]:
    """Reward and length statistics of one rollout (unprefixed names)."""
    lengths = rollout.completions.mask.sum(-1).float()  # [N]
    metrics = {
        "completion_len_mean": lengths.mean(),
        "completion_len_max": lengths.max(),
        "truncated_frac": rollout.truncated.float().mean(),
    }
    if rollout.rewards is not None:
        groups = rollout.rewards.view(-1, rollout.group_size)  # [B, K]
        metrics |= {
            "reward_mean": rollout.rewards.mean(),
            "reward_std": rollout.rewards.std(unbiased=False),
            "zero_std_frac": (groups.std(-1, unbiased=False) == 0).float().mean(),
        }
    return metrics
