"""Data parallelism: gradient reduction over dp (dense) and edp (experts), in buckets, per stage."""

from __future__ import annotations

from lcc.compiler.state import CompileState

NAME = "data_parallel"
DESCRIPTION = "bucketed gradient reduction: dense parameters over dp, expert parameters over edp"

BUCKET_ELEMENTS = 25_000_000  # per-rank elements per bucket (shards, not global sizes)


def local_numel(shape: tuple[int, ...], shard: dict | None) -> int:
    n = 1
    for i, size in enumerate(shape):
        n *= size // shard["parts"] if shard is not None and shard["dim"] == i else size
    return n


def run(state: CompileState) -> None:
    par = state.spec.parallelism
    op = "reduce_scatter" if par.zero >= 2 else "all_reduce"
    buckets: dict[int, list[dict]] = {}
    for stage in range(len(state.stage_bounds)):
        for axes, expert in ((("edp",), True), (("dp",), False), (("dp", "tp"), False)):
            names = [n for n, p in state.params.items()
                     if stage in p.stages and p.expert == expert and tuple(p.grad_reduce) == axes]
            current: list[str] = []
            size = 0
            for name in reversed(names):  # backward produces gradients from the last layer first
                current.append(name)
                size += local_numel(state.params[name].shape, state.params[name].shard)
                if size >= BUCKET_ELEMENTS:
                    buckets.setdefault(stage, []).append({"op": op, "axes": list(axes), "params": current,
                                                          "elements": size})
                    current, size = [], 0
            if current:
                buckets.setdefault(stage, []).append({"op": op, "axes": list(axes), "params": current,
                                                      "elements": size})
    state.plan["grad_buckets"] = {str(s): b for s, b in sorted(buckets.items())}
    state.plan["zero"] = {"stage": par.zero, "activation_checkpointing": par.activation_checkpointing,
                          "implemented": False}
