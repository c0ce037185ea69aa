"""A teacher served out of process by an OpenAI-compatible server that returns prompt log-probs (vLLM's).

Each (prompt, completion) row is sent as token ids to `/v1/completions` with `prompt_logprobs=k`, and the
server answers, at every position, the log-probs of its k most likely next tokens and of the token that is
there: at the completion's positions, the teacher's top-k signal and the scored token's log-prob
(`sources.Sparse`), what TRL's AsyncDistillationTrainer reads from its teacher servers. Start a server:

    python -m vllm.entrypoints.openai.api_server --model DIR --served-model-name teacher --max-logprobs 64

Requests have a timeout and are retried; a server that is down or serves another tokenizer is refused at
start-up (`check`), one lost mid-run ends the run with a checkpoint (`errors.Unavailable`).
"""

from __future__ import annotations

import json
import math
import time
import urllib.error
import urllib.request
from typing import Any

import torch

from grpokd.errors import ConfigError, Unavailable, check_range
from grpokd.models.lm import Tokens
from grpokd.teachers.sources import Sparse, Texts


class Served(torch.nn.Module):
    """A served teacher: a `model.teachers` entry {url: ..., model: ..., top_k: ..., tokenizer: ...}.

    A module without parameters (the ensemble holds its sources in a ModuleList); nothing of it is placed or
    checkpointed.

    Args:
        url: the server's OpenAI base URL, e.g. http://127.0.0.1:8000/v1.
        model: the served model's id (None: the one model the server serves).
        name: what the teacher is called in metrics and routes (None: `model`).
        top_k: log-probs per position asked for (at most the server's --max-logprobs).
        timeout_s: the longest wait for one request.
        retries: further tries of a failed request, 2^i seconds apart.
        tokenizer: the served model's tokenizer (a hub id, local path or embedded name) where it is not the
            student's: the completions are sent in its tokens (`teachers.cross`). None: the student's.
    """

    def __init__(self, url: str, model: str | None = None, name: str | None = None, top_k: int = 20, timeout_s: float = 120,
                 retries: int = 3, tokenizer: str | None = None) -> None:
        super().__init__()
        check_range("top_k", top_k, low=1, integer=True)
        check_range("timeout_s", timeout_s, low=0, low_open=True)
        check_range("retries", retries, low=0, integer=True)
        self.url = url.rstrip("/")
        self.model, self.top_k, self.timeout_s, self.retries, self.tokenizer = model, top_k, timeout_s, retries, tokenizer
        self.name = name or model or self.url

    @property
    def root(self) -> str:
        """The server's root (its /tokenize endpoint is there, beside /v1)."""
        return self.url.removesuffix("/v1")

    def check(self, tokenizer: Any, texts: list[str], role: str) -> None:
        """At start-up, one try each: the server answers, serves `model`, and tokenizes `texts` as `tokenizer` does
        (the student's, or the one named by `self.tokenizer`)."""
        try:
            served = [m["id"] for m in self._call(f"{self.url}/models", None, tries=1)["data"]]
        except Unavailable as err:
            raise ConfigError(f"{role}: no teacher server at {self.url} ({err}); start it (docs/real_models.md) or fix the url") from None
        if self.model is None and len(served) == 1:
            self.model = served[0]
            self.name = self.name if self.name != self.url else served[0]
        if self.model not in served:
            raise ConfigError(f"{role}: {self.url} serves {', '.join(served)}, not {self.model!r}; set model= to one of them")
        for text in texts:
            theirs = self._call(f"{self.root}/tokenize", {"model": self.model, "prompt": text, "add_special_tokens": False}, tries=1)["tokens"]
            ours = tokenizer(text, add_special_tokens=False)["input_ids"]
            if theirs != ours and self.tokenizer is None:
                raise ConfigError(
                    f"{role}: the server's tokenizer is not the student's ({text[:40]!r} is {theirs[:8]}... there, {ours[:8]}... here); "
                    "name the served model's tokenizer (tokenizer: a hub id or path) to send the completions in its tokens"
                )
            if theirs != ours:
                raise ConfigError(f"{role}: the server's tokenizer is not tokenizer={self.tokenizer} ({text[:40]!r} is {theirs[:8]}... there, {ours[:8]}... here)")

    @torch.no_grad()
    def signal(self, prompts: Tokens, completions: Tokens, vocab_size: int, texts: Texts | None = None) -> Sparse:
        """The server's top-k log-probs and the completion token's log-prob at each completion position [N, T]."""
        group = completions.ids.shape[0] // prompts.ids.shape[0]
        prompt_rows = [ids[mask.bool()].tolist() for ids, mask in zip(prompts.ids.cpu(), prompts.mask.cpu())]
        completion_rows = [ids[mask.bool()].tolist() for ids, mask in zip(completions.ids.cpu(), completions.mask.cpu())]
        rows = [prompt_rows[n // group] + completion_rows[n] for n in range(len(completion_rows))]
        body = {"model": self.model, "prompt": rows, "max_tokens": 1, "temperature": 1.0, "prompt_logprobs": self.top_k}
        choices = sorted(self._call(f"{self.url}/completions", body)["choices"], key=lambda c: c["index"])
        n, t, k = completions.ids.shape[0], completions.ids.shape[1], self.top_k
        index = torch.arange(k).expand(n, t, k).clone()  # [N, T, k] padding positions: k tokens, uniform (finite; masked out)
        logp = torch.full((n, t, k), -math.log(k))  # [N, T, k]
        scored = torch.zeros(n, t)  # [N, T]
        for row, choice in enumerate(choices):
            start = len(prompt_rows[row // group])  # prompt_logprobs[i] is position i's token given the ones before
            for pos, token in enumerate(completion_rows[row]):
                entries = choice["prompt_logprobs"][start + pos]
                top = sorted((e["rank"], int(i), e["logprob"]) for i, e in entries.items() if e["rank"] <= k)
                if len(top) < k:
                    raise Unavailable(f"{self.url} returned {len(top)} log-probs at a position, not top_k={k}: start it with --max-logprobs {k} or more")
                index[row, pos] = torch.tensor([i for _, i, _ in top])
                logp[row, pos] = torch.tensor([lp for _, _, lp in top])
                scored[row, pos] = entries[str(token)]["logprob"]
        device = completions.ids.device
        return Sparse(index.to(device), logp.to(device), scored.to(device))

    def _call(self, url: str, body: dict | None, tries: int | None = None) -> dict:
        """POST `body` as JSON (GET when None) and return the JSON answer; retried with backoff, then Unavailable."""
        tries = tries or self.retries + 1
        data = None if body is None else json.dumps(body).encode()
        for attempt in range(tries):
            request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(request, timeout=self.timeout_s) as answer:
                    return json.loads(answer.read())
            except urllib.error.HTTPError as err:  # the server answered: a bad request is not retried
                detail = err.read().decode(errors="replace")[:300]
                raise Unavailable(f"{url} answered {err.code}: {detail}") from None
            except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as err:
                if attempt + 1 == tries:
                    raise Unavailable(f"{url}: {getattr(err, 'reason', err)} after {tries} tries") from None
                time.sleep(2**attempt)
        raise AssertionError("unreachable")
