"""lcc's native CPU kernels as PyTorch operators (torch.ops.lcc, csrc/ops.cpp): a wrong call (dtype, shape,
counts, an out-of-range slot or row, AMX not granted) raises a RuntimeError naming the argument before any
kernel runs, and leaves the tensors it would write untouched; the schemas, fake implementations and
mutation claims pass torch.library.opcheck; torch.compile traces through an operator with no graph break."""

from __future__ import annotations

import pytest
import torch
from lcc.backends.cpu import native
from lcc.backends.torch_ref.int4 import quantize

if native.unavailable() is not None:
    pytest.skip(f"lcc's native CPU kernels cannot run here: {native.unavailable()}", allow_module_level=True)

ops = native.load().ops


def int4_stack(E: int, out: int, inp: int, group: int = 32, seed: int = 0):
    from lcc.backends.cpu.int4_native import pack

    g = torch.Generator().manual_seed(seed)
    return pack(quantize(torch.randn(E, out, inp, generator=g), group, symmetric=False))


def attention_case(dtype=torch.float32):
    g = torch.Generator().manual_seed(3)
    T, H, KV, d, S = 3, 4, 2, 16, 8
    q = torch.randn(T, H, d, generator=g).to(dtype)
    k_cache, v_cache = (torch.randn(S, KV, d, generator=g).to(dtype) for _ in range(2))
    return q, k_cache, v_cache


def test_an_out_of_range_cache_slot_is_an_error_and_nothing_is_written():
    q, k_cache, v_cache = attention_case()
    k, v = torch.randn(3, 2, 16), torch.randn(3, 2, 16)
    table = torch.ones(3, 16)
    before = k_cache.clone(), v_cache.clone()
    for bad in (8, -1):
        with pytest.raises(RuntimeError, match=rf"slots\[1\] = {bad} is out of range: the cache has 8"):
            ops.rope_cache(q, k, v, table, table, torch.tensor([0, bad, 2]), k_cache, v_cache)
    assert torch.equal(k_cache, before[0]) and torch.equal(v_cache, before[1])


def test_decode_attention_checks_slots_rows_and_lengths():
    q, k_cache, v_cache = attention_case()
    out = torch.full_like(q, 7.0)
    rows, lengths = torch.tensor([0, 2]), torch.tensor([2, 3])
    slots = torch.tensor([[0, 1, 99], [2, 3, 4]])  # the first sequence's third slot is past its length
    ops.decode_attention(q, k_cache, v_cache, rows, slots, lengths, out)  # unused entries are not read
    out.fill_(7.0)
    cases = [
        (rows, torch.tensor([[0, 1, 99], [2, 8, 4]]), lengths, r"slots\[1, 1\] = 8 is out of range: the cache has 8"),
        (torch.tensor([0, 3]), slots, lengths, r"rows\[1\] = 3 is out of range: q has 3"),
        (rows, slots, torch.tensor([2, 4]), r"lengths\[1\] = 4 must lie in \[1, 3\]"),
        (rows, slots, torch.tensor([0, 3]), r"lengths\[0\] = 0 must lie in \[1, 3\]"),
        (rows, slots.to(torch.int32), lengths, "slots has dtype int32: the kernel takes int64"),
    ]
    for r, s, n, message in cases:
        with pytest.raises(RuntimeError, match=message):
            ops.decode_attention(q, k_cache, v_cache, r, s, n, out)
    assert (out == 7.0).all()


def test_attention_dtypes_and_shapes_must_agree():
    q, k_cache, v_cache = attention_case()
    out = torch.empty_like(q)
    one = torch.tensor([0])
    with pytest.raises(RuntimeError, match="k_cache has dtype bfloat16: the kernel takes float32"):
        ops.decode_attention(q, k_cache.bfloat16(), v_cache, one, one.view(1, 1), one + 1, out)
    with pytest.raises(RuntimeError, match="out must be contiguous"):
        ops.decode_attention(q, k_cache, v_cache, one, one.view(1, 1), one + 1, torch.empty(4, 3, 16).transpose(0, 1))
    with pytest.raises(RuntimeError, match=r"k must be \[3, 2, 16\]"):
        ops.rope_cache(q, torch.randn(3, 4, 16), torch.randn(3, 2, 16), torch.ones(3, 16), torch.ones(3, 16),
                       torch.tensor([0, 1, 2]), k_cache, v_cache)


