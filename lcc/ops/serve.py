"""Serve plans' ops: attention over a paged KV cache, the last position of each sequence, and routing from
tables precomputed when the weights are loaded.

A serve step runs one flat batch of T tokens, `[1, T]`: the prefill chunks and decode tokens of several
sequences one after another. `StepBatch` says where each sequence's tokens are, their positions, and where
their keys and values go in the cache: a rank's cache holds, per layer of its stages, `blocks` fixed-size
blocks of `block_size` token slots for its key/value heads; a sequence's block table lists its blocks, so
that token position p sits in slot `table[p // block_size] * block_size + p % block_size`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from lcc.model.routing import RouteResult, RouterMath
from lcc.model.transformer import rope_at
from lcc.spec.models import Routing


@dataclass
class KVCache:
    """Keys and values of the layers of a rank's stages: `[blocks, block_size, kv_heads, head_dim]` each."""

    k: dict[int, torch.Tensor]
    v: dict[int, torch.Tensor]
    block_size: int

    @classmethod
    def allocate(cls, layers: list[int], blocks: int, block_size: int, kv_heads: int, head_dim: int,
                 dtype: torch.dtype) -> KVCache:
        shape = (blocks, block_size, kv_heads, head_dim)
        return cls({i: torch.zeros(shape, dtype=dtype) for i in layers},
                   {i: torch.zeros(shape, dtype=dtype) for i in layers}, block_size)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.k.values(), *self.v.values()))


@dataclass
class SeqRows:
    """One sequence's part of the step: rows [start, start + n) of the batch, at positions
    [context - n, context), attending to the `context` slots of its keys and values."""

    start: int
    n: int
    context_slots: torch.Tensor  # int64 [context]: its slots, position order
    mask: torch.Tensor | None  # bool [n, context] (None for one token: it sees its whole context)


