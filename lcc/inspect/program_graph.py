"""A role's program as a dataflow graph with every value's dtype and shape, read from its source text (never
run): statements in program order, the layer functions and recomputed calls inlined, each `ops.*` call a
node of lcc's operations (collectives included, with their mesh axis and group size), plain tensor
expressions as standard operations. Shapes are the rank's local ones; sizes that depend on the data (the
rows routing sends to each expert, the tokens of a serving step) are named dimensions. Each call's shape
rule is the `rule_<graph>` method its declaration in `lcc.plan.op_table` names."""

from __future__ import annotations

import ast
from typing import Any

from lcc.inspect.graph_moe import MoERules
from lcc.inspect.graph_values import (
    Dim,
    Graph,
    GraphError,
    Group,
    Node,
    Struct,
    Value,
    infer_dim,
    over,
    prod_dims,
    promote,
    times,
)
from lcc.plan.op_table import OPS, Op
from lcc.plan.types import Plan, Role, chunk_size


class _Reader(MoERules):
    def __init__(self, plan: Plan, role: Role, source: str, k_max: int):
        self.plan, self.role, self.k_max = plan, role, k_max
        self.tree = ast.parse(source)
        self.functions = {f.name: f for f in self.tree.body if isinstance(f, ast.FunctionDef)}
        self.module_consts: dict[str, Any] = {}
        for stmt in self.tree.body:
            if isinstance(stmt, ast.Assign) and isinstance(stmt.targets[0], ast.Name):
                self.module_consts[stmt.targets[0].id] = ast.literal_eval(stmt.value)
        self.nodes: list[Node] = []
        self.values: dict[str, Value] = {}
        self.inputs: list[Value] = []
        self.constants: dict[str, list[int]] = {}
        self.compute = plan.dtype if plan.mode == "serve" else plan.precision.compute
        self.params_dtype = plan.dtype if plan.mode == "serve" else plan.precision.params
        self.sizes = plan.axis_sizes()
        self.sizes["kv"] = plan.mesh.kv

    # ------------------------------------------------------------------------------------------ values
    def new(self, name: str, dtype: str, shape: list[Dim]) -> Value:
        base, n = name, 1
        while name in self.values:
            name = f"{base}__{n}"
            n += 1
        v = Value(name, dtype, list(shape))
        self.values[name] = v
        return v

    def node(self, op: str, inputs: list[Value], outputs: list[Value], domain: str = "lcc", **attrs: Any) -> None:
        self.nodes.append(Node(op, domain, [v.name for v in inputs], [v.name for v in outputs],
                               {k: v for k, v in attrs.items() if v is not None}))

    def cast(self, v: Value, dtype: str) -> Value:
        if v.dtype == dtype:
            return v
        out = self.new(f"{v.name}_{dtype}", dtype, v.shape)
        self.node("Cast", [v], [out], domain="", to=dtype)
        return out

    def graph_input(self, name: str, dtype: str, shape: list[Dim]) -> Value:
        if name in self.values:
            return self.values[name]
        v = self.new(name, dtype, shape)
        self.inputs.append(v)
        return v

    def param(self, name: str) -> Value | Struct:
        """A parameter as the rank holds it: its local shard, its flat ZeRO-3 piece (which `zero_gather`
        all-gathers into the local shard), or, for serve plans' int4 experts, the packed codes and scales."""
        p = self.plan.parameter(name)
        if p.serve is not None:
            parts = p.shard.parts if p.shard is not None else 1
            packed = [p.serve.packed[0] // parts, *p.serve.packed[1:]]
            scales = [p.serve.scales[0] // parts, *p.serve.scales[1:]]
            return Struct({"packed": self.graph_input(name, p.serve.packed_dtype, packed),
                           "scales": self.graph_input(f"{name}.scales", p.serve.scales_dtype, scales)})
        if p.zero is not None and self.plan.mode == "train" and self.plan.memory.zero >= 3:  # a ZeRO-3 piece
            return self.graph_input(name, self.params_dtype, [chunk_size(p.local_numel, p.zero.parts)])
        return self.graph_input(name, self.params_dtype, p.local_shape)

    # ------------------------------------------------------------------------------------ interpreting
    def run(self) -> Graph:
        fn = self.functions["forward"]
        args = [a.arg for a in fn.args.args]
        stage_input = args[2]
        if self.role.stage == 0:
            tokens: list[Dim] = [1, "tokens"] if self.plan.mode == "serve" else \
                [self.plan.data.sequences_per_unit, self.plan.data.seq_len]
            x = self.graph_input(stage_input, "int64", tokens)
        else:
            shape = [d if d >= 0 else "tokens" for d in self.plan.schedule.boundary_shape]
            x = self.graph_input(stage_input, self.params_dtype, shape)  # as the runtime receives it
        env = {"P": "P", "B": "B", "G": "G", "ctx": "ctx", stage_input: x}
        out = self.call(fn, [env[a] for a in args])
        outputs = [out]
        if "loss" in self.functions and self.plan.mode == "train":
            targets = self.graph_input("targets", "int64", [self.plan.data.sequences_per_unit, self.plan.data.seq_len])
            outputs.append(self.call(self.functions["loss"], ["P", "B", out, targets, "G", "ctx"]))
        return Graph(self.role.name, self.inputs, outputs, self.nodes, self.values, self.constants)

    def call(self, fn: ast.FunctionDef, args: list[Any]) -> Any:
        env = dict(zip([a.arg for a in fn.args.args], args, strict=True))
        for stmt in fn.body:
            if isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Constant):
                continue  # the docstring
            if isinstance(stmt, ast.Return):
                return self.ev(stmt.value, env)
            if isinstance(stmt, ast.Assign):
                target = stmt.targets[0]
                value = self.ev(stmt.value, env, target)
                if isinstance(target, ast.Tuple):
                    for t, v in zip(target.elts, value, strict=True):
                        env[t.id] = v
                else:
                    env[target.id] = value
            elif isinstance(stmt, ast.Expr):
                self.ev(stmt.value, env)
            else:
                raise GraphError(f"{self.role.program}:{stmt.lineno}: cannot read {ast.unparse(stmt)[:80]}")
        return None

    def ev(self, e: ast.expr, env: dict[str, Any], target: ast.expr | None = None) -> Any:
        name = target.id if isinstance(target, ast.Name) else None
        if isinstance(e, ast.Constant):
            return e.value
        if isinstance(e, ast.Name):
            if e.id in env:
                return env[e.id]
            if e.id in self.module_consts:
                return self.module_consts[e.id]
            if e.id in self.functions:
                return self.functions[e.id]
            raise GraphError(f"{self.role.program}:{e.lineno}: unknown name {e.id}")
        if isinstance(e, ast.Tuple):  # a recomputed region returning several values
            return tuple(self.ev(x, env) for x in e.elts)
        if isinstance(e, ast.UnaryOp) and isinstance(e.op, ast.USub):
            return -self.ev(e.operand, env)
        if isinstance(e, ast.Subscript):
            return self.subscript(e, env)
        if isinstance(e, ast.Attribute):
            return self.attribute(e, env)
        if isinstance(e, ast.BinOp):
            a, b = self.ev(e.left, env), self.ev(e.right, env)
            if isinstance(a, Value) and isinstance(b, Value):
                op = {ast.Add: "Add", ast.Mult: "Mul", ast.Sub: "Sub"}[type(e.op)]
                dtype = promote(a.dtype, b.dtype)
                a, b = (self.cast(v, dtype) for v in (a, b))  # torch promotes; ONNX wants one type: a Cast
                out = self.new(name or op.lower(), dtype, a.shape)
                self.node(op, [a, b], [out], domain="")
                return out
            return f"{ast.unparse(e)}"  # an expression of the rank (vocab_start=ctx.tp_rank * 16384): an attribute
        if isinstance(e, ast.Call):
            return self.call_expr(e, env, name, target)
        raise GraphError(f"{self.role.program}:{e.lineno}: cannot read {ast.unparse(e)[:80]}")

    def subscript(self, e: ast.Subscript, env: dict[str, Any]) -> Any:
        base = self.ev(e.value, env)
        key = self.ev(e.slice, env)
        if base in ("P", "B"):
            if base == "B":
                buf = next(b for b in self.plan.buffers if b.name == key)
                return self.graph_input(key, buf.dtype, buf.shape)
            return self.param(key)
        if isinstance(base, dict) and "__gathered__" in base:  # W: gathered here, else as P holds it
            return base[key] if key in base else self.param(key)
        if isinstance(base, tuple | list):
            return base[key]
        if isinstance(base, dict):
            return base[key]
        if base == "ctx.tables":  # serve: a router's tables, precomputed at load from its parameters
            site = key
            buf = next(b for b in self.plan.buffers if b.name == f"{site}.bias_E")
            return Struct({"centroids": self.param(f"{site}.centroids_GD"), "weight": self.param(f"{site}.weight_ED"),
                           "bias": self.graph_input(buf.name, buf.dtype, buf.shape)})
        raise GraphError(f"{self.role.program}:{e.lineno}: cannot index {ast.unparse(e)[:80]}")

    def attribute(self, e: ast.Attribute, env: dict[str, Any]) -> Any:
        base = self.ev(e.value, env)
        if base == "G":
            return Group(e.attr, self.sizes[e.attr])
        if base == "ctx":
            if e.attr == "batch":  # the step's positions (block tables and KV slots travel with them)
                return self.graph_input("step_batch", "int64", ["tokens"])
            return f"ctx.{e.attr}"
        if isinstance(base, Value) and e.attr == "shape":
            return tuple(base.shape)
        if isinstance(base, Struct):
            return base.fields[e.attr]
        raise GraphError(f"{self.role.program}:{e.lineno}: cannot read {ast.unparse(e)[:80]}")

    # ------------------------------------------------------------------------------------------ calls
    def call_expr(self, e: ast.Call, env: dict[str, Any], name: str | None, target: ast.expr | None) -> Any:
        f = e.func
        args = [self.ev(a, env) for a in e.args]
        kw = {k.arg: self.ev(k.value, env) for k in e.keywords}
        if isinstance(f, ast.Name) and f.id in self.functions:
            return self.call(self.functions[f.id], args)
        if isinstance(f, ast.Attribute):
            owner = f.value
            if isinstance(owner, ast.Name) and owner.id == "ops":
                if f.attr == "recompute":  # activation checkpointing: the layer, inlined
                    return self.call(args[1], args[2:])
                return self.op(f.attr, args, kw, name or f.attr, target)
            if isinstance(owner, ast.Name) and owner.id == "F" and f.attr == "silu":  # x * sigmoid(x)
                x = args[0]
                sig = self.new(f"{name}_sigmoid", x.dtype, x.shape)
                self.node("Sigmoid", [x], [sig], domain="")
                out = self.new(name or "silu", x.dtype, x.shape)
                self.node("Mul", [x, sig], [out], domain="")
                return out
            if isinstance(owner, ast.Name) and owner.id == "ctx" and f.attr == "observe":
                return None  # routing statistics for the metrics: no tensor flows on
            obj = self.ev(owner, env)
            if isinstance(obj, Value):
                return self.method(obj, f.attr, args, name or f.attr)
        raise GraphError(f"{self.role.program}:{e.lineno}: cannot read {ast.unparse(e)[:80]}")

    def method(self, x: Value, method: str, args: list[Any], name: str) -> Value:
        if method in ("reshape", "view"):
            dims = list(args[0]) if len(args) == 1 and isinstance(args[0], tuple | list) else list(args)
            if -1 in dims:
                inferred = infer_dim(x.shape, [d for d in dims if d != -1])
                dims = [inferred if d == -1 else d for d in dims]
            shape_name = f"{name}_shape"
            self.constants[shape_name] = [d if isinstance(d, int) else -1 for d in dims]
            if sum(not isinstance(d, int) for d in dims) > 1:  # Reshape takes one inferred dim: keep it exact
                out = self.new(name, x.dtype, dims)
                self.node("reshape", [x], [out], shape=[str(d) for d in dims])
                return out
            shape = self.new(shape_name, "int64", [len(dims)])
            out = self.new(name, x.dtype, dims)
            self.node("Reshape", [x, shape], [out], domain="")
            return out
        if method == "index_select":
            axis, index = args
            out = self.new(name, x.dtype, [index.shape[0], *x.shape[1:]])
            self.node("Gather", [x, index], [out], domain="", axis=axis)
            return out
        raise GraphError(f"{self.role.program}: unknown tensor method {method}")

    def op(self, op: str, args: list[Any], kw: dict[str, Any], name: str, target: ast.expr | None) -> Any:
        """One `ops.*` call: its node, attributes and output shapes."""
        declared = OPS.get(op)
        rule = getattr(self, f"rule_{declared.graph}", None) if declared is not None else None
        if rule is None:
            raise GraphError(f"{self.role.program}: ops.{op} has no shape rule")
        return rule(declared, args, kw, name, target)

    def rule_same(self, op: Op, args, kw, name, target):
        """An output shaped like the first input; the declared keywords as attributes, with the group's."""
        attrs = {k: convert(kw[k]) for k, convert in op.attrs}
        group = next((a for a in args if isinstance(a, Group)), None)
        return self._same(op.name, args[0], args, name, **attrs, **(self._group(group) if group else {}))

    def rule_rows(self, op: Op, args, kw, name, target):
        """One float32 value per row of the first input."""
        return self._rows(op.name, args, name, **{k: convert(kw[k]) for k, convert in op.attrs})

    def rule_grow(self, op: Op, args, kw, name, target):
        return self._along(op.name, args, kw, name, True)

    def rule_shrink(self, op: Op, args, kw, name, target):
        return self._along(op.name, args, kw, name, False)

    def _same(self, op: str, x: Value, inputs: list[Any], name: str, **attrs: Any) -> Value:
        out = self.new(name, x.dtype, x.shape)
        self.node(op, [v for v in inputs if isinstance(v, Value)], [out], **attrs)
        return out

    def _group(self, g: Group) -> dict[str, Any]:
        return {"axis": g.axis, "group_size": g.size}

    def rule_linear(self, op: Op, args, kw, name, target):
        x, w = args
        out = self.new(name, self.compute, [*x.shape[:-1], w.shape[0]])
        self.node("linear", [x, w], [out])
        return out

    def rule_embedding_shard(self, op: Op, args, kw, name, target):
        tokens, w = args
        out = self.new(name, self.params_dtype, [*tokens.shape, w.shape[1]])  # a lookup: not autocast
        self.node("embedding_shard", [tokens, w], [out], vocab_start=str(kw["vocab_start"]))
        return out

    def _along(self, op: str, args, kw, name, grow: bool) -> Value:
        x, g = args[0], args[1]
        dim = kw.get("dim", args[2] if len(args) > 2 else -1)
        shape = list(x.shape)
        shape[dim] = times(shape[dim], g.size) if grow else over(shape[dim], g.size)
        out = self.new(name, x.dtype, shape)
        self.node(op, [x], [out], dim=dim, **self._group(g))
        return out

    def rule_split_tokens(self, op: Op, args, kw, name, target):
        x, g = args
        out = self.new(name, x.dtype, [over(x.shape[0], g.size) if isinstance(x.shape[0], int)
                                       else f"{x.shape[0]}/{g.size}", *x.shape[1:]])
        self.node("split_tokens", [x], [out], **self._group(g))
        return out

    def rule_gather_tokens(self, op: Op, args, kw, name, target):
        x, g = args
        rows = kw.get("rows")
        out = self.new(name, x.dtype, [rows if rows is not None else times(x.shape[0], g.size), *x.shape[1:]])
        self.node("gather_tokens", [x], [out], **self._group(g))
        return out

    def rule_last_positions(self, op: Op, args, kw, name, target):
        x, batch = args
        out = self.new(name, x.dtype, ["sequences", x.shape[-1]])
        self.node("last_positions", [x, batch], [out])
        return out

    def rule_zero_gather(self, op: Op, args, kw, name, target):
        params = args[1]
        out: dict[str, Any] = {"__gathered__": True}
        for axis in sorted({a for a, _ in params.values()}):
            names = [n for n, (a, _) in params.items() if a == axis]
            shards = [self.param(n) for n in names]
            full = [self.new(f"{n}.gathered", self.params_dtype, params[n][1]) for n in names]
            self.node("zero_gather", shards, full, axis=axis, group_size=self.sizes[axis])
            out.update(zip(names, full, strict=True))
        return out

    def rule_zero_prefetch(self, op: Op, args, kw, name, target):
        params = args[1]
        done = self.new(f"prefetch.{next(iter(params))}", "bool", [])
        self.node("zero_prefetch", [self.param(n) for n in params], [done],
                  axes=sorted({a for a, _ in params.values()}))
        return None

    def rule_flatten_logits(self, op: Op, args, kw, name, target):
        logits, targets = args
        rows = prod_dims(logits.shape[:-1])
        names = [t.id for t in target.elts] if isinstance(target, ast.Tuple) else ["logits_TV", "targets_T"]
        a = self.new(names[0], "float32", [rows, logits.shape[-1]])
        b = self.new(names[1], "int64", [rows])
        self.node("flatten_logits", [logits, targets], [a, b])
        return a, b

    def _rows(self, op: str, args: list[Any], name: str, dtype: str = "float32", **attrs: Any) -> Value:
        first = args[0]
        out = self.new(name, dtype, [first.shape[0]])
        self.node(op, [v for v in args if isinstance(v, Value)], [out], **attrs)
        return out

    def rule_cross_entropy(self, op: Op, args, kw, name, target):
        out = self.new(name, "float64", [])
        self.node("cross_entropy", args, [out])
        return out


def role_graph(plan: Plan, role: Role, source: str, k_max: int) -> Graph:
    """`k_max`: the most experts a token is routed to (routing.k.max: the routing result's width)."""
    return _Reader(plan, role, source, k_max).run()
