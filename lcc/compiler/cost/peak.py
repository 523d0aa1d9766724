"""One rank's memory over a training step (docs/cost-model.md, "Memory per rank"): its model states under ZeRO,
the activations its in-flight micro-batches keep, and its peak, the most it holds at any moment.

The peak is the largest of these moments, walked block by block in the order backward reaches them: the LM
head and loss; from the last layer, an MoE layer's experts (with the shared experts), its routing (with the
FFN norm) and its attention block, or a dense layer's MLP block and attention block; the embedding:
- the end of the forward: weights and optimizer states, gradients carried from earlier micro-batches, every
  activation in flight;
- the start of each block's backward: what is still kept, what recomputation rebuilds for it, the gradients
  made so far, and ZeRO-3's parameters gathered again (at a layer's first block its two groups whole, the
  larger one's buffer beside its copies; the dense copies still there at its later blocks);
- the end of each block's backward: its activations released (what full recomputation rebuilt for the
  layer's later blocks stays), its gradients whole, and the reduction buffers made there: a gradient bucket
  flattened for its all-reduce, or laid out for its reduce-scatter (ZeRO-2) with the reduce-scatter's output
  beside it, or ZeRO-3's layer gradients laid out for theirs at the end of the layer (its gather's
  backward). Buckets fill in backward order and close at BUCKET_ELEMENTS, as the compiler cuts them (here
  block by block); the last closes after backward;
- the optimizer step: every gradient as it reaches the optimizer (ZeRO-1 clones its pieces off the whole
  gradients, where a ZeRO axis has more than one rank), then ZeRO 1-2's gather of the updated pieces (one
  stage's dense parameters or experts: the gathered buffer beside the parameters it is copied into).
Autograd's own temporaries inside an operation's backward and uneven routing are not modelled.
Pure functions of numbers and the spec; torch-free.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Any

from lcc.compiler.cost import params as P
from lcc.compiler.cost.memory import (
    STATE_BYTES,
    LayerShape,
    ModelStates,
    MoEShape,
    attention_activations,
    mlp_activations,
    model_states,
    moe_activations,
    outside_activations,
    router_activations,
)
from lcc.compiler.cost.traffic import BUCKET_ELEMENTS
from lcc.compiler.cost.work import act_bytes, layer_shape, microbatch_tokens, moe_shape
from lcc.compiler.layout import inflight_chunks
from lcc.spec.models import Spec

if TYPE_CHECKING:
    from lcc.compiler.cost.model import CostModel, Role


@dataclass(frozen=True)
class Block:
    """One unit of one micro-batch's backward on one rank (bytes, but `elements`)."""

    name: str
    kept: float  # activations its forward keeps for backward
    rebuilt: float  # activations recomputation rebuilds when its backward starts
    rebuilt_after: float  # of those, what stays at its end (full recomputation: the layer's later blocks')
    grads: float  # the gradients its backward makes, whole
    regathered: float  # ZeRO-3: parameters gathered for its backward
    elements: tuple[int, int]  # its gradients' elements in the dense (dp) and expert (edp) reductions
    gather_end: bool = True  # ZeRO-3: its gather's backward (the reduce-scatter) runs at its end


@dataclass(frozen=True)
class Backward:
    """What one rank's last micro-batch's backward starts from, and how its gradients are reduced."""

    base: float  # weights as held, and optimizer states
    carried: float  # gradients held from earlier micro-batches
    others: float  # activations of the other micro-batches in flight
    zero: int
    accumulate: bool  # earlier micro-batches' gradients are held whole: new ones are added to them
    pieces_accumulate: bool  # earlier micro-batches' pieces are held: new pieces are added to them
    grad_bytes: int  # bytes per gradient element
    ways: tuple[int, int]  # ranks the dense parameters and the experts are reduced over (dp, edp)


def changes(b: Backward) -> tuple[float, float, float]:
    """How the gradients one rank holds change once a block's backward made `grads` and the reductions closing
    there laid out `whole` bytes, this rank's `pieces` of them: the coefficients of (grads, whole, pieces).
    New gradients are held, or added in place to those held whole; ZeRO 2-3's reductions leave this rank's
    pieces (added to those held), ZeRO-3's step-wise one taking the held whole gradients with it; an
    all-reduce's flat bucket replaces the gradients it holds."""
    held = 0.0 if b.accumulate else 1.0
    pieces = 0.0 if b.pieces_accumulate else 1.0
    if b.zero < 2:
        return held, 0.0, 0.0
    if b.zero == 2:
        return held, -1.0, pieces
    return (1.0, -2.0, 1.0) if b.accumulate else (1.0, -1.0, pieces)


