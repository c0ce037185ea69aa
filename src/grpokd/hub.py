"""Is the Hugging Face Hub reachable? Asked once, answered in at most a few seconds.

transformers and datasets retry a closed network for about half a minute
before giving up; a user who typed a hub id on an offline machine should
instead get one clear line at once. We open one TCP connection to the
endpoint (HF_ENDPOINT, default huggingface.co) and honour HF_HUB_OFFLINE.
"""

from __future__ import annotations

import functools
import os
import socket
from urllib.parse import urlparse


@functools.cache
def hub_reachable(timeout: float = 3.0) -> bool:
    """True when HF_HUB_OFFLINE is unset and the hub endpoint accepts a TCP connection."""
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in {"1", "true", "yes"}:
        return False
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname, port), timeout=timeout):
            return True
    except OSError:
        return False
