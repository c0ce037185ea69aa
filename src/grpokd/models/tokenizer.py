"""The embedded word-level tokenizer, built from the synthetic tasks' closed vocabulary.

Every token of the synthetic tasks is a space-separated word or a number
0..20, so a word-level vocabulary of about 80 entries covers them
exactly and keeps sequences short (a tiny model learns them in minutes).
Special tokens follow T5's layout (pad=0, eos=1, unk=2) plus a bos for the
decoder-only family. Anything outside the vocabulary maps to <unk>.
"""

from __future__ import annotations

from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from grpokd.data.arith import vocabulary

PAD, EOS, UNK, BOS = "<pad>", "</s>", "<unk>", "<s>"
SPECIALS = [PAD, EOS, UNK, BOS]


def build_tokenizer(family: str) -> PreTrainedTokenizerFast:
    """A word-level tokenizer for `family` "t5" (prompt + </s>) or "llama" (<s> + prompt, left padding)."""
    vocab = {tok: i for i, tok in enumerate(SPECIALS + vocabulary())}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    # No decoder: decoding joins tokens with single spaces, which round-trips the space-separated tasks
    # (a WordPiece decoder would glue "####" to the token before it).
    if family == "t5":
        core.post_processor = processors.TemplateProcessing(single=f"$A {EOS}", special_tokens=[(EOS, vocab[EOS])])
        padding_side = "right"
    elif family == "llama":
        core.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", special_tokens=[(BOS, vocab[BOS])])
        padding_side = "left"
    else:
        raise ValueError(f"unknown tokenizer family {family!r}; expected 't5' or 'llama'")
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token=PAD,
        eos_token=EOS,
        unk_token=UNK,
        bos_token=BOS,
        padding_side=padding_side,
        clean_up_tokenization_spaces=False,
    )
