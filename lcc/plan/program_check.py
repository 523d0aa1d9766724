"""Programs against the plan: read each role's rendered program (its Python AST, not the data it was
rendered from), list the collectives it issues, and compare with what the plan says the role issues.

Forward collectives must match the plan's in order, op and mesh axis (and size, for ZeRO-3 gathers,
whose sizes the program's GATHER table states); backward collectives as a multiset (autograd orders
them). A collective on an axis of one rank is the identity and is not counted. `lcc compile` runs this
on every plan it writes, and the runtime on every plan folder it is asked to run.
"""

from __future__ import annotations

import ast
import math
from collections import Counter
from dataclasses import dataclass, field

from lcc.plan.op_table import OPS, named
from lcc.plan.types import Plan, Role

# lcc.ops functions that communicate, compute or gather ZeRO-3 parameters: all from lcc.plan.op_table
COLLECTIVE_OPS = named("collective")
ZERO = named("zero")
TABLES = ("PARAMETERS", "BUFFERS", "GATHER", "COMPILED")
# a program is straight-line code: what could repeat, skip or hide a line is not a program lcc renders
FORBIDDEN = (ast.For, ast.AsyncFor, ast.While, ast.If, ast.IfExp, ast.Try, ast.With, ast.AsyncWith, ast.ListComp,
             ast.SetComp, ast.DictComp, ast.GeneratorExp, ast.Lambda, ast.Global, ast.Nonlocal, ast.ClassDef,
             ast.Import, ast.ImportFrom, ast.Delete, ast.Await)


class ProgramMismatch(ValueError):
    """A program that does not issue what its plan says: the plan cannot be trusted, so nothing runs."""


@dataclass
class Issued:
    forward: list[tuple[str, str, int | None]] = field(default_factory=list)  # (op, axis, elements or None)
    backward: list[tuple[str, str]] = field(default_factory=list)


class _Reader:
    def __init__(self, plan: Plan, path: str, source: str):
        self.plan, self.path = plan, path
        tree = _parse(path, source)
        self.functions = {n.name: n for n in tree.body if isinstance(n, ast.FunctionDef)}
        self.gather: dict = _tables(path, tree).get("GATHER", {})
        self.out = Issued()
        self.prefetched: set[str] = set()
        self.running: list[str] = []
        self.checkpointed = 0  # inside a function activation checkpointing reruns: what it saves is not regathered

    def size(self, axis: str) -> int:
        return self.plan.mesh.size(axis)

    def run(self, name: str, recomputing: bool = False) -> None:
        fn = self.functions.get(name)
        if fn is None:
            raise ProgramMismatch(f"{self.path}: calls {name}(), which the program does not define")
        if name in self.running:
            raise ProgramMismatch(f"{self.path}: {name}() calls itself")
        self.running.append(name)
        for stmt in fn.body:
            self._visit(stmt, recomputing)
        self.running.pop()

    def _visit(self, node: ast.AST, recomputing: bool) -> None:
        """Calls in evaluation order: arguments before the call that takes them."""
        for child in ast.iter_child_nodes(node):
            self._visit(child, recomputing)
        if isinstance(node, ast.Call):
            self._call(node, recomputing)

    def _axis(self, call: ast.Call) -> str:
        for arg in [*call.args, *(k.value for k in call.keywords)]:
            if isinstance(arg, ast.Attribute) and isinstance(arg.value, ast.Name) and arg.value.id == "G":
                return arg.attr
        raise ProgramMismatch(f"{self.path}:{call.lineno}: a collective without a G.<axis> group")

    def _call(self, call: ast.Call, recomputing: bool) -> None:
        func = call.func
        if isinstance(func, ast.Name) and func.id in self.functions:
            self.run(func.id, recomputing)
            return
        if not (isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) and func.value.id == "ops"):
            return
        name = func.attr
        if name == "recompute":  # ops.recompute(ctx, fn, ...): forward once, again in backward
            if len(call.args) < 2 or not isinstance(call.args[1], ast.Name):
                raise ProgramMismatch(f"{self.path}:{call.lineno}: ops.recompute without a program function")
            target = call.args[1].id
            self.checkpointed += 1
            self.run(target, recomputing)
            self.checkpointed -= 1
            rerun = _Reader.__new__(_Reader)
            rerun.__dict__.update(self.__dict__, out=Issued(), prefetched=set())
            rerun.run(target, recomputing=True)
            self.out.backward += [(op, axis) for op, axis, _ in rerun.out.forward]
            return
        if name in ZERO:
            self._zero(call, name, recomputing)
            return
        if name not in COLLECTIVE_OPS:
            return
        axis = self._axis(call)
        if self.size(axis) == 1:
            return
        op = OPS[name]
        forward, backward = op.forward, op.backward
        if op.backward_kept is not None and (self.checkpointed or recomputing or self.plan.precision.autocast):
            backward = op.backward_kept  # the checkpoint (or autocast's copy) keeps the gathered input: no re-gather
        if not recomputing:
            self.out.forward += [(op, axis, None) for op in forward]
            self.out.backward += [(op, axis) for op in backward]
        else:  # a rerun in backward: its forward collectives are what backward issues again
            self.out.forward += [(op, axis, None) for op in forward]

    def _zero(self, call: ast.Call, name: str, recomputing: bool) -> None:
        key = call.args[1]
        if not (isinstance(key, ast.Subscript) and isinstance(key.slice, ast.Constant)):
            raise ProgramMismatch(f"{self.path}:{call.lineno}: ops.{name} without GATHER[\"function\"]")
        fn = key.slice.value
        chunks: dict[str, int] = {}
        for axis, shape in self.gather.get(fn, {}).values():
            parts = self.size(axis)
            chunks[axis] = chunks.get(axis, 0) + math.ceil(math.prod(shape) / parts)
        live = [(axis, chunk) for axis, chunk in chunks.items() if self.size(axis) > 1]
        if recomputing:
            return  # a rerun's gather is counted with the gather's own backward below
        if name == "zero_prefetch":
            self.out.forward += [("all_gather", axis, chunk) for axis, chunk in live]
            self.prefetched.add(fn)
            return
        if fn in self.prefetched:
            self.prefetched.discard(fn)
        else:
            self.out.forward += [("all_gather", axis, chunk) for axis, chunk in live]
        again = self._saves_weights(fn)
        for axis, _ in live:  # backward: reduce-scatter the gradients; gather again what backward uses
            self.out.backward += [("reduce_scatter", axis)] + ([("all_gather", axis)] if again else [])

    def _saves_weights(self, fn: str) -> bool:
        """Whether an op of function `fn` keeps a gathered weight for backward (an embedding lookup does not)."""
        for node in ast.walk(self.functions[fn]):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and \
                    node.func.attr in OPS and OPS[node.func.attr].keeps_weights and node.func.attr not in ZERO:
                uses = [a for a in node.args if isinstance(a, ast.Subscript) and isinstance(a.value, ast.Name)
                        and a.value.id == "W"]
                if uses:
                    return True
        return False


