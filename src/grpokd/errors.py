"""The one error type for bad configs and bad inputs found at start-up, and the range check most of them use.

Its message is a single line that names the problem and the fix; `run.py`
prints it and exits with status 2, before any model is trained.
"""

from __future__ import annotations

import math


class ConfigError(ValueError):
    """A bad config value, path, model or dataset, found before training starts."""


def check_range(
    key: str, value: object, low: float | None = None, high: float | None = None,
    low_open: bool = False, high_open: bool = False, integer: bool = False,
) -> None:
    """Raise ConfigError naming `key` unless `value` is a finite number (an integer if asked) within the bounds."""
    kind = "an integer" if integer else "a number"
    number = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not number or not math.isfinite(value):
        raise ConfigError(f"{key}={value!r} must be {kind}")
    if low is not None and (value <= low if low_open else value < low):
        raise ConfigError(f"{key}={value!r} must be {'>' if low_open else '>='} {low}")
    if high is not None and (value >= high if high_open else value > high):
        raise ConfigError(f"{key}={value!r} must be {'<' if high_open else '<='} {high}")


class Unavailable(RuntimeError):
    """A service the run depends on (a served teacher) stopped answering mid-run, after its retries: the run ends
    with a checkpoint of its last whole step (`runtime.GracefulStop`), to be resumed once the service is back."""
