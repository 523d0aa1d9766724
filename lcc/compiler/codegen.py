"""Per-role programs: the traced graph of one stage, lowered with the plan's decisions, as readable Python.

Each fx node of the stage becomes one line calling an lcc op (or a plain tensor expression); the passes'
collectives become lines of their own, so the program shows every communication its rank issues.
Rendered by lcc's own template, so the text does not change with the torch version.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jinja2
import torch.fx as fx
import torch.nn.functional as F

from lcc.compiler.state import CompileState
from lcc.compiler.trace import layer_of

TEMPLATES = Path(__file__).parent / "templates"
COLUMN = ("attn.wq", "attn.wk", "attn.wv", "ffn.w1", "ffn.w3", "ffn.shared.w1", "ffn.shared.w3", "head")
ROW = ("attn.wo", "ffn.w2", "ffn.shared.w2")


@dataclass
class Line:
    code: str
    comment: str = ""


class _Emitter:
    def __init__(self, state: CompileState, stage: int):
        self.state, self.stage = state, stage
        spec = state.spec
        self.tp = spec.parallelism.tp
        self.ep = spec.parallelism.ep
        self.sp = spec.parallelism.sequence_parallel
        self.lines: list[Line] = []
        self.entered: dict[str, str] = {}  # value -> its copy entering the TP region
        self.subst: dict[str, str] = {}  # inside an MoE block with tp: the full tokens -> this rank's share

    def emit(self, code: str, comment: str = "") -> None:
        self.lines.append(Line(code, comment))

    def tp_input(self, value: str) -> str:
        """A column-parallel layer's input: identity forward, all-reduce of its gradient backward."""
        if self.tp == 1:
            return value
        if value not in self.entered:
            name = f"{value}_tp"
            self.emit(f"{name} = ops.copy_to_tp({value}, G.tp)", "backward: all-reduce over tp")
            self.entered[value] = name
        return self.entered[value]

    def node(self, n: fx.Node) -> None:
        name, args = n.name, [self.subst.get(r, r) for r in (_ref(a) for a in n.args)]
        if n.op == "call_module":
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

    def module(self, n: fx.Node, name: str, args: list[str]) -> None:
        target = str(n.target)
        spec = self.state.spec
        if target == "embed":
            width = spec.model.vocab_size // self.tp
            self.emit(f'{name} = ops.embedding_shard({args[0]}, P["embed.weight"], vocab_start=ctx.tp_rank * {width})')
            if self.tp > 1:
                self.emit(f"{name} = ops.all_reduce({name}, G.tp)", "vocab-parallel embedding: sum over tp")
        elif target.endswith("norm"):
            self.emit(f'{name} = ops.rms_norm({args[0]}, P["{target}.weight"], eps={spec.model.norm_eps!r})')
        elif target.endswith(COLUMN):
            weight = "embed.weight" if target == "head" and spec.model.tie_embeddings else f"{target}.weight"
            self.emit(f'{name} = ops.linear({self.tp_input(args[0])}, P["{weight}"])',
                      "vocab-parallel logits" if target == "head" else "")
        elif target.endswith(ROW):
            self.emit(f'{name} = ops.linear({args[0]}, P["{target}.weight"])')
            if self.tp > 1:
                self.emit(f"{name} = ops.all_reduce({name}, G.tp)", "row-parallel: sum partial results")
        elif target.endswith("attn.core"):
            att = spec.model.attention
            self.emit(f"{name} = ops.attention({args[0]}, {args[1]}, {args[2]}, head_dim={att.head_dim}, "
                      f"theta={att.rope_theta!r})")
        elif target.endswith("ffn.router"):
            tokens = args[0]
            if self.tp > 1 and not self.sp:
                self.emit(f"{tokens}_mine = ops.split_tokens({tokens}, G.tp)", "this rank's 1/tp of the tokens")
                self.subst[tokens] = f"{tokens}_mine"
                tokens = f"{tokens}_mine"
            self.emit(f'{name} = ops.route({tokens}, P["{target}.centroids_GD"], P["{target}.weight_ED"], '
                      f'B["{target}.bias_E"], ctx.routing)')
            self.emit(f'ctx.observe("{target.rsplit(".", 1)[0]}", {name})', "loads, k per token, losses")
        elif target.endswith("ffn.dispatch"):
            self.emit(f"{name} = ops.moe_plan({args[0]}, n_experts={spec.model.moe.n_experts}, group=G.ep)",
                      "exchanges per-expert counts over ep" if self.ep > 1 else "")
        elif target.endswith("ffn.experts"):
            gathered = args[0]
            plan = _ref(n.args[1].args[0])  # counts_E's getattr source: the MoE plan
            if self.ep > 1:
                self.emit(f"{gathered} = ops.all_to_all({gathered}, {plan}.send, {plan}.recv, G.ep)", "dispatch")
                self.emit(f"{gathered} = {gathered}.index_select(0, {plan}.order)", "group rows by local expert")
            if self.state.mode == "serve" and any(p.serve for p in self.state.params.values()):
                self.emit(f'{name} = ops.grouped_swiglu_int4({gathered}, {plan}.local_counts, P["{target}.w1_EFD"], '
                          f'P["{target}.w3_EFD"], P["{target}.w2_EDF"])', "packed int4 experts")
            else:
                self.emit(f'{name} = ops.grouped_swiglu({gathered}, {plan}.local_counts, P["{target}.w1_EFD"], '
                          f'P["{target}.w3_EFD"], P["{target}.w2_EDF"])')
            if self.ep > 1:
                self.emit(f"{name} = {name}.index_select(0, {plan}.inverse)")
                self.emit(f"{name} = ops.all_to_all({name}, {plan}.recv, {plan}.send, G.ep)", "combine")
        elif target.endswith("ffn.combine"):
            self.emit(f"{name} = ops.combine_tokens({args[0]}, {args[1]}, {args[2]})")
            if self.subst:
                self.emit(f"{name} = ops.gather_tokens({name}, G.tp)", "the TP group's tokens")
                self.subst = {}
        else:
            raise NotImplementedError(f"no lowering for module {target}")