def test_int4_calls_are_checked():
    w = int4_stack(2, 32, 64)
    x = torch.randn(3, 64)
    assert ops.int4_matmul(x, [1, 2], w.codes, w.scales, w.shifts, w.group_size, 0).shape == (3, 32)
    cases = [
        ((x.double(), [1, 2], w.codes, w.scales, w.shifts, 32, 0), "x has dtype float64: the kernel takes float32"),
        ((x[:, :32], [1, 2], w.codes, w.scales, w.shifts, 32, 0), "x has 32 columns and the weights take 64"),
        ((x, [1, 1], w.codes, w.scales, w.shifts, 32, 0), "3 rows for counts \\[1, 1\\]: one count per expert"),
        ((x, [4, -1], w.codes, w.scales, w.shifts, 32, 0), "none negative"),
        ((x, [2**63 - 1, 2**63 - 1, 3][:2], w.codes, w.scales, w.shifts, 32, 0), "summing to the rows"),
        ((x, [1, 2], w.codes.to(torch.int32), w.scales, w.shifts, 32, 0), "w has dtype int32: the kernel takes uint8"),
        ((x, [1, 2], w.codes, w.scales[:, :, :1], w.shifts, 32, 0), r"w scales must be contiguous \[2, 2, 2, 16\]"),
        ((x, [1, 2], w.codes, w.scales, w.shifts, 48, 0), "group size 48 must be even and divide the input width 64"),
    ]
    for args, message in cases:
        with pytest.raises(RuntimeError, match=message):
            ops.int4_matmul(*args)


def test_amx_tiles_are_refused_where_they_were_not_granted():
    if native.load().amx:
        pytest.skip("this process has AMX tiles")
    w = int4_stack(1, 32, 64)
    with pytest.raises(RuntimeError, match="asks for AMX tiles, which this process has not been granted"):
        ops.int4_matmul(torch.randn(2, 64), [2], w.codes, w.scales, w.shifts, w.group_size, 16)


def test_counts_that_would_overflow_are_refused():
    """Counts whose 64-bit sum wraps around to the row count must not pass for it."""
    w = int4_stack(3, 32, 64)
    with pytest.raises(RuntimeError, match="summing to the rows"):
        ops.int4_matmul(torch.randn(1, 64), [2**63 - 1, 2**63 - 1, 3], w.codes, w.scales, w.shifts, 32, 0)


def test_an_experts_width_the_activation_cannot_step_through_is_refused():
    """The SwiGLU activation runs 16 lanes at a time: a width of 8 would run into the next row."""
    w13, w2 = int4_stack(1, 16, 64, group=8), int4_stack(1, 64, 8, group=8, seed=1)  # F = 8
    with pytest.raises(RuntimeError, match="width 8 must be a multiple of 16"):
        ops.int4_swiglu(torch.randn(1, 64), [1], w13.codes, w13.scales, w13.shifts, w2.codes, w2.scales, w2.shifts,
                        8, 0)


def test_the_swiglu_weights_must_be_one_layers_experts():
    w13, w2 = int4_stack(2, 64, 64), int4_stack(2, 64, 64, seed=1)  # w2 should be [E, D, F] = [2, 64, 32]
    with pytest.raises(RuntimeError, match="are not one layer's experts"):
        ops.int4_swiglu(torch.randn(2, 64), [1, 1], w13.codes, w13.scales, w13.shifts, w2.codes, w2.scales,
                        w2.shifts, 32, 0)


def test_routing_arguments_are_checked():
    x, c, w = torch.randn(4, 16), torch.randn(2, 16), torch.randn(8, 16)
    good = (x, c, w, None, 1.0, 1, True, 2, 1, 0.9, True, 1.0)
    experts, gates, mask, k, counts, load, token_S, gate_S = ops.route(*good)
    assert torch.equal(load, counts.double())
    assert token_S.shape == gate_S.shape == (int(counts.sum()),)
    assert experts.shape == gates.shape == mask.shape == (4, 2) and int(counts.sum()) == int(mask.sum())
    for change, message in [((0, x.double()), "x has dtype float64: the kernel takes float32 or bfloat16"),
                            ((7, 5), "keeping 1 groups cannot give 5 experts"),
                            ((3, torch.zeros(7, dtype=torch.float64)), "bias must hold one value per expert"),
                            ((8, 3), r"k_min 3 must lie in \[1, 2\]")]:
        args = list(good)
        args[change[0]] = change[1]
        with pytest.raises(RuntimeError, match=message):
            ops.route(*args)


