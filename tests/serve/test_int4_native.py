"""lcc's native CPU int4 kernel (csrc/int4_experts.cpp) against lcc's reference int4 op (dequantise, then a
dense matmul in float64), on each of its paths: FMA in vector registers (AVX-512 or AVX2, as the library is
built here) for float32 and short bfloat16 segments, AVX512-BF16 dot products, AMX tiles for bfloat16
segments of 16 rows or more. A test named for a path runs that path or is skipped
with the reason (the AMX tests where the CPU lacks AMX-BF16). Also the accuracy of its SwiGLU's `exp`."""

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


def needs_amx() -> None:
    """Skips a test of the AMX path where this process cannot run it (the kernel would run the FMA path instead)."""
    if native.load().amx:
        return
    if not native._cpu_has_amx():
        pytest.skip("the AMX path needs AMX-BF16; this CPU has none")
    pytest.skip("the AMX path needs AMX-BF16 tiles: this CPU has them, but the compiler did not build the path or "
                "Linux did not grant the tile state")


def one_projection(shape: tuple[int, int], bf16_inputs: bool):
    """(int4 weights `[E, N, K]` packed, x `[rows, K]`, float64 x @ w.T per segment) for the segments COUNTS;
    x rounded to bfloat16 values when `bf16_inputs` (what AMX reads), the reference computed from that x."""
    N, K = shape
    q = quantize(torch.randn(len(COUNTS), N, K, generator=torch.Generator().manual_seed(2)), 32, symmetric=False)
    x = torch.randn(sum(COUNTS), K, generator=torch.Generator().manual_seed(3))
    if bf16_inputs:
        x = x.to(torch.bfloat16).float()
    w = dequantize(q, torch.float64)
    want = [x[a:b].double() @ w[e].T for e, (a, b) in enumerate(segments())]
    return pack(q), x, want


def segments() -> list[tuple[int, int]]:
    bounds = torch.tensor([0, *COUNTS]).cumsum(0).tolist()
    return list(zip(bounds[:-1], bounds[1:], strict=True))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("group", [2, 16, 32, 64])  # any even size dividing the widths
def test_native_swiglu_equals_the_reference_op(dtype, symmetric, group):
    """On the paths this machine takes for serving: bfloat16 segments of 16 rows or more on AMX where it runs."""
    E, D, F = len(COUNTS), 128, 64
    q = experts(E, D, F, group, symmetric)
    x = torch.randn(sum(COUNTS), D, generator=torch.Generator().manual_seed(1))
    want = int4_swiglu_segments(x.double(), COUNTS, *q)
    w13 = pack_gate_up(q[0], q[1])
    got = swiglu_segments(x.to(dtype), COUNTS, w13, w13, pack(q[2]))
    assert got.dtype == dtype and got.shape == want.shape
    assert relative_error(got, want) < TOLERANCE[dtype]


BF16_PATHS = [pytest.param(False, id="float32_fma"),
              pytest.param(True, id="avx512bf16_dot_products", marks=pytest.mark.skipif(
                  not native.load().ops.has_avx512_bf16(), reason="this CPU has no AVX512-BF16"))]


@pytest.mark.parametrize("dot_products", BF16_PATHS)
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("group", [2, 32])  # 2: one sum per row; 32: four (few rows) or two
def test_each_bfloat16_path_equals_the_reference_op(dot_products, symmetric, group):
    """bfloat16 activations on each path but AMX, named, not left to the CPU: dequantising to float32 for FMAs,
    and pairs of bfloat16 codes through vdpbf16ps (AMX off: amx_min_rows 0)."""
    E, D, F = len(COUNTS), 128, 64
    q = experts(E, D, F, group, symmetric)
    x = torch.randn(sum(COUNTS), D, generator=torch.Generator().manual_seed(1)).bfloat16()
    want = int4_swiglu_segments(x.double(), COUNTS, *q)
    w13, w2 = pack_gate_up(q[0], q[1]), pack(q[2])
    got = native.load().ops.int4_swiglu(x, COUNTS, w13.codes, w13.scales, w13.shifts, w2.codes, w2.scales, w2.shifts,
                                        group, 0, dot_products)
    assert got.dtype == torch.bfloat16 and relative_error(got, want) < TOLERANCE[torch.bfloat16]


