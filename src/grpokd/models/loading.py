"""Load students, references and teachers: embedded names, local directories or hub ids.

A name is resolved in this order: an embedded zoo name (built on first use),
an existing local directory, a hub id. Something that looks like a path but
does not exist, or a hub id while the hub is unreachable and the model is not
in the local Hugging Face cache, fails at once with a `ConfigError` saying
how to point at a local copy.
"""

from __future__ import annotations

from pathlib import Path

import torch
from huggingface_hub import try_to_load_from_cache
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from grpokd.errors import ConfigError
from grpokd.hub import hub_reachable
from grpokd.models import zoo

# The files of which a model directory needs one for AutoTokenizer to load its tokenizer (not an empty default).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "spiece.model", "vocab.json", "vocab.txt")
DTYPES = {None: None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def check_name(name: str, role: str = "model") -> None:
    """Fail now, with the fix, if `name` cannot be loaded: a missing path, or a hub id offline and not cached.

    Embedded names are not built here (that is `resolve`'s job), so every
    model named in a config can be checked in seconds before anything trains.
    """
    if not isinstance(name, str) or not name:
        raise ConfigError(f"{role}: expected a model name (embedded name, local directory or hub id), got {name!r}")
    if name in zoo.ZOO or Path(name).expanduser().is_dir():
        return
    if _looks_local(name):
        raise ConfigError(
            f"{role}: local path {name!r} does not exist (resolved to {Path(name).expanduser().absolute()}); "
            f"pass an existing Hugging Face model directory, a hub id or an embedded name ({', '.join(zoo.ZOO)})"
        )
    if not hub_reachable() and try_to_load_from_cache(name, "config.json") is None:
        raise _offline_error(name, role)


def _looks_local(name: str) -> bool:
    """A path rather than a hub id "org/model": absolute, ./ or ~, more than one "/", or its first part is a local dir."""
    first = name.split("/")[0]
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or ("/" in name and Path(first).is_dir())


def resolve(name: str, role: str = "model") -> tuple[str, bool]:
    """(where to load `name` from, whether only local files may be used), building embedded models on first use."""
    check_name(name, role)
    if name in zoo.ZOO:
        return str(zoo.ensure(name)), True
    path = Path(name).expanduser()
    if path.is_dir():
        return str(path), True
    return name, not hub_reachable()  # offline: only the local Hugging Face cache can help


def _offline_error(name: str, role: str) -> ConfigError:
    return ConfigError(
        f"{role}: cannot load {name!r}: not a local directory, not in the Hugging Face cache, and the hub is unreachable. "
        f"Download it where the hub is reachable (hf download {name} --local-dir DIR) and pass {role}=DIR"
    )


def load_tokenizer(name: str, role: str = "model") -> PreTrainedTokenizerBase:
    """The tokenizer of `name`, with a pad token (EOS when the model has none)."""
    where, local_only = resolve(name, role)
    if Path(where).is_dir() and not any((Path(where) / f).is_file() for f in TOKENIZER_FILES):
        raise ConfigError(
            f"{role}: {name} has no tokenizer ({', '.join(TOKENIZER_FILES)}); save it beside the weights "
            f"(tokenizer.save_pretrained('{name}')) or pass the directory it came from"
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(where, local_files_only=local_only)
    except (OSError, ValueError) as err:
        raise ConfigError(f"{role}: cannot load a tokenizer from {name!r}: {err}".splitlines()[0]) from err
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(name: str, role: str = "model", dtype: str | None = None) -> PreTrainedModel:
    """A seq2seq or causal LM from `name` (the kind is read from its config), in eval mode."""
    if dtype not in DTYPES:
        raise ConfigError(f"{role}.dtype: unknown dtype {dtype!r}; allowed: {', '.join(str(k) for k in DTYPES)}")
    where, local_only = resolve(name, role)
    try:
        config = AutoConfig.from_pretrained(where, local_files_only=local_only)
        auto = AutoModelForSeq2SeqLM if config.is_encoder_decoder else AutoModelForCausalLM
        model = auto.from_pretrained(where, local_files_only=local_only, dtype=DTYPES[dtype])
    except (OSError, ValueError) as err:
        raise ConfigError(f"{role}: cannot load a model from {name!r}: {err}".splitlines()[0]) from err
    return model.eval()


def check_same_tokenizer(tokenizer: PreTrainedTokenizerBase, other: PreTrainedTokenizerBase, name: str, other_name: str) -> None:
    """Models scored on one token sequence must share a vocabulary (padded embedding rows aside)."""
    if tokenizer.get_vocab() != other.get_vocab():
        raise ConfigError(
            f"{other_name} does not share the student's tokenizer ({name}: {len(tokenizer)} tokens, "
            f"{other_name}: {len(other)} tokens); pick models of one family"
        )


def is_encoder_decoder(name: str, role: str = "model") -> bool:
    """Whether `name` is a seq2seq model (T5) rather than a causal one, from its config alone."""
    where, local_only = resolve(name, role)
    try:
        return bool(AutoConfig.from_pretrained(where, local_files_only=local_only).is_encoder_decoder)
    except (OSError, ValueError) as err:
        raise ConfigError(f"{role}: cannot read the config of {name!r}: {err}".splitlines()[0]) from err


def check_same_family(student: str, other: str, role: str) -> None:
    """Every model scores the same token layout (seq2seq: prompt to encoder; causal: prompt + completion), so one family."""
    kinds = {True: "seq2seq", False: "causal"}
    mine, theirs = is_encoder_decoder(student, "model.student"), is_encoder_decoder(other, role)
    if mine != theirs:
        raise ConfigError(
            f"{role}={other} is a {kinds[theirs]} model and model.student={student} a {kinds[mine]} one; "
            f"teachers and reference are scored in the student's layout, so pick models of the student's family"
        )