def test_row_kernels_check_their_arguments():
    x, w = torch.randn(3, 16), torch.randn(16)
    with pytest.raises(RuntimeError, match="weight holds 6 values and x has 16 columns, not a multiple"):
        ops.rms_norm(x, torch.randn(6), 1e-6)
    with pytest.raises(RuntimeError, match="weight has dtype bfloat16: the kernel takes float32"):
        ops.rms_norm(x, w.bfloat16(), 1e-6)
    y, gate = torch.randn(4, 16), torch.rand(4)
    with pytest.raises(RuntimeError, match=r"token_S\[2\] = 3 is out of range: the output has 3"):
        ops.combine(y, torch.tensor([0, 1, 3, 2]), gate, 3)
    with pytest.raises(RuntimeError, match="y has 4 rows, token_S 3 and gate_S 4"):
        ops.combine(y, torch.tensor([0, 1, 2]), gate, 3)
    w13, w2 = torch.randn(2, 32, 16).bfloat16(), torch.randn(2, 16, 32).bfloat16()
    with pytest.raises(RuntimeError, match="counts"):
        ops.bf16_swiglu(torch.randn(3, 16).bfloat16(), [1, 1], w13, w13, w2)
    with pytest.raises(RuntimeError, match=r"w2 must be \[2, 16, 32\]"):
        ops.bf16_swiglu(torch.randn(3, 16).bfloat16(), [1, 2], w13, w13, w13)


def test_the_operators_pass_opcheck():
    """Schemas, fake (meta) implementations and declared mutations agree with what the kernels do."""
    w13, w2 = native_swiglu_weights()
    x = torch.randn(3, 64)
    torch.library.opcheck(ops.int4_swiglu, (x, [1, 2], w13.codes, w13.scales, w13.shifts, w2.codes, w2.scales,
                                            w2.shifts, 32, 0))
    torch.library.opcheck(ops.int4_matmul, (x, [3, 0], w13.codes, w13.scales, w13.shifts, 32, 0))
    torch.library.opcheck(ops.route, (torch.randn(4, 16), torch.randn(2, 16), torch.randn(8, 16),
                                      torch.zeros(8, dtype=torch.float64), 1.0, 2, False, 3, 1, 0.5, False, 2.0))
    q, k_cache, v_cache = attention_case()
    table = torch.ones(3, 16)
    torch.library.opcheck(ops.rope_cache, (q, torch.randn(3, 2, 16), torch.randn(3, 2, 16), table, table,
                                           torch.tensor([5, 0, 7]), k_cache, v_cache))
    torch.library.opcheck(ops.decode_attention, (q, k_cache, v_cache, torch.tensor([2]), torch.tensor([[1, 4]]),
                                                 torch.tensor([2]), torch.empty_like(q)))
    torch.library.opcheck(ops.rms_norm, (torch.randn(3, 4, 16).bfloat16(), torch.randn(16).bfloat16(), 1e-6))
    torch.library.opcheck(ops.combine, (torch.randn(5, 16), torch.tensor([0, 2, 2, 1, 0]), torch.rand(5), 3))
    w13, w2 = torch.randn(2, 32, 16).bfloat16(), torch.randn(2, 16, 32).bfloat16()
    torch.library.opcheck(ops.bf16_swiglu, (torch.randn(3, 16).bfloat16(), [1, 2], w13, w13, w2))


def native_swiglu_weights():
    from lcc.backends.cpu.int4_native import pack, pack_gate_up

    g = torch.Generator().manual_seed(5)
    w1, w3, w2 = (quantize(torch.randn(2, *shape, generator=g), 32, symmetric=True)
                  for shape in ((32, 64), (32, 64), (64, 32)))
    return pack_gate_up(w1, w3), pack(w2)


def test_torch_compile_traces_through_an_operator():
    """fullgraph: a graph break (an operator without a fake implementation) would be an error."""
    w13, w2 = native_swiglu_weights()

    def block(x):
        y = ops.int4_swiglu(torch.nn.functional.rms_norm(x, (64,)), [2, 2], w13.codes, w13.scales, w13.shifts,
                            w2.codes, w2.scales, w2.shifts, 32, 0)
        return x + y

    x = torch.randn(4, 64)
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(x), block(x))
