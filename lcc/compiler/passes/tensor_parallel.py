"""Tensor parallelism: Megatron column/row splits, vocab-parallel embedding, head and cross-entropy, and
the collectives they need: `copy_to_tp` before a column-parallel region (its backward all-reduces the
input's gradient), an all-reduce after a row-parallel layer and after the vocab-parallel embedding, and
the cross-entropy's max and sums over the vocabulary slices.

With sequence parallelism the residual stream, norms and routers hold s / tp positions of each sequence
(dimension 1; the shared experts' flattened tokens, dimension 0). `gather_sequence` (an all-gather,
backward a reduce-scatter; autograd keeps only the rank's slice, and backward gathers it again for the
weight gradients unless the whole layer is recomputed or autocast keeps a low-precision copy of its
own) replaces copy_to_tp; `reduce_scatter_sequence`
(backward an all-gather) replaces the all-reduces after the row-parallel layers and the embedding. Norm
weights then see only their rank's positions: their gradients are summed over tp, as the routers' are."""

from __future__ import annotations

import dataclasses

from lcc.compiler.dims import Dims, dims, sequence_parallel
from lcc.compiler.state import AFTER, AT, BEFORE, LOSS_POSITION, CompileState
from lcc.plan.types import Collective, Shard

NAME = "tensor_parallel"
DESCRIPTION = "column/row-parallel projections, vocab-parallel embedding, head and loss, their TP collectives"

COLUMN = ("attn.wq.weight", "attn.wk.weight", "attn.wv.weight", "ffn.w1.weight", "ffn.w3.weight",
          "ffn.shared.w1.weight", "ffn.shared.w3.weight")
ROW = ("attn.wo.weight", "ffn.w2.weight", "ffn.shared.w2.weight")


def run(state: CompileState) -> None:
    spec = state.spec
    tp = spec.parallelism.tp
    n_kv = spec.model.attention.n_kv_heads
    sp = sequence_parallel(spec, state.mode)
    # query and key norms over all heads hold one weight per element of the projection: split with its heads
    qk_all = ("attn.q_norm.weight", "attn.k_norm.weight") if spec.model.attention.qk_norm == "all" else ()
    for name, info in state.params.items():
        if info.expert:
            continue
        shard = None
        if name.endswith(("attn.wk.weight", "attn.wv.weight", *qk_all[1:])) and n_kv < tp:
            shard = Shard(0, "tp", n_kv)  # each kv head on tp / n_kv ranks
        elif name.endswith((*COLUMN, *qk_all)) or name in ("embed.weight", "head.weight"):
            shard = Shard(0, "tp", tp)
        elif name.endswith(ROW):
            shard = Shard(1, "tp", tp)
        if shard is not None and shard.parts > 1:
            info.shard = shard
            info.local_shape = list(info.global_shape)
            info.local_shape[shard.dim] //= shard.parts
        # norms and routers stay replicated over tp. A router sees only its tp rank's share of the tokens
        # (MoE layers split them), and with sequence parallelism so does a norm: their gradients are summed
        # over tp too. Copies of a kv head on tp / n_kv ranks each see their own query heads' share: summed
        # over kv
        # per-head query and key norms see only their rank's heads: summed over tp as well
        qk = name.endswith(("attn.q_norm.weight", "attn.k_norm.weight"))
        partial = ".ffn.router." in name or (sp and name.endswith("norm.weight") and not qk) or (qk and not qk_all)
        info.grad_reduce = ["dp"] + (["tp"] if partial and tp > 1 else []) + (
            ["kv"] if shard is not None and shard.parts < tp else [])
    if tp > 1:
        _collectives(state)


