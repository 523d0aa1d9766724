"""A decode-only step's MoE layers in one native call each (`serving.decode_kernel: native_cpu`, the
programs' `decode_forward`, `lcc::decode_layer`): where the plan turns it on, and that it computes what
`forward`'s lines compute, bit for bit (the same kernels in the same order), cache writes included."""

from __future__ import annotations

import pytest
import torch
from lcc.backends.cpu import native

from lcc import ops
from lcc.plan import read_plan
from lcc.plan.program_check import ProgramMismatch, check_programs
from tests.serve.plans import PROMPTS, serve_plan

if native.unavailable() is not None:
    pytest.skip(f"lcc's native CPU kernels cannot run here: {native.unavailable()}", allow_module_level=True)

BF16 = ("serve.dtype=bfloat16",)


def program_files(plan_dir):
    return {str(p.relative_to(plan_dir)): p.read_text() for p in plan_dir.rglob("*.py")}


@pytest.mark.parametrize("layout,extra,want", [
    ("world1", BF16, "native_cpu"),
    ("pp2", BF16, "native_cpu"),  # the layers of each stage; the stages' exchange is an action
    ("world1", (*BF16, "model.attention.qk_norm=head"), "native_cpu"),
    ("world1", (), "ops"),  # float64: the reference ops
    ("world1", ("serve.dtype=float32",), "ops"),
    ("world1", (*BF16, "quantization.experts=null"), "native_cpu"),  # through the dense kernel
    ("world1", (*BF16, "model.moe.n_shared_experts=1"), "ops"),
    ("world1", (*BF16, "serve.cpu_kernels=torch"), "ops"),
    ("ep2_dp2", BF16, "ops"),  # the experts' exchange sits inside the layer
    ("tp2", BF16, "ops"),
])
def test_where_the_plan_runs_decode_layers_natively(tmp_path, layout, extra, want):
    plan_dir = serve_plan(tmp_path, layout, extra)
    plan = read_plan(plan_dir)
    assert plan.serving.decode_kernel == want
    files = program_files(plan_dir)
    for role in plan.roles:
        source = files[role.program]
        assert ("def decode_forward(" in source) == (want == "native_cpu")
        if want == "native_cpu":
            layers = range(*role.layers)
            assert all("ops.decode_layer(" in source and f"layer={i}," in source for i in layers)


def test_the_program_check_holds_decode_forward_to_the_plan(tmp_path):
    dp2 = (*BF16, "parallelism.dp=2", "cluster.gpus_per_node=2")  # an axis a collective would cross
    plan_dir = serve_plan(tmp_path, "world1", dp2)
    plan, files = read_plan(plan_dir), program_files(plan_dir)
    assert plan.serving.decode_kernel == "native_cpu"
    check_programs(plan, files)
    (path,) = files
    tampered = files[path].replace("    head = lm_head(P, B, add_7, G, ctx)\n    return head\n\n\ndef embedding",
                                   "    add_7 = ops.all_reduce(add_7, G.dp)\n    head = lm_head(P, B, add_7, G, ctx)\n"
                                   "    return head\n\n\ndef embedding")
    assert tampered != files[path]
    with pytest.raises(ProgramMismatch, match="decode_forward issues"):
        check_programs(plan, {path: tampered})
    other = read_plan(serve_plan(tmp_path, "world1", (*dp2, "serve.cpu_kernels=torch")))
    with pytest.raises(ProgramMismatch, match="a decode_forward, but the plan's serving.decode_kernel is ops"):
        check_programs(other, files)


def counted(monkeypatch) -> list[int]:
    calls, real = [], ops.decode_layer
    monkeypatch.setattr(ops, "decode_layer", lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


@pytest.mark.parametrize("extra", [BF16, (*BF16, "model.attention.qk_norm=head"),
                                   (*BF16, "quantization.experts={bits: 4, group_size: 32, symmetric: false}"),
                                   (*BF16, "quantization.experts=null")],
                         ids=["int4", "qk_norm_head", "asymmetric", "bf16_experts"])
@pytest.mark.parametrize("max_rows", [32, 0], ids=["kernel_rows", "past_the_kernel_rows"])
def test_decode_steps_equal_forwards_bit_for_bit(tmp_path, monkeypatch, extra, max_rows):
    """3 sequences decoding: within the dense kernel's rows, and past them (0: every projection and every
    unquantised expert's segment through PyTorch's matmul, as forward's ops then run them)."""
    from lcc.backends.cpu import dense

    from lcc.serve.rank import SeqPart, ServeRank, StepPlan

    monkeypatch.setattr(dense, "MAX_ROWS", max_rows)

    plan_dir = serve_plan(tmp_path, "world1", extra)
    fused, lines = ServeRank(plan_dir, 0), ServeRank(plan_dir, 0)
    lines.ctx.record = True  # routing statistics observed: the op-by-op forward
    prompts = [PROMPTS[1], PROMPTS[0], PROMPTS[3]]
    tables = [list(range(i * 8, i * 8 + 8)) for i in range(len(prompts))]
    calls = counted(monkeypatch)
    prefill = StepPlan([[SeqPart(i, 0, p, tables[i], True) for i, p in enumerate(prompts)]])
    a, b = fused.step(prefill), lines.step(prefill)
    assert calls == [] and torch.equal(a, b)  # a step with prefill chunks runs forward
    for step in range(4):
        tokens = [int(t) for t in a.argmax(-1)]
        decode = StepPlan([[SeqPart(i, len(p) + step, [tokens[i]], tables[i], True) for i, p in enumerate(prompts)]])
        a, b = fused.step(decode), lines.step(decode)
        assert len(calls) == 4 * (step + 1)  # tiny-moe's 4 MoE layers, once each, on the fused rank only
        assert torch.equal(a, b), f"decode step {step}"
        for layer in fused.cache.k:
            assert torch.equal(fused.cache.k[layer], lines.cache.k[layer])
            assert torch.equal(fused.cache.v[layer], lines.cache.v[layer])


def test_a_decode_layer_refuses_a_step_with_prefill(tmp_path):
    from lcc.ops.serve import StepBatch
    from lcc.serve.rank import ServeRank

    rank = ServeRank(serve_plan(tmp_path, "world1", BF16), 0)
    rank.ctx.batch = StepBatch.build(rank.cache, [(0, len(PROMPTS[0]), [0], True), (0, 1, [1], True)], "native_cpu")
    x = torch.tensor([PROMPTS[0] + [7]])
    with pytest.raises(ValueError, match="decode tokens only"):
        rank.programs[0].decode_forward(rank.params, rank.buffers, x, rank.mesh.groups, rank.ctx)


def test_the_kernel_checks_the_step_it_is_given(tmp_path):
    """The operator's own checks: a context length missing for a row is an error before any kernel runs."""
    from lcc.ops.serve import StepBatch
    from lcc.serve.rank import ServeRank

    rank = ServeRank(serve_plan(tmp_path, "world1", BF16), 0)
    batch = StepBatch.build(rank.cache, [(3, 1, [0], True), (5, 1, [1], True)], "native_cpu")
    batch.decodes.lengths = batch.decodes.lengths[:1]
    rank.ctx.batch = batch
    before = rank.cache.k[0].clone()
    with pytest.raises(RuntimeError, match="a decode layer attends one token per sequence: 2 rows"):
        rank.programs[0].decode_forward(rank.params, rank.buffers, torch.tensor([[7, 9]]), rank.mesh.groups, rank.ctx)
    assert torch.equal(rank.cache.k[0], before)
