"""lcc's native dense kernel for serving (csrc/dense_bf16.cpp, `torch.ops.lcc.bf16_linear`): both of its paths
against float64 matmuls on the shapes that break kernels (one row, rows and columns that do not fill a
block, widths that are not a multiple of 32), PyTorch's matmul past MAX_ROWS, which weights a serve plan
with `serving.dense_kernel: native_cpu` holds for it (checked against the generated programs' text), and a
bfloat16 serve step through it against the same step through PyTorch."""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F
from lcc.backends.cpu import dense, native
from lcc.backends.cpu.norm import NativeNorm

from lcc.serve.weights import LINEAR_ONLY, NORMS
from tests.conftest import ROOT

if native.unavailable() is not None:
    pytest.skip(f"lcc's native CPU kernels cannot run here: {native.unavailable()}", allow_module_level=True)

ops = native.load().ops
PATHS = [pytest.param(False, id="avx512f"),
         pytest.param(True, id="avx512bf16", marks=pytest.mark.skipif(
             not ops.has_avx512_bf16(), reason="this CPU has no AVX512-BF16 (its dot-product path cannot run)"))]


def rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.double() - want).abs().max() / want.abs().max())


@pytest.mark.parametrize("dot_products", PATHS)
@pytest.mark.parametrize("M,N,K", [(1, 512, 512), (3, 5, 40), (4, 260, 64), (5, 1, 16), (8, 33, 520)])
def test_against_float64(dot_products, M, N, K):
    g = torch.Generator().manual_seed(M * 1000 + N + K)
    x = torch.randn(M, K, generator=g).bfloat16()
    w = (torch.randn(N, K, generator=g) / K**0.5).bfloat16()
    y = ops.bf16_linear(x, w, dot_products)
    assert y.dtype == torch.bfloat16 and y.shape == (M, N)
    # products of bfloat16 values are exact in float32; the float32 sums, then one rounding to bfloat16
    assert rel(y, x.double() @ w.double().T) < 8e-3


def test_leading_dimensions_and_the_switch_to_pytorch():
    g = torch.Generator().manual_seed(9)
    w = dense.prepare(torch.randn(48, 64, generator=g))
    few = torch.randn(2, 3, 64, generator=g).bfloat16()  # 6 rows: the kernel
    assert torch.equal(dense.linear(few, w), ops.bf16_linear(few, w.weight))
    assert rel(dense.linear(few, w), few.double() @ w.weight.double().T) < 8e-3
    many = torch.randn(dense.MAX_ROWS + 1, 64, generator=g).bfloat16()  # PyTorch's matmul
    assert torch.equal(dense.linear(many, w), F.linear(many, w.weight))


def test_unquantised_experts_against_float64():
    """Segments of 0, 1, 3 and MAX_ROWS + 1 rows (the last: PyTorch's matmul) through the experts' SwiGLU,
    against float64 on the same bfloat16 inputs, with bfloat16's rounding of each projection allowed for."""
    g = torch.Generator().manual_seed(11)
    E, D, Fd, counts = 4, 64, 96, [0, 1, 3, dense.MAX_ROWS + 1]
    w1, w3 = ((torch.randn(E, Fd, D, generator=g) / D**0.5).bfloat16() for _ in range(2))
    w2 = (torch.randn(E, D, Fd, generator=g) / Fd**0.5).bfloat16()
    x = torch.randn(sum(counts), D, generator=g).bfloat16()
    got = dense.swiglu_segments(x, counts, *(dense.prepare_experts(w) for w in (w1, w3, w2)))
    want, start = [], 0
    for e, n in enumerate(counts):
        xe = x[start:start + n].double()
        start += n
        want.append((F.silu(xe @ w1[e].double().T) * (xe @ w3[e].double().T)) @ w2[e].double().T)
    assert got.dtype == torch.bfloat16 and rel(got, torch.cat(want)) < 2e-2
    with pytest.raises(ValueError, match="one count per expert"):
        dense.swiglu_segments(x, [1, 2], *(dense.prepare_experts(w) for w in (w1, w3, w2)))


def test_wrong_calls_are_refused():
    w = torch.randn(8, 32).bfloat16()
    with pytest.raises(RuntimeError, match="x has dtype float32: the kernel takes bfloat16"):
        ops.bf16_linear(torch.randn(1, 32), w)
    with pytest.raises(RuntimeError, match="x has 16 columns and the weight takes 32"):
        ops.bf16_linear(torch.randn(1, 16).bfloat16(), w)
    with pytest.raises(RuntimeError, match="weight has no input columns"):
        ops.bf16_linear(torch.randn(1, 0).bfloat16(), torch.randn(8, 0).bfloat16())
    with pytest.raises(RuntimeError, match="weight must be contiguous"):
        ops.bf16_linear(torch.randn(1, 8).bfloat16(), w.T)
    if not ops.has_avx512_bf16():
        with pytest.raises(RuntimeError, match="needs a CPU with AVX512-BF16"):
            ops.bf16_linear(torch.randn(1, 32).bfloat16(), w, True)


