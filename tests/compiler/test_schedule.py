from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from lcc.actions import stage_rank
from lcc.compiler.layout import bubble_fraction, inflight_chunks, stage_ranks
from lcc.compiler.schedule import (
    Action,
    ScheduleError,
    add_p2p,
    from_csv,
    generate,
    gpipe,
    one_f_one_b,
    simulate,
    to_csv,
    zb_h1,
    zbv,
)

LAYOUTS = [("gpipe", 4, 1, 8), ("1f1b", 4, 1, 8), ("1f1b", 2, 1, 2), ("1f1b", 3, 1, 7), ("1f1b", 1, 1, 3),
           ("interleaved_1f1b", 2, 2, 4), ("interleaved_1f1b", 4, 2, 8), ("interleaved_1f1b", 2, 3, 6)]
ZB_LAYOUTS = [("zb_h1", pp, 1, m) for pp, m in ((1, 3), (2, 2), (2, 4), (3, 3), (3, 7), (4, 4), (4, 8), (5, 12))] + \
    [("zbv", pp, 2, m) for pp, m in ((1, 2), (2, 2), (2, 3), (2, 4), (3, 3), (3, 5), (4, 4), (4, 6), (4, 8), (5, 9))]


def acts(text: str) -> list[Action]:
    return [Action.parse(t) for t in text.split()]


def test_action_strings_round_trip():
    for text in ("0F3", "1B3", "0SEND_F3", "1RECV_B2", "12F105", "0REDUCE_GRAD", "12REDUCE_GRAD"):
        assert str(Action.parse(text)) == text
    assert Action.parse("1REDUCE_GRAD").mb is None
    for bad in ("0X3", "0REDUCE_GRAD3", "REDUCE_GRAD", "0B"):
        with pytest.raises(ValueError, match="not an action"):
            Action.parse(bad)


def test_reduce_grad_is_torch_pipelinings_action():
    schedules = pytest.importorskip("torch.distributed.pipelining.schedules")
    theirs = schedules._Action.from_str("1REDUCE_GRAD")
    assert theirs.computation_type == schedules._ComputationType.REDUCE_GRAD and theirs.microbatch_index is None
    assert str(theirs) == str(Action.parse("1REDUCE_GRAD"))


def test_one_f_one_b_order():
    s = one_f_one_b(2, 3)
    assert s[0] == acts("0F0 0F1 0B0 0F2 0B1 0B2")
    assert s[1] == acts("1F0 1B0 1F1 1B1 1F2 1B2")
    assert gpipe(2, 2)[1] == acts("1F0 1F1 1B0 1B1")


def test_lowering_adds_sends_and_receives():
    low = add_p2p(one_f_one_b(2, 2), 2)
    assert low[0] == acts("0F0 0SEND_F0 0F1 0SEND_F1 0RECV_B0 0B0 0RECV_B1 0B1")
    assert low[1] == acts("1RECV_F0 1F0 1B0 1SEND_B0 1RECV_F1 1F1 1B1 1SEND_B1")


@pytest.mark.parametrize(("name", "pp", "v", "m"), LAYOUTS)
def test_every_schedule_simulates_with_the_analytic_bubble(name, pp, v, m):
    low = add_p2p(generate(name, pp, v, m), pp * v)
    sim = simulate(low, pp * v, m)
    assert sim.bubble_fraction == pytest.approx(bubble_fraction(pp, v, m))
    for r, actions in enumerate(low):
        compute = [a for a in actions if a.kind in ("F", "B")]
        assert len(compute) == 2 * v * m and all(a.stage % pp == r for a in actions)


def _receives_from(actions: list[Action], peer: int, pp: int, kind: str) -> list[Action]:
    """The receives of messages that rank `peer` sends: the previous stage's (RECV_F) or the next stage's
    (RECV_B)."""
    return [a for a in actions if a.kind.startswith("RECV")
            and stage_rank(a.stage - 1 if a.kind == "RECV_F" else a.stage + 1, pp, kind) == peer]


def _consumes(recv: Action, a: Action) -> bool:
    """RECV_F feeds the stage's F; RECV_B its B, or its I."""
    kinds = ("F",) if recv.kind == "RECV_F" else ("B", "I")
    return (a.stage, a.mb) == (recv.stage, recv.mb) and a.kind in kinds


