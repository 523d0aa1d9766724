"""What the routers chose, as a request sees it (`return_routed_experts`: per generated token, the experts
each MoE layer chose at the position that produced it) and as /metrics counts it
(`lcc_expert_tokens_total{layer, expert}`): both equal what the reference model's routers choose for the same
tokens (float64), read from the reference model by forward hooks on its routers."""

from __future__ import annotations

import asyncio
import json
import re

import httpx
import pytest
import torch

from lcc.serve.engine import Engine
from lcc.serve.loop import EngineLoop
from lcc.serve.rank import ServeRank
from lcc.serve.sampling import SamplingParams
from lcc.serve.served import ServedModel
from lcc.serve.server import Metrics, build_app
from tests.conftest import native_cpu_kernels
from tests.serve.plans import PROMPTS, serve_plan, spec_of
from tests.serve.reference import greedy, reference_model
from tests.serve.test_loop import MODEL

N = 6


def reference_routes(model: torch.nn.Module, sequence: list[int]) -> list[list[list[int]]]:
    """Per position of `sequence`, per MoE layer: the experts the reference model's router chose there."""
    chosen: dict[int, torch.Tensor] = {}
    hooks = [layer.ffn.router.register_forward_hook(
        lambda _m, _i, out, i=i: chosen.__setitem__(i, out.experts_TK.masked_fill(~out.mask_TK, -1)))
        for i, layer in enumerate(model.layers) if hasattr(layer.ffn, "router")]
    try:
        with torch.no_grad():
            model(torch.tensor([sequence]))
    finally:
        for h in hooks:
            h.remove()
    per_layer = [chosen[i].tolist() for i in sorted(chosen)]
    return [[[e for e in layer[p] if e >= 0] for layer in per_layer] for p in range(len(sequence))]


def expected(model: torch.nn.Module, prompt: list[int], generated: list[int]) -> list[list[list[int]]]:
    """Generated token j came from position len(prompt) - 1 + j (the last generated token is never run)."""
    routes = reference_routes(model, prompt + generated[:-1])
    return routes[len(prompt) - 1:]


def counts_of(model: torch.nn.Module, sequences: list[list[int]], n_experts: int) -> dict[int, list[int]]:
    """Tokens routed to each expert over every position the server ran."""
    total: dict[int, list[int]] = {}
    for seq in sequences:
        for per_layer in reference_routes(model, seq):
            for layer, experts in enumerate(per_layer):
                row = total.setdefault(layer, [0] * n_experts)
                for e in experts:
                    row[e] += 1
    return total


def run(engine: Engine, prompts: list[list[int]], params: list[SamplingParams]) -> list[tuple[list, list | None]]:
    ids = [engine.submit(p, q) for p, q in zip(prompts, params, strict=True)]
    tokens = {i: [] for i in ids}
    routed: dict[int, list | None] = {i: None for i in ids}
    for u in engine.run():
        tokens[u.request] += u.token_ids
        if u.routed_experts is not None:
            routed[u.request] = (routed[u.request] or []) + u.routed_experts
    return [(tokens[i], routed[i]) for i in ids]


def test_routed_experts_and_expert_counts_equal_the_reference_routers(tmp_path):
    spec = spec_of("world1")
    engine = Engine(ServeRank(serve_plan(tmp_path, "world1"), 0))
    asked = SamplingParams(max_tokens=N, return_routed_experts=True)
    got = run(engine, PROMPTS[:3], [asked, SamplingParams(max_tokens=N), asked])
    model = reference_model(spec)
    for prompt, (tokens, routed) in zip(PROMPTS[:3], got, strict=True):
        if routed is None:
            continue
        assert len(routed) == len(tokens) == N
        assert routed == expected(model, prompt, tokens)
    assert got[1][1] is None  # not asked for
    assert all(1 <= len(layer) <= spec.routing.k.max for _, r in (got[0], got[2]) for tok in r for layer in tok)
    ran = [p + tokens[:-1] for p, (tokens, _) in zip(PROMPTS[:3], got, strict=True)]
    counts = {layer: c.tolist() for layer, c in engine.expert_counts().items()}
    assert counts == counts_of(model, ran, spec.model.moe.n_experts)


