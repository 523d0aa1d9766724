"""`lcc plan export --format perfetto`: a training step timed with its communication, compute and collectives on
tracks of their own (lcc.inspect.comm_timeline): each MoE layer's dispatch and combine per micro-batch, never
two collectives at once on a rank, and communication beside compute only where the plan overlaps it."""

from __future__ import annotations

import json
from collections import defaultdict

import pytest

from lcc.compiler.plan import build_plan
from lcc.inspect.comm_timeline import TRACKS, comm_timeline
from lcc.inspect.export import perfetto
from lcc.inspect.target import Target
from lcc.spec import load_spec, resolved
from tests.conftest import SPECS


def _target(sets: list[str]) -> Target:
    spec = load_spec(SPECS / "tiny-moe.yaml", sets)
    plan, _ = build_plan(spec, "train")
    return Target(plan, "tiny-moe", files={"spec.json": json.dumps(resolved(spec))})


@pytest.fixture(scope="module", params=[False, True], ids=["plain", "overlap"])
def trace(request) -> tuple[bool, dict]:
    target = _target([f"parallelism.expert_overlap={str(request.param).lower()}"])
    return request.param, json.loads(perfetto(target))


def test_every_rank_has_a_comm_track_of_collectives_one_at_a_time(trace):
    overlap, doc = trace
    events = doc["traceEvents"]
    names = {(e["pid"], e["tid"]): e["args"]["name"] for e in events if e["name"] == "thread_name"}
    ranks = {e["pid"] for e in events if e["name"] == "process_name"}
    assert all(names[(pid, TRACKS["comm"])] == "comm" for pid in ranks)
    by_track = defaultdict(list)
    for e in events:
        if e["ph"] == "X":
            by_track[(e["pid"], e["tid"])].append(e)
    for (_, tid), spans in by_track.items():
        if tid in TRACKS.values():
            spans.sort(key=lambda e: e["ts"])
            assert all(a["ts"] + a["dur"] <= b["ts"] + 1e-3 for a, b in zip(spans, spans[1:], strict=False))
    comm = [e for e in events if e["ph"] == "X" and e["tid"] == TRACKS["comm"]]
    # tiny-moe: 4 MoE layers over 2 stages, 4 micro-batches; a dispatch forward (one per half with overlap) and
    # its transpose backward (both halves' in one span: they run one after the other)
    dispatches = [e for e in comm if "dispatch" in e["name"]]
    assert len(dispatches) == 4 * 4 * (3 if overlap else 2)
    assert any("recv activations" in e["name"] for e in comm) and any("gradient" in e["name"] for e in comm)
    other = doc["otherData"]
    assert other["simulated_step_seconds"] == pytest.approx(other["step_seconds_estimate"], rel=0.1)


def test_communication_runs_beside_compute_only_where_the_plan_overlaps_it(trace):
    overlap, doc = trace
    spans = [e for e in doc["traceEvents"] if e["ph"] == "X" and e["tid"] in TRACKS.values()]
    compute = [e for e in spans if e["tid"] == TRACKS["timed compute"]]
    beside = []
    for c in (e for e in spans if e["tid"] == TRACKS["comm"]):
        both = [k for k in compute if k["pid"] == c["pid"] and k["ts"] < c["ts"] + c["dur"] - 1e-3
                and c["ts"] < k["ts"] + k["dur"] - 1e-3]
        if both:
            beside.append(c)
    assert all(c["args"]["hidden"] and c["cat"] == "comm hidden" for c in beside)
    names = {c["name"].split(" stage")[0].split(" ", 2)[-1] for c in beside}
    assert names == ({"dispatch B", "combine A"} if overlap else set())
    hidden = doc["otherData"]["simulated_hidden_communication_seconds"]
    assert (hidden > 0) == overlap


def test_the_timed_step_follows_the_schedule_with_its_communication():
    """Against the compute-only simulation: the same actions on each rank, each at least as long as its compute,
    so the timed step is never shorter than the pipeline's compute-only span."""
    spec = load_spec(SPECS / "tiny-moe.yaml", ["parallelism.pipeline.schedule=zbv",
                                               "parallelism.pipeline.virtual_stages=2"])
    plan, _ = build_plan(spec, "train")
    tl = comm_timeline(plan, spec)
    labels = {s.name.split(" stage ")[-1] for s in tl.spans if s.track == "timed compute"}
    assert {f"{stage} mb {mb}" for stage in range(4) for mb in range(4)} <= labels
    assert tl.seconds >= plan.cost["time"]["compute_seconds"]