@pytest.mark.parametrize(("name", "pp", "v", "m"), LAYOUTS + ZB_LAYOUTS)
def test_lowering_matches_torch_pipelining(name, pp, v, m):
    """Per rank and in order, against torch.distributed.pipelining's `_add_send_recv`: the compute actions and
    sends as one sequence (each send right after the compute that produces it), and the receives from each
    peer rank (two ranks' messages match in the order they are posted). One placement legitimately differs:
    PyTorch posts a receive when its sender's send is scheduled (as early as its lockstep lowering allows, so
    that its runtime can prefetch), lcc right before the compute that consumes it, or, where the peer sends
    an earlier message that this rank consumes later (zbv), right before that message's receive; both post
    it before."""
    schedules = pytest.importorskip("torch.distributed.pipelining.schedules")
    compute = generate(name, pp, v, m)
    lowered = schedules._add_send_recv({r: [schedules._Action.from_str(str(a)) for a in acts_]
                                        for r, acts_ in enumerate(compute)},
                                       stage_to_rank=lambda s: stage_rank(s, pp, name), num_stages=pp * v)
    ours = add_p2p(compute, pp * v, name)
    for r in range(pp):
        theirs = [Action.parse(str(a)) for a in lowered[r]]
        compute_and_sends = [[a for a in acts_ if not a.kind.startswith("RECV")] for acts_ in (ours[r], theirs)]
        assert compute_and_sends[0] == compute_and_sends[1], r
        for peer in range(pp):
            assert _receives_from(ours[r], peer, pp, name) == _receives_from(theirs, peer, pp, name), (r, peer)
        for i, a in enumerate(ours[r]):
            if a.kind.startswith("RECV"):
                assert any(_consumes(a, b) for b in ours[r][i + 1:]), (r, i, a)
                assert _consumes(a, ours[r][i + 1]) or ours[r][i + 1].kind.startswith("RECV"), (r, i, a)
                if name != "zbv":
                    assert _consumes(a, ours[r][i + 1]), (r, i, a)
        for i, a in enumerate(theirs):
            if a.kind.startswith("RECV"):
                assert any(_consumes(a, b) for b in theirs[i + 1:]), (r, i, a)


def test_csv_is_torch_notation():
    schedules = pytest.importorskip("torch.distributed.pipelining.schedules")
    s = generate("interleaved_1f1b", 2, 2, 4)
    text = to_csv(add_p2p(s, 4))  # only compute actions are written
    assert from_csv(text) == s
    for line in text.splitlines():
        for cell in line.split(","):
            assert str(schedules._Action.from_str(cell)) == cell


def test_deadlock_is_named_with_rank_and_step():
    bad = add_p2p(one_f_one_b(2, 2), 2)
    bad[1] = acts("1RECV_F1 1F1 1B1 1SEND_B1 1RECV_F0 1F0 1B0 1SEND_B0")  # waits for mb 1 before mb 0...
    bad[0] = acts("0F0 0SEND_F0 0RECV_B0 0B0 0F1 0SEND_F1 0RECV_B1 0B1")  # ...which rank 0 sends only later
    with pytest.raises(ScheduleError) as err:
        simulate(bad, 2, 2)
    assert err.value.rank == 0 and err.value.step == 2 and "deadlock" in str(err.value)


def test_missing_receive_is_named():
    low = add_p2p(one_f_one_b(2, 1), 2)
    low[1] = [a for a in low[1] if str(a) != "1RECV_F0"]
    with pytest.raises(ScheduleError, match="pipeline rank 1, step 0"):
        simulate(low, 2, 1)


def test_duplicate_and_missing_compute():
    s = [acts("0F0 0B0 0F0"), acts("1F0 1B0")]
    with pytest.raises(ScheduleError, match="rank 0, step 4: 0F0 appears twice"):
        simulate(add_p2p(s, 2), 2, 1)
    with pytest.raises(ScheduleError, match="missing 1B0"):
        simulate(add_p2p([acts("0F0 0B0"), acts("1F0")], 2), 2, 1)


def test_action_on_the_wrong_rank():
    with pytest.raises(ScheduleError, match="runs on rank 1"):
        simulate([acts("0F0 1F0 1B0 0B0"), []], 2, 1)


# ------------------------------------------------------------------------------ zero-bubble schedules