def _parse(path: str, source: str) -> ast.Module:
    """The program's AST, refused unless it is straight-line code over lcc.ops, as lcc renders it."""
    try:
        tree = ast.parse(source, filename=path)
    except SyntaxError as exc:
        raise ProgramMismatch(f"{path}:{exc.lineno}: not valid Python ({exc.msg}); compile again") from None
    for node in tree.body:
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant):
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [(getattr(node, "module", None), a.name, a.asname) for a in node.names]
            if names not in ([(None, "torch.nn.functional", "F")], [("lcc", "ops", None)]):
                raise ProgramMismatch(f"{path}:{node.lineno}: imports something other than lcc.ops and F")
            continue
        if isinstance(node, ast.FunctionDef):
            _straight(path, node)
            continue
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name) \
                and node.targets[0].id in TABLES:
            continue
        raise ProgramMismatch(f"{path}:{node.lineno}: a module-level statement lcc does not render")
    return tree


def _straight(path: str, fn: ast.FunctionDef) -> None:
    for node in ast.walk(fn):
        if node is not fn and isinstance(node, (*FORBIDDEN, ast.FunctionDef, ast.AsyncFunctionDef)):
            raise ProgramMismatch(f"{path}:{node.lineno}: {type(node).__name__} in {fn.name}(): programs are "
                                  "straight-line code")
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "ops" and \
                node.attr not in OPS:
            raise ProgramMismatch(f"{path}:{node.lineno}: ops.{node.attr} is not an op of lcc's programs")
        if isinstance(node, ast.Attribute) and node.attr.startswith("_"):
            raise ProgramMismatch(f"{path}:{node.lineno}: a private name ({node.attr}) in {fn.name}()")


def _tables(path: str, tree: ast.Module) -> dict:
    out = {}
    for n in tree.body:
        if isinstance(n, ast.Assign) and isinstance(n.targets[0], ast.Name) and n.targets[0].id in TABLES:
            try:
                out[n.targets[0].id] = ast.literal_eval(n.value)
            except ValueError:
                raise ProgramMismatch(f"{path}:{n.lineno}: {n.targets[0].id} is not a literal table") from None
    return out


def issued(plan: Plan, path: str, source: str, with_loss: bool) -> Issued:
    reader = _Reader(plan, path, source)
    reader.run("forward")
    if with_loss:
        reader.run("loss")
    return reader.out


