"""The plan's types. Every field is data the runtime executes or a user reads; nothing travels as an
untyped dict except `Plan.cost`, the `lcc.report/1` document shown to users (docs/cost-model.md), which
the runtime never reads.

Mesh axes: `pp`, `dp`, `tp` (the rank grid), `ep` and `edp` (the same ranks folded for experts), and
derived groups: `kv` (consecutive tp ranks that hold the same key/value heads when there are fewer kv
heads than tp ranks), `stage` (every rank of a pipeline stage, dp x tp) and `world`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

PLAN_VERSION = 4


@dataclass(frozen=True)
class Shard:
    """A tensor split into `parts` equal slices along `dim`; part = axis index * parts // axis size."""

    dim: int
    axis: str
    parts: int

    def part(self, coords: dict[str, int], sizes: dict[str, int]) -> int:
        return coords[self.axis] * self.parts // sizes[self.axis]


def chunk_size(numel: int, parts: int) -> int:
    """Elements of each ZeRO piece of a tensor of `numel` elements: the last piece is padded to it."""
    return math.ceil(numel / parts) if numel else 0


@dataclass(frozen=True)
class Zero:
    """ZeRO: the local tensor flattened and cut into `parts` pieces along `axis` (dp or edp)."""

    axis: str
    parts: int


@dataclass(frozen=True)
class ServeFormat:
    format: str
    packed: list[int]
    packed_dtype: str
    scales: list[int]
    scales_dtype: str
    zeros: list[int] | None


@dataclass
class Parameter:
    name: str
    global_shape: list[int]
    local_shape: list[int]
    stages: list[int]  # global stages holding it (a tied head on another stage: two)
    shard: Shard | None = None  # None: replicated
    expert: bool = False
    grad_reduce: list[str] = field(default_factory=list)  # mesh axes its gradient is summed over
    zero: Zero | None = None
    serve: ServeFormat | None = None

    @property
    def local_numel(self) -> int:
        return math.prod(self.local_shape)


@dataclass(frozen=True)
class Buffer:
    """State that is not trained by gradients (the routers' load biases)."""

    name: str
    shape: list[int]
    dtype: str
    stages: list[int]


@dataclass(frozen=True)
class Collective:
    """One collective call. `shape` is the tensor a rank contributes (-1: rows that vary per call, as in
    an all-to-all); `dtype` names a dtype or `compute` / `params` (the plan's precision)."""

    op: str  # all_reduce | all_reduce_max | all_gather | reduce_scatter | all_to_all | send | recv
    axis: str  # tp | dp | ep | edp | stage | world | pp
    site: str  # where: a call site of the traced graph, `loss`, `gradients`, ...
    what: str = ""
    shape: list[int] | None = None
    dtype: str | None = None


def is_zero3_scatter(c: Collective) -> bool:
    """A ZeRO-3 gradient reduce-scatter in a program's backward (the only reduce-scatters over dp or edp
    there): once per step, in the stage's last backward, when the plan's memory says `grad_reduce: step`."""
    return c.op == "reduce_scatter" and c.axis in ("dp", "edp")


@dataclass
class GradBucket:
    """Gradients reduced together, issued as soon as backward has produced all of them: `op` over
    `axes[0]` (all_reduce; ZeRO 2: reduce_scatter into this rank's pieces), then an all_reduce over each
    further axis of the result. `when`: `step` (once per optimizer step, in the stage's last backward:
    gradients accumulate whole over the micro-batches) or `microbatch` (ZeRO 2 where the whole gradients
    would not fit: in every backward of the stage, the pieces accumulated)."""

    op: str  # all_reduce | reduce_scatter
    axes: list[str]
    params: list[str]
    elements: int  # what a rank contributes to the first collective (reduce_scatter: every piece, padded)
    when: str = "step"

    def collectives(self, piece: int, dtype: str) -> list[Collective]:
        """What reducing the bucket issues, in order (`piece`: elements of this rank's pieces)."""
        what = f"{len(self.params)} parameters"
        return [Collective(self.op if i == 0 else "all_reduce", axis, "gradients", what,
                           [self.elements if i == 0 else piece if self.op == "reduce_scatter" else self.elements],
                           dtype) for i, axis in enumerate(self.axes)]


@dataclass
class StepAction:
    """What a pipeline rank does after its last backward (and its stages' REDUCE_GRAD), in order. Kinds:
    SUM_TIED_GRAD (the tied embedding's two copies, first and last stage), REDUCE_ROUTER_STATS (loads and
    k histograms of the rank's MoE layers over their stage), CLIP_GRAD_NORM, OPTIMIZER_STEP, UNSHARD
    (ZeRO 1/2: the updated pieces of `stage` all-gathered into whole parameters), UPDATE_BIAS,
    REDUCE_METRICS. `collectives` are exactly what the action issues, in order."""

    kind: str
    stage: int | None = None
    params: list[str] = field(default_factory=list)
    collectives: list[Collective] = field(default_factory=list)

    def __str__(self) -> str:
        where = "" if self.stage is None else f" stage {self.stage}"
        comm = ", ".join(f"{c.op}({c.axis}) {c.shape}" for c in self.collectives)
        return f"{self.kind}{where}" + (f": {comm}" if comm else "")


