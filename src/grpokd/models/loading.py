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
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from grpokd.errors import ConfigError
from grpokd.hub import hub_reachable
from grpokd.models import zoo

DTYPES = {None: None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve(name: str, role: str = "model") -> tuple[str, bool]:
    """(where to load `name` from, whether only local files may be used). `role` names the config key in errors."""
    if name in zoo.ZOO:
        return str(zoo.ensure(name)), True
    path = Path(name).expanduser()
    if path.is_dir():
        return str(path), True
    if name.startswith((".", "/", "~")) or path.suffix or name.count("/") > 1:
        raise ConfigError(f"{role}: local path {name!r} does not exist; pass an existing Hugging Face model directory or a hub id")
    if hub_reachable():
        return name, False
    return name, True  # offline: only the local Hugging Face cache can help


def _offline_error(name: str, role: str, err: Exception) -> ConfigError:
    return ConfigError(
        f"{role}: cannot load {name!r}: not a local directory, not in the Hugging Face cache, and the hub is unreachable "
        f"({type(err).__name__}). Download it where the hub is reachable (hf download {name} --local-dir DIR) and pass {role}=DIR"
    )


def load_tokenizer(name: str, role: str = "model") -> PreTrainedTokenizerBase:
    """The tokenizer of `name`, with a pad token (EOS when the model has none)."""
    where, local_only = resolve(name, role)
    try:
        tokenizer = AutoTokenizer.from_pretrained(where, local_files_only=local_only)
    except (OSError, ValueError) as err:
        if local_only and not Path(where).is_dir():
            raise _offline_error(name, role, err) from err
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
        if local_only and not Path(where).is_dir():
            raise _offline_error(name, role, err) from err
        raise ConfigError(f"{role}: cannot load a model from {name!r}: {err}".splitlines()[0]) from err
    return model.eval()
