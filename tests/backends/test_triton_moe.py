"""The Triton MoE kernels on CPU through Triton's interpreter, against a float64 oracle: alignment, the
gate/up GEMM with its SwiGLU epilogue, the down GEMM with the routing weight, in bf16 / float32 with dense
and int4 weights, on the shapes that break kernels (experts without rows, one row, rows that do not fill a
block, mixed k, other ranks' experts, outputs pre-filled with NaN so that an unwritten row fails)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import zlib

import pytest
import torch

if importlib.util.find_spec("triton") is None:
    pytest.skip("Triton is not installed (pip install -e '.[dev]')", allow_module_level=True)

from lcc.backends.torch_ref.int4 import quantize  # noqa: E402
from lcc.backends.triton import TritonMissing, experts, support  # noqa: E402
from lcc.backends.triton.align import align, align_segments, max_blocks  # noqa: E402
from lcc.backends.triton.configs import tiles_for  # noqa: E402
from lcc.backends.triton.experts import ExpertStack, fused_moe, swiglu_segments  # noqa: E402

from tests.backends import oracle  # noqa: E402

TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}  # relative error norms against float64
KERNELS = "lcc.backends.triton.kernels"  # imported by the kernels' first call (lcc.backends.triton.experts)


@pytest.fixture(scope="module", autouse=True)
def _interpreter():
    """Triton's interpreter for this module's tests only, the kernels running on CPU tensors. `triton.jit`
    reads TRITON_INTERPRET when it decorates a kernel, that is when the kernels' module is first imported: the
    module is imported afresh under it and dropped afterwards, and the variable is restored, so that tests
    elsewhere (and the processes they start) see the environment they were given."""
    saved = {name: sys.modules.pop(name) for name in list(sys.modules) if _imported_fresh(name)}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRITON_INTERPRET", "1")
        yield
    for name in [name for name in sys.modules if _imported_fresh(name)]:
        del sys.modules[name]
    sys.modules.update(saved)


def _imported_fresh(module: str) -> bool:
    """The modules imported afresh under the interpreter: the kernels, and Triton's language, which takes
    the interpreter's form when it is first imported (torch._dynamo imports Triton, so another test may have
    imported it before this module's tests run)."""
    return module == KERNELS or (module.split(".")[0] == "triton" and not module.startswith("triton._C"))


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    assert torch.isfinite(a).all(), "an output row was not written (NaN) or overflowed"
    return float((a.to(torch.float64) - b).norm() / b.norm())


def weights(E: int, D: int, F: int, fmt: str, dtype: torch.dtype, gen: torch.Generator):
    """(kernel stacks, float64 oracle weights) for w1, w3 `[E, F, D]` and w2 `[E, D, F]`."""
    raw = [torch.randn(E, F, D, generator=gen) / D**0.5, torch.randn(E, F, D, generator=gen) / D**0.5,
           torch.randn(E, D, F, generator=gen) / F**0.5]
    if fmt == "dense":
        ws = [w.to(dtype) for w in raw]
        return [ExpertStack(w) for w in ws], [w.to(torch.float64) for w in ws]
    _, group, symmetric = fmt.split("-")
    qs = [quantize(w, int(group), symmetric == "sym") for w in raw]
    return ([ExpertStack(q) for q in qs],
            [oracle.decode_int4(q.packed, q.scales, q.zeros, q.group_size) for q in qs])


def routing(T: int, K: int, n_global: int, first: int, E: int, gen: torch.Generator):
    """Routed slots with k from 1 to 4 per token, other ranks' experts among them, local expert `first`
    given no rows and local expert `first + 1` exactly one."""
    experts_TK = torch.randint(0, n_global, (T, K), generator=gen)
    experts_TK[experts_TK == first] = first + 2
    experts_TK[experts_TK == first + 1] = first + 3
    experts_TK[0, 0] = first + 1
    k_T = 1 + torch.arange(T) % K  # 1, 2, ..., K, 1, ...
    mask_TK = torch.arange(K).unsqueeze(0) < k_T.unsqueeze(1)
    mask_TK[0, 0] = True
    gates_TK = torch.rand(T, K, generator=gen)
    return experts_TK, gates_TK, mask_TK


