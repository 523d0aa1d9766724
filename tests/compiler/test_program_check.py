"""Plan and programs are checked against each other: a program that does not issue exactly what its plan
lists (read from its AST) is refused, at compile time and before a run starts."""

from __future__ import annotations

import json

import pytest

from lcc.compiler.output import write
from lcc.compiler.plan import compile_plan
from lcc.plan import PLAN_VERSION, loads
from lcc.plan.program_check import ProgramMismatch, check_programs
from lcc.runtime.launch import launch
from lcc.runtime.support import RunError
from lcc.spec import load_spec
from tests.conftest import SPECS

LAYOUT = ["parallelism.tp=2", "parallelism.pp=1", "parallelism.dp=2", "parallelism.ep=4", "cluster.gpus_per_node=4",
          "parallelism.zero=3", "parallelism.activation_checkpointing=selective"]


@pytest.fixture(scope="module")
def compiled() -> dict[str, str]:
    return compile_plan(load_spec(SPECS / "tiny-moe.yaml", LAYOUT))


CORRUPTIONS = {
    "row-parallel all-reduce removed": ("layers_1_attn_wo = ops.all_reduce(layers_1_attn_wo, G.tp)", "pass"),
    "dispatch on the wrong axis": ("layers_0_ffn_dispatch.recv, G.ep)  # dispatch",
                                   "layers_0_ffn_dispatch.recv, G.dp)  # dispatch"),
    "an extra collective": ("    return ce\n", "    ce = ops.all_reduce(ce, G.dp)\n    return ce\n"),
    "prefetch removed": ('    ops.zero_prefetch(P, GATHER["layer_2"], G, ctx)', "    pass"),
    "split tokens never gathered back in backward": ("ops.split_tokens(", "ops.gather_tokens("),
    "a loop": ("    layers_1_attn_wo = ops.all_reduce(",
               "    for _ in range(2):\n        layers_1_attn_wo = ops.all_reduce("),
    "a hidden private collective": ("ops.all_reduce(layers_1_attn_wo, G.tp)",
                                    "ops.collectives._all_reduce(layers_1_attn_wo, G.tp)"),
    "not Python": ("def forward(", "def forward(("),
    "a shard table that lies": ('"layers.0.attn.wo.weight": ([128, 64], [128, 128], (1, \'tp\', 2)',
                                '"layers.0.attn.wo.weight": ([64, 128], [128, 128], (0, \'tp\', 2)'),
}


def test_rendered_programs_agree_with_the_plan(compiled):
    check_programs(loads(compiled["plan.json"]), compiled)


@pytest.mark.parametrize("what", list(CORRUPTIONS))
def test_a_corrupted_program_is_refused(compiled, what):
    old, new = CORRUPTIONS[what]
    source = compiled["programs/stage0.py"]
    assert old in source
    with pytest.raises(ProgramMismatch, match="programs/stage0.py"):
        check_programs(loads(compiled["plan.json"]), {**compiled, "programs/stage0.py": source.replace(old, new, 1)})


def test_a_run_refuses_a_corrupted_plan_folder_before_starting(compiled, tmp_path):
    write(compiled, tmp_path)
    program = tmp_path / "programs" / "stage0.py"
    program.write_text(program.read_text().replace(*CORRUPTIONS["row-parallel all-reduce removed"], 1))
    with pytest.raises(RunError, match="forward collective"):
        launch(tmp_path, 1, quiet=True)
    plan = json.loads((tmp_path / "plan.json").read_text())
    plan["version"] = PLAN_VERSION - 1
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    with pytest.raises(RunError, match=f"plan version {PLAN_VERSION - 1}.*compile the spec again"):
        launch(tmp_path, 1, quiet=True)
