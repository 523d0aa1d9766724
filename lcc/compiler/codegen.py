"""Per-role programs: the traced graph of one stage, lowered with the plan's decisions, as readable Python.

Each fx node of the stage becomes one line calling an lcc op (or a plain tensor expression); the passes'
collectives become lines of their own, so the program shows every communication its rank issues. Lines
are grouped into one function per layer (and the embedding and the head); with selective activation
checkpointing the recomputed parts of a layer are functions of their own, and with ZeRO-3 each function
starts by all-gathering the parameters it uses. Rendered by lcc's own template, so the text does not
change with the torch version.
"""

from __future__ import annotations

import ast
import operator
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jinja2
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from lcc.actions import stage_rank
from lcc.compiler import moe_lines
from lcc.compiler.kernels import decode_kernel
from lcc.compiler.state import AFTER, AT, BEFORE, LOSS_POSITION, Comm, CompileState
from lcc.compiler.trace import layer_of
from lcc.plan.op_table import TABLE
from lcc.plan.op_table import render_call as call

TEMPLATES = Path(__file__).parent / "templates"
AFTER_CALL = tuple(op.name for op in TABLE if op.after_call)  # emitted where a pass places one


@dataclass
class Line:
    code: str
    comment: str = ""
    segment: str | None = None  # embedding, layer_<i> or lm_head
    region: str | None = None  # attention, routing: what selective checkpointing recomputes


