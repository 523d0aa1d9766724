"""The HTTP front of `lcc run serve` on rank 0: an OpenAI-compatible API (FastAPI, served by uvicorn) over
the engine loop (lcc.serve.loop), with Prometheus metrics.

    POST /v1/completions, /v1/chat/completions   (stream: server-sent events, `data: [DONE]` last)
    GET  /v1/models, /health (503 while loading, draining or failed), /metrics

A bad request gets a 400 with OpenAI's error body and changes nothing; more than `max_queued` requests
waiting get a 429 with Retry-After; a client that goes away has its request aborted and its KV blocks
freed (mid-stream at once, a non-streamed one within a quarter of a second). SIGTERM stops admission (503),
lets running requests finish for up to `shutdown_timeout` seconds, aborts the rest and releases the other
ranks.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    generate_latest,
)

from lcc.data.tokenizer import Tokenizer
from lcc.plan.types import Serving
from lcc.serve import api
from lcc.serve.engine import RequestError, Update, check_request
from lcc.serve.loop import EngineLoop

DISCONNECT_POLL_S = 0.25  # how often a non-streamed request looks whether its client is still there
LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0)


class Metrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.running = Gauge("lcc_requests_running", "Requests being generated.", registry=r)
        self.waiting = Gauge("lcc_requests_waiting", "Requests queued for their first step.", registry=r)
        self.kv_blocks_used = Gauge("lcc_kv_cache_blocks_used", "KV cache blocks held by sequences, all dp ranks.",
                                    registry=r)
        self.kv_usage = Gauge("lcc_kv_cache_usage_ratio", "Share of the KV cache blocks in use.", registry=r)
        self.time_to_first_token = Histogram("lcc_time_to_first_token_seconds", "From arrival to the first token.",
                                             buckets=LATENCY_BUCKETS, registry=r)
        self.inter_token_latency = Histogram("lcc_inter_token_latency_seconds", "Between a request's tokens.",
                                             buckets=LATENCY_BUCKETS, registry=r)
        self.e2e_latency = Histogram("lcc_e2e_request_latency_seconds", "From arrival to the end.",
                                     buckets=LATENCY_BUCKETS, registry=r)
        self.prompt_tokens = Counter("lcc_prompt_tokens", "Prompt tokens of admitted requests.", registry=r)
        self.generation_tokens = Counter("lcc_generation_tokens", "Generated tokens.", registry=r)
        self.finished = Counter("lcc_requests_finished", "Finished requests by reason (stop, length, abort).",
                                ["reason"], registry=r)
        self.rejected = Counter("lcc_requests_rejected", "Requests refused by status code.", ["status"], registry=r)
        ProcessCollector(registry=r)  # process_resident_memory_bytes and the like, of this rank (0)


def build_app(loop: EngineLoop, metrics: Metrics, serving: Serving, model: str, tokenizer: Tokenizer,
              max_queued: int) -> FastAPI:
    app = FastAPI(title="lcc", docs_url=None, redoc_url=None, openapi_url=None)
    vocab = tokenizer.vocab_size

    def refuse(exc: api.ApiError) -> JSONResponse:
        metrics.rejected.labels(status=str(exc.status)).inc()
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.get("/health")
    async def health() -> Response:
        if loop.failure is not None:
            return PlainTextResponse(f"failed: {loop.failure}", status_code=503)
        if not loop.ready.is_set():
            return PlainTextResponse("loading", status_code=503)
        if not loop.accepting or loop.stopped.is_set():
            return PlainTextResponse("draining", status_code=503)
        return PlainTextResponse("ok")

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": model, "object": "model", "created": 0, "owned_by": "lcc",
                                            "max_model_len": serving.max_seq_len}]}

    async def generate(request: Request, chat: bool) -> Response:
        try:
            req = api.parse(await request.body(), api.ChatRequest if chat else api.CompletionRequest)
            if req.model != model:
                raise api.ApiError(400, f"model {req.model!r} does not exist; this server serves {model!r}", "model",
                                   "model_not_found")
            if chat:  # without a limit, a reply may fill the context
                try:
                    prompt = tokenizer.encode(api.chat_prompt(req.messages))
                except ValueError as exc:
                    raise api.ApiError(400, str(exc), "messages") from None
                limit = req.max_completion_tokens or req.max_tokens or max(1, serving.max_seq_len - len(prompt))
            else:
                try:
                    prompt = tokenizer.encode(req.prompt) if isinstance(req.prompt, str) else list(req.prompt)
                except ValueError as exc:
                    raise api.ApiError(400, str(exc), "prompt") from None
                limit = req.max_tokens
            params = api.sampling(req, limit if limit is not None else 16)
            try:
                check_request(serving, vocab, prompt, params)
            except RequestError as exc:
                raise api.ApiError(400, str(exc), "messages" if chat else "prompt") from None
            if not loop.healthy:
                raise api.ApiError(503, "the server is not taking requests (loading, draining or failed)",
                                   kind="server_error", headers={"Retry-After": "1"})
            if loop.queued() >= max_queued:
                raise api.ApiError(429, f"{max_queued} requests are already waiting; retry later", kind="rate_limit",
                                   code="queue_full", headers={"Retry-After": "1"})
        except api.ApiError as exc:
            return refuse(exc)
        events: asyncio.Queue[Update] = asyncio.Queue()
        aio = asyncio.get_running_loop()
        key = loop.submit(prompt, params, lambda u: aio.call_soon_threadsafe(events.put_nowait, u))
        created = api.now()
        if req.stream:
            usage = req.stream_options is not None and req.stream_options.include_usage
            return StreamingResponse(_stream(loop, events, key, model, chat, created, len(prompt), usage),
                                     media_type="text/event-stream")
        text, n, reason = [], 0, None
        checked = aio.time()
        try:
            while reason is None:
                try:
                    u = await asyncio.wait_for(events.get(), DISCONNECT_POLL_S)
                except TimeoutError:
                    u = None
                if aio.time() - checked >= DISCONNECT_POLL_S:
                    checked = aio.time()
                    if await request.is_disconnected():  # nobody to answer: free its blocks now
                        loop.abort(key)
                        return Response(status_code=499)
                if u is None:
                    continue
                text.append(u.text)
                n += len(u.token_ids)
                reason = u.finished
        except asyncio.CancelledError:
            loop.abort(key)
            raise
        return JSONResponse(api.completion(key, model, chat, "".join(text), reason, len(prompt), n, created))

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await generate(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await generate(request, chat=True)

    return app


async def _stream(loop: EngineLoop, events: asyncio.Queue[Update], key: int, model: str, chat: bool, created: int,
                  prompt: int, include_usage: bool) -> AsyncIterator[bytes]:
    """The request's server-sent events; a client that goes away aborts the request (finally)."""
    n, done, first = 0, False, True
    try:
        while not done:
            u = await events.get()
            n += len(u.token_ids)
            done = u.finished is not None
            if u.text or done or first:
                yield api.sse(api.chunk(key, model, chat, u.text, u.finished, created, first))
                first = False
        if include_usage:
            final = api.chunk(key, model, chat, None, None, created)
            final["choices"] = []
            final["usage"] = api.usage(prompt, n)
            yield api.sse(final)
        yield api.sse("[DONE]")
    finally:
        if not done:
            loop.abort(key)


