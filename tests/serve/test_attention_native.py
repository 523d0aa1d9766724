"""lcc's native CPU attention kernels (csrc/decode_attention.cpp) against PyTorch: the rotary embeddings and
cache writes against lcc.ops.serve's torch path, decode attention against float64 SDPA per sequence."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from lcc.backends.cpu import native
from lcc.backends.cpu.attention import decode_attention, rope_cache

from lcc.ops.serve import StepBatch, _rotate

if native.unavailable() is not None:
    pytest.skip(f"lcc's native CPU kernels cannot run here: {native.unavailable()}", allow_module_level=True)

TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2}  # relative to the largest output


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.double() - want.double()).abs().max() / want.double().abs().max())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_and_cache_writes(dtype):
    g = torch.Generator().manual_seed(0)
    T, H, KV, d, slots_total = 7, 4, 2, 32, 64
    q, k, v = (torch.randn(T, n, d, generator=g).to(dtype) for n in (H, KV, KV))
    positions = torch.tensor([0, 5, 6, 7, 100, 3, 2])
    slots = torch.randperm(slots_total, generator=g)[:T]
    batch = StepBatch(None, positions, slots, [], None, positions)
    k_cache, v_cache = (torch.zeros(slots_total, KV, d, dtype=dtype) for _ in range(2))
    q_rot = rope_cache(q, k, v, *batch.rope(d, 10000.0, torch.float32), slots, k_cache, v_cache)
    both, sign = batch.rope(d, 10000.0, torch.float64)
    assert relative_error(q_rot, _rotate(q.double(), both, sign)) < TOLERANCE[dtype]
    assert relative_error(k_cache[slots], _rotate(k.double(), both, sign)) < TOLERANCE[dtype]
    assert torch.equal(v_cache[slots], v)
    untouched = torch.ones(slots_total, dtype=torch.bool)
    untouched[slots] = False
    assert not k_cache[untouched].any() and not v_cache[untouched].any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads", [(4, 4), (8, 2)])  # plain and grouped-query attention
def test_decode_attention_against_sdpa(dtype, heads):
    g = torch.Generator().manual_seed(1)
    H, KV = heads
    d, n, slots_total = 32, 5, 256
    k_cache, v_cache = (torch.randn(slots_total, KV, d, generator=g).to(dtype) for _ in range(2))
    lengths = torch.tensor([1, 17, 40, 3, 16])  # one key, a partial and a whole 16-lane chunk of scores
    longest = int(lengths.max())
    slots = torch.randperm(slots_total, generator=g)[:n * longest].view(n, longest)  # scattered, as blocks are
    T = n + 3
    q = torch.randn(T, H, d, generator=g).to(dtype)
    rows = torch.tensor([6, 0, 2, 7, 4])
    out = torch.full((T, H, d), 7.0, dtype=dtype)
    decode_attention(q, k_cache, v_cache, rows, slots, lengths, out)
    for i in range(n):
        ctx = slots[i, :int(lengths[i])]
        ks, vs = (c[ctx].double().transpose(0, 1).unsqueeze(0) for c in (k_cache, v_cache))
        want = F.scaled_dot_product_attention(q[rows[i]].double().unsqueeze(0).unsqueeze(2), ks, vs,
                                              enable_gqa=True)[0, :, 0]
        assert relative_error(out[rows[i]], want) < TOLERANCE[dtype], i
    others = torch.ones(T, dtype=torch.bool)
    others[rows] = False
    assert (out[others] == 7).all()  # rows of other sequences are left alone


def test_shapes_the_kernels_lack_are_refused():
    q = torch.zeros(1, 2, 24)
    with pytest.raises(RuntimeError, match="head_dim a multiple of 16"):
        decode_attention(q, torch.zeros(4, 2, 24), torch.zeros(4, 2, 24), torch.tensor([0]),
                         torch.tensor([[0]]), torch.tensor([1]), torch.empty_like(q))
    with pytest.raises(RuntimeError, match="q has dtype float64: the kernel takes bfloat16 or float32"):
        decode_attention(q.double(), torch.zeros(4, 2, 24).double(), torch.zeros(4, 2, 24).double(),
                         torch.tensor([0]), torch.tensor([[0]]), torch.tensor([1]), torch.empty_like(q.double()))
