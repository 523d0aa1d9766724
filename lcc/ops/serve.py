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

from lcc.backends.cpu.attention import decode_attention as native_decode_attention
from lcc.backends.cpu.attention import rope_cache as native_rope_cache
from lcc.backends.cpu.routing import route as native_route
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
                 dtype: torch.dtype, device: torch.device | None = None) -> KVCache:
        shape = (blocks, block_size, kv_heads, head_dim)
        return cls({i: torch.zeros(shape, dtype=dtype, device=device) for i in layers},
                   {i: torch.zeros(shape, dtype=dtype, device=device) for i in layers}, block_size)

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
    mask: torch.Tensor  # bool [n, context]: causal


@dataclass
class Decodes:
    """The step's single-token sequences, attended to together: their rows, and their context slots padded
    to the longest context (`valid` marks the real ones)."""

    rows: torch.Tensor  # int64 [n]
    slots: torch.Tensor  # int64 [n, longest]
    valid: torch.Tensor  # bool [n, 1, 1, longest]
    lengths: torch.Tensor  # int64 [n]: each context's length (its valid slots come first)


@dataclass
class StepBatch:
    cache: KVCache
    positions: torch.Tensor  # int64 [T]
    slots: torch.Tensor  # int64 [T]: where each token's key and value go
    seqs: list[SeqRows]  # sequences with several tokens in the step (prefill chunks), one by one
    decodes: Decodes | None  # sequences with one token, together
    last_rows: torch.Tensor  # int64: the rows whose logits the step returns (a sequence's last token)
    attention_kernel: str = "torch"  # the plan's serving.attention_kernel
    _rope: dict[tuple[int, float, torch.dtype], tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)

    @classmethod
    def build(cls, cache: KVCache, parts: list[tuple[int, int, list[int], bool]],
              attention_kernel: str = "torch") -> StepBatch:
        """`parts`: per sequence (first position, tokens, block table, wants logits); `attention_kernel`: what
        runs the attention (the plan's serving.attention_kernel)."""
        bs = cache.block_size
        positions, slots, seqs, last, single = [], [], [], [], []
        row = 0
        for first, n, table, wants in parts:
            context = first + n
            if n == 1:
                single.append((row, first, table))
                positions.append(first)
                slots.append(table[first // bs] * bs + first % bs)
            else:
                table_t = torch.tensor(table, dtype=torch.int64)
                pos = torch.arange(context, dtype=torch.int64)
                all_slots = table_t[pos // bs] * bs + pos % bs
                positions += range(first, context)
                slots += all_slots[first:].tolist()
                mask = pos.unsqueeze(0) <= torch.arange(first, context).unsqueeze(1)
                seqs.append(SeqRows(row, n, all_slots, mask))
            if wants:
                last.append(row + n - 1)
            row += n
        decodes = None
        if single:  # slots of every position of each context, padded to the longest (slot 0, masked out)
            longest = max(first for _, first, _ in single) + 1
            n_blocks = -(-longest // bs)
            rows = [table[:n_blocks] for _, _, table in single]
            tables = torch.tensor([r + [0] * (n_blocks - len(r)) for r in rows], dtype=torch.int64)
            pos = torch.arange(longest)
            lengths = torch.tensor([first + 1 for _, first, _ in single], dtype=torch.int64)
            valid = pos.unsqueeze(0) < lengths.unsqueeze(1)
            padded = torch.where(valid, tables[:, pos // bs] * bs + pos % bs, 0)
            decodes = Decodes(torch.tensor([r for r, _, _ in single], dtype=torch.int64), padded,
                              valid.view(len(single), 1, 1, longest), lengths)
        as_tensor = (lambda xs: torch.tensor(xs, dtype=torch.int64))  # noqa: E731
        return cls(cache, as_tensor(positions), as_tensor(slots), seqs, decodes, as_tensor(last), attention_kernel)

    def to(self, device: torch.device) -> StepBatch:
        """The batch's index tensors on `device` (built on the host, moved in one go)."""
        if device.type == "cpu":
            return self

        def move(t: torch.Tensor) -> torch.Tensor:
            return t.to(device, non_blocking=True)

        seqs = [SeqRows(s.start, s.n, move(s.context_slots), move(s.mask)) for s in self.seqs]
        d = self.decodes
        decodes = None if d is None else Decodes(move(d.rows), move(d.slots), move(d.valid), move(d.lengths))
        return StepBatch(self.cache, move(self.positions), move(self.slots), seqs, decodes, move(self.last_rows),
                         self.attention_kernel)

    @property
    def tokens(self) -> int:
        return int(self.positions.numel())

    def rope(self, head_dim: int, theta: float, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin at the step's positions, `[T, 1, head_dim]` in `dtype` (once per step)."""
        key = (head_dim, theta, dtype)
        if key not in self._rope:  # interleaved as _rotate takes them: (cos, cos), (-sin, sin) per pair
            cos, sin = (t.to(dtype) for t in rope_at(self.positions, head_dim, theta))
            both = torch.stack((cos, cos), -1).flatten(-2).unsqueeze(1)
            signed = torch.stack((-sin, sin), -1).flatten(-2).unsqueeze(1)
            self._rope[key] = (both, signed)
        return self._rope[key]


def _rotate(x_THd: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The reference model's rotary embedding (lcc.model.transformer.apply_rope) on [T, heads, head_dim],
    bit for bit, in fewer kernels: with each pair (x1, x2) swapped, x * (cos, cos) + swap(x) * (-sin, sin)
    gives x1 cos - x2 sin and x2 cos + x1 sin, the same products summed (negation and the order of an
    addition are exact)."""
    swapped = x_THd.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)
    return x_THd * cos + swapped * sin


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: StepBatch, layer: int, head_dim: int,
                    theta: float) -> torch.Tensor:
    """RoPE at each token's position, the step's keys and values written into the layer's cache, then
    causal attention of each sequence's tokens over its context (this rank's heads: counts from widths)."""
    T = q.shape[1]
    q = q.reshape(T, q.shape[-1] // head_dim, head_dim)
    k = k.reshape(T, k.shape[-1] // head_dim, head_dim)
    v = v.reshape(T, v.shape[-1] // head_dim, head_dim)
    n_kv = k.shape[1]
    k_cache = batch.cache.k[layer].view(-1, n_kv, head_dim)
    v_cache = batch.cache.v[layer].view(-1, n_kv, head_dim)
    native = batch.attention_kernel == "native_cpu"
    if native:  # rotary embeddings and the cache writes in lcc's kernel, in float32
        q = native_rope_cache(q, k, v, *batch.rope(head_dim, theta, torch.float32), batch.slots, k_cache, v_cache)
    else:
        cos, sin = batch.rope(head_dim, theta, q.dtype)
        q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
        k_cache.index_copy_(0, batch.slots, k.to(k_cache.dtype))
        v_cache.index_copy_(0, batch.slots, v.to(v_cache.dtype))
    out = q.new_empty(q.shape)
    gqa = q.shape[1] != n_kv
    d = batch.decodes
    if d is not None and native:  # read in place from the paged cache
        native_decode_attention(q, k_cache, v_cache, d.rows, d.slots, d.lengths, out)
    elif d is not None:  # one attention over every single-token sequence, contexts padded and masked
        n, longest = d.slots.shape
        ks = k_cache.index_select(0, d.slots.view(-1)).view(n, longest, n_kv, head_dim).transpose(1, 2)
        vs = v_cache.index_select(0, d.slots.view(-1)).view(n, longest, n_kv, head_dim).transpose(1, 2)
        qs = q.index_select(0, d.rows).unsqueeze(2)  # [n, heads, 1, d]
        o = F.scaled_dot_product_attention(qs, ks.to(q.dtype), vs.to(q.dtype), attn_mask=d.valid, enable_gqa=gqa)
        out.index_copy_(0, d.rows, o.squeeze(2))
    for seq in batch.seqs:
        qs = q[seq.start:seq.start + seq.n].transpose(0, 1).unsqueeze(0)  # [1, heads, n, d]
        ks = k_cache.index_select(0, seq.context_slots).to(q.dtype).transpose(0, 1).unsqueeze(0)
        vs = v_cache.index_select(0, seq.context_slots).to(q.dtype).transpose(0, 1).unsqueeze(0)
        o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=seq.mask, enable_gqa=gqa)
        out[seq.start:seq.start + seq.n] = o[0].transpose(0, 1)
    return out.reshape(1, T, q.shape[1] * head_dim)


def last_positions(x: torch.Tensor, batch: StepBatch) -> torch.Tensor:
    """The rows of `[1, T, D]` whose logits the step returns: `[n, D]`."""
    return x.reshape(-1, x.shape[-1]).index_select(0, batch.last_rows)


def serving_routing(cfg: Routing) -> Routing:
    """Routing as serving runs it: no losses to compute, and dropless (capacity limits are a training
    device: a served token is never dropped)."""
    balance = cfg.balance.model_copy(update={"aux_loss_coef": 0.0, "z_loss_coef": 0.0})
    return cfg.model_copy(update={"capacity_factor": None, "balance": balance})


DENSE_ELEMENTS = 1 << 20  # router weights (experts x D) up to which every expert's logit costs less than choosing


class RoutingTables(RouterMath):
    """A router's frozen weights prepared once at load (`serve.routing_tables`): centroids normalised, the
    router weights as group-major blocks `[groups, experts per group, D]` already in the routing dtype
    (float32, or float64), and the load bias.

    `route` is the reference routing (lcc.model.routing) with serving's settings: no losses, no capacity.
    The kept groups' logits come group-major, as in the reference; for a small router (at most
    DENSE_ELEMENTS weights: small-moe's 16 x 512) one matmul over all experts costs less than sorting
    tokens by group, and the kept groups' logits are read from it. The decisions are the reference's up
    to the rounding of those dot products. With `native` (the plan's serving.routing_kernel native_cpu) a
    float32 or bfloat16 decision runs in lcc's native CPU router (lcc.backends.cpu.routing) instead."""

    def __init__(self, centroids_GD: torch.Tensor, weight_ED: torch.Tensor, bias_E: torch.Tensor, cfg: Routing,
                 native: bool = False):
        wide = torch.promote_types(weight_ED.dtype, torch.float32)
        super().__init__(centroids_GD.to(wide), weight_ED.to(wide).contiguous(), bias_E, serving_routing(cfg))
        self.unit_centroids_GD = F.normalize(self.centroids_GD, dim=-1)
        self.w_GPD = self.weight_ED.view(self.n_groups, self.per_group, -1)
        self.dtype = wide
        self.native = native and wide == torch.float32  # lcc's native CPU router (plan.serving.routing_kernel)

    def route(self, x_TD: torch.Tensor) -> RouteResult:
        if self.native and x_TD.device.type == "cpu" and x_TD.dtype in (torch.float32, torch.bfloat16):
            return native_route(x_TD, self.unit_centroids_GD, self.weight_ED, self.bias_E, self.cfg)
        return super().route(x_TD)

    def unit_centroids(self, dtype: torch.dtype) -> torch.Tensor:
        return self.unit_centroids_GD if dtype == self.dtype else super().unit_centroids(dtype)

    def group_weights(self, dtype: torch.dtype) -> torch.Tensor:
        return self.w_GPD if dtype == self.dtype else super().group_weights(dtype)

    def expert_logits(self, x_TD: torch.Tensor, kept_TGk: torch.Tensor) -> torch.Tensor:
        if self.weight_ED.numel() > DENSE_ELEMENTS or x_TD.dtype != self.dtype:
            return super().expert_logits(x_TD, kept_TGk)
        T, Gk = kept_TGk.shape
        z_TGP = (x_TD @ self.weight_ED.T).view(T, self.n_groups, self.per_group)
        return z_TGP.gather(1, kept_TGk.unsqueeze(-1).expand(T, Gk, self.per_group))


def route_tables(x_TD: torch.Tensor, tables: RoutingTables) -> RouteResult:
    """Hierarchical routing of this rank's tokens from precomputed tables."""
    return tables.route(x_TD)