CASES = [(torch.float32, "dense"), (torch.float32, "int4-32-sym"), (torch.float32, "int4-64-asym"),
         (torch.float32, "int4-128-sym"), (torch.bfloat16, "dense"), (torch.bfloat16, "int4-128-sym"),
         (torch.bfloat16, "int4-32-asym")]


@pytest.mark.parametrize("dtype,fmt", CASES, ids=[f"{str(d).split('.')[1]}-{f}" for d, f in CASES])
def test_fused_moe_against_float64(dtype, fmt):
    gen = torch.Generator().manual_seed(zlib.crc32(fmt.encode()))  # the same data in every run
    E, D, F, T, K, first = 5, 128, 128, 13, 4, 2
    stacks, ref_w = weights(E, D, F, fmt, dtype, gen)
    x = torch.randn(T, D, generator=gen).to(dtype)
    experts_TK, gates_TK, mask_TK = routing(T, K, 9, first, E, gen)
    slots = torch.full((T * K, D), float("nan"))
    y = fused_moe(x, experts_TK, gates_TK, mask_TK, *stacks, first_expert=first, slots=slots)
    assert y.dtype == dtype and y.shape == (T, D)
    assert rel(y, oracle.moe(x, experts_TK, gates_TK, mask_TK, *ref_w, first)) < TOL[dtype]


@pytest.mark.parametrize("dtype,fmt", [(torch.float32, "dense"), (torch.bfloat16, "int4-64-sym")])
def test_segments_as_programs_hold_them(dtype, fmt):
    """Rows grouped by local expert after the exchange (the programs' `ops.grouped_swiglu*`), counts on
    the device: an expert with none, one with one, one with more than a block."""
    gen = torch.Generator().manual_seed(3)
    E, D, F = 4, 64, 128
    counts = [0, 1, 21, 5]
    stacks, ref_w = weights(E, D, F, fmt, dtype, gen)
    x = torch.randn(sum(counts), D, generator=gen).to(dtype)
    out = torch.full((sum(counts), D), float("nan"), dtype=dtype)
    y = swiglu_segments(x, torch.tensor(counts), *stacks, out=out)
    assert y.data_ptr() == out.data_ptr()
    assert rel(y, oracle.segments(x, counts, *ref_w)) < TOL[dtype]


TRACE_SCRIPT = """
import logging, sys, torch
from torch._functorch.aot_autograd import aot_module_simplified
from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table
from lcc.backends.torch_ref.int4 import quantize
from lcc.backends.triton import experts
from lcc.backends.triton.experts import ExpertStack, swiglu_segments

experts.require = lambda: None  # traced, never run: no GPU needed
logging.disable(logging.WARNING)  # no GPU driver: Triton's mutation analysis says so, and assumes all written
gen = torch.Generator().manual_seed(8)
stacks = [ExpertStack(quantize(torch.randn(3, 64, 64, generator=gen), 32, False)) for _ in range(3)]
counts = torch.tensor([2, 0, 5])
graphs = []

def capture(gm, inputs):
    def forward(graph, _):
        graphs.append(graph)
        return lambda *args: (None,)
    aot_module_simplified(gm, inputs, fw_compiler=forward)
    return lambda *args: (None,)

def block(x):
    return x + swiglu_segments(torch.nn.functional.rms_norm(x, (64,)), counts, *stacks)

torch.compile(block, fullgraph=True, backend=capture)(torch.randn(7, 64))
for node in graphs[0].graph.nodes:
    if node.target is torch.ops.higher_order.triton_kernel_wrapper_functional:
        print(kernel_side_table.get_kernel(node.kwargs["kernel_idx"]).fn.__name__)
"""


