"""End-to-end runs of train(cfg) on the embedded tiny models (seconds each once the zoo is cached)."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForSeq2SeqLM

from grpokd.train import train

pytestmark = pytest.mark.slow


def test_grpo_run_writes_a_complete_run_directory(quick_cfg, tmp_path):
    results = train(quick_cfg("objective=grpo"))
    run_dir = tmp_path / "run"
    saved = json.loads((run_dir / "results.json").read_text())
    assert saved == json.loads(json.dumps(results, default=str))
    for key in ("objective", "dataset", "model", "seed", "steps", "wall_time_s", "test/accuracy_before", "test/accuracy_after"):
        assert key in saved
    assert saved["steps"] == 4 and saved["objective"] == "grpo" and saved["status"] == "complete"
    assert (run_dir / "checkpoints" / "last.ckpt").exists()
    exported = AutoModelForSeq2SeqLM.from_pretrained(run_dir / "student")
    assert exported.num_parameters() > 0
    rows = [json.loads(line) for line in (run_dir / "samples.jsonl").read_text().splitlines()]
    assert rows and {"prompt", "completion", "reward", "adv"} <= set(rows[0])


def test_resume_reaches_the_same_weights_as_an_uninterrupted_run(quick_cfg, tmp_path):
    straight = tmp_path / "straight"
    train(quick_cfg("eval_before=false", run_dir=straight))
    first = tmp_path / "first"
    train(quick_cfg("eval_before=false", "trainer.max_steps=2", run_dir=first))
    resumed = tmp_path / "resumed"
    results = train(quick_cfg("eval_before=false", f"ckpt_path={first / 'checkpoints' / 'last.ckpt'}", run_dir=resumed))
    assert results["steps"] == 4
    a = AutoModelForSeq2SeqLM.from_pretrained(straight / "student").state_dict()
    b = AutoModelForSeq2SeqLM.from_pretrained(resumed / "student").state_dict()
    assert all(torch.allclose(a[k], b[k]) for k in a)
