"""End-to-end: J', J'', J''' train the embedded student towards its teachers (tiny models, seconds each)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from grpokd.errors import ConfigError
from grpokd.models import loading
from grpokd.models.lm import completion_logits, generate, token_logp, tokenize_prompts, tokenize_targets
from grpokd.objectives.base import KDStates
from grpokd.objectives.functional import masked_mean
from grpokd.objectives.kd import reverse_kd
from grpokd.teachers import TeacherEnsemble, Uniform
from grpokd.teachers.sources import in_process
from grpokd.train import prepare, train

pytestmark = pytest.mark.slow

# KD-dominated short runs that cycle over 32 training prompts (6 passes), so the effect on those prompts shows.
KD = [
    "dataset.source.train_size=48", "data.val_size=16", "data.prompts_per_step=16", "trainer.max_steps=12",
    "optim.lr=1e-3", "lam=5", "tau=1", "data.test_size=16", "eval_before=false",
]


@torch.no_grad()
def loglik_of_teacher_answers(student, prompts: list[str]) -> float:
    """Mean token log-likelihood, under `student`, of each embedded teacher's greedy answers to `prompts`."""
    tokenizer = loading.load_tokenizer("tiny-llama-student")
    tokens = tokenize_prompts(tokenizer, prompts, 64)
    total = 0.0
    for name in ("tiny-llama-teacher-s", "tiny-llama-teacher-m"):
        answers = generate(loading.load_model(name), tokenizer, tokens, do_sample=False, max_new_tokens=48)
        logp = token_logp(completion_logits(student.eval(), tokens, answers), answers.ids)  # [B, T]
        total += float((logp * answers.mask).sum() / answers.mask.sum()) / 2
    return total


@pytest.mark.parametrize(
    "objective,extra",
    [
        ("j1", ["beta=0"]),
        ("j3", ["beta=0", "gamma=0.5", "weighting=competence"]),
        ("j1", ["beta=0.04", "objective.terms.kd.states=gold", "objective.terms.kl.estimator=k3", "weighting=static", "weighting.weights=[0.25,0.75]"]),
        ("tgpo", ["beta=0", "lam_t=5"]),  # TGPO weighs its guide with lam_t, not KD's lam
    ],
)
def test_kd_objectives_move_the_student_towards_the_teachers(objective, extra, quick_cfg, tmp_path):
    cfg = quick_cfg(f"objective={objective}", *KD, *extra)
    prompts = [ex.prompt for ex in prepare(cfg).data.train_set]
    before = loglik_of_teacher_answers(loading.load_model("tiny-llama-student"), prompts)
    results = train(cfg)
    after = loglik_of_teacher_answers(AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "student"), prompts)
    assert results["steps"] == 12
    assert after > before + 0.05, (before, after)


@torch.no_grad()
def reverse_kd_on_gold(student, examples) -> float:
    """sum_i w_i KL(student || T_i) (uniform w, tau 1) on the gold solutions of `examples`: what J'' minimises."""
    tokenizer = loading.load_tokenizer("tiny-llama-student")
    names = ["tiny-llama-teacher-s", "tiny-llama-teacher-m"]
    ensemble = TeacherEnsemble(in_process([loading.load_model(n) for n in names], names), Uniform())
    prompts = tokenize_prompts(tokenizer, [ex.prompt for ex in examples], 64)
    gold = tokenize_targets(tokenizer, [ex.solution for ex in examples], 48)
    logits = completion_logits(student.eval(), prompts, gold)  # [B, T, V]
    mixture = ensemble.score(prompts, gold, logits, len(tokenizer), tau=1.0, reverse=True).mixture
    return float(masked_mean(reverse_kd(KDStates(logits, gold.mask.float(), 1.0, *mixture)), gold.mask.float()))


def test_j2_moves_the_student_towards_the_teacher_anchor(quick_cfg, tmp_path):
    """Reverse KD is mode-seeking, so J'' is checked on what it minimises rather than on the teachers' answers."""
    cfg = quick_cfg("objective=j2", *KD, "beta_prime=5", "objective.terms.kd_reverse.states=gold", "weighting=confidence")
    examples = prepare(cfg).data.train_set
    before = reverse_kd_on_gold(loading.load_model("tiny-llama-student"), examples)
    train(cfg)
    after = reverse_kd_on_gold(AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "student"), examples)
    assert after < 0.9 * before, (before, after)


