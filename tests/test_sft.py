"""Tensor-only tests of the SFT objective."""

import math

import pytest
import torch

from grpokd.objectives.base import Batch, Needs
from grpokd.objectives.sft import SFT


def test_sft_value_and_gradient_by_hand():
    # gold tokens with probabilities .5, .25 | .5; the padded entries must not count
    logp = torch.tensor([[math.log(0.5), math.log(0.25), -7.0], [math.log(0.5), -7.0, -7.0]], requires_grad=True)
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    out = SFT()(Batch(logp=logp, mask=mask))
    # NLL = (ln 2 + 2 ln 2 + ln 2) / 3 tokens
    assert out.loss.item() == pytest.approx(4 * math.log(2) / 3)
    assert out.metrics["nll"].item() == pytest.approx(4 * math.log(2) / 3)
    assert not out.metrics["nll"].requires_grad
    # d loss / d logp = -1/3 on each of the 3 real tokens, 0 on padding
    out.loss.backward()
    torch.testing.assert_close(logp.grad, -mask / 3)


def test_sft_needs_no_rollouts():
    assert SFT().needs == Needs(rollouts=False)
