"""`haq serve`: an OpenAI-compatible HTTP server (FastAPI + uvicorn) over the batch generator.

POST /v1/completions, POST /v1/chat/completions (JSON, or SSE with stream=true: a role chunk for
chat, text deltas, a final chunk with finish_reason and usage, then `data: [DONE]`; log-probabilities
when asked, with the chunk that carries their tokens' text; completions: a batch of prompts, echo), GET /v1/models,
GET /health, GET /metrics (Prometheus). Errors carry OpenAI's body
{"error": {"message", "type", "param", "code"}}: 400 for bad values, 404 for an unknown model,
429 when the queue is full, 408 on timeout; a client that disconnects frees its slot at once.
"""
from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from haq.errors import HaqError
from haq.runtime.generation import first_invalid_token
from haq.runtime.sampling import SamplingParams
from haq.serve.logprobs import chat_logprobs, completion_logprobs, token_texts
from haq.serve.protocol import ChatCompletionRequest, CompletionRequest
from haq.serve.worker import Handle, QueueFull, Worker, WorkerDead

DEFAULT_MAX_TOKENS = {"completion": 16, "chat": 256}
DISCONNECT_POLL_S = 0.25  # how often a non-streaming request checks that its client is still there


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param = status, message, kind, param


def _error(status: int, message: str, kind: str, param: str | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": status}},
                        status_code=status)


class ClientGone(Exception):
    """The client hung up before its answer was ready."""


