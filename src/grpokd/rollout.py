"""Rollouts: sample K completions per prompt and reward them, keep them for the updates that reuse them.

`sample` (policy rollouts, the GRPO family) and `gold` (the dataset's solutions: SFT, KD on gold states,
competence weighting) both return a `Rollout`. A rollout reused by several optimiser steps lives in a
`RolloutBuffer` with pi_old's log-probs and the frozen models' scores of each minibatch; `select`,
`to_state` and `from_state` cut it into minibatches and save it in checkpoints.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from grpokd.data.rewards import FORMAT_STYLES, WeightedRewards, answer_style
from grpokd.errors import check_range
from grpokd.models.engines import Decoding, RolloutEngine
from grpokd.models.engines.builtin import Builtin
from grpokd.models.lm import Tokens, decode, end_token_ids, ended, tokenize_prompts, tokenize_targets


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
    prompt_special_tokens: bool = True  # False for chat-rendered prompts, which hold their special tokens (`data.prompts`)

    def __post_init__(self) -> None:
        key = "rollout.sampling."
        check_range(f"{key}temperature", self.temperature, low=0, low_open=True)
        check_range(f"{key}top_p", self.top_p, low=0, high=1, low_open=True)
        check_range(f"{key}top_k", self.top_k, low=0, integer=True)
        check_range(f"{key}max_new_tokens", self.max_new_tokens, low=1, integer=True)
        check_range(f"{key}max_prompt_len", self.max_prompt_len, low=1, integer=True)
        check_range("group_size", self.group_size, low=1, integer=True)


@dataclass(frozen=True)
class Rollout:
    """Prompts, their completions and rewards. Rows k*K..k*K+K-1 of completions belong to prompt k."""

    prompts: Tokens  # [B, P]
    completions: Tokens  # [N, T]
    texts: list[str]  # N completion texts
    answers: list[str]  # N gold answers (repeated per group)
    rewards: Tensor | None  # [N], None for gold rollouts
    group_size: int  # K
    truncated: Tensor  # [N] bool: hit max_new_tokens without an end token
    reward_parts: dict[str, Tensor] = field(default_factory=dict)  # name -> [N], each reward function's value
    prompt_texts: list[str] = field(default_factory=list)  # B prompts as rendered (chat template included), before tokenizing
    reward_weights: dict[str, float] = field(default_factory=dict)  # name -> the weight of reward_parts[name] in rewards
    components: list[str] = field(default_factory=list)  # B: the dataset each prompt comes from (`dataset=mix`'s component)
    teachers: list[str | None] = field(default_factory=list)  # B: the teacher each prompt's data names (`weighting=route`), or None
    engine_logp: Tensor | None = None  # [N, T] the rollout engine's log-probs of its sampled tokens (None: the engine reports none)
    questions: list[str] = field(default_factory=list)  # B prompts before the chat layout (for teachers with their own tokenizer)


def origins(examples: dict[str, list]) -> tuple[list[str], list[str | None]]:
    """Each prompt's component and teacher field in a batch of examples (empty / None where the batch has none)."""
    count = len(examples["prompt"])
    return list(examples.get("component") or [""] * count), list(examples.get("teacher") or [None] * count)


def questions(examples: dict[str, list]) -> list[str]:
    """Each prompt before the chat layout (the prompt itself where the batch says nothing else)."""
    return list(examples.get("question") or examples["prompt"])


