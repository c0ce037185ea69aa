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

from grpokd.models.ensemble import TeacherEnsemble
from grpokd.models.scoring import Tokens, completion_logits, decode, generate, token_logp, tokenize_prompts, tokenize_targets
from grpokd.objectives.base import Batch, KDStates, Needs
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


@dataclass(frozen=True)
class Frozen:
    """The no-grad models an objective may need besides the student."""

    reference: PreTrainedModel | None = None
    teachers: TeacherEnsemble | None = None


def score(
    student: PreTrainedModel,
    rollout: Rollout,
    needs: Needs,
    vocab_size: int,
    step: int,
    frozen: Frozen = Frozen(),
    temperature: float = 1.0,
    gold: Rollout | None = None,
) -> tuple[Batch, dict[str, Tensor]]:
    """The objective's `Batch` and detached logging metrics (entropy, per-teacher KL and weight).

    The student runs once with grad on the rollout (and once more on the gold
    solutions only when KD is evaluated there). The reference and each teacher
    run under no_grad, only when `needs` asks for them. Policy terms are scored
    at the sampling `temperature` (1.0 for gold rollouts); KD terms use the
    student's raw logits, tempered by the objective's own tau.
    """
    ids, mask = rollout.completions.ids, rollout.completions.mask.float()  # [N, T]
    raw = completion_logits(student, rollout.prompts, rollout.completions, vocab_size)  # [N, T, V]
    logits = raw / temperature  # [N, T, V]
    ref_logp = ref_logits = None
    if needs.ref_logp or needs.ref_logits:
        if frozen.reference is None:
            raise ValueError("the objective needs a reference model but none was loaded")
        with torch.no_grad():
            ref_all = completion_logits(frozen.reference, rollout.prompts, rollout.completions, vocab_size) / temperature  # [N, T, V]
        ref_logp = token_logp(ref_all, ids) if needs.ref_logp else None  # [N, T]
        ref_logits = ref_all if needs.ref_logits else None
    with torch.no_grad():
        metrics = {"entropy": masked_mean(entropy(logits.detach()), mask)}
    teacher_logp = teacher_weights = kd = None
    if needs_teachers(needs):
        teacher_logp, teacher_weights, kd, teacher_metrics = _score_teachers(student, rollout, raw, needs, vocab_size, frozen.teachers, gold, temperature)
        metrics |= teacher_metrics
    batch = Batch(
        logp=token_logp(logits, ids),  # [N, T]
        mask=mask,
        group_size=rollout.group_size,
        rewards=rollout.rewards,
        logits=logits if needs.logits else None,
        ref_logp=ref_logp,
        ref_logits=ref_logits,
        teacher_logp=teacher_logp,
        teacher_weights=teacher_weights,
        kd=kd,
        step=step,
    )
    return batch, metrics


def needs_teachers(needs: Needs) -> bool:
    return needs.teacher_logp or needs.teacher_forward or needs.teacher_reverse


def needs_gold(needs: Needs, teachers: TeacherEnsemble | None) -> bool:
    """Gold solutions are scored for SFT, for KD on gold states, and for competence weighting."""
    if not needs.rollouts:
        return True
    if not needs_teachers(needs):
        return False
    kd_on_gold = (needs.teacher_forward or needs.teacher_reverse) and needs.kd_states == "gold"
    return kd_on_gold or (teachers is not None and teachers.weighting.needs_gold)


def _score_teachers(
    student: PreTrainedModel, rollout: Rollout, raw: Tensor, needs: Needs, vocab_size: int,
    teachers: TeacherEnsemble | None, gold: Rollout | None, temperature: float,
) -> tuple[Tensor | None, Tensor | None, KDStates | None, dict[str, Tensor]]:
    """Teacher log-probs and weights on the rollout, and the KD mixture at the KD states."""
    if teachers is None:
        raise ValueError("the objective needs teachers but none were loaded")
    mix = needs.teacher_forward or needs.teacher_reverse
    on_gold = mix and needs.kd_states == "gold"
    gold_scores = teachers.gold_scores(gold.prompts, gold.completions, vocab_size) if teachers.weighting.needs_gold else None  # [M, B]
    kd = scores = None
    if needs.teacher_logp or (mix and not on_gold):
        scores = teachers.score(
            rollout.prompts, rollout.completions, raw, vocab_size, needs.kd_tau,
            forward=needs.teacher_forward and not on_gold, reverse=needs.teacher_reverse and not on_gold,
            logp=needs.teacher_logp, logp_temperature=temperature if needs.teacher_logp_tempered else 1.0, gold_scores=gold_scores,
        )
        if mix and not on_gold:
            kd = KDStates(raw, rollout.completions.mask.float(), needs.kd_tau, *scores.mixture)
    if on_gold:
        gold_raw = completion_logits(student, gold.prompts, gold.completions, vocab_size)  # [B, T', V] with grad
        gold_side = teachers.score(
            gold.prompts, gold.completions, gold_raw, vocab_size, needs.kd_tau,
            forward=needs.teacher_forward, reverse=needs.teacher_reverse, gold_scores=gold_scores,
        )
        kd = KDStates(gold_raw, gold.completions.mask.float(), needs.kd_tau, *gold_side.mixture)
        scores = scores or gold_side
    metrics = {f"teacher/{key}/{name}": values[i] for key, values in scores.metrics.items() for i, name in enumerate(teachers.names)}
    return (scores.logp, scores.weights if needs.teacher_logp else None, kd, metrics)


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
