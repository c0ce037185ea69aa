"""Rollout engines (`grpokd.models.engines`): the seam, the engine/trainer log-prob gap and its truncated
importance-sampling correction, vLLM's outputs in grpokd's layout, and when the engine takes the weights.

The vLLM engine itself runs in tests/test_vllm.py (`make test-vllm`).
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from conftest import compose
from conftest import objective as make_objective

from grpokd.errors import ConfigError
from grpokd.models import loading
from grpokd.models.engines import ENGINES, Decoding
from grpokd.models.engines.builtin import Builtin
from grpokd.models.engines.vllm import pack
from grpokd.models.lm import Tokens, generate, tokenize_prompts
from grpokd.objectives.base import Batch
from grpokd.rollout import Rollout
from grpokd.scoring import ScoreRequest, engine_correction
from grpokd.train import train


def request(engine_logp, mask, cap=None, old_logp=None) -> ScoreRequest:
    ids = torch.zeros_like(mask, dtype=torch.long)
    rollout = Rollout(Tokens(ids[:1], torch.ones_like(ids[:1])), Tokens(ids, mask.long()), [""] * len(ids), [""] * len(ids), None, len(ids),
                      torch.zeros(len(ids), dtype=torch.bool), engine_logp=engine_logp)
    return ScoreRequest(rollout, needs=None, old_logp=old_logp, importance_cap=cap)


def test_the_logp_gap_and_the_truncated_importance_weights_by_hand():
    """Trainer -1, -2, (pad); engine -1.5, -1, -7: gaps 0.5 and -1 -> logp_gap 0.75, max 1; weights with cap 1.5:
    min(e^0.5, 1.5) = 1.5 and e^-1, 0 on padding. The pi_old of a later update (old_logp) is the one compared."""
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    engine = torch.tensor([[-1.5, -1.0, -7.0]])
    logp = torch.tensor([[-1.0, -2.0, -3.0]], requires_grad=True)
    weight, metrics = engine_correction(request(engine, mask), logp, mask)
    assert weight is None and set(metrics) == {"engine/logp_gap", "engine/logp_gap_max"}
    torch.testing.assert_close(metrics["engine/logp_gap"], torch.tensor(0.75))
    torch.testing.assert_close(metrics["engine/logp_gap_max"], torch.tensor(1.0))
    weight, metrics = engine_correction(request(engine, mask, cap=1.5), logp, mask)
    torch.testing.assert_close(weight, torch.tensor([[1.5, math.exp(-1.0), 0.0]]))
    torch.testing.assert_close(metrics["engine/is_weight_mean"], torch.tensor((1.5 + math.exp(-1.0)) / 2))
    weight, _ = engine_correction(request(engine, mask, cap=10.0, old_logp=torch.tensor([[-1.5, -1.0, 0.0]])), logp, mask)
    torch.testing.assert_close(weight, torch.tensor([[1.0, 1.0, 0.0]]))  # pi_old is the engine's: nothing to correct
    assert engine_correction(request(None, mask, cap=1.5), logp, mask) == (None, {})  # the built-in decoder reports none


def test_the_importance_weight_scales_each_tokens_policy_loss_and_its_gradient():
    """beta = 0, on-policy: the surrogate's per-token loss is -A (value), so a weight w on one token scales that
    token's share of the loss and of the gradient by w; weights of 1 change nothing."""
    g = torch.Generator().manual_seed(0)
    logp = torch.randn(4, 3, generator=g).requires_grad_()
    mask = torch.ones(4, 3)
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0])
    objective = make_objective("grpo", "beta=0.0")
    plain = objective(Batch(logp=logp, mask=mask, group_size=2, rewards=rewards))
    ones = objective(Batch(logp=logp, mask=mask, group_size=2, rewards=rewards, behaviour_weight=torch.ones(4, 3)))
    torch.testing.assert_close(ones.loss, plain.loss)
    weight = torch.ones(4, 3)
    weight[0, 1] = 0.25
    weighted = objective(Batch(logp=logp, mask=mask, group_size=2, rewards=rewards, behaviour_weight=weight))
    (grad_plain,) = torch.autograd.grad(plain.loss, logp)
    (grad,) = torch.autograd.grad(weighted.loss, logp)
    torch.testing.assert_close(grad, grad_plain * weight)


