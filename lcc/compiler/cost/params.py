"""Parameter counts: global (per component) and local to a rank (what it stores before ZeRO).

Conventions (docs/cost-model.md): the total counts every parameter once, the embedding and the LM head
included (once if tied). Active parameters per token are those a token's forward pass reads: every dense
parameter (embedding and head in full), the group centroids, the router rows of the kept groups only
(group-major routing never reads the others), and k routed experts per MoE layer.
Load biases are buffers, not parameters.
"""

from __future__ import annotations

from dataclasses import dataclass

from lcc.spec.models import Spec


@dataclass(frozen=True)
class LayerParams:
    """One layer's parameters, split by how they are sharded."""

    attention: int  # q, k, v, o projections
    norms: int  # the two RMSNorm weights, and the query and key norms
    ffn: int  # dense SwiGLU FFN (0 in MoE layers)
    router: int  # group centroids + router weights
    shared: int  # shared experts
    experts: int  # all routed experts of the layer

    @property
    def dense(self) -> int:
        return self.attention + self.norms + self.ffn + self.router + self.shared

    @property
    def total(self) -> int:
        return self.dense + self.experts


def expert_params(spec: Spec) -> int:
    """Parameters of one routed expert (SwiGLU: w1, w3: d_model -> expert_d_ff; w2 back)."""
    moe = spec.model.moe
    return 3 * spec.model.d_model * moe.expert_d_ff if moe else 0


def layer_params(spec: Spec, layer: int) -> LayerParams:
    m = spec.model
    att = m.attention
    d = m.d_model
    attention = d * att.n_heads * att.head_dim * 2 + d * att.n_kv_heads * att.head_dim * 2
    # the two block norms, and the query and key norms (one weight per head dim, or per query and key width)
    norms = 2 * d + {"none": 0, "head": 2 * att.head_dim, "all": (att.n_heads + att.n_kv_heads) * att.head_dim}[
        att.qk_norm]
    if not m.is_moe(layer):
        return LayerParams(attention, norms, 3 * d * m.ffn.d_ff, 0, 0, 0)
    moe = m.moe
    router = (moe.n_groups + moe.n_experts) * d
    shared = moe.n_shared_experts * expert_params(spec)
    return LayerParams(attention, norms, 0, router, shared, moe.n_experts * expert_params(spec))


def embedding_params(spec: Spec) -> int:
    return spec.model.vocab_size * spec.model.d_model


def head_params(spec: Spec) -> int:
    """LM head plus the final norm (the head matrix is not counted again when tied)."""
    return (0 if spec.model.tie_embeddings else embedding_params(spec)) + spec.model.d_model


def total_params(spec: Spec) -> int:
    return embedding_params(spec) + head_params(spec) + sum(layer_params(spec, i).total
                                                            for i in range(spec.model.n_layers))


def active_params(spec: Spec, k: float) -> float:
    """Parameters that touch one token when it uses k routed experts per MoE layer."""
    moe = spec.model.moe
    if moe is None:
        return float(total_params(spec))
    per_layer = k * expert_params(spec) + spec.routing.groups.top * moe.experts_per_group * spec.model.d_model
    unread = sum(layer_params(spec, i).experts + moe.n_experts * spec.model.d_model for i in spec.model.moe_layers)
    return total_params(spec) - unread + len(spec.model.moe_layers) * per_layer


@dataclass(frozen=True)
class LocalParams:
    """Parameters a rank of one pipeline rank stores, before ZeRO: dense (ZeRO over dp) and experts
    (ZeRO over edp). `largest_layer_*` is what ZeRO-3 must gather at once."""

    dense: int
    experts: int
    largest_layer_dense: int
    largest_layer_experts: int


def local_kv_heads(spec: Spec) -> int:
    """kv heads per TP rank: split when tp divides them, else one head replicated over tp / n_kv ranks."""
    n_kv, tp = spec.model.attention.n_kv_heads, spec.parallelism.tp
    return n_kv // tp if n_kv % tp == 0 else 1


def local_layer_params(spec: Spec, layer: int) -> tuple[int, int]:
    """(dense, expert) parameters of one layer on one rank."""
    m, par = spec.model, spec.parallelism
    att, d, tp = m.attention, m.d_model, par.tp
    p = layer_params(spec, layer)
    attention = 2 * d * att.n_heads * att.head_dim // tp + 2 * d * local_kv_heads(spec) * att.head_dim
    norms = p.norms
    if att.qk_norm == "all":  # split over tp with the heads, as the projections are
        norms += (att.n_heads * att.head_dim // tp + local_kv_heads(spec) * att.head_dim
                  - (att.n_heads + att.n_kv_heads) * att.head_dim)
    dense = attention + norms + p.ffn // tp + p.router + p.shared // tp
    experts = p.experts // par.ep
    return dense, experts


def local_params(spec: Spec, layers: list[int], first: bool, last: bool) -> LocalParams:
    tp = spec.parallelism.tp
    per_layer = [local_layer_params(spec, i) for i in layers]
    dense = sum(p[0] for p in per_layer)
    if first:
        dense += embedding_params(spec) // tp
    if last:
        dense += spec.model.d_model
        if not spec.model.tie_embeddings or not first:  # a tied head on another stage keeps its own copy
            dense += embedding_params(spec) // tp
    return LocalParams(dense, sum(p[1] for p in per_layer),
                       max((p[0] for p in per_layer), default=0), max((p[1] for p in per_layer), default=0))