def test_dot_products_need_the_cpu_to_have_them():
    if native.load().ops.has_avx512_bf16():
        pytest.skip("this CPU has AVX512-BF16: the refusal cannot be shown here")
    q = experts(2, 32, 32, 32, True)
    w13, w2 = pack_gate_up(q[0], q[1]), pack(q[2])
    with pytest.raises(RuntimeError, match="needs a CPU with AVX512-BF16"):
        native.load().ops.int4_swiglu(torch.randn(2, 32).bfloat16(), [1, 1], w13.codes, w13.scales, w13.shifts,
                                      w2.codes, w2.scales, w2.shifts, 32, 0, True)


SHAPES = [(64, 96), (96, 64), (48, 32)]  # (out, in): 48 columns and 32 inputs miss AMX's blocks of 32


@pytest.mark.parametrize("shape", SHAPES)
def test_one_projection_on_fma_registers(shape):
    """amx_min_rows 0: every segment on the FMA path (AVX-512 or AVX2 registers), float32 throughout, on any CPU."""
    w, x, want = one_projection(shape, bf16_inputs=False)
    got = matmul_segments(x, COUNTS, w, 0)
    assert got.dtype == torch.float32
    assert relative_error(got, torch.cat(want)) < TOLERANCE[torch.float32]


@pytest.mark.parametrize("amx_min_rows", [1, AMX_MIN_ROWS])
@pytest.mark.parametrize("shape", SHAPES)
def test_one_projection_on_amx(amx_min_rows, shape):
    """Segments of at least amx_min_rows rows (1: all) on AMX where the widths take it, within bfloat16
    rounding, and visibly rounded (the weights go to bfloat16): that is AMX. Shorter segments, and widths
    AMX lacks, stay on the FMA path: float32 exact from the same bfloat16-valued inputs."""
    needs_amx()
    w, x, want = one_projection(shape, bf16_inputs=True)
    got = matmul_segments(x, COUNTS, w, amx_min_rows)
    amx_widths = shape[0] % 32 == 0 and shape[1] % 32 == 0
    for (a, b), count, ref in zip(segments(), COUNTS, want, strict=True):
        if count == 0:
            continue
        err = relative_error(got[a:b], ref)
        if amx_widths and count >= amx_min_rows:
            assert 10 * TOLERANCE[torch.float32] < err < TOLERANCE[torch.bfloat16], (count, err)
        else:
            assert err < TOLERANCE[torch.float32], (count, err)


def test_a_row_does_not_depend_on_the_others_in_short_segments():
    """Segments under 16 rows run in vector registers in bfloat16 too (FMA, or AVX512-BF16 dot products where
    the CPU has them): a row gives the same bits alone or among 3 or 15."""
    q = experts(2, 64, 32, 32, True)
    w13, w2 = pack_gate_up(q[0], q[1]), pack(q[2])
    x = torch.randn(15, 64, generator=torch.Generator().manual_seed(4)).to(torch.bfloat16)
    alone = swiglu_segments(x[:1], [1, 0], w13, w13, w2)
    few = swiglu_segments(x[:3], [3, 0], w13, w13, w2)
    many = swiglu_segments(x, [AMX_MIN_ROWS - 1, 0], w13, w13, w2)
    assert torch.equal(few[:1], alone) and torch.equal(many[:3], few)


def test_a_row_does_not_depend_on_the_others_on_amx():
    """Segments of 16 rows or more run on AMX: a row gives the same bits among 16 or 20 rows (one or two tile
    blocks), within bfloat16 rounding of its result in a short segment."""
    needs_amx()
    q = experts(2, 64, 32, 32, True)
    w13, w2 = pack_gate_up(q[0], q[1]), pack(q[2])
    x = torch.randn(20, 64, generator=torch.Generator().manual_seed(4)).to(torch.bfloat16)
    few = swiglu_segments(x[:3], [3, 0], w13, w13, w2)
    block = swiglu_segments(x[:16], [16, 0], w13, w13, w2)
    blocks = swiglu_segments(x, [20, 0], w13, w13, w2)
    assert torch.equal(block, blocks[:16])
    assert relative_error(blocks[:3], few.double()) < TOLERANCE[torch.bfloat16]


def test_no_rows_give_an_empty_output():
    q = experts(2, 64, 32, 32, True)
    w13 = pack_gate_up(q[0], q[1])
    assert swiglu_segments(torch.zeros(0, 64), [0, 0], w13, w13, pack(q[2])).shape == (0, 64)


