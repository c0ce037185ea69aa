"""The one error type for bad configs and bad inputs found at start-up.

Its message is a single line that names the problem and the fix; `run.py`
prints it and exits with status 2, before any model is trained.
"""


class ConfigError(ValueError):
    """A bad config value, path, model or dataset, found before training starts."""
