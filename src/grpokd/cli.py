"""The command-line contract of run.py and sweep.py: a bad config ends with one `error:` line and exit status 2.

grpokd's own checks raise ConfigError, which the entry points print. Hydra's
own composition errors (an unknown group option such as `objective=nosuch`,
an unknown key such as `reward.weights.nosuch=1`, bad override syntax) would
end in Hydra's several-line report and exit 1; `hydra_main` runs the entry
point so that they end in the same form as grpokd's, keeping Hydra's content:
the options of the group, the keys of the node.
"""

from __future__ import annotations

import functools
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import CompactHydraException
from omegaconf import DictConfig, OmegaConf

UNKNOWN_KEY = re.compile(r"full_key: (\S+)")


def hydra_main(main: Callable[[], Any], config_dir: Path, config_name: str) -> None:
    """Run a @hydra.main function; a Hydra config error prints one `error:` line (`one_line`) and exits 2.

    Hydra reports its own errors and exits 1 unless HYDRA_FULL_ERROR is set; with it set they reach this
    function (any other error is raised as it would be with the variable set: a full traceback, exit 1).
    """
    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        main()
    except CompactHydraException as err:
        print(f"error: {one_line(err, functools.partial(node_keys, err, config_dir, config_name))}", file=sys.stderr)
        sys.exit(2)


def one_line(err: CompactHydraException, keys: Callable[[], list[str] | None] = lambda: None) -> str:
    """Hydra's message on one line: its lines joined with "; ", a list of options inline, the search path and
    links dropped; for an unknown key, the keys its node has (`keys()`)."""
    parts: list[str] = []
    for line in str(err).split("Config search path:")[0].splitlines():
        if line.startswith("\t") and parts:  # one option of the list the line before announced
            parts[-1] += (" " if parts[-1].endswith(":") else ", ") + line.strip()
        elif line.strip() and not line.startswith("See https://"):
            parts.append(line.strip().rstrip("."))
    cause = str(err.__cause__ or "")
    if "not in struct" in cause:
        parts.append(cause.splitlines()[0])
        found, known = UNKNOWN_KEY.search(cause), keys()
        if found and known:
            parent = found.group(1).rpartition(".")[0]
            parts.append(f"the keys of {parent or 'the config'} are: {', '.join(known)}")
    override = getattr(err, "override", None)  # OverrideParseException: the override that does not parse
    return "; ".join([f"cannot parse {override}", *parts] if override else parts)


def node_keys(err: CompactHydraException, config_dir: Path, config_name: str) -> list[str] | None:
    """The keys of the node an unknown key was set in, from the config composed with the command line's other
    plain overrides (None when it cannot be composed)."""
    found = UNKNOWN_KEY.search(str(err.__cause__ or ""))
    if found is None:
        return None
    key = found.group(1)
    parent = key.rpartition(".")[0]
    overrides = [
        a for a in sys.argv[1:]
        if "=" in a and "," not in a and not a.startswith(("-", "hydra", "+")) and a.split("=", 1)[0] != key
        and not a.startswith(f"{key}.")
    ]
    for attempt in (overrides, []):
        GlobalHydra.instance().clear()
        try:
            with initialize_config_dir(config_dir=str(Path(config_dir).absolute()), version_base="1.3"):
                cfg = compose(config_name, overrides=attempt)
        except Exception:  # noqa: BLE001 - any failure: try without the overrides, then give no list
            continue
        node = OmegaConf.select(cfg, parent) if parent else cfg
        return sorted(str(k) for k in node.keys()) if isinstance(node, DictConfig) else None
    return None