def _sequence(d: Dims, tp: int, shared: bool, dtype: str, site: str) -> tuple[Collective, Collective]:
    """Sequence parallelism's pair at a call site, as issued: (all-gather of this rank's slice, reduce-scatter
    of the whole), the sliced dimension moved first; for the shared experts the tokens (dimension 0)."""
    local, whole = ([d.T // tp, d.D], [d.T, d.D]) if shared else ([d.s_local, d.b, d.D], [d.s, d.b, d.D])
    return (Collective("all_gather", "tp", site, "", local, dtype),
            Collective("reduce_scatter", "tp", site, "", whole, dtype))


def _collectives(state: CompileState) -> None:
    d = dims(state.spec, state.mode)
    tp = state.spec.parallelism.tp
    sp = sequence_parallel(state.spec, state.mode)
    full = state.mode == "train" and state.spec.parallelism.activation_checkpointing == "full"
    # under autocast the column-parallel layers keep their own low-precision copy of the gathered input
    autocast = d.params != d.compute
    tied = state.spec.model.tie_embeddings
    stage_of = state.stage_of_layer()
    entered: set[str] = set()  # inputs already copied into a TP region (q, k and v share one)
    for n in state.graph.graph.nodes:
        if n.op != "call_module":
            continue
        site = str(n.target)
        layer = site.split(".")[1] if site.startswith("layers.") else None
        stage = 0 if site == "embed" else state.last_stage if layer is None else stage_of[int(layer)]
        rows = [d.T, d.D] if ".ffn.shared." in site else [d.b, d.s, d.D]
        weight = "embed.weight" if site == "head" and tied else f"{site}.weight"
        info = state.params.get(weight)
        shared = ".ffn.shared." in site
        dim = 0 if shared else 1
        if site.endswith(("attn.q_norm", "attn.k_norm")) and state.spec.model.attention.qk_norm == "all":
            sq = [d.b, d.s, 1]  # each position's sum of squares over this rank's heads
            state.add(stage, site, AT, "rms_norm_tp",
                      [Collective("all_reduce", "tp", site, "the mean square over every rank's heads", sq, d.wide)],
                      [Collective("all_reduce", "tp", site, "the gradient of that sum, every rank's heads", sq,
                                  d.wide)])
        elif site == "embed" and sp:
            gather, scatter = _sequence(d, tp, shared, d.params, site)
            state.add(0, site, AFTER, "reduce_scatter_sequence",
                      [_what(scatter, "vocab-parallel embedding: sum over tp, this rank's positions")],
                      [_what(gather, "gradients of every rank's positions")], dim=dim)
        elif site == "embed":
            state.add(0, site, AFTER, "all_reduce", [Collective("all_reduce", "tp", site, "vocab-parallel embedding: "
                                                                "sum over tp", rows, d.params)])
        elif info is None or info.shard is None or info.shard.axis != "tp":
            continue
        elif info.shard.dim == 0:  # column-parallel: the input enters the TP region once
            source = f"{stage}:{n.args[0]}"
            if source in entered:
                continue
            entered.add(source)
            if sp:
                gather, scatter = _sequence(d, tp, shared, d.params, site)
                backward = [_what(scatter, "gradient of the column-parallel input, this rank's positions")]
                if not (full and layer is not None) and not autocast:  # kept as a slice, gathered again
                    backward.append(_what(gather, "every rank's positions again, for the weight gradients"))
                state.add(stage, site, BEFORE, "gather_sequence", [_what(gather, "every rank's positions")],
                          backward, dim=dim)
            elif state.mode == "train":  # (serve plans have no backward: the copy is the identity)
                state.add(stage, site, BEFORE, "copy_to_tp", [], [Collective(
                    "all_reduce", "tp", site, "gradient of the column-parallel input", rows, d.params)])
        elif sp:
            gather, scatter = _sequence(d, tp, shared, d.compute, site)
            state.add(stage, site, AFTER, "reduce_scatter_sequence",
                      [_what(scatter, "row-parallel: sum partial results, this rank's positions")],
                      [_what(gather, "gradients of every rank's positions")], dim=dim)
        else:
            state.add(stage, site, AFTER, "all_reduce", [Collective("all_reduce", "tp", site,
                                                                    "row-parallel: sum partial results", rows,
                                                                    d.compute)])
    head = state.params["embed.weight" if tied else "head.weight"]
    if state.mode == "serve" and head.shard is not None and head.shard.axis == "tp":
        state.add(state.last_stage, "head", AFTER, "gather_vocab", [Collective(
            "all_gather", "tp", "head", "every rank's slice of the vocabulary: whole logits for sampling",
            [-1, head.local_shape[0]], d.compute)])
    if state.mode == "train":
        last = state.last_stage
        for op, what in (("all_reduce_max", "the logits' maximum over the vocabulary"),
                         ("all_reduce", "the sum of exponentials"), ("all_reduce", "the target's logit")):
            state.add(last, "loss", AFTER, op, [Collective(op, "tp", "loss", f"vocab-parallel cross-entropy: {what}",
                                                           [d.T], d.wide)], position=LOSS_POSITION)


def _what(c: Collective, what: str) -> Collective:
    return dataclasses.replace(c, what=what)