def test_the_weights_it_holds_are_those_only_multiplied_by_linear():
    """In every generated program, a weight LINEAR_ONLY names appears only as ops.linear's weight or
    ops.embedding_shard's table, and every weight that appears only there is named."""
    linear_only, elsewhere = set(), set()
    for program in (ROOT / "generated").glob("*/**/programs/*.py"):
        for line in program.read_text().splitlines():
            for name in re.findall(r'P\["([^"]+)"\]', line):
                as_weight = re.search(rf'ops\.(linear|embedding_shard)\([^,]+, P\["{re.escape(name)}"\][,)]', line)
                (linear_only if as_weight else elsewhere).add(name)
    linear_only -= elsewhere
    assert linear_only, "no program multiplies a weight with ops.linear"
    assert {n for n in linear_only | elsewhere if LINEAR_ONLY.search(n)} == linear_only


def test_the_norm_weights_it_holds_are_those_only_used_by_norms():
    """In every generated program, a weight NORMS names appears only as the weight of a norm op, and every
    weight a norm op takes is named."""
    norms, elsewhere = set(), set()
    for program in (ROOT / "generated").glob("*/**/programs/*.py"):
        for line in program.read_text().splitlines():
            for name in re.findall(r'P\["([^"]+)"\]', line):
                op = r"ops\.(rms_norm|head_norm|rms_norm_tp)\([^,]+, "
                as_weight = re.search(rf'{op}P\["{re.escape(name)}"\][,)]', line)
                (norms if as_weight else elsewhere).add(name)
    assert norms and not norms & elsewhere
    assert {n for n in norms | elsewhere if NORMS.search(n)} == norms


@pytest.mark.parametrize("tied,experts", [(False, "int4"), (True, "bf16")])
def test_a_bfloat16_step_through_the_kernel(tmp_path, tied, experts):
    """tiny-moe served in bfloat16 (its own head and int4 experts; the embedding as the head and unquantised
    experts): the plan records the kernel, the rank holds its weights for it, and a prefill step (PyTorch's
    matmul: more than MAX_ROWS rows) and a decode step (the kernel) give the logits of PyTorch's kernels
    within bfloat16 rounding."""
    from lcc.serve.rank import SeqPart, ServeRank, StepPlan
    from tests.serve.plans import PROMPTS, serve_plan

    bf16 = ("serve.dtype=bfloat16", "model.n_layers=2", f"model.tie_embeddings={str(tied).lower()}",
            *(("quantization.experts=null",) if experts == "bf16" else ()))
    mine = ServeRank(serve_plan(tmp_path, "world1", bf16), 0)
    theirs = ServeRank(serve_plan(tmp_path, "world1", (*bf16, "serve.cpu_kernels=torch")), 0)
    assert (mine.plan.serving.dense_kernel, theirs.plan.serving.dense_kernel) == ("native_cpu", "torch")
    assert (mine.plan.serving.norm_kernel, theirs.plan.serving.norm_kernel) == ("native_cpu", "torch")
    assert isinstance(mine.params["layers.0.attn_norm.weight"], NativeNorm)
    assert isinstance(mine.params["norm.weight"], NativeNorm)
    assert isinstance(mine.params["layers.0.attn.wq.weight"], dense.NativeDense)
    assert isinstance(mine.params["embed.weight"], dense.NativeDense)  # looked up, and the tied head
    if experts == "bf16":  # unquantised experts through the kernel too
        assert isinstance(mine.params["layers.0.ffn.experts.w1_EFD"], dense.NativeDenseExperts)
    prompt = PROMPTS[1] + PROMPTS[3]  # 60 tokens: more than MAX_ROWS
    assert len(prompt) > dense.MAX_ROWS
    blocks = list(range(len(prompt) // mine.plan.serving.block_size + 1))
    prefill = StepPlan([[SeqPart(0, 0, prompt, blocks, True)]])
    assert rel(mine.step(prefill), theirs.step(prefill).double()) < 3e-2
    decode = StepPlan([[SeqPart(0, len(prompt), [7], blocks, True)]])  # one row: the kernel's case
    assert rel(mine.step(decode), theirs.step(decode).double()) < 3e-2
