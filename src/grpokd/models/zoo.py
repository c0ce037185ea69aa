"""The embedded model zoo: tiny T5 and Llama-style models trained here, on first use.

No model hub is needed. Each entry is a `Recipe` (architecture + SFT
schedule); `ensure(name)` returns a local Hugging Face directory named by the
recipe's key (a hash of the recipe, the tokenizer, the training data and
ZOO_VERSION), so a changed recipe or task never reuses a stale model. It looks
in two places:
- `grpokd/models/embedded/`, the built models shipped inside the package
  (about 2-5 MB each), so a fresh install trains nothing;
- $GRPOKD_CACHE/zoo (default ~/.cache/grpokd), where a model whose key has no
  shipped copy is built on first use with the platform's own SFT objective on
  the synthetic tasks (arith and arith_mc mixed). Builds are atomic (a
  temporary folder renamed at the end) and serialised by a file lock (filelock).

The family is made so that RL and distillation both have room: the teachers
solve the tasks, and the causal student half-holds a systematic slip (its
training data is written by `grpokd.data.arith.slipped`), so the right answer
is among its samples but not its greedy choice (see the README's testbed
table). `python -m grpokd.models.zoo` prints every model's build report;
`--ship` rebuilds into the cache and copies the results into `embedded/`
(what a developer runs after changing a recipe or the tasks).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from filelock import FileLock
from tqdm.auto import tqdm
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedModel, PreTrainedTokenizerBase, T5Config, T5ForConditionalGeneration

from grpokd.data.datamodule import collate
from grpokd.data.example import Example
from grpokd.data.rewards import ChoiceReward, NumericReward
from grpokd.evaluation import greedy
from grpokd.models.lm import completion_logits, decode, generate, token_logp, tokenize_prompts, tokenize_targets
from grpokd.models.tokenizer import build_tokenizer
from grpokd.objectives.base import Batch
from grpokd.objectives.sft import SFT
from grpokd.rollout import Sampling

ZOO_VERSION = 2  # bump when the training code (not a recipe) changes what gets built
EMBEDDED_DIR = Path(__file__).parent / "embedded"  # built models shipped with the package
DATA_SEED = 1234
PROMPT_LEN, TARGET_LEN = 64, 48


@dataclass(frozen=True)
class Recipe:
    """Architecture and SFT schedule of one embedded model."""

    family: str  # "t5" (encoder-decoder) or "llama" (decoder-only)
    d_model: int
    layers: int  # per stack (T5: encoder and decoder each)
    heads: int
    d_ff: int
    steps: int
    batch_size: int = 64
    lr: float = 3e-3
    seed: int = 0
    slip: float = 0.0  # rate of the systematic slip in its training data (`grpokd.data.arith.slipped`)


# Measured on the 2-core CPU (torch 2 threads, batch 64): the Llama family (d128, 3 layers) runs ~8 steps/s and
# learns both tasks (teachers 100% after 1500 steps). The student is the teacher-s architecture trained 1000 steps
# on data written with a systematic slip (`slip`: each "-" or "*" result one too high with probability 0.85, carried
# to the answer): it half-holds the slip, so the correct result is in its samples but not its greedy choice (README,
# "The embedded testbed"). The earlier student, stopped early on clean data (150 steps: 21%; 300 steps: 91.5%),
# guessed its answers rather than computing them, and GRPO gained about +3 points on it. T5 (cross-attention
# without a position signal) learns the tasks far slower: 3+3-layer teachers reach 77% / 50.5% on arith after 2500
# steps; no T5 here has learnt arith_mc's option scan (all at chance, 20%). So the Llama family is the testbed
# (`model=tiny_causal`, the default) and the T5 family keeps the encoder-decoder path covered (`model=tiny`).
ZOO: dict[str, Recipe] = {
    "tiny-t5-student": Recipe("t5", d_model=128, layers=2, heads=4, d_ff=256, steps=100),
    "tiny-t5-teacher-s": Recipe("t5", d_model=128, layers=3, heads=4, d_ff=256, steps=2500, seed=1),
    "tiny-t5-teacher-m": Recipe("t5", d_model=160, layers=3, heads=4, d_ff=384, steps=2500, seed=2),
    "tiny-llama-student": Recipe("llama", d_model=128, layers=3, heads=4, d_ff=256, steps=1000, slip=0.85),
    "tiny-llama-teacher-s": Recipe("llama", d_model=128, layers=3, heads=4, d_ff=256, steps=1500, seed=1),
    "tiny-llama-teacher-m": Recipe("llama", d_model=160, layers=4, heads=4, d_ff=320, steps=1500, seed=2),
}


def cache_dir() -> Path:
    return Path(os.environ.get("GRPOKD_CACHE", Path.home() / ".cache" / "grpokd"))


def recipe_key(recipe: Recipe) -> str:
    """Hash of everything that determines the built model: recipe, tokenizer, task format, data seed, zoo version."""
    from grpokd.data import arith

    tokenizer = build_tokenizer(recipe.family).backend_tokenizer.to_str()
    tasks = [asdict(ex) for ex in arith.make_arith(20, DATA_SEED) + arith.make_arith_mc(20, DATA_SEED)]  # the format's fingerprint
    fields = {k: v for k, v in asdict(recipe).items() if not (k == "slip" and v == 0.0)}  # builds from before the field keep their keys
    blob = json.dumps({"recipe": fields, "tokenizer": tokenizer, "tasks": tasks, "data": DATA_SEED, "v": ZOO_VERSION}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def ensure(name: str) -> Path:
    """The local directory of embedded model `name`: the shipped copy, else the cache, else built now."""
    if name not in ZOO:
        raise KeyError(f"unknown embedded model {name!r}; available: {', '.join(ZOO)}")
    recipe = ZOO[name]
    folder = f"{name}-{recipe_key(recipe)}"
    if (EMBEDDED_DIR / folder / "build.json").exists():
        return EMBEDDED_DIR / folder
    target = cache_dir() / "zoo" / folder
    if (target / "build.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(target.parent / f".{name}.lock"):
        if not (target / "build.json").exists():  # another process may have built it while we waited
            _build(name, recipe, target)
    return target


def training_data(slip: float = 0.0, seed: int = 0) -> tuple[list[Example], list[Example], list[Example]]:
    """The zoo's SFT mixture (arith + arith_mc train splits, written with `slip`) and the two held-out test sets."""
    from grpokd.data import arith, sources

    num, mc = sources.arith(seed=DATA_SEED), sources.arith_mc(seed=DATA_SEED)
    train = num.train + mc.train
    if slip > 0:
        rng = random.Random(seed)
        train = [arith.slipped(ex, rng, slip) for ex in train]
    return train, num.test[:200], mc.test[:200]


