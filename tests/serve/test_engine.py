"""The engine at world 1, in float64 against the reference model's uncached greedy generation: exact
tokens, whatever else is batched, however the prefill is chunked, through preemption; blocks freed; a
request whose serving fails ends alone."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lcc.serve import engine as engine_module
from lcc.serve.engine import Engine, EngineStats, RequestError
from lcc.serve.launch import Job, run_job
from lcc.serve.rank import ServeRank
from lcc.serve.sampling import SamplingParams
from tests.conftest import native_cpu_kernels
from tests.serve.plans import PROMPTS, serve_plan, spec_of
from tests.serve.reference import greedy, reference_model

N = 64


@pytest.fixture(scope="module")
def plans(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("serve-plans")


@pytest.fixture(scope="module")
def expected() -> dict[tuple[int, ...], list[int]]:
    model = reference_model(spec_of("world1"))
    return {tuple(p): greedy(model, p, N, key=("tiny-init",)) for p in PROMPTS}


def run(engine: Engine, prompts: list[list[int]], params: SamplingParams | list[SamplingParams]) -> list[list[int]]:
    many = params if isinstance(params, list) else [params] * len(prompts)
    ids = [engine.submit(p, s) for p, s in zip(prompts, many, strict=True)]
    out = {i: [] for i in ids}
    for u in engine.run():
        out[u.request] += u.token_ids
    return [out[i] for i in ids]


def engine_for(plans: Path, extra: tuple[str, ...] = (), **kw) -> Engine:
    return Engine(ServeRank(serve_plan(plans, "world1", extra), 0), **kw)


def test_greedy_equals_the_reference_model(plans, expected):
    engine = engine_for(plans)
    got = run(engine, PROMPTS, SamplingParams(max_tokens=N))
    for p, tokens in zip(PROMPTS, got, strict=True):
        assert tokens == expected[tuple(p)], bytes(p)
    assert engine.scheduler.used_blocks == 0  # every finished sequence freed its blocks
    assert engine.stats.decode_tokens == len(PROMPTS) * (N - 1)


def test_a_request_does_not_depend_on_its_batch(plans, expected):
    """Alone, or arriving while others are mid-decode (and so batched with decodes and prefill chunks)."""
    engine = engine_for(plans)
    alone = run(engine, [PROMPTS[1]], SamplingParams(max_tokens=N))[0]
    first = engine.submit(PROMPTS[0], SamplingParams(max_tokens=N))
    for _ in range(5):
        engine.step()
    late = engine.submit(PROMPTS[1], SamplingParams(max_tokens=N))
    other = engine.submit(PROMPTS[3], SamplingParams(max_tokens=N))
    out = {first: [], late: [], other: []}
    for u in engine.run():
        out[u.request] += u.token_ids
    assert alone == out[late] == expected[tuple(PROMPTS[1])]


def test_chunked_prefill_equals_unchunked(plans, expected):
    engine = engine_for(plans, max_batched_tokens=7)  # the 30-token prompt in 5 chunks, beside decodes
    got = run(engine, PROMPTS, SamplingParams(max_tokens=N))
    assert [g == expected[tuple(p)] for p, g in zip(PROMPTS, got, strict=True)] == [True] * len(PROMPTS)
    assert engine.stats.max_step_tokens == 7


def test_preempted_sequences_continue_identically(plans, expected):
    """A cache of 10 blocks of 16 tokens cannot hold four sequences of up to 94 tokens: the newest running
    one is preempted and recomputed later."""
    engine = engine_for(plans, ("serve.kv_blocks=10",))
    got = run(engine, PROMPTS, SamplingParams(max_tokens=N))
    assert engine.stats.preemptions > 0
    for p, tokens in zip(PROMPTS, got, strict=True):
        assert tokens == expected[tuple(p)], bytes(p)
    assert engine.scheduler.used_blocks == 0


def test_a_sequence_that_ends_frees_its_blocks(plans):
    engine = engine_for(plans)
    short = engine.submit(PROMPTS[1], SamplingParams(max_tokens=2))
    long = engine.submit(PROMPTS[0], SamplingParams(max_tokens=40))
    finished = []
    while engine.has_work:
        for u in engine.step():
            if u.finished:
                finished.append(u.request)
                if u.request == short:  # only the long one's blocks are held now
                    blocks = engine.scheduler.blocks[0]
                    assert set(blocks.tables) == {long}
                    assert blocks.used == blocks.blocks_for(len(PROMPTS[0]) + 2)
    assert finished == [short, long]
    assert engine.scheduler.used_blocks == 0


def test_abort_frees_blocks_at_once(plans):
    engine = engine_for(plans)
    rid = engine.submit(PROMPTS[3], SamplingParams(max_tokens=30))
    engine.step()
    assert engine.scheduler.used_blocks > 0
    assert engine.abort(rid).finished == "abort"
    assert engine.scheduler.used_blocks == 0 and not engine.has_work
    assert engine.abort(rid) is None


def test_sampling_is_seeded_per_request(plans):
    engine = engine_for(plans)
    hot = SamplingParams(max_tokens=20, temperature=1.0, top_p=0.9, seed=7)
    alone = run(engine, [PROMPTS[0]], hot)[0]
    batched = run(engine, [PROMPTS[2], PROMPTS[0]], [SamplingParams(max_tokens=20, temperature=0.7, seed=1), hot])[1]
    assert alone == batched
    other = run(engine, [PROMPTS[0]], SamplingParams(max_tokens=20, temperature=1.0, top_p=0.9, seed=8))[0]
    assert other != alone


def test_stop_strings_end_the_text_before_them(plans, expected):
    engine = engine_for(plans)
    full = bytes(expected[tuple(PROMPTS[2])]).decode("utf-8", errors="replace")
    stop = full[10:12]
    ids = engine.submit(PROMPTS[2], SamplingParams(max_tokens=N, stop=[stop]))
    text, reason = "", None
    for u in engine.run():
        text += u.text
        reason = u.finished or reason
    assert reason == "stop"
    assert text == full[:full.index(stop)]
    assert ids == 0


@pytest.mark.parametrize("prompt, params, message", [
    ([], SamplingParams(), "empty"),
    ([300], SamplingParams(), "outside the vocabulary"),
    ([1] * 256, SamplingParams(), "no room to generate"),
])
def test_requests_it_cannot_serve_are_refused(plans, prompt, params, message):
    engine = engine_for(plans)
    with pytest.raises(RequestError, match=message):
        engine.submit(prompt, params)
    assert not engine.has_work


def test_a_request_larger_than_the_cache_is_refused(plans):
    """Named for what makes it so: max_tokens where the prompt and a token fit, else the prompt."""
    engine = engine_for(plans, ("serve.kv_blocks=2",))
    with pytest.raises(RequestError, match="needs up to 3 KV cache blocks; the cache has 2") as refused:
        engine.submit(PROMPTS[3], SamplingParams(max_tokens=10))
    assert refused.value.field == "max_tokens"
    with pytest.raises(RequestError, match="needs up to 3 KV cache blocks; the cache has 2") as refused:
        engine.submit([1] * 32, SamplingParams(max_tokens=1))
    assert refused.value.field == "prompt"


def test_float32_and_bfloat16_serving_run_the_cpu_int4_kernels(plans):
    """Both CPU kernel sets serve in float32 and bfloat16; in float32 they generate the same tokens (lcc's
    native kernels where this machine runs them)."""
    tokens = {}
    kernels_here = [("torch", "int4_packed_cpu")]
    if native_cpu_kernels() is None:
        kernels_here.insert(0, ("native", "int4_native_cpu"))
    for kernels, name in kernels_here:
        for dtype in ("float32", "bfloat16"):
            rank = ServeRank(serve_plan(plans, "world1", (f"serve.dtype={dtype}", f"serve.cpu_kernels={kernels}")), 0)
            assert rank.plan.serving.expert_kernel == name
            got = run(Engine(rank), PROMPTS[:2], SamplingParams(max_tokens=8))
            assert all(len(g) == 8 for g in got)
            assert rank.cache.k[0].dtype == getattr(torch, dtype)
            tokens[kernels, dtype] = got
    if ("native", "float32") in tokens:
        assert tokens["native", "float32"] == tokens["torch", "float32"]


def test_unquantised_experts_when_the_spec_asks_for_none(plans):
    extra = ("quantization.experts=null",)
    rank = ServeRank(serve_plan(plans, "world1", extra), 0)
    assert rank.plan.serving.expert_kernel == "dense"
    model = reference_model(spec_of("world1", extra))
    got = run(Engine(rank), PROMPTS[:2], SamplingParams(max_tokens=16))
    assert got == [greedy(model, p, 16) for p in PROMPTS[:2]]


def test_abort_hands_out_the_text_a_stop_string_held_back(plans, expected):
    engine = engine_for(plans)
    rid = engine.submit(PROMPTS[2], SamplingParams(max_tokens=N, stop=["\x00\x01\x02\x03\x04"]))  # never appears
    text = ""
    for _ in range(10):
        text += "".join(u.text for u in engine.step())
    final = engine.abort(rid)
    full = bytes(expected[tuple(PROMPTS[2])][:10]).decode("utf-8", errors="replace")
    assert len(final.text) > 0 and text + final.text == full


def test_a_tiny_temperature_samples_the_greedy_token(plans, expected):
    engine = engine_for(plans)
    got = run(engine, [PROMPTS[0]], SamplingParams(max_tokens=8, temperature=1e-300, seed=3))[0]
    assert got == expected[tuple(PROMPTS[0])][:8]


@pytest.fixture(scope="module")
def shared(plans) -> Engine:
    """One engine for tests that leave it as they found it (every request finished)."""
    return engine_for(plans)


@pytest.mark.parametrize("seed", [-1, 2**64])
def test_a_seed_outside_what_a_generator_takes_is_refused(seed):
    with pytest.raises(ValueError, match=r"seed must be in \[0, 2\*\*64\)"):
        SamplingParams(temperature=1.0, seed=seed)


def test_the_largest_seed_is_served(shared):
    assert len(run(shared, [PROMPTS[0]], SamplingParams(max_tokens=2, temperature=1.0, seed=2**64 - 1))[0]) == 2


def test_a_request_whose_sampling_fails_ends_alone(shared, expected, monkeypatch):
    """The sampler raises for one of two batched requests: that one ends with the error, the other and the
    next request are served token for token as ever, and every block is free."""
    real = engine_module.sample

    def sample(logits, params, generator, allowed=None):
        if params.seed == 666:
            raise RuntimeError("the sampler broke")
        return real(logits, params, generator, allowed)

    monkeypatch.setattr(engine_module, "sample", sample)
    bad = shared.submit(PROMPTS[0], SamplingParams(max_tokens=8, temperature=0.5, seed=666))
    good = shared.submit(PROMPTS[1], SamplingParams(max_tokens=8))
    tokens, last = {bad: [], good: []}, {}
    for u in shared.run():
        tokens[u.request] += u.token_ids
        last[u.request] = u
    assert (last[bad].finished, last[bad].error, tokens[bad]) == ("error", "RuntimeError: the sampler broke", [])
    assert tokens[good] == expected[tuple(PROMPTS[1])][:8] and last[good].finished == "length"
    assert shared.scheduler.used_blocks == 0 and not shared.sequences and shared.stats.failed >= 1
    assert run(shared, [PROMPTS[2]], SamplingParams(max_tokens=8))[0] == expected[tuple(PROMPTS[2])][:8]


def test_a_step_that_fails_at_world_1_ends_its_requests_and_the_engine_goes_on(shared, expected, monkeypatch):
    rid = shared.submit(PROMPTS[0], SamplingParams(max_tokens=8))
    shared.step()  # its prefill

    def broken(plan):
        raise RuntimeError("the step broke")

    with monkeypatch.context() as patch:
        patch.setattr(shared.rank, "step", broken)
        updates = shared.step()
    assert [(u.request, u.finished, u.error) for u in updates] == [(rid, "error", "RuntimeError: the step broke")]
    assert shared.scheduler.used_blocks == 0 and not shared.has_work and not shared.interrupted
    assert run(shared, [PROMPTS[1]], SamplingParams(max_tokens=8))[0] == expected[tuple(PROMPTS[1])][:8]


def test_engine_statistics_are_running_totals(shared):
    """A server steps for weeks: its statistics are numbers, nothing that grows with the steps."""
    run(shared, PROMPTS[:2], SamplingParams(max_tokens=3))
    assert shared.stats.steps > 0 and shared.stats.max_step_tokens > 0
    assert all(type(getattr(shared.stats, f)) is int for f in EngineStats.__dataclass_fields__)


def test_lcc_run_generate_fails_naming_the_prompt_whose_serving_failed(shared, monkeypatch, capsys):
    """The other prompts are served (and printed); then the run fails with the first failure's prompt."""
    real, calls = engine_module.sample, []

    def sample(logits, params, generator, allowed=None):
        calls.append(1)
        if len(calls) == 2:  # the second prompt's first token
            raise RuntimeError("the sampler broke")
        return real(logits, params, generator, allowed)

    monkeypatch.setattr(engine_module, "sample", sample)
    with pytest.raises(RuntimeError, match="^prompt 2 failed: RuntimeError: the sampler broke$"):
        run_job(shared, Job([PROMPTS[0], PROMPTS[1], PROMPTS[2]], SamplingParams(max_tokens=2)))
    assert capsys.readouterr().out.count("\n") == 3 and shared.scheduler.used_blocks == 0


@pytest.mark.skipif(native_cpu_kernels() is None, reason="this CPU runs lcc's native kernels: nothing to refuse")
def test_a_plan_of_native_kernels_is_refused_where_the_cpu_cannot_run_them(tmp_path):
    """Built as a library (not through the launcher, which refuses it before any rank starts), a serving rank
    of a plan that runs lcc's native CPU kernels says why it cannot run here, rather than crash the process."""
    plan = serve_plan(tmp_path, "world1", ("serve.dtype=bfloat16",))
    with pytest.raises(RuntimeError, match="the plan runs lcc's native CPU kernels, and .*serve.cpu_kernels torch"):
        ServeRank(plan, 0)