def _ref(a: Any) -> str:
    if isinstance(a, fx.Node):
        return a.name
    if isinstance(a, (tuple, list)):
        return "(" + ", ".join(_ref(x) for x in a) + ("," if len(a) == 1 else "") + ")"
    return repr(a)


def _local_shape(p) -> list[int]:
    shape = list(p.shape)
    shape[p.shard["dim"]] //= p.shard["parts"]
    return shape


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


def render_programs(state: CompileState) -> dict[str, str]:
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATES), keep_trailing_newline=True,
                             undefined=jinja2.StrictUndefined)
    env.globals["local_shape"] = _local_shape
    template = env.get_template("program.py.j2")
    stages = stage_of_node(state)
    nodes = [n for n in state.graph.graph.nodes if n.op not in ("placeholder", "output")]
    output = next(n for n in state.graph.graph.nodes if n.op == "output")
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
        result = output.args[0].name if s == len(state.stage_bounds) - 1 else mine[-1].name
        placeholder = next(n for n in state.graph.graph.nodes if n.op == "placeholder").name
        params = [p for p in state.params.values() if s in p.stages]
        programs[f"programs/stage{s}.py"] = template.render(
            spec=state.spec.name, stage=s, n_stages=len(state.stage_bounds), pp_rank=s % state.spec.parallelism.pp,
            layers=[a, b], passes=[p["name"] for p in state.applied], stage_input=inputs[0] if inputs else placeholder,
            first=s == 0, result=result, lines=emitter.lines, params=params,
            buffers=[f"layers.{i}.ffn.router.bias_E" for i in range(a, b) if state.spec.model.is_moe(i)],
        )
    return programs