@pytest.mark.parametrize(("name", "pp", "v", "m"), ZB_LAYOUTS)
def test_zero_bubble_schedules_simulate_with_one_f_i_w_each(name, pp, v, m):
    n = pp * v
    low = add_p2p(generate(name, pp, v, m), n, name)
    sim = simulate(low, n, m, placement=name)
    assert sim.busy == [3 * v * m] * pp  # F = I = W = 1
    for r, actions in enumerate(low):
        assert all(stage_rank(a.stage, pp, name) == r for a in actions)
        assert {a.stage for a in actions} == set(stage_ranks(pp, v, r, name))
        compute = sorted((a.stage, a.mb, a.kind) for a in actions if a.kind in ("F", "B", "I", "W"))
        assert compute == sorted((s, mb, k) for s in stage_ranks(pp, v, r, name) for mb in range(m) for k in "FIW")
        for a in actions:  # each I after its F, each W after its I
            if a.kind in ("I", "W"):
                before = actions[:actions.index(a)]
                assert Action(a.stage, "F" if a.kind == "I" else "I", a.mb) in before, (r, a)
        held = peak = 0  # activations held (F done, W not yet) never exceed what layout.inflight_chunks says
        for a in actions:
            held += {"F": 1, "W": -1}.get(a.kind, 0)
            peak = max(peak, held)
        assert peak == inflight_chunks(name, pp, v, m, r)


