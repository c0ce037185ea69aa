"""How the student is prepared for training and exported: LoRA adapters (PEFT) and gradient checkpointing.

LoRA (Hu et al. 2021) freezes the student's weights W and trains a low-rank
update on the `target_modules`: W + (alpha / r) B A, with B zero at the start,
so the wrapped student is the loaded one until it trains. With its adapters
disabled it is therefore the frozen student as loaded: that is the reference of
the KL term when `model.reference` is the student, as in TRL's GRPOTrainer, so
no second copy is held (`adapters_off`).

Gradient checkpointing recomputes each layer's activations in the backward pass
instead of storing them: less memory for more compute, the same loss and
gradients. Checkpointed layers drop the KV cache, which generation reads, so
generation runs with checkpointing suspended (`checkpointing_off`).

peft is imported only when LoRA is on, so the base install works without it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from grpokd.errors import ConfigError, check_range

ALL_LINEAR = "all-linear"  # peft's shorthand: every linear layer but the output head


@dataclass(frozen=True)
class LoRA:
    """`model.lora`: the adapters' rank `r`, scale `alpha` / r, dropout, target modules, and how the run exports them."""

    r: int
    alpha: float = 32.0
    dropout: float = 0.0
    target_modules: str | tuple[str, ...] = ALL_LINEAR  # "all-linear" or module names, e.g. (q_proj, v_proj)
    merge_on_export: bool = True  # <run_dir>/student/: the merged plain model (true) or the adapter alone (false)

    def __post_init__(self) -> None:
        check_range("model.lora.r", self.r, low=0, low_open=True, integer=True)
        check_range("model.lora.alpha", self.alpha, low=0, low_open=True)
        check_range("model.lora.dropout", self.dropout, low=0, high=1, high_open=True)
        names = self.target_modules
        if names != ALL_LINEAR and not (
            isinstance(names, (list, tuple)) and names and all(isinstance(n, str) and n for n in names)
        ):
            raise ConfigError(f"model.lora.target_modules={names!r} must be {ALL_LINEAR!r} or a non-empty list of module names")
        if not isinstance(self.merge_on_export, bool):
            raise ConfigError(f"model.lora.merge_on_export={self.merge_on_export!r} must be true or false")


def lora_config(node: Any) -> LoRA | None:
    """The checked `model.lora` settings (a plain dict); None (full fine-tuning) when the node or its `r` is null.

    Fails at start-up with the install command when peft is missing.
    """
    if node is None:
        return None
    if not isinstance(node, dict):
        raise ConfigError(f"model.lora={node!r} must be a node (r, alpha, dropout, target_modules, merge_on_export) or null")
    if node.get("r") is None:
        return None
    unknown = sorted(set(node) - set(LoRA.__dataclass_fields__))
    if unknown:
        raise ConfigError(f"model.lora.{unknown[0]}: unknown key; allowed: {', '.join(LoRA.__dataclass_fields__)}")
    names = node.get("target_modules", ALL_LINEAR)
    lora = LoRA(**{**node, "target_modules": tuple(names) if isinstance(names, list) else names})
    import_peft()
    return lora


def import_peft() -> Any:
    """The peft package, or a ConfigError saying how to install it."""
    try:
        import peft
    except ImportError:
        raise ConfigError('model.lora needs the peft package: pip install -e ".[lora]" (or pip install peft)') from None
    return peft


def add_lora(model: PreTrainedModel, lora: LoRA) -> PreTrainedModel:
    """`model` wrapped in a PeftModel: its own weights frozen, only the new adapters trainable."""
    peft = import_peft()
    task = peft.TaskType.SEQ_2_SEQ_LM if model.config.is_encoder_decoder else peft.TaskType.CAUSAL_LM
    names = lora.target_modules if lora.target_modules == ALL_LINEAR else list(lora.target_modules)
    config = peft.LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=names, task_type=task)
    try:
        return peft.get_peft_model(model, config)
    except ValueError as err:  # e.g. a target module name the model does not have
        raise ConfigError(f"model.lora: {err}".splitlines()[0]) from None


def enable_checkpointing(model: PreTrainedModel) -> None:
    """Gradient checkpointing, non-reentrant (it needs no inputs that require grad, so frozen embeddings are fine)."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x's name; the old one warns there
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def checkpointed_layers(model: PreTrainedModel) -> list[torch.nn.Module]:
    """The modules with gradient checkpointing on (empty when it is off)."""
    return [m for m in model.modules() if getattr(m, "gradient_checkpointing", False) is True]


@contextlib.contextmanager
def checkpointing_off(model: PreTrainedModel) -> Iterator[None]:
    """Suspend gradient checkpointing inside: generation needs the KV cache that checkpointed layers drop."""
    layers = checkpointed_layers(model)
    for layer in layers:
        layer.gradient_checkpointing = False
    try:
        yield
    finally:
        for layer in layers:
            layer.gradient_checkpointing = True


@contextlib.contextmanager
def adapters_off(model: PreTrainedModel) -> Iterator[PreTrainedModel]:
    """The LoRA-wrapped `model` as its base model: adapters disabled and in eval mode, as a separately loaded frozen copy."""
    was_training = model.training
    model.eval()
    try:
        with model.disable_adapter():
            yield model
    finally:
        model.train(was_training)


def save_student(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, directory: Path, lora: LoRA | None, state_dict: dict | None = None,
) -> None:
    """Save the trained student and its tokenizer to `directory`.

    Without LoRA: the model. With LoRA and `merge_on_export`: the adapters merged
    into the base weights, a plain Hugging Face model (merged in place: export is
    the run's last use of the student). Otherwise the adapter alone
    (adapter_config.json and its weights), to load with peft over the base model.
    `state_dict`: the full model's weights when the module's own are sharded (FSDP, no LoRA); None: the model's.
    """
    if lora is not None and lora.merge_on_export:
        model = model.merge_and_unload()
    model.save_pretrained(directory, state_dict=state_dict)
    tokenizer.save_pretrained(directory)