def create_app(worker: Worker, tokenizer, model_name: str, context: int, request_timeout: float = 600.0,
               chat_template: str | None = None) -> FastAPI:
    """`tokenizer` is the HTTP side's own (the worker decodes with another instance)."""
    metrics = worker.metrics
    token_text = token_texts(tokenizer)

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        worker.start()
        yield
        worker.stop()
        worker.join(timeout=10)

    app = FastAPI(title="haq", lifespan=lifespan)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        param = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
        metrics.requests.labels(request.url.path, "400").inc()
        return _error(400, f"{param or 'body'}: {first.get('msg', 'invalid request')}", "invalid_request_error", param)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):  # unknown path, wrong method
        metrics.requests.labels(request.url.path, str(exc.status_code)).inc()
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return _error(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}", kind)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        metrics.requests.labels(request.url.path, str(exc.status)).inc()
        return _error(exc.status, exc.message, exc.kind, exc.param)

    @app.get("/health")
    async def health():
        return {"status": "ok" if worker.is_alive() else "stopped"}

    @app.get("/metrics")
    async def prometheus():
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return PlainTextResponse(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0, "owned_by": "haq",
                                            "max_model_len": context}]}

    def _prepare(body, prompt: list[int], kind: str, choice: int = 0) -> Handle:
        if body.model != model_name:
            raise ApiError(404, f"model {body.model!r} not found; this server serves {model_name!r}",
                           "not_found_error", "model")
        max_tokens = body.max_tokens or min(DEFAULT_MAX_TOKENS[kind], max(context - len(prompt), 1))
        if len(prompt) + max_tokens > context:
            raise ApiError(400, f"prompt ({len(prompt)} tokens) + max_tokens ({max_tokens}) exceeds the model's "
                                f"context of {context} tokens", param="max_tokens")
        try:
            params = SamplingParams(max_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p,
                                    top_k=body.top_k, seed=None if body.seed is None else body.seed + choice,
                                    presence_penalty=body.presence_penalty,
                                    frequency_penalty=body.frequency_penalty,
                                    repetition_penalty=body.repetition_penalty, ignore_eos=body.ignore_eos,
                                    logprobs=body.top_logprobs_asked, prompt_logprobs=body.prompt_logprobs_asked)
        except HaqError as exc:
            raise ApiError(400, str(exc)) from None
        return Handle(prompt, params, body.stops, asyncio.get_running_loop())

    async def _run(request: Request, body, prompts: list[tuple[list[int], str | None]], kind: str):
        """`prompts`: (token ids, the text sent or None); a batch of prompts (completions) and `n`
        choices of each decode together in the batch, one choice each, prompt by prompt."""
        count = len(prompts) * body.n
        if body.stream and count > 1:
            raise ApiError(400, "a streamed request takes one prompt and n = 1", param="n" if body.n > 1 else "prompt")
        if count > worker.max_queue:  # each choice waits in the queue until its first token
            raise ApiError(400, f"{len(prompts)} prompt(s) x n = {body.n} choices exceed the server's queue of "
                                f"{worker.max_queue} (--max-queue): send at most that many per request", param="n")
        prompts = [prompt for prompt in prompts for _ in range(body.n)]
        handles = [_prepare(body, ids, kind, i % body.n) for i, (ids, _) in enumerate(prompts)]  # all checked first
        for i, handle in enumerate(handles):
            try:
                worker.submit(handle)
            except (QueueFull, WorkerDead) as exc:
                for sent in handles[:i]:
                    worker.abort(sent)
                if isinstance(exc, QueueFull):
                    raise ApiError(429, f"the server queue is full ({worker.max_queue} waiting); retry later",
                                   "rate_limit_error") from None
                raise ApiError(503, f"the model is not running: {exc}", "server_error") from None
        metrics.prompt_tokens.inc(sum(len(ids) for ids, _ in prompts))
        rid = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        created = int(time.time())
        if body.stream:
            metrics.requests.labels(request.url.path, "200").inc()
            return StreamingResponse(_sse(handles[0], body, kind, rid, created, _echo_text(body, *prompts[0])),
                                     media_type="text/event-stream")
        tasks = [asyncio.ensure_future(_collect(handle, request)) for handle in handles]
        try:
            answers = await asyncio.gather(*tasks)
        except ClientGone:
            metrics.requests.labels(request.url.path, "499").inc()
            return JSONResponse({}, status_code=499)  # nobody reads it
        finally:
            for task in tasks:  # one prompt failed (timeout, hang-up): the others stop with it
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            for handle in handles:
                if handle.finish_reason is None:
                    worker.abort(handle)
        metrics.requests.labels(request.url.path, "200").inc()
        choices = [_choice(kind, body, i, handle, _echo_text(body, *prompt) + text, reason)
                   for i, (handle, prompt, (text, reason)) in enumerate(zip(handles, prompts, answers))]
        return {"id": rid, "object": "chat.completion" if kind == "chat" else "text_completion", "created": created,
                "model": model_name, "choices": choices, "usage": _usage(handles, body.n)}

    async def _collect(handle: Handle, request: Request) -> tuple[str, str]:
        text, reason = [], None
        async for kind_, value in _events(handle, request):
            if kind_ == "delta":
                text.append(value)
            elif kind_ == "done":
                reason = value
        return "".join(text), reason

    def _choice(kind: str, body, index: int, handle: Handle, content: str, reason: str) -> dict:
        asked = body.top_logprobs_asked is not None
        if kind == "chat":
            return {"index": index, "message": {"role": "assistant", "content": content}, "finish_reason": reason,
                    "logprobs": chat_logprobs(handle.logprobs, token_text) if asked else None}
        entries = _prompt_entries(handle) if body.prompt_logprobs_asked else []
        entries += [(e.token, e) for e in handle.logprobs]
        return {"index": index, "text": content, "finish_reason": reason,
                "logprobs": completion_logprobs(entries, token_text) if asked else None}

    async def _events(handle: Handle, request: Request | None = None) -> AsyncIterator[tuple[str, str]]:
        """The request's events until done; a timeout, a hang-up (polled while waiting) or an error ends it."""
        deadline = handle.arrived + request_timeout
        checked = time.perf_counter()
        while True:
            now = time.perf_counter()
            remaining = deadline - now
            if remaining <= 0:
                worker.abort(handle)
                raise ApiError(408, f"the request took longer than {request_timeout:g} s", "timeout_error")
            if request is not None and now - checked > DISCONNECT_POLL_S:  # tokens may flow without pause
                checked = now
                if await request.is_disconnected():
                    worker.abort(handle)
                    raise ClientGone
            try:
                kind, value = await asyncio.wait_for(handle.events.get(), timeout=min(remaining, DISCONNECT_POLL_S))
            except asyncio.TimeoutError:
                continue
            if kind == "error":
                raise ApiError(400, value)
            if kind == "server_error":
                raise ApiError(500, value, "server_error")
            yield kind, value
            if kind == "done":
                return

    async def _sse(handle: Handle, body, kind: str, rid: str, created: int, echo: str):
        obj = "chat.completion.chunk" if kind == "chat" else "text_completion"

        asked, sent = body.top_logprobs_asked is not None, 0  # characters of text streamed so far
        pending: list = []  # (token, entry) pairs whose text the next chunk carries

        def chunk(delta: str | None, reason: str | None = None, role: bool = False) -> str:
            nonlocal sent
            if kind == "chat":
                d = {"role": "assistant", "content": ""} if role else ({} if delta is None else {"content": delta})
                logprobs = chat_logprobs([e for _, e in pending], token_text) if asked and not role else None
                choice = {"index": 0, "delta": d, "finish_reason": reason, "logprobs": logprobs}
            else:
                logprobs = completion_logprobs(pending, token_text, sent) if asked else None
                choice = {"index": 0, "text": delta or "", "finish_reason": reason, "logprobs": logprobs}
            pending.clear()
            sent += len(delta or "")
            return f"data: {json.dumps({'id': rid, 'object': obj, 'created': created, 'model': model_name, 'choices': [choice]})}\n\n"

        try:
            if kind == "chat":
                yield chunk(None, role=True)
            if echo and not body.prompt_logprobs_asked:  # the prompt's text now; with its logprobs, once known
                yield chunk(echo)
            async for kind_, value in _events(handle):
                if kind_ == "prompt_logprobs":
                    pending.extend(_prompt_entries(handle))
                    yield chunk(echo)
                elif kind_ == "logprob":
                    pending.append((value.token, value))
                elif kind_ == "delta":
                    yield chunk(value)
                else:
                    final = json.loads(chunk(None, value)[6:])
                    final["usage"] = _usage([handle])
                    yield f"data: {json.dumps(final)}\n\n"
            yield "data: [DONE]\n\n"
        except ApiError as exc:
            yield f"data: {json.dumps({'error': {'message': exc.message, 'type': exc.kind, 'code': exc.status}})}\n\n"
        finally:  # a disconnect cancels this generator: free the slot now
            if handle.finish_reason is None:
                worker.abort(handle)

    def _echo_text(body, ids: list[int], text: str | None) -> str:
        """A completion's prompt text when it asks for echo ("" otherwise): as sent, or its token ids decoded."""
        if not getattr(body, "echo", None):
            return ""
        return text if text is not None else tokenizer.decode(ids)

    def _prompt_entries(handle: Handle) -> list:
        """The prompt's (token, entry) pairs: nothing precedes the first token, so it has none."""
        return [(handle.prompt[0], None)] + [(e.token, e) for e in handle.prompt_logprobs]

    def _usage(handles: list[Handle], n: int = 1) -> dict:
        """A response's token counts: `n` choices per prompt, a prompt counted once (as OpenAI's)."""
        prompt = sum(len(handle.prompt) for handle in handles[::n])
        completion = sum(len(handle.tokens) for handle in handles)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    @app.post("/v1/completions")
    async def completions(request: Request, body: CompletionRequest):
        prompts = []
        for item in body.prompts:
            if isinstance(item, list):
                bad = first_invalid_token(item, len(tokenizer))
                if bad is not None:
                    raise ApiError(400, f"prompt: token id {bad} is outside the vocabulary [0, {len(tokenizer)})",
                                   param="prompt")
                prompts.append((item, None))
            else:
                ids = (await asyncio.to_thread(tokenizer, item))["input_ids"]  # long prompts: off the loop
                prompts.append((ids, item))
        return await _run(request, body, prompts, "completion")

    @app.post("/v1/chat/completions")
    async def chat(request: Request, body: ChatCompletionRequest):
        template = chat_template or getattr(tokenizer, "chat_template", None)
        if not template:
            raise ApiError(400, f"{model_name} has no chat template; start the server with --chat-template FILE "
                                "or use /v1/completions", param="messages")
        messages = [m.model_dump(exclude_none=True) for m in body.messages]
        try:
            prompt = await asyncio.to_thread(tokenizer.apply_chat_template, messages, chat_template=template,
                                             add_generation_prompt=True, tokenize=True, return_dict=False)
        except Exception as exc:  # a template that rejects these messages (e.g. roles out of order)
            raise ApiError(400, f"the chat template rejected the messages: {exc}", param="messages") from None
        if isinstance(prompt, dict):
            prompt = prompt["input_ids"]
        return await _run(request, body, [(list(prompt), None)], "chat")

    return app
