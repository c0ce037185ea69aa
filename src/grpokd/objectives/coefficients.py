"""The paper's coefficients: the top-level config keys (conf/config.yaml) that objective and term configs
interpolate (`weight: ${lam}`), so that sweeps read like the paper (`-m objective=j1,j3 lam=0.1,0.5`).

One table: the range check at start-up, the logged config (a run logs the coefficients its objective reads),
the notice for a coefficient the objective does not read and the sweep planner all read `COEFFICIENTS`. A new
coefficient is one entry here and its value in conf/config.yaml (tests/test_config.py checks the two agree).
"""

from __future__ import annotations

import json
from typing import Any

from grpokd.errors import check_range

COEFFICIENTS: dict[str, dict[str, Any]] = {  # key -> check_range bounds
    "beta": dict(low=0),  # KL to the reference (grpo, j1, j3, kdrl, tgpo)
    "beta_prime": dict(low=0),  # reverse KD to the teachers that replaces the reference KL (j2: the paper's beta')
    "gamma": dict(low=0),  # teacher agreement in the advantage (j3)
    "lam": dict(low=0),  # the teachers' forward KD (j1, j3)
    "lam_t": dict(low=0),  # cross-entropy to the teachers' next-token choice (tgpo: its lambda_t)
    "tau": dict(low=0, low_open=True),  # KD temperature
    "beta_kd": dict(low=0),  # reverse KL to the teachers on the rollouts (kdrl, opd)
    "epsilon": dict(low=0, high=1, low_open=True, high_open=True),  # PPO clip range
}


def check(values: dict[str, Any]) -> None:
    """Each coefficient in `values` (top-level config keys) is a finite number within its range, named as typed."""
    for key, bounds in COEFFICIENTS.items():
        if key in values:
            check_range(key, values[key], **bounds)


def interpolates(node: Any, key: str) -> bool:
    """Whether an unresolved config node (a container) interpolates the top-level key `key` (`${key}`)."""
    return "${" + key + "}" in json.dumps(node)


def read_by(objective: Any) -> list[str]:
    """The coefficients an objective's unresolved config node (a container) reads, in table order."""
    return [key for key in COEFFICIENTS if interpolates(objective, key)]
