"""The embedded tokenizers, built from the synthetic tasks' closed vocabulary.

Every token of the synthetic tasks is a space-separated word or a number
0..20, so a word-level vocabulary of about 80 entries covers them
exactly and keeps sequences short (a tiny model learns them in minutes).
Special tokens follow T5's layout (pad=0, eos=1, unk=2) plus a bos for the
decoder-only family. Anything outside the vocabulary maps to <unk>.

The second kind, "subword", is the tokenizer of the embedded teacher that does
not share the student's (docs/testbed.md): numbers go digit by digit, as
Llama 3's and Qwen2.5's tokenizers take them ("16" is "1" then a continuing
"6"), words stay whole, and its ids differ from the word-level ones (its
special tokens come last), so nothing but the text is shared.
"""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from grpokd.data.arith import vocabulary

PAD, EOS, UNK, BOS = "<pad>", "</s>", "<unk>", "<s>"
SPECIALS = [PAD, EOS, UNK, BOS]
KINDS = ("words", "subword")
CONTINUES = "~~"  # the subword kind's mark of a piece that continues a word (WordPiece's "##" would take "####" for one)


def build_tokenizer(family: str, kind: str = "words") -> PreTrainedTokenizerFast:
    """An embedded tokenizer of `kind` ("words" or "subword", see the module's docstring) for `family` "t5"
    (prompt + </s>) or "llama" (<s> + prompt, left padding)."""
    if kind == "words":
        vocab = {tok: i for i, tok in enumerate(SPECIALS + vocabulary())}
        core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
        # No decoder: decoding joins tokens with single spaces, which round-trips the space-separated tasks
        # (a WordPiece decoder would glue "####" to the token before it).
    elif kind == "subword":
        digits = [str(d) for d in range(10)]
        words = [w for w in vocabulary() if not w.isdigit()]
        vocab = {tok: i for i, tok in enumerate(digits + [CONTINUES + d for d in digits] + words + SPECIALS)}
        core = Tokenizer(models.WordPiece(vocab=vocab, unk_token=UNK, continuing_subword_prefix=CONTINUES, max_input_chars_per_word=100))
        core.decoder = decoders.WordPiece(prefix=CONTINUES, cleanup=False)
    else:
        raise ValueError(f"unknown tokenizer kind {kind!r}; expected one of {', '.join(KINDS)}")
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
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