def completion(token_ids, logps, index=0):
    return SimpleNamespace(index=index, token_ids=token_ids, logprobs=[{t: SimpleNamespace(logprob=lp)} for t, lp in zip(token_ids, logps)])


def test_vllm_outputs_take_grpokds_layout_up_to_the_first_end_token():
    """Rows end at their first end token (included), then padding with mask 0 and log-prob 0; width = the longest."""
    out = pack([completion([5, 2, 7], [-0.1, -0.2, -0.3]), completion([9, 8], [-1.0, -2.0]), completion([3, 4, 6], [-0.5, -0.6, -0.7])],
               pad_id=0, end_ids=[2, 6], device=torch.device("cpu"))
    assert out.tokens.ids.tolist() == [[5, 2, 0], [9, 8, 0], [3, 4, 6]]
    assert out.tokens.mask.tolist() == [[1, 1, 0], [1, 1, 0], [1, 1, 1]]
    torch.testing.assert_close(out.logp, torch.tensor([[-0.1, -0.2, 0.0], [-1.0, -2.0, 0.0], [-0.5, -0.6, -0.7]]))


def test_the_builtin_engine_is_the_decoder():
    tokenizer, model = loading.load_tokenizer("tiny-llama-student"), loading.load_model("tiny-llama-student")
    prompts = tokenize_prompts(tokenizer, ["12+7=", "3*4+1="], 32)
    torch.manual_seed(0)
    engine = Builtin().generate(model, tokenizer, prompts, Decoding(3, 10, True, 0.7, 0.9, 5))
    torch.manual_seed(0)
    direct = generate(model, tokenizer, prompts, 3, 10, True, 0.7, 0.9, 5)
    assert engine.logp is None and torch.equal(engine.tokens.ids, direct.ids) and torch.equal(engine.tokens.mask, direct.mask)


class Recording(Builtin):
    """The built-in decoder, counting its syncs (`rollout.engine=recording` in the test below)."""

    syncs = 0

    def sync(self, model) -> None:
        Recording.syncs += 1


@pytest.mark.parametrize("every,syncs", [(1, 3), (2, 1), (5, 0)])
def test_the_engine_takes_the_weights_every_sync_every_steps(every, syncs, tmp_path, monkeypatch):
    """4 steps, no evaluation: before each rollout the engine takes the weights when `sync_every` steps have
    passed since it last did (the first rollout samples the weights it starts from): at steps 1, 2 and 3 with
    every=1, at step 2 with every=2, never with every=5."""
    monkeypatch.setitem(ENGINES, "recording", "test_engines:Recording")
    Recording.syncs = 0
    train(compose(["objective=grpo", "logger=none", "trainer.max_steps=4", "data.prompts_per_step=2", "group_size=2", "eval_before=false",
                   "eval_test=false", "data.val_size=0", "eval_pass_k=0", "log.samples_every=0", "rollout.engine=recording",
                   f"rollout.sync_every={every}"], tmp_path / "run"))
    assert Recording.syncs == syncs


def test_the_builtin_draws_and_a_bad_one():
    """rollout.builtin.draw: inverse_cdf samples other tokens than multinomial under one seed (same distribution:
    tests/test_scoring.py), multinomial is transformers' draw; any other name is refused with the choices."""
    tokenizer, model = loading.load_tokenizer("tiny-llama-student"), loading.load_model("tiny-llama-student")
    prompts = tokenize_prompts(tokenizer, ["12+7=", "3*4+1="], 32)
    draws = {}
    for draw in ("multinomial", "inverse_cdf"):
        torch.manual_seed(0)
        draws[draw] = Builtin(draw=draw).generate(model, tokenizer, prompts, Decoding(8, 10)).tokens.ids
    assert not torch.equal(draws["multinomial"], draws["inverse_cdf"])
    with pytest.raises(ConfigError, match="rollout.builtin.draw=gumbel: the draws are multinomial, inverse_cdf"):
        Builtin(draw="gumbel")