class _Emitter:
    """Renders one stage's graph nodes as lines; every communicating line comes from a plan comm at its
    call site (before the call, replacing it, or after it), and tensor-parallel placement from the
    parameters' shards."""

    def __init__(self, state: CompileState, stage: int):
        self.state, self.stage = state, stage
        self.comms: dict[tuple[int, int], list[Comm]] = {}
        for c in state.stage_comms(stage):
            if c.line not in ("zero_gather", "zero_prefetch"):
                self.comms.setdefault(c.key[:2], []).append(c)
        self.lines: list[Line] = []
        self.entered: dict[str, str] = {}  # value -> its copy entering the TP region
        self.subst: dict[str, str] = {}  # inside an MoE block with tp: the full tokens -> this rank's share
        self.segment: str | None = None
        self.region: str | None = None
        self.serving = state.mode == "serve"

    def emit(self, code: str, comment: str = "") -> None:
        self.lines.append(Line(code, comment, self.segment, self.region))

    def take(self, site: str, phase: int, line: str) -> Comm | None:
        """The plan's comm of kind `line` at this call site and phase, if any (each is used once)."""
        found = self.comms.get((self.state.position(site), phase), [])
        for i, c in enumerate(found):
            if c.line == line:
                return found.pop(i)
        return None

    def node(self, n: fx.Node) -> None:
        name, args = n.name, [self.subst.get(r, r) for r in (_ref(a) for a in n.args)]
        if n.op == "call_module":
            layer = layer_of(str(n.target))
            self.segment = "embedding" if n.target == "embed" else "lm_head" if layer is None else f"layer_{layer}"
            self.module(n, name, args)
        elif n.op == "call_function":
            if n.target is operator.add:
                self.emit(f"{name} = {args[0]} + {args[1]}")
            elif n.target is operator.mul:
                self.emit(f"{name} = {args[0]} * {args[1]}")
            elif n.target is F.silu:
                self.emit(f"{name} = F.silu({args[0]})")
            elif n.target is getattr:
                if n.args[1] == "counts_E":
                    return  # the MoE plan's local counts replace it (see experts)
                self.emit(f"{name} = {args[0]}.{n.args[1]}")
            elif n.target is operator.getitem:
                self.emit(f"{name} = {args[0]}[{args[1]}]")
            else:
                raise NotImplementedError(f"no lowering for function {n.target} (node {name})")
        elif n.op == "call_method":
            self.emit(f"{name} = {args[0]}.{n.target}({', '.join(args[1:])})")
        else:
            raise NotImplementedError(f"no lowering for {n.op} node {name}")

    def after(self, site: str, name: str, lines: tuple[str, ...] = AFTER_CALL) -> None:
        """The collectives the plan places right after `site`'s call (`lines`: the table's `after_call` ops)."""
        for line in lines:
            c = self.take(site, AFTER, line)
            if c is not None:
                dim = {"dim": str(c.dim)} if c.dim is not None else {}
                self.emit(f"{name} = {call(line, name, f'G.{c.forward[0].axis}', **dim)}", c.forward[0].what)

    def module(self, n: fx.Node, name: str, args: list[str]) -> None:
        target = str(n.target)
        spec = self.state.spec
        params = self.state.params
        if target == "embed":
            w = params["embed.weight"]
            width = w.local_shape[0]
            start = f"ctx.tp_rank * {width}" if w.shard is not None else "0"
            self.emit(f"{name} = " + call("embedding_shard", args[0], 'P["embed.weight"]', vocab_start=start))
            self.after(target, name)
        elif target.endswith(("attn.q_norm", "attn.k_norm")) and spec.model.attention.qk_norm == "head":
            self.emit(f"{name} = " + call("head_norm", args[0], f'P["{target}.weight"]',
                                          head_dim=str(spec.model.attention.head_dim), eps=repr(spec.model.norm_eps)),
                      "each head over its head_dim")
        elif target.endswith(("attn.q_norm", "attn.k_norm")) and self.take(target, AT, "rms_norm_tp") is not None:
            self.emit(f"{name} = " + call("rms_norm_tp", args[0], f'P["{target}.weight"]', "G.tp",
                                          eps=repr(spec.model.norm_eps)),
                      "over every rank's heads: all-reduce of the sum of squares; backward, another")
        elif target.endswith("norm"):
            if target == "norm" and self.serving:
                self.emit(f"{args[0]}_last = {call('last_positions', args[0], 'ctx.batch')}",
                          "each sequence's last position: the logits sampling needs")
                args = [f"{args[0]}_last"]
            self.emit(f"{name} = " + call("rms_norm", args[0], f'P["{target}.weight"]', eps=repr(spec.model.norm_eps)))
        elif isinstance(self.state.graph.get_submodule(target), nn.Linear):
            weight = "embed.weight" if target == "head" and spec.model.tie_embeddings else f"{target}.weight"
            x = args[0]
            copy = self.take(target, BEFORE, "copy_to_tp")
            if copy is not None:
                self.entered[x] = f"{x}_tp"
                self.emit(f"{x}_tp = {call('copy_to_tp', x, 'G.tp')}", "backward: all-reduce over tp")
            gather = self.take(target, BEFORE, "gather_sequence")
            if gather is not None:
                self.entered[x] = f"{x}_tp"
                self.emit(f"{x}_tp = {call('gather_sequence', x, 'G.tp', dim=str(gather.dim))}",
                          "every rank's positions; backward: reduce-scatter")
            shard = params[weight].shard
            comment = "vocab-parallel logits" if target == "head" and shard is not None else ""
            self.emit(f"{name} = " + call("linear", self.entered.get(x, x), f'P["{weight}"]'), comment)
            self.after(target, name)
        elif target.endswith("attn.core"):
            att = spec.model.attention
            self.region = "attention"
            if self.serving:
                self.emit(f"{name} = " + call("paged_attention", *args[:3], "ctx.batch", layer=str(layer_of(target)),
                                              head_dim=str(att.head_dim), theta=repr(att.rope_theta)),
                          "writes this step's keys and values into the paged KV cache, reads the context")
            else:
                masked = {"segments": "ctx.segments"} if spec.train.data.document_mask else {}
                self.emit(f"{name} = " + call("attention", *args[:3], head_dim=str(att.head_dim),
                                              theta=repr(att.rope_theta), **masked),
                          "attention within each document" if masked else "")
            self.region = None
        elif target.endswith("ffn.router"):
            tokens = args[0]
            split = self.take(target, BEFORE, "split_tokens")
            if split is not None:
                self.emit(f"{tokens}_mine = {call('split_tokens', tokens, 'G.tp')}", "this rank's 1/tp of the tokens")
                self.subst[tokens] = f"{tokens}_mine"
                tokens = f"{tokens}_mine"
            self.region = "routing"  # through the dispatch all-to-all
            if self.serving and spec.serve is not None and spec.serve.routing_tables:
                self.emit(f"{name} = " + call("route_tables", tokens, f'ctx.tables["{target}"]'),
                          "precomputed at load: normalised centroids, router weights by group, load bias")
            else:
                weights = (f'P["{target}.centroids_GD"]', f'P["{target}.weight_ED"]', f'B["{target}.bias_E"]')
                self.emit(f"{name} = " + call("route", tokens, *weights, "ctx.routing"))
            self.after(target, name, ("unit_balance",))
            self.emit(f'ctx.observe("{target.rsplit(".", 1)[0]}", {name})', "loads, k per token, losses")
        elif target.endswith("ffn.dispatch"):
            moe_lines.dispatch(self, target, name, args[0])
        elif target.endswith("ffn.experts"):
            plan = _ref(n.args[1].args[0])  # counts_E's getattr source: the MoE plan
            moe_lines.experts(self, target, name, args[0], plan)
        elif target.endswith("ffn.combine"):
            self.emit(f"{name} = {call('combine_tokens', *args[:3])}")
            gather = self.take(target, AFTER, "gather_tokens")
            if gather is not None and self.serving:  # a step's tokens need not divide by tp
                self.emit(f"{name} = {call('gather_tokens', name, 'G.tp', rows=f'{_ref(n.args[2])}.shape[0]')}",
                          "the TP group's tokens")
            elif gather is not None:
                self.emit(f"{name} = {call('gather_tokens', name, 'G.tp')}", "the TP group's tokens")
            self.subst = {}
        else:
            raise NotImplementedError(f"no lowering for module {target}")

    def leftover(self) -> list[Comm]:
        return [c for found in self.comms.values() for c in found if c.key[0] != LOSS_POSITION]


