"""Cross-field rules: a layout or model that cannot work is rejected here, naming every field involved.

Each rule points at the first field it names (that is where the user looks) and mentions the others.
Rules only read the validated Spec; they never guess a fix silently, but their hints propose one.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from lcc.spec.errors import Path, Problem
from lcc.spec.models import Spec
from lcc.spec.yaml_source import SourceMap


class _Found:
    """What a rule reports: the field it is about, the message, the other fields, a hint."""

    def __init__(self, path: str, message: str, *related: str, hint: str | None = None):
        self.path = parse_dotted(path)
        self.message = message
        self.related = related
        self.hint = hint


def parse_dotted(text: str) -> Path:
    """`model.moe.layers[2]` -> `('model', 'moe', 'layers', 2)`."""
    parts = text.replace("[", ".").replace("]", "").split(".")
    return tuple(int(p) if p.isdigit() else p for p in parts)


Rule = Callable[[Spec], Iterator[_Found]]
RULES: list[Rule] = []


def rule(fn: Rule) -> Rule:
    RULES.append(fn)
    return fn


def divisors(n: int) -> list[int]:
    if n > 10**12:  # only hints use this; do not spend seconds on absurd sizes
        return [1, n]
    small = [d for d in range(1, int(n**0.5) + 1) if n % d == 0]
    return sorted(set(small + [n // d for d in small]))


def nearest_divisors(n: int, near: int, count: int = 2) -> list[int]:
    """The divisors of n closest to `near` (ties: the smaller first)."""
    return sorted(sorted(divisors(n), key=lambda d: (abs(d - near), d))[:count])


def _try(values: list[int]) -> str:
    return " or ".join(str(v) for v in values)


@rule
def moe_sections(spec: Spec) -> Iterator[_Found]:
    if spec.model.moe is not None and spec.routing is None:
        yield _Found("model.moe", "an MoE model needs a routing section", "routing",
                     hint="add routing: (see docs/spec.md), or remove model.moe for a dense model")
    if spec.model.moe is None and spec.routing is not None:
        yield _Found("routing", "routing is set but the model has no model.moe section", "model.moe",
                     hint="remove routing, or add model.moe")
    if spec.model.moe is None and spec.quantization is not None and spec.quantization.experts is not None:
        yield _Found("quantization.experts", "expert quantization is set but the model has no experts", "model.moe")
    if spec.model.moe is None and spec.parallelism.ep != 1:
        yield _Found("parallelism.ep", f"ep {spec.parallelism.ep} needs experts, but the model is dense",
                     "model.moe", hint="set ep: 1")


@rule
def expert_groups(spec: Spec) -> Iterator[_Found]:
    moe = spec.model.moe
    if moe is None:
        return
    if moe.n_experts % moe.n_groups:
        yield _Found("model.moe.n_experts",
                     f"n_experts {moe.n_experts} is not divisible by n_groups {moe.n_groups}", "model.moe.n_groups",
                     hint=f"try n_groups {_try(nearest_divisors(moe.n_experts, moe.n_groups))}")
    if moe.layers != "all":
        seen: set[int] = set()
        for i, layer in enumerate(moe.layers):
            if layer >= spec.model.n_layers:
                yield _Found(f"model.moe.layers[{i}]", f"layer {layer} does not exist", "model.n_layers",
                             hint=f"layer indices run from 0 to {spec.model.n_layers - 1}")
            elif layer in seen:
                yield _Found(f"model.moe.layers[{i}]", f"layer {layer} is listed twice")
            seen.add(layer)
        if not moe.layers:
            yield _Found("model.moe.layers", "no MoE layers listed", hint='use "all", or remove model.moe')


@rule
def routing_counts(spec: Spec) -> Iterator[_Found]:
    moe, routing = spec.model.moe, spec.routing
    if moe is None or routing is None or moe.n_experts % moe.n_groups:
        return
    if routing.groups.top > moe.n_groups:
        yield _Found("routing.groups.top", f"keeps {routing.groups.top} groups but there are only {moe.n_groups}",
                     "model.moe.n_groups", hint=f"set top to at most {moe.n_groups}")
        return
    k = routing.k
    reachable = routing.groups.top * moe.experts_per_group
    if k.min > k.max:
        yield _Found("routing.k.min", f"k.min {k.min} is larger than k.max {k.max}", "routing.k.max")
    if k.expected is not None and not k.min <= k.expected <= k.max:
        yield _Found("routing.k.expected", f"k.expected {k.expected} is outside [k.min {k.min}, k.max {k.max}]",
                     "routing.k.min", "routing.k.max")
    if routing.balance.expected_imbalance > moe.n_experts:
        yield _Found("routing.balance.expected_imbalance", f"{routing.balance.expected_imbalance} is more than "
                     f"the busiest of {moe.n_experts} experts can take: all tokens on one expert is "
                     f"{moe.n_experts} times the mean", "model.moe.n_experts",
                     hint=f"set it between 1.0 (even load) and {moe.n_experts}")
    if k.max > reachable:
        yield _Found("routing.k.max",
                     f"k.max {k.max} exceeds the {reachable} experts reachable in the {routing.groups.top} kept "
                     f"group(s) of {moe.experts_per_group}", "routing.groups.top", "model.moe.n_groups",
                     hint=f"set k.max to at most {reachable}, or keep more groups")


@rule
def attention_heads(spec: Spec) -> Iterator[_Found]:
    att, tp = spec.model.attention, spec.parallelism.tp
    if att.n_heads % att.n_kv_heads:
        yield _Found("model.attention.n_heads", f"n_heads {att.n_heads} is not divisible by n_kv_heads "
                     f"{att.n_kv_heads}", "model.attention.n_kv_heads",
                     hint=f"try n_kv_heads {_try(nearest_divisors(att.n_heads, att.n_kv_heads))}")
    if att.head_dim % 2:
        yield _Found("model.attention.head_dim", f"head_dim {att.head_dim} must be even for rotary embeddings")
    if att.n_heads % tp:
        yield _Found("model.attention.n_heads", f"n_heads {att.n_heads} is not divisible by tp {tp}",
                     "parallelism.tp", hint=f"try tp {_try(nearest_divisors(att.n_heads, tp))}")
    # kv heads are split over tp when they divide it, else each is replicated over tp / n_kv_heads ranks
    if att.n_kv_heads % tp and tp % att.n_kv_heads:
        yield _Found("model.attention.n_kv_heads",
                     f"n_kv_heads {att.n_kv_heads} neither divides nor is divisible by tp {tp}", "parallelism.tp",
                     hint="kv heads are split over tp, or replicated over tp / n_kv_heads ranks when fewer")


@rule
def tensor_parallel_widths(spec: Spec) -> Iterator[_Found]:
    tp, model = spec.parallelism.tp, spec.model
    if model.vocab_size % tp:
        yield _Found("model.vocab_size", f"vocab_size {model.vocab_size} is not divisible by tp {tp} "
                     "(the embedding and LM head are split by vocabulary)", "parallelism.tp",
                     hint=f"pad vocab_size to {-(-model.vocab_size // tp) * tp}")
    if model.d_model % tp:
        yield _Found("model.d_model", f"d_model {model.d_model} is not divisible by tp {tp}", "parallelism.tp",
                     hint=f"try tp {_try(nearest_divisors(model.d_model, tp))}")
    dense_layers = model.n_layers - len(model.moe_layers)
    if dense_layers and model.ffn is None:
        yield _Found("model.ffn", f"{dense_layers} layer(s) are dense but model.ffn is not set", "model.moe.layers",
                     hint="add ffn: {d_ff: ...}, or make every layer MoE")
    elif dense_layers and model.ffn is not None and model.ffn.d_ff % tp:
        yield _Found("model.ffn.d_ff", f"d_ff {model.ffn.d_ff} is not divisible by tp {tp}", "parallelism.tp")
    if model.moe is not None and (model.moe.n_shared_experts * model.moe.expert_d_ff) % tp:
        yield _Found("model.moe.n_shared_experts", "shared experts' total width n_shared_experts * expert_d_ff "
                     f"= {model.moe.n_shared_experts * model.moe.expert_d_ff} is not divisible by tp {tp}",
                     "model.moe.expert_d_ff", "parallelism.tp")
    if spec.parallelism.sequence_parallel and spec.train.seq_len % tp:
        yield _Found("train.seq_len", f"seq_len {spec.train.seq_len} is not divisible by tp {tp} "
                     "(sequence parallelism splits the sequence)", "parallelism.sequence_parallel")


@rule
def world(spec: Spec) -> Iterator[_Found]:
    par, cluster = spec.parallelism, spec.cluster
    if par.world_size != cluster.n_devices:
        hint = None
        if cluster.n_devices % (par.pp * par.tp) == 0:
            hint = f"for this cluster set dp {cluster.n_devices // (par.pp * par.tp)}"
        yield _Found("parallelism.dp", f"world size pp*dp*tp = {par.pp}*{par.dp}*{par.tp} = {par.world_size} "
                     f"differs from the cluster's nodes*gpus_per_node = {cluster.nodes}*{cluster.gpus_per_node} = "
                     f"{cluster.n_devices}", "parallelism.pp", "parallelism.tp", "cluster.nodes",
                     "cluster.gpus_per_node", hint=hint)
    if cluster.gpus_per_node % par.tp:
        yield _Found("parallelism.tp", f"tp {par.tp} does not divide gpus_per_node {cluster.gpus_per_node}: a "
                     "tensor-parallel group would span nodes", "cluster.gpus_per_node",
                     hint=f"try tp {_try([d for d in nearest_divisors(cluster.gpus_per_node, par.tp)])}")


@rule
def expert_parallel(spec: Spec) -> Iterator[_Found]:
    par, moe = spec.parallelism, spec.model.moe
    folded = par.dp * par.tp
    if folded % par.ep:
        yield _Found("parallelism.ep", f"ep {par.ep} does not divide dp*tp = {folded}", "parallelism.dp",
                     "parallelism.tp", hint=f"try ep {_try(nearest_divisors(folded, par.ep))}")
    if moe is None:
        return
    if moe.n_experts % par.ep:
        yield _Found("parallelism.ep", f"ep {par.ep} does not divide n_experts {moe.n_experts}",
                     "model.moe.n_experts")
    elif moe.n_groups >= par.ep and moe.n_groups % par.ep:
        yield _Found("parallelism.ep", f"n_groups {moe.n_groups} is not divisible by ep {par.ep}: a group would "
                     "span EP ranks", "model.moe.n_groups",
                     hint=f"try ep {_try(_fitting_ep(moe.n_groups, folded, par.ep))}")
    elif moe.n_groups < par.ep and par.ep % moe.n_groups:
        yield _Found("parallelism.ep", f"ep {par.ep} is not a multiple of n_groups {moe.n_groups}: each group must "
                     "spread over the same number of EP ranks", "model.moe.n_groups")


@rule
def node_limited_routing(spec: Spec) -> Iterator[_Found]:
    """Sets of groups (what one node holds) and the node limit, on the model; their placement on the layout."""
    moe, routing = spec.model.moe, spec.routing
    if moe is None or routing is None or moe.n_experts % moe.n_groups:
        return
    groups = routing.groups
    if moe.n_groups % groups.sets:
        yield _Found("routing.groups.sets", f"{groups.sets} sets do not divide the {moe.n_groups} expert groups",
                     "model.moe.n_groups", hint=f"try sets {_try(nearest_divisors(moe.n_groups, groups.sets))}")
        return
    if groups.max_sets is not None and groups.max_sets > groups.sets:
        yield _Found("routing.groups.max_sets", f"max_sets {groups.max_sets} is more than the {groups.sets} sets",
                     "routing.groups.sets", hint=f"set max_sets to at most {groups.sets}, or null for no limit")
        return
    reachable = groups.kept_sets * (moe.n_groups // groups.sets)
    if groups.top > reachable:
        yield _Found("routing.groups.top", f"keeps {groups.top} groups, but the {groups.kept_sets} kept set(s) of "
                     f"{moe.n_groups // groups.sets} groups hold only {reachable}", "routing.groups.max_sets",
                     "routing.groups.sets", hint=f"set top to at most {reachable}, or keep more sets")
    span = spec.ep_nodes
    if groups.sets > 1 and moe.n_experts % spec.parallelism.ep == 0 and span is not None and span[0] > 1 \
            and groups.sets % span[0]:
        yield _Found("routing.groups.sets", f"{groups.sets} sets do not map onto whole nodes: an expert-parallel "
                     f"group of ep {spec.parallelism.ep} spans {span[0]} nodes of {span[1]} ranks, so a set would "
                     "span nodes", "parallelism.ep", "cluster.gpus_per_node",
                     hint=f"use a multiple of {span[0]} sets, or an ep that spans fewer nodes")
    elif groups.sets > 1 and span is None:
        yield _Found("routing.groups.sets", f"sets cannot map onto nodes: expert-parallel groups of ep "
                     f"{spec.parallelism.ep} straddle nodes of {spec.cluster.gpus_per_node} ranks unevenly",
                     "parallelism.ep", "cluster.gpus_per_node",
                     hint="make ep a multiple or a divisor of gpus_per_node")


@rule
def expert_overlap(spec: Spec) -> Iterator[_Found]:
    par = spec.parallelism
    if par.expert_overlap and (spec.model.moe is None or par.ep == 1):
        yield _Found("parallelism.expert_overlap", f"expert_overlap hides the expert all-to-all behind the experts' "
                     f"compute, but with ep {par.ep} there is no all-to-all", "parallelism.ep",
                     hint="set expert_overlap: false, or ep >= 2")
    elif par.expert_overlap and par.expert_exchange == "hierarchical":
        yield _Found("parallelism.expert_overlap", "expert_overlap runs the flat exchange in two halves; the "
                     "hierarchical exchange is not overlapped", "parallelism.expert_exchange",
                     hint="choose one: expert_overlap: true with expert_exchange: flat, or expert_overlap: false")
    elif par.expert_overlap and par.activation_checkpointing == "selective":
        yield _Found("parallelism.expert_overlap", "selective recomputation reruns the routing and the dispatch "
                     "all-to-all in backward, which the overlapped exchange splits around the experts",
                     "parallelism.activation_checkpointing",
                     hint="use activation_checkpointing: none or full with expert_overlap")


@rule
def expert_exchange(spec: Spec) -> Iterator[_Found]:
    par = spec.parallelism
    if par.expert_exchange != "hierarchical":
        return
    span = spec.ep_nodes
    if span is None:
        yield _Found("parallelism.expert_exchange", f"a hierarchical exchange needs expert-parallel groups with the "
                     f"same ranks on each node; ep {par.ep} straddles nodes of {spec.cluster.gpus_per_node} ranks "
                     "unevenly", "parallelism.ep", "cluster.gpus_per_node",
                     hint="make ep a multiple of gpus_per_node")
    elif span[0] == 1:
        yield _Found("parallelism.expert_exchange", f"a hierarchical exchange needs an expert-parallel group that "
                     f"spans nodes; ep {par.ep} fits in one node of {spec.cluster.gpus_per_node} ranks",
                     "parallelism.ep", "cluster.gpus_per_node",
                     hint="use expert_exchange: flat, or an ep larger than gpus_per_node")


def _fitting_ep(n_groups: int, folded: int, ep: int) -> list[int]:
    """EP degrees near `ep` that divide both n_groups and dp * tp."""
    ok = [d for d in divisors(n_groups) if folded % d == 0]
    return sorted(sorted(ok, key=lambda d: (abs(d - ep), d))[:2])


@rule
def pipeline(spec: Spec) -> Iterator[_Found]:
    par, pipe = spec.parallelism, spec.parallelism.pipeline
    if spec.model.n_layers < par.n_stages:
        yield _Found("parallelism.pp", f"pp * virtual_stages = {par.pp}*{pipe.virtual_stages} = {par.n_stages} "
                     f"stages but only {spec.model.n_layers} layers", "parallelism.pipeline.virtual_stages",
                     "model.n_layers", hint="every stage needs at least one layer")
    if pipe.schedule == "zbv" and pipe.virtual_stages != 2:
        yield _Found("parallelism.pipeline.virtual_stages", f"zbv runs 2 stages per pipeline rank (a V), not "
                     f"{pipe.virtual_stages}", "parallelism.pipeline.schedule", hint="set virtual_stages: 2")
    elif pipe.virtual_stages > 1 and pipe.schedule not in ("interleaved_1f1b", "zbv"):
        yield _Found("parallelism.pipeline.virtual_stages",
                     f"virtual_stages {pipe.virtual_stages} needs schedule interleaved_1f1b or zbv, not "
                     f"{pipe.schedule}", "parallelism.pipeline.schedule")
    if pipe.schedule == "interleaved_1f1b" and pipe.virtual_stages < 2:
        yield _Found("parallelism.pipeline.schedule", "interleaved_1f1b needs virtual_stages >= 2",
                     "parallelism.pipeline.virtual_stages", hint="use 1f1b, or set virtual_stages: 2")
    if pipe.schedule in ("1f1b", "interleaved_1f1b", "zb_h1", "zbv") and pipe.microbatches < par.pp:
        yield _Found("parallelism.pipeline.microbatches", f"{pipe.schedule} needs microbatches >= pp: "
                     f"{pipe.microbatches} < {par.pp}", "parallelism.pp", hint=f"set microbatches: {par.pp}")
    if pipe.schedule in ("zb_h1", "zbv") and par.activation_checkpointing != "none":
        yield _Found("parallelism.pipeline.schedule", f"{pipe.schedule} splits each backward into its input's and "
                     "its weights' gradients; a recomputed layer computes both at once in its backward",
                     "parallelism.activation_checkpointing",
                     hint="use activation_checkpointing: none with a zero-bubble schedule, or 1f1b")
    if pipe.schedule in ("zb_h1", "zbv") and par.zero == 3:
        yield _Found("parallelism.pipeline.schedule", f"{pipe.schedule} with ZeRO-3: the gradients' reduce-scatter of "
                     "each layer's gathered weights would run in W, which the runtime does not split yet",
                     "parallelism.zero", hint="use zero: 1 or 2 with a zero-bubble schedule")
    if pipe.schedule == "interleaved_1f1b" and pipe.microbatches % par.pp:
        yield _Found("parallelism.pipeline.microbatches", f"interleaved_1f1b runs micro-batches in rounds of pp: "
                     f"{pipe.microbatches} is not a multiple of pp {par.pp}", "parallelism.pp",
                     hint=f"set microbatches: {-(-pipe.microbatches // par.pp) * par.pp}")


@rule
def batch(spec: Spec) -> Iterator[_Found]:
    par, train = spec.parallelism, spec.train
    units = par.dp * par.pipeline.microbatches
    if train.global_batch % units:
        yield _Found("train.global_batch", f"global_batch {train.global_batch} is not divisible by "
                     f"dp * microbatches = {par.dp}*{par.pipeline.microbatches} = {units}", "parallelism.dp",
                     "parallelism.pipeline.microbatches",
                     hint=f"try global_batch {-(-train.global_batch // units) * units}")
    elif spec.model.moe is not None and par.tp > 1:
        tokens = train.global_batch // units * train.seq_len
        if tokens % par.tp:
            yield _Found("train.seq_len", f"a micro-batch has {tokens} tokens, not divisible by tp {par.tp} "
                         "(MoE layers split a micro-batch's tokens over the tp ranks)", "train.global_batch",
                         "parallelism.tp")
    if train.seq_len > spec.model.max_seq_len:
        yield _Found("train.seq_len", f"seq_len {train.seq_len} exceeds model.max_seq_len "
                     f"{spec.model.max_seq_len}", "model.max_seq_len")
    if train.data.kind in ("builtin", "text") and spec.model.vocab_size < 256 and spec.model.tokenizer is None:
        yield _Found("model.vocab_size", f"vocab_size {spec.model.vocab_size} is smaller than the 256 byte tokens "
                     f"of data kind {train.data.kind}", "train.data.kind",
                     hint="use vocab_size >= 256, a model.tokenizer, or data kind synthetic")
    data = train.data
    if data.kind == "text" and not data.path:
        yield _Found("train.data.path", "data kind text needs a path", "train.data.kind")
    if data.kind == "prepared" and (data.path is None) == (data.blend is None):
        yield _Found("train.data.path", "data kind prepared needs a path or a blend (not both)", "train.data.blend")
    for field in ("blend", "validation", "document_mask"):
        if getattr(data, field) not in (None, False) and data.kind != "prepared":
            yield _Found(f"train.data.{field}", f"applies to data kind prepared, not {data.kind}", "train.data.kind")
    if data.blend is not None and not data.blend:
        yield _Found("train.data.blend", "a blend of no datasets")
    if spec.serve is not None and spec.serve.max_seq_len > spec.model.max_seq_len:
        yield _Found("serve.max_seq_len", f"serve.max_seq_len {spec.serve.max_seq_len} exceeds model.max_seq_len "
                     f"{spec.model.max_seq_len}", "model.max_seq_len")
    for i, token in enumerate(spec.serve.stop_token_ids if spec.serve is not None else []):
        if token >= spec.model.vocab_size:
            yield _Found(f"serve.stop_token_ids[{i}]", f"token {token} is outside the vocabulary of "
                         f"{spec.model.vocab_size}", "model.vocab_size")


@rule
def quantization(spec: Spec) -> Iterator[_Found]:
    quant, moe = spec.quantization, spec.model.moe
    if quant is None or quant.experts is None or moe is None:
        return
    g = quant.experts.group_size
    if spec.model.d_model % g:
        yield _Found("quantization.experts.group_size", f"group_size {g} does not divide d_model "
                     f"{spec.model.d_model} (the input dim of the experts' w1 and w3)", "model.d_model",
                     hint=f"try group_size {_try(nearest_divisors(spec.model.d_model, g))}")
    if moe.expert_d_ff % g:
        yield _Found("quantization.experts.group_size", f"group_size {g} does not divide expert_d_ff "
                     f"{moe.expert_d_ff} (the input dim of the experts' w2)", "model.moe.expert_d_ff",
                     hint=f"try group_size {_try(nearest_divisors(moe.expert_d_ff, g))}")


def _mention(source: SourceMap, text: str) -> str:
    location = source.locate(parse_dotted(text))
    return f"{text} at line {location.line}" if location.line else f"{text} from {location.source}"


def check(spec: Spec, source: SourceMap) -> list[Problem]:
    """Every cross-field problem of a spec that passed field validation, in rule order."""
    return [
        Problem(source.locate(found.path), found.path, found.message, found.hint,
                tuple(_mention(source, r) for r in found.related))
        for fn in RULES
        for found in fn(spec)
    ]
