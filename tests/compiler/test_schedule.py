from __future__ import annotations

import pytest

from lcc.compiler.layout import bubble_fraction
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
)

LAYOUTS = [("gpipe", 4, 1, 8), ("1f1b", 4, 1, 8), ("1f1b", 2, 1, 2), ("1f1b", 3, 1, 7), ("1f1b", 1, 1, 3),
           ("interleaved_1f1b", 2, 2, 4), ("interleaved_1f1b", 4, 2, 8), ("interleaved_1f1b", 2, 3, 6)]


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


def _receives_from(actions: list[Action], peer: int, pp: int) -> list[Action]:
    """The receives of messages that rank `peer` sends: the previous stage's (RECV_F) or the next stage's
    (RECV_B)."""
    return [a for a in actions if a.kind.startswith("RECV")
            and (a.stage - 1 if a.kind == "RECV_F" else a.stage + 1) % pp == peer]


def _consumes(recv: Action, a: Action) -> bool:
    return (a.stage, a.kind, a.mb) == (recv.stage, recv.kind.removeprefix("RECV_"), recv.mb)


@pytest.mark.parametrize(("name", "pp", "v", "m"), LAYOUTS)
def test_lowering_matches_torch_pipelining(name, pp, v, m):
    """Per rank and in order, against torch.distributed.pipelining's `_add_send_recv`: the compute actions and
    sends as one sequence (each send right after the compute that produces it), and the receives from each
    peer rank (two ranks' messages match in the order they are posted). One placement legitimately differs:
    PyTorch posts a receive when its sender's send is scheduled (as early as its lockstep lowering allows, so
    that its runtime can prefetch), lcc right before the compute that consumes it; both post it before."""
    schedules = pytest.importorskip("torch.distributed.pipelining.schedules")
    compute = generate(name, pp, v, m)
    lowered = schedules._add_send_recv({r: [schedules._Action.from_str(str(a)) for a in acts_]
                                        for r, acts_ in enumerate(compute)},
                                       stage_to_rank=lambda s: s % pp, num_stages=pp * v)
    ours = add_p2p(compute, pp * v)
    for r in range(pp):
        theirs = [Action.parse(str(a)) for a in lowered[r]]
        compute_and_sends = [[a for a in acts_ if not a.kind.startswith("RECV")] for acts_ in (ours[r], theirs)]
        assert compute_and_sends[0] == compute_and_sends[1], r
        for peer in range(pp):
            assert _receives_from(ours[r], peer, pp) == _receives_from(theirs, peer, pp), (r, peer)
        for i, a in enumerate(ours[r]):
            if a.kind.startswith("RECV"):
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
