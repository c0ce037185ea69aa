"""The built-in engine: grpokd's own decoding loop (`lm.generate`) on the trained model itself."""

from __future__ import annotations

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from grpokd.models.engines import Decoding, Generated
from grpokd.models.lm import Tokens, generate


class Builtin:
    """Decodes with the model being trained (so there is nothing to sync), static KV cache where it can
    (`lm.generate`). It reports no log-probs: the trainer's own scoring is the behaviour policy's."""

    def __init__(self, static_cache: bool = True) -> None:
        self.static_cache = static_cache

    @staticmethod
    def check(student: str, lora: bool) -> None:
        """Any student: the decoder runs seq2seq and causal models, with or without LoRA."""

    def generate(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: Tokens, decoding: Decoding) -> Generated:
        tokens = generate(model, tokenizer, prompts, *decoding, static_cache=self.static_cache)
        return Generated(tokens, None)

    def sync(self, model: PreTrainedModel) -> None:
        pass

    def close(self) -> None:
        pass