def test_torch_compile_traces_into_the_kernels():
    """The kernels are PyTorch operators (torch.library.triton_op): torch.compile traces a layer's experts
    with the code around them into one graph (fullgraph: a graph break would be an error) that holds the
    Triton kernels themselves, in order, not an opaque call. Traced in a process of its own with fake
    tensors, without the interpreter (which hides the kernels from tracing) and without running them."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", TRACE_SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == ["align_segments_kernel", "gate_up_swiglu_kernel", "down_kernel"]
    assert "Tensor(a12!) out" in str(torch.ops.lcc.triton_down.default._schema)  # what it writes is declared


def test_each_kernel_alone():
    """gate_up's rows (padding rows 0) and down's rows, each against the oracle from exact inputs."""
    gen = torch.Generator().manual_seed(4)
    E, D, F, block = 3, 64, 64, 16
    stacks, (w1, w3, w2) = weights(E, D, F, "int4-32-sym", torch.float32, gen)
    expert_R = torch.tensor([2, 0, 2, 7, 2, -1] + [0] * 17)  # 7 and -1: not this rank's
    x = torch.randn(expert_R.numel(), D, generator=gen)
    al = align(expert_R, E, block)
    h = torch.full((al.rows.numel(), F), float("nan"))
    experts.gate_up(x, al, 1, stacks[0], stacks[1], h)
    x64 = x.to(torch.float64)
    for b, e in enumerate(al.block_expert.tolist()):
        for p in range(b * block, (b + 1) * block):
            r = int(al.rows[p])
            if e < 0:
                assert torch.isnan(h[p]).all(), "a skipped block was written"
            elif r == expert_R.numel():
                assert (h[p] == 0).all(), "a padding row is not zero"
            else:
                want = oracle.silu(w1[e] @ x64[r]) * (w3[e] @ x64[r])
                assert rel(h[p], want) < 1e-5
    hh = torch.randn(al.rows.numel(), F, generator=gen)
    weight_R = torch.rand(expert_R.numel(), generator=gen)
    out = torch.full((expert_R.numel(), D), float("nan"))
    experts.down(hh, al, weight_R, stacks[2], out)
    positions = {int(r): p for p, r in enumerate(al.rows.tolist()) if r < expert_R.numel()}
    for r, e in enumerate(expert_R.tolist()):
        if not 0 <= e < E:
            assert torch.isnan(out[r]).all(), "another rank's row was written"
            continue
        want = float(weight_R[r]) * (w2[e] @ hh[positions[r]].to(torch.float64))
        assert rel(out[r], want) < 1e-5


def test_prefill_tiles():
    """Many rows per expert: the tall-block configuration, rows not a multiple of the block."""
    gen = torch.Generator().manual_seed(5)
    E, D, F = 2, 64, 64
    counts = [70, 150]
    assert tiles_for(sum(counts), E, D, 64).block_m == 64
    stacks, ref_w = weights(E, D, F, "int4-64-sym", torch.float32, gen)
    x = torch.randn(sum(counts), D, generator=gen)
    out = torch.full((sum(counts), D), float("nan"))
    y = swiglu_segments(x, torch.tensor(counts), *stacks, out=out)
    assert rel(y, oracle.segments(x, counts, *ref_w)) < 1e-5


def assert_aligned(al, expert_R: torch.Tensor, E: int, block: int) -> None:
    """Every local row exactly once, expert-major and in order within an expert, each block one expert's
    rows (the rest padding), blocks without rows marked -1, as many blocks as the bound."""
    rows = expert_R.numel()
    assert al.block_expert.numel() == max_blocks(rows, E, block)
    seen = []
    for b, e in enumerate(al.block_expert.tolist()):
        rows_b = [r for r in al.rows[b * block:(b + 1) * block].tolist() if r != rows]
        if e < 0:
            assert rows_b == []
            continue
        assert rows_b and all(int(expert_R[r]) == e for r in rows_b)
        seen += rows_b
    local = [r for r in range(rows) if 0 <= int(expert_R[r]) < E]
    assert seen == sorted(local, key=lambda r: (int(expert_R[r]), r))


@pytest.mark.parametrize("rows,block", [(0, 16), (1, 16), (16, 16), (37, 16), (200, 64)])
def test_alignment(rows, block):
    gen = torch.Generator().manual_seed(rows)
    E = 6
    expert_R = torch.randint(-1, E + 2, (rows,), generator=gen)  # -1, E and E + 1: skipped
    assert_aligned(align(expert_R, E, block), expert_R, E, block)


@pytest.mark.parametrize("counts,block", [([0, 0, 0], 16), ([1], 16), ([16, 0, 32], 16), ([0, 3, 17, 1, 0], 16),
                                          ([300, 0, 5, 390, 7], 16), ([70, 150], 64)])
def test_alignment_of_segments_in_one_program(counts, block):
    """The kernel that aligns rows already grouped by expert (past 32 blocks too: its loop over chunks)."""
    expert_R = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))
    al = align_segments(torch.tensor(counts), sum(counts), block)
    assert_aligned(al, expert_R, len(counts), block)


def test_ops_dispatch_to_the_kernels():
    """`ops.grouped_swiglu_int4` and `ops.grouped_swiglu` run the Triton kernels on `ExpertStack` weights
    and agree with lcc's reference int4 op."""
    from lcc.backends.torch_ref.int4 import int4_swiglu_segments

    from lcc import ops

    gen = torch.Generator().manual_seed(6)
    qs = [quantize(torch.randn(3, 64, 64, generator=gen) / 8, 32) for _ in range(3)]
    counts = torch.tensor([4, 0, 9])
    x = torch.randn(13, 64, generator=gen)
    got = ops.grouped_swiglu_int4(x, counts, *(ExpertStack(q) for q in qs))
    assert rel(got, int4_swiglu_segments(x.double(), counts, *qs)) < 1e-5
    dense = [torch.randn(3, 64, 64, generator=gen) for _ in range(3)]
    got = ops.grouped_swiglu(x, counts, *(ExpertStack(w) for w in dense))
    want = oracle.segments(x, counts.tolist(), *(w.double() for w in dense))
    assert rel(got, want) < 1e-5


