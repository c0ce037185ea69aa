"""Scale-out: the frozen models' placement (submodules that are never trained or checkpointed)."""

from __future__ import annotations

import pytest

from grpokd.train import build_module, prepare

pytestmark = pytest.mark.slow


def test_frozen_models_are_submodules_that_are_never_trained_or_checkpointed(quick_cfg, tmp_path):
    """J' holds a reference and two teachers: submodules (Lightning places them, FSDP may shard them), but frozen,
    kept in eval mode, outside the optimiser and outside state_dict; a student-only state dict (every checkpoint,
    including those written before the frozen models were submodules) loads strictly."""
    cfg = quick_cfg("objective=j1")
    module = build_module(cfg, prepare(cfg), tmp_path)
    frozen = [module.frozen.reference, *module.frozen.teachers.teachers]
    assert len(frozen) == 3
    assert all(any(m is f for m in module.modules()) for f in frozen)
    module.train()
    assert module.student.training and not any(m.training for f in frozen for m in f.modules())
    assert not any(p.requires_grad for f in frozen for p in f.parameters())
    optimiser = module.configure_optimizers()["optimizer"]
    assert {id(p) for group in optimiser.param_groups for p in group["params"]} == {id(p) for p in module.student.parameters()}
    state = module.state_dict()
    assert set(state) == {f"student.{k}" for k in module.student.state_dict()}
    assert not module.load_state_dict(state, strict=True).missing_keys
    with pytest.raises(RuntimeError, match="Missing key"):  # the student's own keys stay mandatory
        module.load_state_dict({k: v for k, v in state.items() if "lm_head" not in k}, strict=True)
