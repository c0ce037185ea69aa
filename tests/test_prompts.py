"""Prompt layouts: plain (template, the tokenizer's special tokens) and chat (the tokenizer's chat template).

On the embedded word-level tokenizer, given a ChatML-style template of the
kind SmolLM2 and Qwen2.5 ship (the real SmolLM2 template is checked in
tests/test_smollm2.py).
"""

from __future__ import annotations

import warnings

import pytest

from grpokd.data import sources
from grpokd.data.datamodule import TaskData
from grpokd.data.prompts import PromptFormat, count_long, warn_long
from grpokd.errors import ConfigError
from grpokd.models import loading
from grpokd.models.lm import tokenize_prompts

CHATML = (
    "{% for m in messages %}{% if loop.first and m['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture
def tokenizer():
    tokenizer = loading.load_tokenizer("tiny-llama-student")
    assert not tokenizer.chat_template  # the embedded models read plain prompts
    return tokenizer


def test_chat_is_chosen_by_the_tokenizer_unless_the_dataset_says(tokenizer):
    assert PromptFormat().uses_chat(tokenizer, "m") is False
    with pytest.raises(ConfigError, match="dataset.chat=true but the tokenizer of model.student=m has no chat template"):
        PromptFormat(chat=True).uses_chat(tokenizer, "m")
    tokenizer.chat_template = CHATML
    assert PromptFormat().uses_chat(tokenizer, "m") is True
    assert PromptFormat(chat=False).uses_chat(tokenizer, "m") is False


@pytest.mark.parametrize("bad", [{"chat": "yes"}, {"system": ""}, {"instruction": 3}])
def test_bad_prompt_settings_are_refused(bad):
    with pytest.raises(ConfigError, match=f"dataset.{next(iter(bad))}="):
        PromptFormat(**bad)


def test_chat_render_is_the_templates_own_rendering(tokenizer):
    """The question, a blank line and the instruction are the user's message; the system message is the
    template's default unless one is given; the text ends where the assistant's answer starts."""
    tokenizer.chat_template = CHATML
    fmt = PromptFormat(instruction="End with '#### <number>'.")
    assert fmt.render(tokenizer, "what is 3 + 4 ?") == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nwhat is 3 + 4 ?\n\nEnd with '#### <number>'.<|im_end|>\n<|im_start|>assistant\n"
    )
    own = PromptFormat(system="Be brief.").render(tokenizer, "q")
    assert own == tokenizer.apply_chat_template(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "q"}], tokenize=False, add_generation_prompt=True
    )
    # dataset.instruction_in=system: the instruction is the system message, after the given one when there is one
    assert PromptFormat(instruction="End with ####.", instruction_in="system").render(tokenizer, "q") == (
        "<|im_start|>system\nEnd with ####.<|im_end|>\n<|im_start|>user\nq<|im_end|>\n<|im_start|>assistant\n"
    )
    assert PromptFormat(system="Be brief.", instruction="End with ####.", instruction_in="system").render(tokenizer, "q").startswith(
        "<|im_start|>system\nBe brief.\n\nEnd with ####.<|im_end|>\n<|im_start|>user\nq<|im_end|>"
    )


def test_render_prompts_renders_every_split_and_keeps_them_apart(tokenizer):
    tokenizer.chat_template = CHATML
    data = TaskData(sources.arith(train_size=300, test_size=20), prompts_per_step=4, val_size=10, test_size=20)
    before = [ex.prompt for ex in data.train_set + data.val_set + data.test_set]
    data.render_prompts(lambda ex: PromptFormat().render(tokenizer, ex.prompt))
    after = data.train_set + data.val_set + data.test_set
    assert [ex.prompt for ex in after] == [PromptFormat().render(tokenizer, p) for p in before]
    assert not {ex.prompt for ex in data.train_set} & {ex.prompt for ex in data.val_set + data.test_set}


def test_long_prompts_are_counted_as_tokenize_prompts_cuts_them(tokenizer):
    texts = ["what is 3 + 4 ?", "tom has 6 apples and eats 2 . how many are left ?"]
    lengths = [len(tokenizer(t)["input_ids"]) for t in texts]
    limit = min(lengths)
    assert count_long(tokenizer, texts, limit, special_tokens=True) == 1
    assert tokenize_prompts(tokenizer, texts, limit).ids.shape[1] == limit  # the same prompt is cut there, from the left
    assert count_long(tokenizer, texts, max(lengths), special_tokens=True) == 0


def test_one_warning_counts_the_long_prompts_of_every_split():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert warn_long({"train": (0, 100), "val": (0, 10)}, 64) is None
        message = warn_long({"train": (3, 100), "val": (0, 10), "test": (1, 20)}, 64)
    assert len(caught) == 1 and str(caught[0].message) == message
    assert message.startswith("4 of 130 prompts (train 3 of 100, test 1 of 20) are longer than rollout.sampling.max_prompt_len=64 tokens")


def test_a_run_warns_once_about_the_prompts_max_prompt_len_cuts(quick_cfg, tmp_path):
    """At start-up, with the student's tokenizer: every split's prompts are counted (arith prompts are 10-30 tokens)."""
    from grpokd.train import build_module, prepare

    cfg = quick_cfg("model=tiny_causal", "objective=grpo", "rollout.sampling.max_prompt_len=12")
    prep = prepare(cfg)
    with pytest.warns(UserWarning, match=r"prompts \(train \d+ of \d+, val \d+ of 16, test \d+ of 32\) are longer than rollout.sampling.max_prompt_len=12") as caught:
        module = build_module(cfg, prep, tmp_path / "run")
    assert len([w for w in caught if "max_prompt_len" in str(w.message)]) == 1
    assert module.sampling.prompt_special_tokens is True  # the embedded tokenizer has no chat template: plain prompts
