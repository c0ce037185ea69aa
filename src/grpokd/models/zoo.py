"""The embedded model zoo: tiny T5 and Llama-style models trained here, on first use.

No model hub is needed. Each entry is a `Recipe` (architecture + SFT
schedule); `ensure(name)` returns a local Hugging Face directory, building it
once with the platform's own SFT objective on the synthetic tasks (arith and
arith_mc mixed) and caching it under $GRPOKD_CACHE (default ~/.cache/grpokd),
in a folder keyed by the recipe's hash, so a changed recipe rebuilds. Builds
are atomic (a temporary folder renamed at the end) and serialised by a file
lock, so parallel jobs never see half-written models.

The family is made so that distillation has something to give: teachers are
larger and trained longer than the student, which is stopped early.
`python -m grpokd.models.zoo` builds everything and prints the accuracies.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import random
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedModel, PreTrainedTokenizerBase, T5Config, T5ForConditionalGeneration

from grpokd.data.example import Example
from grpokd.data.rewards import ChoiceReward, NumericReward
from grpokd.data.datamodule import collate
from grpokd.models.scoring import completion_logits, token_logp, tokenize_prompts, tokenize_targets
from grpokd.models.tokenizer import build_tokenizer
from grpokd.objectives.base import Batch
from grpokd.objectives.sft import SFT
from grpokd.rollout import Sampling, greedy_rewards

ZOO_VERSION = 1  # bump when the training code (not a recipe) changes what gets built
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


# Measured on the 2-core CPU (torch 2 threads): T5 d128 2+2 layers runs ~7-9 steps/s at batch 64,
# the Llama family learns the arithmetic about twice as fast per step as T5. Teachers differ in size
# and length (s < m); students are stopped early. arith_mc stays near chance (20%) at these budgets:
# the value -> letter look-up is learnt late.
ZOO: dict[str, Recipe] = {
    "tiny-t5-student": Recipe("t5", d_model=128, layers=2, heads=4, d_ff=256, steps=250),
    "tiny-t5-teacher-s": Recipe("t5", d_model=128, layers=2, heads=4, d_ff=256, steps=700, seed=1),
    "tiny-t5-teacher-m": Recipe("t5", d_model=160, layers=2, heads=4, d_ff=384, steps=1000, seed=2),
    "tiny-llama-student": Recipe("llama", d_model=128, layers=3, heads=4, d_ff=256, steps=150),
    "tiny-llama-teacher-s": Recipe("llama", d_model=128, layers=3, heads=4, d_ff=256, steps=500, seed=1),
    "tiny-llama-teacher-m": Recipe("llama", d_model=160, layers=4, heads=4, d_ff=320, steps=550, seed=2),
}


def cache_dir() -> Path:
    return Path(os.environ.get("GRPOKD_CACHE", Path.home() / ".cache" / "grpokd"))


def recipe_key(recipe: Recipe) -> str:
    """Hash of everything that determines the built model: recipe, tokenizer, data seed, zoo version."""
    tokenizer = build_tokenizer(recipe.family).backend_tokenizer.to_str()
    blob = json.dumps({"recipe": asdict(recipe), "tokenizer": tokenizer, "data": DATA_SEED, "v": ZOO_VERSION}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def ensure(name: str) -> Path:
    """The local directory of embedded model `name`, built on first use."""
    if name not in ZOO:
        raise KeyError(f"unknown embedded model {name!r}; available: {', '.join(ZOO)}")
    recipe = ZOO[name]
    target = cache_dir() / "zoo" / f"{name}-{recipe_key(recipe)}"
    if (target / "build.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with _locked(target.parent / f".{name}.lock"):
        if not (target / "build.json").exists():  # another process may have built it while we waited
            _build(name, recipe, target)
    return target


@contextlib.contextmanager
def _locked(path: Path):
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def training_data() -> tuple[list[Example], list[Example], list[Example]]:
    """The zoo's SFT mixture (arith + arith_mc train splits) and the two held-out test sets."""
    from grpokd.data import sources

    num, mc = sources.arith(seed=DATA_SEED), sources.arith_mc(seed=DATA_SEED)
    return num.train + mc.train, num.test[:200], mc.test[:200]


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
    return sum(greedy_rewards(model, tokenizer, b, reward, sampling).sum().item() for b in batches) / len(data)


@torch.enable_grad()  # a first use may come from inside a caller's no_grad block
def _build(name: str, recipe: Recipe, target: Path) -> None:
    tokenizer = build_tokenizer(recipe.family)
    model = init_model(recipe, tokenizer)
    train, test_num, test_mc = training_data()
    start = time.time()
    loss = sft_train(model, tokenizer, train, recipe, desc=f"building embedded {name}")
    report = {
        "name": name,
        "recipe": asdict(recipe),
        "params": sum(p.numel() for p in model.parameters()),
        "final_loss": loss,
        "train_seconds": round(time.time() - start, 1),
        "accuracy_arith": greedy_accuracy(model, tokenizer, test_num, NumericReward()),
        "accuracy_arith_mc": greedy_accuracy(model, tokenizer, test_mc, ChoiceReward()),
    }
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / "build.json").write_text(json.dumps(report, indent=2))
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    print(f"built {name}: {json.dumps({k: v for k, v in report.items() if k != 'recipe'})}")


def main() -> None:
    for name in ZOO:
        print(json.loads((ensure(name) / "build.json").read_text()))


if __name__ == "__main__":
    main()
