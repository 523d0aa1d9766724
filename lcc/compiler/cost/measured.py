"""Step time from achieved rates (`cluster.calibration`, lcc.compiler.cost.rates): each layer priced as the
operations the programs run, at the rate measured for their size, and each collective as the table gives it
for its kind, size and group (docs/cost-model.md, "Calibration").

Per micro-batch on one rank, a layer is:
- its linear layers (q, k, v, o; a dense FFN's or shared experts' three; the router's centroids and kept
  experts' rows) over the rows the rank holds, forward and backward (and the forward again where recomputed);
- the attention core over the rank's heads; the routed experts as one grouped block over the rank's experts
  (rows per expert: the slots that reach the busiest rank, `tokens / tp x k.expected` over `E / ep` experts
  times `busiest_ep_share`, 1 under even routing; the exchange's rows likewise);
- element-wise passes over its activations (norms, residuals, RoPE, SwiGLU's product, dispatch and combine)
  and its gradients (written, accumulated), at the measured streaming rate;
- a fixed cost per operation (`op_seconds`) for each operation its forward and backward issue (OPS);
- its collectives: tensor parallelism's, the expert exchange's and ZeRO-3's gathers and reduce-scatters,
  each at its size.

With `train.compile: inductor` the layer's traced part (its attention block, dense SwiGLU, norms and
residuals, with their operations and passes) costs the calibrated `compiled` ratio of its eager seconds; the
routing, the exchange and the experts run eagerly between compiled regions, as the programs run them.

After the pipeline: the gradient buckets' reductions (and ZeRO 1 and 2's gathers of updated pieces), the
step's four small reductions, the gradient norm and AdamW over the parameters this rank updates, and the
element-wise work around them (gradient shaping and clipping, bucket flattening).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from lcc.compiler.cost.exchange import exchange_passes
from lcc.compiler.cost.memory import STATE_BYTES
from lcc.compiler.cost.params import embedding_params, local_kv_heads, local_layer_params
from lcc.compiler.cost.rates import Rates
from lcc.compiler.cost.traffic import BUCKET_ELEMENTS
from lcc.compiler.cost.work import (
    act_bytes,
    busiest_ep_share,
    layer_collectives,
    microbatch_sequences,
    router_bytes,
)

if TYPE_CHECKING:
    from lcc.compiler.cost.model import CostModel, Role
    from lcc.spec.models import Spec

# Operations one layer's forward and backward dispatch to PyTorch on one rank (views included), counted in
# `lcc run train` of small-moe by benchmarks/op_counts.py (the mean over steps; it varies with the routing):
# an attention block with a SwiGLU FFN (dense or shared experts; the FFN's share estimated), and an MoE
# layer's routing, exchange and experts. A full recomputation dispatches the forward's
# again: RECOMPUTED of the whole.
OPS = {"attention": 253, "ffn": 40, "moe": 359, "step": 146}  # step: embedding, head, loss, optimizer
RECOMPUTED = 1 / 3
# Element-wise passes over a token's activations (d_model wide) in one forward: two norms (a read, a
# write and the statistics' read each), two residual additions (two reads, a write), RoPE over q and k.
ACTIVATION_PASSES = 12
# A SwiGLU's passes over its hidden width per row: silu (read, write) and the product (two reads, a write).
SWIGLU_PASSES = 5
# An MoE layer's passes per routed slot over d_model: gather to the send buffer, scatter back to tokens,
# the gate's product and the combine's accumulation.
SLOT_PASSES = 6
GRAD_PASSES = 3  # a gradient written by backward, then read and written again as it is accumulated


def layer_compute(cm: CostModel, rates: Rates, layer: int) -> float:
    """Seconds of one layer's compute for one micro-batch on one rank: forward, backward and recomputation. A
    plan that compiles its layers (`compiles`) runs their traced part at the calibrated `compiled` ratio."""
    traced, rest = _layer_parts(cm, rates, layer)
    return traced * (rates.compiled(cm.tokens) if compiles(cm.spec) else 1.0) + rest


def compiles(spec: Spec) -> bool:
    """Whether the plan compiles its layers with torch.compile (lcc.compiler.codegen.compiled_functions)."""
    return spec.train.compile == "inductor" and spec.train.dtype != "float64"


def _layer_parts(cm: CostModel, rates: Rates, layer: int) -> tuple[float, float]:
    """(traced, the rest): seconds of one layer's work that a compiled plan compiles (the attention block, a
    dense FFN's or shared experts' SwiGLU, the norms and residuals: the ops the op table traces) and of the
    rest (routing, the exchange and the experts, which run eagerly between compiled regions, and gradient
    accumulation)."""
    spec, par = cm.spec, cm.par
    m, att = spec.model, spec.model.attention
    policy = par.activation_checkpointing
    tokens = cm.tokens
    ab = act_bytes(spec)
    q_local = att.n_heads * att.head_dim // par.tp
    kv_local = local_kv_heads(spec) * att.head_dim
    recompute_all = policy == "full"

    def linear(rows: float, inner: float, outer: float) -> float:
        t = rates.linear(rows, inner, outer)
        return t + (rates.linear(rows, inner, outer, backward=False) if recompute_all else 0.0)

    traced = (linear(tokens, m.d_model, q_local) + 2 * linear(tokens, m.d_model, kv_local)
              + linear(tokens, q_local, m.d_model))
    sequences = microbatch_sequences(spec)
    heads = att.n_heads / par.tp
    traced += rates.attention(sequences, heads, spec.train.seq_len, att.head_dim)
    if policy != "none":  # selective recomputation reruns the attention core; full the whole forward
        traced += rates.attention(sequences, heads, spec.train.seq_len, att.head_dim, backward=False)
    passes = ACTIVATION_PASSES * m.d_model * tokens / (par.tp if par.sequence_parallel else 1)
    ops = OPS["attention"]
    moe = m.is_moe(layer)
    width = (m.moe.n_shared_experts * m.moe.expert_d_ff if moe else m.ffn.d_ff) / par.tp
    if width:
        traced += 2 * linear(tokens, m.d_model, width) + linear(tokens, width, m.d_model)
        passes += SWIGLU_PASSES * width * tokens
        ops += OPS["ffn"]
    rest = rest_passes = 0.0
    if moe:
        moe_cfg, routing = m.moe, spec.routing
        rows = tokens / par.tp
        kept = routing.groups.top * moe_cfg.experts_per_group
        rest += linear(rows, m.d_model, moe_cfg.n_groups) + linear(rows, m.d_model, kept)
        if policy == "selective":  # routing and dispatch are recomputed too
            rest += (rates.linear(rows, m.d_model, moe_cfg.n_groups, backward=False)
                     + rates.linear(rows, m.d_model, kept, backward=False))
        slots = rows * routing.k.planned
        received = slots * busiest_ep_share(spec)  # the slots that reach the busiest rank's experts
        local = moe_cfg.n_experts // par.ep
        per_expert = received / local
        rest += rates.experts(local, per_expert, m.d_model, moe_cfg.expert_d_ff)
        if recompute_all:
            rest += rates.experts(local, per_expert, m.d_model, moe_cfg.expert_d_ff, backward=False)
        rest_passes = SLOT_PASSES * slots * m.d_model + SWIGLU_PASSES * received * moe_cfg.expert_d_ff
    forwards = 2 if recompute_all else 1
    traced += rates.elementwise((forwards + 2) * passes * ab)  # backward: twice the forward's passes
    rest += rates.elementwise((forwards + 2) * rest_passes * ab)
    dense, experts = local_layer_params(spec, layer)
    rest += rates.elementwise(GRAD_PASSES * (dense + experts) * STATE_BYTES[spec.train.dtype].grads)
    # the recomputed forward dispatches its operations again: all of them under full recomputation, the
    # MoE block's under selective
    traced += (1 + RECOMPUTED * recompute_all) * ops * rates.op
    moe_ops = OPS["moe"] * moe
    rest += (1 + RECOMPUTED * (policy != "none")) * moe_ops * rates.op
    return traced, rest


def head_compute(cm: CostModel, rates: Rates) -> float:
    """Seconds of the final norm, LM head and loss for one micro-batch on one rank (vocabulary split over tp)."""
    spec = cm.spec
    vocab = spec.model.vocab_size / cm.par.tp
    seconds = rates.linear(cm.tokens, spec.model.d_model, vocab)
    softmax = 6 * cm.tokens * vocab * 4  # the float32 log-softmax and its gradient: reads and writes
    seconds += rates.elementwise(softmax + ACTIVATION_PASSES / 2 * cm.tokens * spec.model.d_model * act_bytes(spec))
    seconds += rates.elementwise(GRAD_PASSES * embedding_params(spec) / cm.par.tp * STATE_BYTES[spec.train.dtype].grads)
    return seconds


def layer_comm(cm: CostModel, rates: Rates, layer: int) -> float:
    """Seconds of one layer's collectives for one micro-batch on one rank, each at its size."""
    spec, par = cm.spec, cm.par
    ab = act_bytes(spec)
    activation = cm.tokens * spec.model.d_model * ab
    c = layer_collectives(spec, layer)
    policy = par.activation_checkpointing
    forwards = 2 if policy == "full" else 1
    seconds = 0.0
    if par.tp > 1:
        moe = spec.model.is_moe(layer)
        if par.sequence_parallel:  # gathers in (the input's share) and reduce-scatters out, alternately
            gathers = c.tp // 2 + c.tp % 2
            seconds += (gathers * _coll(cm, rates, "all_gather", activation / par.tp, "tp")
                        + (c.tp - gathers) * _coll(cm, rates, "reduce_scatter", activation, "tp"))
        else:
            gathers = (forwards + 1) * int(moe)
            seconds += ((c.tp - gathers) * _coll(cm, rates, "all_reduce", activation, "tp")
                        + gathers * _coll(cm, rates, "all_gather", activation / par.tp, "tp"))
    if c.ep:
        passes, _ = exchange_passes(policy)
        halves = 2 if par.expert_overlap else 1
        slots = cm.tokens / par.tp * spec.routing.k.planned * spec.model.d_model * ab / halves
        slots *= busiest_ep_share(spec)  # the busiest rank's rows set the exchange's time
        rows = halves * passes
        seconds += rows * _coll(cm, rates, "all_to_all", slots, "ep")
        small = max(0, c.ep + c.ep_intra - rows)  # counts, plans and gates
        seconds += small * _coll(cm, rates, "all_to_all", spec.model.moe.n_experts * max(8, router_bytes(spec)), "ep")
    if c.zero_gathers:  # ZeRO-3: the layer's parameters gathered forward and backward (copied into place)
        w = STATE_BYTES[spec.train.dtype].weights
        for count, ways, axis in _sharded(cm, layer):
            seconds += 2 * _coll(cm, rates, "all_gather", count * w / ways, axis) + rates.elementwise(2 * count * w)
    return seconds


