"""Prefix caching (serve.prefix_caching): full KV blocks of a shared prefix are reused by later requests,
held by reference counts and evicted least recently used; float64 greedy generation with a cached prefix
equals generation without; /metrics counts the hit and queried prompt tokens."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from lcc.serve.blocks import BlockManager
from lcc.serve.engine import Engine
from lcc.serve.loop import EngineLoop
from lcc.serve.rank import ServeRank
from lcc.serve.sampling import SamplingParams
from lcc.serve.served import ServedModel
from lcc.serve.server import Metrics, build_app
from tests.serve.plans import serve_plan
from tests.serve.test_loop import MODEL

PREFIX = list(b"The teacher said to the class that the lesson of the day is about " * 2)  # 136 tokens
PROMPTS = [PREFIX + list(f"question {i}?".encode()) for i in range(4)]


def test_blocks_of_a_shared_prefix_are_reused_counted_and_evicted_last_used_first():
    bm = BlockManager(n_blocks=6, block_size=4, prefix_caching=True)
    a = list(range(10))  # 2 full blocks and 2 tokens
    assert bm.match(1, a) == 0
    bm.grow(1, 10)
    bm.commit(1, a, 10)
    assert bm.match(2, a[:8] + [99, 98]) == 8 and bm.tables[2] == bm.tables[1][:2]  # both full blocks
    bm.counted(8, 10)
    assert bm.refs[bm.tables[1][0]] == 2
    assert bm.match(3, a[:8]) == 4  # its last token is always computed: one block only
    bm.release(1)
    bm.release(2)
    bm.release(3)
    assert bm.used == 0 and len(bm.idle) == 2  # the two cached blocks keep their content
    assert bm.match(4, a) == 8  # ... and are found again
    bm.release(4)
    bm.grow(5, 24)  # all 6 blocks: the cached ones are evicted, least recently used first
    assert not bm.entries and not bm.idle and bm.match(6, a) == 0
    assert (bm.hit_tokens, bm.query_tokens) == (8, 10)  # what admitted sequences were counted with


def test_without_prefix_caching_nothing_is_kept():
    bm = BlockManager(n_blocks=4, block_size=4)
    bm.grow(1, 8)
    bm.commit(1, list(range(8)), 8)
    bm.release(1)
    assert bm.match(2, list(range(9))) == 0 and len(bm.free) == 4


def generate(engine: Engine, prompts: list[list[int]], n: int) -> list[list[int]]:
    ids = [engine.submit(p, SamplingParams(max_tokens=n)) for p in prompts]
    out: dict[int, list[int]] = {i: [] for i in ids}
    while engine.has_work:
        for u in engine.step():
            out[u.request] += u.token_ids
    return [out[i] for i in ids]


@pytest.fixture(scope="module")
def plans(tmp_path_factory):
    return tmp_path_factory.mktemp("prefix-plans")


def test_float64_generation_with_a_cached_prefix_equals_generation_without(plans):
    got = {}
    for caching in (False, True):
        engine = Engine(ServeRank(serve_plan(plans, "world1", (f"serve.prefix_caching={str(caching).lower()}",)), 0))
        got[caching] = generate(engine, PROMPTS[:1], 16) + generate(engine, PROMPTS[1:], 16)
        blocks = engine.scheduler.blocks[0]
        if caching:  # three later prompts found the 8 full blocks of the prefix
            assert blocks.hit_tokens == 3 * 8 * 16
        engine.close()
    assert got[True] == got[False]


def test_metrics_count_hit_and_queried_tokens(plans):
    engine = Engine(ServeRank(serve_plan(plans, "world1"), 0))
    metrics = Metrics()
    loop = EngineLoop(lambda: engine, keep_alive_s=60, metrics=metrics)
    loop.begin()
    assert loop.ready.wait(30)
    app = build_app(loop, metrics, engine.serving, ServedModel(MODEL, engine.tokenizer), max_queued=8)

    async def scenario() -> str:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://lcc",
                                     timeout=60) as client:
            for p in PROMPTS[:2]:
                r = await client.post("/v1/completions", json={"model": MODEL, "prompt": p, "max_tokens": 2,
                                                               "temperature": 0})
                assert r.status_code == 200
            return (await client.get("/metrics")).text

    try:
        text = asyncio.run(scenario())
    finally:
        loop.stop()
    values = {line.split()[0]: float(line.split()[1]) for line in text.splitlines() if line.startswith("lcc_prefix")}
    assert values["lcc_prefix_cache_hit_tokens_total"] == 8 * 16
    assert values["lcc_prefix_cache_query_tokens_total"] == sum(len(p) for p in PROMPTS[:2])
