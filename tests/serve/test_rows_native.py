"""lcc's native row kernels of a serve step (csrc/rows.cpp, and the dense kernel's SwiGLU of unquantised
experts) against oracles written here: RMS norm with the reference op's roundings (the row's mean square
in float64 here, float32 there: within one rounding of the output), the gate-weighted combine bit for bit
(the same roundings in the same order), and the experts' SwiGLU equal to per-expert PyTorch matmuls in
bfloat16."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from lcc.backends.cpu import dense, native
from lcc.backends.cpu import norm as native_norm

if native.unavailable() is not None:
    pytest.skip(f"lcc's native CPU kernels cannot run here: {native.unavailable()}", allow_module_level=True)

ops = native.load().ops


def rms_oracle(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """x * rsqrt(mean(x^2) + eps) rounded to x's dtype, then times w rounded: the mean square in float64."""
    x64 = x.double()
    normed = (x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    return (normed.double() * w.double()).to(x.dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 512), (5, 64), (2, 3, 40), (4, 17)])  # 40, 17: a tail past 16 lanes
def test_rms_norm_against_its_oracle(dtype, shape):
    g = torch.Generator().manual_seed(sum(shape))
    x = (torch.randn(*shape, generator=g) * 3).to(dtype)
    w = torch.randn(shape[-1], generator=g).to(dtype)
    got, want = ops.rms_norm(x, w, 1e-6), rms_oracle(x, w, 1e-6)
    assert got.dtype == dtype and got.shape == x.shape
    ulp = 2.0**-7 if dtype == torch.bfloat16 else 2.0**-22  # one rounding of the output, relative
    assert ((got.double() - want.double()).abs() <= want.double().abs() * ulp + 1e-30).all()


def test_the_norm_of_each_head_is_the_norm_of_each_head_dim_slice():
    g = torch.Generator().manual_seed(4)
    x, w = torch.randn(3, 4 * 64, generator=g).bfloat16(), torch.randn(64, generator=g).bfloat16()
    held = native_norm.prepare(w, torch.bfloat16)
    got = native_norm.head_norm(x, held, 64, 1e-6)
    want = torch.cat([rms_oracle(x[:, h * 64:(h + 1) * 64], w, 1e-6) for h in range(4)], dim=1)
    assert ((got.double() - want.double()).abs() <= want.double().abs() * 2.0**-7).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_combine_equals_index_add_of_the_weighted_rows_bit_for_bit(dtype):
    g = torch.Generator().manual_seed(7)
    S, T, D = 11, 4, 24
    y = torch.randn(S, D, generator=g).to(dtype)
    token_S = torch.randint(0, T, (S,), generator=g)
    gate_S = torch.rand(S, generator=g)
    want = torch.zeros(T, D, dtype=dtype)
    want.index_add_(0, token_S, y * gate_S.unsqueeze(-1).to(dtype))  # slot by slot, in order
    assert torch.equal(ops.combine(y, token_S, gate_S, T), want)
    assert torch.equal(ops.combine(y[:0], token_S[:0], gate_S[:0], T), torch.zeros(T, D, dtype=dtype))


@pytest.mark.parametrize("counts", [[1, 0, 0, 1], [2, 0, 5, 1], [0, 8, 3, 0], [0, 0, 0, 0]])
def test_bf16_experts_in_one_call_equal_per_expert_matmuls(counts):
    E, Fd, D = 4, 96, 64
    g = torch.Generator().manual_seed(sum(counts))
    w1, w3 = (dense.prepare_experts(torch.randn(E, Fd, D, generator=g) / 8) for _ in range(2))
    w2 = dense.prepare_experts(torch.randn(E, D, Fd, generator=g) / 8)
    x = torch.randn(sum(counts), D, generator=g).bfloat16()
    want, start = torch.empty(sum(counts), D, dtype=torch.bfloat16), 0
    for e, n in enumerate(counts):
        xs = x[start:start + n]
        h = F.silu(F.linear(xs, w1.weight[e])) * F.linear(xs, w3.weight[e])
        want[start:start + n] = F.linear(h, w2.weight[e])
        start += n
    got = ops.bf16_swiglu(x, counts, w1.weight, w3.weight, w2.weight)
    # each projection's sums in float32 in another order than oneDNN's: within a rounding or two of bfloat16
    scale = max(1.0, float(want.abs().amax())) if want.numel() else 1.0
    torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2 * scale)
    assert torch.equal(dense.swiglu_segments(x, counts, w1, w3, w2), got)  # the layer's one call
