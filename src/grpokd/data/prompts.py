"""How a dataset's question becomes the prompt text that every model of a run scores.

Two layouts, chosen per run by `dataset.chat` (null: chat when the student's
tokenizer has a chat template, as instruct models' do):

- plain: `dataset.prompt_template` with the question in it ("{prompt}" by
  default), tokenized with the tokenizer's own special tokens (T5's closing
  `</s>`, a BOS). The embedded models and base models read this.
- chat: the template's text, followed after a blank line by the dataset's
  `instruction` (GSM8K: reason step by step and end with "#### <number>"), as
  the user's message, after an optional `system` message (or the instruction
  as the system message, `dataset.instruction_in=system`), rendered by the
  tokenizer's `apply_chat_template(..., add_generation_prompt=True)`, as TRL's
  conversational datasets and verl's GSM8K recipe do. The rendered text holds
  its special tokens, so it is tokenized without adding any.

The rendered prompt is the one string the student samples from and the
reference and every teacher of its tokenizer score; a teacher with its own
tokenizer renders the question in its own layout (`teachers.cross`).
Without the chat template and an answer-format instruction, an instruct model
answers a bare question with an empty string or unrelated text (measured with
SmolLM2-135M-Instruct on GSM8K).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

from grpokd.errors import ConfigError

INSTRUCTION_IN = ("user", "system")  # where dataset.instruction sits in the chat layout


@dataclass(frozen=True)
class PromptFormat:
    """`dataset.chat`, `dataset.system` and `dataset.instruction`: how questions are shown to an instruct model."""

    chat: bool | None = None  # None: chat when the tokenizer has a chat template
    system: str | None = None  # None: the chat template's own default (SmolLM2's names itself; Qwen2.5's too)
    instruction: str | None = None  # appended to the user's message in chat layout
    instruction_in: str = "user"  # or "system": the instruction is the system message (after `system`, when given)

    def __post_init__(self) -> None:
        if self.chat not in (None, True, False):
            raise ConfigError(f"dataset.chat={self.chat!r} must be true, false or null (chat when the tokenizer has a template)")
        if self.instruction_in not in INSTRUCTION_IN:
            raise ConfigError(f"dataset.instruction_in={self.instruction_in!r} is not one of {', '.join(INSTRUCTION_IN)}")
        for key in ("system", "instruction"):
            value = getattr(self, key)
            if value is not None and not (isinstance(value, str) and value.strip()):
                raise ConfigError(f"dataset.{key}={value!r} must be a non-empty string or null")

    def uses_chat(self, tokenizer: PreTrainedTokenizerBase, model: str) -> bool:
        """Whether prompts are rendered by the chat template; `chat=true` without one is a ConfigError naming `model`."""
        has_template = bool(getattr(tokenizer, "chat_template", None))
        if self.chat and not has_template:
            raise ConfigError(f"dataset.chat=true but the tokenizer of model.student={model} has no chat template; set dataset.chat=false")
        return has_template if self.chat is None else bool(self.chat)

    def render(self, tokenizer: PreTrainedTokenizerBase, question: str) -> str:
        """The chat-rendered prompt of one templated question, ending where the assistant's answer starts."""
        system, user = self.system, question
        if self.instruction is not None and self.instruction_in == "system":
            system = self.instruction if system is None else f"{system}\n\n{self.instruction}"
        elif self.instruction is not None:
            user = f"{question}\n\n{self.instruction}"
        messages = ([{"role": "system", "content": system}] if system is not None else []) + [{"role": "user", "content": user}]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def count_long(tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], max_len: int, special_tokens: bool) -> int:
    """How many of `texts` tokenize to more than `max_len` tokens (as `lm.tokenize_prompts` tokenizes them)."""
    lengths = tokenizer(list(texts), add_special_tokens=special_tokens, return_length=True)["length"]
    return sum(n > max_len for n in lengths)


def warn_long(counts: dict[str, tuple[int, int]], max_len: int) -> str | None:
    """One warning for the prompts longer than `max_len` (split -> (too long, all)); returns its text, None if none."""
    long = {split: n for split, (n, _) in counts.items() if n}
    if not long:
        return None
    total = sum(all_ for _, all_ in counts.values())
    detail = ", ".join(f"{split} {n} of {counts[split][1]}" for split, n in long.items())
    message = (
        f"{sum(long.values())} of {total} prompts ({detail}) are longer than rollout.sampling.max_prompt_len={max_len} tokens; "
        f"they are left-truncated (keeping the question's end) in training and evaluation alike. Raise rollout.sampling.max_prompt_len to keep them whole"
    )
    warnings.warn(message, stacklevel=2)
    return message
