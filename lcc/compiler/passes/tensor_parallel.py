"""Tensor parallelism: Megatron column/row splits, vocab-parallel embedding and head, and the
forward collectives they need (all-reduce, or reduce-scatter / all-gather with sequence parallelism)."""

from __future__ import annotations

from lcc.compiler.state import CompileState

NAME = "tensor_parallel"
DESCRIPTION = "column/row-parallel projections, vocab-parallel embedding and head, their TP collectives"

COLUMN = ("attn.wq.weight", "attn.wk.weight", "attn.wv.weight", "ffn.w1.weight", "ffn.w3.weight",
          "ffn.shared.w1.weight", "ffn.shared.w3.weight")
ROW = ("attn.wo.weight", "ffn.w2.weight", "ffn.shared.w2.weight")


def run(state: CompileState) -> None:
    spec = state.spec
    tp, sp = spec.parallelism.tp, spec.parallelism.sequence_parallel
    n_kv = spec.model.attention.n_kv_heads
    for name, info in state.params.items():
        if info.expert:
            continue
        if name.endswith(("attn.wk.weight", "attn.wv.weight")) and n_kv < tp:
            info.shard = {"dim": 0, "axis": "tp", "parts": n_kv}  # each kv head on tp / n_kv ranks
        elif name.endswith(COLUMN) or name in ("embed.weight", "head.weight"):
            info.shard = {"dim": 0, "axis": "tp", "parts": tp}
        elif name.endswith(ROW):
            info.shard = {"dim": 1, "axis": "tp", "parts": tp}
        # norms and routers stay replicated over tp. A router sees only its tp rank's share of the tokens
        # (MoE layers split them), and with sequence parallelism so does every replicated parameter:
        # those gradients are summed over tp too
        partial = ".ffn.router." in name or (info.shard is None and sp)
        info.grad_reduce = ["dp"] + (["tp"] if partial and tp > 1 else [])
        if info.shard is not None and info.shard["parts"] == 1:
            info.shard = None
    reduce = "reduce_scatter" if sp else "all_reduce"
    for name, info in state.params.items():
        if tp == 1 or info.expert:
            continue
        site = name.rsplit(".", 1)[0]
        for stage in info.stages:
            if name.endswith(ROW) or name == "embed.weight" and stage == 0:
                state.collectives.setdefault(stage, []).append({"site": site, "op": reduce, "axis": "tp"})
            elif name.endswith("attn.wq.weight") and sp:
                state.collectives.setdefault(stage, []).append({"site": site, "op": "all_gather", "axis": "tp"})
    if tp > 1:
        last = len(state.stage_bounds) - 1
        state.collectives.setdefault(last, []).append(
            {"site": "head", "op": "all_reduce", "axis": "tp", "what": "vocab-parallel cross-entropy: max and sum"})
