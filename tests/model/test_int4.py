from __future__ import annotations

import pytest
import torch
from lcc.backends.torch_ref.int4 import dequantize, int4_swiglu_segments, quantize, unpack_codes

from lcc.model.moe import swiglu_segments


@pytest.mark.parametrize("symmetric", [True, False])
def test_round_trip_error_within_half_a_step(symmetric):
    w = torch.randn(3, 16, 64, generator=torch.Generator().manual_seed(0))
    q = quantize(w, 32, symmetric)
    err = (dequantize(q) - w).abs().reshape(3, 16, 2, 32)
    step = q.scales.to(torch.float32).unsqueeze(-1)
    assert (err <= step / 2 * (1 + 1e-3) + 1e-7).all()


def test_packed_layout():
    # symmetric codes are q + 8; element 2j in the low nibble, 2j+1 in the high one
    w = torch.tensor([[7.0, -7.0, 1.0, 0.0]])
    q = quantize(w, 4, symmetric=True)
    assert q.scales.item() == 1.0
    assert q.packed.dtype == torch.uint8 and q.packed.shape == (1, 2)
    assert q.packed.tolist() == [[15 | (1 << 4), 9 | (8 << 4)]]
    assert unpack_codes(q.packed).tolist() == [[15, 1, 9, 8]]
    torch.testing.assert_close(dequantize(q), w)


def test_asymmetric_zero_points_and_bytes():
    w = torch.rand(4, 64) + 1.0  # all positive: zero-point at the bottom of the range
    q = quantize(w, 32, symmetric=False)
    assert q.zeros is not None and q.zeros.shape == (4, 2) and (q.zeros == 0).all()
    assert q.nbytes == 4 * 64 // 2 + 2 * 8 + 8


def test_bytes_at_group_128_are_at_most_26_percent_of_bf16():
    w = torch.randn(8, 256, 1024)
    q = quantize(w, 128, symmetric=True)
    assert q.nbytes / (w.numel() * 2) == pytest.approx((4 + 16 / 128) / 16)
    assert q.nbytes <= 0.26 * w.numel() * 2


def test_quantized_ffn_equals_dequantized_weights():
    g = torch.Generator().manual_seed(1)
    E, D, F = 4, 64, 32
    w1, w3, w2 = torch.randn(E, F, D, generator=g), torch.randn(E, F, D, generator=g), torch.randn(E, D, F, generator=g)
    q1, q3, q2 = quantize(w1, 32), quantize(w3, 32), quantize(w2, 32)
    x = torch.randn(10, D, generator=g)
    counts = [3, 0, 5, 2]
    ref = swiglu_segments(x, counts, dequantize(q1), dequantize(q3), dequantize(q2))
    torch.testing.assert_close(int4_swiglu_segments(x, counts, q1, q3, q2), ref)


def test_bad_group_size():
    with pytest.raises(ValueError, match="group_size"):
        quantize(torch.randn(2, 10), 4)


@pytest.mark.parametrize("symmetric", [True, False])
def test_error_at_most_half_a_step_at_group_128(symmetric):
    w = torch.randn(3, 16, 256, generator=torch.Generator().manual_seed(7))
    q = quantize(w, 128, symmetric)
    err = (dequantize(q) - w).abs().reshape(3, 16, 2, 128)
    assert (err <= q.scales.to(torch.float32).unsqueeze(-1) * 0.5 * (1 + 1e-6)).all()
