"""lcc's native CPU int4 kernel (csrc/int4_experts.cpp) against lcc's reference int4 op (dequantise, then a
dense matmul in float64), on both of its paths: AVX-512 registers for float32 and short bfloat16 segments,
AMX tiles for bfloat16 segments of 16 rows or more (where the CPU has AMX)."""

from __future__ import annotations

import pytest
import torch
from lcc.backends.cpu import native
from lcc.backends.cpu.int4_native import AMX_MIN_ROWS, matmul_segments, pack, pack_gate_up, swiglu_segments
from lcc.backends.torch_ref.int4 import dequantize, int4_swiglu_segments, quantize

if native.unavailable() is not None:
    pytest.skip(f"lcc's native CPU kernel cannot run here: {native.unavailable()}", allow_module_level=True)

# float32: float32 products summed per scale group, then scaled (the reference rounds once per weight);
# bfloat16 also rounds the activations, and on AMX the dequantised weights, to 8 mantissa bits
TOLERANCE = {torch.float32: 2e-6, torch.bfloat16: 2e-2}
# segments: an expert without rows, a single row, one short of a register block (12) and of an AMX block
# (16), exactly 16, and 16 + 17 (two AMX blocks, the second partial)
COUNTS = [3, 0, 1, 11, 12, 13, 15, 16, 33]


def experts(E: int, D: int, F: int, group: int, symmetric: bool, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    w1, w3 = (torch.randn(E, F, D, generator=g) / D**0.5 for _ in range(2))
    w2 = torch.randn(E, D, F, generator=g) / F**0.5
    return [quantize(w, group, symmetric) for w in (w1, w3, w2)]


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.double() - want).abs().max() / want.abs().max())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("group", [2, 16, 32, 64])  # any even size dividing the widths
def test_native_swiglu_equals_the_reference_op(dtype, symmetric, group):
    E, D, F = len(COUNTS), 128, 64
    q = experts(E, D, F, group, symmetric)
    x = torch.randn(sum(COUNTS), D, generator=torch.Generator().manual_seed(1))
    want = int4_swiglu_segments(x.double(), COUNTS, *q)
    w13 = pack_gate_up(q[0], q[1])
    got = swiglu_segments(x.to(dtype), COUNTS, w13, w13, pack(q[2]))
    assert got.dtype == dtype and got.shape == want.shape
    assert relative_error(got, want) < TOLERANCE[dtype]


@pytest.mark.parametrize("amx_min_rows", [0, 1, AMX_MIN_ROWS])
@pytest.mark.parametrize("shape", [(64, 96), (96, 64), (48, 32)])  # (out, in): 48 columns and 32 inputs miss AMX's
def test_one_projection_per_path(amx_min_rows, shape):
    """Each path on its own (0: AVX-512 only; 1: every segment on AMX), widths that AMX takes and widths that
    fall back to AVX-512 (outputs not a multiple of 32)."""
    N, K = shape
    q = quantize(torch.randn(len(COUNTS), N, K, generator=torch.Generator().manual_seed(2)), 32, symmetric=False)
    x = torch.randn(sum(COUNTS), K, generator=torch.Generator().manual_seed(3))
    w = dequantize(q, torch.float64)
    bounds = torch.tensor([0, *COUNTS]).cumsum(0).tolist()
    want = torch.cat([x[bounds[e]:bounds[e + 1]].double() @ w[e].T for e in range(len(COUNTS))])
    exact = amx_min_rows == 0 or not native.load().amx
    xs = x if exact else x.to(torch.bfloat16).float()  # AMX reads the activations in bfloat16
    got = matmul_segments(xs, COUNTS, pack(q), amx_min_rows)
    assert got.dtype == torch.float32
    assert relative_error(got, want) < (TOLERANCE[torch.float32] if exact else TOLERANCE[torch.bfloat16])