@dataclass
class StepBatch:
    cache: KVCache
    positions: torch.Tensor  # int64 [T]
    slots: torch.Tensor  # int64 [T]: where each token's key and value go
    seqs: list[SeqRows]
    last_rows: torch.Tensor  # int64: the rows whose logits the step returns (a sequence's last token)
    _rope: dict[tuple[int, float, torch.dtype], tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)

    @classmethod
    def build(cls, cache: KVCache, parts: list[tuple[int, int, list[int], bool]]) -> StepBatch:
        """`parts`: per sequence (first position, tokens, block table, wants logits)."""
        bs = cache.block_size
        positions, slots, seqs, last = [], [], [], []
        row = 0
        for first, n, table, wants in parts:
            context = first + n
            table_t = torch.tensor(table, dtype=torch.int64)
            pos = torch.arange(context, dtype=torch.int64)
            all_slots = table_t[pos // bs] * bs + pos % bs
            positions.append(pos[first:])
            slots.append(all_slots[first:])
            mask = None
            if n > 1:
                mask = torch.arange(context).unsqueeze(0) <= torch.arange(first, context).unsqueeze(1)
            seqs.append(SeqRows(row, n, all_slots, mask))
            if wants:
                last.append(row + n - 1)
            row += n
        cat = (lambda xs: torch.cat(xs) if xs else torch.zeros(0, dtype=torch.int64))  # noqa: E731
        return cls(cache, cat(positions), cat(slots), seqs, torch.tensor(last, dtype=torch.int64))

    @property
    def tokens(self) -> int:
        return int(self.positions.numel())

    def rope(self, head_dim: int, theta: float, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin at the step's positions, `[T, 1, head_dim / 2]` in `dtype` (once per step)."""
        key = (head_dim, theta, dtype)
        if key not in self._rope:
            cos, sin = rope_at(self.positions, head_dim, theta)
            self._rope[key] = (cos.to(dtype).unsqueeze(1), sin.to(dtype).unsqueeze(1))
        return self._rope[key]


def _rotate(x_THd: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The reference model's rotary embedding (lcc.model.transformer.apply_rope) on [T, heads, head_dim]."""
    x1, x2 = x_THd[..., 0::2], x_THd[..., 1::2]
    return torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: StepBatch, layer: int, head_dim: int,
                    theta: float) -> torch.Tensor:
    """RoPE at each token's position, the step's keys and values written into the layer's cache, then
    causal attention of each sequence's tokens over its context (this rank's heads: counts from widths)."""
    T = q.shape[1]
    q = q.reshape(T, -1, head_dim)
    k = k.reshape(T, -1, head_dim)
    v = v.reshape(T, -1, head_dim)
    cos, sin = batch.rope(head_dim, theta, q.dtype)
    q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
    n_kv = k.shape[1]
    k_cache = batch.cache.k[layer].view(-1, n_kv, head_dim)
    v_cache = batch.cache.v[layer].view(-1, n_kv, head_dim)
    k_cache.index_copy_(0, batch.slots, k.to(k_cache.dtype))
    v_cache.index_copy_(0, batch.slots, v.to(v_cache.dtype))
    out = q.new_empty(q.shape)
    gqa = q.shape[1] != n_kv
    for seq in batch.seqs:
        qs = q[seq.start:seq.start + seq.n].transpose(0, 1).unsqueeze(0)  # [1, heads, n, d]
        ks = k_cache.index_select(0, seq.context_slots).to(q.dtype).transpose(0, 1).unsqueeze(0)
        vs = v_cache.index_select(0, seq.context_slots).to(q.dtype).transpose(0, 1).unsqueeze(0)
        o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=seq.mask, enable_gqa=gqa)
        out[seq.start:seq.start + seq.n] = o[0].transpose(0, 1)
    return out.reshape(1, T, -1)


def last_positions(x: torch.Tensor, batch: StepBatch) -> torch.Tensor:
    """The rows of `[1, T, D]` whose logits the step returns: `[n, D]`."""
    return x.reshape(-1, x.shape[-1]).index_select(0, batch.last_rows)


def serving_routing(cfg: Routing) -> Routing:
    """Routing as serving runs it: no losses to compute, and dropless (capacity limits are a training
    device: a served token is never dropped)."""
    balance = cfg.balance.model_copy(update={"aux_loss_coef": 0.0, "z_loss_coef": 0.0})
    return cfg.model_copy(update={"capacity_factor": None, "balance": balance})


class RoutingTables(RouterMath):
    """A router's frozen weights prepared once at load (`serve.routing_tables`): centroids normalised, the
    router weights as group-major blocks `[groups, experts per group, D]` already in the routing dtype
    (float32, or float64), the load bias as it will be gathered. The decisions equal `RouterMath`'s on the
    same weights bit for bit: the same arithmetic, less of it per call."""

    def __init__(self, centroids_GD: torch.Tensor, weight_ED: torch.Tensor, bias_E: torch.Tensor, cfg: Routing):
        wide = torch.promote_types(weight_ED.dtype, torch.float32)
        super().__init__(centroids_GD.to(wide), weight_ED.to(wide).contiguous(), bias_E, serving_routing(cfg))
        self.unit_centroids_GD = F.normalize(self.centroids_GD, dim=-1)
        self.w_GPD = self.weight_ED.view(self.n_groups, self.per_group, -1)
        self.dtype = wide

    def unit_centroids(self, dtype: torch.dtype) -> torch.Tensor:
        return self.unit_centroids_GD if dtype == self.dtype else super().unit_centroids(dtype)

    def group_weights(self, dtype: torch.dtype) -> torch.Tensor:
        return self.w_GPD if dtype == self.dtype else super().group_weights(dtype)


def route_tables(x_TD: torch.Tensor, tables: RoutingTables) -> RouteResult:
    """Hierarchical routing of this rank's tokens from precomputed tables."""
    return tables.route(x_TD)
