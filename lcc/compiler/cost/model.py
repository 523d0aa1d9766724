"""The analytic cost model of one layout (torch-free): per pipeline rank, the parameters and memory it
holds, its arithmetic and weight traffic (a roofline per layer), the bytes it communicates over each mesh
axis and how long that takes on the spec's network, and the estimated step time (docs/cost-model.md).
`lcc.compiler.cost.report` turns it into the `lcc.report/1` document; the search and the memory pass ask it
directly.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Any

from lcc.compiler.cost import contention, measured
from lcc.compiler.cost import params as P
from lcc.compiler.cost.exchange import exchange_passes, hierarchical_bytes
from lcc.compiler.cost.memory import STATE_BYTES
from lcc.compiler.cost.overlap import hidden
from lcc.compiler.cost.peak import role_memory as rank_memory
from lcc.compiler.cost.rates import Rates
from lcc.compiler.cost.traffic import BUCKET_ELEMENTS, Links, all_gather, all_reduce, links
from lcc.compiler.cost.work import (
    LayerComm,
    act_bytes,
    busiest_ep_share,
    edge_collectives,
    expert_forward,
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
    router_bytes,
)
from lcc.compiler.layout import bubble_fraction, partition, stage_ranks
from lcc.spec.models import Spec

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
    def __init__(self, spec: Spec, bound: str = "mid"):
        """`bound`: with a calibrated cluster, price at the measured medians (`mid`) or at one end of their
        spread (`fast`, `slow`)."""
        self.spec = spec
        self.par = spec.parallelism
        self.m = self.par.pipeline.microbatches
        self.tokens = microbatch_tokens(spec)
        calibration = spec.cluster.calibration
        self.rates = Rates(calibration, bound) if calibration is not None else None
        self.busiest = busiest_ep_share(spec)  # the busiest expert-parallel rank's slots over the mean rank's

    # ------------------------------------------------------------------------------ layout
    @cached_property
    def links(self) -> dict[str, Links]:
        return {axis: links(self.spec, axis) for axis in AXES}

    def ring_seconds(self, axis: str, nbytes: float) -> float:
        """Seconds to move `nbytes` through a ring collective over mesh axis `axis` (bandwidth only)."""
        net = self.spec.cluster.network
        return self.links[axis].seconds(nbytes, _bps(net.intra_node_gbps), _bps(net.inter_node_gbps), ring=True)

    @cached_property
    def ep_links(self) -> Links:
        """How the expert exchange's bytes split between links: a flat exchange as its EP groups' peer pairs; a
        hierarchical one as its rows between nodes and inside them (`lcc.compiler.cost.exchange`), in the
        same proportion at any number of tokens."""
        if self.par.expert_exchange != "hierarchical" or self.spec.model.moe is None:
            return self.links["ep"]
        split = hierarchical_bytes(self.spec, 1.0, self.spec.model.d_model * act_bytes(self.spec),
                                   router_bytes(self.spec))
        return Links(split.inter_share, True)

    def alltoall_seconds(self, nbytes: float) -> float:
        """Seconds of the expert exchange's `nbytes` (bandwidth only): its intra- and inter-node parts move at
        once, over the two kinds of link."""
        net = self.spec.cluster.network
        return self.ep_links.seconds(nbytes, _bps(net.intra_node_gbps), _bps(net.inter_node_gbps), ring=False)

    def alltoall_inter_seconds(self, role: Role) -> float:
        """Seconds one rank of this pipeline rank spends sending the expert exchange's inter-node bytes in a
        step (its inter-node link alone)."""
        inter = self.role_comm(role)["expert_alltoall"] * self.busiest * self.ep_links.inter_share
        return inter / _bps(self.spec.cluster.network.inter_node_gbps)

    def layer_work(self, layer: int) -> Work:
        """Arithmetic and weight- and gradient-traffic time of one layer for one micro-batch on one rank."""
        flops = 3 * layer_forward_flops(self.spec, layer) + recompute_flops(self.spec, layer)
        passes = 4 if self.par.activation_checkpointing == "full" else 3  # the busiest rank's extra expert rows
        flops += (self.busiest - 1) * passes * expert_forward(self.spec, layer)[0] * self.par.tp / self.tokens
        return Work(flops * self.tokens / self.par.tp / self.peak,
                    (layer_weight_reads(self.spec, layer) + layer_grad_bytes(self.spec, layer)) / self.bandwidth)

    def head_work(self) -> Work:
        return Work(3 * head_forward_flops(self.spec) * self.tokens / self.par.tp / self.peak,
                    head_weight_reads(self.spec) / self.bandwidth)

    def layer_bytes(self, layer: int) -> LayerComm:
        """Bytes one rank sends for one layer and one micro-batch (`layer_comm`; the search caches it)."""
        return layer_comm(self.spec, layer)

    def layer_acts(self, layer: int, policy: str) -> float:
        """Activation bytes one layer keeps per micro-batch on one rank (`layer_activations`; cached by the search)."""
        return layer_activations(self.spec, layer, policy)

    def layer_seconds(self, layer: int) -> float:
        """Compute (roofline) + communication time (less what hides behind compute) + fixed costs of one layer
        for one micro-batch on one rank (at achieved rates on a calibrated cluster)."""
        if self.rates is not None:
            return measured.layer_seconds(self, self.rates, layer) - self.layer_hidden(layer)
        comm = self.layer_bytes(layer)
        return (self.layer_work(layer).seconds + self.ring_seconds("tp", comm.tp)
                + self.alltoall_seconds(comm.ep * self.busiest)
                - self.layer_hidden(layer) + self.layer_latency(layer))

    def layer_exchange(self, layer: int) -> tuple[float, float, float]:
        """(one half's dispatch, one half's combine, one half's experts) seconds of an overlapped MoE layer's
        forward on one rank (bandwidth only: latencies are fixed costs), for lcc.compiler.cost.overlap."""
        if self.rates is not None:
            return measured.layer_exchange(self, self.rates, layer)
        comm = self.layer_bytes(layer)
        one = self.alltoall_seconds(comm.ep * self.busiest) / exchange_passes(self.par.activation_checkpointing)[0] / 2
        flops, reads = expert_forward(self.spec, layer, 0.5)
        return one, one, max(flops * self.busiest / self.peak, reads / self.bandwidth)

    def layer_hidden(self, layer: int) -> float:
        """Seconds of the expert exchange that hide behind the experts in one layer and micro-batch on one
        rank: with `expert_overlap`, in each forward (the recomputed one too); backward's exchanges are
        synchronous."""
        par = self.par
        if not (par.expert_overlap and par.ep > 1 and self.spec.model.is_moe(layer)):
            return 0.0
        forwards = 2 if par.activation_checkpointing == "full" else 1
        return forwards * hidden(*self.layer_exchange(layer))

    def role_hidden(self, role: Role) -> float:
        """Seconds of communication one step on this pipeline rank hides behind its compute."""
        return self.m * sum(self.layer_hidden(i) for i in role.layers)

    def boundaries(self, role: Role) -> int:
        """Stage boundaries this pipeline rank sends and receives across (zbv hands stage pp - 1 to stage pp on
        the same rank)."""
        stages, last = role.stages, self.par.n_stages - 1
        return sum(s < last and s + 1 not in stages for s in stages) + sum(s > 0 and s - 1 not in stages
                                                                          for s in stages)

    def latency(self, axis: str) -> float:
        """Fixed seconds of one collective or message over a mesh axis (inter-node if its groups span nodes)."""
        net = self.spec.cluster.network
        crosses = self.links[axis].crosses_nodes if axis in self.links else self.spec.cluster.nodes > 1
        return 1e-6 * (net.inter_node_latency_us if crosses else net.intra_node_latency_us)

    def layer_latency(self, layer: int) -> float:
        """Fixed costs of one layer for one micro-batch on one rank, whatever the sizes: each collective's
        latency (ZeRO-3's reduce-scatters are counted per step: `role_latency`)."""
        c = layer_collectives(self.spec, layer)
        fixed = c.tp * self.latency("tp") + c.ep * self.latency("ep") + c.zero_gathers * self.latency("dp")
        if c.ep_intra:  # a hierarchical exchange's all-to-alls inside the node
            fixed += c.ep_intra * 1e-6 * self.spec.cluster.network.intra_node_latency_us
        return fixed

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
        updated shards too). A calibrated cluster's collective times include their fixed costs: none here."""
        if self.rates is not None:
            return 0.0, 0.0
        par, m = self.par, self.m
        layers = sum(self.layer_latency(i) for i in role.layers)
        edges = edge_collectives(self.spec, role.first, role.last) * self.latency("tp" if par.tp > 1 else "dp")
        inside = m * (layers + edges) + 2 * m * self.boundaries(role) * self.latency("pp")
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
            stages = stage_ranks(self.par.pp, self.par.pipeline.virtual_stages, r, self.par.pipeline.schedule)
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
        micro-batch's backward (`microbatch`), where that lowers the peak. It need not: a stage whose gradients
        are one bucket holds them whole until its backward ends either way, and its pieces of earlier
        micro-batches beside them (ZeRO-3's layers are their own buckets). With one micro-batch the two are
        the same."""
        if self.par.zero < 2 or self.m == 1:
            return "step"
        device = self.spec.cluster.device.memory_gib * GIB
        whole = max(self.role_memory(r, whole_grads=True)["peak_bytes"] for r in self.roles)
        if whole <= device:
            return "step"
        pieces = max(self.role_memory(r, whole_grads=False)["peak_bytes"] for r in self.roles)
        return "microbatch" if pieces < whole else "step"

    @cached_property
    def memory_answers(self) -> dict[tuple, Any]:
        """`role_memory`'s answers, and lcc.compiler.cost.peak's layer blocks, each computed once."""
        return {}

    def role_memory(self, role: Role, zero: int | None = None, recompute: str | None = None,
                    whole_grads: bool | None = None) -> dict[str, Any]:
        """One rank of this pipeline rank: model states, activations and peak (lcc.compiler.cost.peak), at the
        layout's ZeRO stage and checkpointing or the ones given; `whole_grads`: ZeRO 2-3 gradients accumulate
        whole over the micro-batches (default: as `grad_reduce_when` decides for the layout's own stage)."""
        zero = self.par.zero if zero is None else zero
        policy = recompute or self.par.activation_checkpointing
        if whole_grads is None:
            whole_grads = zero == self.par.zero and zero >= 2 and self.m > 1 and self.grad_reduce_when == "step"
        key = (role.pp_rank, zero, policy, zero >= 2 and whole_grads)
        if key not in self.memory_answers:
            self.memory_answers[key] = rank_memory(self, role, zero, policy, key[3])
        return self.memory_answers[key]

    def memory(self) -> dict[str, Any]:
        by_role = [self.role_memory(r) for r in self.roles]
        worst = max(by_role, key=lambda r: (r["peak_bytes"], -r["rank"]))
        device = round(self.spec.cluster.device.memory_gib * GIB)

        def peak(zero: int, policy: str) -> int:
            return max(self.role_memory(r, zero, policy, whole_grads=False)["peak_bytes"] for r in self.roles)

        plain, sharded = peak(0, "none"), peak(3, "full")
        return {
            "device_bytes": device,
            "fits": worst["peak_bytes"] <= device,
            "gradient_reduction": self.grad_reduce_when,
            "worst_rank": worst,
            "by_role": by_role,
            "comparison": {
                "plain_dp_no_checkpointing_bytes": plain,
                "zero3_full_checkpointing_bytes": sharded,
                "this_layout_bytes": worst["peak_bytes"],
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
            c = self.layer_bytes(i)
            tp, ep = tp + c.tp * m, ep + c.ep * m
        activation = self.tokens * spec.model.d_model * act_bytes(spec) / (par.tp if par.sequence_parallel else 1)
        sends = self.boundaries(role)
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
            "expert_alltoall_inter_node_share": self.ep_links.inter_share,
        }

    def _inter_share(self, kind: str, dense_share: float) -> float:
        if kind == "tensor_parallel":
            return self.links["tp"].inter_share
        if kind == "expert_alltoall":
            return self.ep_links.inter_share
        if kind == "pipeline_p2p":
            return self.links["pp"].inter_share
        return dense_share * self.links["dp"].inter_share + (1 - dense_share) * self.links["edp"].inter_share

    @cached_property
    def compute_stretch(self) -> float:
        """Compute time in the pipeline over its time at the all-busy calibrated rate (lcc.compiler.cost.contention)."""
        return contention.compute_stretch(self)

    def role_work(self, role: Role) -> tuple[float, float, float]:
        """(compute, arithmetic, weight reads) seconds of one step on this pipeline rank: compute sums each layer's
        roofline over the micro-batches; the other two are the sums of its parts, for the report. At
        achieved rates (a calibrated cluster) all three are the measured operations' time."""
        if self.rates is not None:
            compute = measured.role_seconds(self, self.rates, role)[0]
            return compute, compute, 0.0
        parts = [self.layer_work(i) for i in role.layers] + ([self.head_work()] if role.last else [])
        return (self.m * sum(w.seconds for w in parts), self.m * sum(w.arithmetic for w in parts),
                self.m * sum(w.memory for w in parts))

    def role_seconds(self, role: Role) -> tuple[float, float, float]:
        """(compute, communication and fixed costs inside the pipeline less what hides behind compute, after
        it) for one step."""
        if self.rates is not None:
            compute, inside, after = measured.role_seconds(self, self.rates, role)
            return compute, inside - self.role_hidden(role), after
        c = self.role_comm(role)
        share = self.dense_share(role)
        fixed_inside, sync = self.role_latency(role)
        inside = (self.ring_seconds("tp", c["tensor_parallel"]) + self.ring_seconds("pp", c["pipeline_p2p"])
                  + self.alltoall_seconds(c["expert_alltoall"] * self.busiest) + fixed_inside - self.role_hidden(role))
        for kind in ("grad_reduce", "param_gather"):
            sync += (self.ring_seconds("dp", c[kind] * share) + self.ring_seconds("edp", c[kind] * (1 - share)))
        if self.par.zero >= 2:  # per-micro-batch reductions and gathers happen inside the pipeline
            inside, sync = inside + sync, 0.0
        return self.role_work(role)[0], inside, sync


def step_seconds(cm: CostModel) -> float:
    """The estimated step: the slowest pipeline rank's compute and communication inside the pipeline,
    stretched by the bubble, then what follows the pipeline (gradient reduction, parameter gathers)."""
    par = cm.par
    bubble = bubble_fraction(par.pp, par.pipeline.virtual_stages, par.pipeline.microbatches, par.pipeline.schedule)
    seconds = [cm.role_seconds(r) for r in cm.roles]
    stretch = cm.compute_stretch
    return max(c * stretch + i for c, i, _ in seconds) / (1 - bubble) + max(s for _, _, s in seconds)


def peak_bytes(cm: CostModel) -> int:
    """The worst rank's peak memory (what `memory()["worst_rank"]` reports)."""
    return max(cm.role_memory(r)["peak_bytes"] for r in cm.roles)


