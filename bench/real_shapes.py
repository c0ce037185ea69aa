"""Peak memory and step time of each objective at the shapes real users train: Flan-T5 and Qwen2.5-0.5B.

    python bench/real_shapes.py [--family t5|qwen] [--objectives grpo,j1,j2,j3,kdrl,tgpo] [--prompts 2] [--group 4]
                                [--tokens 64] [--teachers 1] [--chunk 0] [--vary none|N|T|V|M|chunk] [--repeats 2]
                                [--device cpu|cuda] [--dtype float32|bfloat16]

Models are randomly initialised from the real configurations (their config.json
values, written below: no hub here): `t5` is a Flan-T5-small student (77M,
vocabulary 32,128) with Flan-T5-base teachers (248M each); `qwen` is a
Qwen2.5-0.5B-shaped student (494M, vocabulary 151,936, tied embeddings) whose
teachers have the same shape. Prompts are the first GSM8K test questions from
../shared/data/gsm8k (or --gsm8k), split into words and punctuation, hashed into
the real vocabulary (a random model gives token identities no meaning) and
left-padded to `--prompt-len` P (96: GSM8K questions run 20-90 such pieces), so
that P stays fixed when N grows. Completions are `tokens` random ids per sequence, all
real (mask 1): the scoring and backward work does not depend on what was sampled,
and generation is not part of this measurement.

One step without Lightning, as `bench/teachers.py`: score (the student with grad,
the reference, the teachers) + objective + backward, each objective from its
conf/objective/*.yaml defaults. Every configuration runs in a fresh subprocess.
"peak MB" is the step's own peak over what was allocated before it (on CUDA
max_memory_allocated minus the allocation at the start of the step; on CPU the
process's peak RSS, reset through /proc/self/clear_refs, minus its RSS at the
start): the activations, logits and gradients the step adds to the weights.
"weights MB" are all the models' parameters. `--checkpointing` turns on the student's
gradient checkpointing (`model.gradient_checkpointing`). `--chunk C` sets `model.logit_chunk`
(every objective reads chunked logits). `--top-k K` sets `model.teacher_top_k`;
"teachers' MB" is what the teachers hand the KD terms (their mixtures, or their top-k signals), held from
scoring to the backward.
`--vary` repeats the run at 2x and 4x one dimension (N: prompts, T: tokens,
V: the student's vocabulary, M: teachers, chunk: 0 vs 256, top_k: V vs 64) and prints the
growth. `--vary N --fit-gb 80` then fits each objective's step peak as a + b*N
and prints the largest N that fits in 80 GiB beside the weights of the paper's
setting (Flan-T5-small student with Flan-T5-base and -large teachers; Qwen2.5
0.5B with a 1.5B teacher) and AdamW's two fp32 moments per student parameter.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OBJECTIVES = ("grpo", "j1", "j2", "j3", "kdrl", "tgpo")


def configs(family: str, vocab: int | None):
    """(student config, teacher config) with the real models' values; `vocab` overrides the vocabulary size."""
    from transformers import Qwen2Config, T5Config

    if family == "t5":
        common = dict(d_kv=64, feed_forward_proj="gated-gelu", tie_word_embeddings=False, relative_attention_num_buckets=32,
                      relative_attention_max_distance=128, dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0,
                      eos_token_id=1, vocab_size=vocab or 32128)
        small = T5Config(d_model=512, d_ff=1024, num_layers=8, num_decoder_layers=8, num_heads=6, **common)  # flan-t5-small
        base = T5Config(d_model=768, d_ff=2048, num_layers=12, num_decoder_layers=12, num_heads=12, **common)  # flan-t5-base
        return small, base
    qwen = Qwen2Config(  # Qwen2.5-0.5B
        vocab_size=vocab or 151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
        num_key_value_heads=2, max_position_embeddings=32768, rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=True,
        attention_dropout=0.0, pad_token_id=151643, eos_token_id=151643, bos_token_id=151643,
    )
    return qwen, qwen


