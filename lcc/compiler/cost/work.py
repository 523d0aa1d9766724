"""Work per layer: FLOPs, weight bytes read, activation bytes and collective bytes, per micro-batch on one rank.

Everything here is per layer so that the pipeline partition can balance stages by it and the report can
sum it per pipeline rank. Conventions (docs/cost-model.md): a multiply-add is 2 FLOPs; causal attention
counts half of the s x s scores; backward costs twice the forward; routed experts use k.expected; forward
and backward each read a layer's weights from device memory once, and backward writes and accumulates its
whole local gradients.
"""

from __future__ import annotations

from dataclasses import dataclass

from lcc.compiler.cost.exchange import exchange_passes, hierarchical_bytes
from lcc.compiler.cost.memory import STATE_BYTES, LayerShape, MoEShape, dense_layer_activations, moe_activations
from lcc.compiler.cost.params import embedding_params, layer_params, local_kv_heads, local_layer_params
from lcc.compiler.cost.traffic import all_gather, all_reduce, all_to_all
from lcc.spec.models import DTYPE_BYTES, Spec


def act_bytes(spec: Spec) -> int:
    return DTYPE_BYTES[spec.train.dtype]


def router_bytes(spec: Spec) -> int:
    return max(4, act_bytes(spec))


def microbatch_sequences(spec: Spec) -> int:
    par = spec.parallelism
    return spec.train.global_batch // (par.dp * par.pipeline.microbatches)


def microbatch_tokens(spec: Spec) -> int:
    return microbatch_sequences(spec) * spec.train.seq_len


def attention_core_flops(spec: Spec) -> float:
    """Forward FLOPs per token of QK^T and AV under a causal mask (half the s x s scores)."""
    att = spec.model.attention
    return 2 * 2 * att.n_heads * att.head_dim * spec.train.seq_len / 2


def router_flops(spec: Spec) -> float:
    moe, routing = spec.model.moe, spec.routing
    kept = routing.groups.top * moe.experts_per_group
    return 2 * spec.model.d_model * (moe.n_groups + kept)


def layer_forward_flops(spec: Spec, layer: int) -> float:
    """Forward FLOPs per token of one layer (whole layer, not per rank)."""
    p = layer_params(spec, layer)
    flops = 2 * p.attention + attention_core_flops(spec) + 2 * p.ffn
    if spec.model.is_moe(layer):
        expert = p.experts // spec.model.moe.n_experts
        flops += router_flops(spec) + 2 * p.shared + 2 * spec.routing.k.planned * expert
    return flops


def busiest_ep_share(spec: Spec) -> float:
    """The busiest expert-parallel rank's routed slots over the mean rank's, from the planned imbalance I
    (`routing.balance.expected_imbalance`: the busiest expert's load over the mean): that rank holds the
    busiest expert and an even share of the rest, `(I + (E/ep - 1) (E - I) / (E - 1)) / (E/ep)`; 1 with even
    load or a single expert-parallel rank, I with one expert a rank."""
    moe = spec.model.moe
    imbalance = spec.routing.balance.expected_imbalance if spec.routing is not None else 1.0
    if moe is None or imbalance <= 1.0 or spec.parallelism.ep <= 1 or moe.n_experts <= 1:
        return 1.0
    n, local = moe.n_experts, moe.n_experts / spec.parallelism.ep
    imbalance = min(imbalance, n)
    return (imbalance + (local - 1) * (n - imbalance) / (n - 1)) / local


def recompute_flops(spec: Spec, layer: int) -> float:
    """Extra forward FLOPs per token that activation checkpointing spends on one layer."""
    policy = spec.parallelism.activation_checkpointing
    if policy == "full":
        return layer_forward_flops(spec, layer)
    if policy == "selective":
        return attention_core_flops(spec) + (router_flops(spec) if spec.model.is_moe(layer) else 0.0)
    return 0.0


def head_forward_flops(spec: Spec) -> float:
    return 2 * spec.model.vocab_size * spec.model.d_model


def halves(spec: Spec, layer: int) -> int:
    """How many times the experts of one MoE layer run per micro-batch: twice with `expert_overlap` (each half
    of the tokens through its own grouped matmuls, lcc.ops.overlap), else once."""
    par = spec.parallelism
    return 2 if par.expert_overlap and par.ep > 1 and spec.model.is_moe(layer) else 1


def expert_reads(spec: Spec, layer: int, share: float = 1.0) -> float:
    """Parameters of one rank's routed experts that one forward over `share` of a micro-batch's tokens reads:
    those the tokens reach, at most one per routed slot (`tokens / tp * k.expected` slots arrive on each EP
    rank under uniform routing)."""
    _, experts = local_layer_params(spec, layer)
    if not experts:
        return 0.0
    local_experts = spec.model.moe.n_experts // spec.parallelism.ep
    slots = share * microbatch_tokens(spec) / spec.parallelism.tp * spec.routing.k.planned
    return experts * min(1.0, slots / local_experts)


