"""`lcc plan search`: the valid layouts of a spec's model on a cluster, ranked by the cost model's estimated
step time (or peak memory), with bounds that skip what cannot reach the top K.

Each layout is checked by the spec's own validation rules, then estimated by the cost report: the same
step time and memory `lcc report` gives that layout. The expert exchange is searched too: a hierarchical one
is tried where the spec's `expert_exchange` rule allows it (that rule reads only the mesh and the cluster, so
its verdict is kept per mesh), and the routing's sets must map onto the nodes of each layout's EP groups.
Two lower bounds, exact consequences of the report's formulas, prune:
- memory: the worst rank holds at least the mean over pipeline ranks of the model states (weights,
  gradients, optimizer states at its ZeRO stage), which a layout's tp, pp, dp, ep and ZeRO decide; a layout
  whose bound exceeds the device memory cannot fit;
- step time: the report's step is (the slowest pipeline rank's compute + communication inside the
  pipeline) / (1 - bubble) + what follows the pipeline; the slowest rank is at least the mean, and the
  mean follows from whole-model sums (compute per layer, bytes per layer, pipeline sends), each
  communication time being linear in its bytes.
Layouts are estimated in order of their time bound; once the bound exceeds the K-th best estimate, no later
layout can enter the top K (ties included), and the rest are pruned.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from lcc.compiler.cost.memory import STATE_BYTES
from lcc.compiler.cost.model import GIB, CostModel, peak_bytes, step_seconds
from lcc.compiler.cost.params import local_params
from lcc.compiler.cost.report import cost_report
from lcc.compiler.cost.traffic import all_gather, all_reduce, links
from lcc.compiler.cost.work import act_bytes, layer_comm, microbatch_tokens
from lcc.compiler.layout import AXES, bubble_fraction, stage_ranks
from lcc.search.space import FIELDS, Layout, layouts
from lcc.search.validity import ALWAYS_ASKED_EARLY, early_refusal, layout_rules, on_cluster, problems
from lcc.spec.models import Spec


class SearchError(ValueError):
    """A request no layout satisfies: the message says why."""


@dataclass
class Estimate:
    layout: Layout
    step_seconds: float
    memory_bytes: int  # the worst rank's
    device_bytes: int
    bubble: float
    compute_seconds: float  # the slowest pipeline rank's, one step
    exposed: dict[str, float]  # communication seconds by kind and link, on that rank
    recompute: float  # extra FLOPs of recomputation over the model's
    mfu: float
    alltoall_inter_seconds: float = 0.0  # the expert exchange's inter-node bytes at the inter-node rate, a step
    # (the busiest pipeline rank's: the report's comm.expert_exchange.inter_node_seconds)
    busy: float = 0.0  # share of the step a GPU computes (the report's time.busy_fraction)
    hidden_seconds: float = 0.0  # communication hidden behind compute on the slowest pipeline rank
    exposed_seconds: float = 0.0  # communication on the step's path (time.exposed_communication_seconds)

    @property
    def headroom(self) -> float:
        return 1 - self.memory_bytes / self.device_bytes


@dataclass
class Result:
    gpus: int
    nodes: int
    per_node: int
    objective: str
    considered: int = 0  # layouts in the space (after --fix)
    invalid: int = 0  # refused by the spec's rules
    pruned_memory: int = 0  # cannot fit by the memory bound
    pruned_time: int = 0  # cannot reach the top K by the time bound
    evaluated: int = 0  # estimated by the cost report
    fitting: int = 0  # of those, fitting the device memory
    top: list[Estimate] = field(default_factory=list)


def _estimate(spec: Spec, layout: Layout) -> Estimate:
    report = cost_report(spec)
    cm = CostModel(spec)
    worst = max(cm.roles, key=lambda r: sum(cm.role_seconds(r)[:2]))
    compute, _, _ = cm.role_seconds(worst)
    c = cm.role_comm(worst)
    share = cm.dense_share(worst)
    exposed = {f"tp ({_link(cm, 'tp')})": cm.ring_seconds("tp", c["tensor_parallel"]),  # one key per kind, whatever
               f"ep all-to-all ({_link(cm, 'ep')})": cm.alltoall_seconds(c["expert_alltoall"]),  # the exchange
               f"pp sends ({_link(cm, 'pp')})": cm.ring_seconds("pp", c["pipeline_p2p"])}
    for kind in ("grad_reduce", "param_gather"):
        exposed[f"{kind.replace('_', ' ')} dp+edp ({_link(cm, 'dp')})"] = (
            cm.ring_seconds("dp", c[kind] * share) + cm.ring_seconds("edp", c[kind] * (1 - share)))
    exposed["fixed costs (collective latency)"] = sum(cm.role_latency(worst))
    hidden = cm.role_hidden(worst)
    if hidden:  # what the overlapped exchange hides comes off the all-to-all's seconds
        exposed[f"ep all-to-all ({_link(cm, 'ep')})"] -= hidden
    memory = report["memory"]
    exchange = report["comm"]["expert_exchange"] or {}
    t = report["time"]
    return Estimate(layout, t["step_seconds_estimate"], memory["worst_rank"]["peak_bytes"],
                    memory["device_bytes"], report["pipeline"]["bubble_fraction"], compute,
                    {k: v for k, v in exposed.items() if v > 0},
                    report["flops"]["per_step_with_recompute"] / report["flops"]["per_step"] - 1,
                    t["utilization"], exchange.get("inter_node_seconds", 0.0), t["busy_fraction"],
                    t["hidden_communication_seconds"], t["exposed_communication_seconds"])


def _link(cm: CostModel, axis: str) -> str:
    return "inter-node" if cm.links[axis].crosses_nodes else "intra-node"


class _SharedModel(CostModel):
    """A cost model whose pipeline ranks' parameters and per-layer work come from caches shared by layouts:
    a rank's parameters depend on tp, ep and the layers it holds; a layer's work on tp, ep, sequence
    parallelism, recomputation, the micro-batch's tokens, and of the layer only on whether it is MoE (as
    every per-layer cost function reads it)."""

    def __init__(self, spec: Spec, cache: dict[tuple, Any]):
        super().__init__(spec)
        self._cache = cache

    def _mesh(self, layer: int) -> tuple:
        par = self.par
        return (par.tp, par.pp, par.dp, par.ep, par.sequence_parallel, par.activation_checkpointing, self.tokens,
                par.expert_exchange, par.expert_overlap, self.spec.model.is_moe(layer))

    def layer_bytes(self, layer: int):  # noqa: ANN201 - as CostModel.layer_bytes
        key = ("bytes", *self._mesh(layer))
        if key not in self._cache:
            self._cache[key] = super().layer_bytes(layer)
        return self._cache[key]

    def layer_hidden(self, layer: int) -> float:
        key = ("hidden", *self._mesh(layer))
        if key not in self._cache:
            self._cache[key] = super().layer_hidden(layer)
        return self._cache[key]

    def layer_latency(self, layer: int) -> float:
        key = ("latency", self.par.zero, *self._mesh(layer))
        if key not in self._cache:
            self._cache[key] = super().layer_latency(layer)
        return self._cache[key]

    def buckets(self, role) -> int:  # noqa: ANN001 - as CostModel.buckets
        par = self.par
        key = ("buckets", par.tp, par.dp, par.ep, par.zero, self.par.n_stages,
               tuple((s, self.stage_bounds[s]) for s in role.stages))
        if key not in self._cache:
            self._cache[key] = super().buckets(role)
        return self._cache[key]

    def layer_acts(self, layer: int, policy: str) -> float:
        par = self.par
        key = ("acts", par.tp, par.sequence_parallel, self.tokens, policy, self.spec.model.is_moe(layer))
        if key not in self._cache:
            self._cache[key] = super().layer_acts(layer, policy)
        return self._cache[key]

    def layer_work(self, layer: int):  # noqa: ANN201 - as CostModel.layer_work
        par = self.par
        key = ("work", par.tp, par.ep, par.sequence_parallel, par.activation_checkpointing, self.tokens,
               par.expert_overlap, self.spec.model.is_moe(layer))
        if key not in self._cache:
            self._cache[key] = super().layer_work(layer)
        return self._cache[key]

    def local(self, role):  # noqa: ANN001, ANN201 - as CostModel.local
        par = self.par
        key = (par.tp, par.ep, tuple(role.layers), role.first, role.last)
        if key not in self._cache:
            self._cache[key] = super().local(role)
        return self._cache[key]


class _Bounds:
    """The two lower bounds and the estimates, with what layouts share computed once: each axis's link
    split (it depends on tp, pp, dp and ep only; the expert exchange's also on the exchange and the
    recomputation), whole-model sums per layer shape."""

    def __init__(self, spec: Spec):
        self.spec = spec
        self._sums: dict[tuple, tuple[float, float, float]] = {}
        self._links: dict[tuple, dict[str, Any]] = {}
        self._ep_links: dict[tuple, Any] = {}
        self._local: dict[tuple, Any] = {}
        self._local_roles: dict[tuple, Any] = {}
        self._stages: dict[tuple, list[tuple[int, int]]] = {}
        self._crossings: dict[tuple, int] = {}

    def model(self, spec: Spec) -> CostModel:
        """The cost model of a layout, with what it shares with other layouts computed once: the links of
        its mesh, its pipeline stages' layers (they follow from the per-layer times), each pipeline rank's
        parameters."""
        par = spec.parallelism
        key = (par.tp, par.pp, par.dp, par.ep)
        if key not in self._links:
            self._links[key] = {axis: links(spec, axis) for axis in AXES}
        cm = _SharedModel(spec, self._local_roles)
        cm.__dict__["links"] = self._links[key]
        ep_key = (*key, par.expert_exchange, par.activation_checkpointing)
        if ep_key not in self._ep_links:
            self._ep_links[ep_key] = cm.ep_links
        cm.__dict__["ep_links"] = self._ep_links[ep_key]
        if self._stage_key(par) in self._stages:
            cm.__dict__["stage_bounds"] = self._stages[self._stage_key(par)]
        return cm

    @staticmethod
    def _stage_key(par) -> tuple:  # noqa: ANN001
        return (par.tp, par.pp, par.dp, par.ep, par.sequence_parallel, par.activation_checkpointing,
                par.pipeline.microbatches, par.pipeline.virtual_stages, par.expert_exchange, par.expert_overlap)

    def score(self, spec: Spec) -> tuple[float, int]:
        """(the report's step estimate, the worst rank's memory)."""
        cm = self.model(spec)
        self._stages.setdefault(self._stage_key(spec.parallelism), cm.stage_bounds)
        return step_seconds(cm), peak_bytes(cm)

    def memory(self, spec: Spec) -> float:
        par = spec.parallelism
        if (par.tp, par.ep) not in self._local:
            self._local[(par.tp, par.ep)] = local_params(spec, list(range(spec.model.n_layers)), True, True)
        local = self._local[(par.tp, par.ep)]
        b = STATE_BYTES[spec.train.dtype]
        total = 0.0
        for count, ways in ((local.dense, par.dp), (local.experts, par.edp)):
            total += (b.weights * (count / ways if par.zero >= 3 else count)
                      + b.grads * (count / ways if par.zero >= 2 else count)
                      + b.optimizer * (count / ways if par.zero >= 1 else count))
        return total / par.pp

    def time(self, spec: Spec) -> float:
        par = spec.parallelism
        cm = self.model(spec)
        key = (par.tp, par.ep, par.sequence_parallel, par.activation_checkpointing, par.dp, par.pipeline.microbatches,
               par.expert_exchange, par.expert_overlap)
        if key not in self._sums:
            n = spec.model.n_layers
            moe = sum(spec.model.is_moe(i) for i in range(n))
            kinds = [(i, count) for i, count in ((next((j for j in range(n) if spec.model.is_moe(j)), None), moe),
                                                 (next((j for j in range(n) if not spec.model.is_moe(j)), None),
                                                  n - moe)) if count]
            work = sum(count * cm.layer_work(i).seconds for i, count in kinds) + cm.head_work().seconds
            comms = [(layer_comm(spec, i), count) for i, count in kinds]
            self._sums[key] = (work, sum(c.tp * k for c, k in comms), sum(c.ep * k for c, k in comms), kinds)
        work, tp_bytes, ep_bytes, kinds = self._sums[key]
        m, pp, pipe = par.pipeline.microbatches, par.pp, par.pipeline
        hidden = sum(count * cm.layer_hidden(i) for i, count in kinds)  # links differ by mesh: not in the sums
        activation = microbatch_tokens(spec) * spec.model.d_model * act_bytes(spec) / (
            par.tp if par.sequence_parallel else 1)
        sends = m * self._boundaries(pp, pipe.virtual_stages, pipe.schedule) * activation
        mean = (m * work + cm.ring_seconds("tp", m * tp_bytes) + cm.alltoall_seconds(m * ep_bytes) - m * hidden
                + cm.ring_seconds("pp", sends)) / pp
        return mean / (1 - bubble_fraction(pp, pipe.virtual_stages, m, pipe.schedule)) + self._sync(spec, cm)

    def _boundaries(self, pp: int, virtual: int, schedule: str) -> int:
        """Stage boundaries crossed between pipeline ranks, both ways, summed over the ranks (CostModel.boundaries
        of every rank): each of the n_stages - 1 boundaries twice, less those inside a rank (zbv's turn)."""
        key = (pp, virtual, schedule)
        if key not in self._crossings:
            ranks = {s: r for r in range(pp) for s in stage_ranks(pp, virtual, r, schedule)}
            self._crossings[key] = 2 * sum(ranks[s] != ranks[s + 1] for s in range(pp * virtual - 1))
        return self._crossings[key]

    def _sync(self, spec: Spec, cm: CostModel) -> float:
        """At least the mean over pipeline ranks of what follows the pipeline (ZeRO 0 and 1: gradient
        reduction and parameter gathers), each rank's bytes moving at the slower of dp's and edp's rate."""
        par = spec.parallelism
        if par.zero >= 2:
            return 0.0
        local = self._local.get((par.tp, par.ep)) or local_params(spec, list(range(spec.model.n_layers)), True, True)
        g, w = STATE_BYTES[spec.train.dtype].grads, STATE_BYTES[spec.train.dtype].weights
        nbytes = 0.0
        for count, ways in ((local.dense, par.dp), (local.experts, par.edp)):
            nbytes += all_gather(count * g, ways) if par.zero == 1 else all_reduce(count * g, ways)
            if par.zero == 1:
                nbytes += all_gather(count * w, ways)
        slowest = min(cm.ring_seconds("dp", nbytes), cm.ring_seconds("edp", nbytes))
        return slowest / par.pp


def parse_fix(text: str) -> tuple[str, object]:
    import yaml

    field_name, sep, raw = text.partition("=")
    field_name = field_name.strip()
    if not sep or field_name not in FIELDS:
        raise SearchError(f"--fix {text!r}: expected FIELD=VALUE with FIELD one of {', '.join(FIELDS)}")
    return field_name, yaml.safe_load(raw)


def search(spec: Spec, gpus: int, nodes: int | None = None, top: int = 10, objective: str = "step_time",
           fixes: list[tuple[str, object]] | tuple = (), prune: bool = True,
           progress: Callable[[str], None] | None = None) -> Result:
    """The top `top` valid, fitting layouts of `spec`'s model on `gpus` devices over `nodes` nodes (default:
    the spec's devices per node), best first (ties: in the space's order). `progress` hears what each of the
    two passes (checking every layout, then estimating the survivors) is about to do: together they take
    seconds on a large cluster."""
    say = progress or (lambda _: None)
    asked = nodes
    per_node = spec.cluster.gpus_per_node if nodes is None else gpus // nodes
    nodes = gpus // per_node if nodes is None else nodes
    if gpus < 1 or nodes < 1 or per_node < 1 or nodes * per_node != gpus:
        split = f"nodes of {per_node} (the spec's gpus_per_node; --nodes sets another)" if asked is None else \
            f"{asked} equal nodes"
        raise SearchError(f"{gpus} GPUs do not split into {split}")
    result = Result(gpus, nodes, per_node, objective)
    bounds = _Bounds(spec)
    device = round(spec.cluster.device.memory_gib * GIB)
    survivors: list[tuple[float, int, Layout, Spec]] = []
    first_refusal: str | None = None
    space = [(index, layout) for index, layout in enumerate(layouts(spec, gpus, per_node))
             if all(layout.value(f) == v for f, v in fixes)]
    if space:
        say(f"{len(space):,} layouts of {gpus} GPUs ({nodes} x {per_node}): checking each against the spec's "
            f"rules{' and the bounds' if prune else ''} ...")
    cluster = spec.cluster.model_copy(update={"nodes": nodes, "gpus_per_node": per_node})
    refused: dict[tuple, list[str]] = {}
    rules = [fn for fn in layout_rules(spec) if fn not in ALWAYS_ASKED_EARLY]  # those: their verdict is kept
    for index, layout in space:
        result.considered += 1
        early = early_refusal(spec, layout, cluster, refused)
        if early:
            result.invalid += 1
            first_refusal = first_refusal or early[0]
            continue
        candidate = on_cluster(spec, layout, nodes, per_node, cluster)
        found = problems(candidate, rules)
        if found:
            result.invalid += 1
            first_refusal = first_refusal or found[0]
            continue
        if prune and bounds.memory(candidate) > device:
            result.pruned_memory += 1
            continue
        bound = (bounds.time(candidate) if objective == "step_time" else bounds.memory(candidate)) if prune else 0.0
        survivors.append((bound, index, layout, candidate))
    if result.considered == 0:
        fixed = ", ".join(f"{f} = {v}" for f, v in fixes)
        raise SearchError(f"no layout of {gpus} GPUs ({nodes} x {per_node}) has {fixed}: the search space "
                          "(docs/search.md) holds no such value")
    if result.considered == result.invalid:
        raise SearchError(f"no valid layout of {gpus} GPUs ({nodes} x {per_node})"
                          f"{' with ' + ', '.join(f'{f} = {v}' for f, v in fixes) if fixes else ''}: every one "
                          f"breaks a rule of the spec, e.g. {first_refusal}")
    survivors.sort(key=lambda s: (s[0], s[1]))
    bound_name = "step-time" if objective == "step_time" else "memory"
    say(f"{len(survivors):,} left ({result.invalid:,} invalid, {result.pruned_memory:,} pruned by memory): "
        + (f"estimating them in order of the {bound_name} bound, until it rules out the rest ..." if prune else
           "estimating each ..."))
    best: list[tuple[float, int, tuple[Layout, Spec]]] = []
    for n, (bound, index, layout, candidate) in enumerate(survivors):
        if prune and len(best) >= top and bound > best[top - 1][0] * (1 + 1e-12):
            result.pruned_time += len(survivors) - n
            break
        step, peak = bounds.score(candidate)
        result.evaluated += 1
        if peak > device:
            continue
        result.fitting += 1
        best.append((step if objective == "step_time" else float(peak), index, (layout, candidate)))
        best.sort(key=lambda b: (b[0], b[1]))
        cut = best[top - 1][0] if len(best) >= top else None
        if cut is not None:  # keep the top K and anything tied with the K-th
            best = [b for b in best if b[0] <= cut]
    if not best:
        raise SearchError(f"no layout of {gpus} GPUs ({nodes} x {per_node}) fits {spec.cluster.device.memory_gib} "
                          f"GiB a device ({result.considered - result.invalid} valid, none fits)")
    result.top = [_estimate(candidate, layout) for _, _, (layout, candidate) in best]
    return result
