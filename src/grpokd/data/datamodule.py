"""The LightningDataModule: prompts for training, greedy-evaluation sets for val and test.

Batches are plain dicts of string lists ({"prompt", "solution", "answer"}):
tokenising belongs to the model side, so one data module serves every
student. Training draws from `PromptStream`, an endless stream of shuffled
prompt batches in which batch i depends only on the seed and i; a resumed run
starts it at the number of batches already trained on (global step times
gradient accumulation), so it sees the same prompts as an uninterrupted one.
Each rank takes its own slice, so a prompt's group never spans ranks, and its own share of the
evaluation sets, unpadded, so that every example is scored once. Validation uses a slice held
out from the end of the train split; test uses the dataset's test split. Training never sees a val or
test prompt (`held_out`): a generator's duplicates would otherwise put them in train (measured on
`arith`: 16.5% of the val prompts also occurred in train, so val rewarded memorising them).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import replace

import lightning as L
import torch
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from torch.utils.data import DataLoader

from grpokd.data.example import Example
from grpokd.data.sources import Splits
from grpokd.errors import ConfigError, check_range


def collate(examples: list[Example]) -> dict[str, list]:
    return {
        "prompt": [ex.prompt for ex in examples],
        "solution": [ex.solution for ex in examples],
        "answer": [ex.answer for ex in examples],
        "component": [ex.component for ex in examples],
        "teacher": [ex.teacher for ex in examples],
        "question": [ex.prompt if ex.question is None else ex.question for ex in examples],
    }


def apply_template(examples: list[Example], template: str, key: str = "dataset.prompt_template") -> list[Example]:
    """Wrap each prompt in `template` (which must contain "{prompt}")."""
    if "{prompt}" not in template:
        raise ConfigError(f"{key}={template!r} must contain '{{prompt}}'")
    if template == "{prompt}":
        return examples
    return [replace(ex, prompt=template.format(prompt=ex.prompt)) for ex in examples]


def held_out(train: list[Example], val_size: int, test: list[Example]) -> tuple[list[Example], list[Example]]:
    """(train, val): val is the last `val_size` examples; train the rest minus any prompt of val or test."""
    val = train[len(train) - val_size :]
    evaluated = {ex.prompt for ex in val} | {ex.prompt for ex in test}
    return [ex for ex in train[: len(train) - val_size] if ex.prompt not in evaluated], val


class PromptStream:
    """Endless shuffled batches of examples, starting at batch `start`.

    Epoch e is a permutation seeded by (seed, e); rank r of W takes batches
    r, r+W, r+2W... of it, so ranks never share a prompt.
    """

    def __init__(self, examples: list[Example], batch_size: int, seed: int, rank: int = 0, world_size: int = 1, start: int = 0) -> None:
        self.examples, self.batch_size, self.seed = examples, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.per_epoch = len(examples) // (batch_size * world_size)
        self.start = start

    def batch(self, i: int) -> dict[str, list[str]]:
        """This rank's i-th batch."""
        epoch, j = divmod(i, self.per_epoch)
        order = torch.randperm(len(self.examples), generator=torch.Generator().manual_seed(self.seed * 100_003 + epoch))
        start = (j * self.world_size + self.rank) * self.batch_size
        return collate([self.examples[k] for k in order[start : start + self.batch_size].tolist()])

    def __iter__(self) -> Iterator[dict[str, list[str]]]:
        i = self.start
        while True:
            yield self.batch(i)
            i += 1


