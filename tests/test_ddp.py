"""Scale-out: a real 2-process DDP run on the CPU (gloo) through the command line, the frozen models' placement
(submodules that are never trained or checkpointed), the FSDP config, and the launch rules for sweeps."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import hydra
import lightning as L
import pytest
import torch
import torch.distributed as dist
from conftest import REPO, compose
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode

from grpokd import parallel, runtime
from grpokd.data.datamodule import PromptStream
from grpokd.errors import ConfigError
from grpokd.train import build_module, prepare

pytestmark = pytest.mark.slow

K, B = 4, 4  # group size, prompts per step and rank
DDP = [
    "trainer=ddp_cpu", "objective=grpo", "logger=none", f"group_size={K}", f"data.prompts_per_step={B}",
    "data.val_size=31", "data.test_size=31", "trainer.val_check_interval=2", "checkpoint_every=2", "log.samples_every=1",
    "threads=1",
]


def run_cli(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """`python run.py ...` with this checkout's grpokd importable by it and by the DDP ranks it starts."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1", "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO / "src"), os.environ.get("PYTHONPATH")]))}
    out = subprocess.run([sys.executable, str(REPO / "run.py"), *args], cwd=REPO, capture_output=True, text=True, timeout=timeout, env=env)
    assert out.returncode == 0, out.stderr[-4000:]
    return out


def samples_by_step_and_rank(run_dir: Path) -> dict[tuple[int, int], list[dict]]:
    rows = defaultdict(list)
    for line in (run_dir / "samples.jsonl").read_text().splitlines():
        row = json.loads(line)
        rows[row["step"], row["rank"]].append(row)
    return rows


def check_ranks_draw_their_own_stream_in_whole_groups(rows: dict[tuple[int, int], list[dict]], steps: range, streams: list[PromptStream]) -> None:
    """Rank r's prompts at step s are its PromptStream's batch s; each prompt's K completions (a group, whose
    advantages sum to 0) were sampled on one rank; no prompt is on two ranks at one step."""
    for step in steps:
        prompts = []
        for rank, stream in enumerate(streams):
            logged = [row["prompt"] for row in rows[step, rank]]
            expected = stream.batch(step)["prompt"][: len(logged) // K]
            assert logged == [p for p in expected for _ in range(K)], (step, rank)
            for p in expected:
                group = [row for row in rows[step, rank] if row["prompt"] == p]
                assert len(group) == K and abs(sum(row["adv"] for row in group)) < 1e-4
            prompts.append(set(expected))
        assert not prompts[0] & prompts[1], step


def test_ddp_on_two_cpu_processes_splits_prompts_keeps_groups_reduces_accuracy_and_resumes(tmp_path):
    if not (dist.is_available() and dist.is_gloo_available()):
        pytest.skip("torch.distributed with the gloo backend is not available in this torch build")
    run_dir = tmp_path / "run"
    run_cli(*DDP, "trainer.max_steps=4", f"hydra.run.dir={run_dir}")
    results = json.loads((run_dir / "results.json").read_text())
    assert results["status"] == "complete" and results["steps"] == 4

    # (a, b) each rank drew its own prompts, whole groups of K completions each
    data = prepare(compose([*DDP], tmp_path / "unused")).data
    streams = [PromptStream(data.train_set, B, 0, rank=r, world_size=2) for r in range(2)]
    rows = samples_by_step_and_rank(run_dir)
    assert set(rows) == {(s, r) for s in range(4) for r in range(2)}
    check_ranks_draw_their_own_stream_in_whole_groups(rows, range(4), streams)

    # (c) the test accuracy, scored on two ranks and reduced, is the exported student's over all 31 examples
    # in one process: neither rank 0's half alone nor a padded 32 could give the same fraction unless 0 or 1
    single = run_cli("mode=eval", f"model.student={run_dir / 'student'}", "data.test_size=31", "logger=none", "threads=1", f"hydra.run.dir={tmp_path / 'eval'}")
    alone = json.loads((tmp_path / "eval" / "results.json").read_text())["test/accuracy"]
    assert 0 < results["test/accuracy_after"] < 1 and results["test/accuracy_after"] == pytest.approx(alone, abs=1e-6), single.stdout

    # the checkpoint: the student alone (no frozen reference), one RNG state per rank, and they differ (seed + rank)
    checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)
    assert checkpoint["global_step"] == 4 and all(k.startswith("student.") for k in checkpoint["state_dict"])
    assert len(checkpoint["rng"]) == 2 and not torch.equal(checkpoint["rng"][0]["torch"], checkpoint["rng"][1]["torch"])

    # (d) resuming continues from step 4, each rank on its own stream; the run finished, so in a new directory
    run_cli(*DDP, "trainer.max_steps=6", f"ckpt_path={run_dir / 'checkpoints' / 'last.ckpt'}", f"hydra.run.dir={tmp_path / 'more'}")
    resumed = json.loads((tmp_path / "more" / "results.json").read_text())
    assert resumed["status"] == "complete" and resumed["steps"] == 6 and results == json.loads((run_dir / "results.json").read_text())
    rows = samples_by_step_and_rank(tmp_path / "more")
    assert set(rows) == {(s, r) for s in range(4, 6) for r in range(2)}
    check_ranks_draw_their_own_stream_in_whole_groups(rows, range(4, 6), streams)