@pytest.mark.skipif(native_cpu_kernels() is not None, reason="lcc's native CPU kernels cannot run here")
def test_the_native_decode_layer_returns_and_counts_what_the_op_by_op_layer_does(tmp_path):
    """bfloat16: decode steps through lcc::decode_layer (routed and expert_counts from the kernel) against the
    same steps through `forward`'s lines (ServeContext.observe): the same experts, the same counts."""
    plan = serve_plan(tmp_path, "world1", ("serve.dtype=bfloat16",))
    native, ops_only = Engine(ServeRank(plan, 0)), Engine(ServeRank(plan, 0))
    ops_only.rank.ctx.record = True  # routing statistics observed: every step op by op
    params = [SamplingParams(max_tokens=N, return_routed_experts=True)] * 2
    assert run(native, PROMPTS[:2], params) == run(ops_only, PROMPTS[:2], params)
    assert {k: v.tolist() for k, v in native.expert_counts().items()} == \
        {k: v.tolist() for k, v in ops_only.expert_counts().items()}


def test_over_http_routed_experts_streamed_and_whole_and_counted_in_metrics(tmp_path):
    # the same prompt twice, each routed in full (a cached prefix is not run again, nor counted)
    engine = Engine(ServeRank(serve_plan(tmp_path, "world1", ("serve.prefix_caching=false",)), 0))
    metrics = Metrics()
    loop = EngineLoop(lambda: engine, keep_alive_s=60, metrics=metrics)
    loop.begin()
    assert loop.ready.wait(30)
    app = build_app(loop, metrics, engine.serving, ServedModel(MODEL, engine.tokenizer), max_queued=8)
    body = {"model": MODEL, "prompt": bytes(PROMPTS[1]).decode(), "max_tokens": N, "temperature": 0,
            "return_routed_experts": True, "return_token_ids": True}

    async def scenario() -> tuple[dict, list[dict], str, httpx.Response]:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://lcc",
                                     timeout=60) as client:
            whole = (await client.post("/v1/completions", json=body)).json()
            chunks = []
            async with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
                async for line in r.aiter_lines():
                    if line.startswith("data: {"):
                        chunks.append(json.loads(line[6:]))
            bad = await client.post("/v1/completions", json={**body, "return_routed_experts": "yes"})
            return whole, chunks, (await client.get("/metrics")).text, bad

    try:
        whole, chunks, text, bad = asyncio.run(scenario())
    finally:
        loop.stop()
    model = reference_model(spec_of("world1"))
    tokens = greedy(model, PROMPTS[1], N)  # what the server generated (greedy serving equals it: test_layouts)
    routed = whole["choices"][0]["routed_experts"]
    assert routed == expected(model, PROMPTS[1], tokens)
    assert [r for c in chunks for r in c["choices"][0].get("routed_experts", [])] == routed
    assert whole["prompt_token_ids"] == chunks[0]["prompt_token_ids"] == PROMPTS[1]
    assert "prompt_token_ids" not in chunks[1] and whole["choices"][0]["token_ids"] == tokens
    assert [t for c in chunks for t in c["choices"][0].get("token_ids", [])] == tokens
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "return_routed_experts"
    got = {(int(layer), int(expert)): float(n)  # the exposition sorts the labels
           for expert, layer, n in re.findall(r'lcc_expert_tokens_total\{expert="(\d+)",layer="(\d+)"\} (\S+)', text)}
    want = counts_of(model, [PROMPTS[1] + tokens[:-1]] * 2, engine.rank.spec.model.moe.n_experts)
    assert got == {(layer, e): float(n) for layer, row in want.items() for e, n in enumerate(row)}
