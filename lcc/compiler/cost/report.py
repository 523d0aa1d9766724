"""The cost report: parameters, per-rank memory, FLOPs, communication, pipeline bubble and step time.

`cost_report(spec)` returns plain JSON data in the documented schema `lcc.report/1` (docs/report.md).
It never imports torch, so `lcc report` answers instantly even for 2,048-rank layouts.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Any

from lcc.compiler.cost import params as P
from lcc.compiler.cost.memory import STATE_BYTES, ModelStates, model_states
from lcc.compiler.cost.traffic import BUCKET_ELEMENTS, Links, all_gather, all_reduce, links
from lcc.compiler.cost.work import (
    act_bytes,
    edge_collectives,
    head_forward_flops,
    head_weight_reads,
    layer_activations,
    layer_collectives,
    layer_comm,
    layer_forward_flops,
    layer_grad_bytes,
    layer_weight_reads,
    microbatch_tokens,
    recompute_flops,
)
from lcc.compiler.layout import bubble_fraction, inflight_chunks, partition, stage_ranks
from lcc.spec.models import DTYPE_BYTES, Spec

SCHEMA = "lcc.report/1"
GIB = 2**30
AXES = ("tp", "dp", "pp", "ep", "edp")
STEP_COLLECTIVES = 4  # once per step, over all ranks: router statistics, gradient norm, loss, memory peaks


def _bps(gbps: float) -> float:
    return gbps * 1e9 / 8


@dataclass(frozen=True)
class Role:
    """One pipeline rank: all ranks with the same pp index hold the same amounts."""

    pp_rank: int
    stages: list[int]
    layers: list[int]
    first: bool  # holds the embedding
    last: bool  # holds the final norm and LM head


@dataclass(frozen=True)
class Work:
    """Time of some work on one rank: arithmetic at peak FLOP/s, and weight reads at memory bandwidth. Each
    layer is a roofline: it takes whichever is longer (the two overlap)."""

    arithmetic: float
    memory: float

    @property
    def seconds(self) -> float:
        return max(self.arithmetic, self.memory)


class CostModel:
    def __init__(self, spec: Spec):
        self.spec = spec
        self.par = spec.parallelism
        self.m = self.par.pipeline.microbatches
        self.tokens = microbatch_tokens(spec)

    # ------------------------------------------------------------------------------ layout
    @cached_property
    def links(self) -> dict[str, Links]:
        return {axis: links(self.spec, axis) for axis in AXES}

    def _ring_seconds(self, axis: str, nbytes: float) -> float:
        net = self.spec.cluster.network
        return self.links[axis].seconds(nbytes, _bps(net.intra_node_gbps), _bps(net.inter_node_gbps), ring=True)

    def _a2a_seconds(self, nbytes: float) -> float:
        net = self.spec.cluster.network
        return self.links["ep"].seconds(nbytes, _bps(net.intra_node_gbps), _bps(net.inter_node_gbps), ring=False)

    def layer_work(self, layer: int) -> Work:
        """Arithmetic and weight- and gradient-traffic time of one layer for one micro-batch on one rank."""
        flops = 3 * layer_forward_flops(self.spec, layer) + recompute_flops(self.spec, layer)
        return Work(flops * self.tokens / self.par.tp / self.peak,
                    (layer_weight_reads(self.spec, layer) + layer_grad_bytes(self.spec, layer)) / self.bandwidth)

    def head_work(self) -> Work:
        return Work(3 * head_forward_flops(self.spec) * self.tokens / self.par.tp / self.peak,
                    head_weight_reads(self.spec) / self.bandwidth)

    def layer_seconds(self, layer: int) -> float:
        """Compute (roofline) + communication time + fixed costs of one layer for one micro-batch on one rank."""
        comm = layer_comm(self.spec, layer)
        return (self.layer_work(layer).seconds + self._ring_seconds("tp", comm.tp) + self._a2a_seconds(comm.ep)
                + self.layer_latency(layer))

    def latency(self, axis: str) -> float:
        """Fixed seconds of one collective or message over a mesh axis (inter-node if its groups span nodes)."""
        net = self.spec.cluster.network
        crosses = self.links[axis].crosses_nodes if axis in self.links else self.spec.cluster.nodes > 1
        return 1e-6 * (net.inter_node_latency_us if crosses else net.intra_node_latency_us)

    def layer_latency(self, layer: int) -> float:
        """Fixed costs of one layer for one micro-batch on one rank, whatever the sizes: each collective's
        latency (ZeRO-3's reduce-scatters are counted per step: `role_latency`)."""
        c = layer_collectives(self.spec, layer)
        return c.tp * self.latency("tp") + c.ep * self.latency("ep") + c.zero_gathers * self.latency("dp")

    def buckets(self, role: Role) -> int:
        """Gradient reductions after backward on one rank of this pipeline rank, per stage it holds: buckets of
        dense gradients over dp and of expert gradients over edp (those ZeRO-3 leaves to the programs
        excepted), and one for the parameters whose tokens were split over tp (routers, norms under sequence
        parallelism)."""
        par, last = self.par, self.par.n_stages - 1
        count = 0
        for s in role.stages:
            local = (self.local(role) if len(role.stages) == 1 else
                     P.local_params(self.spec, list(range(*self.stage_bounds[s])), s == 0, s == last))
            count += int(par.tp > 1)
            if par.zero < 3:
                for elements, ways in ((local.dense, par.dp), (local.experts, par.edp)):
                    if ways > 1 and elements:
                        count += -(-int(elements) // BUCKET_ELEMENTS)
        return count

    def role_latency(self, role: Role) -> tuple[float, float]:
        """(fixed costs inside the pipeline, after it) of one step on this pipeline rank: the latency of its
        layers' and edges' collectives per micro-batch, two pipeline messages per stage boundary per
        micro-batch, and the gradient buckets and step-level reductions (ZeRO 1 gathers each bucket's
        updated shards too)."""
        par, m = self.par, self.m
        layers = sum(self.layer_latency(i) for i in role.layers)
        edges = edge_collectives(self.spec, role.first, role.last) * self.latency("tp" if par.tp > 1 else "dp")
        boundaries = sum(s < par.n_stages - 1 for s in role.stages) + sum(s > 0 for s in role.stages)
        inside = m * (layers + edges) + 2 * m * boundaries * self.latency("pp")
        reductions = self.buckets(role) * (2 if par.zero == 1 else 1)
        scatters = sum(layer_collectives(self.spec, i).zero_scatters for i in role.layers)
        per_microbatch = par.zero >= 2 and self.grad_reduce_when == "microbatch"
        inside += (m if per_microbatch else 1) * scatters * self.latency("dp")
        if per_microbatch:
            inside += (m - 1) * self.buckets(role) * self.latency("dp")
        return inside, reductions * self.latency("dp") + STEP_COLLECTIVES * self.latency("world")

    @property
    def peak(self) -> float:
        return self.spec.cluster.device.peak_tflops * 1e12

    @property
    def bandwidth(self) -> float:
        """Device memory bandwidth, bytes/s."""
        return self.spec.cluster.device.memory_tbps * 1e12

    def head_seconds(self) -> float:
        return self.head_work().seconds

    @cached_property
    def stage_bounds(self) -> list[tuple[int, int]]:
        """Layers [start, end) of each global stage, balanced by estimated time (head on the last)."""
        costs = [self.layer_seconds(i) for i in range(self.spec.model.n_layers)]
        costs[-1] += self.head_seconds()
        return partition(costs, self.par.n_stages)

    @cached_property
    def roles(self) -> list[Role]:
        out = []
        n_stages = self.par.n_stages
        for r in range(self.par.pp):
            stages = stage_ranks(self.par.pp, self.par.pipeline.virtual_stages, r)
            layers = [i for s in stages for i in range(*self.stage_bounds[s])]
            out.append(Role(r, stages, layers, 0 in stages, n_stages - 1 in stages))
        return out

    def stage_imbalance(self) -> float:
        """Slowest stage time over the mean stage time (1.0 = perfectly balanced)."""
        times = []
        for s, (a, b) in enumerate(self.stage_bounds):
            t = sum(self.layer_seconds(i) for i in range(a, b))
            times.append(t + (self.head_seconds() if s == len(self.stage_bounds) - 1 else 0.0))
        return max(times) / (sum(times) / len(times))

    def local(self, role: Role) -> P.LocalParams:
        """The parameters one rank of this pipeline rank holds."""
        return P.local_params(self.spec, role.layers, role.first, role.last)

    # ------------------------------------------------------------------------------ memory
    @cached_property
    def grad_reduce_when(self) -> str:
        """ZeRO 2 and 3 reduce-scatter gradients once per step (`step`), accumulating them whole over the
        micro-batches, when every rank's memory with whole gradients fits the device; otherwise in every
        micro-batch's backward (`microbatch`). With one micro-batch the two are the same."""
        if self.par.zero < 2 or self.m == 1:
            return "step"
        device = self.spec.cluster.device.memory_gib * GIB
        whole = max(self.role_memory(r, whole_grads=True)["total_bytes"] for r in self.roles)
        return "step" if whole <= device else "microbatch"

    def role_memory(self, role: Role, zero: int | None = None, recompute: str | None = None,
                    whole_grads: bool | None = None) -> dict[str, Any]:
        spec, par = self.spec, self.par
        zero = par.zero if zero is None else zero
        policy = recompute or par.activation_checkpointing
        local = self.local(role)
        dtype = spec.train.dtype
        states = model_states(local.dense, dtype, zero, par.dp) + model_states(local.experts, dtype, zero, par.edp)
        if zero >= 2 and (whole_grads if whole_grads is not None else
                          zero == par.zero and self.grad_reduce_when == "step" and self.m > 1):
            # gradients accumulate whole over the micro-batches, then leave as pieces
            states = ModelStates(states.weights, STATE_BYTES[dtype].grads * (local.dense + local.experts),
                                 states.optimizer)
        gathered = gathered_grads = 0.0
        if zero >= 3:  # the layer in use and the prefetched next one, unsharded; one layer's full grads
            b = STATE_BYTES[dtype]
            largest = local.largest_layer_dense + local.largest_layer_experts
            gathered, gathered_grads = largest * 2 * b.weights, largest * b.grads
        chunks = inflight_chunks(par.pipeline.schedule, par.pp, par.pipeline.virtual_stages, self.m, role.pp_rank)
        per_chunk = sum(layer_activations(spec, i, policy) for i in role.layers) / len(role.stages)
        activations = chunks * per_chunk
        if policy == "full":  # the layer being recomputed holds its full activations for a moment
            activations += max(layer_activations(spec, i, "none") for i in role.layers)
        if role.last:  # logits and the float32 softmax of the cross-entropy, one micro-batch at a time
            activations += self.tokens * spec.model.vocab_size / par.tp * (act_bytes(spec) + 4)
        weights = states.weights + gathered
        grads = states.grads + gathered_grads
        total = weights + grads + states.optimizer + activations
        return {
            "role": f"pp{role.pp_rank}",
            "rank": role.pp_rank * par.dp * par.tp,
            "stages": role.stages,
            "layers": [list(self.stage_bounds[s]) for s in role.stages],
            "inflight_microbatches": chunks,
            "params_dense": local.dense,
            "params_experts": local.experts,
            "weights_bytes": round(weights),
            "weights_gathered_bytes": round(gathered),
            "grads_bytes": round(grads),
            "grads_gathered_bytes": round(gathered_grads),
            "optimizer_bytes": round(states.optimizer),
            "activations_bytes": round(activations),
            "total_bytes": round(total),
        }

    def memory(self) -> dict[str, Any]:
        by_role = [self.role_memory(r) for r in self.roles]
        worst = max(by_role, key=lambda r: (r["total_bytes"], -r["rank"]))
        device = round(self.spec.cluster.device.memory_gib * GIB)

        def peak(zero: int, policy: str) -> int:
            return max(self.role_memory(r, zero, policy, whole_grads=False)["total_bytes"] for r in self.roles)

        plain, sharded = peak(0, "none"), peak(3, "full")
        return {
            "device_bytes": device,
            "fits": worst["total_bytes"] <= device,
            "gradient_reduction": self.grad_reduce_when,
            "worst_rank": worst,
            "by_role": by_role,
            "comparison": {
                "plain_dp_no_checkpointing_bytes": plain,
                "zero3_full_checkpointing_bytes": sharded,
                "this_layout_bytes": worst["total_bytes"],
                "zero3_full_checkpointing_reduction": 1 - sharded / plain,
            },
        }

    # --------------------------------------------------------------------------- flops, comm
    def dense_share(self, role: Role) -> float:
        """Share of this role's local parameters that are dense (their gradients travel over dp, not edp)."""
        local = self.local(role)
        return local.dense / max(local.dense + local.experts, 1)

    def role_comm(self, role: Role) -> dict[str, float]:
        """Bytes one rank of this pipeline rank sends per step, by collective kind."""
        spec, par, m = self.spec, self.par, self.m
        tp = ep = 0.0
        for i in role.layers:
            c = layer_comm(spec, i)
            tp, ep = tp + c.tp * m, ep + c.ep * m
        activation = self.tokens * spec.model.d_model * act_bytes(spec) / (par.tp if par.sequence_parallel else 1)
        sends = sum(s < par.n_stages - 1 for s in role.stages) + sum(s > 0 for s in role.stages)
        local = self.local(role)
        g = STATE_BYTES[spec.train.dtype].grads
        w = STATE_BYTES[spec.train.dtype].weights
        grads = gather = 0.0
        for count, ways in ((local.dense, par.dp), (local.experts, par.edp)):
            if par.zero >= 2:  # reduce-scattered once per step, or in each micro-batch's backward
                once = self.grad_reduce_when == "step"
                grads += (1 if once else m) * all_gather(count * g, ways)
            elif par.zero == 1:  # full gradients accumulate; only the owner of a shard needs its sum
                grads += all_gather(count * g, ways)
            else:
                grads += all_reduce(count * g, ways)
            if par.zero == 3:  # weights gathered for forward and again for backward, every micro-batch
                gather += 2 * m * all_gather(count * w, ways)
            elif par.zero >= 1:  # updated shards gathered once after the optimizer step
                gather += all_gather(count * w, ways)
        return {"tensor_parallel": tp, "expert_alltoall": ep, "pipeline_p2p": m * sends * activation,
                "grad_reduce": grads, "param_gather": gather}

    def comm(self) -> dict[str, Any]:
        per_pp = self.par.dp * self.par.tp
        kinds = {"tensor_parallel": 0.0, "expert_alltoall": 0.0, "pipeline_p2p": 0.0, "grad_reduce": 0.0,
                 "param_gather": 0.0}
        inter = 0.0
        for role in self.roles:
            c = self.role_comm(role)
            share = self.dense_share(role)
            for kind, nbytes in c.items():
                kinds[kind] += per_pp * nbytes
                inter += per_pp * nbytes * self._inter_share(kind, share)
        total = sum(kinds.values())
        return {
            "bytes_per_step": {
                "by_kind": kinds,
                "by_link": {"intra_node": total - inter, "inter_node": inter},
                "total": total,
            },
            "expert_alltoall_inter_node_share": self.links["ep"].inter_share,
        }

    def _inter_share(self, kind: str, dense_share: float) -> float:
        if kind == "tensor_parallel":
            return self.links["tp"].inter_share
        if kind == "expert_alltoall":
            return self.links["ep"].inter_share
        if kind == "pipeline_p2p":
            return self.links["pp"].inter_share
        return dense_share * self.links["dp"].inter_share + (1 - dense_share) * self.links["edp"].inter_share

    def role_work(self, role: Role) -> tuple[float, float, float]:
        """(compute, arithmetic, weight reads) seconds of one step on this pipeline rank: compute sums each layer's
        roofline over the micro-batches; the other two are the sums of its parts, for the report."""
        parts = [self.layer_work(i) for i in role.layers] + ([self.head_work()] if role.last else [])
        return (self.m * sum(w.seconds for w in parts), self.m * sum(w.arithmetic for w in parts),
                self.m * sum(w.memory for w in parts))

    def role_seconds(self, role: Role) -> tuple[float, float, float]:
        """(compute, communication and fixed costs inside the pipeline, after it) for one step."""
        c = self.role_comm(role)
        share = self.dense_share(role)
        fixed_inside, sync = self.role_latency(role)
        inside = (self._ring_seconds("tp", c["tensor_parallel"]) + self._a2a_seconds(c["expert_alltoall"])
                  + self._ring_seconds("pp", c["pipeline_p2p"]) + fixed_inside)
        for kind in ("grad_reduce", "param_gather"):
            sync += (self._ring_seconds("dp", c[kind] * share) + self._ring_seconds("edp", c[kind] * (1 - share)))
        if self.par.zero >= 2:  # per-micro-batch reductions and gathers happen inside the pipeline
            inside, sync = inside + sync, 0.0
        return self.role_work(role)[0], inside, sync


def step_seconds(cm: CostModel) -> float:
    """The estimated step: the slowest pipeline rank's compute and communication inside the pipeline,
    stretched by the bubble, then what follows the pipeline (gradient reduction, parameter gathers)."""
    par = cm.par
    bubble = bubble_fraction(par.pp, par.pipeline.virtual_stages, par.pipeline.microbatches)
    seconds = [cm.role_seconds(r) for r in cm.roles]
    return max(c + i for c, i, _ in seconds) / (1 - bubble) + max(s for _, _, s in seconds)


def peak_bytes(cm: CostModel) -> int:
    """The worst rank's memory (what `memory()["worst_rank"]` reports)."""
    return max(cm.role_memory(r)["total_bytes"] for r in cm.roles)


def cost_report(spec: Spec) -> dict[str, Any]:
    cm = CostModel(spec)
    par, moe = spec.parallelism, spec.model.moe
    k = spec.routing.k if spec.routing is not None else None
    n_layers = spec.model.n_layers
    device = spec.cluster.device
    layers = [P.layer_params(spec, i) for i in range(n_layers)]
    routed = sum(p.experts for p in layers)

    bubble = bubble_fraction(par.pp, par.pipeline.virtual_stages, par.pipeline.microbatches)
    busiest = max((cm.role_work(r) for r in cm.roles), key=lambda w: w[0])
    step = step_seconds(cm)
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
            "virtual_stages": par.pipeline.virtual_stages,
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
        "comm": cm.comm(),
        "pipeline": {"bubble_fraction": bubble, "schedule": par.pipeline.schedule},
        "time": {
            "step_seconds_estimate": step,
            "compute_seconds": busiest[0],
            "arithmetic_seconds": busiest[1],
            "weight_read_seconds": busiest[2],
            "fixed_seconds": max(sum(cm.role_latency(r)) for r in cm.roles),
            "tokens_per_second": tokens_per_step / step,
            "utilization": model_flops / (step * par.world_size * cm.peak),
        },
        "serve": _serve(spec, cm) if spec.serve is not None else None,
        "moe": None if moe is None else {"n_experts": moe.n_experts, "n_groups": moe.n_groups,
                                         "experts_per_rank": moe.n_experts // par.ep},
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
    kernel holds them: expert_bytes_served; the rest in `serve.dtype`), the KV cache per token and at
    `max_batch x max_seq_len`, how many tokens of KV cache fit next to the weights, and a memory-bound
    decode step: every rank reads its weights that the batch uses (all dense weights, the routed experts
    its tokens reach) and the batch's KV cache at full context, at the device's memory bandwidth; pipeline
    stages run one after the other in a step."""
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
        kv = batch * serve.max_seq_len * per_token
        weights = wb * local.dense + experts
        read = wb * local.dense + touched * experts + kv
        by_role.append({"role": f"pp{role.pp_rank}", "weights_bytes": weights, "kv_cache_bytes": kv,
                        "total_bytes": weights + kv, "kv_bytes_per_token": per_token,
                        "kv_tokens_fit": max(0, int((device - weights) // per_token)) if per_token else None,
                        "decode_read_bytes": read, "decode_seconds": read / cm.bandwidth})
    worst = max(by_role, key=lambda r: r["total_bytes"])
    step = sum(r["decode_seconds"] for r in by_role)
    return {"dtype": serve.dtype, "max_batch": batch, "max_seq_len": serve.max_seq_len,
            "by_role": by_role, "worst_rank_bytes": worst["total_bytes"],
            "fits": worst["total_bytes"] <= device,
            "decode_step": {"batch_per_dp_rank": batch, "context": serve.max_seq_len,
                            "experts_touched_share": touched, "seconds": step,
                            "tokens_per_second": batch * spec.parallelism.dp / step if step else None}}
