"""An OpenAI-compatible prompt-logprobs server over a transformers model, in a thread: the part of vLLM's server
that grpokd's served teachers use (`grpokd.teachers.served`), for the tests that run without vLLM.

GET /v1/models, POST /tokenize, and POST /v1/completions with token-id prompts and `prompt_logprobs=k`, answered
as vLLM answers them: one choice per prompt, `prompt_logprobs[0]` None, then at each position the k most likely
tokens and the token that is there, each {logprob, rank, decoded_token} under its id. The log-probs are the
model's own (log_softmax of its logits at temperature 1). `lose_after`: the server stops listening after that many
completion requests (a teacher server lost mid-run). The same requests reach vLLM's server in tests/test_vllm.py.
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import torch


class LogprobServer:
    def __init__(self, model, tokenizer, name: str = "teacher", lose_after: int | None = None) -> None:
        self.model, self.tokenizer, self.name, self.lose_after = model.eval(), tokenizer, name, lose_after
        self.completions = 0
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def do_GET(self) -> None:
                self._answer({"object": "list", "data": [{"id": server.name, "object": "model"}]} if self.path == "/v1/models" else None)

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if self.path == "/tokenize":
                    self._answer({"tokens": server.tokenizer(body["prompt"], add_special_tokens=body.get("add_special_tokens", True))["input_ids"]})
                elif self.path == "/v1/completions":
                    self._answer({"choices": [server.choice(i, ids, body["prompt_logprobs"]) for i, ids in enumerate(body["prompt"])]})
                    server.completions += 1
                    if server.lose_after is not None and server.completions >= server.lose_after:
                        threading.Thread(target=server.stop).start()
                else:
                    self._answer(None)

            def _answer(self, payload) -> None:
                data = json.dumps(payload).encode()
                self.send_response(200 if payload is not None else 404)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @torch.no_grad()
    def choice(self, index: int, ids: list[int], k: int) -> dict:
        logp = self.model(input_ids=torch.tensor([ids])).logits[0, :-1].float().log_softmax(-1)  # [L-1, V]: position i predicts token i+1
        rows = [None]
        for position, token in enumerate(ids[1:]):
            values, top = logp[position].topk(k)
            entries = {str(int(t)): {"logprob": float(v), "rank": r + 1, "decoded_token": ""} for r, (v, t) in enumerate(zip(values, top))}
            rank = int((logp[position] > logp[position, token]).sum()) + 1
            entries.setdefault(str(token), {"logprob": float(logp[position, token]), "rank": rank, "decoded_token": ""})
            rows.append(entries)
        return {"index": index, "text": "", "prompt_logprobs": rows}

    def __enter__(self) -> "LogprobServer":
        self.thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def __exit__(self, *exc) -> None:
        if self.thread.is_alive():
            self.stop()
