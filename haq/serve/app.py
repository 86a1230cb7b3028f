"""`haq serve`: an OpenAI-compatible HTTP server (FastAPI + uvicorn) over the batch generator.

POST /v1/completions, POST /v1/chat/completions (JSON, or SSE with stream=true: a role chunk for
chat, text deltas, a final chunk with finish_reason and usage, then `data: [DONE]`), GET /v1/models,
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

    def _prepare(body, prompt: list[int], kind: str) -> Handle:
        if body.model != model_name:
            raise ApiError(404, f"model {body.model!r} not found; this server serves {model_name!r}",
                           "not_found_error", "model")
        max_tokens = body.max_tokens or min(DEFAULT_MAX_TOKENS[kind], max(context - len(prompt), 1))
        if len(prompt) + max_tokens > context:
            raise ApiError(400, f"prompt ({len(prompt)} tokens) + max_tokens ({max_tokens}) exceeds the model's "
                                f"context of {context} tokens", param="max_tokens")
        try:
            params = SamplingParams(max_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p,
                                    top_k=body.top_k, seed=body.seed, presence_penalty=body.presence_penalty,
                                    frequency_penalty=body.frequency_penalty, repetition_penalty=body.repetition_penalty, ignore_eos=body.ignore_eos)
        except HaqError as exc:
            raise ApiError(400, str(exc)) from None
        return Handle(prompt, params, body.stops, asyncio.get_running_loop())

    async def _run(request: Request, body, prompt: list[int], kind: str):
        handle = _prepare(body, prompt, kind)
        try:
            worker.submit(handle)
        except QueueFull:
            raise ApiError(429, f"the server queue is full ({worker.max_queue} waiting); retry later",
                           "rate_limit_error") from None
        except WorkerDead as exc:
            raise ApiError(503, f"the model is not running: {exc}", "server_error") from None
        metrics.prompt_tokens.inc(len(prompt))
        rid = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        created = int(time.time())
        if body.stream:
            metrics.requests.labels(request.url.path, "200").inc()
            return StreamingResponse(_sse(handle, body, kind, rid, created), media_type="text/event-stream")
        text, reason = [], None
        try:
            async for kind_, value in _events(handle, request):
                if kind_ == "delta":
                    text.append(value)
                else:
                    reason = value
        except ClientGone:
            metrics.requests.labels(request.url.path, "499").inc()
            return JSONResponse({}, status_code=499)  # nobody reads it
        finally:
            if handle.finish_reason is None:
                worker.abort(handle)
        metrics.requests.labels(request.url.path, "200").inc()
        usage = _usage(handle)
        content = "".join(text)
        choice = ({"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": reason}
                  if kind == "chat" else {"index": 0, "text": content, "finish_reason": reason, "logprobs": None})
        return {"id": rid, "object": "chat.completion" if kind == "chat" else "text_completion", "created": created,
                "model": model_name, "choices": [choice], "usage": usage}

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

    async def _sse(handle: Handle, body, kind: str, rid: str, created: int):
        obj = "chat.completion.chunk" if kind == "chat" else "text_completion"

        def chunk(delta: str | None, reason: str | None = None, role: bool = False) -> str:
            if kind == "chat":
                d = {"role": "assistant", "content": ""} if role else ({} if delta is None else {"content": delta})
                choice = {"index": 0, "delta": d, "finish_reason": reason}
            else:
                choice = {"index": 0, "text": delta or "", "finish_reason": reason, "logprobs": None}
            return f"data: {json.dumps({'id': rid, 'object': obj, 'created': created, 'model': model_name, 'choices': [choice]})}\n\n"

        try:
            if kind == "chat":
                yield chunk(None, role=True)
            async for kind_, value in _events(handle):
                if kind_ == "delta":
                    yield chunk(value)
                else:
                    final = json.loads(chunk(None, value)[6:])
                    final["usage"] = _usage(handle)
                    yield f"data: {json.dumps(final)}\n\n"
            yield "data: [DONE]\n\n"
        except ApiError as exc:
            yield f"data: {json.dumps({'error': {'message': exc.message, 'type': exc.kind, 'code': exc.status}})}\n\n"
        finally:  # a disconnect cancels this generator: free the slot now
            if handle.finish_reason is None:
                worker.abort(handle)

    def _usage(handle: Handle) -> dict:
        n = len(handle.tokens)
        return {"prompt_tokens": len(handle.prompt), "completion_tokens": n, "total_tokens": len(handle.prompt) + n}

    @app.post("/v1/completions")
    async def completions(request: Request, body: CompletionRequest):
        if isinstance(body.prompt, list):
            bad = first_invalid_token(body.prompt, len(tokenizer))
            if bad is not None:
                raise ApiError(400, f"prompt: token id {bad} is outside the vocabulary [0, {len(tokenizer)})",
                               param="prompt")
            prompt = body.prompt
        else:
            prompt = (await asyncio.to_thread(tokenizer, body.prompt))["input_ids"]  # long prompts: off the loop
        return await _run(request, body, prompt, "completion")

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
        return await _run(request, body, list(prompt), "chat")

    return app