def expert_forward(spec: Spec, layer: int, share: float = 1.0) -> tuple[float, float]:
    """(FLOPs, weight bytes read) of one rank's routed experts in the forward of one MoE layer over `share` of a
    micro-batch: the slots that arrive on the rank times 2 per multiply-add of an expert, and expert_reads."""
    if not spec.model.is_moe(layer):
        return 0.0, 0.0
    expert = layer_params(spec, layer).experts // spec.model.moe.n_experts
    slots = share * microbatch_tokens(spec) / spec.parallelism.tp * spec.routing.k.planned
    return 2 * slots * expert, expert_reads(spec, layer, share) * STATE_BYTES[spec.train.dtype].weights


def layer_weight_reads(spec: Spec, layer: int) -> float:
    """Bytes of weights one rank reads from device memory for one layer and one micro-batch.

    Forward and backward each read the rank's weights of the layer once (full checkpointing reads them once
    more, to recompute the forward); of the routed experts only those that tokens reach (expert_reads), once
    per half of the tokens with `expert_overlap` (each half's grouped matmul reads them again).
    """
    dense, _ = local_layer_params(spec, layer)
    n = halves(spec, layer)
    experts = n * expert_reads(spec, layer, 1 / n)
    passes = 3 if spec.parallelism.activation_checkpointing == "full" else 2
    return passes * (dense + experts) * STATE_BYTES[spec.train.dtype].weights


GRAD_PASSES = 3  # a gradient written by backward, then read and written again as it is accumulated


def layer_grad_bytes(spec: Spec, layer: int) -> float:
    """Bytes of gradient traffic one rank's backward makes for one layer and one micro-batch: each local
    parameter's gradient comes out whole (a grouped matmul's weight gradient is the whole stack of local
    experts, those no token reached included), is written, then read and written again as it is added to
    the gradient accumulated so far. With `expert_overlap` each half's grouped matmul writes the whole stack
    of expert gradients, and both are accumulated: twice the experts' traffic."""
    dense, experts = local_layer_params(spec, layer)
    return GRAD_PASSES * (dense + halves(spec, layer) * experts) * STATE_BYTES[spec.train.dtype].grads


def head_weight_reads(spec: Spec) -> float:
    """Bytes of LM-head weights one rank reads per micro-batch (its vocabulary slice, forward and backward)."""
    return 2 * embedding_params(spec) / spec.parallelism.tp * STATE_BYTES[spec.train.dtype].weights


def layer_shape(spec: Spec, layer: int) -> LayerShape:
    """One layer as the generated programs run it: RMSNorm keeping its normalised tensor, attention through
    PyTorch's fused kernel (flash on CPU and CUDA: its output and log-sum-exp kept, no probabilities)."""
    m, par = spec.model, spec.parallelism
    att = m.attention
    ffn = m.moe.n_shared_experts * m.moe.expert_d_ff if m.is_moe(layer) else m.ffn.d_ff
    return LayerShape(
        seq=spec.train.seq_len, batch=microbatch_sequences(spec), d_model=m.d_model, n_heads=att.n_heads,
        q_local=att.n_heads * att.head_dim / par.tp, kv_local=local_kv_heads(spec) * att.head_dim,
        ffn_local=ffn / par.tp, scores_stored=False, tp=par.tp, sequence_parallel=par.sequence_parallel,
        act_bytes=act_bytes(spec), norm_keeps_normalised=True, kernel_keeps_output=True,
        qk_norm=att.qk_norm != "none",
    )


def moe_shape(spec: Spec) -> MoEShape:
    moe, routing = spec.model.moe, spec.routing
    return MoEShape(
        tokens=microbatch_tokens(spec), d_model=spec.model.d_model, expert_d_ff=moe.expert_d_ff,
        k_slots=routing.k.max, n_groups=moe.n_groups, kept_logits=routing.groups.top * moe.experts_per_group,
        tp=spec.parallelism.tp, act_bytes=act_bytes(spec), router_bytes=router_bytes(spec),
        top_groups=routing.groups.top,
    )


def layer_activations(spec: Spec, layer: int, recompute: str | None = None) -> float:
    """Bytes one layer keeps for backward per micro-batch on one rank."""
    policy = recompute or spec.parallelism.activation_checkpointing
    total = dense_layer_activations(layer_shape(spec, layer), policy)
    if spec.model.is_moe(layer):
        total += moe_activations(moe_shape(spec), policy)
    return total


@dataclass(frozen=True)
class LayerComm:
    """Bytes one rank sends for one layer and one micro-batch, forward + backward (+ recomputation). The expert
    exchange's bytes are all it sends, on both kinds of link (`CostModel.ep_links` splits them)."""

    tp: float
    ep: float