class Server(uvicorn.Server):
    """uvicorn's server; SIGTERM and SIGINT first stop admission (the engine loop drains)."""

    def __init__(self, config: uvicorn.Config, loop: EngineLoop):
        super().__init__(config)
        self.engine_loop = loop

    def handle_exit(self, sig: int, frame: Any) -> None:
        self.engine_loop.drain()
        super().handle_exit(sig, frame)


def run_server(loop: EngineLoop, metrics: Metrics, serving: Serving, model: str, tokenizer: Tokenizer, host: str,
               port: int, max_queued: int, shutdown_timeout: float) -> None:
    """Serve until SIGTERM/SIGINT (then drain for up to `shutdown_timeout` s) or the engine fails."""
    app = build_app(loop, metrics, serving, model, tokenizer, max_queued)
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False,
                            timeout_graceful_shutdown=shutdown_timeout, lifespan="off")
    server = Server(config, loop)

    async def main() -> None:
        watch = asyncio.create_task(_watch_engine(loop, server))
        try:
            await server.serve()
        finally:
            watch.cancel()

    asyncio.run(main())


async def _watch_engine(loop: EngineLoop, server: uvicorn.Server) -> None:
    """A failed engine ends the server (its error is the run's)."""
    while not loop.stopped.is_set():
        await asyncio.sleep(0.2)
    server.should_exit = True