def _sharded(cm: CostModel, layer: int) -> list[tuple[int, int, str]]:
    """(local parameters, ZeRO ways, axis) of one layer: its dense ones over dp, its experts over edp."""
    dense, experts = local_layer_params(cm.spec, layer)
    return [(n, ways, axis) for n, ways, axis in ((dense, cm.par.dp, "dp"), (experts, cm.par.edp, "edp"))
            if ways > 1 and n]


def layer_scatter(cm: CostModel, rates: Rates, layer: int) -> float:
    """Seconds of ZeRO-3's reduce-scatter of one layer's gradients (once a step, or each micro-batch:
    `role_seconds`)."""
    g = STATE_BYTES[cm.spec.train.dtype].grads
    return sum(_coll(cm, rates, "reduce_scatter", n * g, axis) + rates.elementwise(2 * n * g)
               for n, _, axis in _sharded(cm, layer)) if cm.par.zero >= 3 else 0.0


def layer_seconds(cm: CostModel, rates: Rates, layer: int) -> float:
    return layer_compute(cm, rates, layer) + layer_comm(cm, rates, layer)


def role_seconds(cm: CostModel, rates: Rates, role: Role) -> tuple[float, float, float]:
    """(compute, communication inside the pipeline, after it) of one step on one rank of this pipeline rank."""
    spec, par, m = cm.spec, cm.par, cm.m
    compute = m * sum(layer_compute(cm, rates, i) for i in role.layers)
    if role.last:
        compute += m * head_compute(cm, rates)
    inside = m * sum(layer_comm(cm, rates, i) for i in role.layers)
    scatters = m if cm.grad_reduce_when == "microbatch" else 1
    inside += scatters * sum(layer_scatter(cm, rates, i) for i in role.layers)
    activation = cm.tokens * spec.model.d_model * act_bytes(spec) / (par.tp if par.sequence_parallel else 1)
    # a message each way per stage boundary and micro-batch: one send/receive pair's time
    inside += m * cm.boundaries(role) * _coll(cm, rates, "send_recv", activation, "pp")
    if par.tp > 1:  # the embedding's and the head's vocabulary-parallel reductions
        vocab = (role.first + 4 * role.last) * _coll(cm, rates, "all_reduce", activation, "tp")
        inside += m * vocab
    after = _gradients(cm, rates, role) + STEP_REDUCTIONS * _coll(cm, rates, "all_reduce", 8, "world")
    after += rates.optimizer(_updated(cm, role)) + OPS["step"] * rates.op
    local = cm.local(role)
    after += rates.elementwise(3 * (local.dense + local.experts) * STATE_BYTES[spec.train.dtype].grads)  # clip
    if par.zero >= 2:  # per-micro-batch reductions happen inside the pipeline
        inside, after = inside + after, 0.0
    return compute, inside, after


