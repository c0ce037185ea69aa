"""Aligning one completion under two tokenizers (`grpokd.teachers.align`), on hand-built tokenizers whose every
token and span is written out here, and on SmolLM2's real one."""

from __future__ import annotations

import pytest
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from grpokd.errors import ConfigError
from grpokd.models.tokenizer import build_tokenizer
from grpokd.teachers.align import (
    Alignment,
    AlignmentError,
    align,
    check_pair,
    cuts,
    decoded_spans,
    encoded_spans,
    token_texts,
    vocabulary_map,
)


def byte_bpe(*merges: str) -> PreTrainedTokenizerFast:
    """A byte-level BPE over all 256 bytes plus `merges` ("a b" makes "ab"), as GPT-2-style tokenizers are."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    pairs = [tuple(m.split(" ")) for m in merges]
    vocab = {tok: i for i, tok in enumerate(["<eos>", *alphabet, *("".join(p) for p in pairs)])}
    core = Tokenizer(models.BPE(vocab=vocab, merges=pairs))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<eos>")


def spans_of(tokenizer, text: str) -> tuple[list[str], list[tuple[int, int]]]:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    decoded, spans = decoded_spans(tokenizer, ids)
    assert decoded == text
    return tokenizer.convert_ids_to_tokens(ids), spans


def test_decoded_spans_follow_the_text_and_give_a_split_character_to_the_token_that_completes_it():
    tokens, spans = spans_of(byte_bpe("a b", "c d"), "abcd é")
    assert tokens == ["ab", "cd", "Ġ", "Ã", "©"]  # é is two bytes, each its own token
    assert spans == [(0, 2), (2, 4), (4, 5), (5, 5), (5, 6)]
    words = build_tokenizer("llama")  # the embedded word-level tokenizer: decoding joins words with a space
    tokens, spans = spans_of(words, "3 + 4 = 7")
    assert tokens == ["3", "+", "4", "=", "7"] and spans == [(0, 1), (1, 3), (3, 5), (5, 7), (7, 9)]
    assert decoded_spans(words, []) == ("", [])


def test_encoded_spans_are_the_tokenizers_offsets_with_gaps_where_it_skips_text():
    ids, spans = encoded_spans(build_tokenizer("llama"), "3 + 4", "model.teachers[0]")
    assert len(ids) == 3 and spans == [(0, 1), (2, 3), (4, 5)]  # the spaces are in no token


def test_cuts_are_the_positions_no_span_straddles():
    assert cuts([(0, 2), (2, 4)], 4).tolist() == [True, False, True, False, True]
    assert cuts([(0, 1), (2, 3)], 3).tolist() == [True, True, True, True]  # a gap: every position in it is a cut
    assert cuts([(0, 2), (1, 2)], 2).tolist() == [True, False, True]  # two tokens over one character's bytes


def test_a_teacher_token_that_straddles_two_student_tokens_joins_them_in_one_chunk():
    # student ab|cd|x, teacher a|bc|d|x: "bc" straddles the student's cut at 2, so ab and cd form one chunk
    assert align([(0, 2), (2, 4), (4, 5)], [(0, 1), (1, 3), (3, 4), (4, 5)], 5) == Alignment([0, 0, 1], [0, 0, 0, 1], 2)
    # student a|b|cd, teacher ab|c|d: the student's a and b share the teacher's ab; cd is exactly c + d
    assert align([(0, 1), (1, 2), (2, 4)], [(0, 2), (2, 3), (3, 4)], 4) == Alignment([0, 0, 1], [0, 1, 1], 2)
    alignment = align([(0, 1), (1, 2), (2, 4)], [(0, 2), (2, 3), (3, 4)], 4)
    assert alignment.firsts() == [True, False, True]  # where the teacher's next-token view is the student's
    assert alignment.views() == [0, None, 1]  # the first teacher token of each chunk a student token starts
    assert alignment.ended() == Alignment([0, 0, 1, 2], [0, 1, 1, 2], 3) and alignment.ended().views() == [0, None, 1, 3]
    assert Alignment([0, 1], [0], 2).views() == [0, None]  # a chunk with no teacher token gives no view


def test_the_same_tokenizer_aligns_token_for_token():
    tokens, spans = spans_of(byte_bpe("a b", "Ġ a"), "ab a ab")
    ids, offsets = encoded_spans(byte_bpe("a b", "Ġ a"), "ab a ab", "t")
    assert align(spans, offsets, 7) == Alignment(list(range(len(tokens))), list(range(len(ids))), len(tokens))


def test_text_the_teacher_skips_costs_it_nothing_and_words_align_across_the_gaps():
    # student (byte level): "3", " +", " 4"; teacher (word level): "3", "+", "4" with the spaces in no token
    _, student = spans_of(byte_bpe("Ġ +", "Ġ 4"), "3 + 4")
    _, teacher = encoded_spans(build_tokenizer("llama"), "3 + 4", "t")
    assert student == [(0, 1), (1, 3), (3, 5)]
    assert align(student, teacher, 5) == Alignment([0, 1, 2], [0, 1, 2], 3)
    # a student space on its own: a chunk no teacher token is in
    _, student = spans_of(byte_bpe(), "3 +")
    assert align(student, teacher[:2], 3) == Alignment([0, 1, 2], [0, 2], 3)


def test_split_characters_and_emoji_align_as_whole_characters():
    student_tok, teacher_tok = byte_bpe("a b", "c d"), byte_bpe("b c")
    ids = student_tok("abcd é😀 x", add_special_tokens=False)["input_ids"]
    text, student = decoded_spans(student_tok, ids)
    _, teacher = encoded_spans(teacher_tok, text, "t")
    # chunks: ab cd | space | é (2 bytes) | 😀 (4 bytes) | space | x
    assert align(student, teacher, len(text)) == Alignment([0, 0, 1, 2, 2, 3, 3, 3, 3, 4, 5], [0, 0, 0, 1, 2, 2, 3, 3, 3, 3, 4, 5], 6)


def sentencepiece_byte_fallback() -> PreTrainedTokenizerFast:
    """A SentencePiece-style BPE as Llama 2's and Gemma's are: "▁" for a space, and a character it lacks as its
    UTF-8 bytes, one <0xNN> token each (byte fallback)."""
    pieces = ["▁", "a", "b", "x", "ab"]
    vocab = {tok: i for i, tok in enumerate(["<unk>", "</s>", *(f"<0x{b:02X}>" for b in range(256)), *pieces])}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[("a", "b")], byte_fallback=True, unk_token="<unk>", fuse_unk=True))
    core.normalizer = normalizers.Replace(" ", "▁")
    core.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    return PreTrainedTokenizerFast(tokenizer_object=core, eos_token="</s>", unk_token="<unk>")


def test_byte_fallback_tokens_align_as_the_whole_character_either_way_round():
    spm, byte_level = sentencepiece_byte_fallback(), byte_bpe("a b")
    text = "ab é x😀"
    ids = spm(text, add_special_tokens=False)["input_ids"]
    assert spm.convert_ids_to_tokens(ids) == ["ab", "▁", "<0xC3>", "<0xA9>", "▁", "x", "<0xF0>", "<0x9F>", "<0x98>", "<0x80>"]
    # chunks: ab | space | é (2 bytes on each side) | space | x | 😀 (4 bytes on each side)
    expected = Alignment([0, 1, 2, 2, 3, 4, 5, 5, 5, 5], [0, 1, 2, 2, 3, 4, 5, 5, 5, 5], 6)
    decoded, student = decoded_spans(byte_level, byte_level(text, add_special_tokens=False)["input_ids"])
    assert decoded == text and align(student, encoded_spans(spm, text, "t")[1], len(text)) == expected  # SentencePiece teacher
    decoded, student = decoded_spans(spm, ids)
    assert decoded == text and align(student, encoded_spans(byte_level, text, "t")[1], len(text)) == expected  # SentencePiece student
    mapped = vocabulary_map(byte_level, spm)
    assert [int(mapped[i]) >= 0 for i in spm.convert_tokens_to_ids(["▁", "ab", "<0xC3>", "<0x78>", "</s>"])] == [True, True, False, True, False]
    # a byte that is not a whole character has no text of its own; one that is (0x78, "x") reads as it


def test_an_empty_completion_has_no_chunks():
    assert align([], [], 0) == Alignment([], [], 0)


def test_a_tokenizer_without_offsets_is_refused_with_its_role():
    from transformers import PreTrainedTokenizer

    class Slow(PreTrainedTokenizer):
        is_fast = False

    with pytest.raises(ConfigError, match=r"^model.teachers\[1\]: its tokenizer has no offsets"):
        encoded_spans(Slow.__new__(Slow), "text", "model.teachers[1]")


def test_token_texts_read_a_leading_space_alike_across_tokenizer_kinds():
    texts = token_texts(byte_bpe("Ġ a", "a b"))
    vocab = byte_bpe("Ġ a", "a b").get_vocab()
    assert texts[vocab["Ġa"]] == " a" and texts[vocab["ab"]] == "ab" and texts[vocab["<eos>"]] is None
    assert texts[vocab["Ã"]] is None  # the first byte of a two-byte character: not a whole character
    words = build_tokenizer("llama")  # word level: a word after other text reads with its space
    assert token_texts(words)[words.get_vocab()["+"]] == " +"


def test_the_vocabulary_map_pairs_tokens_of_the_same_text_and_marks_the_rest():
    student, teacher = byte_bpe("Ġ a", "a b"), byte_bpe("a b", "Ġ b")
    mapped = vocabulary_map(student, teacher)
    s, t = student.get_vocab(), teacher.get_vocab()
    assert mapped[t["ab"]] == s["ab"] and mapped[t["x"]] == s["x"]  # the same text, whatever their ids
    assert mapped[t["Ġb"]] == -1 and mapped[t["<eos>"]] == -1  # " b" is no student token; special tokens map to none
    assert mapped.shape == (len(teacher),)


def test_a_student_tokenizer_that_rewrites_earlier_text_cannot_be_aligned_and_stops_with_one_line():
    class Rewriting(PreTrainedTokenizerFast):
        """Decodes as its base does, then upper-cases the text when it is longer than 3 characters."""

        def batch_decode(self, sequences, **kwargs):
            return [t.upper() if len(t) > 3 else t for t in super().batch_decode(sequences, **kwargs)]

    base = byte_bpe()
    student = Rewriting(tokenizer_object=base.backend_tokenizer, eos_token="<eos>")
    with pytest.raises(AlignmentError, match="does not start the completion's text"):
        decoded_spans(student, student("abcd", add_special_tokens=False)["input_ids"])
    with pytest.raises(ConfigError, match=r"^model.teachers\[0\] has its own tokenizer, and the student's completions cannot be aligned"):
        check_pair(student, byte_bpe("a b"), ["abcd"], "model.teachers[0]")
    check_pair(base, byte_bpe("a b"), ["abcd é"], "model.teachers[0]")


def test_a_teacher_whose_tokenizer_changes_the_text_stops_with_one_line():
    """A normaliser that lower-cases, or a word it reads as <unk>: it would score another text than the student's.
    Whitespace it skips is no change (the word-level tokenizer reads "3  +\n4" as "3 + 4")."""
    lower = byte_bpe("a b")
    lower.backend_tokenizer.normalizer = normalizers.Lowercase()
    with pytest.raises(ConfigError, match=r"^model.teachers\[0\] has its own tokenizer, and it does not read the student's text as it is: 'Abcd' reads back as 'abcd'$"):
        check_pair(byte_bpe(), lower, ["Abcd"], "model.teachers[0]")
    with pytest.raises(ConfigError, match="reads back as '3 <unk> 4'"):
        check_pair(byte_bpe(), build_tokenizer("llama"), ["3 plus 4"], "model.teachers[1]")
    check_pair(byte_bpe(), build_tokenizer("llama"), ["3  +\n4"], "model.teachers[1]")
