"""Is a service reachable? Asked once per service, answered in at most a few seconds.

transformers and datasets retry a closed network for about half a minute before giving up; a user who typed
a hub id on an offline machine should instead get one clear line at once, and a W&B logger should fall back
to offline mode without hanging. One TCP connection to the endpoint answers.
"""

from __future__ import annotations

import functools
import os
import socket
from urllib.parse import urlparse


def endpoint_reachable(url: str, timeout: float = 3.0) -> bool:
    """True when `url`'s host accepts a TCP connection on its port (default: the scheme's) within `timeout` s."""
    parsed = urlparse(url)
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        with socket.create_connection((parsed.hostname, port), timeout=timeout):
            return True
    except OSError:
        return False


@functools.cache
def hub_reachable(timeout: float = 3.0) -> bool:
    """True when HF_HUB_OFFLINE is unset and the Hugging Face Hub (HF_ENDPOINT, default huggingface.co) answers."""
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in {"1", "true", "yes"}:
        return False
    return endpoint_reachable(os.environ.get("HF_ENDPOINT", "https://huggingface.co"), timeout)


def wandb_reachable(timeout: float = 3.0) -> bool:
    """True when the W&B server (WANDB_BASE_URL, default api.wandb.ai) answers."""
    return endpoint_reachable(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai"), timeout)
