"""The ASGI app (FastAPI on Starlette): OpenAI-compatible chat completions with diffusion-aware
streaming, an infill endpoint, model listing, health and batching stats, and the web page.

Streams are server-sent events in the OpenAI ``chat.completion.chunk`` schema. A diffusion answer is
not known left to right, so every chunk carries the whole current answer in an extension field,
``diffusion: {step, state, slots, masked}``; ``delta.content`` stays empty until the last content
chunk, which holds the complete answer. A client that only wants text concatenates ``delta.content``
as usual and gets exactly the non-streamed answer (see docs/serving.md).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import secrets
import time
import uuid
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, AsyncIterator, Callable, Optional

from fastapi import Depends, FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles

from .engine import ChatResult, ChatTask, Engine, InfillResult, InfillTask
from .errors import APIError, install_error_handlers
from .scheduler import BatchCancelled, BatchScheduler, Job, QueueFull
from .schemas import ChatCompletionRequest, InfillRequest

__all__ = ["create_app", "MAX_BODY_BYTES", "HEARTBEAT_SECONDS"]

log = logging.getLogger("diffusion_lm.serve")

STATIC = Path(__file__).with_name("static")
MAX_BODY_BYTES = 4 << 20  # a prompt the model accepts is a few KB; refuse megabytes before parsing them
# an SSE comment while a request waits: proxies keep the stream open, gone clients show up
HEARTBEAT_SECONDS = 1.0
DISCONNECT_POLL_SECONDS = 0.25  # how often a non-streamed request checks that its client is still there


class _EventStream(StreamingResponse):
    """A streaming response that always closes its generator, so the generator's ``finally`` (which
    cancels the request) runs as soon as the client is gone, whatever the ASGI server reports."""

    media_type = "text/event-stream"

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()  # type: ignore[union-attr]


class _BodyLimit:
    """Refuses a declared body over ``limit`` bytes with 413 before anything reads it (plain ASGI, so
    streaming responses pass through untouched)."""

    def __init__(self, app, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http":
            size = dict(scope.get("headers") or []).get(b"content-length", b"")
            if size.isdigit() and int(size) > self.limit:
                error = APIError(413,
                                 f"the request body is {int(size)} bytes, more than the {self.limit} this "
                                 "server accepts", code="request_too_large")
                await error.response()(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _sse(payload: Any) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


def create_app(
    model,
    *,
    model_name: str = "diffusion-lm",
    sampler: Optional[dict] = None,
    canvas_length: Optional[int] = None,
    max_batch_size: int = 16,
    max_wait: float = 0.01,
    max_queue: int = 256,
    api_key: Optional[str] = None,
) -> FastAPI:
    """The server app for a loaded ``model``.

    Args:
        model: a loaded :class:`~diffusion_lm.MaskedDiffusionLM`.
        model_name: the id clients send as ``model`` and ``GET /v1/models`` lists.
        sampler: default sampler as ``build_sampler`` arguments (``preset``, ``steps``, ...).
        canvas_length: answer slots when a request has no ``max_tokens`` (default: the model's).
        max_batch_size, max_wait, max_queue: dynamic batching (see :class:`BatchScheduler`).
        api_key: when set, ``/v1/*`` and ``/stats`` need ``Authorization: Bearer <api_key>``.
    """
    engine = Engine(model, sampler=sampler, canvas_length=canvas_length)
    scheduler = BatchScheduler(engine.run_batch, max_batch_size=max_batch_size, max_wait=max_wait,
                               max_queue=max_queue)
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        scheduler.start()
        log.info("serving %s (max batch %d, max wait %.1f ms, queue %d)", model_name, max_batch_size,
                 max_wait * 1000, max_queue)
        try:
            yield
        finally:
            scheduler.stop()

    app = FastAPI(title="diffusion-lm", summary="OpenAI-compatible masked-diffusion LM server",
                  lifespan=lifespan, docs_url="/docs", redoc_url=None)
    app.state.engine = engine
    app.state.scheduler = scheduler
    install_error_handlers(app)

    app.add_middleware(_BodyLimit, limit=MAX_BODY_BYTES)

    def authorize(request: Request) -> None:
        if api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip().encode(), api_key.encode()):
            raise APIError(401, "missing or wrong API key: send the header 'Authorization: Bearer <key>'",
                           code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    def check_model(name: Optional[str]) -> None:
        if name is not None and name != model_name:
            raise APIError(404, f"model {name!r} is not served here; this server serves {model_name!r}",
                           param="model", code="model_not_found")

    def submit(task, stream: bool) -> Job:
        job = Job(key=task.key, payload=task, stream=stream, loop=asyncio.get_running_loop())
        try:
            scheduler.submit(job)
        except QueueFull as full:
            raise APIError(429,
                           f"the server is busy ({max_queue} requests queued); retry after "
                           f"{full.retry_after} s", code="queue_full",
                           headers={"Retry-After": str(full.retry_after)}) from None
        return job

    async def next_event(job: Job, timeout: float = HEARTBEAT_SECONDS) -> Optional[tuple]:
        """The job's next event, or None after ``timeout`` seconds without one."""
        try:
            return await asyncio.wait_for(job.queue.get(), timeout)
        except asyncio.TimeoutError:
            return None

    def failure(error: BaseException) -> APIError:
        if isinstance(error, APIError):
            return error
        if isinstance(error, BatchCancelled):
            return APIError(499, "the request was cancelled", type="cancelled")
        return APIError(500, f"generation failed: {type(error).__name__}: {error}", type="server_error")

    async def result_of(request: Request, job: Job):
        """Wait for a non-streamed job; cancel it if the client disconnects meanwhile."""
        done = False
        try:
            while True:
                event = await next_event(job, DISCONNECT_POLL_SECONDS)
                if event is None:
                    if await request.is_disconnected():
                        return None
                    continue
                kind, value = event
                if kind == "done":
                    done = True
                    return value
                if kind == "error":
                    done = True
                    raise failure(value)
        finally:
            if not done:
                scheduler.cancel(job)

    def meta(prefix: str) -> dict[str, Any]:
        return {"id": f"{prefix}-{uuid.uuid4().hex[:24]}", "created": int(time.time()), "model": model_name}

    def diffusion_info(result) -> dict[str, Any]:
        return {"seed": result.seed, "batch_size": result.batch_size, **result.stats}

    # --------------------------------------------------------------------------------- routes
    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/health")
    async def health() -> dict:
        """Liveness: the model is loaded and the batching worker runs."""
        return {"status": "ok" if scheduler.alive else "stopped", "model": model_name}

    @app.get("/stats", dependencies=[Depends(authorize)])
    async def stats() -> dict:
        """Batching counters: batch sizes seen, requests completed/cancelled/rejected, queue depth."""
        return {"model": model_name, **scheduler.stats()}

    def model_card() -> dict[str, Any]:
        return {"id": model_name, "object": "model", "created": created, "owned_by": "diffusion-lm",
                "max_model_len": engine.max_length,
                "diffusion": {"default_max_tokens": engine.canvas_length,
                              "sampler": engine.default_sampler.to_dict()}}

    @app.get("/v1/models", dependencies=[Depends(authorize)])
    async def models() -> dict:
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{name:path}", dependencies=[Depends(authorize)])
    async def model_info(name: str) -> dict:
        check_model(name)
        return model_card()

    @app.post("/v1/chat/completions", dependencies=[Depends(authorize)])
    async def chat_completions(req: ChatCompletionRequest, request: Request) -> Response:
        check_model(req.model)
        task = engine.chat_task(req)
        job = submit(task, req.stream)
        info = meta("chatcmpl")
        if req.stream:
            usage = bool(req.stream_options and req.stream_options.include_usage)
            return _EventStream(chat_events(job, task, info, usage))
        result: Optional[ChatResult] = await result_of(request, job)
        if result is None:
            return Response(status_code=499)
        return JSONResponse({
            **info, "object": "chat.completion",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": result.answer},
                         "finish_reason": result.finish_reason, "logprobs": None}],
            "usage": _usage(result), "diffusion": diffusion_info(result),
        })

    async def job_events(job: Job, first: str, on_step: Callable[[int, Any], str],
                         on_done: Callable[[Any], list[str]]) -> AsyncIterator[str]:
        """The server-sent events of one streamed request: ``first``, one event per sampler step,
        the final events of the result (or one error event), then ``[DONE]``; keep-alive comments
        while the request waits. A client that leaves cancels the request."""
        finished = False
        try:
            yield first
            while True:
                event = await next_event(job)
                if event is None:
                    yield ": waiting\n\n"
                    continue
                kind, value = event
                if kind == "step":
                    yield on_step(*value)
                    continue
                finished = True
                if kind == "done":
                    for text in on_done(value):
                        yield text
                else:
                    err = failure(value)
                    yield _sse({"error": {"message": err.message, "type": err.type, "param": err.param,
                                          "code": err.code}})
                break
            yield "data: [DONE]\n\n"
        finally:
            if not finished:  # the client left (or the server stops): drop or abort the request
                scheduler.cancel(job)

    def chat_events(job: Job, task: ChatTask, info: dict, usage: bool) -> AsyncIterator[str]:
        def chunk(delta: dict, state: Optional[dict], finish: Optional[str] = None, **extra) -> str:
            choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
            body = {**info, "object": "chat.completion.chunk", "choices": [choice], **extra}
            if state is not None:
                body["diffusion"] = state
            return _sse(body)

        def done(result: ChatResult) -> list[str]:
            state = {"step": result.stats["nfe"], "slots": result.slots, "state": result.answer,
                     "masked": 0, "done": True, **diffusion_info(result)}
            events = [chunk({"content": result.answer}, state), chunk({}, None, result.finish_reason)]
            if usage:
                events.append(_sse({**info, "object": "chat.completion.chunk", "choices": [],
                                    "usage": _usage(result)}))
            return events

        def step(number: int, ids: Any) -> str:
            return chunk({}, {"step": number, **engine.chat_state(task, ids), "done": False})

        first = chunk({"role": "assistant", "content": ""},
                      {"step": 0, **engine.initial_state(task), "done": False})
        return job_events(job, first, step, done)

    @app.post("/v1/infill", dependencies=[Depends(authorize)])
    async def infill(req: InfillRequest, request: Request) -> Response:
        """Fill the [[MASK]] / [[MASK:n]] holes of a text (extension endpoint)."""
        check_model(req.model)
        task = engine.infill_task(req)
        job = submit(task, req.stream)
        info = meta("infill")
        if req.stream:
            return _EventStream(infill_events(job, task, info))
        result: Optional[InfillResult] = await result_of(request, job)
        if result is None:
            return Response(status_code=499)
        return JSONResponse({**info, "object": "infill", "text": result.text, "fills": result.fills,
                             "usage": _usage(result), "diffusion": diffusion_info(result)})

    def infill_events(job: Job, task: InfillTask, info: dict) -> AsyncIterator[str]:
        def event(**body) -> str:
            return _sse({**info, "object": "infill.chunk", **body})

        def done(result: InfillResult) -> list[str]:
            return [event(text=result.text, fills=result.fills, usage=_usage(result),
                          diffusion={"step": result.stats["nfe"], "holes": result.holes, "state": result.text,
                                     "masked": 0, "done": True, **diffusion_info(result)})]

        def step(number: int, ids: Any) -> str:
            return event(diffusion={"step": number, **engine.infill_state(task, ids), "done": False})

        first = event(diffusion={"step": 0, **engine.initial_state(task), "done": False})
        return job_events(job, first, step, done)

    return app


def _usage(result) -> dict[str, int]:
    return {"prompt_tokens": result.prompt_tokens, "completion_tokens": result.completion_tokens,
            "total_tokens": result.prompt_tokens + result.completion_tokens}


def default_api_key(flag: Optional[str]) -> Optional[str]:
    """The API key: the flag, else ``DIFFUSION_LM_API_KEY``, else None (no key needed)."""
    key = flag if flag is not None else os.environ.get("DIFFUSION_LM_API_KEY")
    return key or None
