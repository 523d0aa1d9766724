"""Serve plans of tiny-moe for tests, compiled once per session per layout."""

from __future__ import annotations

from pathlib import Path

from lcc.cache import write_atomically
from lcc.compiler.plan import compile_plan
from lcc.spec import Spec, load_spec
from tests.conftest import SPECS

FLOAT64 = ["serve.dtype=float64"]
LAYOUTS = {
    "world1": ["parallelism.pp=1", "parallelism.dp=1", "parallelism.tp=1", "parallelism.ep=1",
               "cluster.gpus_per_node=1"],
    "tp2": ["parallelism.pp=1", "parallelism.dp=1", "parallelism.tp=2", "parallelism.ep=1", "cluster.gpus_per_node=2"],
    "ep2_dp2": ["parallelism.pp=1", "parallelism.dp=2", "parallelism.tp=1", "parallelism.ep=2",
                "cluster.gpus_per_node=2"],
    "pp2": ["parallelism.pp=2", "parallelism.dp=1", "parallelism.tp=1", "parallelism.ep=1", "cluster.gpus_per_node=2"],
    "pp2_tp2_ep2": ["parallelism.pp=2", "parallelism.dp=1", "parallelism.tp=2", "parallelism.ep=2",
                    "cluster.gpus_per_node=4"],
    # 2 nodes x 2 ranks, one EP group over both nodes
    "nodes2_ep4_dp4": ["parallelism.pp=1", "parallelism.dp=4", "parallelism.tp=1", "parallelism.ep=4",
                       "cluster.nodes=2", "cluster.gpus_per_node=2"],
}
PROMPTS = [list(b"Hello"), list(b"The quick brown fox jumps over"), list(b"a"), list(b"0123456789" * 3)]


def spec_of(layout: str, extra: list[str] | tuple[str, ...] = ()) -> Spec:
    return load_spec(SPECS / "tiny-moe.yaml", [*LAYOUTS[layout], *FLOAT64, *extra])


def serve_plan(base: Path, layout: str, extra: list[str] | tuple[str, ...] = ()) -> Path:
    folder = base / f"{layout}-{abs(hash(tuple(extra))):x}"
    if not (folder / "plan.json").is_file():
        write_atomically(compile_plan(spec_of(layout, extra), "serve"), folder)
    return folder
