"""Training on several datasets at once (`dataset=mix`): named components, each keeping its own reward and prompt format.

A component is one dataset config (conf/dataset/*.yaml) under `dataset.components.<name>`, with a sampling
`weight`. Every example is tagged with its component's name, so that it is rewarded by that component's
reward (`rewards.ComponentRewards`), shown with that component's template and instruction, reported under
train/<component>/reward_mean, val/<component>/accuracy and test/<component>/accuracy, and routed to that
component's teacher (`weighting=route`). A run on one dataset is a mixture of one component, named after it.

Sampling weights: the train split holds each component in proportion to its weight, w_c / sum w of the
components' train examples together (a component whose share is larger than its own train split repeats its
examples, each pass in a new seeded order); it is then shuffled, so that the validation slice held out from
its end has the components in the same proportions. The test split interleaves the components' test examples,
so that `data.test_size` takes as many of each.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass, replace

from grpokd.data.datamodule import apply_template
from grpokd.data.example import Example
from grpokd.data.prompts import PromptFormat
from grpokd.data.sources import Splits
from grpokd.errors import ConfigError


@dataclass(frozen=True)
class Component:
    """One dataset of a run: its examples (with its template applied), reward, prompt format and sampling weight."""

    name: str
    splits: Splits
    reward: Callable[[str, str], float]
    prompt_format: PromptFormat
    weight: float = 1.0


def check_weights(weights: dict[str, float], key: str = "dataset.weights") -> None:
    """Sampling weights: each a finite number >= 0, and their sum > 0."""
    for name, weight in weights.items():
        if not isinstance(weight, (int, float)) or isinstance(weight, bool) or not math.isfinite(weight) or weight < 0:
            raise ConfigError(f"{key}.{name}={weight} must be a number >= 0")
    if sum(weights.values()) <= 0:
        raise ConfigError(f"{key} sum to {sum(weights.values())}: give at least one component a positive weight, e.g. {key}.{next(iter(weights))}=1")


def tagged(examples: list[Example], name: str, template: str, key: str) -> list[Example]:
    """The examples with `template` applied to their prompts and `component` set to `name`."""
    return [replace(ex, component=name) for ex in apply_template(examples, template, key)]


def mix(components: list[Component], seed: int = 0) -> Splits:
    """The train and test splits of the components together (see the module docstring); one component: its own."""
    for c in components:
        if not c.splits.train or not c.splits.test:
            empty = "train" if not c.splits.train else "test"
            if len(components) == 1:
                raise ConfigError(f"dataset {c.name} has no {empty} examples; give it data")
            raise ConfigError(f"dataset.components.{c.name} has no {empty} examples; give it data or remove it from dataset.components")
    if len(components) == 1:
        return components[0].splits
    check_weights({c.name: c.weight for c in components})
    total = sum(len(c.splits.train) for c in components)
    weight = sum(c.weight for c in components)
    rng = random.Random(seed)
    train = []
    for c in components:
        train += _cycled(c.splits.train, round(total * c.weight / weight), rng)
    rng.shuffle(train)
    tests = [c.splits.test for c in components]
    test = [tests[j][i] for i in range(max(map(len, tests))) for j in range(len(tests)) if i < len(tests[j])]
    return Splits(train, test)


def _cycled(examples: list[Example], count: int, rng: random.Random) -> list[Example]:
    """`count` of `examples`: whole passes over them, each in a new order, then part of one more."""
    out = []
    while len(out) < count:
        order = list(examples)
        rng.shuffle(order)
        out += order[: count - len(out)]
    return out
