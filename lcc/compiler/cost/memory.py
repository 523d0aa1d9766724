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
    norm_keeps_normalised: bool = False  # RMSNorm as lcc computes it: x * rsqrt(mean x^2) kept for the weight's product
    kernel_keeps_output: bool = False  # a fused attention kernel (SDPA flash) keeps its output and float32 log-sum-exp
    qk_norm: bool = False  # query and key norms (each keeps its input and normalised tensor)


def dense_layer_activations(x: LayerShape, recompute: str = "none") -> float:
    """Bytes of activations a layer keeps for backward, per micro-batch, on one TP rank: its attention block
    and its MLP block (`attention_activations`, `mlp_activations`).

    With the GPT shape (gelu, 4h MLP, MHA, dropout, stored scores, 2-byte activations) this is exactly
    Korthikanti et al.'s `sbh (34 + 5as/h)`, `sbh (10 + 24/t + 5as/(ht))` with TP and
    `sbh/t (34 + 5as/h)` with sequence parallelism; full recomputation keeps `2sbh` (the layer input).
    """
    if recompute == "full":
        return x.seq * x.batch * x.d_model * x.act_bytes * _outside_share(x)
    return attention_activations(x, recompute) + mlp_activations(x)


def _outside_share(x: LayerShape) -> float:
    """The share of the sequence a tensor outside the TP region holds on one rank."""
    return 1 / x.tp if x.sequence_parallel else 1.0


def outside_activations(x: LayerShape) -> float:
    """Bytes one block keeps outside the TP region per micro-batch: the block's input (the residual stream)
    and its norm's output (the TP region's input), the norm's normalised tensor where it keeps one, GPT's
    dropout mask."""
    per = x.d_model * ((2 + x.norm_keeps_normalised) * x.act_bytes + (1 if x.dropout else 0))
    return x.seq * x.batch * per * _outside_share(x)


def attention_activations(x: LayerShape, recompute: str = "none") -> float:
    """Bytes the attention block keeps per micro-batch on one TP rank: outside the TP region its input and
    its norm's tensors; inside it q, k, v and the output projection's input, the kernel's own output and
    log-sum-exp where it keeps them (not with `selective`, which recomputes the attention core), the query
    and key norms' tensors, and the attention probabilities where they are stored (GPT: `5as^2b/t`, scores,
    dropout mask and its output)."""
    s, b, t, ab = x.seq, x.batch, x.tp, x.act_bytes
    tokens = s * b
    inside = tokens * ab * (2 * x.q_local + 2 * x.kv_local)
    if x.qk_norm:
        inside += tokens * ab * 2 * (x.q_local + x.kv_local)
    if x.kernel_keeps_output and recompute != "selective":
        inside += tokens * (ab * x.q_local + 4 * x.n_heads / t)
    scores = 0.0
    if x.scores_stored and recompute != "selective":
        per = b * x.n_heads / t * s * s  # a s^2 b / t probabilities
        scores = per * (ab + (1 + ab if x.dropout else 0))
    return outside_activations(x) + inside + scores


def mlp_activations(x: LayerShape) -> float:
    """Bytes the MLP block (the dense FFN or the shared experts) keeps per micro-batch on one TP rank: outside
    the TP region its input and its norm's tensors; inside SwiGLU's `w1`, `w3`, `silu` and product
    (`4 d_ff / tp`) or the GPT MLP's `2 x 4h / t`, and GPT's dropout mask."""
    tokens = x.seq * x.batch
    f = x.ffn_local
    inside = tokens * x.act_bytes * (4 * f if x.mlp == "swiglu" else 2 * f)
    return outside_activations(x) + inside


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
    top_groups: int = 0  # routing.groups.top: groups kept per token (0: as many as there are)


def router_activations(x: MoEShape) -> float:
    """Bytes the router keeps per micro-batch on one rank, on `tokens / tp` tokens at the router's precision:
    the normalised token (cosine affinities); the token again for each kept group where only some groups are
    kept (the group-major logits gather the token's rows); its float32 copy where activations are narrower;
    group affinities, kept logits and probabilities."""
    tokens = x.tokens / x.tp
    rows = 1 + (x.top_groups if 0 < x.top_groups < x.n_groups else 0) + (x.router_bytes > x.act_bytes)
    return tokens * x.router_bytes * (rows * x.d_model + x.n_groups + 2 * x.kept_logits)


def moe_activations(x: MoEShape, recompute: str = "none") -> float:
    """Bytes the routed-expert part of an MoE layer keeps for backward, per micro-batch, on one rank.

    Router: `router_activations`. Dispatch: the rows the experts receive (k slots per token, grouped by
    expert). Experts: SwiGLU's hidden tensors (4 x expert_d_ff per slot). Combine: the experts' outputs,
    returned, kept for the gate gradient, and their gated copy that the index-add keeps (2 x d_model per
    slot). `selective` recomputes routing and dispatch: the dispatched rows, the recomputation's output,
    stay.
    """
    if recompute == "full":
        return 0.0
    slots = x.tokens / x.tp * x.k_slots
    kept = slots * (x.d_model + 4 * x.expert_d_ff + 2 * x.d_model) * x.act_bytes
    return kept if recompute == "selective" else kept + router_activations(x)