@dataclass
class Role:
    """A pipeline stage (or virtual stage): one program, run by every rank of that stage."""

    name: str
    stage: int
    pp_rank: int
    layers: list[int]  # [first, end)
    embedding: bool
    head: bool
    program: str  # path inside the plan folder
    parameters: list[str]
    buffers: list[str]
    forward: list[Collective]  # per micro-batch, in issue order (the loss's, on the last stage, last)
    backward: list[Collective]  # per micro-batch, as the ops' autograd rules imply (order follows autograd)
    grad_buckets: list[GradBucket]
    # program functions the runtime compiles with torch.compile (Inductor); the others run eagerly
    compiled: list[str] = field(default_factory=list)


@dataclass
class Mesh:
    axes: list[str]
    sizes: list[int]
    ep: int
    edp: int
    gpus_per_node: int
    rank_order: str
    kv: int = 1  # tp ranks holding the same key/value heads (fewer kv heads than tp): their gradients add
    # the hierarchical expert exchange (parallelism.expert_exchange): an EP group as nodes x ranks per node;
    # ep_inter joins the EP ranks at the same place on each node, ep_intra the EP ranks of one node (1 x 1: flat)
    ep_inter: int = 1
    ep_intra: int = 1

    def size(self, axis: str) -> int:
        sizes = dict(zip(self.axes, self.sizes, strict=True))
        sizes.update(ep=self.ep, edp=self.edp, stage=sizes["dp"] * sizes["tp"], world=math.prod(self.sizes),
                     kv=self.kv, ep_inter=self.ep_inter, ep_intra=self.ep_intra)
        return sizes[axis]


@dataclass
class RankTable:
    columns: list[str]
    rows: list[list[int]]
    roles_of_pp_rank: dict[str, list[str]]

    def coords(self, rank: int) -> dict[str, int]:
        return dict(zip(self.columns, self.rows[rank], strict=True))


@dataclass(frozen=True)
class Simulation:
    makespan: int
    busy: list[int]
    bubble_fraction: float
    cost_units: dict[str, int]


@dataclass
class Schedule:
    kind: str
    microbatches: int
    virtual_stages: int
    n_stages: int
    simulation: Simulation
    actions: list[list[str]]  # per pipeline rank: torch.distributed.pipelining actions with send/recv
    step: list[list[StepAction]]  # per pipeline rank: after the last backward
    files: dict[str, str]
    boundary_shape: list[int]  # the activation a stage sends the next per micro-batch, as a rank holds it


@dataclass(frozen=True)
class Validation:
    """Every `every` optimizer steps, after the step: the schedule's forward actions alone (F, SEND_F, RECV_F,
    in order) over `batches` global batches of the validation split (the same ones every time, cut into
    units as the training batches are), then `reduce`: the summed cross-entropy of the last stage's tp rank 0
    over the world. The loss is that sum over the batches' target tokens."""

    every: int
    batches: int
    reduce: Collective


@dataclass(frozen=True)
class Data:
    """The data order (docs/model.md): each step's global batch cut into dp x microbatches units."""

    seq_len: int
    global_batch: int
    units_per_step: int
    microbatches: int  # units per data-parallel rank
    sequences_per_unit: int
    validation: Validation | None = None  # train.eval_every


@dataclass(frozen=True)
class Precision:
    """Parameters and optimizer states in `params`; programs compute in `compute` (autocast when they
    differ); cross-entropy, routing and gradient-norm reductions in at least float32."""

    params: str
    compute: str
    autocast: bool


@dataclass(frozen=True)
class Experts:
    n_experts: int
    n_groups: int
    ep: int
    edp: int
    experts_per_rank: int
    rule: str
    group_ep_ranks: list[list[int]]
    alltoall_inter_node_share: float
    exchange: str = "flat"  # parallelism.expert_exchange: flat | hierarchical
    nodes: int = 1  # nodes one EP group spans
    ranks_per_node: int = 1  # its ranks on each node (the hierarchical exchange's intra-node group)
    sets: int = 1  # routing.groups.sets: consecutive groups a node holds whole
    kept_sets: int = 1  # sets a token may use (routing.groups.max_sets, or every set)
    token_nodes: int = 1  # the most nodes one token's experts can span


@dataclass(frozen=True)
class Partition:
    stage_layers: list[list[int]]
    stage_imbalance: float


@dataclass(frozen=True)
class Memory:
    zero: int
    activation_checkpointing: str
    recomputed: list[str]
    sharded: list[str]
    after_step: str | None
    regathered: list[str]  # gathered tensors backward gathers again instead of keeping (lcc.ops.regather)
    grad_reduce: str  # ZeRO 2/3: reduce-scatter once per `step` (gradients accumulate whole) or per `microbatch`


