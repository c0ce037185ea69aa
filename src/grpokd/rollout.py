"""One step's data: sample K completions per prompt, reward them, score them into an objective `Batch`.

`sample` (policy rollouts, GRPO family) and `gold` (the dataset's solutions,
SFT) both return a `Rollout`; `score` runs the student with grad and, only
where the objective's `Needs` ask for them, the frozen reference under
no_grad, and packs the tensors the objective consumes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from grpokd.data.rewards import FORMAT_STYLES, WeightedRewards, answer_style
from grpokd.errors import check_range
from grpokd.models.ensemble import TeacherEnsemble
from grpokd.models.lm import Tokens, completion_logits, decode, end_token_ids, ended, generate, logits_for, logp_and_entropy, token_logp, tokenize_prompts, tokenize_targets
from grpokd.models.student import adapters_off
from grpokd.objectives.base import Batch, KDStates, Needs
from grpokd.objectives.kd import Mixture
from grpokd.objectives.logits import Logits, per_position
from grpokd.objectives.functional import masked_mean


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


def sample(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    examples: dict[str, list[str]],
    sampling: Sampling,
    reward: Callable[[str, str], float] | WeightedRewards,
) -> Rollout:
    """K sampled completions per prompt, each rewarded against the prompt's gold answer.

    `reward`: one function (the rollout's reward), or `WeightedRewards` (their weighted sum, each kept in `reward_parts`).
    """
    device = next(model.parameters()).device
    prompts = tokenize_prompts(tokenizer, examples["prompt"], sampling.max_prompt_len, sampling.prompt_special_tokens).to(device)  # [B, P]
    completions = generate(
        model, tokenizer, prompts, sampling.group_size, sampling.max_new_tokens,
        do_sample=True, temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k,
    )  # [N, T]
    texts = decode(tokenizer, completions)
    answers = [a for a in examples["answer"] for _ in range(sampling.group_size)]
    weighted = reward if isinstance(reward, WeightedRewards) else WeightedRewards({"correct": reward})
    values = weighted.parts(texts, answers)
    rewards = torch.tensor(weighted.total(values), dtype=torch.float32, device=device)  # [N]
    parts = {name: torch.tensor(v, dtype=torch.float32, device=device) for name, v in values.items()}  # name -> [N]
    truncated = ~ended(completions, end_token_ids(model, tokenizer))  # [N]
    return Rollout(prompts, completions, texts, answers, rewards, sampling.group_size, truncated, parts, list(examples["prompt"]))


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
        {name: v[rows] for name, v in rollout.reward_parts.items()}, rollout.prompt_texts[start:stop],
    )


def to_state(rollout: Rollout) -> dict:
    """The rollout as plain tensors, strings and ints (a checkpoint entry that loads with weights_only)."""
    return {
        "prompts": (rollout.prompts.ids, rollout.prompts.mask), "completions": (rollout.completions.ids, rollout.completions.mask),
        "texts": list(rollout.texts), "answers": list(rollout.answers), "rewards": rollout.rewards,
        "group_size": rollout.group_size, "truncated": rollout.truncated, "reward_parts": dict(rollout.reward_parts),
        "prompt_texts": list(rollout.prompt_texts),
    }


def from_state(state: dict, device: torch.device | str = "cpu") -> Rollout:
    """The inverse of `to_state`, on `device`."""
    move = lambda t: None if t is None else t.to(device)  # noqa: E731
    return Rollout(
        Tokens(*map(move, state["prompts"])), Tokens(*map(move, state["completions"])), state["texts"], state["answers"],
        move(state["rewards"]), state["group_size"], move(state["truncated"]),
        {name: move(v) for name, v in state["reward_parts"].items()}, state.get("prompt_texts", []),
    )


@torch.no_grad()
def frozen_logp(model: PreTrainedModel, rollout: Rollout, vocab_size: int, temperature: float, logit_chunk: int | None = None) -> Tensor:
    """A model's log-probs of the completion tokens at `temperature`, without grad, [N, T]: the reference's, or
    pi_old's (the student that sampled them, before any update on them); `logit_chunk` positions at a time."""
    logits = logits_for(model, rollout.prompts, rollout.completions, vocab_size, logit_chunk) / temperature  # [N, T, V]
    return per_position(logits, token_logp, rollout.completions.ids)


def gold(tokenizer: PreTrainedTokenizerBase, examples: dict[str, list[str]], sampling: Sampling, device: torch.device) -> Rollout:
    """The gold solutions as completions (K = 1), for objectives that need no rollouts."""
    prompts = tokenize_prompts(tokenizer, examples["prompt"], sampling.max_prompt_len, sampling.prompt_special_tokens).to(device)  # [B, P]
    completions = tokenize_targets(tokenizer, examples["solution"], sampling.max_new_tokens).to(device)  # [B, T]
    none = torch.zeros(completions.ids.shape[0], dtype=torch.bool, device=device)
    return Rollout(prompts, completions, examples["solution"], examples["answer"], None, 1, truncated=none, prompt_texts=list(examples["prompt"]))


class Frozen(torch.nn.Module):
    """The no-grad models an objective may need besides the student: the reference and the teachers.

    A submodule of the LightningModule, so that Lightning moves it with the student and FSDP can shard or
    replicate it (`trainer=fsdp`), but never trained and never checkpointed: its parameters do not
    require grad, it stays in eval mode whatever `train()` asks, and it adds nothing to `state_dict` (the
    models are reloaded from their source on resume, so a checkpoint holds the student alone and does not grow
    with the teachers); loading a state dict without its keys, as every checkpoint is, is not an error.

    With `reference_adapters_off`, `reference` is the LoRA-wrapped student itself, scored with its adapters
    disabled: its base model, the student as loaded, without a second copy in memory. It is then held but
    not registered here, since it is the student: trained, checkpointed and placed as such.
    """

    def __init__(self, reference: PreTrainedModel | None = None, teachers: TeacherEnsemble | None = None, reference_adapters_off: bool = False) -> None:
        super().__init__()
        if reference_adapters_off:
            self.__dict__["reference"] = reference  # a plain attribute, not a submodule: requires_grad_(False) must not reach it
        else:
            self.reference = reference
        self.teachers = teachers
        self.reference_adapters_off = reference_adapters_off
        self.requires_grad_(False)
        self.eval()
        self._prefix = ""  # where the last load_state_dict found this module (its keys' prefix)
        self.register_load_state_dict_pre_hook(self._note_prefix)
        self.register_load_state_dict_post_hook(self._forgive_missing)

    def reference_scope(self) -> contextlib.AbstractContextManager:
        """The context in which `reference` scores as the reference policy."""
        return adapters_off(self.reference) if self.reference_adapters_off else contextlib.nullcontext()

    def models(self) -> list[torch.nn.Module]:
        """The frozen models, each a unit that FSDP may shard: the reference (unless it is the student), then each teacher."""
        teachers = list(self.teachers.teachers) if self.teachers is not None else []
        own_reference = self.reference is not None and not self.reference_adapters_off
        return ([self.reference] if own_reference else []) + teachers

    def train(self, mode: bool = True) -> "Frozen":
        return super().train(False)

    def state_dict(self, *args: Any, destination: dict | None = None, prefix: str = "", keep_vars: bool = False) -> dict:
        return {} if destination is None else destination

    def _note_prefix(self, module: torch.nn.Module, state_dict: dict, prefix: str, *args: Any) -> None:
        self._prefix = prefix

    def _forgive_missing(self, module: torch.nn.Module, incompatible: Any) -> None:
        incompatible.missing_keys[:] = [k for k in incompatible.missing_keys if not k.startswith(self._prefix)]


@dataclass(frozen=True)
class FrozenScores:
    """What the reference and the teachers say about one rollout: computed once, reused by every update on it.

    Shapes: N completions, T tokens, V vocabulary, M teachers; the mixture is at the KD states
    (the rollout, or the gold solutions [B, T', ...]).
    """

    ref_logp: Tensor | None = None  # [N, T]
    ref_logits: Tensor | None = None  # [N, T, V]
    teacher_logp: Tensor | None = None  # [M, N, T]
    teacher_weights: Tensor | None = None  # [M, N, T]
    mixture: Mixture | None = None  # (pbar, neg_entropy, lbar)
    metrics: dict[str, Tensor] = field(default_factory=dict)  # per-teacher KL and weight


def score(
    student: PreTrainedModel,
    rollout: Rollout,
    needs: Needs,
    vocab_size: int,
    step: int,
    frozen: Frozen = Frozen(),
    temperature: float = 1.0,
    gold: Rollout | None = None,
    old_logp: Tensor | None = None,
    frozen_scores: FrozenScores | None = None,
    logit_chunk: int | None = None,
) -> tuple[Batch, dict[str, Tensor], FrozenScores]:
    """The objective's `Batch`, detached logging metrics (entropy, per-teacher KL and weight), and the frozen scores.

    The student runs once with grad on the rollout (and once more on the gold
    solutions only when KD is evaluated there). The reference and each teacher
    run under no_grad, only when `needs` asks for them, unless `frozen_scores`
    (from an earlier update on the same rollout) are given. Policy terms are
    scored at the sampling `temperature` (1.0 for gold rollouts); KD terms use
    the student's raw logits, tempered by the objective's own tau. `old_logp`
    [N, T]: the behaviour policy's log-probs (None: on-policy). `logit_chunk`: the student's logits are
    `ChunkedLogits`, which every term reads `logit_chunk` positions at a time (`objectives.logits.per_position`),
    never holding them whole with grad; the reference's log-probs are chunked too. What the frozen models hand
    the terms (the teachers' mixtures, the reference's logits for the exact KL) is held whole, without grad.
    """
    ids, mask = rollout.completions.ids, rollout.completions.mask.float()  # [N, T]
    raw = logits_for(student, rollout.prompts, rollout.completions, vocab_size, logit_chunk)  # [N, T, V], whole or chunked
    logits = raw / temperature  # [N, T, V]
    logp, token_entropy = per_position(logits, logp_and_entropy, ids)  # [N, T]
    kd_on_gold = (needs.teacher_forward or needs.teacher_reverse) and needs.kd_states == "gold"
    gold_raw = logits_for(student, gold.prompts, gold.completions, vocab_size, logit_chunk) if kd_on_gold else None  # [B, T', V] with grad
    if frozen_scores is None:
        frozen_scores = score_frozen(raw.detach(), rollout, needs, vocab_size, frozen, temperature, gold, gold_raw, logit_chunk)
    with torch.no_grad():
        metrics = {"entropy": masked_mean(token_entropy, mask)} | frozen_scores.metrics
    kd = None
    if frozen_scores.mixture is not None:
        states, kd_raw = (gold, gold_raw) if kd_on_gold else (rollout, raw)
        kd = KDStates(kd_raw, states.completions.mask.float(), needs.kd_tau, *frozen_scores.mixture)
    batch = Batch(
        logp=logp,  # [N, T]
        mask=mask,
        group_size=rollout.group_size,
        rewards=rollout.rewards,
        old_logp=old_logp,
        logits=logits if needs.logits else None,
        ref_logp=frozen_scores.ref_logp,
        ref_logits=frozen_scores.ref_logits,
        teacher_logp=frozen_scores.teacher_logp,
        teacher_weights=frozen_scores.teacher_weights,
        kd=kd,
        step=step,
    )
    return batch, metrics, frozen_scores


@torch.no_grad()
def score_frozen(
    student_raw: Logits, rollout: Rollout, needs: Needs, vocab_size: int, frozen: Frozen, temperature: float,
    gold: Rollout | None = None, gold_raw: Logits | None = None, logit_chunk: int | None = None,
) -> FrozenScores:
    """The reference's and the teachers' scores of a rollout, as `needs` asks (the student's logits feed metrics only)."""
    ref_logp = ref_logits = None
    if needs.ref_logp or needs.ref_logits:
        if frozen.reference is None:
            raise ValueError("the objective needs a reference model but none was loaded")
        with frozen.reference_scope():
            if needs.ref_logits:
                ref_logits = completion_logits(frozen.reference, rollout.prompts, rollout.completions, vocab_size) / temperature  # [N, T, V]
                ref_logp = token_logp(ref_logits, rollout.completions.ids) if needs.ref_logp else None  # [N, T]
            else:
                ref_logp = frozen_logp(frozen.reference, rollout, vocab_size, temperature, logit_chunk)  # [N, T]
    if not needs_teachers(needs):
        return FrozenScores(ref_logp, ref_logits)
    teacher_logp, weights, mixture, metrics = _score_teachers(student_raw, rollout, needs, vocab_size, frozen.teachers, gold, gold_raw, temperature)
    return FrozenScores(ref_logp, ref_logits, teacher_logp, weights, mixture, metrics)


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
    raw: Logits, rollout: Rollout, needs: Needs, vocab_size: int, teachers: TeacherEnsemble | None,
    gold: Rollout | None, gold_raw: Logits | None, temperature: float,
) -> tuple[Tensor | None, Tensor | None, Mixture | None, dict[str, Tensor]]:
    """Teacher log-probs and weights on the rollout, and the KD mixture at the KD states."""
    if teachers is None:
        raise ValueError("the objective needs teachers but none were loaded")
    mix = needs.teacher_forward or needs.teacher_reverse
    on_gold = mix and needs.kd_states == "gold"
    gold_scores = teachers.gold_scores(gold.prompts, gold.completions, vocab_size) if teachers.weighting.needs_gold else None  # [M, B]
    mixture = scores = None
    if needs.teacher_logp or (mix and not on_gold):
        scores = teachers.score(
            rollout.prompts, rollout.completions, raw, vocab_size, needs.kd_tau,
            forward=needs.teacher_forward and not on_gold, reverse=needs.teacher_reverse and not on_gold,
            logp=needs.teacher_logp, logp_temperature=temperature if needs.teacher_logp_tempered else 1.0, gold_scores=gold_scores,
        )
        mixture = scores.mixture if mix and not on_gold else None
    if on_gold:
        gold_side = teachers.score(
            gold.prompts, gold.completions, gold_raw, vocab_size, needs.kd_tau,
            forward=needs.teacher_forward, reverse=needs.teacher_reverse, gold_scores=gold_scores,
        )
        mixture = gold_side.mixture
        scores = scores or gold_side
    metrics = {f"teacher/{key}/{name}": values[i] for key, values in scores.metrics.items() for i, name in enumerate(teachers.names)}
    return (scores.logp, scores.weights if needs.teacher_logp else None, mixture, metrics)


def rollout_metrics(rollout: Rollout) -> dict[str, Tensor]:
    """Reward and length statistics of one rollout, and the share of completions that state their answer in each
    style (`answer_style/<marker|boxed|answer_is|none>`: whether the model keeps the asked format) (unprefixed names)."""
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
    return metrics
