"""Tensor parallelism: Megatron column/row splits, vocab-parallel embedding, head and cross-entropy, and
the collectives they need: `copy_to_tp` before a column-parallel region (its backward all-reduces the
input's gradient), an all-reduce after a row-parallel layer and after the vocab-parallel embedding, and
the cross-entropy's max and sums over the vocabulary slices."""

from __future__ import annotations

from lcc.compiler.dims import dims
from lcc.compiler.state import AFTER, BEFORE, LOSS_POSITION, CompileState
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
    for name, info in state.params.items():
        if info.expert:
            continue
        shard = None
        if name.endswith(("attn.wk.weight", "attn.wv.weight")) and n_kv < tp:
            shard = Shard(0, "tp", n_kv)  # each kv head on tp / n_kv ranks
        elif name.endswith(COLUMN) or name in ("embed.weight", "head.weight"):
            shard = Shard(0, "tp", tp)
        elif name.endswith(ROW):
            shard = Shard(1, "tp", tp)
        if shard is not None and shard.parts > 1:
            info.shard = shard
            info.local_shape = list(info.global_shape)
            info.local_shape[shard.dim] //= shard.parts
        # norms and routers stay replicated over tp. A router sees only its tp rank's share of the tokens
        # (MoE layers split them): its gradient is summed over tp too
        # copies of a kv head on tp / n_kv ranks each see their own query heads' share: summed over kv
        info.grad_reduce = ["dp"] + (["tp"] if ".ffn.router." in name and tp > 1 else []) + (
            ["kv"] if shard is not None and shard.parts < tp else [])
    if tp > 1:
        _collectives(state)


def _collectives(state: CompileState) -> None:
    d = dims(state.spec, state.mode)
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
        if site == "embed":
            state.add(0, site, AFTER, "all_reduce", [Collective("all_reduce", "tp", site, "vocab-parallel embedding: "
                                                                "sum over tp", rows, d.params)])
        elif info is None or info.shard is None or info.shard.axis != "tp":
            continue
        elif info.shard.dim == 0:  # column-parallel: the input enters the TP region once
            source = f"{stage}:{n.args[0]}"
            if source not in entered:
                entered.add(source)
                state.add(stage, site, BEFORE, "copy_to_tp", [], [Collective(
                    "all_reduce", "tp", site, "gradient of the column-parallel input", rows, d.params)])
        else:
            state.add(stage, site, AFTER, "all_reduce", [Collective("all_reduce", "tp", site,
                                                                    "row-parallel: sum partial results", rows,
                                                                    d.compute)])
    if state.mode == "train":
        last = state.last_stage
        for op, what in (("all_reduce_max", "the logits' maximum over the vocabulary"),
                         ("all_reduce", "the sum of exponentials"), ("all_reduce", "the target's logit")):
            state.add(last, "loss", AFTER, op, [Collective(op, "tp", "loss", f"vocab-parallel cross-entropy: {what}",
                                                           [d.T], d.wide)], position=LOSS_POSITION)