def sample(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    examples: dict[str, list[str]],
    sampling: Sampling,
    reward: Callable[[str, str], float] | WeightedRewards,
    engine: RolloutEngine | None = None,
) -> Rollout:
    """K sampled completions per prompt, each rewarded against the prompt's gold answer.

    `reward`: one function (the rollout's reward), or `WeightedRewards` (their weighted sum, each kept in `reward_parts`).
    `engine`: what samples (`models.engines`; None: the built-in decoder on `model`).
    """
    device = next(model.parameters()).device
    prompts = tokenize_prompts(tokenizer, examples["prompt"], sampling.max_prompt_len, sampling.prompt_special_tokens).to(device)  # [B, P]
    decoding = Decoding(sampling.group_size, sampling.max_new_tokens, True, sampling.temperature, sampling.top_p, sampling.top_k)
    completions, engine_logp = (engine or Builtin()).generate(model, tokenizer, prompts, decoding)  # [N, T] each
    texts = decode(tokenizer, completions)
    answers = [a for a in examples["answer"] for _ in range(sampling.group_size)]
    components, teachers = origins(examples)
    weighted = WeightedRewards.of(reward)
    values = weighted.parts(texts, answers, [c for c in components for _ in range(sampling.group_size)])
    rewards = torch.tensor(weighted.total(values), dtype=torch.float32, device=device)  # [N]
    parts = {name: torch.tensor(v, dtype=torch.float32, device=device) for name, v in values.items()}  # name -> [N]
    truncated = ~ended(completions, end_token_ids(model, tokenizer))  # [N]
    return Rollout(
        prompts, completions, texts, answers, rewards, sampling.group_size, truncated, parts, list(examples["prompt"]), dict(weighted.weights),
        components, teachers, engine_logp, questions(examples),
    )


def mask_truncated(rollout: Rollout) -> Rollout:
    """The rollout with the completions that hit max_new_tokens masked out entirely (no policy loss, no KL)."""
    mask = rollout.completions.mask.masked_fill(rollout.truncated[:, None], 0)  # [N, T]
    return replace(rollout, completions=Tokens(rollout.completions.ids, mask))


def select(rollout: Rollout, start: int, stop: int) -> Rollout:
    """Prompts start..stop-1 of `rollout` with their whole groups (a minibatch of several updates per rollout)."""
    k = rollout.group_size
    rows = slice(start * k, stop * k)
    return Rollout(
        Tokens(rollout.prompts.ids[start:stop], rollout.prompts.mask[start:stop]),
        Tokens(rollout.completions.ids[rows], rollout.completions.mask[rows]),
        rollout.texts[rows], rollout.answers[rows], None if rollout.rewards is None else rollout.rewards[rows], k, rollout.truncated[rows],
        {name: v[rows] for name, v in rollout.reward_parts.items()}, rollout.prompt_texts[start:stop], dict(rollout.reward_weights),
        rollout.components[start:stop], rollout.teachers[start:stop], None if rollout.engine_logp is None else rollout.engine_logp[rows],
        rollout.questions[start:stop],
    )


def to_state(rollout: Rollout) -> dict:
    """The rollout as plain tensors, strings and ints (a checkpoint entry that loads with weights_only)."""
    return {
        "prompts": (rollout.prompts.ids, rollout.prompts.mask), "completions": (rollout.completions.ids, rollout.completions.mask),
        "texts": list(rollout.texts), "answers": list(rollout.answers), "rewards": rollout.rewards,
        "group_size": rollout.group_size, "truncated": rollout.truncated, "reward_parts": dict(rollout.reward_parts),
        "prompt_texts": list(rollout.prompt_texts), "reward_weights": dict(rollout.reward_weights),
        "components": list(rollout.components), "teachers": list(rollout.teachers), "engine_logp": rollout.engine_logp,
        "questions": list(rollout.questions),
    }


def from_state(state: dict, device: torch.device | str = "cpu") -> Rollout:
    """The inverse of `to_state`, on `device`."""
    move = lambda t: None if t is None else t.to(device)  # noqa: E731
    return Rollout(
        Tokens(*map(move, state["prompts"])), Tokens(*map(move, state["completions"])), state["texts"], state["answers"],
        move(state["rewards"]), state["group_size"], move(state["truncated"]),
        {name: move(v) for name, v in state["reward_parts"].items()}, state.get("prompt_texts", []), state.get("reward_weights", {}),
        state.get("components", []), state.get("teachers", []), move(state.get("engine_logp")), state.get("questions", state.get("prompt_texts", [])),
    )


def gold(tokenizer: PreTrainedTokenizerBase, examples: dict[str, list[str]], sampling: Sampling, device: torch.device) -> Rollout:
    """The gold solutions as completions (K = 1), for objectives that need no rollouts."""
    prompts = tokenize_prompts(tokenizer, examples["prompt"], sampling.max_prompt_len, sampling.prompt_special_tokens).to(device)  # [B, P]
    completions = tokenize_targets(tokenizer, examples["solution"], sampling.max_new_tokens).to(device)  # [B, T]
    none = torch.zeros(completions.ids.shape[0], dtype=torch.bool, device=device)
    components, teachers = origins(examples)
    return Rollout(
        prompts, completions, examples["solution"], examples["answer"], None, 1, truncated=none, prompt_texts=list(examples["prompt"]),
        components=components, teachers=teachers, questions=questions(examples),
    )


