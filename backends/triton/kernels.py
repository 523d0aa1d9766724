"""The two grouped GEMMs of the fused MoE (Triton). Each program computes one block of `BLOCK_M` aligned
rows (one expert, `align.Alignment`) against `BLOCK_N` output columns, looping over the input dimension in
steps of `BLOCK_K`.

Weights come as bf16 / float32 stacks `[E, out, in]`, or as lcc's int4 format (`INT4`): codes two per byte
`[E, out, in / 2]` (even input in the low nibble), a float16 scale per `GROUP` inputs `[E, out, in / GROUP]`
and, when asymmetric (`HAS_ZEROS`), a uint8 zero-point per group; the tile is dequantised in registers,
`(code - zero) * scale` (zero 8 when symmetric), never in memory. `BLOCK_K` divides `GROUP`, so a tile
has one scale per output column. Products accumulate in float32; float32 activations multiply in IEEE
float32 (`IEEE`), never tf32. Under Triton's interpreter (`UPCAST`), 16-bit tiles are multiplied as their
exact float32 values, and dequantised int4 tiles stay in float32 (the interpreter rounds float32 to bfloat16
other than to nearest even).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _weight_tile(w_ptr, s_ptr, z_ptr, e, offs_n, n_mask, k0, K, stride_we, stride_wn, stride_se, stride_sn,
                 INT4: tl.constexpr, HAS_ZEROS: tl.constexpr, GROUP: tl.constexpr, dtype: tl.constexpr,
                 UPCAST: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """The weight tile `[BLOCK_N, BLOCK_K]` of expert e (int64) at inputs k0..., in the activations' dtype. Int4
    rows are read as their `BLOCK_K / 2` contiguous bytes and split into low and high nibbles in registers (no
    mask along k: K is a multiple of GROUP, which BLOCK_K divides, so the loads stay 16 bytes wide)."""
    rows = w_ptr + e * stride_we + offs_n[:, None] * stride_wn
    if INT4:
        offs_b = k0 // 2 + tl.arange(0, BLOCK_K // 2)
        byte = tl.load(rows + offs_b[None, :], mask=n_mask[:, None], other=0)  # K: a multiple of GROUP
        code = tl.join(byte & 0xF, byte >> 4).reshape(BLOCK_N, BLOCK_K).to(tl.float32)  # input 2j low, 2j + 1 high
        g = e * stride_se + offs_n * stride_sn + k0 // GROUP
        scale = tl.load(s_ptr + g, mask=n_mask, other=0.0).to(tl.float32)
        if HAS_ZEROS:
            zero = tl.load(z_ptr + g, mask=n_mask, other=0).to(tl.float32)
        else:
            zero = tl.full((BLOCK_N,), 8.0, tl.float32)
        w = (code - zero[:, None]) * scale[:, None]
        if UPCAST:
            return w
        return w.to(dtype)
    else:
        offs_k = k0 + tl.arange(0, BLOCK_K)
        return tl.load(rows + offs_k[None, :], mask=n_mask[:, None] & (offs_k < K)[None, :], other=0.0)


@triton.jit
def _dot(a, b, acc, IEEE: tl.constexpr, UPCAST: tl.constexpr):
    if UPCAST:  # Triton's interpreter (CPU tests) multiplies 16-bit floats wrongly; their float32 values are exact
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    elif IEEE:
        return tl.dot(a, b, acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc)


@triton.jit
def _row_tile(ptr, row, valid, stride, k0, K, BLOCK_K: tl.constexpr):
    """Rows `row` (int64) of a row-major matrix at columns k0..., zeros where not `valid` or past K."""
    offs_k = k0 + tl.arange(0, BLOCK_K)
    return tl.load(ptr + row[:, None] * stride + offs_k[None, :], mask=valid[:, None] & (offs_k < K)[None, :],
                   other=0.0)


@triton.jit
def _times_weight(a, acc, w_ptr, s_ptr, z_ptr, e, offs_n, n_mask, k0, K, stride_we, stride_wn, stride_se, stride_sn,
                  INT4: tl.constexpr, HAS_ZEROS: tl.constexpr, GROUP: tl.constexpr, IEEE: tl.constexpr,
                  UPCAST: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """acc + a @ (expert e's weight tile at k0...).T"""
    w = _weight_tile(w_ptr, s_ptr, z_ptr, e, offs_n, n_mask, k0, K, stride_we, stride_wn, stride_se, stride_sn,
                     INT4, HAS_ZEROS, GROUP, a.dtype, UPCAST, BLOCK_N, BLOCK_K)
    return _dot(a, tl.trans(w), acc, IEEE, UPCAST)


@triton.jit
def gate_up_swiglu_kernel(
    x_ptr, rows_ptr, block_expert_ptr, h_ptr,
    w1_ptr, s1_ptr, z1_ptr, w3_ptr, s3_ptr, z3_ptr,
    n_rows, N, K, top_k,
    stride_xm, stride_hm, stride_we, stride_wn, stride_se, stride_sn,
    INT4: tl.constexpr, HAS_ZEROS: tl.constexpr, GROUP: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """h[p] = silu(x[t] @ w1[e].T) * (x[t] @ w3[e].T) for the aligned rows p of a block (t = row // top_k,
    the row's token); padding rows compute 0. `h` is `[blocks * BLOCK_M, N]`, in x's dtype."""
    block = tl.program_id(0)
    e = tl.load(block_expert_ptr + block).to(tl.int64)  # 64-bit offsets: stacks and row counts past 2^31
    if e < 0:
        return
    offs_m = block * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    row = tl.load(rows_ptr + offs_m)
    valid = row < n_rows
    token = tl.where(valid, row // top_k, 0).to(tl.int64)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    gate = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    up = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for k0 in range(0, K, BLOCK_K):
        x = _row_tile(x_ptr, token, valid, stride_xm, k0, K, BLOCK_K)
        gate = _times_weight(x, gate, w1_ptr, s1_ptr, z1_ptr, e, offs_n, n_mask, k0, K, stride_we, stride_wn,
                             stride_se, stride_sn, INT4, HAS_ZEROS, GROUP, IEEE, UPCAST, BLOCK_N, BLOCK_K)
        up = _times_weight(x, up, w3_ptr, s3_ptr, z3_ptr, e, offs_n, n_mask, k0, K, stride_we, stride_wn,
                           stride_se, stride_sn, INT4, HAS_ZEROS, GROUP, IEEE, UPCAST, BLOCK_N, BLOCK_K)
    h = gate * tl.sigmoid(gate) * up
    tl.store(h_ptr + offs_m[:, None] * stride_hm + offs_n[None, :], h.to(h_ptr.dtype.element_ty),
             mask=n_mask[None, :])


@triton.jit
def down_kernel(
    h_ptr, rows_ptr, block_expert_ptr, out_ptr, weight_ptr,
    w2_ptr, s2_ptr, z2_ptr,
    n_rows, N, K,
    stride_hm, stride_om, stride_we, stride_wn, stride_se, stride_sn,
    INT4: tl.constexpr, HAS_ZEROS: tl.constexpr, GROUP: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """out[row] = (h[p] @ w2[e].T) (times the row's routing weight with `HAS_WEIGHT`) for the real rows p of
    a block, written at the routed row's own index; rows of skipped blocks are not written."""
    block = tl.program_id(0)
    e = tl.load(block_expert_ptr + block).to(tl.int64)
    if e < 0:
        return
    offs_m = block * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    row = tl.load(rows_ptr + offs_m).to(tl.int64)
    valid = row < n_rows
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for k0 in range(0, K, BLOCK_K):
        a = _row_tile(h_ptr, offs_m, valid, stride_hm, k0, K, BLOCK_K)
        acc = _times_weight(a, acc, w2_ptr, s2_ptr, z2_ptr, e, offs_n, n_mask, k0, K, stride_we, stride_wn,
                            stride_se, stride_sn, INT4, HAS_ZEROS, GROUP, IEEE, UPCAST, BLOCK_N, BLOCK_K)
    if HAS_WEIGHT:
        acc = acc * tl.load(weight_ptr + row, mask=valid, other=0.0).to(tl.float32)[:, None]
    tl.store(out_ptr + row[:, None] * stride_om + offs_n[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=valid[:, None] & n_mask[None, :])


@triton.jit
def align_segments_kernel(counts_ptr, rows_ptr, block_expert_ptr, n_experts, n_rows, n_blocks,
                          BLOCK_M: tl.constexpr, EXPERTS: tl.constexpr, CHUNK: tl.constexpr):
    """Alignment of rows already grouped by expert (`counts` rows each), in one program: block b belongs to
    the expert whose blocks span it, and holds that expert's rows from (b - its first block) * BLOCK_M on;
    padding positions hold `n_rows`, blocks past the last have expert -1. `EXPERTS`: a power of two at
    least n_experts."""
    e = tl.arange(0, EXPERTS)
    e_mask = e < n_experts
    counts = tl.load(counts_ptr + e, mask=e_mask, other=0).to(tl.int32)
    blocks = (counts + BLOCK_M - 1) // BLOCK_M
    block_end = tl.cumsum(blocks, 0)
    block_start = block_end - blocks
    row_end = tl.cumsum(counts, 0)
    row_start = row_end - counts
    j = tl.arange(0, BLOCK_M)
    for b0 in range(0, n_blocks, CHUNK):
        b = b0 + tl.arange(0, CHUNK)
        expert = tl.sum(((block_end[None, :] <= b[:, None]) & e_mask[None, :]).to(tl.int32), axis=1)
        real = (expert < n_experts) & (b < n_blocks)
        mine = e[None, :] == expert[:, None]  # [CHUNK, EXPERTS]: picks the block's expert's values
        first_block = tl.sum(tl.where(mine, block_start[None, :], 0), axis=1)
        first_row = tl.sum(tl.where(mine, row_start[None, :], 0), axis=1)
        last_row = tl.sum(tl.where(mine, row_end[None, :], 0), axis=1)
        row = first_row[:, None] + (b - first_block)[:, None] * BLOCK_M + j[None, :]
        row = tl.where(real[:, None] & (row < last_row[:, None]), row, n_rows)
        tl.store(rows_ptr + b[:, None] * BLOCK_M + j[None, :], row, mask=(b < n_blocks)[:, None])
        tl.store(block_expert_ptr + b, tl.where(real, expert, -1), mask=b < n_blocks)
