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
from grpokd.models import convert, zoo

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
    (["dataset.sampling.max_new_tokens=0"], "dataset.sampling.max_new_tokens=0 must be >= 1"),  # the key typed, not the one that reads it
    (["dataset.sampling.max_new_tokens=1000000"], "dataset.sampling.max_new_tokens=1000000: model.student=tiny-llama-student has 120 positions"),
    (["objective=nosuch"], "Could not find 'objective/nosuch'; Available options in 'objective': grpo, j1, j2, j3, kdrl, opd, sft, tgpo"),
    (["dataset=nosuch"], "Available options in 'dataset': arith, arith_mc, gsm8k, jsonl, mathinstruct, mix"),
    (["reward.weights.nosuch=1"], "Could not override 'reward.weights.nosuch'; To append to your config use +reward.weights.nosuch=1; "
                                  "Key 'nosuch' is not in struct; the keys of reward.weights are: correct, format, steps"),
    (["objective=grpo", "objective.terms.kd.weight=1"], "the keys of objective.terms are: kl"),
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
    (["rollout.engine=nosuch"], "rollout.engine=nosuch: no such engine; the engines are builtin, vllm"),
    (["model=tiny", "rollout.engine=vllm"], "rollout.engine=vllm samples causal LMs only; model.student=tiny-t5-student is seq2seq"),
    (["rollout.importance_cap=0"], "rollout.importance_cap=0 must be > 0"),
    (["model.teacher_unmatched=sorted"], "model.teacher_unmatched='sorted' is not one of tail, uld"),
    (["mode=eval", "eval_split=train"], "eval_split='train' is not one of test, val"),
    (["mode=eval", "eval_split=val", "data.val_size=0"], "eval_split=val scores the validation split, and data.val_size=0 holds none out"),
    (["dataset.instruction_in=assistant"], "dataset.instruction_in='assistant' is not one of user, system"),
    (["dataset=reasoning_gym", "dataset.task=no_such_task"], "dataset.task=no_such_task: Dataset 'no_such_task' not registered"),
    (["objective=j1", 'model.teachers=[{url:"http://127.0.0.1:9/v1"}]'], "model.teachers[0] is served (top-k log-probs only): set model.teacher_top_k"),
    (["objective=j1", "model.teacher_top_k=5", 'model.teachers=[{url:"http://127.0.0.1:9/v1"}]'], "tau=2.0: model.teachers[0] is served and gives log-probs at temperature 1"),
    (["objective=j1", "model.teacher_top_k=5", "tau=1", 'model.teachers=[{url:"http://127.0.0.1:9/v1"}]'], "model.teachers[0]: no teacher server at http://127.0.0.1:9/v1"),
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


def test_an_unknown_sweep_ends_with_one_line_listing_the_sweeps(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, str(REPO / "sweep.py"), "sweep=nosuch", f"out={tmp_path / 'sweep'}"], cwd=REPO,
                         capture_output=True, text=True, timeout=120, env=env)
    errors = [line for line in out.stderr.splitlines() if line.strip()]
    assert out.returncode == 2 and len(errors) == 1, out.stderr[-3000:]
    sweeps = ", ".join(sorted(p.stem for p in (REPO / "conf" / "sweep").glob("*.yaml")))  # every sweep file, in Hydra's order
    assert errors[0].startswith("error: ") and f"Available options in 'sweep': {sweeps}" in errors[0], errors


