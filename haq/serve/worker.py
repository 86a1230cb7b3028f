"""The one thread that runs the model: it owns the batch generator, takes requests and aborts
from the HTTP side through a queue, steps the batch while there is work, turns tokens into text
deltas (incremental detokenization, stop strings held back until they can no longer match) and
hands them to each request's asyncio queue. Nothing else touches the generator or the model."""
from __future__ import annotations

import asyncio
import queue
import threading
import time
from dataclasses import dataclass, field

from haq.errors import HaqError
from haq.runtime.generation import BatchGenerator, TokenEvent
from haq.runtime.sampling import Logprob, SamplingParams
from haq.serve.metrics import ServeMetrics


class QueueFull(Exception):
    """More requests are waiting than --max-queue allows."""


class WorkerDead(Exception):
    """The model thread has stopped; no request can be served."""


PREFIX_TOKENS = 4
"""Prompt tokens decoded with each request's text, then cut off: a first token's leading space
(SentencePiece's '▁Paris') survives only when decoded after something."""


@dataclass
class Handle:
    """One request as the worker sees it; `events` receives ("delta", text), then ("done", reason)
    or ("error", message), on the request's event loop; with log-probabilities asked, a token's
    ("logprob", entry) before its text (and ("prompt_logprobs", entries) before the first). Every
    generated token has its entry, a stop string's too though the text leaves it out (as vLLM)."""

    prompt: list[int]
    params: SamplingParams
    stops: list[str]
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    seq_id: int | None = None
    tokens: list[int] = field(default_factory=list)
    prefix_text: str | None = None  # the decoded prompt tail the text is cut from
    sent: int = 0  # characters of text already sent
    arrived: float = field(default_factory=time.perf_counter)
    last_token_at: float | None = None
    finish_reason: str | None = None
    logprobs: list[Logprob] = field(default_factory=list)  # of the generated tokens, when asked
    prompt_logprobs: tuple[Logprob, ...] = ()  # of prompt tokens 1.., when asked

    def put(self, kind: str, value) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))


class Worker(threading.Thread):
    def __init__(self, generator: BatchGenerator, tokenizer, metrics: ServeMetrics, max_queue: int = 64,
                 engine=None) -> None:
        super().__init__(name="haq-model", daemon=True)
        self.generator, self.tokenizer, self.metrics = generator, tokenizer, metrics
        self.max_queue, self.engine = max_queue, engine
        self.commands: queue.Queue = queue.Queue()
        self.handles: dict[int, Handle] = {}
        self.pending = 0  # submitted, not yet picked up or waiting in the generator
        self.lock = threading.Lock()
        self.stopping = threading.Event()

    # -- called from the HTTP side ------------------------------------------------------------------
    def submit(self, handle: Handle) -> None:
        if not self.is_alive():
            raise WorkerDead("the model thread is not running")
        with self.lock:
            if self.pending >= self.max_queue:
                raise QueueFull
            self.pending += 1
        self.commands.put(("add", handle))

    def abort(self, handle: Handle) -> None:
        self.commands.put(("abort", handle))

    def stop(self) -> None:
        self.stopping.set()
        self.commands.put(("wake", None))

    # -- the model thread -----------------------------------------------------------------------------
    def run(self) -> None:
        while not self.stopping.is_set():
            try:
                self._drain(block=not self.generator.has_work)
                if self.generator.has_work:
                    for event in self.generator.step():
                        self._deliver(event)
                    self.metrics.observe_step(self.generator, self.engine, self.pending)
            except Exception as exc:  # a failed step fails its requests, not the server
                self._fail_all(f"generation failed: {type(exc).__name__}: {exc}")
        for handle in list(self.handles.values()):  # stopped: nobody waits for ever
            handle.put("error", "the server is shutting down")

    def _drain(self, block: bool) -> None:
        try:
            command = self.commands.get(timeout=0.1) if block else self.commands.get_nowait()
        except queue.Empty:
            return
        while True:
            kind, handle = command
            if kind == "add":
                self._add(handle)
            elif kind == "abort" and handle.seq_id in self.handles:
                self.generator.abort(handle.seq_id)
                self._finish(handle, None)
            try:
                command = self.commands.get_nowait()
            except queue.Empty:
                return

    def _add(self, handle: Handle) -> None:
        try:
            handle.seq_id = self.generator.add(handle.prompt, handle.params)
        except Exception as exc:  # noqa: BLE001 - this request's fault or not, it must not fail the running ones
            with self.lock:
                self.pending -= 1
            ours = isinstance(exc, HaqError)  # the request's own fault: a 400, else a 500
            handle.put("error" if ours else "server_error", str(exc) if ours else f"{type(exc).__name__}: {exc}")
            return
        self.handles[handle.seq_id] = handle

    def _decode(self, tokens: list[int]) -> str:
        """Text of `tokens`, without the tokenizer's space clean-up (a BPE tokenizer ignores it with a
        warning; streamed pieces must be slices of one decoding anyway)."""
        return self.tokenizer.decode(tokens, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def _deliver(self, event: TokenEvent) -> None:
        handle = self.handles.get(event.seq_id)
        if handle is None:
            return
        now = time.perf_counter()
        if event.index == 0:
            with self.lock:
                self.pending -= 1
            self.metrics.ttft.observe(now - handle.arrived)
        elif handle.last_token_at is not None and now > handle.last_token_at:  # not its token 0 of this step
            self.metrics.itl.observe(now - handle.last_token_at)
        handle.last_token_at = now
        self.metrics.generated.inc()
        handle.tokens.append(event.token)
        if event.prompt_logprobs is not None:
            handle.prompt_logprobs = event.prompt_logprobs
            handle.put("prompt_logprobs", event.prompt_logprobs)
        if event.logprob is not None:
            handle.logprobs.append(event.logprob)
            handle.put("logprob", event.logprob)
        prefix = handle.prompt[-PREFIX_TOKENS:]
        if handle.prefix_text is None:
            handle.prefix_text = self._decode(prefix)
        full = self._decode(prefix + handle.tokens)
        text = full[len(handle.prefix_text):] if full.startswith(handle.prefix_text) else self._decode(handle.tokens)
        reason = event.finish_reason
        cut = min((i for i in (text.find(s) for s in handle.stops) if i >= 0), default=-1)
        if cut >= 0:
            text, reason = text[:cut], "stop"
            if event.finish_reason is None:
                self.generator.abort(event.seq_id)
        hold = 0 if reason else max(_held_back(text, handle.stops),
                                    len(text) - len(text.rstrip("\ufffd")))  # incomplete UTF-8 bytes
        delta = text[handle.sent:len(text) - hold]
        if delta:
            handle.put("delta", delta)
            handle.sent += len(delta)
        if reason:
            self._finish(handle, reason)

    def _finish(self, handle: Handle, reason: str | None) -> None:
        self.handles.pop(handle.seq_id, None)
        if handle.tokens == [] and handle.seq_id is not None:
            with self.lock:
                self.pending -= 1  # aborted before its first token
        handle.finish_reason = reason
        handle.put("done", reason or "abort")

    def _fail_all(self, message: str) -> None:
        failed = list(self.handles.values())
        for handle in failed:
            self.generator.abort(handle.seq_id)
            self.handles.pop(handle.seq_id, None)
            handle.put("server_error", message)
        with self.lock:
            self.pending -= sum(1 for h in failed if not h.tokens)  # those still in `commands` stay counted


def _held_back(text: str, stops: list[str]) -> int:
    """How many trailing characters could still begin a stop string."""
    best = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), 0, -1):
            if text.endswith(stop[:n]):
                best = max(best, n)
                break
    return best