@torch.no_grad()
def reverse_kl_on_own_samples(student, examples) -> float:
    """KL(student || uniform teacher mixture), per token, on 4 seeded samples per prompt from the student (T=1)."""
    torch.manual_seed(0)
    tokenizer = loading.load_tokenizer("tiny-llama-student")
    names = ["tiny-llama-teacher-s", "tiny-llama-teacher-m"]
    teachers = [loading.load_model(n) for n in names]
    prompts = tokenize_prompts(tokenizer, [ex.prompt for ex in examples], 64)
    samples = generate(student.eval(), tokenizer, prompts, 4, 48, do_sample=True, temperature=1.0, top_k=0)
    log_q = completion_logits(student, prompts, samples, len(tokenizer)).log_softmax(-1)  # [N, T, V]
    log_mix = torch.stack([completion_logits(t, prompts, samples, len(tokenizer)).log_softmax(-1) for t in teachers]).logsumexp(0) - torch.log(torch.tensor(2.0))
    kl = (log_q.exp() * (log_q - log_mix)).sum(-1)  # [N, T]
    return float(masked_mean(kl, samples.mask.float()))


def test_kdrl_lowers_the_reverse_kl_to_the_teachers_on_its_own_samples(quick_cfg, tmp_path):
    """KDRL's reverse KL is estimated on the student's samples; it is checked there, against the exact KL."""
    cfg = quick_cfg("objective=kdrl", *KD, "beta=0", "beta_kd=5", "rollout.sampling.temperature=1", "trainer.max_steps=60", "optim.lr=3e-4")
    examples = prepare(cfg).data.train_set
    before = reverse_kl_on_own_samples(loading.load_model("tiny-llama-student"), examples)
    train(cfg)
    after = reverse_kl_on_own_samples(AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "student"), examples)
    assert after < 0.9 * before, (before, after)


def test_kd_objectives_on_the_causal_family(quick_cfg):
    results = train(quick_cfg("objective=j3", "model=tiny_causal", "gamma=0.5", "trainer.max_steps=2", "eval_before=false"))
    assert results["steps"] == 2


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["objective=j1", "model.teachers=[]"], "model.teachers is empty"),
        (["objective=j1", "weighting=static", "weighting.weights=[1.0]"], "weighting.weights has 1 entries for 2 teachers"),
        (["objective=j1", "weighting=static", "weighting.weights=[1.0,-1.0]"], "non-negative"),
        (["objective=j1", "tau=0"], "tau"),
        (["objective=j3", "model.teachers=[/no/such/teacher]"], "model.teachers.0."),
    ],
)
def test_bad_teacher_configs_fail_at_start_up(overrides, message, quick_cfg):
    with pytest.raises(ConfigError, match=message):
        prepare(quick_cfg(*overrides))


def test_a_teacher_with_another_tokenizer_is_refused_naming_both(quick_cfg, tmp_path):
    from grpokd.models.tokenizer import build_tokenizer
    from grpokd.models.zoo import Recipe, init_model

    tokenizer = build_tokenizer("t5")
    tokenizer.add_tokens(["zebra"])
    other = tmp_path / "other-teacher"
    init_model(Recipe("t5", d_model=32, layers=1, heads=2, d_ff=64, steps=0), tokenizer).save_pretrained(other)
    tokenizer.save_pretrained(other)
    with pytest.raises(ConfigError, match=r"model.teachers\[0\].*other-teacher.*tiny-llama-student"):
        train(quick_cfg("objective=j1", f"model.teachers=[{other}]"))


def test_unknown_weighting_scheme_names_the_choices(tmp_path):
    from conftest import compose
    from hydra.errors import MissingConfigException

    with pytest.raises(MissingConfigException, match="weighting"):
        compose(["weighting=popularity"], tmp_path)
