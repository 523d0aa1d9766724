"""The engine loop and the HTTP app of `lcc run serve` in this process, over one world-1 engine (float64): a
request whose serving fails ends alone (500, or an error event mid-stream) and the next is served, a
prompt is tokenized off the event loop, and stopping closes the engine even when nobody listens for the
aborts any more."""

from __future__ import annotations

import asyncio
import json
import queue
import threading
import time

import httpx
import pytest

from lcc.serve import engine as engine_module
from lcc.serve.engine import Engine, Update
from lcc.serve.loop import EngineLoop
from lcc.serve.rank import ServeRank
from lcc.serve.sampling import SamplingParams
from lcc.serve.served import ServedModel
from lcc.serve.server import Metrics, build_app
from tests.serve.plans import PROMPTS, serve_plan

MODEL = "tiny-moe"
BROKEN_SEED = 666  # the sampler raises for requests with this seed (monkeypatched)


@pytest.fixture(scope="module")
def engine(tmp_path_factory) -> Engine:
    return Engine(ServeRank(serve_plan(tmp_path_factory.mktemp("serve-plans"), "world1"), 0))


@pytest.fixture
def broken_sampler(monkeypatch):
    real = engine_module.sample

    def sample(logits, params, generator, allowed=None):
        if params.seed == BROKEN_SEED:
            raise RuntimeError("the sampler broke")
        return real(logits, params, generator, allowed)

    monkeypatch.setattr(engine_module, "sample", sample)


def started(engine: Engine) -> EngineLoop:
    loop = EngineLoop(lambda: engine, keep_alive_s=60, metrics=Metrics())
    loop.begin()
    assert loop.ready.wait(30)
    return loop


def served(loop: EngineLoop, prompt: list[int], params: SamplingParams) -> list[Update]:
    """Every update of one request, up to its last."""
    got: queue.Queue[Update] = queue.Queue()
    loop.submit(prompt, params, got.put)
    updates = [got.get(timeout=60)]
    while updates[-1].finished is None:
        updates.append(got.get(timeout=60))
    return updates


def test_a_request_that_cannot_be_submitted_fails_alone(engine, monkeypatch):
    real = engine.submit

    def submit(prompt: list[int], params: SamplingParams) -> int:
        if params.seed == BROKEN_SEED:
            raise RuntimeError("no room for it")
        return real(prompt, params)

    monkeypatch.setattr(engine, "submit", submit)
    loop = started(engine)
    try:
        bad = served(loop, PROMPTS[0], SamplingParams(max_tokens=4, temperature=0.5, seed=BROKEN_SEED))
        good = served(loop, PROMPTS[1], SamplingParams(max_tokens=4))
    finally:
        loop.stop()
    assert bad[-1].finished == "error" and bad[-1].error == "RuntimeError: no room for it"
    assert good[-1].finished == "length" and sum(len(u.token_ids) for u in good) == 4
    assert loop.failure is None and engine.scheduler.used_blocks == 0


def test_stopping_closes_the_engine_when_nobody_listens_for_the_aborts(engine):
    """At shutdown a server's event loop may have closed before the engine aborts what is left: delivering
    to it raises, and the engine is closed all the same (the other ranks are released) without a failure."""
    closed = asyncio.new_event_loop()
    closed.close()
    loop = started(engine)
    loop.submit(PROMPTS[0], SamplingParams(max_tokens=200), lambda u: closed.call_soon_threadsafe(print, u))
    deadline = time.monotonic() + 30
    while engine.scheduler.used_blocks == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert engine.scheduler.used_blocks > 0  # the request runs
    engine.closed = False  # (the fixture's engine: an earlier loop may have closed it)
    loop.stop()
    assert not loop.thread.is_alive() and loop.failure is None
    assert engine.closed and engine.scheduler.used_blocks == 0 and not engine.has_work


class SlowTokenizer:
    """The engine's tokenizer, whose encode waits until the test lets it go (at most `wait_s`)."""

    def __init__(self, inner, wait_s: float):
        self.inner, self.wait_s = inner, wait_s
        self.vocab_size = inner.vocab_size
        self.entered, self.release = threading.Event(), threading.Event()
        self.released_in_time: bool | None = None

    def encode(self, text: str) -> list[int]:
        self.entered.set()
        self.released_in_time = self.release.wait(self.wait_s)
        return self.inner.encode(text)


def app_for(engine: Engine, loop: EngineLoop, tokenizer=None) -> httpx.AsyncClient:
    app = build_app(loop, Metrics(), engine.serving, ServedModel(MODEL, tokenizer or engine.tokenizer), max_queued=8)
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://lcc", timeout=60)


def test_a_prompt_is_tokenized_off_the_event_loop(engine):
    """While one request's prompt is being tokenized, the server answers others."""
    slow = SlowTokenizer(engine.tokenizer, wait_s=5)
    loop = started(engine)

    async def scenario() -> tuple[int, int]:
        async with app_for(engine, loop, slow) as client:
            completion = asyncio.create_task(client.post("/v1/completions", json={
                "model": MODEL, "prompt": "The teacher", "max_tokens": 2, "temperature": 0}))
            assert await asyncio.to_thread(slow.entered.wait, 10)
            health = await client.get("/health")  # answered while the tokenizer still holds the prompt
            slow.release.set()
            return health.status_code, (await completion).status_code

    try:
        assert asyncio.run(scenario()) == (200, 200)
    finally:
        loop.stop()
    assert slow.released_in_time


def test_a_request_whose_serving_fails_gets_a_500_and_the_next_is_served(engine, broken_sampler):
    loop = started(engine)

    async def scenario() -> list[httpx.Response]:
        async with app_for(engine, loop) as client:
            body = {"model": MODEL, "prompt": "The teacher", "max_tokens": 3, "temperature": 0.5}
            return [await client.post("/v1/completions", json={**body, "seed": BROKEN_SEED}),
                    await client.post("/v1/completions", json={**body, "seed": BROKEN_SEED, "stream": True}),
                    await client.post("/v1/chat/completions", json={
                        "model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3,
                        "temperature": 0.5, "seed": 1})]

    try:
        whole, streamed, after = asyncio.run(scenario())
    finally:
        loop.stop()
    assert whole.status_code == 500
    assert whole.json()["error"] == {"message": "RuntimeError: the sampler broke", "type": "server_error",
                                     "param": None, "code": None}
    events = [line.removeprefix("data: ") for line in streamed.text.split("\n\n") if line]
    assert streamed.status_code == 200 and events[-1] == "[DONE]"
    assert json.loads(events[-2])["error"]["message"] == "RuntimeError: the sampler broke"
    assert after.status_code == 200 and after.json()["usage"]["completion_tokens"] == 3
    assert loop.failure is None and engine.scheduler.used_blocks == 0 and not engine.has_work



def test_a_body_over_the_limit_without_a_length_is_refused_while_it_is_read(engine):
    """A chunked body declares no length: it is read up to the limit (1 MiB here), then refused with 413."""
    loop = EngineLoop(lambda: engine, keep_alive_s=60)  # never started: nothing reaches it
    sent = []

    async def body():
        for _ in range(10 * 16):  # 10 MiB in 64 KiB chunks, if it were all read
            sent.append(1)
            yield b"x" * 2**16

    async def scenario() -> httpx.Response:
        async with app_for(engine, loop) as client:
            return await client.post("/v1/completions", content=body(), headers={"content-type": "application/json"})

    r = asyncio.run(scenario())
    assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"
    assert len(sent) <= 17  # stopped just past 1 MiB
