"""Build the embedded models (`grpokd.models.zoo`) and describe their builds.

    python -m grpokd.zoo [list [NAME...]]        print each model's build report (build.json), one JSON line each
    python -m grpokd.zoo build [NAME...]         train the models whose current recipe has no build (default: all)
                                                 into $GRPOKD_CACHE/zoo
    python -m grpokd.zoo build --ship [NAME...]  also copy the builds into grpokd/models/embedded, the package's
                                                 shipped models, replacing older builds of them

A build trains the recipe's architecture from scratch with the platform's SFT
objective (`grpokd.objectives.sft.SFT`) on its recipe's `tasks` (arith and
arith_mc mixed, or one of them for a specialist; the student's data written
with its recipe's `slip`), then writes a report scored by `grpokd.evaluation`:
greedy accuracy on 200 held-out problems of each task (both, whatever it
trained on), and pass@1 / pass@8 from 8 samples at temperature 1 on 200 arith
training prompts. Builds are atomic (a temporary folder renamed at
the end) and serialised by a file lock, so concurrent builds of one model
train it once. `--ship` is what a developer runs after changing a recipe or
the tasks (all nine: about 33 minutes on a 2-core CPU); a test fails while a
recipe has no shipped build. Exit status 2 and one `error:` line for an
unknown name; `list` exits 1 when a model has no build.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch
from filelock import FileLock
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from grpokd import evaluation
from grpokd.data.example import Example
from grpokd.data.rewards import ChoiceReward, NumericReward
from grpokd.data.sources import Splits
from grpokd.errors import ConfigError
from grpokd.models import zoo as catalogue
from grpokd.models.lm import completion_logits, token_logp, tokenize_prompts, tokenize_targets
from grpokd.models.tokenizer import build_tokenizer
from grpokd.objectives.base import Batch
from grpokd.objectives.sft import SFT
from grpokd.rollout import Sampling
from grpokd.runtime import cache_dir

EVAL_SAMPLING = Sampling(max_prompt_len=catalogue.PROMPT_LEN, max_new_tokens=catalogue.TARGET_LEN, temperature=1.0)  # greedy ignores the temperature
PASS_K, PASS_PROMPTS, PASS_SEED = 8, 200, 0


def build(name: str) -> Path:
    """The build of `name`'s current recipe: the shipped or cached copy if there is one, else trained now into
    $GRPOKD_CACHE/zoo (under a file lock: a concurrent build of the same model is waited for, not repeated)."""
    check_names([name])
    found = catalogue.find(name)
    if found is not None:
        return found
    target = cache_dir() / "zoo" / catalogue.folder_name(name)
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(target.parent / f".{name}.lock"):
        if not (target / "build.json").exists():  # another process may have built it while we waited
            _build(name, catalogue.ZOO[name], target)
    return target


def ship(name: str) -> Path:
    """Build `name` (or reuse its build) and copy it into the package's embedded/ folder, removing the shipped builds of older recipes."""
    built = build(name)
    shipped = catalogue.EMBEDDED_DIR / built.name
    for old in catalogue.EMBEDDED_DIR.glob(f"{name}-*"):
        if old.name.rsplit("-", 1)[0] == name and old != shipped:  # not another model whose name starts with `name`
            shutil.rmtree(old)
    if built != shipped:
        tmp = shipped.with_name(f".{shipped.name}.tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(built, tmp)
        tmp.rename(shipped)
    return shipped


def check_names(names: list[str]) -> None:
    unknown = [n for n in names if n not in catalogue.ZOO]
    if unknown:
        models = "model" if len(unknown) == 1 else "models"
        raise ConfigError(f"unknown embedded {models} {', '.join(map(repr, unknown))}; available: {', '.join(catalogue.ZOO)}")


def training_data(recipe: catalogue.Recipe) -> tuple[list[Example], dict[str, Splits]]:
    """The recipe's SFT data (the train splits of its `tasks`, in order, written with its `slip`) and the splits of
    every task (a build is scored on all of them)."""
    from grpokd.data import arith, sources

    splits = {"arith": sources.arith(seed=catalogue.DATA_SEED), "arith_mc": sources.arith_mc(seed=catalogue.DATA_SEED)}
    train = [ex for task in recipe.tasks for ex in splits[task].train]
    if recipe.slip > 0:
        rng = random.Random(recipe.seed)
        train = [arith.slipped(ex, rng, recipe.slip) for ex in train]
    return train, splits


def sft_train(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, data: list[Example], recipe: catalogue.Recipe, desc: str) -> float:
    """Train with the platform's SFT objective (AdamW, linear warm-up then cosine decay); returns the last loss."""
    rng = random.Random(recipe.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=0.0)
    warmup = max(1, recipe.steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * (0.1 + 0.45 * (1 + torch.cos(torch.tensor(torch.pi * s / recipe.steps)).item()))
    )
    objective, loss = SFT(), torch.tensor(float("nan"))
    model.train()
    bar = tqdm(range(recipe.steps), desc=desc, unit="step", dynamic_ncols=True)
    for _ in bar:
        batch = rng.sample(data, recipe.batch_size)
        prompts = tokenize_prompts(tokenizer, [ex.prompt for ex in batch], catalogue.PROMPT_LEN)
        targets = tokenize_targets(tokenizer, [ex.solution for ex in batch], catalogue.TARGET_LEN)
        logp = token_logp(completion_logits(model, prompts, targets), targets.ids)  # [N, T]
        loss = objective(Batch(logp=logp, mask=targets.mask.float())).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    model.eval()
    return loss.item()


def portable_tokenizer_config(folder: Path) -> None:
    """Name the fast tokenizer class and its inputs in folder/tokenizer_config.json: transformers 5 writes TokenizersBackend, which 4.x cannot load."""
    path = folder / "tokenizer_config.json"
    config = json.loads(path.read_text())
    config.update(tokenizer_class="PreTrainedTokenizerFast", model_input_names=["input_ids", "attention_mask"])
    path.write_text(json.dumps(config, indent=2, sort_keys=True, ensure_ascii=False) + "\n")


@torch.enable_grad()  # a caller may hold a no_grad block
def _build(name: str, recipe: catalogue.Recipe, target: Path) -> None:
    tokenizer = build_tokenizer(recipe.family, recipe.tokenizer)
    model = catalogue.init_model(recipe, tokenizer)
    train, splits = training_data(recipe)
    start = time.time()
    loss = sft_train(model, tokenizer, train, recipe, desc=f"building embedded {name}")
    numeric = splits["arith"].train[:PASS_PROMPTS]  # also for a recipe that did not train on arith
    pass1, pass8 = evaluation.pass_rates(model, tokenizer, numeric, NumericReward(), EVAL_SAMPLING, PASS_K, PASS_SEED)
    report = {
        "name": name,
        "recipe": asdict(recipe),
        "params": sum(p.numel() for p in model.parameters()),
        "final_loss": loss,
        "train_seconds": round(time.time() - start, 1),
        "accuracy_arith": evaluation.accuracy(model, tokenizer, splits["arith"].test[:200], NumericReward(), EVAL_SAMPLING),
        "accuracy_arith_mc": evaluation.accuracy(model, tokenizer, splits["arith_mc"].test[:200], ChoiceReward(), EVAL_SAMPLING),
        "arith_train_pass1_t1": pass1,  # sampled at temperature 1, 8 samples on 200 arith training prompts
        "arith_train_pass8_t1": pass8,
    }
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    portable_tokenizer_config(tmp)
    (tmp / "build.json").write_text(json.dumps(report, indent=2))  # written last: `catalogue.find` takes a folder with it for a build
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    print(f"built {name}: {json.dumps({k: v for k, v in report.items() if k != 'recipe'})}", file=sys.stderr)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m grpokd.zoo", description="Build and describe the embedded models (grpokd.models.zoo).")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    listing = commands.add_parser("list", help="print each model's build report, one JSON line each (the default command)")
    listing.add_argument("names", nargs="*", metavar="NAME", help=f"models to describe (default: all: {', '.join(catalogue.ZOO)})")
    building = commands.add_parser("build", help=f"train the models whose recipe has no shipped or cached build, into {cache_dir() / 'zoo'}")
    building.add_argument("names", nargs="*", metavar="NAME", help=f"models to build (default: all: {', '.join(catalogue.ZOO)})")
    building.add_argument("--ship", action="store_true", help=f"also copy the builds into {catalogue.EMBEDDED_DIR} (the package's shipped models)")
    args = parser.parse_args(argv)
    names = args.names if args.command else []
    try:
        check_names(names)
        names = names or list(catalogue.ZOO)
        if args.command == "build":
            for name in names:
                path = ship(name) if args.ship else build(name)
                print(json.dumps({"path": str(path), **json.loads((path / "build.json").read_text())}))
            return
        found = {name: catalogue.find(name) for name in names}
        for path in filter(None, found.values()):
            print(json.dumps({"path": str(path), **json.loads((path / "build.json").read_text())}))
        missing = [name for name, path in found.items() if path is None]
        if missing:
            print(f"no build for the current recipe of {', '.join(missing)}; python -m grpokd.zoo build {' '.join(missing)}", file=sys.stderr)
            sys.exit(1)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