@dataclass
class RolloutBuffer:
    """A rollout reused by several optimiser steps, with pi_old and the frozen models' scores of each minibatch.

    `scores` maps a minibatch to what the reference and the teachers said about it (`scoring.FrozenScores`),
    computed on its first use and reused by the later passes.
    """

    rollout: Rollout
    gold: Rollout | None  # the prompts' gold solutions, when the objective or the weighting needs them
    old_logp: Tensor | None  # [N, T] pi_old; None: one update per rollout (on-policy)
    scores: dict[int, Any] = field(default_factory=dict)  # minibatch -> scoring.FrozenScores

    def minibatch(self, index: int, count: int) -> tuple[Rollout, Rollout | None, Tensor | None]:
        """Minibatch `index` of `count`: whole prompts (and groups), in order."""
        if count == 1:
            return self.rollout, self.gold, self.old_logp
        prompts = self.rollout.prompts.ids.shape[0]
        if prompts % count:
            raise ValueError(f"{prompts} prompts per rollout do not split into {count} minibatches")
        start, stop = index * prompts // count, (index + 1) * prompts // count
        k = self.rollout.group_size
        old = None if self.old_logp is None else self.old_logp[start * k : stop * k]
        return select(self.rollout, start, stop), None if self.gold is None else select(self.gold, start, stop), old

    def state(self) -> dict:
        """The rollouts and pi_old as plain tensors (a checkpoint entry); the frozen scores are recomputed on resume."""
        gold = None if self.gold is None else to_state(self.gold)
        return {"rollout": to_state(self.rollout), "gold": gold, "old_logp": self.old_logp}

    @classmethod
    def from_state(cls, state: dict, device: torch.device | str = "cpu") -> "RolloutBuffer":
        gold = None if state["gold"] is None else from_state(state["gold"], device)
        old_logp = None if state["old_logp"] is None else state["old_logp"].to(device)
        return cls(from_state(state["rollout"], device), gold, old_logp)


def rollout_metrics(rollout: Rollout, components: list[str] = ()) -> dict[str, Tensor]:
    """Reward and length statistics of one rollout, and the share of completions that state their answer in each
    style (`answer_style/<marker|boxed|answer_is|none>`: whether the model keeps the asked format) (unprefixed names).

    With several `components` (`dataset=mix`), also `<component>/reward_mean` for each: NaN when the rollout holds
    none of its prompts (reduced over the ranks that have some, `parallel.reduce_over_ranks`)."""
    lengths = rollout.completions.mask.sum(-1).float()  # [N]
    styles = [answer_style(text) or "none" for text in rollout.texts]
    metrics = {
        "completion_len_mean": lengths.mean(),
        "completion_len_max": lengths.max(),
        "truncated_frac": rollout.truncated.float().mean(),
        **{f"answer_style/{style}": torch.tensor(styles.count(style) / len(styles)) for style in (*FORMAT_STYLES, "none")},
    }
    if rollout.rewards is not None:
        groups = rollout.rewards.view(-1, rollout.group_size)  # [B, K]
        metrics |= {
            "reward_mean": rollout.rewards.mean(),
            "reward_std": rollout.rewards.std(unbiased=False),
            "zero_std_frac": (groups.std(-1, unbiased=False) == 0).float().mean(),
        }
        metrics |= {f"rewards/{name}/mean": values.mean() for name, values in rollout.reward_parts.items()}
        if len(components) > 1:
            of_row = [c for c in rollout.components for _ in range(rollout.group_size)]  # [N] each completion's component
            for name in components:
                rows = torch.tensor([c == name for c in of_row], device=rollout.rewards.device)  # [N]
                metrics[f"{name}/reward_mean"] = rollout.rewards[rows].mean() if rows.any() else torch.tensor(math.nan)
    return metrics