def walk(b: Backward, blocks: list[tuple[int, Block]]) -> tuple[float, str, float]:
    """(the highest moment of the step's forward and backward, where it is, the gradients held at the end).
    `blocks`: each block in backward order with the layer it belongs to (-1 for the head and embedding).

    Reductions close as the compiler issues them: ZeRO 0-2's buckets of each group over more than one rank
    (dense over dp, experts over edp) fill in backward order and close at BUCKET_ELEMENTS (here block by
    block), the last ones after backward; ZeRO-3 reduce-scatters a layer's gradients at its end (its
    gather's backward). A closing reduction lays out its own buffers beside the gradients it reduces: an
    all-reduce's flat bucket (whole), or a reduce-scatter's grid (whole) and its output (this rank's
    pieces)."""
    kept = b.others + sum(x.kept for _, x in blocks)
    grads, base, size = b.carried, b.base, b.grad_bytes
    per_grad, per_whole, per_piece = changes(b)
    output = 1.0 if b.zero >= 2 else 0.0  # a reduce-scatter's output beside its grid
    groups = [(g, b.ways[g]) for g in (0, 1) if b.ways[g] > 1]
    each_layer = b.zero >= 3
    filled = [0, 0]
    peak, at = base + kept + grads, (-1, "")
    for i, (_, x) in enumerate(blocks):
        early = base + kept + x.rebuilt + grads + x.regathered
        kept -= x.kept
        whole = piece = 0.0
        for g, ways in groups:
            n = filled[g] + x.elements[g]
            if n and (x.gather_end if each_layer else n >= BUCKET_ELEMENTS):
                whole, piece, n = whole + n * size, piece + -(-n // ways) * size, 0
            filled[g] = n
        late = base + kept + x.rebuilt_after + grads + x.grads + whole + output * piece
        grads += per_grad * x.grads + per_whole * whole + per_piece * piece
        if early > peak:
            peak, at = early, (i, "start")
        if late > peak:
            peak, at = late, (i, "end")
    whole = sum(filled[g] for g, _ in groups) * size  # the buckets left open, reduced after backward
    piece = sum(-(-filled[g] // ways) for g, ways in groups) * size
    if whole:
        if base + grads + whole + output * piece > peak:
            peak, at = base + grads + whole + output * piece, (len(blocks), "")
        grads += per_whole * whole + per_piece * piece
    i, moment = at
    if i < 0:
        return peak, "end of forward", grads
    if i == len(blocks):
        return peak, "gradient reduction", grads
    layer, block = blocks[i]
    return peak, f"backward of {f'layer {layer} ({block.name})' if layer >= 0 else block.name} ({moment})", grads


@lru_cache(maxsize=1024)
def _kept(shape: LayerShape, moe: MoEShape | None, policy: str) -> tuple[float, ...]:
    """The activations each block of a layer of this shape keeps under `policy`, in `block_activations`'
    order."""
    full = policy == "full"
    outside = outside_activations(shape)  # the MLP block's input and norm
    inside = mlp_activations(shape) - outside
    attention = (shape.seq * shape.batch * shape.d_model * shape.act_bytes / (shape.tp if shape.sequence_parallel
                                                                              else 1)
                 if full else attention_activations(shape, policy))
    if moe is None:
        return 0.0 if full else outside + inside, attention
    router = router_activations(moe) if policy == "none" else 0.0
    routed = 0.0 if full else inside + moe_activations(moe, policy) - router
    return routed, 0.0 if full else outside + router, attention


def block_activations(spec: Spec, layer: int, policy: str) -> list[tuple[str, float, int, int]]:
    """A layer's blocks in the order its backward reaches them, each with (name, the activations it keeps
    under `policy`, its dense and expert parameters on one rank): an MoE layer's experts (the shared
    experts' SwiGLU tensors, the dispatched rows, the experts' tensors, combine's), its routing (the router's
    tensors, the FFN norm's and the block's input), its attention block; a dense layer's MLP block and
    attention block. `full` keeps the layer's input (the attention block's) only."""
    moe = spec.model.is_moe(layer)
    kept = _kept(layer_shape(spec, layer), moe_shape(spec) if moe else None, policy)
    dense, experts = P.local_layer_params(spec, layer)
    p, tp, d = P.layer_params(spec, layer), spec.parallelism.tp, spec.model.d_model
    if not moe:
        mlp = d + p.ffn // tp
        return [("MLP", kept[0], mlp, 0), ("attention", kept[1], dense - mlp, 0)]
    return [("experts", kept[0], p.shared // tp, experts), ("routing", kept[1], d + p.router, 0),
            ("attention", kept[2], dense - d - p.router - p.shared // tp, 0)]


def layer_blocks(cm: CostModel, layer: int, policy: str, zero: int) -> list[Block]:
    """A layer as one rank's backward meets it (`block_activations`). Recomputation rebuilds what its policy
    does not keep: `full` the whole layer when its backward starts (each block's part then stays until that
    block's backward ends), `selective` a block's recomputed part when that block's backward starts. ZeRO-3
    gathers the layer's parameters again when its backward starts (the two groups whole, the larger one's
    buffer beside its copies); the dense copies stay for its later blocks, and its gradients are
    reduce-scattered at its end."""
    spec, par = cm.spec, cm.par
    b = STATE_BYTES[spec.train.dtype]
    kept = block_activations(spec, layer, policy)
    none = block_activations(spec, layer, "none") if policy != "none" else kept
    rebuilt = [n[1] - k[1] for n, k in zip(none, kept, strict=True)]
    dense, experts = P.local_layer_params(spec, layer)
    gathered = (dense * b.weights if par.dp > 1 else 0.0, experts * b.weights if par.edp > 1 else 0.0)
    out = []
    for i, (name, acts, n_dense, n_experts) in enumerate(kept):
        regather = 0.0 if zero < 3 else sum(gathered) + max(gathered) if i == 0 else gathered[0]
        start, after = (sum(rebuilt[i:]), sum(rebuilt[i + 1:])) if policy == "full" else (rebuilt[i], 0.0)
        out.append(Block(name, acts, start, after, (n_dense + n_experts) * b.grads, regather,
                         (n_dense, n_experts), gather_end=i == len(kept) - 1))
    return out


def head_activations(spec: Spec) -> float:
    """Bytes the last stage keeps for the loss's backward, one micro-batch: the final norm's input,
    normalised tensor and output, the logits and their float32 exponentials (vocabulary split over tp)."""
    par = spec.parallelism
    tokens = microbatch_tokens(spec)
    norm = 3 * tokens * spec.model.d_model * act_bytes(spec) / (par.tp if par.sequence_parallel else 1)
    return norm + tokens * spec.model.vocab_size / par.tp * (act_bytes(spec) + 4)


def edge_blocks(cm: CostModel, role: Role, zero: int) -> tuple[list[Block], list[Block]]:
    """([the head], [the embedding]) of this role, where it holds them. A tied head on the embedding's role
    makes the embedding's gradient in its own backward, the first; the gradient's bucket closes last."""
    spec, par = cm.spec, cm.par
    b = STATE_BYTES[spec.train.dtype]
    matrix = P.embedding_params(spec) // par.tp
    tied_here = spec.model.tie_embeddings and role.first and role.last

    def regather(n: int) -> float:
        return 2 * n * b.weights if zero >= 3 and par.dp > 1 else 0.0

    head, embedding = [], []
    if role.last:
        n = spec.model.d_model + matrix
        head.append(Block("the head", head_activations(spec), 0.0, 0.0, n * b.grads, regather(n),
                          (n - matrix if tied_here else n, 0)))
    if role.first:
        embedding.append(Block("the embedding", 0.0, 0.0, 0.0, (0 if tied_here else matrix) * b.grads,
                               regather(matrix), (matrix, 0)))
    return head, embedding


def gather_updated(cm: CostModel, role: Role, local: P.LocalParams) -> float:
    """ZeRO 1-2 after the optimizer step: the largest of the role's gathers of updated pieces (one stage's
    dense parameters over dp or experts over edp): the gathered buffer, whole, copied straight into the
    parameters (lcc.ops.zero.GatherBucket.copy_into). `local`: the role's parameters."""
    par, spec = cm.par, cm.spec
    w = STATE_BYTES[spec.train.dtype].weights
    last = par.n_stages - 1
    most = 0.0
    for s in role.stages:
        here = (local if len(role.stages) == 1 else
                P.local_params(spec, list(range(*cm.stage_bounds[s])), s == 0, s == last))
        for count, ways in ((here.dense, par.dp), (here.experts, par.edp)):
            if ways > 1:
                most = max(most, count * w)
    return most


def role_memory(cm: CostModel, role: Role, zero: int | None = None, recompute: str | None = None,
                whole_grads: bool | None = None) -> dict[str, Any]:
    """One rank of this pipeline rank: its model states, activations and peak (`CostModel.role_memory`)."""
    spec, par, m = cm.spec, cm.par, cm.m
    zero = par.zero if zero is None else zero
    policy = recompute or par.activation_checkpointing
    local = cm.local(role)
    dtype = spec.train.dtype
    b = STATE_BYTES[dtype]
    states = model_states(local.dense, dtype, zero, par.dp) + model_states(local.experts, dtype, zero, par.edp)
    whole = zero >= 2 and (whole_grads if whole_grads is not None else
                           zero == par.zero and cm.grad_reduce_when == "step" and m > 1)
    if whole:  # gradients accumulate whole over the micro-batches, then leave as pieces
        states = ModelStates(states.weights, b.grads * (local.dense + local.experts), states.optimizer)
    gathered = gathered_grads = 0.0
    if zero >= 3:  # the layer in use and the prefetched next one, unsharded; one layer's full grads
        largest = local.largest_layer_dense + local.largest_layer_experts
        gathered, gathered_grads = largest * 2 * b.weights, largest * b.grads
    chunks = inflight_chunks(par.pipeline.schedule, par.pp, par.pipeline.virtual_stages, m, role.pp_rank)
    kinds: dict[bool, list[Block]] = {}  # a layer's blocks depend on the layer only by whether it is MoE
    layers = []
    for i in reversed(role.layers):
        moe = spec.model.is_moe(i)
        if moe not in kinds:
            key = ("layer blocks", moe, policy, zero)
            if key not in cm.memory_answers:
                cm.memory_answers[key] = layer_blocks(cm, i, policy, zero)
            kinds[moe] = cm.memory_answers[key]
        layers += [(i, x) for x in kinds[moe]]
    per_chunk = sum(x.kept for _, x in layers) / len(role.stages)
    head, embedding = edge_blocks(cm, role, zero)
    activations = chunks * per_chunk + max((x.rebuilt for _, x in layers), default=0.0) + sum(x.kept for x in head)
    backward = Backward(states.weights + states.optimizer, states.grads if m > 1 else 0.0,
                        max(0, chunks - len(role.stages)) * per_chunk, zero, m > 1 and (zero < 2 or whole),
                        m > 1 and zero >= 2 and not whole, b.grads, (par.dp, par.edp))
    peak, where, grads = walk(backward, [*((-1, x) for x in head), *layers, *((-1, x) for x in embedding)])
    pieces = (math.ceil(local.dense / par.dp) + math.ceil(local.experts / par.edp)) * b.grads
    copied = sum(math.ceil(n / ways) for n, ways in ((local.dense, par.dp), (local.experts, par.edp)) if ways > 1)
    moments = [(backward.base + grads + (copied * b.grads if zero == 1 else 0.0), "optimizer step")]
    if zero in (1, 2):
        moments.append((backward.base + pieces + gather_updated(cm, role, local), "gathering updated parameters"))
    for moment, name in moments:
        if moment > peak:
            peak, where = moment, name
    weights = states.weights + gathered
    grads_held = states.grads + gathered_grads
    return {
        "role": f"pp{role.pp_rank}",
        "rank": role.pp_rank * par.dp * par.tp,
        "stages": role.stages,
        "layers": [list(cm.stage_bounds[s]) for s in role.stages],
        "inflight_microbatches": chunks,
        "params_dense": local.dense,
        "params_experts": local.experts,
        "weights_bytes": round(weights),
        "weights_gathered_bytes": round(gathered),
        "grads_bytes": round(grads_held),
        "grads_gathered_bytes": round(gathered_grads),
        "optimizer_bytes": round(states.optimizer),
        "activations_bytes": round(activations),
        "total_bytes": round(weights + grads_held + states.optimizer + activations),
        "peak_bytes": round(peak),
        "peak_phase": where,
    }
