"""Step time and peak memory of j1 against grpo for M = 1, 2, 4 teachers on the embedded models.

    python bench/teachers.py [--repeats 7] [--prompts 16] [--group 8] [--device cpu|cuda] [--dtype float32|bfloat16]

One training step without Lightning: sample a rollout once (fixed across
repeats), then time score (student with grad, reference, teachers) +
objective + backward, the part that grows with M. Each configuration runs in
a fresh subprocess so that its peak memory is its own: on CUDA
torch.cuda.max_memory_allocated, on CPU the process's peak RSS. "growth"
is the peak memory minus M=1's, minus the extra teachers' weights, i.e. the
activation memory that M adds (by design it should stay flat in M: the mixtures are accumulated one teacher at a time).
Teachers cycle through the embedded T5 teachers.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

# Both at beta 0.04 (grpo.yaml's own is 0), j1 at its configured lam 0.5, tau 2 (exact KL, as j1.yaml).
OVERRIDES = {"grpo": ["beta=0.04"], "j1": ["lam=0.5", "tau=2.0", "beta=0.04"]}


def objective_of(name: str, *overrides: str):
    """The objective of `python run.py objective=<name> <overrides>` (conf/objective/<name>.yaml), built as a run builds it."""
    from hydra import compose, initialize_config_dir

    from grpokd.sweep import CONF
    from grpokd.train import instantiate_group

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=[f"objective={name}", *overrides])
    return instantiate_group(cfg.objective, "objective")


def measure(objective: str, teachers: int, args: argparse.Namespace) -> dict:
    import torch

    from grpokd import rollout as ro
    from grpokd.data.datamodule import collate
    from grpokd.data.rewards import NumericReward
    from grpokd.data.sources import arith
    from grpokd.models import loading
    from grpokd.scoring import FrozenModels, ScoreRequest, score
    from grpokd.teachers import TeacherEnsemble, Uniform
    from grpokd.teachers.sources import in_process

    device = torch.device(args.device)
    dtype = None if args.dtype == "float32" else args.dtype
    torch.manual_seed(0)
    tokenizer = loading.load_tokenizer("tiny-t5-student")
    student = loading.load_model("tiny-t5-student", dtype=dtype).to(device).train()
    reference = loading.load_model("tiny-t5-student", dtype=dtype).to(device)
    names = [("tiny-t5-teacher-s", "tiny-t5-teacher-m")[i % 2] for i in range(teachers)]
    models = [loading.load_model(n, dtype=dtype).to(device) for n in names]
    ensemble = TeacherEnsemble(in_process(models, names), Uniform()) if models else None
    teacher_bytes = sum(p.numel() * p.element_size() for t in models for p in t.parameters())
    objective_fn = objective_of(objective, *OVERRIDES[objective])
    frozen = FrozenModels(reference, ensemble)
    sampling = ro.Sampling(group_size=args.group, max_new_tokens=48, temperature=1.0)
    examples = collate(arith(test_size=args.prompts).test)
    rollout = ro.sample(student, tokenizer, examples, sampling, NumericReward())
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(args.repeats + 1):  # the first is a warm-up
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.dtype == "bfloat16"):
            batch, _, _ = score(student, ScoreRequest(rollout, objective_fn.needs), frozen, len(tokenizer))
            loss = objective_fn(batch).loss
        loss.backward()
        student.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {
        "objective": objective, "teachers": teachers, "step_ms": 1000 * statistics.median(times[1:]),
        "peak_mb": peak / 2**20, "teacher_mb": teacher_bytes / 2**20, "completions": rollout.completions.ids.shape[0],
        "tokens": rollout.completions.ids.shape[1],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--group", type=int, default=8)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--one", nargs=2, metavar=("OBJECTIVE", "M"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.one[0], int(args.one[1]), args)))
        return
    rows = []
    for objective, m in [("grpo", 0), ("j1", 1), ("j1", 2), ("j1", 4)]:
        cmd = [sys.executable, __file__, "--one", objective, str(m), *sys.argv[1:]]
        rows.append(json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.splitlines()[-1]))
    grpo, base = rows[0], rows[1]
    print(f"device={args.device} dtype={args.dtype} N={base['completions']} T={base['tokens']} repeats={args.repeats} (median step)")
    print("| objective | M | step ms | x grpo | peak MB | growth vs M=1 beyond teacher weights (MB) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        growth = "" if r["objective"] == "grpo" else f"{r['peak_mb'] - base['peak_mb'] - (r['teacher_mb'] - base['teacher_mb']):.1f}"
        print(f"| {r['objective']} | {r['teachers']} | {r['step_ms']:.0f} | {r['step_ms'] / grpo['step_ms']:.2f} | {r['peak_mb']:.0f} | {growth} |")


if __name__ == "__main__":
    main()