def init_model(recipe: Recipe, tokenizer: PreTrainedTokenizerBase) -> PreTrainedModel:
    """A randomly initialised model of the recipe's architecture."""
    torch.manual_seed(recipe.seed)
    common = dict(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    if recipe.family == "t5":
        config = T5Config(
            d_model=recipe.d_model, d_kv=recipe.d_model // recipe.heads, d_ff=recipe.d_ff, num_layers=recipe.layers,
            num_decoder_layers=recipe.layers, num_heads=recipe.heads, dropout_rate=0.0, decoder_start_token_id=tokenizer.pad_token_id,
            feed_forward_proj="relu", tie_word_embeddings=True, **common,
        )
        return T5ForConditionalGeneration(config)
    config = LlamaConfig(
        hidden_size=recipe.d_model, intermediate_size=recipe.d_ff, num_hidden_layers=recipe.layers, num_attention_heads=recipe.heads,
        num_key_value_heads=recipe.heads, max_position_embeddings=PROMPT_LEN + TARGET_LEN + 8, bos_token_id=tokenizer.bos_token_id,
        tie_word_embeddings=True, **common,
    )
    return LlamaForCausalLM(config)


def sft_train(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, data: list[Example], recipe: Recipe, desc: str) -> float:
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
        prompts = tokenize_prompts(tokenizer, [ex.prompt for ex in batch], PROMPT_LEN)
        targets = tokenize_targets(tokenizer, [ex.solution for ex in batch], TARGET_LEN)
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


def greedy_accuracy(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, data: list[Example], reward, batch_size: int = 100) -> float:
    """Fraction of `data` whose greedy completion earns reward 1."""
    model.eval()
    sampling = Sampling(max_prompt_len=PROMPT_LEN, max_new_tokens=TARGET_LEN)
    batches = (collate(data[i : i + batch_size]) for i in range(0, len(data), batch_size))
    return sum(greedy(model, tokenizer, b, reward, sampling).rewards.sum().item() for b in batches) / len(data)


@torch.no_grad()
def pass_at_k(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, data: list[Example], reward, k: int = 8, temperature: float = 1.0) -> tuple[float, float]:
    """(pass@1, pass@k) from k samples per problem at `temperature`: mean reward, and the fraction with any reward."""
    model.eval()
    prompts = tokenize_prompts(tokenizer, [ex.prompt for ex in data], PROMPT_LEN)  # [B, P]
    completions = generate(model, tokenizer, prompts, k, TARGET_LEN, do_sample=True, temperature=temperature)  # [B*K, T]
    answers = [ex.answer for ex in data for _ in range(k)]
    rewards = torch.tensor([reward(t, a) for t, a in zip(decode(tokenizer, completions), answers)]).view(len(data), k)  # [B, K]
    return rewards.mean().item(), rewards.amax(-1).mean().item()


def portable_tokenizer_config(folder: Path) -> None:
    """Name the fast tokenizer class and its inputs in folder/tokenizer_config.json: transformers 5 writes TokenizersBackend, which 4.x cannot load."""
    path = folder / "tokenizer_config.json"
    config = json.loads(path.read_text())
    config.update(tokenizer_class="PreTrainedTokenizerFast", model_input_names=["input_ids", "attention_mask"])
    path.write_text(json.dumps(config, indent=2, sort_keys=True, ensure_ascii=False) + "\n")


@torch.enable_grad()  # a first use may come from inside a caller's no_grad block
def _build(name: str, recipe: Recipe, target: Path) -> None:
    tokenizer = build_tokenizer(recipe.family)
    model = init_model(recipe, tokenizer)
    train, test_num, test_mc = training_data(recipe.slip, recipe.seed)
    start = time.time()
    loss = sft_train(model, tokenizer, train, recipe, desc=f"building embedded {name}")
    torch.manual_seed(0)
    pass1, pass8 = pass_at_k(model, tokenizer, [ex for ex in train if ex.answer.isdigit()][:200], NumericReward())
    report = {
        "name": name,
        "recipe": asdict(recipe),
        "params": sum(p.numel() for p in model.parameters()),
        "final_loss": loss,
        "train_seconds": round(time.time() - start, 1),
        "accuracy_arith": greedy_accuracy(model, tokenizer, test_num, NumericReward()),
        "accuracy_arith_mc": greedy_accuracy(model, tokenizer, test_mc, ChoiceReward()),
        "arith_train_pass1_t1": pass1,  # sampled at temperature 1, 8 samples on 200 arith training prompts
        "arith_train_pass8_t1": pass8,
    }
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    portable_tokenizer_config(tmp)
    (tmp / "build.json").write_text(json.dumps(report, indent=2))
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    print(f"built {name}: {json.dumps({k: v for k, v in report.items() if k != 'recipe'})}")


def ship(name: str) -> Path:
    """Build `name` (or reuse its cached build) and copy it into EMBEDDED_DIR, replacing older builds of it."""
    recipe = ZOO[name]
    folder = f"{name}-{recipe_key(recipe)}"
    for stale in EMBEDDED_DIR.glob(f"{name}-*"):
        if stale.name != folder:
            shutil.rmtree(stale)
    if not (EMBEDDED_DIR / folder / "build.json").exists():
        built = cache_dir() / "zoo" / folder
        if not (built / "build.json").exists():
            built.parent.mkdir(parents=True, exist_ok=True)
            with FileLock(built.parent / f".{name}.lock"):
                _build(name, recipe, built)
        shutil.copytree(built, EMBEDDED_DIR / folder)
    return EMBEDDED_DIR / folder


def main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(description="Build (if needed) and describe the embedded models.")
    parser.add_argument("--ship", action="store_true", help=f"copy the builds into {EMBEDDED_DIR} (the package's shipped models)")
    parser.add_argument("names", nargs="*", default=list(ZOO), help="models to build (default: all)")
    args = parser.parse_args(argv)
    for name in args.names:
        path = ship(name) if args.ship else ensure(name)
        print(json.loads((path / "build.json").read_text()))


if __name__ == "__main__":
    main()
