"""The fault battery, as a user meets it on the command line: bad inputs end at start-up with exit status 2, one
`error:` line naming the key and value, and no run directory; signals save the current step and exit 128 + signal;
a resumed run continues in its own directory; checkpoints survive a full disk; two runs never share a directory."""

from __future__ import annotations

import csv
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO

from grpokd import runtime
from grpokd.errors import ConfigError, check_range
from grpokd.models import zoo

pytestmark = pytest.mark.slow
TINY = ["logger=none", "data.val_size=16", "data.test_size=16", "data.prompts_per_step=4", "group_size=4"]


def run_cli(*args: str, cwd: Path = REPO, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
    return subprocess.run([sys.executable, str(REPO / "run.py"), *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)


def start_cli(*args: str) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
    return subprocess.Popen([sys.executable, str(REPO / "run.py"), *args], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def no_tokenizer_dir(tmp: Path) -> Path:
    """The embedded student's weights and config, without its tokenizer files."""
    target = tmp / "student-without-tokenizer"
    shutil.copytree(zoo.ensure("tiny-llama-student"), target)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (target / name).unlink(missing_ok=True)
    return target


def non_utf8_file(tmp: Path) -> Path:
    target = tmp / "latin1.jsonl"
    target.write_bytes(b'{"prompt": "1 + 1", "answer": "2"}\n{"prompt": "caf\xe9 costs 3", "answer": "3"}\n')
    return target


def truncated_checkpoint(tmp: Path) -> Path:
    target = tmp / "checkpoints" / "last.ckpt"
    target.parent.mkdir(parents=True)
    buffer = __import__("io").BytesIO()
    torch.save({"state_dict": {"w": torch.zeros(1000)}, "global_step": 3}, buffer)
    target.write_bytes(buffer.getvalue()[:2000])
    return target


# (overrides, text the one error line must contain); callables get tmp_path and return an override
BATTERY = [
    (["optim.lr=-1"], "optim.lr=-1 must be > 0"),
    (["optim.lr=nan"], "optim.lr=nan must be a number"),
    (["rollout.sampling.temperature=0"], "rollout.sampling.temperature=0 must be > 0"),
    (["rollout.sampling.top_p=1.5"], "rollout.sampling.top_p=1.5 must be <= 1"),
    (["rollout.sampling.max_new_tokens=0"], "rollout.sampling.max_new_tokens=0 must be >= 1"),
    (["trainer.max_steps=0"], "trainer.max_steps=0 must be >= 1"),
    (["data.eval_batch_size=0"], "data.eval_batch_size=0 must be >= 1"),
    (["threads=0"], "threads=0 must be >= 1"),
    (["ckpt_path=/no/such/last.ckpt"], "ckpt_path=/no/such/last.ckpt: does not exist"),
    ([lambda tmp: f"ckpt_path={truncated_checkpoint(tmp)}"], "cannot be loaded"),
    (["objective=j1", "weighting=static"], "weighting.weights is mandatory and has no value"),
    (["objective=j1", "weighting=static", "weighting.weights=[nan,1]"], "weighting.weights=[nan, 1"),
    (["dataset=jsonl"], "dataset.path is mandatory and has no value"),
    (["dataset=jsonl", lambda tmp: f"dataset.path={tmp}"], "is a directory; pass dataset.path=<a .jsonl or .json file>"),
    (["dataset=jsonl", lambda tmp: f"dataset.path={non_utf8_file(tmp)}"], "latin1.jsonl:2: byte 0xe9 at column 16 is not UTF-8"),
    (["objective=j1", "model.teachers=[tests/no-such-teacher]"], "model.teachers[0]: local path 'tests/no-such-teacher' does not exist"),
    (["mode=eval", lambda tmp: f"model.student={no_tokenizer_dir(tmp)}"], "has no tokenizer"),
    (["model=tiny", "objective=j1", "model.teachers=[tiny-llama-teacher-s]"], "model.teachers[0]=tiny-llama-teacher-s is a causal model and model.student=tiny-t5-student a seq2seq one"),
]


@pytest.mark.parametrize("overrides,message", BATTERY, ids=[" ".join(o if isinstance(o, str) else "<tmp>" for o in b[0]) for b in BATTERY])
def test_bad_input_ends_at_start_up_with_one_line_and_no_run_directory(overrides, message, tmp_path):
    run_dir = tmp_path / "run"
    args = [o(tmp_path) if callable(o) else o for o in overrides]
    out = run_cli(*TINY, *args, f"hydra.run.dir={run_dir}")
    errors = [line for line in out.stderr.splitlines() if line.strip()]
    assert out.returncode == 2, out.stderr[-3000:]
    assert len(errors) == 1 and errors[0].startswith("error: ") and message in errors[0], errors
    assert not run_dir.exists()


def test_a_dataset_the_tokenizer_does_not_cover_stops_with_the_share_and_an_override_exists(shared_data, tmp_path):
    gsm8k = ["dataset=gsm8k", f"dataset.path={shared_data / 'gsm8k'}"]
    out = run_cli(*TINY, *gsm8k, "mode=eval", f"hydra.run.dir={tmp_path / 'run'}")
    assert out.returncode == 2, out.stderr[-3000:]
    error = out.stderr.strip().splitlines()[-1]
    assert "dataset gsm8k: the tokenizer of model.student=tiny-llama-student does not cover it" in error
    assert "% of tokens unknown" in error and "check_tokenizer=false" in error
    assert not (tmp_path / "run").exists()
    forced = run_cli(*TINY, *gsm8k, "mode=eval", "check_tokenizer=false", f"hydra.run.dir={tmp_path / 'forced'}")
    assert forced.returncode == 0 and json.loads((tmp_path / "forced" / "results.json").read_text())["status"] == "complete"


def read_rows(run_dir: Path) -> list[dict[str, str]]:
    with open(run_dir / "csv" / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize("signum,status", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_saves_the_current_step_and_resume_continues_in_the_same_directory(signum, status, tmp_path):
    run_dir = tmp_path / "run"
    args = [*TINY, "objective=grpo", "trainer.max_steps=40", "trainer.val_check_interval=10", "log.samples_every=1",
            "eval_before=false", "log.csv=true", "checkpoint_every=100"]
    job = start_cli(*args, f"hydra.run.dir={run_dir}")
    deadline = time.time() + 240
    while time.time() < deadline and not ((run_dir / "samples.jsonl").is_file() and (run_dir / "samples.jsonl").read_text().count("\n") >= 3 * 8):
        time.sleep(0.2)  # 8 sample rows a step: at least 3 steps done
    job.send_signal(signum)
    _, err = job.communicate(timeout=120)
    assert job.returncode == status, err[-3000:]
    first = json.loads((run_dir / "results.json").read_text())
    step = first["steps"]
    assert first["status"] == "interrupted" and first["signal"] == signal.Signals(signum).name and 3 <= step < 40
    assert torch.load(first["checkpoint"], map_location="cpu", weights_only=False)["global_step"] == step
    assert f"resume with ckpt_path={run_dir / 'checkpoints' / 'last.ckpt'}" in err

    # resume without naming the run directory: the checkpoint's own directory continues
    resumed = run_cli(*args, f"ckpt_path={run_dir / 'checkpoints' / 'last.ckpt'}")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"run directory: {run_dir}" in resumed.stdout
    final = json.loads((run_dir / "results.json").read_text())
    assert final["status"] == "complete" and final["steps"] == 40 and final["wall_time_s"] > first["wall_time_s"]
    steps = sorted({int(r["step"]) for r in read_rows(run_dir) if r.get("train/loss")})
    assert steps == list(range(40)), steps  # one metrics file, every step once


def test_two_runs_started_together_get_their_own_directories(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
    cmd = [sys.executable, str(REPO / "run.py"), "mode=eval", *TINY]
    jobs = [subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [job.communicate(timeout=300) for job in jobs]
    assert all(job.returncode == 0 for job in jobs), [o[1][-2000:] for o in outs]
    dirs = sorted(p.parent for p in (tmp_path / "outputs").rglob("results.json"))
    assert len(dirs) == 2 and all(d.name.endswith("_j1_arith_s0") for d in dirs), dirs


def test_checkpoints_are_atomic_a_full_disk_keeps_the_good_one(tmp_path):
    """RLIMIT_FSIZE makes the write fail as a full disk would (EFBIG for ENOSPC); the old checkpoint stays whole."""
    path = tmp_path / "last.ckpt"
    io = runtime.AtomicCheckpointIO()
    io.save_checkpoint({"state_dict": {"w": torch.ones(10)}, "global_step": 1}, path)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (path.stat().st_size + 100, hard))
    try:
        with pytest.raises(OSError):
            io.save_checkpoint({"state_dict": {"w": torch.ones(100_000)}, "global_step": 2}, path)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)
    assert torch.load(path, weights_only=False)["global_step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]  # no temp file left behind
    assert runtime.check_checkpoint(str(path)) == 1


def test_run_directory_names_resume_and_slurm(tmp_path, monkeypatch):
    for var in ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_RESTART_COUNT"):
        monkeypatch.delenv(var, raising=False)
    root = str(tmp_path / "outputs")
    first = runtime.run_dir(root, "grpo_arith_s0")
    assert first.endswith(f"-p{os.getpid()}_grpo_arith_s0")  # unique across processes: test_two_runs_started_together
    (Path(first) / ".hydra").mkdir(parents=True)
    assert runtime.run_dir(root, "other", f"{first}/checkpoints/last.ckpt") == first  # resuming a run's own checkpoint
    assert runtime.run_dir(root, "x", str(tmp_path / "elsewhere.ckpt")).endswith("_x")
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    job = runtime.run_dir(root, "grpo_arith_s0")
    assert job.endswith("-slurm4242_grpo_arith_s0")
    Path(job).mkdir(parents=True)
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    assert runtime.run_dir(root, "grpo_arith_s0") == job  # the requeued job: the directory it started
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "9")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "3")
    assert runtime.slurm_job() == "9_3"


def test_cpu_share_splits_the_cores_among_live_jobs_on_them(tmp_path):
    before = torch.get_num_threads()
    cores = runtime.cpus()
    other = subprocess.Popen(["sleep", "60"])
    try:
        share = runtime.CpuShare(registry=tmp_path)
        assert share.jobs() == 1 and torch.get_num_threads() == len(cores)
        (tmp_path / str(other.pid)).write_text(" ".join(map(str, sorted(cores))))  # a second job on the same cores
        (tmp_path / "999999999").write_text("0")  # a dead job's entry: removed
        (tmp_path / str(os.getppid())).write_text("100000")  # a live job pinned to other cores: not counted
        share.update()
        assert share.jobs() == 2 and torch.get_num_threads() == max(1, len(cores) // 2)
        assert not (tmp_path / "999999999").exists()
        other.kill()
        other.wait()
        share.update()  # the other job ended: this one takes its threads back
        assert share.jobs() == 1 and torch.get_num_threads() == len(cores)
        assert runtime.CpuShare(3, registry=tmp_path).threads() == 3
        share.close()
        assert not (tmp_path / str(os.getpid())).exists()
    finally:
        other.kill()
        torch.set_num_threads(before)


@pytest.mark.parametrize(
    "value,kwargs,message",
    [(0, {"low": 0, "low_open": True}, "must be > 0"), (1.5, {"high": 1}, "must be <= 1"), (2.0, {"integer": True}, "must be an integer"),
     (float("inf"), {}, "must be a number"), (True, {}, "must be a number"), ("3", {}, "must be a number"), (1, {"high": 1, "high_open": True}, "must be < 1")],
)
def test_check_range_names_key_value_and_bound(value, kwargs, message):
    with pytest.raises(ConfigError, match=f"^k={value!r} {message}"):
        check_range("k", value, **kwargs)
    check_range("k", 0.5, low=0, high=1)


def test_slurm_auto_requeue_saves_requeues_and_the_requeued_job_continues_in_its_directory(tmp_path):
    """Lightning's SLURM handling with ours: SIGUSR1 saves hpc_ckpt and calls `scontrol requeue <job>` (a stub here),
    SLURM's SIGTERM stops the job at the next step; the requeued job (same job id, SLURM_RESTART_COUNT=1) finds its
    run directory by the job id and resumes from the newest checkpoint."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text(f'#!/bin/sh\necho "$@" >> {tmp_path / "scontrol.log"}\n')
    (bin_dir / "scontrol").chmod(0o755)
    slurm = {"SLURM_JOB_ID": "777", "SLURM_NTASKS": "1", "SLURM_JOB_NAME": "grpokd", "SLURM_PROCID": "0",
             "SLURM_LOCALID": "0", "SLURM_NODEID": "0", "SLURM_NODELIST": "localhost"}
    env = {**os.environ, **slurm, "PATH": f"{bin_dir}:{os.environ['PATH']}", "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
    cmd = [sys.executable, str(REPO / "run.py"), *TINY, "objective=grpo", "trainer.max_steps=40", "log.samples_every=1",
           "eval_before=false", "trainer.val_check_interval=10"]
    job = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while time.time() < deadline and not list(tmp_path.glob("outputs/*/*-slurm777_grpo_arith_s0/samples.jsonl")):
        time.sleep(0.2)
    run_dir = next(tmp_path.glob("outputs/*/*-slurm777_grpo_arith_s0"))
    while time.time() < deadline and not ((run_dir / "samples.jsonl").is_file() and (run_dir / "samples.jsonl").read_text().count("\n") >= 3 * 8):
        time.sleep(0.2)
    job.send_signal(signal.SIGUSR1)
    while time.time() < deadline and not (tmp_path / "scontrol.log").is_file():
        time.sleep(0.2)
    job.send_signal(signal.SIGTERM)
    _, err = job.communicate(timeout=120)
    assert job.returncode == 143, err[-3000:]
    assert (tmp_path / "scontrol.log").read_text().split() == ["requeue", "777"]
    assert list(run_dir.glob("hpc_ckpt_*.ckpt")) and json.loads((run_dir / "results.json").read_text())["status"] == "interrupted"

    again = subprocess.run(cmd, cwd=tmp_path, env={**env, "SLURM_RESTART_COUNT": "1"}, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    final = json.loads((run_dir / "results.json").read_text())
    assert final["status"] == "complete" and final["steps"] == 40 and final["run_dir"] == str(run_dir)