def test_a_row_does_not_depend_on_the_others():
    """The same row gives the same output alone or among others, on either path (segment sizes decide the
    path: 16 rows or more on AMX)."""
    q = experts(2, 64, 32, 32, True)
    w13, w2 = pack_gate_up(q[0], q[1]), pack(q[2])
    x = torch.randn(20, 64, generator=torch.Generator().manual_seed(4)).to(torch.bfloat16)
    few = swiglu_segments(x[:3], [3, 0], w13, w13, w2)  # AVX-512
    many = swiglu_segments(x, [20, 0], w13, w13, w2)  # AMX where the CPU has it
    alone = swiglu_segments(x[:1], [1, 0], w13, w13, w2)
    assert torch.equal(few[:1], alone)
    if not native.load().amx:
        assert torch.equal(many[:3], few)
    else:  # the same row on AMX: bfloat16 weights, within bfloat16 rounding of the AVX-512 result
        assert relative_error(many[:3], few.double()) < TOLERANCE[torch.bfloat16]


def test_no_rows_give_an_empty_output():
    q = experts(2, 64, 32, 32, True)
    w13 = pack_gate_up(q[0], q[1])
    assert swiglu_segments(torch.zeros(0, 64), [0, 0], w13, w13, pack(q[2])).shape == (0, 64)


def test_the_gate_and_up_projections_come_as_one_stack():
    q = experts(2, 64, 32, 32, True)
    with pytest.raises(ValueError, match="one stack"):
        swiglu_segments(torch.zeros(1, 64), [1, 0], pack(q[0]), pack(q[1]), pack(q[2]))


def test_the_library_is_built_once_and_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("LCC_KERNEL_CACHE", str(tmp_path))
    path, _ = native._build(native.compiler(), native.BASE_FLAGS)
    assert path is not None and path.parent == tmp_path and path.stat().st_size > 0
    mtime = path.stat().st_mtime_ns
    assert native._build(native.compiler(), native.BASE_FLAGS)[0] == path and path.stat().st_mtime_ns == mtime
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary files left behind


def test_a_compiler_without_amx_builds_the_avx512_path_once(tmp_path, monkeypatch):
    """A compiler that rejects the AMX flags: the AVX-512 build serves, and the rejection is remembered, so a
    later process does not compile the AMX build again. `CXX` may carry arguments."""
    log = tmp_path / "calls"
    fake = tmp_path / "fake-cxx"
    fake.write_text(f'#!/bin/sh\necho "$*" >> {log}\ncase "$*" in *-mamx-tile*) exit 1;; esac\nexec "$@"\n')
    fake.chmod(0o755)
    monkeypatch.setenv("LCC_KERNEL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("CXX", f"{fake} {native.compiler()[0]}")
    cxx = native.compiler()
    assert native._build(cxx, native.BASE_FLAGS + native.AMX_FLAGS) == (None, False)
    path, amx = native._build(cxx, native.BASE_FLAGS)
    assert path is not None and not amx
    calls = log.read_text().count("-o ")
    assert native._build(cxx, native.BASE_FLAGS + native.AMX_FLAGS) == (None, False)
    assert log.read_text().count("-o ") == calls  # neither build compiled again


def test_a_compiler_that_fails_is_reported(tmp_path, monkeypatch):
    monkeypatch.setenv("LCC_KERNEL_CACHE", str(tmp_path))
    with pytest.raises(native.NativeKernelMissing, match="could not build lcc.s CPU kernels"):
        native._build(native.compiler(), [*native.BASE_FLAGS, "-DLCC_NO_SUCH_FLAG", "-fno-such-option"])
    assert list(tmp_path.iterdir()) == []


def test_counts_that_do_not_match_the_rows_are_refused():
    q = experts(2, 64, 32, 32, True)
    w13 = pack_gate_up(q[0], q[1])
    for counts in ([2, 2], [1], [-1, 4]):
        with pytest.raises(ValueError, match="one count per expert"):
            swiglu_segments(torch.zeros(3, 64), counts, w13, w13, pack(q[2]))