STEP_REDUCTIONS = 4  # router statistics, gradient norm, loss, memory peaks


def _updated(cm: CostModel, role: Role) -> float:
    """Parameters this rank's optimizer steps: its shard of each ZeRO axis from stage 1 on."""
    local, par = cm.local(role), cm.par
    if par.zero == 0:
        return local.dense + local.experts
    return local.dense / par.dp + local.experts / par.edp


def _gradients(cm: CostModel, rates: Rates, role: Role) -> float:
    """Seconds of the step's gradient reductions on one rank, in buckets of BUCKET_ELEMENTS over dp (dense)
    and edp (experts), as lcc.runtime.grad_sync runs them: ZeRO 0 and 1 all-reduce each bucket (concatenated
    into a flat buffer), ZeRO 2 reduce-scatters it (padded into a grid; each micro-batch where
    `gradient_reduction` is `microbatch`); ZeRO 1 then cuts out this rank's piece, and ZeRO 1 and 2 gather the
    updated pieces (concatenated, then copied into the parameters). ZeRO-3 reduces in its layers."""
    spec, par = cm.spec, cm.par
    local = cm.local(role)
    g = STATE_BYTES[spec.train.dtype].grads
    w = STATE_BYTES[spec.train.dtype].weights
    seconds = 0.0
    times = cm.m if par.zero == 2 and cm.grad_reduce_when == "microbatch" else 1
    for count, ways, axis in ((local.dense, par.dp, "dp"), (local.experts, par.edp, "edp")):
        if ways <= 1 or not count or par.zero >= 3:
            continue
        full, rest = divmod(int(count), BUCKET_ELEMENTS)
        for elements in [BUCKET_ELEMENTS] * full + ([rest] if rest else []):
            if par.zero < 2:
                seconds += _coll(cm, rates, "all_reduce", elements * g, axis)
            else:
                seconds += times * _coll(cm, rates, "reduce_scatter", elements * g, axis)
            seconds += rates.elementwise(times * 2 * elements * g)  # into the flat buffer or grid
            if par.zero == 1:
                seconds += rates.elementwise(2 * elements * g / ways)  # this rank's piece
            if par.zero >= 1:
                seconds += _coll(cm, rates, "all_gather", elements * w / ways, axis)
                seconds += rates.elementwise(2 * elements * w / ways + 2 * elements * w)
    if par.tp > 1:  # parameters whose tokens were split over tp (routers, norms)
        seconds += _coll(cm, rates, "all_reduce", 8 * spec.model.d_model * g, "tp")
    return seconds