def layer_comm(spec: Spec, layer: int) -> LayerComm:
    par = spec.parallelism
    tp, ab = par.tp, act_bytes(spec)
    policy = par.activation_checkpointing
    forwards = 2 if policy == "full" else 1  # recomputation repeats the forward's collectives
    tokens = microbatch_tokens(spec)
    activation = tokens * spec.model.d_model * ab
    # each all-reduce (or reduce-scatter + all-gather with sequence parallelism) runs once forward and
    # once backward; attention always has one; a dense FFN or shared experts another
    reductions = 1
    if not spec.model.is_moe(layer) or spec.model.moe.n_shared_experts:
        reductions += 1
    tp_bytes = (forwards + 1) * reductions * all_reduce(activation, tp)
    ep_bytes = 0.0
    if spec.model.is_moe(layer):
        if not par.sequence_parallel:  # gather the tp ranks' token slices after combine (and in backward)
            tp_bytes += (forwards + 1) * all_gather(activation, tp)
        if par.expert_exchange == "hierarchical":  # a token once per node, forwarded inside it
            ep_bytes = hierarchical_bytes(spec, tokens / tp, spec.model.d_model * ab, router_bytes(spec)).total
        else:  # every slot to its expert's rank
            slots = tokens / tp * spec.routing.k.planned * spec.model.d_model * ab
            a2a, _ = exchange_passes(policy)  # dispatch+combine, f+b, and recomputation's
            ep_bytes = a2a * all_to_all(slots, par.ep)
    return LayerComm(tp_bytes, ep_bytes)


@dataclass(frozen=True)
class LayerCollectives:
    """Collectives one rank issues for one layer and one micro-batch (forward, backward, recomputation), by
    what they serve. Their fixed costs, not their bytes: `CostModel.layer_latency`."""

    tp: int
    ep: int  # the expert exchange's (between nodes, for a hierarchical exchange)
    zero_gathers: int  # ZeRO-3: the layer's parameters gathered (forward, backward), per micro-batch
    zero_scatters: int  # and its gradients reduce-scattered (every backward, or the step's last only)
    ep_intra: int = 0  # a hierarchical exchange's all-to-alls inside the node


def layer_collectives(spec: Spec, layer: int) -> LayerCollectives:
    """The collectives the compiler's passes insert (docs/cost-model.md, "Fixed costs"):
    - tp: each tensor-parallel block (attention; a dense FFN or shared experts) all-reduces once forward
      and once backward; with sequence parallelism it gathers in and reduce-scatters out, backward the
      reverse plus the input's regather; an MoE layer without sequence parallelism gathers the tp ranks'
      tokens after combine (and its gradient in backward); full recomputation repeats the forward's;
    - ep: an MoE layer exchanges counts, dispatches and combines forward, combines and dispatches
      backward; recomputation repeats part (selective: counts and dispatch) or all of the forward's. A
      hierarchical exchange (lcc.ops.node_exchange) makes between nodes (`ep`) the node plan's three (counts,
      each slot's row index and gate) and the gates' gradient, and dispatch and combine forward and
      backward; inside the node (`ep_intra`) the node's counts and dispatch and combine forward and backward;
      recomputation repeats the plans and dispatch (selective: 4 between nodes, 2 inside) or all of the
      forward's (5 and 3). The overlapped exchange (lcc.ops.overlap) makes each half's: counts, dispatch and
      combine forward, combine and dispatch backward (10); recomputation repeats the forward's 6;
    - ZeRO-3: a gather forward, a gather and a reduce-scatter backward, per axis the layer is sharded over.
    """
    par, model = spec.parallelism, spec.model
    policy = par.activation_checkpointing
    moe = model.is_moe(layer)
    tp = 0
    if par.tp > 1:
        blocks = 1 + int(not moe or model.moe.n_shared_experts > 0)
        if par.sequence_parallel:
            tp = blocks * (6 if policy == "full" else 5)
        else:
            tp = (blocks + int(moe)) * (3 if policy == "full" else 2)
    ep = ep_intra = 0
    if moe and par.ep > 1 and par.expert_overlap:  # each half's counts, dispatch, combine; the two backward
        ep = 10 + {"none": 0, "selective": 4, "full": 6}[policy]
    elif moe and par.ep > 1:
        ep = 5 + {"none": 0, "selective": 2, "full": 3}[policy]
        if par.expert_exchange == "hierarchical":
            ep, ep_intra = 8 + {"none": 0, "selective": 4, "full": 5}[policy], ep
    axes = int(par.dp > 1) + int(moe and par.edp > 1) if par.zero >= 3 else 0
    return LayerCollectives(tp, ep, 2 * axes, axes, ep_intra)


def edge_collectives(spec: Spec, first: bool, last: bool) -> int:
    """Collectives of the embedding (first stage) and of the LM head and loss (last stage), one micro-batch:
    tensor parallelism's vocabulary-parallel reductions (and sequence parallelism's gathers), ZeRO-3's
    gathers and reduce-scatters."""
    par = spec.parallelism
    sp = int(par.sequence_parallel)
    count = 0
    if par.tp > 1:
        count += first * (1 + sp) + last * (4 + 2 * sp)
    if par.zero >= 3 and par.dp > 1:
        count += 3 * (int(first) + int(last))
    return count