def _ref(a: Any) -> str:
    if isinstance(a, fx.Node):
        return a.name
    if isinstance(a, (tuple, list)):
        return "(" + ", ".join(_ref(x) for x in a) + ("," if len(a) == 1 else "") + ")"
    return repr(a)


def stage_of_node(state: CompileState) -> dict[fx.Node, int]:
    """Each node's stage: call sites by their module; other nodes follow the last call site before them."""
    bounds = state.stage_bounds
    last = len(bounds) - 1
    of_layer = {i: s for s, (a, b) in enumerate(bounds) for i in range(a, b)}
    out, current = {}, 0
    for n in state.graph.graph.nodes:
        if n.op == "call_module":
            target = str(n.target)
            layer = layer_of(target)
            current = 0 if target == "embed" else last if layer is None else of_layer[layer]
        out[n] = current
    return out


CONTEXT_NAMES = {"ops", "F", "P", "W", "B", "G", "ctx"}
PARAM_REF = re.compile(r'P\["([^"]+)"\]')


@dataclass
class Function:
    name: str
    doc: str
    lines: list[Line]
    inputs: list[str] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)
    gather: dict[str, tuple[str, list[int]]] = field(default_factory=dict)  # ZeRO-3
    prefetch: str | None = None  # ZeRO-3: the function whose parameters to start gathering
    nested: bool = False  # a recomputed part of a layer


def _names(code: str) -> tuple[list[str], list[str]]:
    """(names a line assigns, names it reads), each in order of appearance."""
    stores, loads = [], []
    for node in ast.walk(ast.parse(code)):
        if isinstance(node, ast.Name) and node.id not in CONTEXT_NAMES:
            (stores if isinstance(node.ctx, ast.Store) else loads).append(node.id)
    return stores, loads


def _interface(lines: list[Line], used_later: set[str]) -> tuple[list[str], list[str]]:
    """A group of lines as a function: the values it reads from before it, the values read after it."""
    defined: list[str] = []
    inputs: list[str] = []
    for line in lines:
        stores, loads = _names(line.code)
        inputs += [n for n in loads if n not in defined and n not in inputs]
        defined += [n for n in stores if n not in defined]
    return inputs, [n for n in defined if n in used_later]


def _reads(lines: list[Line]) -> set[str]:
    return {n for line in lines for n in _names(line.code)[1]}


def _runs(lines: list[Line], key: str) -> list[tuple[str | None, list[Line]]]:
    """Consecutive lines with the same `key` attribute."""
    out: list[tuple[str | None, list[Line]]] = []
    for line in lines:
        value = getattr(line, key)
        if out and out[-1][0] == value:
            out[-1][1].append(line)
        else:
            out.append((value, [line]))
    return out


def _call(fn: Function, recompute: bool) -> str:
    args = ", ".join(["P", "B", *fn.inputs, "G", "ctx"])
    line = call("recompute", "ctx", fn.name, args) if recompute else f"{fn.name}({args})"
    return f"{', '.join(fn.outputs)} = {line}"


