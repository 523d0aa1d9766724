"""The op table is the one list of program operations: every op a program calls is declared, every declared
op is implemented in lcc.ops and called by some program (a shipped plan's, or one of the layout its
declaration names), and the programs of those layouts pass the plan check and the graph reader."""

from __future__ import annotations

import ast
import json

import pytest

from lcc import ops
from lcc.compiler.plan import compile_plan
from lcc.inspect.program_graph import role_graph
from lcc.plan import loads
from lcc.plan.op_table import OPS, TABLE, collective_kinds, render_call
from lcc.plan.program_check import check_programs
from lcc.spec import load_spec
from tests.conftest import ROOT, SPECS

GOLDEN = sorted((ROOT / "generated").glob("**/programs/*.py"))
LAYOUTS = sorted({(o.layout, o.mode) for o in TABLE if o.layout is not None})


def called(source: str) -> set[str]:
    """The `ops.<name>` a program calls."""
    return {n.func.attr for n in ast.walk(ast.parse(source)) if isinstance(n, ast.Call)
            and isinstance(n.func, ast.Attribute) and isinstance(n.func.value, ast.Name) and n.func.value.id == "ops"}


def in_golden() -> set[str]:
    return set().union(*(called(p.read_text()) for p in GOLDEN))


@pytest.fixture(scope="module")
def layout_files() -> dict[tuple[tuple[str, ...], str], dict[str, str]]:
    return {(layout, mode): compile_plan(load_spec(SPECS / "tiny-moe.yaml", list(layout)), mode)
            for layout, mode in LAYOUTS}


def test_every_op_a_shipped_program_calls_is_declared():
    assert GOLDEN
    assert in_golden() <= set(OPS), in_golden() - set(OPS)


def test_every_declared_op_is_implemented():
    missing = [o.name for o in TABLE if not callable(getattr(ops, o.name, None))]
    assert not missing, f"declared in lcc.plan.op_table but not in lcc.ops: {missing}"


def test_every_declared_op_is_called_by_a_shipped_plan_or_its_layout(layout_files):
    golden = in_golden()
    for o in TABLE:
        if o.layout is None:
            assert o.name in golden, f"ops.{o.name}: no shipped program calls it; declare a layout that does"
        else:
            assert o.name not in golden, f"ops.{o.name}: shipped programs call it; its layout is not needed"
            files = layout_files[(o.layout, o.mode)]
            used = set().union(*(called(t) for k, t in files.items() if k.startswith("programs/")))
            assert o.name in used, f"ops.{o.name}: the {o.mode} programs of its layout {o.layout} do not call it"


def test_the_layouts_programs_agree_with_their_plans_and_read_as_graphs(layout_files):
    for (layout, _mode), files in layout_files.items():
        plan = loads(files["plan.json"])
        check_programs(plan, files)
        k_max = json.loads(files["spec.json"])["routing"]["k"]["max"]
        for role in plan.roles:
            graph = role_graph(plan, role, files[role.program], k_max)
            assert graph.nodes, (layout, role.name)


def test_collectives_are_declared_on_collective_ops_only():
    assert collective_kinds() == {"all_reduce", "all_reduce_max", "all_gather", "reduce_scatter", "all_to_all"}
    assert all(not (o.forward or o.backward) for o in TABLE if o.kind in ("compute", "recompute"))


def test_a_call_of_an_undeclared_op_or_keyword_is_refused():
    assert render_call("all_reduce", "x", "G.tp") == "ops.all_reduce(x, G.tp)"
    assert render_call("gather_sequence", "x", "G.tp", dim="1") == "ops.gather_sequence(x, G.tp, dim=1)"
    with pytest.raises(KeyError, match="not declared"):
        render_call("all_reduce_min", "x", "G.tp")
    with pytest.raises(ValueError, match="no keyword"):
        render_call("all_reduce", "x", "G.tp", dim="0")