def test_bad_input_is_refused():
    gen = torch.Generator().manual_seed(7)
    stacks, _ = weights(2, 64, 64, "dense", torch.float32, gen)
    with pytest.raises(TypeError, match="activations"):
        swiglu_segments(torch.zeros(2, 64, dtype=torch.float64), torch.tensor([1, 1]), *stacks)
    odd = [ExpertStack(quantize(torch.randn(2, 48, 48, generator=gen), 24)) for _ in range(3)]
    with pytest.raises(ValueError, match="powers of two"):
        swiglu_segments(torch.zeros(2, 48), torch.tensor([1, 1]), *odd)


def test_missing_triton_or_gpu_is_said(monkeypatch):
    monkeypatch.setattr(support.importlib.util, "find_spec", lambda name: None)
    assert "not installed" in support.available()
    with pytest.raises(TritonMissing, match="not installed"):
        support.require()
    monkeypatch.undo()
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert "no CUDA device" in support.available()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: the compiled kernels are checked by "
                    "benchmarks/gpu/run.sh")
def test_compiled_kernels_on_the_gpu():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-m", "benchmarks.gpu.kernels", "--check-only"], env=env, timeout=600)
    assert done.returncode == 0


def test_a_cuda_serve_plan_runs_its_experts_on_the_kernels(tmp_path):
    """tiny-moe compiled for CUDA records the Triton backend; its rank (here on CPU tensors, the kernels
    interpreted) generates what the CPU plan generates, its logits within float32 rounding."""
    from lcc.serve.engine import Engine
    from lcc.serve.rank import SeqPart, ServeRank, StepPlan
    from lcc.serve.sampling import SamplingParams
    from tests.serve.plans import PROMPTS, serve_plan

    f32 = ("serve.dtype=float32", "model.n_layers=2")  # two layers: the interpreter takes seconds a step
    cuda = ServeRank(serve_plan(tmp_path, "world1", (*f32, "cluster.device.kind=cuda")), 0)
    cpu = ServeRank(serve_plan(tmp_path, "world1", (*f32, "serve.cpu_kernels=torch")), 0)
    assert (cuda.plan.backend, cuda.plan.serving.expert_kernel) == ("triton", "int4_triton")
    assert (cpu.plan.backend, cpu.plan.serving.expert_kernel) == ("torch", "int4_packed_cpu")
    assert isinstance(cuda.params["layers.0.ffn.experts.w1_EFD"], ExpertStack)
    prompt = PROMPTS[0]
    step = StepPlan([[SeqPart(0, 0, prompt, [0], True)]])
    a, b = cuda.step(step), cpu.step(step)
    assert rel(a, b.to(torch.float64)) < 1e-5
    outs = []  # a prefill step and a decode step through the engine
    for r in (cuda, cpu):
        engine = Engine(r)
        engine.submit(prompt, SamplingParams(max_tokens=2))
        outs.append([t for u in engine.run() for t in u.token_ids])
    assert outs[0] == outs[1] and len(outs[0]) == 2