def paper_teachers(family: str) -> list:
    """The teachers of the paper's setting (conf/model/flan_t5.yaml; conf/model/qwen.yaml's 1.5B for the causal family)."""
    from transformers import Qwen2Config, T5Config

    if family == "t5":
        common = dict(d_kv=64, feed_forward_proj="gated-gelu", tie_word_embeddings=False, vocab_size=32128, decoder_start_token_id=0)
        base = T5Config(d_model=768, d_ff=2048, num_layers=12, num_decoder_layers=12, num_heads=12, **common)  # flan-t5-base
        large = T5Config(d_model=1024, d_ff=2816, num_layers=24, num_decoder_layers=24, num_heads=16, **common)  # flan-t5-large
        return [base, large]
    return [Qwen2Config(  # Qwen2.5-1.5B
        vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
        num_key_value_heads=2, tie_word_embeddings=True,
    )]


def parameters(config, family: str) -> int:
    """The parameter count of a model of `config`, built on the meta device (no memory)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    with torch.device("meta"):
        model = (AutoModelForSeq2SeqLM if family == "t5" else AutoModelForCausalLM).from_config(config)
    return sum(p.numel() for p in model.parameters())


def fits(rows: list[dict], args: argparse.Namespace) -> None:
    """The largest N (at the measured T and P) whose step fits in `args.fit_gb` GiB, per objective, by a straight
    line through the measured step peaks against N, plus the paper setting's weights and the student's Adam state."""
    import numpy as np

    student_cfg, _ = configs(args.family, args.vocab)
    bytes_per = 2 if args.dtype == "bfloat16" else 4
    student = parameters(student_cfg, args.family)
    teachers = sum(parameters(c, args.family) for c in paper_teachers(args.family))
    budget = args.fit_gb * 2**30
    print(f"\nfits in {args.fit_gb} GiB: step peak = a + b*N fitted per objective; + weights ({args.dtype}: student, "
          f"reference if used, the paper's teachers) + AdamW state (2 fp32 moments per student parameter)")
    print("| objective | b (MB per sequence) | weights + Adam GB | largest N | N x T |")
    print("|---|---|---|---|---|")
    for name in dict.fromkeys(r["objective"] for r in rows):
        mine = [r for r in rows if r["objective"] == name]
        if len(mine) < 2:
            continue
        b, a = np.polyfit([r["N"] for r in mine], [r["peak_mb"] * 2**20 for r in mine], 1)
        loaded = student * (1 + mine[0]["reference"]) + (teachers if mine[0]["M"] else 0)
        static = loaded * bytes_per + 8 * student
        largest = int((budget - static - a) // b) if b > 0 else 0
        print(f"| {name} | {b / 2**20:.1f} | {static / 2**30:.1f} | {max(largest, 0)} | {max(largest, 0) * mine[0]['T']} |")


def hashed_prompts(path: Path, count: int, vocab: int, width: int):
    """The first `count` GSM8K test questions as [count, width] ids: words and punctuation hashed into 3..vocab-1,
    the question's last `width` pieces, left-padded to `width` (so P is the same whichever questions are taken)."""
    import torch

    from grpokd.models.lm import Tokens

    rows = [json.loads(line) for line in (path / "test.jsonl").read_text().splitlines()[:count]]
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, row in enumerate(rows):
        words = re.findall(r"\w+|[^\w\s]", row["question"])[-width:]
        hashed = [3 + int(hashlib.blake2s(w.encode(), digest_size=8).hexdigest(), 16) % (vocab - 3) for w in words]
        ids[i, width - len(words):] = torch.tensor(hashed)
        mask[i, width - len(words):] = 1
    return Tokens(ids, mask)


def objective_of(name: str):
    from hydra import compose, initialize_config_dir

    from grpokd.train import instantiate_group

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=[f"objective={name}", "run_dir=/tmp/unused"])
    return instantiate_group(cfg.objective, "objective")


