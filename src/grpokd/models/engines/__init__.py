"""Rollout engines: what samples the student's completions (and its greedy evaluations), behind one interface.

An engine takes left-padded prompts [B, P] and returns K completions per prompt [N, T] in grpokd's layout
(`lm.Tokens`: each row ends with its first end token, then padding), with the engine's own log-probs of the
tokens it chose at the sampling distribution when it has them, and takes the policy's new weights after an
update (`sync`). Built-in (`builtin`: grpokd's decoder on the trained model itself, nothing to sync) and vLLM
(`vllm`: a colocated engine that holds its own copy of the weights) are chosen by `rollout.engine`; another
engine (SGLang, say) is one more module here and one more line in `ENGINES`.
"""

from __future__ import annotations

import importlib
from typing import Any, NamedTuple, Protocol

from torch import Tensor
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from grpokd.errors import ConfigError
from grpokd.models.lm import Tokens


class Generated(NamedTuple):
    """An engine's completions and, where it reports them, its log-probs of the chosen tokens."""

    tokens: Tokens  # [N, T]
    logp: Tensor | None  # [N, T] float32, log pi_engine(token) at the sampling distribution, 0 on padding; None: not reported


class Decoding(NamedTuple):
    """How to continue the prompts: K continuations each, up to `max_new_tokens`; greedy unless `do_sample`."""

    group_size: int = 1
    max_new_tokens: int = 64
    do_sample: bool = True
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: no top-k truncation


class RolloutEngine(Protocol):
    """Samples completions of prompts with the policy's current weights."""

    def generate(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: Tokens, decoding: Decoding) -> Generated:
        """K continuations of each of the B prompts ([B, P] -> [B*K, T]; rows b*K..b*K+K-1 continue prompt b)."""

    def sync(self, model: PreTrainedModel) -> None:
        """Take `model`'s current weights (after an optimiser step)."""

    def close(self) -> None:
        """Free what the engine holds."""


ENGINES = {  # rollout.engine -> the class behind it (imported when chosen: vLLM is an optional install)
    "builtin": "grpokd.models.engines.builtin:Builtin",
    "vllm": "grpokd.models.engines.vllm:VLLMEngine",
}


def engine_class(name: str) -> type:
    """The class behind `rollout.engine=name`. Each has `check(student, lora)`: a ConfigError, before any weights
    load, when it cannot sample that student."""
    if name not in ENGINES:
        raise ConfigError(f"rollout.engine={name}: no such engine; the engines are {', '.join(ENGINES)}")
    module, cls = ENGINES[name].split(":")
    return getattr(importlib.import_module(module), cls)


def build(name: str, **settings: Any) -> RolloutEngine:
    """The engine `rollout.engine=name`, with its settings (`rollout.<name>` in the config)."""
    try:
        return engine_class(name)(**settings)
    except TypeError as err:
        raise ConfigError(f"rollout.{name}: {err}") from None