class TaskData(L.LightningDataModule):
    """Train prompts (shuffled, `prompts_per_step` per step), val and test examples for greedy evaluation.

    Args:
        splits: the dataset's train and test examples.
        prompts_per_step: B, prompts per optimiser step (each sampled K times by the module).
        eval_batch_size: prompts per greedy-evaluation batch.
        val_size: examples held out from the end of train for validation (0: no validation).
        test_size: first examples of the test split to score (None: all).
        prompt_template: applied to every prompt, e.g. "Q: {prompt}\\nA:".
        seed: shuffling seed.
    """

    def __init__(
        self,
        splits: Splits,
        prompts_per_step: int = 8,
        eval_batch_size: int = 128,
        val_size: int = 100,
        test_size: int | None = 500,
        prompt_template: str = "{prompt}",
        seed: int = 0,
    ) -> None:
        super().__init__()
        check_range("data.prompts_per_step", prompts_per_step, low=1, integer=True)
        check_range("data.eval_batch_size", eval_batch_size, low=1, integer=True)
        check_range("data.val_size", val_size, low=0, integer=True)
        if test_size is not None:
            check_range("data.test_size", test_size, low=1, integer=True)
        train = apply_template(splits.train, prompt_template)
        if len(train) < val_size + prompts_per_step:
            raise ConfigError(f"the train split has {len(train)} examples: too few for val_size={val_size} and prompts_per_step={prompts_per_step}")
        self.test_set = apply_template(splits.test, prompt_template)[:test_size]
        self.train_set, self.val_set = held_out(train, val_size, self.test_set)
        self.evaluated = "test"  # the split test_dataloader serves (mode=eval eval_split=val: "val")
        if len(self.train_set) < prompts_per_step:
            raise ConfigError(f"only {len(self.train_set)} train examples differ from the val and test prompts: too few for prompts_per_step={prompts_per_step}")
        self.prompts_per_step = prompts_per_step
        self.eval_batch_size = eval_batch_size
        self.seed = seed

    def render_prompts(self, render: Callable[[Example], str]) -> None:
        """Every prompt (train, val, test) replaced by `render(example)`: the chat layout (`data.prompts`), which
        needs the student's tokenizer and so comes after the splits are drawn."""
        self.train_set, self.val_set, self.test_set = (
            [replace(ex, prompt=render(ex), question=ex.prompt) for ex in split] for split in (self.train_set, self.val_set, self.test_set)
        )

    @property
    def components(self) -> list[str]:
        """The datasets the examples come from, in order of first appearance (one name unless `dataset=mix`)."""
        return list(dict.fromkeys(ex.component for split in (self.train_set, self.val_set, self.test_set) for ex in split))

    def train_dataloader(self) -> PromptStream:
        trainer = self.trainer
        if trainer is None:
            return PromptStream(self.train_set, self.prompts_per_step, self.seed)
        trained = trainer.global_step * trainer.accumulate_grad_batches  # batches already trained on (resume)
        return PromptStream(self.train_set, self.prompts_per_step, self.seed, trainer.global_rank, trainer.world_size, trained)

    def val_dataloader(self) -> DataLoader:
        return self.eval_loader(self.val_set, "data.val_size")

    def test_dataloader(self) -> DataLoader:
        """The test split's greedy-evaluation batches, or the validation split's when `evaluated` is "val"."""
        if self.evaluated == "val":
            return self.eval_loader(self.val_set, "data.val_size")
        return self.eval_loader(self.test_set, "data.test_size")

    def eval_loader(self, examples: list[Example], key: str) -> DataLoader:
        """Greedy-evaluation batches. Under DDP rank r of W takes examples r, r+W, ... and nothing is padded, so
        the accuracy, summed over ranks by its metric, counts every example exactly once (Lightning's
        DistributedSampler would repeat some to even the ranks out; it leaves this sampler in place)."""
        world = self.trainer.world_size if self.trainer is not None else 1
        sampler = None
        if world > 1:
            if 0 < len(examples) < world:  # a rank without a batch would leave the others waiting for it
                raise ConfigError(f"{key}={len(examples)} is smaller than the {world} processes; each must evaluate at least one example")
            sampler = UnrepeatedDistributedSampler(examples, num_replicas=world, rank=self.trainer.global_rank, shuffle=False)
        return DataLoader(examples, batch_size=self.eval_batch_size, collate_fn=collate, sampler=sampler)