@dataclass
class Serving:
    """What a serve plan's runtime executes besides the programs. Each step: rank 0's scheduler chooses
    every dp rank's batch (`before`: broadcast to every rank), the stages run in order on it (the
    schedule's actions), and the last stage returns each dp rank's next-token logits to rank 0 (`after`).
    Every rank has a paged KV cache of `kv_blocks` blocks of `block_size` tokens for the layers of its
    stages, of its `kv_heads` key/value heads. Experts run through `expert_kernel`: `int4_native_cpu`
    (lcc's native CPU kernel: AVX-512 or AVX2, AMX tiles for bfloat16), `int4_packed_cpu` (packed weights,
    PyTorch's CPU int4 matmul), `int4_triton` (CUDA: lcc's fused Triton kernels, int4
    dequantised in the kernel), `int4_reference` (lcc's reference int4 op: float64), `dense_triton` (CUDA,
    unquantised, the same Triton kernels) or `dense` (unquantised, torch). Rotary embeddings, cache writes and
    decode tokens' attention run through `attention_kernel`: `native_cpu` (lcc's native CPU kernels, decode
    attention reading the paged cache in place) or `torch`
    (PyTorch's scaled_dot_product_attention on gathered contexts); prefill chunks always through the latter.
    Routing tables decide through `routing_kernel`: `native_cpu` (lcc's native CPU router) or `torch`. Dense
    projections (attention, shared and dense FFN, the head) and unquantised experts run through
    `dense_kernel`: `native_cpu` (lcc's native bfloat16 kernel for few rows, PyTorch's matmul beyond) or
    `torch`. RMS norms (of the width, and of each head) run through `norm_kernel`: `native_cpu` (lcc's
    native CPU kernel, one call per norm) or `torch`. With `routing_kernel: native_cpu` the router also sorts
    the used slots by expert, and the gate-weighted combine of the experts' outputs runs in the same library.
    A step whose sequences all decode one token runs the programs' `decode_forward` where `decode_kernel` is
    `native_cpu`: each MoE layer one call of lcc's native kernels, the same operators as `forward`'s lines;
    `ops`: `forward` always."""

    dtype: str
    max_batch: int  # sequences per dp rank and step
    max_seq_len: int
    max_batched_tokens: int  # tokens per dp rank and step
    block_size: int
    kv_blocks: int
    kv_heads: int
    head_dim: int
    kv_bytes_per_token: list[int]  # per pipeline rank: all the layers of its stages
    routing_tables: bool
    expert_kernel: str
    group_size: int | None
    before: list[StepAction]
    after: list[StepAction]
    dropless: bool = True  # every routed token reaches its experts: routing.capacity_factor is training's
    attention_kernel: str = "torch"  # rotary, cache writes, decode attention: "native_cpu" (lcc's) or "torch"
    routing_kernel: str = "torch"  # decisions from routing tables: "native_cpu" (lcc's CPU kernel) or "torch"
    dense_kernel: str = "torch"  # dense projections: "native_cpu" (lcc's bfloat16 kernel, few rows) or "torch"
    norm_kernel: str = "torch"  # RMS norms: "native_cpu" (lcc's CPU kernel) or "torch"
    decode_kernel: str = "ops"  # MoE layers of decode-only steps: "native_cpu" (one call each) or "ops"
    prefix_caching: bool = False  # serve.prefix_caching: full KV blocks of a shared prefix are reused

    @property
    def native_cpu(self) -> bool:
        """Whether any step runs lcc's native CPU kernels (x86-64 with AVX-512 or AVX2)."""
        return ("native_cpu" in (self.attention_kernel, self.routing_kernel, self.dense_kernel, self.norm_kernel,
                                 self.decode_kernel) or self.expert_kernel == "int4_native_cpu")


@dataclass(frozen=True)
class Pass:
    name: str
    description: str


@dataclass
class Plan:
    version: int
    spec_name: str
    spec_hash: str
    mode: str  # train | serve
    world_size: int
    backend: str  # the kernel backend the programs' ops use: torch, or triton (CUDA serve plans' experts)
    device: str  # cpu | cuda (cluster.device.kind)
    dtype: str
    precision: Precision
    mesh: Mesh
    ranks: RankTable
    passes: list[Pass]
    roles: list[Role]
    parameters: list[Parameter]
    buffers: list[Buffer]
    experts: Experts | None
    partition: Partition
    memory: Memory
    data: Data
    schedule: Schedule
    cost: dict[str, Any]  # the lcc.report/1 document, for display
    serving: Serving | None = None  # serve plans

    def parameter(self, name: str) -> Parameter:
        return self._params()[name]

    def _params(self) -> dict[str, Parameter]:
        cache = self.__dict__.get("_by_name")
        if cache is None:
            cache = self.__dict__["_by_name"] = {p.name: p for p in self.parameters}
        return cache

    def roles_of(self, pp_rank: int) -> list[Role]:
        return [r for r in self.roles if r.pp_rank == pp_rank]

    def axis_sizes(self) -> dict[str, int]:
        return {a: self.mesh.size(a)
                for a in ("pp", "dp", "tp", "ep", "edp", "stage", "world", "ep_inter", "ep_intra")}
