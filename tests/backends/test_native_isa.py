"""Which instruction set lcc's native CPU kernels are built for, and that both builds compute the same bits.

The library is built for AVX-512 or for AVX2 (with FMA), following PyTorch's CPU capability. On a CPU with
AVX-512 both builds run, so there a second process with `ATEN_CPU_CAPABILITY=avx2` computes every kernel on
the same inputs through the AVX2 build, and its outputs must equal this process's AVX-512 ones bit for bit
(the paths both builds have: FMA, not AVX512-BF16 dot products or AMX). On an AVX2 CPU that test skips: the
AVX-512 build cannot run there."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from lcc.backends.cpu import native

if native.unavailable() is not None:
    pytest.skip(f"lcc's native CPU kernels cannot run here: {native.unavailable()}", allow_module_level=True)

from tests.conftest import ROOT  # noqa: E402


def cpu_flags() -> set[str]:
    """The CPU's feature flags as Linux lists them (the oracle: not PyTorch's view of them)."""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def test_the_library_is_built_for_the_cpus_instruction_set():
    flags, forced = cpu_flags(), os.environ.get("ATEN_CPU_CAPABILITY", "").lower()
    lib = native.load()
    if forced == "avx2" or "avx512f" not in flags:
        assert lib.isa == "avx2" and {"avx2", "fma"} <= flags
        assert not lib.amx and not lib.ops.has_avx512_bf16()  # AVX-512's own paths are not in an AVX2 build
    else:
        assert lib.isa == "avx512"


def outputs() -> dict[str, torch.Tensor]:
    """Every kernel on fixed inputs, on the paths both builds have: odd widths and lengths, so that the tails
    (fewer than 16 lanes) run too."""
    from lcc.backends.cpu.int4_native import pack, pack_gate_up, swiglu_segments
    from lcc.backends.torch_ref.int4 import quantize

    ops = native.load().ops
    g = torch.Generator().manual_seed(0)
    out: dict[str, torch.Tensor] = {}
    E, D, F = 3, 64, 96
    for symmetric in (True, False):
        w1, w3 = (quantize(torch.randn(E, F, D, generator=g) / 8, 32, symmetric) for _ in range(2))
        w2 = quantize(torch.randn(E, D, F, generator=g) / 8, 32, symmetric)
        w13, w2p = pack_gate_up(w1, w3), pack(w2)
        for counts in ([1, 0, 2], [3, 4, 0], [13, 1, 6]):  # the few-row blocks, and a full one and its rest
            x = torch.randn(sum(counts), D, generator=g)
            out[f"swiglu f32 {symmetric} {counts}"] = swiglu_segments(x, counts, w13, w13, w2p)
            xb = x.to(torch.bfloat16)
            out[f"swiglu bf16 {symmetric} {counts}"] = ops.int4_swiglu(
                xb, counts, w13.codes, w13.scales, w13.shifts, w2p.codes, w2p.scales, w2p.shifts, 32, 0, False)
            h = torch.randn(sum(counts), F, generator=g)
            out[f"matmul {symmetric} {counts}"] = ops.int4_matmul(h, counts, w2p.codes, w2p.scales, w2p.shifts, 32, 0)
    out["exp"] = ops.simd_exp(torch.linspace(-110, 90, 1001))
    T, H, KV, d, S = 5, 4, 2, 32, 24
    for dtype in (torch.float32, torch.bfloat16):
        q = torch.randn(T, H, d, generator=g).to(dtype)
        k, v = (torch.randn(T, KV, d, generator=g).to(dtype) for _ in range(2))
        both, sign = torch.randn(T, d, generator=g), torch.randn(T, d, generator=g)
        k_cache, v_cache = (torch.randn(S, KV, d, generator=g).to(dtype) for _ in range(2))
        rotated = ops.rope_cache(q, k, v, both, sign, torch.tensor([3, 0, 7, 19, 11]), k_cache, v_cache)
        lengths = torch.tensor([1, 17, 23])  # a softmax over fewer than 16, more than 16, and a tail of 7
        slots = torch.stack([torch.randperm(S, generator=g)[:23] for _ in range(3)])
        attended = torch.zeros_like(rotated)
        ops.decode_attention(rotated, k_cache, v_cache, torch.tensor([0, 2, 4]), slots, lengths, attended)
        out[f"rope {dtype}"], out[f"k cache {dtype}"], out[f"attention {dtype}"] = rotated, k_cache, attended
        x = torch.randn(6, 72, generator=g).to(dtype)
        out[f"rms_norm {dtype}"] = ops.rms_norm(x, torch.randn(72, generator=g).to(dtype), 1e-6)
        out[f"combine {dtype}"] = ops.combine(x, torch.tensor([0, 2, 2, 1, 0, 3]), torch.rand(6, generator=g), 4)
    for rows in (1, 3, 6):
        x = torch.randn(rows, 200, generator=g).to(torch.bfloat16)  # 200: full steps of 128 and a tail of 8
        out[f"bf16_linear {rows}"] = ops.bf16_linear(x, torch.randn(37, 200, generator=g).to(torch.bfloat16), False)
    G, P = 4, 8
    x = torch.randn(9, 40, generator=g)  # 40: a dot product's tail of 8
    centroids = torch.nn.functional.normalize(torch.randn(G, 40, generator=g), dim=1)
    routed = ops.route(x, centroids, torch.randn(G * P, 40, generator=g), None, 1.0, 2, True, 3, 1, 0.9, True, 1.0)
    for name, t in zip(("experts", "gates", "mask", "k", "counts"), routed[:5], strict=True):
        out[f"route {name}"] = t
    return out


def test_the_avx2_build_computes_the_avx512_builds_bits(tmp_path):
    if native.load().isa != "avx512":
        pytest.skip("this CPU runs the AVX2 build only: the AVX-512 build, the other side, cannot run here")
    saved = tmp_path / "avx2.pt"
    code = ("import sys, torch; from tests.backends.test_native_isa import outputs; from lcc.backends.cpu import "
            "native; assert native.load().isa == 'avx2', native.load(); torch.save(outputs(), sys.argv[1])")
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "avx2"}
    done = subprocess.run([sys.executable, "-c", code, str(saved)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    theirs, ours = torch.load(saved), outputs()
    assert theirs.keys() == ours.keys()
    differ = [name for name in ours if not torch.equal(ours[name], theirs[name])]
    assert not differ, f"the AVX2 build differs from the AVX-512 one in: {differ}"


def test_a_rows_sums_follow_its_block_of_12_on_either_build():
    """What makes the builds agree, checked where only one runs: the int4 kernel cuts a segment into blocks
    of 12 rows on both (AVX2 then splits a block into register blocks of 4) and sums a row's products in
    one chain in blocks of 5-12 rows, in several in blocks of at most 4. So in float32, where the order of
    the sums shows in the bits, each row of segments of 5 to 12 rows gives the bits it gives in a 12-row
    segment, and the 13th row of a 13-row segment the bits it gives alone."""
    from lcc.backends.cpu.int4_native import pack
    from lcc.backends.torch_ref.int4 import quantize

    ops = native.load().ops
    g = torch.Generator().manual_seed(5)
    w = pack(quantize(torch.randn(1, 48, 64, generator=g), 32, symmetric=False))
    x = torch.randn(13, 64, generator=g)

    def rows(n: int) -> torch.Tensor:
        return ops.int4_matmul(x[:n], [n], w.codes, w.scales, w.shifts, 32, 0)

    twelve = rows(12)
    for n in range(5, 12):
        assert torch.equal(rows(n), twelve[:n]), n
    alone = ops.int4_matmul(x[12:], [1], w.codes, w.scales, w.shifts, 32, 0)
    assert torch.equal(rows(13)[12:], alone) and torch.equal(rows(13)[:12], twelve)
