"""The embedded model zoo: tiny T5 and Llama-style models, and where to find their builds.

No model hub is needed. Each entry is a `Recipe` (architecture + SFT
schedule); `ensure(name)` returns a local Hugging Face directory named by the
recipe's key (a hash of the recipe, the tokenizer, the training data and
ZOO_VERSION), so a changed recipe or task never reuses a stale model. It looks
in two places:
- `grpokd/models/embedded/`, the built models shipped inside the package
  (about 2-5 MB each), so a fresh install trains nothing;
- $GRPOKD_CACHE/zoo (default ~/.cache/grpokd), where `python -m grpokd.zoo
  build NAME` (grpokd/zoo.py) puts a model it trains.
When neither holds a build for the current key, `ensure` raises a ConfigError
that names that command: loading a model never trains one.

The family is made so that RL and distillation both have room: the teachers
solve the tasks, and the causal student half-holds a systematic slip (its
training data is written by `grpokd.data.arith.slipped`), so the right answer
is among its samples but not its greedy choice (see the table in
docs/testbed.md). `python -m grpokd.zoo` prints every model's build report;
`python -m grpokd.zoo build --ship NAME` builds into the cache and copies the
result into `embedded/` (what a developer runs after changing a recipe or the
tasks).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedModel, PreTrainedTokenizerBase, T5Config, T5ForConditionalGeneration

from grpokd.errors import ConfigError
from grpokd.models.tokenizer import build_tokenizer
from grpokd.runtime import cache_dir

ZOO_VERSION = 2  # bump when the build code (grpokd/zoo.py, not a recipe) changes what gets built
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
    tasks: tuple[str, ...] = ("arith", "arith_mc")  # the synthetic tasks its SFT data comes from (a build is scored on both)
    tokenizer: str = "words"  # `grpokd.models.tokenizer` kind: "words" (the student's) or "subword" (numbers digit by digit)


LATE_FIELDS = {"slip": 0.0, "tasks": ("arith", "arith_mc"), "tokenizer": "words"}  # fields added after the first builds: left out of the key at their default


# Measured on the 2-core CPU (torch 2 threads, batch 64): the Llama family (d128, 3 layers) runs ~8 steps/s and
# learns both tasks (teachers 100% after 1500 steps). The student is the teacher-s architecture trained 1000 steps
# on data written with a systematic slip (`slip`: each "-" or "*" result one too high with probability 0.85, carried
# to the answer): it half-holds the slip, so the correct result is in its samples but not its greedy choice (docs/testbed.md,
# "The embedded testbed"). The earlier student, stopped early on clean data (150 steps: 21%; 300 steps: 91.5%),
# guessed its answers rather than computing them, and GRPO gained about +3 points on it. T5 (cross-attention
# without a position signal) learns the tasks far slower: 3+3-layer teachers reach 77% / 50.5% on arith after 2500
# steps; no T5 here has learnt arith_mc's option scan (all at chance, 20%). So the Llama family is the testbed
# (`model=tiny_causal`, the default) and the T5 family keeps the encoder-decoder path covered (`model=tiny`).
# The two specialists (teacher-s's architecture, each trained on one task only) are the teachers for teacher routing.
# teacher-subword is teacher-m with the subword tokenizer (numbers digit by digit, other ids): the teacher that does
# not share the student's tokenizer (`sweep=cross_tokenizer`).
ZOO: dict[str, Recipe] = {
    "tiny-t5-student": Recipe("t5", d_model=128, layers=2, heads=4, d_ff=256, steps=100),
    "tiny-t5-teacher-s": Recipe("t5", d_model=128, layers=3, heads=4, d_ff=256, steps=2500, seed=1),
    "tiny-t5-teacher-m": Recipe("t5", d_model=160, layers=3, heads=4, d_ff=384, steps=2500, seed=2),
    "tiny-llama-student": Recipe("llama", d_model=128, layers=3, heads=4, d_ff=256, steps=1000, slip=0.85),
    "tiny-llama-teacher-s": Recipe("llama", d_model=128, layers=3, heads=4, d_ff=256, steps=1500, seed=1),
    "tiny-llama-teacher-m": Recipe("llama", d_model=160, layers=4, heads=4, d_ff=320, steps=1500, seed=2),
    "tiny-llama-teacher-arith": Recipe("llama", d_model=128, layers=3, heads=4, d_ff=256, steps=1500, seed=3, tasks=("arith",)),
    "tiny-llama-teacher-mc": Recipe("llama", d_model=128, layers=3, heads=4, d_ff=256, steps=1500, seed=4, tasks=("arith_mc",)),
    "tiny-llama-teacher-subword": Recipe("llama", d_model=160, layers=4, heads=4, d_ff=320, steps=1500, seed=2, tokenizer="subword"),
}


def recipe_key(recipe: Recipe) -> str:
    """Hash of everything that determines the built model: recipe, tokenizer, task format, data seed, zoo version."""
    from grpokd.data import arith

    tokenizer = build_tokenizer(recipe.family, recipe.tokenizer).backend_tokenizer.to_str()
    tasks = [{"prompt": ex.prompt, "solution": ex.solution, "answer": ex.answer} for ex in arith.make_arith(20, DATA_SEED) + arith.make_arith_mc(20, DATA_SEED)]  # the format's fingerprint
    fields = {k: v for k, v in asdict(recipe).items() if not (k in LATE_FIELDS and v == LATE_FIELDS[k])}  # builds from before them keep their keys
    blob = json.dumps({"recipe": fields, "tokenizer": tokenizer, "tasks": tasks, "data": DATA_SEED, "v": ZOO_VERSION}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def folder_name(name: str) -> str:
    """`<name>-<recipe key>`: the directory of the build of `name`'s current recipe, shipped or cached."""
    if name not in ZOO:
        raise KeyError(f"unknown embedded model {name!r}; available: {', '.join(ZOO)}")
    return f"{name}-{recipe_key(ZOO[name])}"


def find(name: str) -> Path | None:
    """The build of `name`'s current recipe: the shipped copy, else the cached one, else None."""
    folder = folder_name(name)
    for place in (EMBEDDED_DIR, cache_dir() / "zoo"):
        if (place / folder / "build.json").exists():  # written last: a folder without it is no build
            return place / folder
    return None


def ensure(name: str) -> Path:
    """The local directory of embedded model `name`: the shipped copy, else the cached build, else a ConfigError."""
    found = find(name)
    if found is None:
        key = folder_name(name).rsplit("-", 1)[1]
        raise ConfigError(
            f"embedded model {name}: no shipped build matches its recipe key {key} (its recipe, tokenizer, tasks or "
            f"ZOO_VERSION changed) and {cache_dir() / 'zoo'} holds none; build it with `python -m grpokd.zoo build {name}`"
        )
    return found


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


if __name__ == "__main__":  # the build command lives outside the loader
    raise SystemExit("error: the zoo's command is `python -m grpokd.zoo` (list, build NAME, build --ship NAME)")

