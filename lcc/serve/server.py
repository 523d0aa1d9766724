"""The HTTP front of `lcc run serve` on rank 0: an OpenAI-compatible API (FastAPI, served by uvicorn) over
the engine loop (lcc.serve.loop), with Prometheus metrics.

    POST /v1/completions, /v1/chat/completions   (stream: server-sent events, `data: [DONE]` last)
    GET  /v1/models, /health (503 while loading, draining or failed), /metrics

A bad request gets a 400 with OpenAI's error body naming the field and changes nothing (a body over the
limit: 413, refused before it is read in full); more than `max_queued` requests waiting get a 429 with
Retry-After; a client that goes away has its request aborted and its KV blocks freed (mid-stream at once,
a non-streamed one within a quarter of a second). A request whose serving fails gets a 500 (an error event
mid-stream) and the others go on. The body is parsed and the prompt tokenized in a worker thread, so a
large prompt does not hold up the streams of others. SIGTERM stops admission (/health and new requests
503) while the socket still listens, lets running requests finish for up to `shutdown_timeout` seconds,
aborts the rest and releases the other ranks.
"""

from __future__ import annotations

import asyncio
import hmac
import socket
import time
from collections.abc import AsyncIterator, Callable, Iterator
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
from prometheus_client.core import CounterMetricFamily

from lcc.plan.types import Serving
from lcc.serve import api
from lcc.serve.engine import RequestError, Update, check_request
from lcc.serve.loop import EngineLoop
from lcc.serve.sampling import SamplingParams
from lcc.serve.served import ServedModel
from lcc.serve.structured import GrammarError

DISCONNECT_POLL_S = 0.25  # how often a non-streamed request looks whether its client is still there
DRAIN_POLL_S = 0.05  # how often a drain looks whether every request has finished
FLUSH_S = 2.0  # after a drain, for the responses of the requests it ended to go out
DEFAULT_MAX_TOKENS = 16  # of a completion that names none (OpenAI's default), within the context
LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0)


class Metrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.running = Gauge("lcc_requests_running", "Requests being generated.", registry=r)
        self.waiting = Gauge("lcc_requests_waiting", "Requests queued for their first step.", registry=r)
        self.kv_blocks_used = Gauge("lcc_kv_cache_blocks_used", "KV cache blocks held by sequences, all dp ranks.",
                                    registry=r)
        self.kv_usage = Gauge("lcc_kv_cache_usage_ratio", "Share of the KV cache blocks in use.", registry=r)
        self.prefix_hit_tokens = Counter("lcc_prefix_cache_hit_tokens", "Prompt tokens whose keys and values "
                                         "came from the prefix cache.", registry=r)
        self.prefix_query_tokens = Counter("lcc_prefix_cache_query_tokens", "Prompt tokens looked up in the "
                                           "prefix cache.", registry=r)
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

    def watch_experts(self, counts: Callable[[], dict[int, Any]]) -> None:
        """Export `lcc_expert_tokens_total{layer, expert}`, read from `counts()` (per MoE layer, an int64 tensor
        of tokens per expert) at each scrape."""
        self.registry.register(_ExpertCounts(counts))


class _ExpertCounts:
    def __init__(self, counts: Callable[[], dict[int, Any]]):
        self.counts = counts

    def describe(self) -> list[CounterMetricFamily]:
        return [self._family()]

    def collect(self) -> Iterator[CounterMetricFamily]:
        family = self._family()
        for layer, per_expert in sorted(self.counts().items()):
            for expert, n in enumerate(per_expert.tolist()):
                family.add_metric([str(layer), str(expert)], n)
        yield family

    @staticmethod
    def _family() -> CounterMetricFamily:
        return CounterMetricFamily("lcc_expert_tokens", "Tokens routed to each expert, by MoE layer (a token counts "
                                   "once for each expert it chose; prompt tokens included).",
                                   labels=["layer", "expert"])


