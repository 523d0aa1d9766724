"""Memory formulas: model states under ZeRO (Rajbhandari et al. 2020) and activations per layer
(Korthikanti et al. 2022, generalised to GQA, SwiGLU and MoE layers). Pure functions of numbers."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class StateBytes:
    """Bytes per parameter for weights, gradients and AdamW optimizer states at a training dtype."""

    weights: int
    grads: int
    optimizer: int


STATE_BYTES = {
    "float32": StateBytes(4, 4, 8),  # fp32 weights + grads, Adam m and v
    "bfloat16": StateBytes(2, 2, 12),  # ZeRO paper's mixed precision: 2 + 2 + K=12 (fp32 master, m, v)
    "float64": StateBytes(8, 8, 16),
}


@dataclass(frozen=True)
class ModelStates:
    weights: float
    grads: float
    optimizer: float

    def __add__(self, other: ModelStates) -> ModelStates:
        return ModelStates(self.weights + other.weights, self.grads + other.grads, self.optimizer + other.optimizer)

    @property
    def total(self) -> float:
        return self.weights + self.grads + self.optimizer


def _shard(n: int, ways: int) -> int:
    return -(-n // ways)  # uneven shards: the largest one


def model_states(params: int, dtype: str, zero: int, ways: int) -> ModelStates:
    """Bytes of one rank's share of `params` parameters replicated over `ways` ranks at ZeRO `zero`:
    stage 1 shards optimizer states, 2 also gradients, 3 also the weights."""
    b = STATE_BYTES[dtype]
    return ModelStates(
        weights=b.weights * (_shard(params, ways) if zero >= 3 else params),
        grads=b.grads * (_shard(params, ways) if zero >= 2 else params),
        optimizer=b.optimizer * (_shard(params, ways) if zero >= 1 else params),
    )


@dataclass(frozen=True)
class LayerShape:
    """What one transformer layer's activation memory depends on (per micro-batch on one rank)."""

    seq: int  # s
    batch: int  # b, sequences per micro-batch
    d_model: int  # h
    n_heads: int  # a
    q_local: float  # n_heads * head_dim / tp: query (and attention output) width on this rank
    kv_local: float  # key/value width on this rank (kv heads are split, or replicated when fewer than tp)
    ffn_local: float  # d_ff / tp of the dense (or shared-expert) FFN on this rank; 0 if none
    mlp: str = "swiglu"  # "swiglu" (w1, w3, silu, product) | "gelu" (4h GPT MLP)
    dropout: bool = False  # GPT-style dropout masks after attention probs, attention and MLP outputs
    scores_stored: bool = True  # attention probabilities materialised (no flash attention)
    tp: int = 1
    sequence_parallel: bool = False
    act_bytes: int = 2


def dense_layer_activations(x: LayerShape, recompute: str = "none") -> float:
    """Bytes of activations a layer keeps for backward, per micro-batch, on one TP rank.

    With the GPT shape (gelu, 4h MLP, MHA, dropout, stored scores, 2-byte activations) this is exactly
    Korthikanti et al.'s `sbh (34 + 5as/h)`, `sbh (10 + 24/t + 5as/(ht))` with TP and
    `sbh/t (34 + 5as/h)` with sequence parallelism; full recomputation keeps `2sbh` (the layer input).
    """
    s, b, h, t, ab = x.seq, x.batch, x.d_model, x.tp, x.act_bytes
    tokens = s * b
    rep = 1 / t if x.sequence_parallel else 1.0  # tensors outside the TP region
    if recompute == "full":
        return tokens * h * ab * rep
    # outside the TP region: two norm inputs, the QKV and FFN inputs (norm outputs), dropout masks
    outside = tokens * h * (4 * ab + (2 if x.dropout else 0)) * rep
    # inside the TP region: q, k, v, the attention output (o-proj input), the MLP's hidden tensors
    inside = tokens * ab * (2 * x.q_local + 2 * x.kv_local)
    f = x.ffn_local
    inside += tokens * ab * (4 * f if x.mlp == "swiglu" else 2 * f)
    scores = 0.0
    if x.scores_stored and recompute != "selective":
        per = b * x.n_heads / t * s * s  # a s^2 b / t probabilities
        scores = per * (ab + (1 + ab if x.dropout else 0))
    return outside + inside + scores


@dataclass(frozen=True)
class MoEShape:
    """The MoE part of a layer: tokens are split over tp before dispatch."""

    tokens: int  # tokens of the micro-batch on this TP group
    d_model: int
    expert_d_ff: int
    k_slots: int  # static k.max slots per token
    n_groups: int
    kept_logits: int  # routing.groups.top * experts per group
    tp: int
    act_bytes: int
    router_bytes: int  # router math runs in float32 or wider


def moe_activations(x: MoEShape, recompute: str = "none") -> float:
    """Bytes the routed-expert part of an MoE layer keeps for backward, per micro-batch, on one rank.

    Router: normalised token, group affinities, kept logits and probabilities. Dispatch: the permuted
    copies of tokens (k slots each). Experts: SwiGLU hidden tensors (4 x expert_d_ff per slot) and the
    expert outputs kept for the gate gradient. `selective` recomputes routing and dispatch.
    """
    if recompute == "full":
        return 0.0
    tokens = x.tokens / x.tp
    slots = tokens * x.k_slots
    router = tokens * (x.d_model * x.act_bytes + (x.n_groups + 2 * x.kept_logits) * x.router_bytes)
    dispatch = slots * x.d_model * x.act_bytes
    experts = slots * (4 * x.expert_d_ff + x.d_model) * x.act_bytes
    if recompute == "selective":
        return experts
    return router + dispatch + experts
