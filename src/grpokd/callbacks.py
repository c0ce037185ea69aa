"""Configurable Trainer callbacks (conf/callbacks/) that Lightning does not provide.

Lightning's own (ModelCheckpoint, LearningRateMonitor, ThroughputMonitor,
RichProgressBar, EarlyStopping) are configured directly in conf/callbacks/;
this module holds what they need from grpokd and the per-teacher W&B charts.
"""

from __future__ import annotations

import re
from collections import defaultdict
from typing import Any

import lightning as L
from lightning.pytorch.loggers import WandbLogger

TEACHER_KEY = re.compile(r"^train/teacher/(?P<quantity>[^/]+)/(?P<teacher>.+)$")


def prompts_in_batch(batch: dict[str, list[str]]) -> int:
    """ThroughputMonitor's batch size: the prompts of a training batch (each is sampled group_size times)."""
    return len(batch["prompt"])


def teacher_series(history: list[tuple[int, dict[str, float]]]) -> dict[str, tuple[list[int], dict[str, list[float]]]]:
    """Per quantity: (steps, {teacher: values}) from per-step metric dicts keyed train/teacher/<quantity>/<teacher>.

    A step contributes to a quantity only when every teacher of it has a value then, so the lines share one x axis.
    """
    series: dict[str, tuple[list[int], dict[str, list[float]]]] = {}
    for step, metrics in history:
        by_quantity: dict[str, dict[str, float]] = defaultdict(dict)
        for key, value in metrics.items():
            match = TEACHER_KEY.match(key)
            if match:
                by_quantity[match["quantity"]][match["teacher"]] = value
        for quantity, values in by_quantity.items():
            steps, lines = series.setdefault(quantity, ([], {}))
            if lines and set(values) != set(lines):
                continue
            steps.append(step)
            for teacher, value in values.items():
                lines.setdefault(teacher, []).append(value)
    return series


class TeacherCharts(L.Callback):
    """One W&B line chart per per-teacher quantity (KL to each teacher, each teacher's weight), a line per teacher.

    W&B draws each logged key in its own panel; this collects the train/teacher/<quantity>/<teacher> values
    every step and logs, at the end of training, `charts/teacher_<quantity>` as a line series.
    """

    def __init__(self) -> None:
        self.history: list[tuple[int, dict[str, float]]] = []

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        if not self._wandb(trainer):
            return
        values = {k: float(v) for k, v in trainer.callback_metrics.items() if TEACHER_KEY.match(k)}
        if values:
            self.history.append((trainer.global_step, values))

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        loggers = self._wandb(trainer)
        if not loggers or not self.history:
            return
        import wandb

        for quantity, (steps, lines) in teacher_series(self.history).items():
            names = sorted(lines)
            chart = wandb.plot.line_series(xs=steps, ys=[lines[n] for n in names], keys=names, title=f"teacher {quantity}", xname="step")
            for logger in loggers:
                logger.experiment.log({f"charts/teacher_{quantity}": chart})

    @staticmethod
    def _wandb(trainer: L.Trainer) -> list[WandbLogger]:
        return [lg for lg in trainer.loggers if isinstance(lg, WandbLogger)] if trainer.is_global_zero else []
