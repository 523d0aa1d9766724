"""Every operation a rendered program may call (`ops.<name>(...)`), declared once.

A program line is a call of one of these; what reads or writes such a line reads this table instead of
keeping its own list: codegen renders calls through `render_call` (the op must be declared, with the
keywords it declares), `lcc.plan.program_check` counts each call's collectives from `forward` and
`backward`, and `lcc.inspect.program_graph` draws each call with the shape rule `graph` names. The
implementation is the function of the same name in `lcc.ops`. Data only: lcc.plan imports nothing of the
compiler or the runtime, so both sides read the same declaration.
"""

from __future__ import annotations

from dataclasses import dataclass

# kinds: compute (no communication), collective (communicates on the group argument's mesh axis),
# zero (ZeRO-3 parameter gathers, sized by the program's GATHER table), recompute (activation checkpointing)
KINDS = ("compute", "collective", "zero", "recompute")


@dataclass(frozen=True)
class Op:
    name: str
    kind: str
    graph: str  # program_graph's shape rule: "same" (output shaped like the first input), "grow" / "shrink"
    # (one dim times / over the group size), "rows" (one value per row), or a rule of the op's own
    forward: tuple[str, ...] = ()  # collectives issued in forward, in order, on the group's axis
    backward: tuple[str, ...] = ()  # collectives its backward issues (autograd orders them)
    backward_kept: tuple[str, ...] | None = None  # backward's, when a checkpoint or autocast keeps the input
    keywords: tuple[str, ...] = ()  # the keyword arguments a program line passes
    attrs: tuple[tuple[str, type], ...] = ()  # keywords the graph view shows as node attributes, converted
    keeps_weights: bool = True  # whether its backward needs the (gathered) weights it reads
    layout: tuple[str, ...] | None = None  # tiny-moe overrides whose programs call it, where no shipped
    # plan's programs do
    mode: str = "train"  # which programs of the layout: train or serve
    after_call: bool = False  # a collective a pass may place right after any module's call (codegen emits
    # it there, in this table's order, wherever the plan records one)
    sized_by_values: bool = False  # its output's shape follows tensor values (torch.compile cannot trace it)
    waits: bool = False  # waits for communication begun earlier (ends a compiled region, as collectives do)

    @property
    def traced(self) -> bool:
        """Whether torch.compile traces through the op (train.compile): compute whose shapes follow from its
        inputs' shapes. The others (collectives, ZeRO gathers, recomputation, value-sized compute) end a
        compiled region; the next region starts after them."""
        return self.kind == "compute" and not self.sized_by_values and not self.waits

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"op {self.name}: kind {self.kind!r} is not one of {KINDS}")
        if self.kind == "compute" and (self.forward or self.backward):
            raise ValueError(f"op {self.name}: a compute op issues no collective")


# tiny-moe on two tensor-parallel ranks with a balance loss: its training programs call the ops no shipped
# plan's programs do (qk-norm per head, or over every rank's heads)
TP2 = ("parallelism.tp=2", "parallelism.pp=1", "parallelism.dp=1", "parallelism.ep=1", "cluster.gpus_per_node=2",
       "routing.balance.aux_loss_coef=0.01")
QK_HEAD = (*TP2, "model.attention.qk_norm=head")
QK_ALL = (*TP2, "model.attention.qk_norm=all")
# tiny-moe served on one rank in bfloat16: its serve programs' decode_forward calls each MoE layer in one op
DECODE = ("parallelism.tp=1", "parallelism.pp=1", "parallelism.dp=1", "parallelism.ep=1", "cluster.gpus_per_node=1",
          "serve.dtype=bfloat16")

# tiny-moe on 2 nodes x 2 ranks with the hierarchical expert exchange: its programs call node_plan
NODES = ("parallelism.tp=1", "parallelism.pp=1", "parallelism.dp=4", "parallelism.ep=4", "cluster.nodes=2",
         "cluster.gpus_per_node=2", "parallelism.expert_exchange=hierarchical")

# tiny-moe at dp 2 x ep 2 with the overlapped expert exchange: its programs split each MoE layer in halves
OVERLAP = ("parallelism.tp=1", "parallelism.pp=1", "parallelism.dp=2", "parallelism.ep=2", "cluster.gpus_per_node=2",
           "parallelism.expert_overlap=true")

