"""Does a tokenizer fit a dataset? Checked at start-up, before any model is scored.

The word-level tokenizer built for the synthetic tasks turns 79% of GSM8K's
tokens into `<unk>` and cannot write 656 of 1000 of its gold solutions
("1,234"); training on that "works" and reports garbage. Two measures on a sample of the
dataset: the share of unknown tokens in prompts and solutions, and the share
of gold solutions that no longer earn the reward once encoded and decoded
(what the model could write is what the tokenizer can decode).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

from grpokd.data.example import Example
from grpokd.data.rewards import for_component
from grpokd.errors import ConfigError

MAX_UNK_SHARE = 0.05  # embedded tokenizer on GSM8K: 0.79; a real tokenizer: ~0 (T5 maps a few symbols, e.g. "{", to <unk>)
MAX_UNWRITABLE_SHARE = 0.02  # embedded tokenizer on GSM8K: 656 of 1000 (first 500 train + 500 test)


@dataclass(frozen=True)
class Coverage:
    unk_share: float  # unknown tokens / all tokens of the sampled prompts and solutions
    unwritable: int  # gold solutions that lose their reward through encode -> decode
    examples: int


def measure(tokenizer: PreTrainedTokenizerBase, examples: Sequence[Example], reward: Callable[[str, str], float]) -> Coverage:
    """Coverage of `examples` by `tokenizer`; `reward(completion, answer)` is the dataset's correctness reward."""
    texts = [ex.prompt for ex in examples] + [ex.solution for ex in examples]
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    unk = tokenizer.unk_token_id
    total = sum(len(row) for row in ids)
    unknown = sum(row.count(unk) for row in ids) if unk is not None else 0
    solutions = ids[len(examples) :]
    unwritable = sum(
        for_component(reward, ex.component)(tokenizer.decode(row, skip_special_tokens=True), ex.answer) < 1.0 for row, ex in zip(solutions, examples)
    )
    return Coverage(unknown / max(total, 1), unwritable, len(examples))


def check(coverage: Coverage, dataset: str, model: str) -> None:
    """ConfigError naming the dataset, the model and the shares when the tokenizer does not fit."""
    if coverage.unk_share <= MAX_UNK_SHARE and coverage.unwritable <= MAX_UNWRITABLE_SHARE * coverage.examples:
        return
    raise ConfigError(
        f"dataset {dataset}: the tokenizer of model.student={model} does not cover it "
        f"({coverage.unk_share:.0%} of tokens unknown, {coverage.unwritable} of {coverage.examples} gold solutions "
        f"cannot be written); use a model whose tokenizer does (e.g. model=flan_t5 or model=qwen), "
        f"or check_tokenizer=false to train anyway"
    )
