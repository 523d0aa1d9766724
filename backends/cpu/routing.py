"""Routing decisions on CPU through lcc's native kernel (lcc.backends.cpu.native, csrc/routing.cpp): what
lcc.ops.serve.RoutingTables decides with serving's settings (no losses, no capacity), one call per layer
and step instead of some forty small tensor operations."""

from __future__ import annotations

import torch
from lcc.backends.cpu.native import load

from lcc.model.routing import RouteResult
from lcc.spec.models import Routing


def route(x_TD: torch.Tensor, unit_centroids_GD: torch.Tensor, weight_ED: torch.Tensor, bias_E: torch.Tensor,
          cfg: Routing) -> RouteResult:
    """x, centroids (normalised) and router weights (group-major) in float32; the bias in float64."""
    if cfg.capacity_factor is not None or cfg.balance.aux_loss_coef or cfg.balance.z_loss_coef:
        raise ValueError("the native router decides as serving routes: no capacity, no losses")
    tensors = (x_TD, unit_centroids_GD, weight_ED)
    if any(t.dtype != torch.float32 for t in tensors):
        raise ValueError("the native router takes float32 tokens, centroids and router weights")
    x_TD, c, w = (t.contiguous() for t in tensors)
    T, D = x_TD.shape
    G, E, K = c.shape[0], w.shape[0], cfg.k.max
    if E % G or cfg.groups.top > G or cfg.groups.top * (E // G) < K:
        raise ValueError(f"{E} experts in {G} groups: keeping {cfg.groups.top} groups cannot give {K} experts")
    least_loaded = cfg.experts.selection == "least_loaded"
    bias = bias_E.to(torch.float64).contiguous() if least_loaded else None
    experts = torch.empty(T, K, dtype=torch.int64)
    gates = torch.empty(T, K, dtype=torch.float32)
    mask = torch.empty(T, K, dtype=torch.bool)
    k_T = torch.empty(T, dtype=torch.int64)
    counts = torch.empty(E, dtype=torch.int64)
    load().lib.lcc_route(x_TD.data_ptr(), T, D, c.data_ptr(), G, w.data_ptr(), E,
                         None if bias is None else bias.data_ptr(), cfg.groups.temperature, cfg.groups.top,
                         int(cfg.score == "softmax"), K, cfg.k.min, cfg.k.threshold, int(cfg.renormalize),
                         cfg.gate_scale, experts.data_ptr(), gates.data_ptr(), mask.data_ptr(), k_T.data_ptr(),
                         counts.data_ptr(), torch.get_num_threads())
    zero = gates.new_zeros(())
    return RouteResult(experts, gates, mask, k_T, counts.to(torch.float64), torch.zeros((), dtype=torch.int64), zero,
                       zero, counts_E=counts)