def test_the_gate_and_up_projections_come_as_one_stack():
    q = experts(2, 64, 32, 32, True)
    with pytest.raises(ValueError, match="one stack"):
        swiglu_segments(torch.zeros(1, 64), [1, 0], pack(q[0]), pack(q[1]), pack(q[2]))


def test_the_library_is_built_once_and_cached():
    """The library this process loaded, asked for again as by a new process: the cached file, not rebuilt, and
    no temporary build folder left beside it."""
    path = native.load().path
    assert path.stat().st_size > 0  # in the kernel cache, or the private fall-back where it is read-only
    mtime = path.stat().st_mtime_ns
    native.load.cache_clear()
    assert native.load().path == path and path.stat().st_mtime_ns == mtime
    assert not list(path.parent.glob(f"{path.stem}-*.tmp"))


def test_a_compiler_without_amx_builds_the_avx512_path_once(tmp_path, monkeypatch):
    """A compiler that rejects the AMX flags: the AVX-512 build serves, and the rejection is remembered, so a
    later process does not compile the AMX build again. `CXX` may carry arguments (here a logging wrapper in
    front of a stand-in compiler that writes its outputs)."""
    log = tmp_path / "calls"
    stand_in = tmp_path / "stand-in-cxx"
    stand_in.write_text('#!/bin/sh\nwhile [ $# -gt 0 ]; do [ "$1" = -o ] && echo built > "$2"; shift; done\n')
    fake = tmp_path / "fake-cxx"
    fake.write_text(f'#!/bin/sh\necho "$*" >> {log}\ncase "$*" in *-mamx-tile*) exit 1;; esac\nexec "$@"\n')
    for script in (stand_in, fake):
        script.chmod(0o755)
    monkeypatch.setenv("LCC_KERNEL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("CXX", f"{fake} {stand_in}")
    cxx = native.compiler()
    assert cxx == [str(fake), str(stand_in)]
    assert native._build(cxx, native.BASE_FLAGS + native.AMX_FLAGS) == (None, False)
    path, amx = native._build(cxx, native.BASE_FLAGS)
    assert path is not None and not amx and path.read_text() == "built\n"
    calls = log.read_text().count("-o ")
    # the AMX compiles, a probe that finds the AMX flags rejected, the AVX-512 compiles, one link
    assert calls == 2 * len(native.SOURCES) + 2
    assert native._build(cxx, native.BASE_FLAGS + native.AMX_FLAGS) == (None, False)
    assert native._build(cxx, native.BASE_FLAGS)[0] == path
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
        with pytest.raises(RuntimeError, match="one count per expert"):
            swiglu_segments(torch.zeros(3, 64), counts, w13, w13, pack(q[2]))


def native_exp(x: torch.Tensor) -> torch.Tensor:
    """The kernel's float32 exp (simd.h's exp_ps, which the SwiGLU activation uses) on every value of x."""
    return native.load().ops.simd_exp(x.to(torch.float32))


def ulp_error(exp32, x: torch.Tensor) -> torch.Tensor:
    """Per value of x (float32), how many float32 steps `exp32(x)` is from e^x correctly rounded to float32
    (float64's exp, then one rounding: e^x is positive, so the distance is the difference of the bit patterns)."""
    exact = torch.exp(x.double()).float()
    return (exp32(x).view(torch.int32).long() - exact.view(torch.int32).long()).abs()


def exp_sample() -> torch.Tensor:
    """[-87, 87] in float32: a million evenly spaced values, every float32 near both ends (results near the
    smallest normal and near the largest), and magnitudes from 1e-30 to 1 of either sign."""
    ends = [torch.arange(-87.0, -86.98, 2.0**-17), torch.arange(86.98, 87.0, 2.0**-17)]
    small = 10 ** torch.linspace(-30, 0, 20_000, dtype=torch.float64)
    return torch.cat([torch.linspace(-87.0, 87.0, 1 << 20, dtype=torch.float64), *ends, small, -small]).float()


def test_exp_is_within_one_ulp_of_the_correctly_rounded_value():
    """docs/serve.md: the activation's exp is within 1 ulp of the correctly rounded e^x over [-87, 87]."""
    x = exp_sample()
    assert x.min() == -87 and x.max() == 87
    error = ulp_error(native_exp, x)
    assert int(error.max()) <= 1, f"{int(error.max())} ulp at x = {float(x[error.argmax()])}"
