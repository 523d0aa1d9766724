"""What the routers chose, brought to rank 0: each returned row's experts per MoE layer (for requests that ask
for `return_routed_experts`), and the tokens routed to each expert (the server's per-expert counters).

Every rank's programs note both as they route (`ServeContext.observe`, or the native decode layer): the
experts of the rows whose logits the step returns (when the step's plan asks for them) and a running count
per expert. Under tensor parallelism each tp rank routes its own consecutive share of the step's tokens
(`ops.split_tokens`: the first `tokens % tp` ranks one more), so every rank reports what it routed. At
world 1 everything is already on rank 0; otherwise the ranks send to rank 0 after the step's logits, in a
fixed order every rank derives from the step's plan:

    routes (StepPlan.routes):  per dp rank with returned rows, per pipeline rank holding MoE layers, per tp
                               rank routing some of those rows: int64 [its rows, its MoE layers, k]
                               (-1: a slot the token does not use)
    counts (StepPlan.counts):  per dp rank, per pipeline rank holding MoE layers, per tp rank: int64 [its
                               MoE layers, experts], the counts since the last collection (the sender then
                               starts again from zero)
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist


def moe_sites(rank: Any, pp_rank: int) -> list[tuple[int, str]]:
    """The MoE layers pipeline rank `pp_rank` holds, in layer order: (layer, site)."""
    model = rank.spec.model
    layers = sorted(i for r in rank.plan.roles_of(pp_rank) for i in range(*r.layers) if model.is_moe(i))
    return [(i, f"layers.{i}.ffn") for i in layers]


def tp_share(rows: int, tp: int, tp_rank: int) -> tuple[int, int]:
    """The rows [start, end) of a step's `rows` tokens that tp rank `tp_rank` routes (as ops.split_tokens)."""
    base, extra = divmod(rows, tp)
    start = tp_rank * base + min(tp_rank, extra)
    return start, start + base + (tp_rank < extra)


def returned_rows(last_rows: torch.Tensor, rows: int, tp: int, tp_rank: int) -> torch.Tensor:
    """Of the step's returned rows (`last_rows`, ascending, of `rows` tokens), those tp rank `tp_rank` routes,
    as indices into its share."""
    start, end = tp_share(rows, tp, tp_rank)
    return last_rows[(last_rows >= start) & (last_rows < end)] - start


def _last_rows(parts: list[Any]) -> list[int]:
    """The returned rows of a dp rank's part of a step plan (each sequence's tokens in turn)."""
    out, at = [], 0
    for p in parts:
        at += len(p.tokens)
        if p.wants_logits:
            out.append(at - 1)
    return out


def _holders(rank: Any) -> list[tuple[int, list[tuple[int, str]]]]:
    """The pipeline ranks holding MoE layers, with their layers."""
    held = [(p, moe_sites(rank, p)) for p in range(rank.mesh.sizes["pp"])]
    return [(p, sites) for p, sites in held if sites]


def gather_routes(rank: Any, plan: Any) -> list[torch.Tensor | None]:
    """At rank 0: each dp rank's returned rows' experts, int64 `[rows, MoE layers, k]` in layer order (None for
    a dp rank that returns no rows); other ranks send theirs and get an empty list."""
    me, mesh = rank.mesh.rank, rank.mesh
    k, tp = rank.spec.routing.k.max, mesh.sizes["tp"]
    out: list[torch.Tensor | None] = []
    for dp, parts in enumerate(plan.parts):
        last = torch.tensor(_last_rows(parts), dtype=torch.int64)
        rows = sum(len(p.tokens) for p in parts)
        pieces: list[tuple[list[int], torch.Tensor]] = []
        for p, sites in _holders(rank):
            shares = []
            for t in range(tp):
                n = len(returned_rows(last, rows, tp, t))
                src = mesh.rank_of[(p, dp, t)]
                if n == 0 or me not in (0, src):
                    continue
                if me == src:
                    local = torch.stack([rank.ctx.routes[s] for _, s in sites], dim=1)
                    if me != 0:
                        dist.send(local.contiguous(), dst=0)
                        continue
                else:
                    local = torch.empty((n, len(sites), k), dtype=torch.int64)
                    dist.recv(local, src=src)
                shares.append(local)
            if shares:
                pieces.append(([i for i, _ in sites], torch.cat(shares)))
        if me == 0:
            out.append(_in_layer_order(pieces) if len(last) else None)
    return out


def _in_layer_order(pieces: list[tuple[list[int], torch.Tensor]]) -> torch.Tensor:
    layers = [i for held, _ in pieces for i in held]
    both = torch.cat([t for _, t in pieces], dim=1)
    return both[:, sorted(range(len(layers)), key=layers.__getitem__)]


def gather_counts(rank: Any, into: dict[str, torch.Tensor]) -> None:
    """Rank 0 adds the counts the other reporting ranks hold to `into` (by site), which they then zero;
    rank 0's own stay in its context. Every rank calls it in the same step."""
    me, mesh = rank.mesh.rank, rank.mesh
    E = rank.spec.model.moe.n_experts
    for dp in range(mesh.sizes["dp"]):
        for p, sites in _holders(rank):
            for t in range(mesh.sizes["tp"]):
                src = mesh.rank_of[(p, dp, t)]
                if src == 0 or me not in (0, src):
                    continue
                if me == src:
                    counts = [rank.ctx.expert_counts[s] for _, s in sites]
                    dist.send(torch.stack(counts).cpu(), dst=0)
                    for c in counts:
                        c.zero_()
                else:
                    buf = torch.empty((len(sites), E), dtype=torch.int64)
                    dist.recv(buf, src=src)
                    for (_, s), row in zip(sites, buf, strict=True):
                        into[s] += row


def routed_lists(chosen: torch.Tensor) -> list[list[int]]:
    """One returned row's experts `[MoE layers, k]` as lists per layer, the unused slots left out."""
    return [[e for e in layer if e >= 0] for layer in chosen.tolist()]
