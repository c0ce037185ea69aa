"""LoRA adapters and gradient checkpointing on the embedded tiny students (causal and T5), no mocks.

What must hold: LoRA trains the adapters and nothing else; the student with its
adapters disabled scores exactly as a separately loaded frozen copy (so it can
be the reference); checkpointing changes no loss, gradient or generation; the
export loads as a plain model (merged) or as an adapter; a LoRA run resumes.
"""

from __future__ import annotations

import pytest
import torch
from conftest import compose
from peft import PeftModel
from transformers import AutoModelForCausalLM

from grpokd import rollout as ro
from grpokd.errors import ConfigError
from grpokd.models import loading
from grpokd.models.lm import completion_logits, generate, token_logp, tokenize_prompts
from grpokd.models.student import LoRA, add_lora, enable_checkpointing, save_student
from grpokd.objectives.base import Needs
from grpokd.scoring import FrozenModels, ScoreRequest, score, score_frozen
from grpokd.train import build_module, build_trainer, prepare, train

STUDENTS = ["tiny-llama-student", "tiny-t5-student"]
PROMPTS = ["What is 12 + 7?", "What is 3 * 4 - 5?"]
SOLUTIONS = ["12 + 7 = 19. #### 19", "3 * 4 = 12. 12 - 5 = 7. #### 7"]
LORA = LoRA(r=4, alpha=8)


def student_and_rollout(name: str) -> tuple[torch.nn.Module, ro.Rollout, int]:
    """The student as loaded and a gold rollout of two prompts (K = 1) in its tokenizer."""
    tokenizer = loading.load_tokenizer(name)
    examples = {"prompt": PROMPTS, "solution": SOLUTIONS, "answer": ["19", "7"]}
    return loading.load_model(name), ro.gold(tokenizer, examples, ro.Sampling(max_new_tokens=32), torch.device("cpu")), len(tokenizer)


def perturb_adapters(model: torch.nn.Module, seed: int = 0) -> None:
    """Random adapter weights (lora_B starts at zero, which would make the adapters a no-op)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))


def nll_and_grads(model: torch.nn.Module, rollout: ro.Rollout, vocab: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Token-mean NLL of the rollout with grad, and the gradient of every trainable parameter."""
    model.zero_grad()
    logp = token_logp(completion_logits(model, rollout.prompts, rollout.completions, vocab), rollout.completions.ids)  # [N, T]
    mask = rollout.completions.mask.float()  # [N, T]
    loss = -(logp * mask).sum() / mask.sum()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("name", STUDENTS)
