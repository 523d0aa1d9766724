"""A decode step's layer in one call (serve plans with `serving.decode_kernel: native_cpu`): the program's
`decode_forward` calls `decode_layer` for each MoE layer when every sequence of the step has one token.

lcc's native CPU kernels run the layer's operators one after another without Python between them
(csrc/ops.cpp, `lcc::decode_layer`): the RMS norm, the q, k and v projections, the norms of the queries
and keys where the model has them, rotary embeddings and the cache writes, decode attention over the paged
cache, the output projection and the residual, the MoE block's norm, routing from the tables (the slots
sorted by expert), the experts (int4, or unquantised bfloat16), the combine and the residual: the same
operators as the layer's lines in `forward`, in the same order, on the same tensors, so the layer's output
is theirs bit for bit (the dense kernel's row limit, `lcc.backends.cpu.dense.MAX_ROWS`, included). The
kernel also counts the tokens routed to each expert and, when the step asks for them, returns each token's
experts, as `ServeContext.observe` does on the op-by-op path.
"""

from __future__ import annotations

from typing import Any

import torch

from lcc.backends.cpu import dense
from lcc.backends.cpu.dense import NativeDenseExperts
from lcc.backends.cpu.int4_native import AMX_MIN_ROWS
from lcc.backends.cpu.native import load


def decode_layer(x: torch.Tensor, P: dict[str, Any], ctx: Any, layer: int, head_dim: int, theta: float,
                 eps: float) -> torch.Tensor:
    """Layer `layer` of a decode-only step: x `[1, T, D]` (the residual stream) -> the layer's output."""
    batch = ctx.batch
    d = batch.decodes
    if d is None or batch.seqs or d.rows.numel() != x.shape[1]:
        raise ValueError("decode_layer runs a step of decode tokens only (every sequence one token)")
    key = ("decode_layer", layer, head_dim, eps)
    fixed = ctx.prepared.get(key)
    if fixed is None:  # the layer's weights, caches and routing settings: the same every step
        fixed = ctx.prepared[key] = _fixed(P, ctx, layer, head_dim, eps)
    attention, routing, experts = fixed
    both, sign = batch.rope(head_dim, theta, torch.float32)
    T, D = x.shape[1], x.shape[2]
    site = f"layers.{layer}.ffn"
    counts = ctx.expert_counts.get(site)
    if counts is None:
        counts = ctx.expert_counts[site] = torch.zeros(routing[4].shape[0], dtype=torch.int64)
    routed = None if ctx.routes is None else torch.empty((T, routing[9]), dtype=torch.int64)
    out = load().ops.decode_layer(x.view(T, D), *attention, both, sign, batch.slots, *routing[:2], d.rows, d.slots,
                                  d.lengths, *routing[2:], *experts, routed, counts)
    if routed is not None:  # every row of a decode step returns its logits
        ctx.routes[site] = routed
    return out.view(1, T, D)


def _fixed(P: dict[str, Any], ctx: Any, layer: int, head_dim: int, eps: float) -> tuple[tuple, tuple, tuple]:
    """decode_layer's arguments that do not change between steps, in the operator's order: the attention's
    (up to the rotary tables), the caches then the MoE block's norm and routing, and the experts'."""
    site = f"layers.{layer}"
    tables = ctx.tables[f"{site}.ffn.router"]
    cfg = tables.cfg
    q_norm, k_norm = P.get(f"{site}.attn.q_norm.weight"), P.get(f"{site}.attn.k_norm.weight")
    attention = (P[f"{site}.attn_norm.weight"].weight, *(P[f"{site}.attn.w{p}.weight"].weight for p in "qkvo"),
                 None if q_norm is None else q_norm.weight, None if k_norm is None else k_norm.weight, head_dim, eps)
    k_cache, v_cache = ctx.batch.cache.k[layer], ctx.batch.cache.v[layer]
    kv = k_cache.shape[-2]
    bias = tables.bias_E.to(torch.float64) if cfg.experts.selection == "least_loaded" else None
    routing = (k_cache.view(-1, kv, head_dim), v_cache.view(-1, kv, head_dim), P[f"{site}.ffn_norm.weight"].weight,
               tables.unit_centroids_GD, tables.weight_ED, bias, cfg.groups.temperature, cfg.groups.top,
               cfg.score == "softmax", cfg.k.max, cfg.k.min, cfg.k.threshold, cfg.renormalize, cfg.gate_scale)
    w1, w3, w2 = (P[f"{site}.ffn.experts.{w}"] for w in ("w1_EFD", "w3_EFD", "w2_EDF"))
    if isinstance(w1, NativeDenseExperts):  # unquantised bfloat16 experts, as dense.swiglu_segments runs them
        experts = (None,) * 6 + (0, 0, w1.weight, w3.weight, w2.weight, dense.MAX_ROWS)
    else:  # int4, w1 holding the gate and up projections (int4_native.pack_gate_up)
        experts = (w1.codes, w1.scales, w1.shifts, w2.codes, w2.scales, w2.shifts, w1.group_size,
                   AMX_MIN_ROWS if load().amx else 0, None, None, None, dense.MAX_ROWS)
    return attention, routing, experts