SEGMENT_DOC = {"embedding": "The token embedding.", "lm_head": "The final norm and the LM head."}
REGION_DOC = {"attention": "The attention core of layer {i}", "routing": "Routing and dispatch of layer {i}"}


def _functions(state: CompileState, lines: list[Line], result: str) -> tuple[list[Line], list[Function]]:
    """Group a stage's lines into functions; returns the lines of `forward` and the functions."""
    mode = state.spec.parallelism.activation_checkpointing if state.mode == "train" else "none"
    for i, line in enumerate(lines):  # lines before the stage's first call site belong to its first function
        if line.segment is None:
            line.segment = next(x.segment for x in lines[i:] if x.segment is not None)
    segments = _runs(lines, "segment")
    values = {n for line in lines for n in _names(line.code)[0]}
    clash = values & {f"{name}{suffix}" for name, _ in segments for suffix in ("", "_attention", "_routing")}
    if clash:
        raise ValueError(f"program values {sorted(clash)} would shadow the program's functions")
    forward: list[Line] = []
    functions: list[Function] = []
    for k, (name, body) in enumerate(segments):
        later = _reads([x for _, rest in segments[k + 1:] for x in rest]) | {result}
        layer = name.split("_")[1] if name.startswith("layer_") else None
        doc = SEGMENT_DOC.get(name)
        if doc is None:
            ffn = "the MoE block" if state.spec.model.is_moe(int(layer)) else "the SwiGLU FFN"
            doc = f"Layer {layer}: attention, then {ffn}."
        fn_lines: list[Line] = []
        regions: list[Function] = []
        runs = _runs(body, "region") if mode == "selective" else [(None, body)]
        for j, (region, run) in enumerate(runs):
            if region is None:
                fn_lines += run
                continue
            inner = Function(f"{name}_{region}", REGION_DOC[region].format(i=layer) + ": recomputed in backward "
                             "(selective activation checkpointing).", run, nested=True)
            inner.inputs, inner.outputs = _interface(run, _reads([x for _, r in runs[j + 1:] for x in r]) | later)
            fn_lines.append(Line(_call(inner, recompute=True), "keeps only the inputs; reruns in backward"))
            regions.append(inner)
        fn = Function(name, doc, fn_lines)
        fn.inputs, fn.outputs = _interface(body, later)
        full = mode == "full" and layer is not None
        forward.append(Line(_call(fn, recompute=full),
                            "activation checkpointing: keeps only the layer's input" if full else ""))
        functions += [fn, *regions]
    return forward, functions


def _decode_lines(state: CompileState, forward: list[Line], functions: list[Function]) -> list[Line]:
    """The lines of `decode_forward` (serve plans with serving.decode_kernel native_cpu; none otherwise):
    `forward`'s, each MoE layer's call replaced by one `ops.decode_layer` on the same input."""
    spec = state.spec
    if state.mode != "serve" or decode_kernel(spec) != "native_cpu":
        return []
    att, fused = spec.model.attention, {}
    for fn in functions:
        if fn.name.startswith("layer_") and not fn.nested and len(fn.inputs) == len(fn.outputs) == 1:
            layer = int(fn.name.split("_")[1])
            if spec.model.is_moe(layer):
                fused[fn.name] = f"{fn.outputs[0]} = " + call(
                    "decode_layer", fn.inputs[0], "P", "ctx", layer=str(layer), head_dim=str(att.head_dim),
                    theta=repr(att.rope_theta), eps=repr(spec.model.norm_eps))
    lines = []
    for line in forward:
        name = line.code.split(" = ", 1)[-1].split("(", 1)[0]
        lines.append(Line(fused[name], "the layer in one call of lcc's native kernels") if name in fused else line)
    return lines


def _zero_gathers(state: CompileState, functions: list[Function]) -> None:
    """ZeRO-3: each function gathers the parameters its own lines use and prefetches the next layer's."""
    for fn in functions:
        names = [n for line in fn.lines for n in PARAM_REF.findall(line.code)]
        for n in dict.fromkeys(names):
            info = state.params[n]
            fn.gather[n] = (info.zero.axis, info.local_shape)
        for line in fn.lines:
            line.code = line.code.replace('P["', 'W["')
    top = [fn for fn in functions if not fn.nested]
    for a, b in zip(top, top[1:], strict=False):
        if b.gather:
            a.prefetch = b.name