def _check_tables(plan: Plan, role: Role, source: str) -> None:
    """The program's PARAMETERS and BUFFERS tables state exactly the role's parameters (local shape, global
    shape, shard) and buffers; COMPILED (absent: none) the functions the role compiles, each defined."""
    tables = _tables(role.program, _parse(role.program, source))
    params = tables.get("PARAMETERS", {})
    if sorted(params) != sorted(role.parameters):
        raise ProgramMismatch(f"{role.program}: PARAMETERS lists {sorted(set(params) ^ set(role.parameters))[:3]} "
                              "unlike the plan's role")
    for name, entry in params.items():
        p = plan.parameter(name)
        shard = None if p.shard is None else (p.shard.dim, p.shard.axis, p.shard.parts)
        if not isinstance(entry, tuple) or len(entry) < 3 or \
                (list(entry[0]), list(entry[1]), entry[2]) != (p.local_shape, p.global_shape, shard):
            raise ProgramMismatch(f"{role.program}: PARAMETERS[{name!r}] is {entry[:3]}, the plan says "
                                  f"({p.local_shape}, {p.global_shape}, {shard})")
    if sorted(tables.get("BUFFERS", [])) != sorted(role.buffers):
        raise ProgramMismatch(f"{role.program}: BUFFERS differ from the plan's role")
    compiled = tables.get("COMPILED", [])
    if list(compiled) != role.compiled:
        raise ProgramMismatch(f"{role.program}: COMPILED is {list(compiled)}, the plan's role compiles {role.compiled}")
    defined = {n.name for n in _parse(role.program, source).body if isinstance(n, ast.FunctionDef)}
    if set(role.compiled) - defined:
        raise ProgramMismatch(f"{role.program}: the plan compiles {sorted(set(role.compiled) - defined)}, which the "
                              "program does not define")


def check_role(plan: Plan, role: Role, source: str) -> None:
    path = role.program
    _check_tables(plan, role, source)
    got = issued(plan, path, source, role.head and plan.mode == "train")
    want = [(c.op, c.axis, c.shape[0] if c.site.startswith(("layer_", "embedding", "lm_head")) and c.shape
             else None) for c in role.forward]
    for i in range(max(len(got.forward), len(want))):
        g = got.forward[i] if i < len(got.forward) else None
        w = want[i] if i < len(want) else None
        same = g is not None and w is not None and g[:2] == w[:2] and (g[2] is None or w[2] is None or g[2] == w[2])
        if not same:
            site = role.forward[i].site if i < len(role.forward) else "(nothing)"
            raise ProgramMismatch(
                f"{path}: forward collective {i + 1} is {_say(g)} in the program but {_say(w)} in the plan "
                f"(site {site}); the program and plan.json disagree: compile again (lcc compile)")
    if plan.mode == "serve":
        _check_decode(plan, path, source, got.forward)
    got_back = Counter(got.backward if plan.mode == "train" else [])  # serve plans run no backward
    want_back = Counter((c.op, c.axis) for c in role.backward)
    if got_back != want_back:
        extra, missing = got_back - want_back, want_back - got_back
        raise ProgramMismatch(f"{path}: backward collectives differ from the plan: the program adds "
                              f"{dict(extra) or 'nothing'} and lacks {dict(missing) or 'nothing'}")


def _check_decode(plan: Plan, path: str, source: str, forward: list) -> None:
    """A serve program defines `decode_forward` exactly where the plan's serving.decode_kernel is native_cpu,
    and it issues the collectives `forward` issues, in the same order (its fused layers issue none)."""
    defined = {n.name for n in _parse(path, source).body if isinstance(n, ast.FunctionDef)}
    want = plan.serving is not None and plan.serving.decode_kernel == "native_cpu"
    if ("decode_forward" in defined) != want:
        raise ProgramMismatch(f"{path}: {'no' if want else 'a'} decode_forward, but the plan's serving.decode_kernel "
                              f"is {plan.serving.decode_kernel if plan.serving else None}: compile again (lcc compile)")
    if want:
        reader = _Reader(plan, path, source)
        reader.run("decode_forward")
        if reader.out.forward != forward:
            raise ProgramMismatch(f"{path}: decode_forward issues {[_say(c) for c in reader.out.forward]}, forward "
                                  f"{[_say(c) for c in forward]}: compile again (lcc compile)")


def check_programs(plan: Plan, files: dict[str, str]) -> None:
    """Every role's program (given as {relative path: source}) against the plan; raises ProgramMismatch."""
    for role in plan.roles:
        if role.program not in files:
            raise ProgramMismatch(f"{role.program}: missing (the plan's role {role.name} has no program)")
        check_role(plan, role, files[role.program])


def _say(c: tuple | None) -> str:
    if c is None:
        return "nothing"
    return f"{c[0]}({c[1]})" + (f" of {c[2]} elements" if c[2] is not None else "")