def layer_exchange(cm: CostModel, rates: Rates, layer: int) -> tuple[float, float, float]:
    """(one half's dispatch, one half's combine, one half's experts) seconds of an overlapped MoE layer's
    forward on one rank, at achieved rates (lcc.compiler.cost.overlap)."""
    spec, par = cm.spec, cm.par
    if not spec.model.is_moe(layer):
        return 0.0, 0.0, 0.0
    rows = cm.tokens / par.tp / 2
    slots = rows * spec.routing.k.planned * busiest_ep_share(spec)  # what reaches the busiest rank
    one = _coll(cm, rates, "all_to_all", slots * spec.model.d_model * act_bytes(spec), "ep")
    local = spec.model.moe.n_experts // par.ep
    experts = rates.experts(local, slots / local, spec.model.d_model, spec.model.moe.expert_d_ff, backward=False)
    return one, one, experts


# What one rank sends per byte of its buffer, by collective over n ranks (ring algorithms; a pair's message).
SENT = {"all_reduce": lambda n: 2 * (n - 1) / n, "all_gather": lambda n: n - 1, "reduce_scatter": lambda n: (n - 1) / n,
        "all_to_all": lambda n: (n - 1) / n, "send_recv": lambda n: 1.0}


def _coll(cm: CostModel, rates: Rates, kind: str, nbytes: float, axis: str) -> float:
    """Seconds of one collective over mesh axis `axis` (`pp`: a message each way; `world`: every rank): the
    calibration's table where the axis's groups stay inside a node and it measured the kind; otherwise the
    network's figures, intra- or inter-node: its latency plus the bytes one rank sends at its bandwidth."""
    par = cm.par
    group = {"tp": par.tp, "ep": par.ep, "dp": par.dp, "edp": par.edp, "pp": 2 if par.pp > 1 else 1,
             "world": par.world_size}[axis]
    crosses = cm.links[axis].crosses_nodes if axis in cm.links else cm.spec.cluster.nodes > 1
    seconds = None if crosses else rates.collective(kind, nbytes, group)
    if seconds is not None:
        return seconds
    if group <= 1:
        return 0.0
    net = cm.spec.cluster.network
    latency, gbps = ((net.inter_node_latency_us, net.inter_node_gbps) if crosses else
                     (net.intra_node_latency_us, net.intra_node_gbps))
    return latency * 1e-6 + SENT[kind](group) * nbytes / (gbps * 1e9 / 8)