@pytest.mark.parametrize(("pp", "m"), [(1, 3), (2, 2), (2, 4), (3, 5), (4, 8), (5, 12), (6, 7)])
def test_zero_bubble_orders_are_torchs(pp, m):
    """lcc's ZB-H1 is the order of torch.distributed.pipelining's ScheduleInterleavedZeroBubble with one
    stage per rank (its ZB1P), and its zbv that of ScheduleZBVZeroBubble, less the idle slots (None)."""
    schedules = pytest.importorskip("torch.distributed.pipelining.schedules")
    rounds = max(1, m // pp)
    if m % rounds:
        pytest.skip("torch's zero-bubble schedule needs micro-batches in whole rounds")
    one = SimpleNamespace(pp_group_size=pp, _n_microbatches=m, n_local_stages=1, microbatches_per_round=m // rounds)
    v = SimpleNamespace(pp_group_size=pp, _n_microbatches=m, num_stages=2 * pp)
    for ours, cls, fake in ((zb_h1(pp, m), schedules.ScheduleInterleavedZeroBubble, one),
                            (zbv(pp, m), schedules.ScheduleZBVZeroBubble, v)):
        theirs = [[Action.parse(str(a)) for a in cls._calculate_single_rank_operations(fake, r) if a is not None]
                  for r in range(pp)]
        assert ours == theirs, cls.__name__


def test_zb_h1_orders():
    assert zb_h1(2, 4) == [acts("0F0 0F1 0I0 0W0 0F2 0I1 0W1 0F3 0I2 0W2 0I3 0W3"),
                           acts("1F0 1I0 1F1 1I1 1W0 1F2 1I2 1W1 1F3 1I3 1W2 1W3")]
    assert zbv(2, 4) == [
        acts("0F0 0F1 0F2 3F0 3I0 3W0 3F1 3I1 3W1 0F3 0I0 0W0 3F2 3I2 3W2 0I1 0W1 3F3 3I3 3W3 0I2 0W2 0I3 0W3"),
        acts("1F0 2F0 1F1 2F1 2I0 2W0 1F2 1I0 1W0 2F2 2I1 2W1 1F3 1I1 1W1 2F3 2I2 2W2 1I2 2I3 1I3 1W2 2W3 1W3")]


@pytest.mark.parametrize(("pp", "m"), [(2, 4), (3, 6), (4, 8), (4, 12), (8, 16)])
def test_zero_bubble_schedules_have_smaller_bubbles(pp, m):
    """Simulated (F = I = W = 1, B = 2), e.g. pp 4, m 8: 1f1b 3/11 = 27.3% (makespan 33), zb_h1 3/27 = 11.1%
    (27); interleaved_1f1b with 2 virtual stages 3/19 = 15.8% (57), zbv 3/51 = 5.9% (51). In general zb_h1
    (pp - 1) / (3 m + pp - 1) against 1f1b's (pp - 1) / (m + pp - 1): rank r's r deferred W passes fill the
    drain; zbv, for m >= 2 pp - 1, (pp - 1) / (6 m + pp - 1) against interleaved's (pp - 1) / (2 m + pp - 1):
    only the start of the pipeline, where rank r waits r units for its first input, stays idle."""
    def bubble(name: str, v: int) -> float:
        return simulate(add_p2p(generate(name, pp, v, m), pp * v, name), pp * v, m, placement=name).bubble_fraction

    assert bubble("zb_h1", 1) == pytest.approx((pp - 1) / (3 * m + pp - 1))
    assert bubble("1f1b", 1) == pytest.approx(bubble_fraction(pp, 1, m))
    assert bubble("zb_h1", 1) < bubble("1f1b", 1)
    assert bubble("zbv", 2) == pytest.approx((pp - 1) / (6 * m + pp - 1))
    assert bubble("interleaved_1f1b", 2) == pytest.approx(bubble_fraction(pp, 2, m))
    assert bubble("zbv", 2) < bubble("interleaved_1f1b", 2)


def test_zbv_places_stages_in_a_v_and_hands_over_locally():
    pp = 3
    assert [stage_ranks(pp, 2, r, "zbv") for r in range(pp)] == [[0, 5], [1, 4], [2, 3]]
    assert [stage_ranks(pp, 2, r) for r in range(pp)] == [[0, 3], [1, 4], [2, 5]]
    low = add_p2p(zbv(pp, 5), 2 * pp, "zbv")
    turn = {str(a) for a in low[pp - 1] if a.kind.startswith(("SEND", "RECV"))}
    assert not turn & {"2SEND_F0", "3RECV_F0", "3SEND_B0", "2RECV_B0"}  # stages 2 and 3: one rank, no message
    assert {"2RECV_F0", "2SEND_B0", "3SEND_F0", "3RECV_B0"} <= turn
    ends = {(a.stage, a.kind) for a in low[0] if a.kind.startswith(("SEND", "RECV"))}  # rank 0: stages 0 and 5
    assert ends == {(0, "SEND_F"), (0, "RECV_B"), (5, "RECV_F"), (5, "SEND_B")}
    for pp, m in ((1, 2), (2, 2), (3, 4), (4, 9), (6, 6)):  # a tied embedding's reduction (stage 0's) comes last
        assert zbv(pp, m)[0][-1] == Action(0, "W", m - 1)


def test_split_backward_errors():
    low = add_p2p(zb_h1(2, 1), 2)
    with pytest.raises(ScheduleError, match="missing 1W0"):
        simulate([low[0], [a for a in low[1] if a.kind != "W"]], 2, 1)
    with pytest.raises(ScheduleError, match="1B0 and a split backward"):
        simulate([low[0], low[1] + acts("1B0")], 2, 1)
    with pytest.raises(ScheduleError, match="deadlock: .*rank 1 at 1W0"):  # a W before its I
        simulate([low[0], acts("1RECV_F0 1F0 1W0 1I0 1SEND_B0")], 2, 1)
    with pytest.raises(ScheduleError, match="rank 0, step 4: 3RECV_F0 belongs to stage 3, which runs on rank 1"):
        simulate(add_p2p(zbv(2, 2), 4, "zbv"), 4, 2)  # zbv's actions checked against stage mod pp


@pytest.mark.parametrize(("name", "pp", "v", "m"), ZB_LAYOUTS)
def test_torch_validates_the_zero_bubble_schedules(name, pp, v, m):
    """torch.distributed.pipelining's `_validate_schedule` (counts, F before I before W, one rank per stage)
    and `_simulate_comms_compute` (every receive meets its send, no deadlock) accept the lowered lists."""
    schedules = pytest.importorskip("torch.distributed.pipelining.schedules")
    n = pp * v
    low = add_p2p(generate(name, pp, v, m), n, name)
    theirs = {r: [schedules._Action.from_str(str(a)) for a in actions] for r, actions in enumerate(low)}
    assert schedules._validate_schedule(theirs, pp, n, m) == {s: stage_rank(s, pp, name) for s in range(n)}
    ran = schedules._simulate_comms_compute(theirs, lambda s: stage_rank(s, pp, name), n)
    assert sorted(str(a) for r in ran.values() for a in r if a) == sorted(str(a) for r in low for a in r)


@pytest.mark.parametrize("sets", [["parallelism.pipeline.schedule=zb_h1"],
                                  ["parallelism.pipeline.schedule=zbv", "parallelism.pipeline.virtual_stages=2",
                                   "parallelism.pp=2", "parallelism.dp=4", "model.tie_embeddings=true"]])
def test_zero_bubble_plans_of_tiny_moe(sets):
    """The plan compiles (its programs checked against it); each stage's REDUCE_GRAD follows its last W; the
    roles, ranks table and pipeline messages follow the V; torch's validator takes the plan's actions
    (REDUCE_GRAD included); the timeline draws I and W; the serve plan keeps stage mod pp."""
    schedules = pytest.importorskip("torch.distributed.pipelining.schedules")
    from lcc.compiler.plan import compile_plan
    from lcc.inspect.ranks import RankIndex, _p2p
    from lcc.inspect.timeline import timeline
    from lcc.plan import codec
    from lcc.spec import load_spec
    from tests.conftest import SPECS

    spec = load_spec(SPECS / "tiny-moe.yaml", sets)
    kind, pp, n = spec.parallelism.pipeline.schedule, spec.parallelism.pp, spec.parallelism.n_stages
    files = compile_plan(spec)
    plan = codec.loads(files["plan.json"])
    assert [r.pp_rank for r in plan.roles] == [stage_rank(s, pp, kind) for s in range(n)]
    assert plan.ranks.roles_of_pp_rank == {str(r): [f"stage{s}" for s in stage_ranks(pp, n // pp, r, kind)]
                                           for r in range(pp)}
    for actions in plan.schedule.actions:
        parsed = [Action.parse(a) for a in actions]
        for s in {a.stage for a in parsed}:
            last_w = max(i for i, a in enumerate(parsed) if (a.stage, a.kind) == (s, "W"))
            assert parsed[last_w + 1] == Action(s, "REDUCE_GRAD", None)
    assert "SUM_TIED_GRAD" not in files["actions.txt"]  # zbv: embedding and head both on rank 0
    theirs = {r: [schedules._Action.from_str(a) for a in actions] for r, actions in enumerate(plan.schedule.actions)}
    schedules._validate_schedule(theirs, pp, n, spec.parallelism.pipeline.microbatches)
    dp = spec.parallelism.dp  # ranks 0 and dp: pipeline ranks 0 and 1 of dp rank 0, each other's only peer
    for rank, peer in ((0, dp), (dp, 0)):
        assert {(row["op"], row["peer"]) for row in _p2p(plan, RankIndex(plan), rank)} == {("send", peer),
                                                                                           ("recv", peer)}
    tl = timeline(plan, json.loads(files["spec.json"])["cluster"]["network"])
    names = {s.name.rsplit(" stage", 1)[0] for s in tl.slices if s.track == "compute"}
    assert names == {"forward", "backward input", "backward weights", "bubble (idle)"}
    assert plan.schedule.simulation.cost_units == {"F": 1, "I": 1, "W": 1}
    serve = codec.loads(compile_plan(spec, "serve")["plan.json"])
    assert [r.pp_rank for r in serve.roles] == [s % pp for s in range(n)] and serve.schedule.kind == "serve"


def test_receives_follow_the_send_order():
    """zbv: rank 0 sends rank 1 stage 0's activations and stage 3's gradients; rank 1 takes them in that order
    (1RECV_F2 moves up before 2RECV_B0, as rank 0 sends them), and the simulator refuses another order."""
    low = add_p2p(zbv(2, 4), 4, "zbv")
    assert " ".join(str(a) for a in low[1][:13]) == ("1RECV_F0 1F0 2F0 2SEND_F0 1RECV_F1 1F1 2F1 2SEND_F1 "
                                                     "1RECV_F2 2RECV_B0 2I0 2W0 1F2")
    for r, peer in ((0, 1), (1, 0)):
        sends = [str(a).replace("SEND", "") for a in low[peer] if a.kind.startswith("SEND")]
        receives = [f"{a.stage + (-1 if a.kind == 'RECV_F' else 1)}{a.kind[-1]}{a.mb}" for a in low[r]
                    if a.kind.startswith("RECV")]
        assert [x.replace("_", "") for x in sends] == receives
    swapped = [list(low[0]), list(low[1])]
    swapped[1][8], swapped[1][9] = swapped[1][9], swapped[1][8]
    with pytest.raises(ScheduleError, match="pipeline rank 1, step 8: 2RECV_B0 out of order: rank 0 sends F"):
        simulate(swapped, 4, 4, placement="zbv")
