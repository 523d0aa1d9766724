"""The cost report: parameters, per-rank memory, FLOPs, communication, pipeline bubble and step time.

`cost_report(spec)` returns plain JSON data in the documented schema `lcc.report/1` (docs/report.md).
It never imports torch, so `lcc report` answers instantly even for 2,048-rank layouts.
"""

from __future__ import annotations

from typing import Any

from lcc.compiler.cost import params as P
from lcc.compiler.cost.exchange import token_spread
from lcc.compiler.cost.measured import compiles
from lcc.compiler.cost.memory import STATE_BYTES
from lcc.compiler.cost.model import GIB, CostModel, step_seconds
from lcc.compiler.cost.step import step_time
from lcc.compiler.cost.work import head_forward_flops, layer_forward_flops, recompute_flops
from lcc.compiler.layout import bubble_fraction
from lcc.spec.models import DTYPE_BYTES, Spec

SCHEMA = "lcc.report/1"


def cost_report(spec: Spec) -> dict[str, Any]:
    cm = CostModel(spec)
    par, moe = spec.parallelism, spec.model.moe
    k = spec.routing.k if spec.routing is not None else None
    n_layers = spec.model.n_layers
    device = spec.cluster.device
    layers = [P.layer_params(spec, i) for i in range(n_layers)]
    routed = sum(p.experts for p in layers)

    bubble = bubble_fraction(par.pp, par.pipeline.virtual_stages, par.pipeline.microbatches, par.pipeline.schedule)
    busiest = max((cm.role_work(r) for r in cm.roles), key=lambda w: w[0])
    timing = step_time(cm)
    step = timing.seconds
    tokens_per_step = spec.train.global_batch * spec.train.seq_len
    model_flops = tokens_per_step * (3 * sum(layer_forward_flops(spec, i) for i in range(n_layers))
                                     + 3 * head_forward_flops(spec))
    hardware_flops = model_flops + tokens_per_step * sum(recompute_flops(spec, i) for i in range(n_layers))

    return {
        "schema": SCHEMA,
        "spec": spec.name,
        "world_size": par.world_size,
        "device": {"name": device.name, "kind": device.kind, "count": spec.cluster.n_devices,
                   "memory_gib": device.memory_gib, "peak_tflops": device.peak_tflops,
                   "memory_tbps": device.memory_tbps},
        "layout": {
            "pp": par.pp, "dp": par.dp, "tp": par.tp, "ep": par.ep, "edp": par.edp, "zero": par.zero,
            "activation_checkpointing": par.activation_checkpointing,
            "sequence_parallel": par.sequence_parallel,
            "schedule": par.pipeline.schedule, "microbatches": par.pipeline.microbatches,
            "virtual_stages": par.pipeline.virtual_stages, "expert_overlap": par.expert_overlap,
            "stage_layers": [list(b) for b in cm.stage_bounds],
            "stage_imbalance": cm.stage_imbalance(),
            "microbatch_tokens": cm.tokens,
        },
        "params": {
            "total": P.total_params(spec),
            "embedding": P.embedding_params(spec),
            "head": P.head_params(spec),
            "attention": sum(p.attention + p.norms for p in layers),
            "dense_ffn": sum(p.ffn for p in layers),
            "router": sum(p.router for p in layers),
            "shared_experts": sum(p.shared for p in layers),
            "routed_experts": routed,
            "active_per_token": {
                "min": P.active_params(spec, k.min if k else 0),
                "max": P.active_params(spec, k.max if k else 0),
                "expected": P.active_params(spec, k.planned if k else 0),
            },
        },
        "memory": cm.memory(),
        "experts": _experts(spec, routed),
        "flops": {
            "per_step": model_flops,
            "per_step_with_recompute": hardware_flops,
            "per_token_forward": model_flops / tokens_per_step / 3,
        },
        "comm": {**cm.comm(), "expert_exchange": _exchange(spec, cm)},
        "pipeline": {"bubble_fraction": bubble, "schedule": par.pipeline.schedule},
        "time": {
            "step_seconds_estimate": step,
            "compute_seconds": busiest[0],
            "arithmetic_seconds": busiest[1],
            "weight_read_seconds": busiest[2],
            "fixed_seconds": max(sum(cm.role_latency(r)) for r in cm.roles),
            "tokens_per_second": tokens_per_step / step,
            "utilization": model_flops / (step * par.world_size * cm.peak),
            "busy_fraction": timing.busy_fraction,
            "busiest_busy_fraction": timing.busiest_fraction,
            "exposed_communication_seconds": timing.exposed,
            "hidden_communication_seconds": timing.hidden,
            "bubble_seconds": timing.bubble_seconds,
            **_confidence(spec, step),
        },
        "serve": _serve(spec, cm) if spec.serve is not None else None,
        "moe": None if moe is None else {"n_experts": moe.n_experts, "n_groups": moe.n_groups,
                                         "experts_per_rank": moe.n_experts // par.ep},
    }


def _confidence(spec: Spec, step: float) -> dict[str, Any]:
    """Where the time figures come from, and with a calibrated cluster the step-time range its measured spread
    gives: every operation at its 10th percentile (`step_seconds_low`) or at its 90th (`step_seconds_high`).
    `compiled`: for a plan that compiles its layers, whether they are priced at the calibrated ratio of
    compiled to eager seconds or as eager (no `compiled` table); None for a plan that runs eagerly."""
    calibration = spec.cluster.calibration
    compiled = None
    if compiles(spec):
        compiled = "calibrated" if calibration is not None and calibration.compiled else "as eager"
    if calibration is None:
        return {"rates": {"compute": "datasheet", "communication": "datasheet", "compiled": compiled},
                "step_seconds_low": None, "step_seconds_high": None}
    low, high = (step_seconds(CostModel(spec, bound)) for bound in ("fast", "slow"))
    return {"rates": {"compute": "calibrated",
                      "communication": "calibrated" if calibration.collectives else "datasheet",
                      "compiled": compiled},
            "step_seconds_low": min(low, step), "step_seconds_high": max(high, step)}


def _exchange(spec: Spec, cm: CostModel) -> dict[str, Any] | None:
    """The expert exchange: its kind, where an EP group and a token's experts sit on nodes, the routing's
    expected distinct destination nodes per token (what a hierarchical exchange sends between nodes, per
    token), and its bytes per step (all ranks) and seconds per step (the busiest pipeline rank's) by link."""
    if spec.model.moe is None or spec.routing is None:
        return None
    s = token_spread(spec)
    even = spec.ep_nodes is not None
    per_pp = spec.parallelism.dp * spec.parallelism.tp
    sent = sum(per_pp * cm.role_comm(r)["expert_alltoall"] for r in cm.roles)
    inter = sent * cm.ep_links.inter_share
    return {
        "exchange": spec.parallelism.expert_exchange,
        "ep_nodes": s.nodes if even else None,
        "ranks_per_node": s.ranks_per_node if even else None,
        "token_nodes": s.token_nodes,
        "reachable_nodes": s.reachable,
        "slots_per_token": s.slots,
        "nodes_per_token": s.distinct,
        "dedup_ratio": s.dedup_ratio,
        "intra_node_bytes_per_step": sent - inter,
        "inter_node_bytes_per_step": inter,
        "seconds": max(cm.alltoall_seconds(cm.role_comm(r)["expert_alltoall"]) for r in cm.roles),
        "inter_node_seconds": max(cm.alltoall_inter_seconds(r) for r in cm.roles),
        "overlap": spec.parallelism.expert_overlap,
        "hidden_seconds": max(cm.role_hidden(r) for r in cm.roles),
    }


def expert_bytes_quantized(n_params: int, bits: int, group_size: int, symmetric: bool) -> int:
    """Packed int4 (two per byte) + a float16 scale per group (+ a uint8 zero-point per group)."""
    n_groups = n_params // group_size
    return n_params * bits // 8 + 2 * n_groups + (0 if symmetric else n_groups)


def expert_bytes_served(spec: Spec, n_params: int) -> int:
    """What a rank's experts take in memory when served: on CPU in float32 or bfloat16, two codes per byte
    and per group a float32 scale (and a float32 shift when asymmetric) for lcc's native kernel, or a
    (scale, offset) pair in the serve dtype for PyTorch's packed int4 kernel; otherwise lcc's int4 format
    (expert_bytes_quantized), or unquantised weights in the serve dtype."""
    quant = spec.quantization.experts if spec.quantization is not None else None
    dtype = spec.serve.dtype
    if quant is None:
        return DTYPE_BYTES[dtype] * n_params
    if dtype != "float64" and spec.cluster.device.kind == "cpu":
        per_group = (4 * (1 if quant.symmetric else 2) if spec.serve.cpu_kernels == "native"
                     else 2 * DTYPE_BYTES[dtype])
        return n_params * quant.bits // 8 + per_group * (n_params // quant.group_size)
    return expert_bytes_quantized(n_params, quant.bits, quant.group_size, quant.symmetric)


def _experts(spec: Spec, routed: int) -> dict[str, Any]:
    quant = spec.quantization.experts if spec.quantization is not None else None
    bf16 = 2 * routed
    serve_dtype = spec.serve.dtype if spec.serve is not None else "bfloat16"
    serve = (expert_bytes_quantized(routed, quant.bits, quant.group_size, quant.symmetric) if quant
             else DTYPE_BYTES[serve_dtype] * routed)
    return {
        "params": routed,
        "bytes_train": STATE_BYTES[spec.train.dtype].weights * routed,
        "bytes_bf16": bf16,
        "bytes_serve": serve,
        "serve_format": f"int{quant.bits} g{quant.group_size}{'' if quant.symmetric else ' +zp'}" if quant
        else serve_dtype,
        "serve_vs_bf16": serve / bf16 if bf16 else None,
    }


def _serve(spec: Spec, cm: CostModel) -> dict[str, Any]:
    """Serving on the spec's layout: per role its weights (experts int4 when quantized, as the serving
    kernel holds them: expert_bytes_served; the rest in `serve.dtype`), the paged KV cache it allocates
    (`n_kv_blocks` blocks of `block_size` tokens) and its step's workspace (lcc.compiler.cost.serve_memory),
    the KV cache per token, how many tokens of KV cache fit next to the weights and the workspace, and a
    memory-bound decode step: every rank reads its weights that the batch uses (all dense weights, the
    routed experts its tokens reach) and the batch's KV cache at full context, at the device's memory
    bandwidth; pipeline stages run one after the other in a step."""
    from lcc.compiler.cost.serve_memory import kv_cache_bytes, serve_workspace_bytes

    serve = spec.serve
    wb = DTYPE_BYTES[serve.dtype]
    att = spec.model.attention
    kv_local = P.local_kv_heads(spec) * att.head_dim
    device = spec.cluster.device.memory_gib * GIB
    moe = spec.model.moe
    batch = serve.max_batch
    touched = 1.0
    if moe is not None and spec.routing is not None:  # expected share of a rank's experts a step's tokens reach
        k = spec.routing.k.expected if spec.routing.k.expected is not None else spec.routing.k.max
        tokens = batch * spec.parallelism.dp  # every dp rank's sequences reach the ep ranks' experts
        touched = 1 - (1 - min(k, moe.n_experts) / moe.n_experts) ** tokens
    by_role = []
    for role in cm.roles:
        local = P.local_params(spec, role.layers, role.first, role.last)
        experts = expert_bytes_served(spec, local.experts)
        per_token = len(role.layers) * 2 * kv_local * wb
        kv = kv_cache_bytes(spec, len(role.layers))
        workspace = round(serve_workspace_bytes(spec, len(role.layers), role.last))
        weights = wb * local.dense + experts
        read = wb * local.dense + touched * experts + batch * serve.max_seq_len * per_token
        by_role.append({"role": f"pp{role.pp_rank}", "weights_bytes": weights, "kv_cache_bytes": kv,
                        "workspace_bytes": workspace, "total_bytes": weights + kv + workspace,
                        "kv_bytes_per_token": per_token,
                        "kv_tokens_fit": max(0, int((device - weights - workspace) // per_token)) if per_token
                        else None,
                        "decode_read_bytes": read, "decode_seconds": read / cm.bandwidth})
    worst = max(by_role, key=lambda r: r["total_bytes"])
    step = sum(r["decode_seconds"] for r in by_role)
    return {"dtype": serve.dtype, "max_batch": batch, "max_seq_len": serve.max_seq_len,
            "by_role": by_role, "worst_rank_bytes": worst["total_bytes"],
            "fits": worst["total_bytes"] <= device,
            "decode_step": {"batch_per_dp_rank": batch, "context": serve.max_seq_len,
                            "experts_touched_share": touched, "seconds": step,
                            "tokens_per_second": batch * spec.parallelism.dp / step if step else None}}