def test_training_metrics_reduce_over_ranks_by_mean_maxima_by_max_and_job_rates_by_sum():
    gathered = torch.tensor([[1.0, 10.0, 0.5, 100.0], [3.0, 12.0, 0.25, 150.0]])  # [ranks, metrics]
    names = ["train/loss", "train/completion_len_max", "train/reward_mean", "train/tokens_per_s"]
    assert parallel.reduce_over_ranks(gathered, names).tolist() == [2.0, 12.0, 0.375, 250.0]
    assert parallel.reduce_over_ranks(gathered[:1], names).tolist() == [1.0, 10.0, 0.5, 100.0]


def test_frozen_models_are_submodules_that_are_never_trained_or_checkpointed(quick_cfg, tmp_path):
    """J' holds a reference and two teachers: submodules (Lightning places them, FSDP may shard them), but frozen,
    kept in eval mode, outside the optimiser and outside state_dict; a student-only state dict (every checkpoint,
    including those written before the frozen models were submodules) loads strictly."""
    cfg = quick_cfg("objective=j1")
    module = build_module(cfg, prepare(cfg), tmp_path)
    frozen = parallel.frozen_models(module)
    assert frozen == [module.frozen.reference, *module.frozen.teachers.teachers] and len(frozen) == 3
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


def test_checkpoint_state_per_rank_and_in_the_single_process_format_before_it():
    """`rank_entry` reads per-rank lists (rank r its own) and the one dict that single-process checkpoints held;
    a rank the checkpoint has no entry for (more processes on resume) starts afresh."""
    assert parallel.gather({"a": 1}) == [{"a": 1}]  # one process: no collective
    assert parallel.rank_entry([{"r": 0}, {"r": 1}], 1) == {"r": 1}
    assert parallel.rank_entry({"torch": "old"}, 0) == {"torch": "old"}
    assert parallel.rank_entry({"torch": "old"}, 1) is None and parallel.rank_entry(None, 0) is None


def test_fsdp_config_replicates_or_shards_exactly_the_frozen_models(quick_cfg, tmp_path):
    """FSDP needs GPUs (Lightning and torch refuse the CPU), so here: the config builds the strategy, and the
    placement names the frozen models (reference, each teacher) and nothing of the student."""
    cfg = quick_cfg("objective=j1", "trainer=fsdp")
    strategy = hydra.utils.instantiate(cfg.trainer.strategy)
    assert isinstance(strategy, parallel.FSDP) and strategy.frozen == "replicate" and strategy.kwargs["use_orig_params"]
    module = build_module(cfg, prepare(cfg), tmp_path)
    frozen = [module.frozen.reference, *module.frozen.teachers.teachers]
    assert parallel.frozen_placement(module, "replicate") == {"ignored_modules": frozen}
    assert set(parallel.frozen_placement(module, "shard")) == {"auto_wrap_policy"}
    unit = parallel.fsdp_unit(frozen)
    assert [m for m in module.modules() if unit(m)] == frozen
    layer = type(module.student.model.layers[0])
    with_layers = parallel.fsdp_unit(frozen, {layer})
    assert {id(m) for m in module.modules() if with_layers(m)} == {id(m) for m in frozen} | {id(m) for m in module.modules() if isinstance(m, layer)}
    with pytest.raises(ConfigError, match="trainer.strategy.frozen='both'"):
        parallel.FSDP(frozen="both")


def test_a_ddp_rank_started_by_lightning_resolves_its_launchers_sweep_directory(monkeypatch):
    monkeypatch.delenv(runtime.STAMP, raising=False)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    launcher = runtime.stamp()
    monkeypatch.setenv("LOCAL_RANK", "1")  # as Lightning's subprocess launcher starts rank 1
    assert runtime.stamp() == launcher
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert runtime.stamp() != launcher


def test_a_sweep_under_a_worker_launcher_refuses_lightnings_ddp_launcher():
    """Under Hydra's basic launcher each rank re-runs the sweep in step (tested by hand: two jobs, one sweep
    directory); a joblib worker's command line is not run.py, so Lightning's launcher cannot start its ranks."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    pytest.importorskip("hydra_plugins.hydra_joblib_launcher", reason="hydra-joblib-launcher is not installed")
    runtime.register_resolvers()
    trainer = L.Trainer(strategy="ddp", accelerator="cpu", devices=2, logger=False, enable_progress_bar=False)
    for launcher, refused in (("joblib", True), ("basic", False)):
        with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
            cfg = hydra_compose("config", overrides=[f"hydra/launcher={launcher}"], return_hydra_config=True)
        cfg.hydra.mode = RunMode.MULTIRUN
        HydraConfig.instance().set_config(cfg)
        try:
            if refused:
                with pytest.raises(ConfigError, match="hydra/launcher=JoblibLauncher"):
                    parallel.check_launch(trainer)
            else:
                parallel.check_launch(trainer)
        finally:
            HydraConfig.instance().cfg = None
