"""What LoRA and gradient checkpointing save: activations held for backward, trainable parameters, step time.

    python bench/lora.py [--layers 8] [--width 512] [--prompts 4] [--group 4] [--tokens 192] [--repeats 3] [--device cpu|cuda]

A randomly initialised Llama-style student (vocabulary 8000) scores `prompts` x
`group` completions of `tokens` tokens after 64-token prompts, through the
platform's own `completion_logits`, and backpropagates their mean NLL, for each
of: full fine-tuning or LoRA (r = 16, all linear layers), with or without
gradient checkpointing. "saved MB" sums the distinct storages autograd keeps
for the backward pass during the forward (with checkpointing, only the layer
inputs and what lies outside the layers, the logits among them); "grad+adam MB"
is 12 bytes (fp32 gradient and two Adam moments) per trainable parameter;
"step s" is the median forward + backward time over `repeats`.
"""

from __future__ import annotations

import argparse
import statistics
import time


def measure(checkpointing: bool, lora: bool, args: argparse.Namespace) -> dict[str, str]:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from grpokd.models.lm import Tokens, completion_logits, token_logp
    from grpokd.models.student import LoRA, add_lora, enable_checkpointing

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=8000, hidden_size=args.width, intermediate_size=args.width * 11 // 4,
                         num_hidden_layers=args.layers, num_attention_heads=8, num_key_value_heads=8)
    model = LlamaForCausalLM(config)
    if checkpointing:
        enable_checkpointing(model)
    if lora:
        model = add_lora(model, LoRA(r=16))
    model.to(args.device).train()
    n = args.prompts * args.group
    prompts = Tokens(torch.randint(1, 8000, (args.prompts, 64)), torch.ones(args.prompts, 64, dtype=torch.long)).to(args.device)
    completions = Tokens(torch.randint(1, 8000, (n, args.tokens)), torch.ones(n, args.tokens, dtype=torch.long)).to(args.device)
    storages: dict[int, int] = {}

    def keep(t: torch.Tensor) -> torch.Tensor:
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    times = []
    for _ in range(args.repeats + 1):  # the first is a warm-up
        model.zero_grad(set_to_none=True)
        storages.clear()
        start = time.perf_counter()
        with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
            logits = completion_logits(model, prompts, completions)  # [N, T, V]
        (-token_logp(logits, completions.ids).mean()).backward()
        if args.device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {
        "checkpointing": str(checkpointing).lower(), "lora": str(lora).lower(),
        "params M": f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}", "trainable M": f"{trainable / 1e6:.2f}",
        "saved MB": f"{sum(storages.values()) / 2**20:.0f}", "grad+adam MB": f"{trainable * 12 / 2**20:.0f}",
        "step s": f"{statistics.median(times[1:]):.1f}",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--group", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=192)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    print("| checkpointing | lora | params M | trainable M | saved MB | grad+adam MB | step s |")
    print("|---|---|---|---|---|---|---|")
    for lora in (False, True):
        for checkpointing in (False, True):
            row = measure(checkpointing, lora, args)
            print("| " + " | ".join(row.values()) + " |")


if __name__ == "__main__":
    main()
