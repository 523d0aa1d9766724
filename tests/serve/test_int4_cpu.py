"""PyTorch's packed CPU int4 matmul behind lcc's int4 experts, against lcc's reference int4 op
(dequantise, then a dense matmul in float64)."""

from __future__ import annotations

import pytest
import torch
from lcc.backends.cpu.int4 import pack, swiglu_segments
from lcc.backends.torch_ref.int4 import int4_swiglu_segments, quantize

# float32: the kernel accumulates in float32 like any float32 matmul; bfloat16 also rounds the activations
# and the scales to 8 mantissa bits
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 3e-2}


def experts(E: int, D: int, F: int, group: int, symmetric: bool, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    w1, w3 = (torch.randn(E, F, D, generator=g) / D**0.5 for _ in range(2))
    w2 = torch.randn(E, D, F, generator=g) / F**0.5
    return [quantize(w, group, symmetric) for w in (w1, w3, w2)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("group", [32, 64])
def test_packed_kernel_equals_the_reference_op(dtype, symmetric, group):
    E, D, F = 4, 128, 64
    q = experts(E, D, F, group, symmetric)
    counts = [3, 0, 1, 9]  # an expert without tokens, one with a single token
    x = torch.randn(sum(counts), D, generator=torch.Generator().manual_seed(1))
    want = int4_swiglu_segments(x.double(), counts, *q)
    got = swiglu_segments(x.to(dtype), counts, *(pack(w, dtype) for w in q)).double()
    error = (got - want).abs().max() / want.abs().max()
    assert error < TOLERANCE[dtype], float(error)


def test_no_tokens_give_an_empty_output():
    q = [pack(w, torch.float32) for w in experts(2, 64, 32, 32, True)]
    assert swiglu_segments(torch.zeros(0, 64), [0, 0], *q).shape == (0, 64)


def test_group_sizes_the_kernel_lacks_are_refused():
    with pytest.raises(ValueError, match="group size 16"):
        pack(quantize(torch.randn(2, 32, 64), 16), torch.float32)
