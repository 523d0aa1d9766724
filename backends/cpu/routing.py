"""Routing decisions on CPU through lcc's native kernel (lcc.backends.cpu.native, csrc/routing.cpp): what
lcc.ops.serve.RoutingTables decides with serving's settings (no losses, no capacity), one call per layer
and step instead of some forty small tensor operations. The call also sorts the used slots by expert (the
dispatch's segments: each slot's token and gate), as lcc.model.moe.dispatch's stable sort orders them."""

from __future__ import annotations

import torch
from lcc.backends.cpu.native import load

from lcc.model.routing import RouteResult
from lcc.spec.models import Routing

# serving drops no slot and computes no loss: the results share these (read-only) zeros
NONE_DROPPED = torch.zeros((), dtype=torch.int64)
NO_LOSS = torch.zeros((), dtype=torch.float32)


def route(x_TD: torch.Tensor, unit_centroids_GD: torch.Tensor, weight_ED: torch.Tensor, bias_E: torch.Tensor,
          cfg: Routing) -> RouteResult:
    """x in float32 or bfloat16; centroids (normalised) and router weights (group-major) in float32; the bias in
    float64."""
    if cfg.capacity_factor is not None or cfg.balance.aux_loss_coef or cfg.balance.z_loss_coef:
        raise ValueError("the native router decides as serving routes: no capacity, no losses")
    if cfg.groups.node_limited:
        raise ValueError("the native router keeps every set of groups: node-limited routing runs in PyTorch")
    least_loaded = cfg.experts.selection == "least_loaded"
    if least_loaded and bias_E.dtype != torch.float64:
        bias_E = bias_E.to(torch.float64)
    experts, gates, mask, k_T, counts, load_E, token_S, gate_S = load().ops.route(
        x_TD, unit_centroids_GD, weight_ED, bias_E if least_loaded else None,
        cfg.groups.temperature, cfg.groups.top, cfg.score == "softmax", cfg.k.max, cfg.k.min, cfg.k.threshold,
        cfg.renormalize, cfg.gate_scale)
    return RouteResult(experts, gates, mask, k_T, load_E, NONE_DROPPED, NO_LOSS, NO_LOSS, counts_E=counts,
                       slots_S=(token_S, gate_S))