def build_app(loop: EngineLoop, metrics: Metrics, serving: Serving, served: ServedModel, max_queued: int,
              api_key: str | None = None) -> FastAPI:
    """`api_key`: the /v1/ routes answer 401 without `Authorization: Bearer <api_key>`; /health and /metrics
    stay open."""
    app = FastAPI(title="lcc", docs_url=None, redoc_url=None, openapi_url=None)
    model, tokenizer, chat_template = served.name, served.tokenizer, served.chat_template
    vocab = tokenizer.vocab_size
    limit = api.body_limit(serving.max_seq_len)

    def refuse(exc: api.ApiError) -> JSONResponse:
        metrics.rejected.labels(status=str(exc.status)).inc()
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    if api_key is not None:
        expected = f"Bearer {api_key}".encode()

        @app.middleware("http")
        async def authenticate(request: Request, call_next: Callable[[Request], Any]) -> Response:
            given = request.headers.get("authorization", "").encode()
            if request.url.path.startswith("/v1/") and not hmac.compare_digest(given, expected):
                return refuse(api.ApiError(401, "a valid API key is needed: Authorization: Bearer <key>",
                                           kind="invalid_request_error", code="invalid_api_key"))
            return await call_next(request)

    def chat_tokens(messages: list[api.Message]) -> list[int]:
        if chat_template is None:
            return tokenizer.encode(api.chat_prompt(messages))
        text = chat_template.render([m.model_dump() for m in messages])
        return tokenizer.encode(text, special=False)

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

    def prepare(body: bytes, chat: bool) -> tuple[api.RequestBody, list[int], SamplingParams]:
        """The request, its prompt's token ids and its sampling parameters, or ApiError naming the field
        (in a worker thread: parsing and tokenizing a large body takes a while)."""
        req = api.parse(body, api.ChatRequest if chat else api.CompletionRequest)
        if req.model != model:
            raise api.ApiError(400, f"model {req.model!r} does not exist; this server serves {model!r}", "model",
                               "model_not_found")
        if req.return_routed_experts and not served.moe_layers:
            raise api.ApiError(400, f"return_routed_experts: {model} has no MoE layers", "return_routed_experts")
        field = "messages" if chat else "prompt"
        try:
            if chat:
                prompt = chat_tokens(req.messages)
            else:
                prompt = tokenizer.encode(req.prompt) if isinstance(req.prompt, str) else list(req.prompt)
        except ValueError as exc:
            raise api.ApiError(400, str(exc), field) from None
        room = serving.max_seq_len - len(prompt)
        asked, name = ((req.max_completion_tokens, "max_completion_tokens") if chat and req.max_completion_tokens
                       else (req.max_tokens, "max_tokens"))
        if asked is not None and 0 < room < asked:
            raise api.ApiError(400, f"{name}: {asked} tokens do not fit: the prompt has {len(prompt)} tokens and "
                               f"serve.max_seq_len is {serving.max_seq_len} (at most {room} more)", name)
        default = max(1, room) if chat else min(DEFAULT_MAX_TOKENS, max(1, room))  # a chat reply may fill it
        grammar = None
        structure = api.structure(req)
        if structure is not None:
            param, kind, value = structure
            try:
                grammar = served.grammars.compile(kind, value)
            except GrammarError as exc:
                raise api.ApiError(400, f"{param}: {exc}", param) from None
        try:
            params = api.sampling(req, asked if asked is not None else default, grammar)
        except ValueError as exc:  # what the fields' bounds let through and the sampler still refuses
            raise api.ApiError(400, str(exc)) from None
        try:
            check_request(serving, vocab, prompt, params)
        except RequestError as exc:
            raise api.ApiError(400, str(exc), field if exc.field == "prompt" else name) from None
        return req, prompt, params

    async def generate(request: Request, chat: bool) -> Response:
        try:
            body = await _read_body(request, limit)
            req, prompt, params = await asyncio.to_thread(prepare, body, chat)
            if not loop.healthy:
                raise api.ApiError(503, f"the server is not taking requests ({_state(loop)})", kind="server_error",
                                   headers={"Retry-After": "1"})
            if loop.queued() >= max_queued:
                raise api.ApiError(429, f"{max_queued} requests are already waiting; retry later", kind="rate_limit",
                                   code="queue_full", headers={"Retry-After": "1"})
        except api.ApiError as exc:
            return refuse(exc)
        events: asyncio.Queue[Update] = asyncio.Queue()
        aio = asyncio.get_running_loop()
        key = loop.submit(prompt, params, lambda u: aio.call_soon_threadsafe(events.put_nowait, u))
        created = api.now()
        extras = api.Extras(req, prompt)
        if req.stream:
            usage = req.stream_options is not None and req.stream_options.include_usage
            return StreamingResponse(_stream(loop, events, key, model, chat, created, len(prompt), usage, extras),
                                     media_type="text/event-stream")
        return await _answer(request, loop, events, key, model, chat, created, len(prompt), extras)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await generate(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await generate(request, chat=True)

    return app


def _state(loop: EngineLoop) -> str:
    if loop.failure is not None:
        return "the engine failed"
    return "loading" if not loop.ready.is_set() else "draining"


async def _read_body(request: Request, limit: int) -> bytes:
    """The request body, or ApiError 413 as soon as it is known to exceed `limit` bytes (from its
    Content-Length, before reading any of it, or while reading it)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise api.ApiError(413, f"the request body has {int(declared)} bytes; at most {limit} are taken", None,
                           "body_too_large")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise api.ApiError(413, f"the request body has more than {limit} bytes; at most {limit} are taken", None,
                               "body_too_large")
        chunks.append(chunk)
    return b"".join(chunks)


async def _answer(request: Request, loop: EngineLoop, events: asyncio.Queue[Update], key: int, model: str,
                  chat: bool, created: int, prompt: int, extras: api.Extras) -> Response:
    """A non-streamed request's response, once it has finished; a client that went away aborts it. `extras`:
    what the request asked for besides the text, collected as the tokens come."""
    aio = asyncio.get_running_loop()
    text, n, last = [], 0, None
    getter: asyncio.Future[Update] | None = None
    checked = aio.time()
    try:
        while last is None or last.finished is None:
            getter = getter or asyncio.ensure_future(events.get())
            done, _ = await asyncio.wait({getter}, timeout=DISCONNECT_POLL_S)  # no timeout error to catch
            if done:
                last, getter = getter.result(), None
                text.append(last.text)
                n += len(last.token_ids)
                extras.add(last.token_ids, last.routed_experts)
            if (last is None or last.finished is None) and aio.time() - checked >= DISCONNECT_POLL_S:
                # also while tokens keep coming: a request that outpaces the poll is still looked after
                checked = aio.time()
                if await request.is_disconnected():  # nobody to answer: free its blocks now
                    loop.abort(key)
                    return Response(status_code=499)
    except asyncio.CancelledError:
        loop.abort(key)
        raise
    finally:
        if getter is not None:
            getter.cancel()
    if last.error is not None:
        return JSONResponse(api.server_error(last.error), status_code=500)
    return JSONResponse(api.completion(key, model, chat, "".join(text), last.finished, prompt, n, created, extras))


async def _stream(loop: EngineLoop, events: asyncio.Queue[Update], key: int, model: str, chat: bool, created: int,
                  prompt: int, include_usage: bool, extras: api.Extras) -> AsyncIterator[bytes]:
    """The request's server-sent events; a client that goes away aborts the request (finally). `extras`:
    what the request asked for besides the text, of the tokens not yet sent."""
    n, done, first = 0, False, True
    try:
        while not done:
            u = await events.get()
            n += len(u.token_ids)
            done = u.finished is not None
            extras.add(u.token_ids, u.routed_experts)
            if u.error is not None:  # OpenAI's clients raise on an event with an error body
                yield api.sse(api.server_error(u.error))
                yield api.sse("[DONE]")
                return
            if u.text or done or first:
                yield api.sse(api.chunk(key, model, chat, u.text, u.finished, created, first, extras))
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
    """uvicorn's server, draining on SIGTERM and SIGINT: admission stops (/health and new requests 503)
    while the socket still listens and running requests finish, for up to `shutdown_timeout` seconds (then
    what is left is aborted). Signals during the drain change nothing: one signal often comes twice (Ctrl-C
    reaches this rank and the launcher, which passes a SIGTERM on), and the drain is bounded anyway."""

    def __init__(self, config: uvicorn.Config, loop: EngineLoop, shutdown_timeout: float):
        super().__init__(config)
        self.engine_loop, self.shutdown_timeout = loop, shutdown_timeout
        self.draining_since: float | None = None

    def handle_exit(self, sig: int, frame: Any) -> None:
        if self.draining_since is None:
            self.engine_loop.drain()
            self.draining_since = time.monotonic()


def listen(host: str, port: int) -> socket.socket:
    """A socket bound to `host`:`port` (0: a port the system chooses, `getsockname()` says which)."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def run_server(loop: EngineLoop, metrics: Metrics, serving: Serving, served: ServedModel, sock: socket.socket,
               max_queued: int, shutdown_timeout: float, say: Callable[[str], None],
               api_key: str | None = None) -> None:
    """Serve on the bound socket `sock` until SIGTERM/SIGINT (then drain for up to `shutdown_timeout` s) or the
    engine fails; `say` is told when the server is ready and listening. The engine loop is stopped before
    the event loop closes (what it aborts is delivered while something still listens)."""
    app = build_app(loop, metrics, serving, served, max_queued, api_key)
    config = uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=FLUSH_S,
                            lifespan="off")
    server = Server(config, loop, shutdown_timeout)

    async def main() -> None:
        tasks = [asyncio.create_task(_watch(loop, server)),
                 asyncio.create_task(_announce(loop, server, f"{url_of(sock)}/v1", say))]
        try:
            await server.serve(sockets=[sock])
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.to_thread(loop.stop)

    asyncio.run(main())


async def _announce(loop: EngineLoop, server: uvicorn.Server, url: str, say: Callable[[str], None]) -> None:
    """Say the server is ready once it listens and the engine has loaded."""
    while not (server.started and loop.ready.is_set()):
        if loop.stopped.is_set():
            return
        await asyncio.sleep(0.05)
    say(f"ready, listening at {url}")


async def _watch(loop: EngineLoop, server: Server) -> None:
    """End the server when the engine has failed, or when a drain is over (every request finished, or
    `shutdown_timeout` passed): the engine loop aborts what is left first, and those responses go out
    while uvicorn shuts down."""
    while not loop.stopped.is_set():
        since = server.draining_since
        if since is not None and (loop.idle() or time.monotonic() - since >= server.shutdown_timeout):
            break
        await asyncio.sleep(DRAIN_POLL_S)
    await asyncio.to_thread(loop.stop)
    server.should_exit = True