def test_killed_and_finished_runs_are_never_removed_or_overwritten(tmp_path):
    """A run killed with SIGKILL (checkpoint, no results.json) keeps its directory through resumes with a typo;
    a resume under another objective is refused; a finished run's directory is never written again."""
    run_dir = tmp_path / "run"
    checkpoint = run_dir / "checkpoints" / "last.ckpt"
    args = [*TINY, "objective=grpo", "trainer.max_steps=40", "eval_before=false", "checkpoint_every=1", "log.samples_every=0",
            f"paths.outputs={tmp_path / 'outputs'}"]
    job = start_cli(*args, f"hydra.run.dir={run_dir}")
    deadline = time.time() + 240
    while time.time() < deadline and not checkpoint.is_file():
        time.sleep(0.2)
    job.kill()
    job.communicate(timeout=60)
    assert checkpoint.is_file() and not (run_dir / "results.json").exists()
    saved, config = checkpoint.read_bytes(), (run_dir / ".hydra" / "overrides.yaml").read_text()

    def refused(*more: str) -> str:
        out = run_cli(*args, *more)
        errors = [line for line in out.stderr.splitlines() if line.strip()]
        assert out.returncode == 2 and len(errors) == 1 and errors[0].startswith("error: "), out.stderr[-3000:]
        assert checkpoint.read_bytes() == saved or (run_dir / "results.json").is_file()  # the checkpoint is still there
        assert (run_dir / ".hydra" / "overrides.yaml").read_text() == config or (run_dir / "results.json").is_file()
        assert not list((run_dir / ".hydra").glob("before-*")) or (run_dir / "results.json").is_file()  # put back
        return errors[0]

    assert "optim.lr='fast' must be a number" in refused(f"ckpt_path={checkpoint}", "optim.lr=fast")
    assert "optim.lr='fast' must be a number" in refused("resume=true", f"hydra.run.dir={run_dir}", "optim.lr=fast")
    message = refused(f"ckpt_path={checkpoint}", "objective=j1")
    assert "a checkpoint of a objective=grpo run, and this run is objective=j1; resume it with objective=grpo" in message

    done = run_cli(*args, f"ckpt_path={checkpoint}")  # the resume as it should be: in the killed run's directory
    assert done.returncode == 0 and f"run directory: {run_dir}" in done.stdout, done.stderr[-3000:]
    results = (run_dir / "results.json").read_text()
    assert json.loads(results)["status"] == "complete" and "test accuracy (16 problems, 95% intervals):" in done.stdout
    kept = list((run_dir / ".hydra").glob("before-*"))  # the resume keeps the killed part's config beside its own
    assert len(kept) == 1 and (kept[0] / "overrides.yaml").read_text() == config

    assert "holds a finished run" in refused(f"hydra.run.dir={run_dir}", "objective=j1")
    assert "a checkpoint of a objective=grpo run" in refused(f"ckpt_path={checkpoint}", "objective=j1")
    more = run_cli(*args, f"ckpt_path={checkpoint}", "trainer.max_steps=42")
    assert more.returncode == 0, more.stderr[-3000:]
    new_dir = Path(more.stdout.split("run directory: ")[-1].strip())
    assert new_dir.parent.parent == tmp_path / "outputs" and json.loads((new_dir / "results.json").read_text())["steps"] == 42
    assert (run_dir / "results.json").read_text() == results  # the finished run's results as they were


def test_a_dataset_the_tokenizer_does_not_cover_stops_with_the_share_and_an_override_exists(shared_data, tmp_path):
    gsm8k = ["dataset=gsm8k", f"dataset.path={shared_data / 'gsm8k'}", "dataset.sampling.max_new_tokens=64"]  # 120 positions
    out = run_cli(*TINY, *gsm8k, "mode=eval", f"hydra.run.dir={tmp_path / 'run'}")
    assert out.returncode == 2, out.stderr[-3000:]
    error = out.stderr.strip().splitlines()[-1]
    assert "dataset gsm8k: the tokenizer of model.student=tiny-llama-student does not cover it" in error
    assert "% of tokens unknown" in error and "check_tokenizer=false" in error
    assert not (tmp_path / "run").exists()
    forced = run_cli(*TINY, *gsm8k, "mode=eval", "check_tokenizer=false", f"hydra.run.dir={tmp_path / 'forced'}")
    assert forced.returncode == 0 and json.loads((tmp_path / "forced" / "results.json").read_text())["status"] == "complete"



