"""Pipeline schedules as per-rank action lists, in torch.distributed.pipelining's notation.

An action is `{stage}{kind}{microbatch}`: `0F3` (stage 0 forward of micro-batch 3), `1B3`, `0SEND_F3`,
`1RECV_B2`; the zero-bubble schedules split a backward `B` into `I` (the stage input's gradient, which the
previous stage waits for) and `W` (the weight gradients, which nothing downstream waits for). Stage is the
global (virtual) stage; it runs on pipeline rank `lcc.actions.stage_rank(stage, pp, kind)`: `stage mod pp`,
except zbv's V (rank r runs stages r and 2 pp - 1 - r). Generators emit compute actions only; `add_p2p`
lowers them by adding the sends and receives; `simulate` checks a lowered schedule (every send has its
receive, no deadlock, per stage and micro-batch one F and one B, or one I and one W, in dependency order)
and measures it. Nothing here executes anything.
"""

from __future__ import annotations

from dataclasses import dataclass

from lcc.actions import KINDS, Action, stage_rank

# relative compute time of a forward, a backward, and a backward's two halves, for the simulator
COST = {"F": 1, "B": 2, "I": 1, "W": 1}


Schedule = list[list[Action]]  # one action list per pipeline rank


class ScheduleError(ValueError):
    def __init__(self, rank: int, step: int, message: str):
        self.rank, self.step = rank, step
        super().__init__(f"pipeline rank {rank}, step {step}: {message}")


# ------------------------------------------------------------------------------------ generators


def gpipe(pp: int, microbatches: int) -> Schedule:
    """All forwards, then all backwards (micro-batches in order)."""
    return [[Action(r, "F", m) for m in range(microbatches)] + [Action(r, "B", m) for m in range(microbatches)]
            for r in range(pp)]


def one_f_one_b(pp: int, microbatches: int) -> Schedule:
    """Warm up with pp - rank - 1 forwards, then alternate one forward and one backward, then drain."""
    out = []
    for r in range(pp):
        warmup = min(pp - r - 1, microbatches)
        actions = [Action(r, "F", m) for m in range(warmup)]
        for i in range(microbatches - warmup):
            actions += [Action(r, "F", warmup + i), Action(r, "B", i)]
        actions += [Action(r, "B", m) for m in range(microbatches - warmup, microbatches)]
        out.append(actions)
    return out


