"""The built-in engine: grpokd's own decoding loop (`lm.generate`) on the trained model itself."""

from __future__ import annotations

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from grpokd.errors import ConfigError
from grpokd.models.engines import Decoding, Generated
from grpokd.models.lm import Tokens, generate, inverse_cdf, multinomial

DRAWS = {"multinomial": multinomial, "inverse_cdf": inverse_cdf}


class Builtin:
    """Decodes with the model being trained (so there is nothing to sync), static KV cache where it can
    (`lm.generate`). It reports no log-probs: the trainer's own scoring is the behaviour policy's.

    Args:
        static_cache: decode into a preallocated KV cache (transformers >= 5, full-attention models).
        draw: how a token is drawn from its distribution: `multinomial`, transformers' own (the same tokens as
            transformers' `generate` under a seed), or `inverse_cdf`, the same distribution from one uniform per
            row (`lm.inverse_cdf`; faster at a large vocabulary, other samples under the same seed).
    """

    def __init__(self, static_cache: bool = True, draw: str = "multinomial") -> None:
        if draw not in DRAWS:
            raise ConfigError(f"rollout.builtin.draw={draw}: the draws are {', '.join(DRAWS)}")
        self.static_cache, self.draw = static_cache, DRAWS[draw]

    @staticmethod
    def check(student: str, lora: bool) -> None:
        """Any student: the decoder runs seq2seq and causal models, with or without LoRA."""

    def generate(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: Tokens, decoding: Decoding) -> Generated:
        tokens = generate(model, tokenizer, prompts, *decoding, static_cache=self.static_cache, draw=self.draw)
        return Generated(tokens, None)

    def sync(self, model: PreTrainedModel) -> None:
        pass

    def close(self) -> None:
        pass