def rss_bytes(field: str) -> int:
    """VmRSS or VmHWM (peak) of this process, from /proc/self/status."""
    line = next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith(field + ":"))
    return int(line.split()[1]) * 1024


def measure(objective_name: str, args: argparse.Namespace) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    from grpokd import rollout as ro
    from grpokd.models.lm import Tokens
    from grpokd.models.student import enable_checkpointing
    from grpokd.scoring import FrozenModels, ScoreRequest, score
    from grpokd.teachers import TeacherEnsemble, Uniform
    from grpokd.teachers.sources import in_process

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    student_cfg, teacher_cfg = configs(args.family, args.vocab)
    auto = AutoModelForSeq2SeqLM if args.family == "t5" else AutoModelForCausalLM
    build = lambda config: auto.from_config(config, torch_dtype=dtype).to(device)  # noqa: E731
    objective = objective_of(objective_name)
    needs = objective.needs
    chunk = args.chunk or None
    student = build(student_cfg).train()
    if args.checkpointing:
        enable_checkpointing(student)
    reference = build(student_cfg).requires_grad_(False).eval() if needs.reference else None
    teachers = [build(teacher_cfg).requires_grad_(False).eval() for _ in range(args.teachers)] if needs.teachers else []
    ensemble = TeacherEnsemble(in_process(teachers, [f"t{i}" for i in range(len(teachers))]), Uniform(), top_k=args.top_k or None) if teachers else None
    frozen = FrozenModels(reference, ensemble)
    vocab = student_cfg.vocab_size
    gsm8k = Path(args.gsm8k) if args.gsm8k else REPO.parent / "shared" / "data" / "gsm8k"
    prompts = hashed_prompts(gsm8k, args.prompts, vocab, args.prompt_len).to(device)  # [B, P]
    n = args.prompts * args.group
    gen = torch.Generator().manual_seed(1)
    completions = Tokens(torch.randint(3, vocab, (n, args.tokens), generator=gen), torch.ones(n, args.tokens, dtype=torch.long)).to(device)
    rewards = torch.randint(0, 2, (n,), generator=gen).float().to(device)  # [N]
    rollout = ro.Rollout(prompts, completions, [""] * n, ["0"] * n, rewards, args.group, torch.zeros(n, dtype=torch.bool, device=device))
    gold = ro.Rollout(prompts, Tokens(completions.ids[:: args.group], completions.mask[:: args.group]), [""] * args.prompts,
                      ["0"] * args.prompts, None, 1, torch.zeros(args.prompts, dtype=torch.bool, device=device))
    weights = sum(p.numel() * p.element_size() for m in [student, reference, *teachers] if m is not None for p in m.parameters())
    times, peaks, held = [], [], 0
    for _ in range(args.repeats):
        student.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            start_bytes = torch.cuda.memory_allocated()
        else:
            Path("/proc/self/clear_refs").write_text("5")  # reset the peak RSS (VmHWM) to the current RSS
            start_bytes = rss_bytes("VmRSS")
        start = time.perf_counter()
        with_gold = needs.gold(ensemble is not None and ensemble.weighting.needs_gold)
        request = ScoreRequest(rollout, needs, gold=gold if with_gold else None)
        batch, _, scores = score(student, request, frozen, vocab, chunk)
        held = tensor_bytes(scores.mixture)
        objective(batch).loss.backward()
        if device.type == "cuda":
            torch.cuda.synchronize()
            peaks.append(torch.cuda.max_memory_allocated() - start_bytes)
        else:
            peaks.append(rss_bytes("VmHWM") - start_bytes)
        times.append(time.perf_counter() - start)
        del batch
    return {
        "objective": objective_name, "N": n, "T": args.tokens, "P": prompts.ids.shape[1], "V": vocab, "M": len(teachers),
        "chunk": chunk or 0, "top_k": args.top_k, "reference": reference is not None, "step_s": statistics.median(times),
        "peak_mb": max(peaks) / 2**20, "teacher_mb": held / 2**20, "weights_mb": weights / 2**20,
    }