def test_reference_by_disabled_adapters_equals_a_frozen_copy(name):
    student, rollout, vocab = student_and_rollout(name)
    student = add_lora(student, LORA).train()
    perturb_adapters(student)
    needs = Needs(ref_logp=True, ref_logits=True)
    adapted = completion_logits(student, rollout.prompts, rollout.completions, vocab).detach()  # [N, T, V]
    request = ScoreRequest(rollout, needs, temperature=0.7)
    by_base = score_frozen(adapted, request, FrozenModels(student, reference_adapters_off=True), vocab)
    frozen_copy = loading.load_model(name).requires_grad_(False)
    by_copy = score_frozen(adapted, request, FrozenModels(frozen_copy), vocab)
    torch.testing.assert_close(by_base.ref_logp, by_copy.ref_logp, rtol=0, atol=0)
    torch.testing.assert_close(by_base.ref_logits, by_copy.ref_logits, rtol=0, atol=0)
    assert not torch.allclose(adapted / 0.7, by_base.ref_logits)  # the adapters do change the policy
    # afterwards the student is itself again: training mode, adapters on and trainable
    assert student.training
    torch.testing.assert_close(completion_logits(student, rollout.prompts, rollout.completions, vocab), adapted)
    assert all(p.requires_grad for n, p in student.named_parameters() if "lora_" in n)


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointed"])
@pytest.mark.parametrize("name", STUDENTS)
def test_scoring_the_reference_between_forward_and_backward_leaves_the_students_gradients_alone(name, checkpointing):
    """`score` runs the student with grad, then the reference: disabling and re-enabling the adapters in between
    (and, checkpointed, recomputing the layers in backward) must give the gradients a frozen-copy reference gives."""
    student, rollout, vocab = student_and_rollout(name)
    if checkpointing:
        enable_checkpointing(student)
    student = add_lora(student, LORA).train()
    perturb_adapters(student)
    copy = loading.load_model(name).requires_grad_(False)
    if checkpointing:  # scored as the checkpointed student is (whole sequences, no shared prompt cache): equal to the bit
        enable_checkpointing(copy)
    grads = []
    for frozen in (FrozenModels(student, reference_adapters_off=True), FrozenModels(copy)):
        student.zero_grad()
        batch, _, _ = score(student, ScoreRequest(rollout, Needs(ref_logp=True), temperature=0.7), frozen, vocab)
        ((batch.logp - batch.ref_logp) ** 2 * batch.mask).sum().backward()  # a k2-style KL to the reference
        grads.append({n: p.grad.clone() for n, p in student.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and all("lora_" in n for n in grads[0])
    for key in grads[0]:
        torch.testing.assert_close(grads[0][key], grads[1][key], rtol=0, atol=0)


@pytest.mark.parametrize("lora", [None, LORA], ids=["full", "lora"])
@pytest.mark.parametrize("name", STUDENTS)
def test_gradient_checkpointing_changes_no_loss_gradient_or_generation(name, lora):
    plain, rollout, vocab = student_and_rollout(name)
    checkpointed = loading.load_model(name)
    enable_checkpointing(checkpointed)
    if lora is not None:
        plain, checkpointed = add_lora(plain, lora), add_lora(checkpointed, lora)
        perturb_adapters(plain), perturb_adapters(checkpointed)
    plain.train(), checkpointed.train()
    loss, grads = nll_and_grads(plain, rollout, vocab)
    loss_ckpt, grads_ckpt = nll_and_grads(checkpointed, rollout, vocab)
    torch.testing.assert_close(loss_ckpt, loss)
    assert grads.keys() == grads_ckpt.keys() and (lora is None or all("lora_" in n for n in grads))
    for key in grads:  # recomputation reorders float sums: measured up to 2.6e-5 apart on the shipped causal student
        torch.testing.assert_close(grads_ckpt[key], grads[key], rtol=1e-4, atol=1e-4)
    # generation in training mode (as rollouts are sampled) keeps its KV cache: the same greedy completions
    tokenizer = loading.load_tokenizer(name)
    prompts = tokenize_prompts(tokenizer, PROMPTS, 64)
    greedy = [generate(m, tokenizer, prompts, do_sample=False, max_new_tokens=16).ids for m in (plain, checkpointed)]
    torch.testing.assert_close(greedy[1], greedy[0])


def test_merged_export_is_a_plain_model_with_the_adapted_logits_and_the_adapter_export_loads_with_peft(tmp_path):
    name = "tiny-llama-student"
    student, rollout, vocab = student_and_rollout(name)
    tokenizer = loading.load_tokenizer(name)
    student = add_lora(student, LORA)
    perturb_adapters(student)
    student.eval()
    adapted = completion_logits(student, rollout.prompts, rollout.completions, vocab).detach()  # [N, T, V]
    save_student(student, tokenizer, tmp_path / "adapter", LoRA(r=4, alpha=8, merge_on_export=False))
    assert (tmp_path / "adapter" / "adapter_config.json").is_file() and not (tmp_path / "adapter" / "config.json").exists()
    reloaded = PeftModel.from_pretrained(loading.load_model(name), tmp_path / "adapter").eval()
    torch.testing.assert_close(completion_logits(reloaded, rollout.prompts, rollout.completions, vocab), adapted)
    save_student(student, tokenizer, tmp_path / "merged", LORA)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert not any("lora" in key for key in merged.state_dict())
    # merging W + (alpha / r) B A rounds differently from applying B A on the fly: measured up to 8.2e-5 on logits of about 10
    torch.testing.assert_close(completion_logits(merged, rollout.prompts, rollout.completions, vocab), adapted, rtol=1e-4, atol=1e-4)


def test_lora_trains_only_the_adapters_and_its_reference_is_the_base_model(quick_cfg, tmp_path):
    cfg = quick_cfg("objective=grpo", "beta=0.04", "model.lora.r=8", "trainer.max_steps=2", "+trainer.limit_val_batches=0", "optim.lr=1e-3",
                    "rollout.sampling.max_new_tokens=16", "reward.weights.steps=1.0")  # a reward that varies in every group: the adapters get a gradient
    prep = prepare(cfg)
    module = build_module(cfg, prep, tmp_path)
    assert module.frozen.reference is module.student and module.frozen.reference_adapters_off  # no second copy
    before = {k: v.clone() for k, v in module.student.state_dict().items()}
    trainer = build_trainer(cfg, tmp_path, [])
    trainer.fit(module, datamodule=prep.data)
    after = module.student.state_dict()
    base = [k for k in before if "lora_" not in k]
    adapters = [k for k in before if "lora_" in k]
    assert base and adapters
    assert all(torch.equal(before[k], after[k]) for k in base)
    assert any(not torch.equal(before[k], after[k]) for k in adapters)
    in_optimiser = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    lora_params = {id(p) for n, p in module.student.named_parameters() if "lora_" in n}
    assert in_optimiser == lora_params


def test_a_lora_run_with_checkpointing_completes_exports_and_resumes_to_the_same_weights(quick_cfg, tmp_path):
    run = ["objective=grpo", "model.lora.r=8", "model.gradient_checkpointing=true", "eval_before=false", "eval_test=false",
           "+trainer.limit_val_batches=0", "optim.lr=1e-3", "rollout.sampling.max_new_tokens=16", "trainer.max_steps=2",
           "checkpoint_every=1", "reward.weights.steps=1.0"]  # a reward that varies in every group: the adapters learn
    straight = train(quick_cfg(*run, run_dir=tmp_path / "straight"))
    assert straight["status"] == "complete" and straight["steps"] == 2
    train(quick_cfg(*run, "trainer.max_steps=1", run_dir=tmp_path / "first"))
    resumed = train(quick_cfg(*run, f"ckpt_path={tmp_path / 'first' / 'checkpoints' / 'last.ckpt'}", run_dir=tmp_path / "resumed"))
    assert resumed["steps"] == 2
    a = AutoModelForCausalLM.from_pretrained(tmp_path / "straight" / "student").state_dict()
    b = AutoModelForCausalLM.from_pretrained(tmp_path / "resumed" / "student").state_dict()
    loaded = loading.load_model("tiny-llama-student").state_dict()
    assert a.keys() == b.keys() == loaded.keys()  # a plain merged model
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], loaded[k]) for k in a)  # and it learned something


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["model.lora.r=0"], "model.lora.r=0 must be > 0"),
        (["model.lora.r=8", "model.lora.alpha=0"], "model.lora.alpha=0 must be > 0"),
        (["model.lora.r=8", "model.lora.dropout=1.0"], "model.lora.dropout=1.0 must be < 1"),
        (["model.lora.r=8", "model.lora.target_modules=[]"], "model.lora.target_modules"),
        (["model.lora.r=8", "+model.lora.rank=4"], "allowed: r, alpha"),
        (["model.gradient_checkpointing=yes"], "model.gradient_checkpointing='yes' must be true or false"),
    ],
)
def test_bad_lora_settings_fail_at_start_up_with_the_key_named(overrides, message, tmp_path):
    with pytest.raises(ConfigError, match=message):
        prepare(compose(overrides, tmp_path))


def test_a_target_module_the_student_lacks_is_a_config_error():
    with pytest.raises(ConfigError, match="model.lora"):
        add_lora(loading.load_model("tiny-llama-student"), LoRA(r=4, target_modules=("no_such_proj",)))
