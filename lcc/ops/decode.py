"""A decode step's layer in one call (serve plans with `serving.decode_kernel: native_cpu`): the program's
`decode_forward` calls `decode_layer` for each MoE layer when every sequence of the step has one token.

lcc's native CPU kernels run the layer's operators one after another without Python between them
(csrc/ops.cpp, `lcc::decode_layer`): the RMS norm, the q, k and v projections, the norms of the queries
and keys where the model has them, rotary embeddings and the cache writes, decode attention over the paged
cache, the output projection and the residual, the MoE block's norm, routing from the tables (the slots
sorted by expert), the int4 experts, the combine and the residual: the same operators as the layer's
lines in `forward`, in the same order, on the same tensors, so the layer's output is theirs bit for bit.
"""

from __future__ import annotations

from typing import Any

import torch

from lcc.backends.cpu.int4_native import AMX_MIN_ROWS
from lcc.backends.cpu.native import load


def decode_layer(x: torch.Tensor, P: dict[str, Any], ctx: Any, layer: int, head_dim: int, theta: float,
                 eps: float) -> torch.Tensor:
    """Layer `layer` of a decode-only step: x `[1, T, D]` (the residual stream) -> the layer's output."""
    batch, site = ctx.batch, f"layers.{layer}"
    d = batch.decodes
    if d is None or batch.seqs or d.rows.numel() != x.shape[1]:
        raise ValueError("decode_layer runs a step of decode tokens only (every sequence one token)")
    tables = ctx.tables[f"{site}.ffn.router"]
    cfg = tables.cfg
    both, sign = batch.rope(head_dim, theta, torch.float32)
    k_cache, v_cache = batch.cache.k[layer], batch.cache.v[layer]
    kv = k_cache.shape[-2]
    q_norm, k_norm = P.get(f"{site}.attn.q_norm.weight"), P.get(f"{site}.attn.k_norm.weight")
    w13, w2 = P[f"{site}.ffn.experts.w1_EFD"], P[f"{site}.ffn.experts.w2_EDF"]
    bias = tables.bias_E if cfg.experts.selection == "least_loaded" else None
    if bias is not None and bias.dtype != torch.float64:
        bias = bias.to(torch.float64)
    T, D = x.shape[1], x.shape[2]
    lib = load()
    out = lib.ops.decode_layer(
        x.view(T, D), P[f"{site}.attn_norm.weight"].weight, P[f"{site}.attn.wq.weight"].weight,
        P[f"{site}.attn.wk.weight"].weight, P[f"{site}.attn.wv.weight"].weight, P[f"{site}.attn.wo.weight"].weight,
        None if q_norm is None else q_norm.weight, None if k_norm is None else k_norm.weight, head_dim, eps,
        both, sign, batch.slots, k_cache.view(-1, kv, head_dim), v_cache.view(-1, kv, head_dim), d.rows, d.slots,
        d.lengths, P[f"{site}.ffn_norm.weight"].weight, tables.unit_centroids_GD, tables.weight_ED, bias,
        cfg.groups.temperature, cfg.groups.top, cfg.score == "softmax", cfg.k.max, cfg.k.min, cfg.k.threshold,
        cfg.renormalize, cfg.gate_scale, w13.codes, w13.scales, w13.shifts, w2.codes, w2.scales, w2.shifts,
        w13.group_size, AMX_MIN_ROWS if lib.amx else 0)
    return out.view(1, T, D)