def interleaved_1f1b(pp: int, virtual: int, microbatches: int) -> Schedule:
    """Megatron's interleaved 1F1B: each rank runs `virtual` stages (rank r: stages r, r + pp, ...),
    micro-batches in rounds of pp; warm-up 2 (pp - r - 1) + (virtual - 1) pp forward chunks."""
    if microbatches % pp:
        raise ValueError(f"interleaved 1F1B needs microbatches ({microbatches}) divisible by pp ({pp})")
    total = microbatches * virtual
    out = []
    for r in range(pp):

        def chunk(k: int, forward: bool, r: int = r) -> Action:
            v = (k // pp) % virtual
            if not forward:
                v = virtual - 1 - v
            mb = (k // (pp * virtual)) * pp + k % pp
            return Action(v * pp + r, "F" if forward else "B", mb)

        warmup = min(2 * (pp - r - 1) + (virtual - 1) * pp, total)
        actions = [chunk(k, True) for k in range(warmup)]
        for i in range(total - warmup):
            actions += [chunk(warmup + i, True), chunk(i, False)]
        actions += [chunk(k, False) for k in range(total - warmup, total)]
        out.append(actions)
    return out


def zb_h1(pp: int, microbatches: int) -> Schedule:
    """ZB-H1 (Qi et al. 2024, "Zero Bubble Pipeline Parallelism"): 1F1B's warm-up and order, with each
    backward split into I and W. Rank r runs each I where 1F1B runs its B and defers its first r W passes,
    which then fill the drain's bubble: makespan 3 m + pp - 1 units (F = I = W = 1) against 1F1B's
    3 (m + pp - 1). A rank holds at most pp micro-batches' activations (F done, W not yet), 1F1B's peak.
    The order of torch.distributed.pipelining's ScheduleInterleavedZeroBubble with one stage per rank."""
    out = []
    for r in range(pp):
        warmup = min(pp - r - 1, microbatches)
        actions = [Action(r, "F", m) for m in range(warmup)]
        weights = 0
        for i in range(microbatches):  # the i-th backward, after the forward that 1F1B pairs with it
            if warmup + i < microbatches:
                actions.append(Action(r, "F", warmup + i))
            actions.append(Action(r, "I", i))
            if i >= r:
                actions.append(Action(r, "W", weights))
                weights += 1
        actions += [Action(r, "W", m) for m in range(weights, microbatches)]
        out.append(actions)
    return out


def zbv(pp: int, microbatches: int) -> Schedule:
    """ZB-V (Qi et al. 2024, section 6): 2 pp stages in a V, rank r running stage r on the way down and stage
    2 pp - 1 - r on the way up (the first and the last stage on rank 0; stages pp - 1 and pp on rank pp - 1,
    handed over locally). Rank r warms up with 2 (pp - r) - 1 forwards of its first stage, then r pairs of
    forwards (second stage, first stage), then pp - r rounds of F I W of its second stage; then F I W of each
    stage in turn until every forward ran; then r pairs of I (first, second stage) and pp - r rounds of I W of
    its first stage; then the W passes left. Built for max(2 pp - 1, m) micro-batches, the actions of
    micro-batches from m on then dropped (as torch.distributed.pipelining's ScheduleZBVZeroBubble does)."""
    n = max(2 * pp - 1, microbatches)
    out = []
    for r in range(pp):
        legs = (r, 2 * pp - 1 - r)
        count: dict[tuple[str, int], int] = {}
        actions: list[Action] = []

        def run(*steps: str, legs: tuple[int, int] = legs, count: dict = count, actions: list = actions) -> None:
            for step in steps:  # "F0": a forward of the rank's first stage (leg 0), "I1": an I of its second
                key = (step[0], int(step[1]))
                actions.append(Action(legs[key[1]], key[0], count.get(key, 0)))
                count[key] = count.get(key, 0) + 1

        run(*["F0"] * (2 * (pp - r) - 1))
        for _ in range(r):
            run("F1", "F0")
        for _ in range(pp - r):
            run("F1", "I1", "W1")
        while count[("F", 0)] < n or count[("F", 1)] < count[("F", 0)]:
            if count[("F", 0)] < n:
                run("F0")
            run("I0", "W0", "F1", "I1", "W1")
        for _ in range(r):
            run("I0", "I1")
        for _ in range(pp - r):
            run("I0", "W0")
        run(*["W1"] * (n - count[("W", 1)]), *["W0"] * (n - count[("W", 0)]))
        out.append([a for a in actions if a.mb < microbatches])
    return out


def generate(schedule: str, pp: int, virtual: int, microbatches: int) -> Schedule:
    if schedule == "gpipe":
        return gpipe(pp, microbatches)
    if schedule == "1f1b":
        return one_f_one_b(pp, microbatches)
    if schedule == "interleaved_1f1b":
        return interleaved_1f1b(pp, virtual, microbatches)
    if schedule == "zb_h1":
        return zb_h1(pp, microbatches)
    if schedule == "zbv":
        if virtual != 2:
            raise ValueError(f"zbv runs 2 stages per pipeline rank, not {virtual}")
        return zbv(pp, microbatches)
    raise ValueError(f"unknown schedule {schedule!r}")


# -------------------------------------------------------------------------------------- lowering


def add_p2p(schedule: Schedule, n_stages: int, placement: str = "1f1b") -> Schedule:
    """Add a RECV before each compute action whose input comes from another rank, and a SEND after each
    compute action whose output goes to another rank: an activation after F, an input gradient after B or
    I (W sends nothing). Stages on the same rank hand over locally. `placement`: the schedule kind whose
    stage placement applies (lcc.actions.stage_rank: zbv's V, else stage mod pp).

    Messages between two ranks carry no tag, so they match in the order sent: where a rank would receive
    a peer's messages out of that order (zbv: activations and gradients both flow from rank r to rank r + 1),
    a receive moves up to just before the receive of the message its sender sends next. It then waits no
    longer than that receive would have (sends never wait), so no deadlock comes of it."""
    pp = len(schedule)

    def remote(stage: int, r: int) -> bool:
        return stage_rank(stage, pp, placement) != r

    out = []
    for r, actions in enumerate(schedule):
        lowered = []
        for a in actions:
            backward = a.kind in ("B", "I")
            if a.kind == "F" and a.stage > 0 and remote(a.stage - 1, r):
                lowered.append(Action(a.stage, "RECV_F", a.mb))
            if backward and a.stage < n_stages - 1 and remote(a.stage + 1, r):
                lowered.append(Action(a.stage, "RECV_B", a.mb))
            lowered.append(a)
            if a.kind == "F" and a.stage < n_stages - 1 and remote(a.stage + 1, r):
                lowered.append(Action(a.stage, "SEND_F", a.mb))
            if backward and a.stage > 0 and remote(a.stage - 1, r):
                lowered.append(Action(a.stage, "SEND_B", a.mb))
        out.append(lowered)
    sent = _sends(out, placement)
    return [_in_send_order(actions, r, pp, sent, placement) for r, actions in enumerate(out)]


def _peer(a: Action, pp: int, placement: str) -> int:
    """The other rank of a send or receive."""
    return stage_rank(a.stage + (1 if a.kind in ("SEND_F", "RECV_B") else -1), pp, placement)


def _sends(schedule: Schedule, placement: str) -> dict[tuple[int, int], list[tuple[str, int, int]]]:
    """(sender, receiver) -> the messages the sender sends the receiver, in order."""
    out: dict[tuple[int, int], list[tuple[str, int, int]]] = {}
    for r, actions in enumerate(schedule):
        for a in actions:
            if a.kind.startswith("SEND"):
                out.setdefault((r, _peer(a, len(schedule), placement)), []).append(_message(a))
    return out


def _in_send_order(actions: list[Action], r: int, pp: int, sent: dict, placement: str) -> list[Action]:
    """Rank r's actions with its receives from each peer in the order the peer sends (add_p2p)."""
    order = {(p, m): k for (p, q), messages in sent.items() if q == r for k, m in enumerate(messages)}
    by_peer: dict[int, list[tuple[int, int]]] = {}
    for i, a in enumerate(actions):
        if a.kind.startswith("RECV"):
            p = _peer(a, pp, placement)
            by_peer.setdefault(p, []).append((order.get((p, _message(a)), len(actions) + i), i))
    key = {i: (i, 1, 0, 0) for i in range(len(actions))}
    for p, items in by_peer.items():
        before = len(actions)
        for k, i in sorted(items, reverse=True):  # the last sent first: each goes no later than the next sent
            before = min(i, before)
            key[i] = (before, 0, p, k)
    return [actions[i] for i in sorted(range(len(actions)), key=key.__getitem__)]


# ------------------------------------------------------------------------------------- simulator


@dataclass(frozen=True)
class Simulation:
    makespan: int  # time units (F = I = W = 1, B = 2) until the last rank finishes
    busy: list[int]  # compute time per rank
    bubble_fraction: float  # idle share of pp x makespan


def simulate(schedule: Schedule, n_stages: int, microbatches: int,
             timeline: list[tuple[int, Action, int, int]] | None = None, placement: str = "1f1b") -> Simulation:
    """Run a lowered schedule: sends complete without waiting, a receive waits for its send, a compute
    action waits for its inputs (F: the previous stage's F; B and I: the stage's own F and the next stage's
    B or I, locally or by a receive; W: the stage's own I). Raises ScheduleError naming the rank and step of
    the first problem: a deadlock, a missing or surplus action, a send never received, an action on a rank
    that does not run its stage (`placement`: the schedule kind whose placement applies, as in add_p2p).
    `timeline` (a list) receives every action as (rank, action, start, end) in cost units, in the order
    they run (sends and receives take no time)."""
    pp = len(schedule)
    _check_counts(schedule, n_stages, microbatches, placement)
    pos, clock, busy = [0] * pp, [0] * pp, [0] * pp
    sent: dict[tuple[str, int, int], tuple[int, int, int]] = {}  # message -> (time, sender rank, step)
    received: dict[tuple[str, int, int], int] = {}
    done: dict[tuple[str, int, int], int] = {}
    while any(pos[r] < len(schedule[r]) for r in range(pp)):
        progressed = False
        for r in range(pp):
            while pos[r] < len(schedule[r]):
                a = schedule[r][pos[r]]
                ready = _ready(a, r, pp, n_stages, sent, received, done, pos[r], placement)
                if ready is None:
                    break
                start = max(clock[r], ready)
                if a.kind in COST:
                    clock[r] = start + COST[a.kind]
                    busy[r] += COST[a.kind]
                    done[(a.kind, a.stage, a.mb)] = clock[r]
                elif a.kind.startswith("SEND"):
                    sent[_message(a)] = (start, r, pos[r])
                else:
                    received[_message(a)] = clock[r] = start
                if timeline is not None:
                    timeline.append((r, a, start, clock[r] if a.kind in COST else start))
                pos[r] += 1
                progressed = True
        if not progressed:
            waiting = [(r, pos[r], str(schedule[r][pos[r]])) for r in range(pp) if pos[r] < len(schedule[r])]
            for r, step, _ in waiting:  # a compute action whose input was sent but is never received
                a = schedule[r][step]
                message = ("F", a.stage, a.mb) if a.kind == "F" else ("B", a.stage, a.mb)
                if a.kind in ("F", "B", "I") and message in sent and message not in received:
                    recv = Action(a.stage, "RECV_" + message[0], a.mb)
                    raise ScheduleError(r, step, f"{a} needs {recv} first: its input was sent (rank "
                                        f"{sent[message][1]}, step {sent[message][2]}) but is never received")
            r, step, action = waiting[0]
            raise ScheduleError(r, step, f"deadlock: {action} waits forever (blocked: "
                                + ", ".join(f"rank {w[0]} at {w[2]}" for w in waiting) + ")")
    for message, (_, r, step) in sent.items():
        if message not in received:
            raise ScheduleError(r, step, f"message {message[0]} for stage {message[1]}, micro-batch "
                                f"{message[2]} is sent but never received")
    _check_order(schedule, placement)
    makespan = max(clock) if clock else 0
    idle = pp * makespan - sum(busy)
    return Simulation(makespan, busy, idle / (pp * makespan) if makespan else 0.0)


def _check_order(schedule: Schedule, placement: str) -> None:
    """Each rank receives a peer's messages in the order the peer sends them (they carry no tag)."""
    sent, pp = _sends(schedule, placement), len(schedule)
    for r, actions in enumerate(schedule):
        seen: dict[int, int] = {}
        for step, a in enumerate(actions):
            if a.kind.startswith("RECV"):
                p = _peer(a, pp, placement)
                k = seen[p] = seen.get(p, -1) + 1
                first = sent[(p, r)][k]
                if first != _message(a):
                    raise ScheduleError(r, step, f"{a} out of order: rank {p} sends {first[0]} of stage "
                                        f"{first[1]}, micro-batch {first[2]} first (messages between two ranks "
                                        "match in the order sent)")


def _message(a: Action) -> tuple[str, int, int]:
    """The message a SEND or RECV carries, keyed by the stage that consumes it."""
    if a.kind == "SEND_F":
        return ("F", a.stage + 1, a.mb)
    if a.kind == "SEND_B":
        return ("B", a.stage - 1, a.mb)
    return ("F" if a.kind == "RECV_F" else "B", a.stage, a.mb)


def _input_grad(done: dict, stage: int, mb: int) -> int | None:
    """When stage's input gradient for micro-batch mb exists: after its B, or its I."""
    b, i = done.get(("B", stage, mb)), done.get(("I", stage, mb))
    return b if b is not None else i


def _ready(a: Action, r: int, pp: int, n_stages: int, sent: dict, received: dict, done: dict,
           step: int, placement: str) -> int | None:
    """Time at which action `a` on rank r may start, or None while it must wait."""
    home = stage_rank(a.stage, pp, placement)
    if home != r:
        raise ScheduleError(r, step, f"{a} belongs to stage {a.stage}, which runs on rank {home}")
    if a.kind.startswith("RECV"):
        message = sent.get(_message(a))
        return None if message is None else message[0]
    if a.kind == "SEND_F":
        return done.get(("F", a.stage, a.mb))
    if a.kind == "SEND_B":
        return _input_grad(done, a.stage, a.mb)
    if a.kind == "W":
        return done.get(("I", a.stage, a.mb))
    if a.kind == "F":
        if a.stage == 0:
            return 0
        if stage_rank(a.stage - 1, pp, placement) == r:
            return done.get(("F", a.stage - 1, a.mb))
        return received.get(("F", a.stage, a.mb))
    own = done.get(("F", a.stage, a.mb))
    if own is None:
        return None
    if a.stage == n_stages - 1:
        return own
    grad = (_input_grad(done, a.stage + 1, a.mb) if stage_rank(a.stage + 1, pp, placement) == r
            else received.get(("B", a.stage, a.mb)))
    return None if grad is None else max(own, grad)


def _check_counts(schedule: Schedule, n_stages: int, microbatches: int, placement: str) -> None:
    seen: dict[tuple[str, int, int], tuple[int, int]] = {}
    for r, actions in enumerate(schedule):
        for step, a in enumerate(actions):
            if a.kind not in KINDS:
                raise ScheduleError(r, step, f"unknown action kind {a.kind!r}")
            if not (0 <= a.stage < n_stages and 0 <= a.mb < microbatches):
                raise ScheduleError(r, step, f"{a} is outside {n_stages} stages x {microbatches} micro-batches")
            if (a.kind, a.stage, a.mb) in seen:
                first = seen[(a.kind, a.stage, a.mb)]
                raise ScheduleError(r, step, f"{a} appears twice (first at rank {first[0]}, step {first[1]})")
            seen[(a.kind, a.stage, a.mb)] = (r, step)
    pp = len(schedule)
    for s in range(n_stages):
        home = stage_rank(s, pp, placement)
        for m in range(microbatches):
            has = {kind for kind in ("F", "B", "I", "W") if (kind, s, m) in seen}
            if "B" in has and has & {"I", "W"}:
                r, step = seen[("I" if "I" in has else "W", s, m)]
                raise ScheduleError(r, step, f"{s}B{m} and a split backward ({s}I{m}, {s}W{m}) of the same "
                                    "stage and micro-batch")
            missing = [k for k in ("F", "B") if k not in has] if not has & {"I", "W"} else \
                [k for k in ("F", "I", "W") if k not in has]
            if missing:
                raise ScheduleError(home, len(schedule[home]), f"missing {s}{missing[0]}{m}")


# ------------------------------------------------------------------------------------------- files


def to_csv(schedule: Schedule) -> str:
    """Compute-only schedule, one row per pipeline rank, as torch.distributed.pipelining reads it
    (`_PipelineSchedule._load_csv`): comma-separated action strings (F, B, I, W)."""
    return "".join(",".join(str(a) for a in actions if a.kind in COST) + "\n" for actions in schedule)


def from_csv(text: str) -> Schedule:
    return [[Action.parse(cell) for cell in line.split(",") if cell.strip()] for line in text.splitlines()]