def start_convert(src: str, dst: Path) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
    return subprocess.Popen([sys.executable, "-m", "grpokd.models.convert", src, str(dst)], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def temp_folders(dst: Path) -> list[Path]:
    return sorted(dst.parent.glob(f".{dst.name}.*.tmp"))


def wait_for_temp_folder(job: subprocess.Popen, dst: Path) -> Path:
    """The temp folder of a running conversion, once made (before its model loads: about a second before it ends)."""
    deadline = time.time() + 120
    while not temp_folders(dst) and job.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    assert job.poll() is None, job.communicate()[1][-3000:]
    return temp_folders(dst)[0]


def test_convert_to_an_unwritable_destination_ends_before_loading(tmp_path, capsys):
    (tmp_path / "file").write_text("")  # a path under a regular file: not writable, even by root
    with pytest.raises(SystemExit) as stop:
        convert.main(["tiny-llama-student", str(tmp_path / "file" / "out")])
    errors = capsys.readouterr().err.strip().splitlines()
    assert stop.value.code == 2 and errors == [f"error: DST: cannot write {tmp_path / 'file' / 'out'} (Not a directory); pick a directory you can write"]


def test_the_next_conversion_removes_the_temp_folder_of_a_killed_one_and_keeps_live_ones(tmp_path):
    dst = tmp_path / "out"
    killed = start_convert("tiny-llama-student", dst)
    stale = wait_for_temp_folder(killed, dst)
    killed.kill()  # kill -9: no `finally` runs
    killed.communicate(timeout=60)
    assert stale.is_dir() and stale.name == f".out.{killed.pid}.tmp"
    live = [tmp_path / f".out.{os.getpid()}.tmp", tmp_path / ".out.1.tmp", tmp_path / ".other.999999999.tmp"]  # running; another DST's
    for folder in live:
        folder.mkdir()
    again = start_convert("tiny-llama-student", dst)
    _, err = again.communicate(timeout=300)
    assert again.returncode == 0, err[-3000:]
    assert f"removed {stale}, the temp folder of a killed conversion (pid {killed.pid})" in err
    assert not stale.exists() and all(folder.is_dir() for folder in live) and (dst / "model.safetensors").is_file()


def test_sigterm_during_a_conversion_removes_its_temp_folder(tmp_path):
    dst = tmp_path / "out"
    job = start_convert("tiny-llama-student", dst)
    wait_for_temp_folder(job, dst)
    job.send_signal(signal.SIGTERM)
    _, err = job.communicate(timeout=60)
    assert job.returncode == 128 + signal.SIGTERM, err[-3000:]
    assert list(tmp_path.iterdir()) == []

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
    stopped_at = {int(r["step"]) for r in read_rows(run_dir) if r.get("val/accuracy")}
    assert stopped_at <= {9, 19, 29}, stopped_at  # validated every 10 steps only: a stop does not wait for a val pass

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
    assert runtime.check_checkpoint(str(path)).step == 1


def test_run_directory_names_resume_and_slurm(tmp_path, monkeypatch):
    for var in ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_RESTART_COUNT"):
        monkeypatch.delenv(var, raising=False)
    root = str(tmp_path / "outputs")
    first = runtime.run_dir(root, "grpo_arith_s0")
    assert first.endswith(f"-p{os.getpid()}_grpo_arith_s0")  # unique across processes: test_two_runs_started_together
    (Path(first) / ".hydra").mkdir(parents=True)
    assert runtime.run_dir(root, "other", f"{first}/checkpoints/last.ckpt") == first  # resuming a run's own checkpoint
    (Path(first) / "results.json").write_text('{"status": "complete"}')
    assert runtime.run_dir(root, "other", f"{first}/checkpoints/last.ckpt").endswith("_other")  # a finished run: a new directory
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
        squeezed = runtime.CpuShare(registry=tmp_path)  # alone: all the cores; closed, the threads it found
        torch.set_num_threads(1)
        squeezed.close()
        assert torch.get_num_threads() == squeezed.before
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
