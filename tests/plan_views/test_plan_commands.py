"""`lcc plan show | diff | export` and the pictures: exports of the shipped plans deterministic and valid,
diffs that name what changed, rank views that agree with the plan's rank table, bad input refused."""

from __future__ import annotations

import json
import shutil
from collections import defaultdict
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from lcc.cli import app
from lcc.data.stream import TokenStream, rank_units
from lcc.inspect.ranks import RankIndex
from lcc.plan import read_plan
from tests.conftest import ROOT, SPECS

GENERATED = ROOT / "generated"
PLANS = [GENERATED / n for n in ("tiny-moe", "small-moe", "longcat-2.0")] + \
    [GENERATED / n / "serve" for n in ("tiny-moe", "small-moe", "longcat-2.0")]


def run(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert "Traceback" not in result.output
    return result.exit_code, result.output


def export(plan: Path, fmt: str, out: Path) -> bytes:
    code, output = run("plan", "export", plan, "--format", fmt, "--out", out)
    assert code == 0, output
    return out.read_bytes()


@pytest.mark.parametrize("plan", PLANS, ids=[str(p.relative_to(GENERATED)) for p in PLANS])
def test_the_trace_is_deterministic_and_follows_the_trace_event_format(plan, tmp_path):
    first = export(plan, "perfetto", tmp_path / "a.json")
    assert export(plan, "perfetto", tmp_path / "b.json") == first
    doc = json.loads(first)
    events, meta = doc["traceEvents"], doc["otherData"]
    pp = read_plan(plan).mesh.size("pp")
    names = {(e["pid"], e["tid"]) for e in events if e["ph"] == "M" and e["name"] == "thread_name"}
    assert {e["pid"] for e in events if e["name"] == "process_name"} == set(range(1, pp + 1))  # never pid 0
    slices = [e for e in events if e["ph"] == "X"]
    assert all(e["dur"] >= 0 and (e["pid"], e["tid"]) in names for e in slices)
    by_track = defaultdict(list)
    for e in slices:
        by_track[(e["pid"], e["tid"])].append(e)
    for track in by_track.values():  # no two slices overlap on one track
        track.sort(key=lambda e: e["ts"])
        for a, b in zip(track, track[1:], strict=False):
            assert a["ts"] + a["dur"] <= b["ts"] + 1e-3, (a, b)
    for r in range(1, pp + 1):  # busy and idle time of each rank add up to the simulated step's pipeline
        compute = [e for e in by_track[(r, 1)]]
        assert sum(e["dur"] for e in compute) == pytest.approx(meta["pipeline_seconds"] * 1e6, rel=1e-6)
        idle = sum(e["dur"] for e in compute if e["cat"] == "idle")
        assert idle >= 0
    sends = [e for e in slices if e["cat"] == "send"]
    starts = {e["id"]: e for e in events if e["ph"] == "s"}
    ends = {e["id"]: e for e in events if e["ph"] == "f"}
    assert len(sends) == len(starts) == len(ends) == len([e for e in slices if e["cat"] == "recv"])
    for i, s in starts.items():  # each flow starts on its send and ends on its receive
        assert any(e["pid"] == s["pid"] and e["ts"] == s["ts"] for e in sends)
        assert ends[i]["bp"] == "e" and any(e["pid"] == ends[i]["pid"] and e["ts"] == ends[i]["ts"]
                                            for e in slices if e["cat"] == "recv")
    total_idle = sum(e["dur"] for e in slices if e["cat"] == "idle")
    assert total_idle / (pp * meta["pipeline_seconds"] * 1e6) == pytest.approx(meta["bubble_fraction"], abs=1e-6)


@pytest.mark.parametrize("plan", PLANS[:3] + PLANS[5:], ids=["tiny-moe", "small-moe", "longcat-2.0", "longcat-serve"])
def test_dot_and_csv(plan, tmp_path):
    text = export(plan, "dot", tmp_path / "p.dot").decode()
    assert export(plan, "dot", tmp_path / "q.dot").decode() == text
    assert text.startswith("digraph") and text.count("{") == text.count("}")
    p = read_plan(plan)
    for role in p.roles:
        assert f'"{role.name}" [label=' in text
    assert text.count("->") == (p.schedule.n_stages - 1) * (2 if p.mode == "train" else 1)
    if shutil.which("dot"):
        import subprocess

        assert subprocess.run(["dot", "-Tsvg", str(tmp_path / "p.dot")], capture_output=True).returncode == 0
    assert export(plan, "csv", tmp_path / "s.csv") == (plan / "schedule.csv").read_bytes()


def test_all_ranks_agree_with_the_rank_table():
    code, output = run("plan", "show", GENERATED / "longcat-2.0", "--all-ranks", "--json")
    assert code == 0
    ranks = json.loads(output)
    plan = read_plan(GENERATED / "longcat-2.0")
    assert len(ranks) == plan.world_size == 2048
    for r in ranks:
        c = plan.ranks.coords(r["rank"])
        assert r["coords"] == {k: c[k] for k in ("pp", "dp", "tp", "ep", "edp")} and r["node"] == c["node"]
        assert r["roles"] == plan.ranks.roles_of_pp_rank[str(c["pp"])]
        assert r["experts"]["first"] == c["ep"] * plan.experts.experts_per_rank


@pytest.mark.parametrize("plan", [GENERATED / "tiny-moe", GENERATED / "small-moe"])
def test_group_members_equal_a_scan_of_the_rank_table(plan):
    p = read_plan(plan)
    index = RankIndex(p)
    rows = [p.ranks.coords(r) for r in range(p.world_size)]
    same = {"pp": ("dp", "tp"), "dp": ("pp", "tp"), "tp": ("pp", "dp"), "ep": ("pp", "edp"), "edp": ("pp", "ep"),
            "stage": ("pp",)}
    for rank in range(p.world_size):
        for axis, keep in same.items():
            want = [r["rank"] for r in rows if all(r[k] == rows[rank][k] for k in keep)]
            assert sorted(index.members(rank, axis)) == want, (rank, axis)


def test_show_a_rank_and_a_role():
    code, output = run("plan", "show", GENERATED / "longcat-2.0", "--rank", "1537")
    assert code == 0
    assert "rank 1537: pp 3, dp 0, tp 1 (ep 1, edp 0); node 192" in output
    assert "experts 125-249" in output and "all_to_all" in output and "inter node" in output
    code, output = run("plan", "show", GENERATED / "longcat-2.0", "--rank", "1537", "--json")
    facts = json.loads(output)
    assert {c["link"] for c in facts["collectives"] if c["axis"] == "tp"} == {"intra_node"}
    assert sum(p["bytes"] for p in facts["parameters"]) > 0
    code, output = run("plan", "show", GENERATED / "tiny-moe" / "serve", "--role", "stage1")
    assert code == 0 and "role stage1" in output and "kv cache" in output and "workspace" in output
    code, output = run("plan", "show", GENERATED / "tiny-moe" / "serve", "--json")
    assert json.loads(output)["kernels"] == {  # tiny-moe's shipped layout: ep 4, so no decode_forward
        "experts": "int4_native_cpu", "attention": "native_cpu", "routing": "native_cpu", "dense": "native_cpu",
        "norms": "native_cpu", "decode_layers": "ops"}
    code, output = run("plan", "show", SPECS / "tiny-moe.yaml", "--mode", "serve", "--set", "parallelism.pp=1",
                       "--set", "parallelism.dp=1", "--set", "parallelism.ep=1", "--set", "cluster.gpus_per_node=1")
    assert code == 0 and "a step of decode tokens only runs decode_forward" in " ".join(output.split()), output
    code, output = run("plan", "show", SPECS / "tiny-moe.yaml", "--set", "parallelism.tp=2",
                       "--set", "parallelism.dp=2")
    assert code == 0 and "tiny-moe train plan, 8 ranks" in output


def diff_json(*args: str) -> dict:
    code, output = run("plan", "diff", *args, "--json")
    assert code == 0, output
    return json.loads(output)["changes"]


def test_a_plan_against_itself_has_no_changes():
    assert diff_json(GENERATED / "tiny-moe", SPECS / "tiny-moe.yaml") == {}
    code, output = run("plan", "diff", GENERATED / "longcat-2.0", GENERATED / "longcat-2.0")
    assert code == 0 and "no differences" in output


@pytest.mark.parametrize("fields,moved,still", [
    (["parallelism.dp=8", "cluster.gpus_per_node=16"], {"mesh", "memory_by_role", "communication", "experts"},
     {"roles"}),
    (["parallelism.zero=2"], {"memory_by_role", "communication", "programs"}, {"mesh", "roles", "experts"}),
    (["model.moe.n_groups=4"], {"experts", "programs"}, {"mesh", "roles"}),
])
def test_a_change_names_what_it_moved(fields, moved, still):
    changes = diff_json(SPECS / "tiny-moe.yaml", SPECS / "tiny-moe.yaml", *[a for f in fields for a in ("--set-b", f)])
    assert {c["field"] for c in changes["spec"]} == {f.split("=")[0] for f in fields}
    assert moved <= set(changes) and not still & set(changes)
    if "mesh" in changes:  # twice the dp ranks: each expert held by twice the replicas
        assert {"dp": (4, 8), "world_size": (8, 16)}.items() <= {c["field"]: (c["a"], c["b"])
                                                                 for c in changes["mesh"]}.items()
        assert [(c["field"], c["a"], c["b"]) for c in changes["experts"]] == [("replicas", 1, 2)]


def test_pictures(tmp_path):
    code, output = run("report", SPECS / "tiny-moe.yaml", "--plot", tmp_path / "r.png")
    assert code == 0 and (tmp_path / "r.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    code, output = run("plan", "diff", SPECS / "tiny-moe.yaml", SPECS / "tiny-moe.yaml", "--set-b",
                       "parallelism.pipeline.microbatches=4", "--plot", tmp_path / "d.png")
    assert code == 0 and (tmp_path / "d.png").stat().st_size > 10_000


def test_bad_input_is_one_line_and_exit_code_2(tmp_path):
    old = tmp_path / "old"
    shutil.copytree(GENERATED / "tiny-moe", old)
    data = json.loads((old / "plan.json").read_text())
    data["version"] = 1
    (old / "plan.json").write_text(json.dumps(data))
    cases = [
        (("plan", "show", tmp_path), "plan.json: missing (not a compiled plan folder"),
        (("plan", "show", old), "compile the spec again"),
        (("plan", "show", tmp_path / "nothing.yaml"), "no such file or folder"),
        (("plan", "export", GENERATED / "tiny-moe", "--format", "onnx2", "--out", tmp_path / "x"), "--format onnx2"),
        (("plan", "show", GENERATED / "tiny-moe", "--role", "stage9"), "--role stage9: the plan's roles are"),
        (("plan", "show", GENERATED / "tiny-moe", "--rank", "8"), "--rank 8: the plan has ranks 0 to 7"),
        (("plan", "show", GENERATED / "tiny-moe", "--set", "parallelism.tp=2"), "--set changes a spec"),
    ]
    for args, message in cases:
        code, output = run(*args)
        assert code == 2, (args, output)
        assert message in output and len(output.strip().splitlines()) == 1, output


COLLECTIVE_NODES = {"zero_gather": "all_gather", "gather_sequence": "all_gather", "gather_tokens": "all_gather",
                    "gather_vocab": "all_gather", "reduce_scatter_sequence": "reduce_scatter",
                    "all_to_all": "all_to_all", "moe_plan": "all_to_all", "all_reduce": "all_reduce",
                    "all_reduce_max": "all_reduce_max"}


@pytest.mark.parametrize("plan", PLANS, ids=[str(p.relative_to(GENERATED)) for p in PLANS])
def test_onnx_models_check_and_carry_every_collective(plan, tmp_path):
    """One model per role, the same bytes twice, `check_model(full_check=True)`, nodes in an order where
    every input exists before its use, a type and shape for every value, and the plan's forward collectives
    as `lcc` nodes with their mesh axes."""
    from collections import Counter

    import onnx

    for out in ("a", "b"):
        code, output = run("plan", "export", plan, "--format", "onnx", "--out", tmp_path / out)
        assert code == 0, output
    p = read_plan(plan)
    for role in p.roles:
        data = (tmp_path / "a" / f"{role.name}.onnx").read_bytes()
        assert (tmp_path / "b" / f"{role.name}.onnx").read_bytes() == data
        model = onnx.load_from_string(data)
        onnx.checker.check_model(model, full_check=True)
        g = model.graph
        known = {v.name for v in g.input} | {t.name for t in g.initializer}
        typed = known | {v.name for v in g.value_info} | {v.name for v in g.output}
        for node in g.node:
            assert all(i in known for i in node.input), (node.name, [i for i in node.input if i not in known])
            assert all(o in typed for o in node.output), node.name
            known.update(node.output)
        for v in [*g.value_info, *g.input, *g.output]:
            assert v.type.tensor_type.HasField("shape")
        issued = Counter()
        for node in g.node:
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
            if node.domain == "lcc" and node.op_type in COLLECTIVE_NODES and attrs["group_size"] > 1:
                axis = attrs["axis"].decode() if isinstance(attrs["axis"], bytes) else attrs["axis"]
                issued[(COLLECTIVE_NODES[node.op_type], axis)] += 1
        assert issued == Counter((c.op, c.axis) for c in role.forward)
        params = {v.name for v in g.input}
        assert {n for n in role.parameters if p.parameter(n).serve is None} <= params


def test_selective_checkpointing_and_virtual_stages_export(tmp_path):
    """Programs whose recomputed regions return several values, and plans of several stages per rank."""
    for sets in (["parallelism.activation_checkpointing=selective"],
                 ["parallelism.pipeline.virtual_stages=2", "parallelism.pipeline.schedule=interleaved_1f1b"]):
        args = [a for s in sets for a in ("--set", s)]
        for fmt, out in (("onnx", tmp_path / "m"), ("perfetto", tmp_path / "t.json")):
            code, output = run("plan", "export", SPECS / "tiny-moe.yaml", *args, "--format", fmt, "--out", out)
            assert code == 0, output


def test_a_rank_view_counts_zero3_reduce_scatters_once_and_memory_once():
    code, output = run("plan", "show", GENERATED / "longcat-2.0", "--rank", "1030", "--json")
    facts = json.loads(output)
    scatters = [c for c in facts["collectives"] if c["op"] == "reduce_scatter" and c["axis"] in ("dp", "edp")]
    assert scatters and all(c["calls_per_step"] == 1 for c in scatters)  # in the stage's last backward only
    memory = facts["memory"]
    assert sum(memory["by_kind"].values()) == memory["total_bytes"]
    # the device share is the peak's: the most held at one moment, below the kinds' sum (ZeRO-3's gathered
    # copies and all activations are never held at once)
    assert memory["peak_bytes"] < memory["total_bytes"] and memory["peak_phase"]
    assert memory["share_of_device"] == memory["peak_bytes"] / memory["device_bytes"]
    assert facts["experts"]["groups"] == [6]
    sends = [c for c in facts["collectives"] if c["op"] in ("send", "recv")]
    assert {c["group_size"] for c in sends} == {2} and all(c["dtype"] == "float32" for c in sends)


def test_show_says_which_sequences_each_dp_rank_reads():
    """The data layout as the plan records it: dp rank i of step s reads sequences [B s + n i, B s + n (i + 1))
    (n = micro-batches x sequences per unit), which is what the runtime cuts (lcc.data.stream.rank_units)."""
    code, output = run("plan", "show", GENERATED / "tiny-moe", "--json")
    assert code == 0
    data = json.loads(output)["data"]
    plan = read_plan(GENERATED / "tiny-moe")
    B, n = plan.data.global_batch, data["sequences_per_dp_rank"]
    assert n * plan.mesh.size("dp") == B
    assert data["order"].endswith(f"sequences [{B} s + {n} i, {B} s + {n} (i + 1))") and data["validation"] is None
    stream = TokenStream(torch.arange(100_000), plan.data.seq_len)
    for dp in range(plan.mesh.size("dp")):
        firsts = [int(u[0][0, 0]) // plan.data.seq_len for u in rank_units(stream, plan.data, dp, 3)]
        assert firsts[0] == B * 3 + n * dp and len(firsts) == plan.data.microbatches