def _loss_lines(state: CompileState) -> list[Line]:
    """The cross-entropy of vocab-parallel logits as lines: the maximum and two sums over tp."""
    head = state.params["embed.weight" if state.spec.model.tie_embeddings else "head.weight"]
    start = f"ctx.tp_rank * {head.local_shape[0]}" if head.shard is not None else "0"
    what = {c.forward[0].what.split(": ", 1)[-1] for c in state.comms.get(state.last_stage, [])
            if c.key[0] == LOSS_POSITION}
    comments = [("vocab-parallel cross-entropy: " + w) if w in what else "" for w in
                ("the logits' maximum over the vocabulary", "the sum of exponentials", "the target's logit")]
    target = call("target_logit", "logits_TV", "peak_T", "targets_T", vocab_start=start)
    return [Line(f"logits_TV, targets_T = {call('flatten_logits', 'logits', 'targets')}", "float32 or wider"),
            Line(f"peak_T = {call('all_reduce_max', call('row_max', 'logits_TV'), 'G.tp')}", comments[0]),
            Line(f"sum_exp_T = {call('all_reduce', call('sum_exp', 'logits_TV', 'peak_T'), 'G.tp')}", comments[1]),
            Line(f"target_T = {call('all_reduce', target, 'G.tp')}", comments[2]),
            Line(f"ce = {call('cross_entropy', 'sum_exp_T', 'target_T', 'targets_T')}", "targets of -1: left out")]


def compiled_functions(state: CompileState, first: int, end: int) -> list[str]:
    """The program functions the runtime compiles (`train.compile: inductor`): each layer's, as one region
    between the ops that issue collectives or size tensors from values (lcc.ops marks them). float64
    verification runs and serve plans stay eager."""
    train = state.spec.train
    if state.mode != "train" or train.compile != "inductor" or train.dtype == "float64":
        return []
    return [f"layer_{i}" for i in range(first, end)]


def render_programs(state: CompileState) -> dict[str, str]:
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATES), keep_trailing_newline=True,
                             undefined=jinja2.StrictUndefined)
    template = env.get_template("program.py.j2")
    stages = stage_of_node(state)
    nodes = [n for n in state.graph.graph.nodes if n.op not in ("placeholder", "output")]
    output = next(n for n in state.graph.graph.nodes if n.op == "output")
    zero3 = state.memory.zero >= 3
    programs = {}
    for s, (a, b) in enumerate(state.stage_bounds):
        mine = [n for n in nodes if stages[n] == s]
        inputs = sorted({arg.name for n in mine for arg in n.all_input_nodes
                         if arg.op != "placeholder" and stages[arg] != s})
        if len(inputs) > 1:
            raise ValueError(f"stage {s} takes {len(inputs)} activations from earlier stages; expected one")
        emitter = _Emitter(state, s)
        for n in mine:
            emitter.node(n)
        unused = emitter.leftover()
        if unused:
            raise ValueError(f"stage {s}: the plan's {unused[0].line} at graph position {unused[0].key[0]} has no "
                             "program line")
        loss = _loss_lines(state) if s == state.last_stage and state.mode == "train" else None
        result = output.args[0].name if s == len(state.stage_bounds) - 1 else mine[-1].name
        placeholder = next(n for n in state.graph.graph.nodes if n.op == "placeholder").name
        params = [p for p in state.params.values() if s in p.stages]
        forward, functions = _functions(state, emitter.lines, result)
        decode = _decode_lines(state, forward, functions)
        if zero3:
            _zero_gathers(state, functions)
        kind = "serve" if state.mode == "serve" else state.spec.parallelism.pipeline.schedule
        programs[f"programs/stage{s}.py"] = template.render(
            spec=state.spec.name, stage=s, n_stages=len(state.stage_bounds),
            pp_rank=stage_rank(s, state.spec.parallelism.pp, kind),
            layers=[a, b], passes=[p.name for p in state.applied], stage_input=inputs[0] if inputs else placeholder,
            first=s == 0, result=result, forward=forward, functions=functions, params=params, zero3=zero3,
            memory=state.memory, loss=loss, serving=state.mode == "serve", decode=decode,
            buffers=[b.name for b in state.buffers if s in b.stages], compiled=compiled_functions(state, a, b),
        )
    return programs