def tensor_bytes(value) -> int:
    """The bytes of every tensor in a (nested) tuple: what the teachers hand the KD terms, held until the backward."""
    import torch

    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    return sum(tensor_bytes(v) for v in value) if isinstance(value, tuple) else 0


def run_one(objective: str, args: argparse.Namespace, **override) -> dict:
    """`measure` in a fresh subprocess, with `override` replacing arguments."""
    argv = {**vars(args), **override}
    cmd = [sys.executable, __file__, "--one", objective]
    for key in ("family", "prompts", "group", "tokens", "teachers", "chunk", "top_k", "repeats", "device", "dtype", "prompt_len"):
        cmd += [f"--{key.replace('_', '-')}", str(argv[key])]
    cmd += ["--vocab", str(argv["vocab"])] if argv["vocab"] else []
    cmd += ["--checkpointing"] if argv["checkpointing"] else []
    cmd += ["--gsm8k", str(argv["gsm8k"])] if argv["gsm8k"] else []
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{objective} {override}: failed\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", default="t5", choices=["t5", "qwen"])
    parser.add_argument("--objectives", default=",".join(OBJECTIVES))
    parser.add_argument("--prompts", type=int, default=2)
    parser.add_argument("--group", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--prompt-len", type=int, default=96, help="P: every prompt is padded (or cut) to this many tokens")
    parser.add_argument("--teachers", type=int, default=1)
    parser.add_argument("--chunk", type=int, default=0, help="model.logit_chunk (0: off)")
    parser.add_argument("--top-k", type=int, default=0, help="model.teacher_top_k (0: the full vocabulary)")
    parser.add_argument("--checkpointing", action="store_true", help="model.gradient_checkpointing for the student")
    parser.add_argument("--vocab", type=int, default=0, help="the student's and teachers' vocabulary (0: the real one)")
    parser.add_argument("--vary", default="none", choices=["none", "N", "T", "V", "M", "chunk", "top_k"])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--gsm8k", default="", help="a directory with GSM8K's test.jsonl (default ../shared/data/gsm8k)")
    parser.add_argument("--fit-gb", type=float, default=0, help="with --vary N: the largest N that fits in this many GiB")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.one, args)))
        return
    steps = {"none": [{}], "N": [{"prompts": args.prompts * f} for f in (1, 2, 4)], "T": [{"tokens": args.tokens * f} for f in (1, 2, 4)],
             "V": [{"vocab": (args.vocab or configs(args.family, None)[0].vocab_size) // f} for f in (4, 2, 1)],
             "M": [{"teachers": m} for m in (1, 2, 4)], "chunk": [{"chunk": 0}, {"chunk": 256}],
             "top_k": [{"top_k": 0}, {"top_k": 64}]}[args.vary]
    print(f"family={args.family} device={args.device} dtype={args.dtype} checkpointing={args.checkpointing} repeats={args.repeats} (median step time, largest peak)")
    print("| objective | N | T | P | V | M | chunk | top-k | step s | peak MB | teachers' MB | weights MB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    rows = []
    for objective in args.objectives.split(","):
        for override in steps:
            r = run_one(objective, args, **override)
            rows.append(r)
            print(f"| {r['objective']} | {r['N']} | {r['T']} | {r['P']} | {r['V']} | {r['M']} | {r['chunk']} | {r['top_k'] or 'V'} | {r['step_s']:.2f} "
                  f"| {r['peak_mb']:.0f} | {r['teacher_mb']:.1f} | {r['weights_mb']:.0f} |", flush=True)
    if args.fit_gb and args.vary == "N":
        fits(rows, args)


if __name__ == "__main__":
    main()