TABLE: tuple[Op, ...] = (
    # ---------------------------------------------------------------------------------------------- compute
    Op("embedding_shard", "compute", "embedding_shard", keywords=("vocab_start",), attrs=(("vocab_start", str),),
       keeps_weights=False),
    Op("rms_norm", "compute", "same", keywords=("eps",), attrs=(("eps", float),)),
    Op("head_norm", "compute", "same", keywords=("head_dim", "eps"), attrs=(("head_dim", int), ("eps", float)),
       layout=QK_HEAD),
    Op("linear", "compute", "linear"),
    Op("attention", "compute", "same", keywords=("head_dim", "theta", "segments"),
       attrs=(("head_dim", int), ("theta", float))),
    Op("paged_attention", "compute", "same", keywords=("layer", "head_dim", "theta"),
       attrs=(("layer", int), ("head_dim", int), ("theta", float))),
    Op("route", "compute", "route", sized_by_values=True),  # group-major logits: rows per group from the scores
    Op("route_tables", "compute", "route_tables"),
    Op("decode_layer", "compute", "same", keywords=("layer", "head_dim", "theta", "eps"),
       attrs=(("layer", int), ("head_dim", int), ("theta", float), ("eps", float)), layout=DECODE, mode="serve"),
    Op("grouped_swiglu", "compute", "experts", sized_by_values=True),  # segments and padding from the counts
    Op("grouped_swiglu_int4", "compute", "experts", sized_by_values=True),
    Op("combine_tokens", "compute", "combine_tokens"),
    Op("cat_rows", "compute", "cat_rows", layout=OVERLAP),
    Op("exchange_wait", "compute", "exchange_wait", waits=True, layout=OVERLAP),
    Op("last_positions", "compute", "last_positions"),
    Op("flatten_logits", "compute", "flatten_logits"),
    Op("row_max", "compute", "rows"),
    Op("sum_exp", "compute", "rows"),
    Op("target_logit", "compute", "rows", keywords=("vocab_start",), attrs=(("vocab_start", str),)),
    Op("cross_entropy", "compute", "cross_entropy"),
    # ------------------------------------------------------------------------------------------ collectives
    Op("all_reduce", "collective", "same", forward=("all_reduce",), after_call=True),
    Op("all_reduce_max", "collective", "same", forward=("all_reduce_max",)),
    Op("copy_to_tp", "collective", "same", backward=("all_reduce",), layout=QK_HEAD),
    Op("rms_norm_tp", "collective", "same", forward=("all_reduce",), backward=("all_reduce",), keywords=("eps",),
       attrs=(("eps", float),), layout=QK_ALL),
    Op("split_tokens", "collective", "split_tokens", backward=("all_gather",)),
    Op("gather_tokens", "collective", "gather_tokens", forward=("all_gather",), keywords=("rows",)),
    Op("all_to_all", "collective", "all_to_all", forward=("all_to_all",), backward=("all_to_all",)),
    Op("moe_plan", "collective", "moe_plan", forward=("all_to_all",), keywords=("n_experts", "group")),
    # the overlapped exchange: each half's counts; an exchange begun now, waited for later (exchange_wait)
    Op("moe_plan_halves", "collective", "moe_plan_halves", forward=("all_to_all",),
       keywords=("n_experts", "group"), layout=OVERLAP),
    Op("all_to_all_start", "collective", "all_to_all_start", forward=("all_to_all",), backward=("all_to_all",),
       layout=OVERLAP),
    # the hierarchical exchange's first level: counts, each slot's row index and gate to each node
    Op("node_plan", "collective", "node_plan", forward=("all_to_all", "all_to_all", "all_to_all"),
       backward=("all_to_all",), keywords=("n_experts", "group"), layout=NODES),
    Op("unit_balance", "collective", "unit_balance", forward=("all_reduce",),
       layout=QK_HEAD),
    Op("gather_sequence", "collective", "grow", forward=("all_gather",), backward=("reduce_scatter", "all_gather"),
       backward_kept=("reduce_scatter",), keywords=("dim",)),
    Op("reduce_scatter_sequence", "collective", "shrink", forward=("reduce_scatter",), backward=("all_gather",),
       keywords=("dim",), after_call=True),
    Op("gather_vocab", "collective", "grow", forward=("all_gather",), keywords=("dim",), after_call=True),
    # ------------------------------------------------------------------------- ZeRO-3 and recomputation
    Op("zero_gather", "zero", "zero_gather", forward=("all_gather",), backward=("reduce_scatter", "all_gather")),
    Op("zero_prefetch", "zero", "zero_prefetch", forward=("all_gather",)),
    Op("recompute", "recompute", "recompute"),
)

OPS: dict[str, Op] = {op.name: op for op in TABLE}
if len(OPS) != len(TABLE):
    raise ValueError("an op is declared twice")


def op(name: str) -> Op:
    """The declaration of `ops.<name>`; a KeyError names an op no program may call."""
    try:
        return OPS[name]
    except KeyError:
        raise KeyError(f"ops.{name} is not declared in lcc.plan.op_table") from None


def named(kind: str) -> tuple[str, ...]:
    """The names of the ops of one kind, in declaration order."""
    return tuple(o.name for o in TABLE if o.kind == kind)


def untraced() -> tuple[str, ...]:
    """The ops that end a compiled region (`Op.traced`), in declaration order."""
    return tuple(o.name for o in TABLE if not o.traced)


def collective_kinds() -> frozenset[str]:
    """Every collective (all_reduce, all_gather, ...) some op issues, forward or backward."""
    return frozenset(c for o in TABLE for c in (*o.forward, *o.backward))


def render_call(name: str, *args: str, **keywords: str) -> str:
    """A program's call of a declared op: `ops.<name>(arg, ..., key=value, ...)`, keywords in the order given."""
    declared = op(name)
    unknown = [k for k in keywords if k not in declared.keywords]
    if unknown:
        raise ValueError(f"ops.{name} declares no keyword {unknown[0]!r} (it declares {declared.keywords})")
    return f"ops.{name}({', '.join([*args, *(f'{k}={v}' for k, v in keywords.items())])})"
