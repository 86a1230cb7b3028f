"""Fault cases for `haq serve`, run against a real server process: malformed and out-of-range
requests (an OpenAI error body with a 4xx status, never a 5xx), a client that hangs up mid-stream,
a flood beyond the queue (429s, no failures), and SIGTERM mid-stream (the stream completes, exit 0).
The results join bench/results/faults.md under the area "server"."""
from __future__ import annotations

import asyncio
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from tests.faults.runner import Result

C, CHAT = "/v1/completions", "/v1/chat/completions"
OK_BODY = {"model": "tiny", "prompt": "The history of", "max_tokens": 4, "temperature": 0}
BAD_REQUESTS = {
    "malformed-json": (C, b'{"model": "tiny", "prompt": '),
    "body-a-list": (C, [1, 2]),
    "body-empty": (C, b""),
    "no-prompt": (C, {"model": "tiny"}),
    "unknown-model": (C, {**OK_BODY, "model": "gpt-4"}),
    "unknown-field": (C, {**OK_BODY, "temprature": 0.5}),
    "prompt-empty": (C, {**OK_BODY, "prompt": ""}),
    "prompt-int": (C, {**OK_BODY, "prompt": 5}),
    "prompt-beyond-context": (C, {**OK_BODY, "prompt": "word " * 5000}),
    "prompt-token-id-beyond-vocab": (C, {**OK_BODY, "prompt": [10**9]}),
    "prompt-token-id-negative": (C, {**OK_BODY, "prompt": [-1, 2]}),
    "max-tokens-0": (C, {**OK_BODY, "max_tokens": 0}),
    "max-tokens-negative": (C, {**OK_BODY, "max_tokens": -3}),
    "max-tokens-string": (C, {**OK_BODY, "max_tokens": "many"}),
    "max-tokens-beyond-context": (C, {**OK_BODY, "max_tokens": 10**6}),
    "temperature-negative": (C, {**OK_BODY, "temperature": -1}),
    "temperature-5": (C, {**OK_BODY, "temperature": 5}),
    "top-p-0": (C, {**OK_BODY, "top_p": 0}),
    "presence-penalty-9": (C, {**OK_BODY, "presence_penalty": 9}),
    "frequency-penalty-9": (C, {**OK_BODY, "frequency_penalty": 9}),
    "logprobs-99": (C, {**OK_BODY, "logprobs": 99}),
    "echo-string": (C, {**OK_BODY, "echo": "yes"}),
    "prompt-batch-streamed": (C, {**OK_BODY, "prompt": ["one", "two"], "stream": True}),
    "prompt-batch-empty-item": (C, {**OK_BODY, "prompt": ["one", ""]}),
    "prompt-batch-mixed": (C, {**OK_BODY, "prompt": ["one", [1, 2]]}),
    "prompt-batch-beyond-queue": (C, {**OK_BODY, "prompt": ["one"] * 2000}),
    "chat-top-logprobs-alone": (CHAT, {"model": "tiny", "messages": [{"role": "user", "content": "x"}],
                                       "top_logprobs": 2}),
    "stop-int": (C, {**OK_BODY, "stop": 5}),
    "stop-seventeen": (C, {**OK_BODY, "stop": [f"s{i}" for i in range(17)]}),
    "n-0": (C, {**OK_BODY, "n": 0}),
    "n-65": (C, {**OK_BODY, "n": 65}),
    "n-streamed": (C, {**OK_BODY, "n": 2, "stream": True}),
    "seed-string": (C, {**OK_BODY, "seed": "one"}),
    "seed-beyond-64-bits": (C, {**OK_BODY, "seed": 2**70, "temperature": 1.0}),
    "seed-plus-n-beyond-64-bits": (C, {**OK_BODY, "seed": 2**64 - 1, "n": 2, "temperature": 1.0}),
    "stream-string": (C, {**OK_BODY, "stream": "yes"}),
    "chat-no-messages": (CHAT, {"model": "tiny"}),
    "chat-empty-messages": (CHAT, {"model": "tiny", "messages": []}),
    "chat-messages-a-string": (CHAT, {"model": "tiny", "messages": "hello"}),
    "chat-bad-role": (CHAT, {"model": "tiny", "messages": [{"role": "robot", "content": "x"}]}),
    "chat-content-int": (CHAT, {"model": "tiny", "messages": [{"role": "user", "content": 5}]}),
    "unknown-path": ("/v1/nope", OK_BODY),
    "get-on-a-post-endpoint": (C, None),
}
GOOD_REQUESTS = {
    "completion": (C, OK_BODY),
    "completion-token-ids": (C, {**OK_BODY, "prompt": [1, 2, 3]}),
    "completion-unicode": (C, {**OK_BODY, "prompt": "naïve café 東京 🙂"}),
    "chat": (CHAT, {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}),
}
TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`haq serve MODEL` in its own process; its stderr is kept to look for tracebacks."""

    def __init__(self, model: Path, folder: Path, *extra: str) -> None:
        (folder / "chat.jinja").write_text(TEMPLATE)
        self.port, self.log = free_port(), folder / f"serve-{time.time_ns()}.log"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "haq.cli", "serve", str(model), "--hardware", "laptop", "--port", str(self.port),
             "--served-model-name", "tiny", "--threads", "1", "--chat-template", str(folder / "chat.jinja"), *extra],
            stdout=subprocess.DEVNULL, stderr=self.log.open("w"))
        self.base = f"http://127.0.0.1:{self.port}"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and self.proc.poll() is None:
            try:
                if httpx.get(f"{self.base}/health", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                time.sleep(0.1)
        raise RuntimeError(f"haq serve did not come up: {self.log.read_text()[-2000:]}")

    def tracebacks(self) -> bool:
        return "Traceback (most recent call last)" in self.log.read_text()

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=60)
        finally:
            self.proc.kill()


def _post(base: str, path: str, body, timeout: float = 60) -> httpx.Response:
    if isinstance(body, bytes):
        return httpx.post(f"{base}{path}", content=body, headers={"content-type": "application/json"},
                          timeout=timeout)
    return httpx.post(f"{base}{path}", json=body, timeout=timeout)


def _result(case: str, call: str, expect: str, outcome: str, code, message: str, seconds: float) -> Result:
    return Result(f"server-{case}", "server", call, expect, outcome, code, message[:300], False, False, seconds)


def _classify_reply(reply: httpx.Response, expect: str) -> tuple[str, str]:
    if reply.status_code >= 500:
        return "traceback", reply.text
    if expect == "error":
        if reply.status_code >= 400:
            try:
                error = reply.json()["error"]
                return ("clear error" if error.get("message") else "traceback"), error.get("message", "")
            except (ValueError, KeyError, TypeError):
                return "traceback", f"{reply.status_code} without an OpenAI error body: {reply.text[:100]}"
        return "silent wrong result", f"{reply.status_code} for a bad request"
    if reply.status_code != 200:
        return "refused a valid input", reply.text
    choice = reply.json()["choices"][0]
    text = choice.get("text", choice.get("message", {}).get("content"))
    return ("correct result" if isinstance(text, str) else "silent wrong result"), f"200: {text!r}"[:120]


def request_cases(model: Path, folder: Path) -> list[Result]:
    server = Server(model, folder)
    results = []
    try:
        for table, expect in ((BAD_REQUESTS, "error"), (GOOD_REQUESTS, "ok")):
            for case, (path, body) in table.items():
                start = time.perf_counter()
                reply = httpx.get(f"{server.base}{path}", timeout=60) if body is None else \
                    _post(server.base, path, body)
                outcome, message = _classify_reply(reply, expect)
                results.append(_result(case, f"{'GET' if body is None else 'POST'} {path} {str(body or '')[:80]}", expect, outcome, reply.status_code,
                                       message, time.perf_counter() - start))
        results.append(_disconnect_case(server))
    finally:
        results.append(sigterm_case(server))  # and the server is gone
    return results


def _disconnect_case(server: Server) -> Result:
    """Hang up after one streamed chunk of a long request; the next request must still be served."""
    start = time.perf_counter()
    body = {**OK_BODY, "max_tokens": 1000, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", f"{server.base}{C}", json=body, timeout=60) as reply:
        for line in reply.iter_lines():
            if line.startswith("data:"):
                break
    after = _post(server.base, C, OK_BODY)
    outcome, message = _classify_reply(after, "ok")
    return _result("client-disconnect-mid-stream", "stream 1000 tokens, hang up after the first chunk, then a "
                   "request", "ok", outcome, after.status_code, message, time.perf_counter() - start)


def overload_case(model: Path, folder: Path) -> Result:
    server = Server(model, folder, "--max-batch", "1", "--max-queue", "2")
    start = time.perf_counter()

    async def flood():
        async with httpx.AsyncClient(timeout=120) as http:
            body = {**OK_BODY, "max_tokens": 24}
            return await asyncio.gather(*[http.post(f"{server.base}{C}", json=body) for _ in range(12)])

    try:
        codes = sorted(r.status_code for r in asyncio.run(flood()))
    finally:
        code = server.stop()
    good = 429 in codes and 200 in codes and set(codes) <= {200, 429} and code == 0 and not server.tracebacks()
    return _result("overload-12-requests-queue-2", "12 concurrent requests, --max-batch 1 --max-queue 2", "ok",
                   "correct result" if good else "traceback", code, f"statuses {codes}", time.perf_counter() - start)


def sigterm_case(server: Server) -> Result:
    """SIGTERM after the first chunk of a stream: the stream completes, the process exits 0 and its
    log holds no traceback (of this or of any request before it)."""
    start = time.perf_counter()
    lines = []
    try:
        with httpx.stream("POST", f"{server.base}{C}", timeout=60,
                          json={**OK_BODY, "max_tokens": 40, "stream": True, "ignore_eos": True}) as reply:
            for line in reply.iter_lines():
                if line.startswith("data:") and not lines:
                    server.proc.send_signal(signal.SIGTERM)
                lines.append(line)
        code = server.proc.wait(timeout=60)
    finally:
        server.proc.kill()
    chunks = sum(line.startswith("data: {") for line in lines)
    good = "data: [DONE]" in lines and chunks == 40 and code == 0 and not server.tracebacks()
    return _result("sigterm-mid-stream", "SIGTERM after the first streamed chunk of 40 tokens", "ok",
                   "correct result" if good else "silent wrong result", code,
                   f"{chunks} chunks then [DONE], exit {code}", time.perf_counter() - start)


def server_cases(model: Path, folder: Path) -> list[Result]:
    return request_cases(model, folder) + [overload_case(model, folder)]
