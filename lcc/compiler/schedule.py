"""Pipeline schedules as per-rank action lists, in torch.distributed.pipelining's notation.

An action is `{stage}{kind}{microbatch}`: `0F3` (stage 0 forward of micro-batch 3), `1B3`, `0SEND_F3`,
`1RECV_B2`; stage is the global (virtual) stage, which runs on pipeline rank `stage mod pp`. Generators
emit compute actions only; `add_p2p` lowers them by adding the sends and receives; `simulate` checks a
lowered schedule (every send has its receive, no deadlock, one F and one B per stage and micro-batch, in
dependency order) and measures it. Nothing here executes anything.
"""

from __future__ import annotations

from dataclasses import dataclass

from lcc.actions import KINDS, Action

COST = {"F": 1, "B": 2}  # relative compute time of a forward and a backward, for the simulator


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


def generate(schedule: str, pp: int, virtual: int, microbatches: int) -> Schedule:
    if schedule == "gpipe":
        return gpipe(pp, microbatches)
    if schedule == "1f1b":
        return one_f_one_b(pp, microbatches)
    if schedule == "interleaved_1f1b":
        return interleaved_1f1b(pp, virtual, microbatches)
    raise ValueError(f"unknown schedule {schedule!r}")


# -------------------------------------------------------------------------------------- lowering


def add_p2p(schedule: Schedule, n_stages: int) -> Schedule:
    """Add a RECV before each compute action whose input comes from another rank, and a SEND after each
    compute action whose output goes to another rank. Stages on the same rank hand over locally."""
    pp = len(schedule)
    out = []
    for r, actions in enumerate(schedule):
        lowered = []
        for a in actions:
            if a.kind == "F" and a.stage > 0 and (a.stage - 1) % pp != r:
                lowered.append(Action(a.stage, "RECV_F", a.mb))
            if a.kind == "B" and a.stage < n_stages - 1 and (a.stage + 1) % pp != r:
                lowered.append(Action(a.stage, "RECV_B", a.mb))
            lowered.append(a)
            if a.kind == "F" and a.stage < n_stages - 1 and (a.stage + 1) % pp != r:
                lowered.append(Action(a.stage, "SEND_F", a.mb))
            if a.kind == "B" and a.stage > 0 and (a.stage - 1) % pp != r:
                lowered.append(Action(a.stage, "SEND_B", a.mb))
        out.append(lowered)
    return out


# ------------------------------------------------------------------------------------- simulator


@dataclass(frozen=True)
class Simulation:
    makespan: int  # time units (F = 1, B = 2) until the last rank finishes
    busy: list[int]  # compute time per rank
    bubble_fraction: float  # idle share of pp x makespan


def simulate(schedule: Schedule, n_stages: int, microbatches: int,
             timeline: list[tuple[int, Action, int, int]] | None = None) -> Simulation:
    """Run a lowered schedule: sends complete without waiting, a receive waits for its send, a compute
    action waits for its inputs (the previous stage locally, or a receive). Raises ScheduleError naming
    the rank and step of the first problem: a deadlock, a missing or surplus action, a send never received.
    `timeline` (a list) receives every action as (rank, action, start, end) in cost units, in the order
    they run (sends and receives take no time)."""
    pp = len(schedule)
    _check_counts(schedule, n_stages, microbatches)
    pos, clock, busy = [0] * pp, [0] * pp, [0] * pp
    sent: dict[tuple[str, int, int], tuple[int, int, int]] = {}  # message -> (time, sender rank, step)
    received: dict[tuple[str, int, int], int] = {}
    done: dict[tuple[str, int, int], int] = {}
    while any(pos[r] < len(schedule[r]) for r in range(pp)):
        progressed = False
        for r in range(pp):
            while pos[r] < len(schedule[r]):
                a = schedule[r][pos[r]]
                ready = _ready(a, r, pp, n_stages, sent, received, done, pos[r])
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
                if a.kind in COST and message in sent and message not in received:
                    recv = Action(a.stage, "RECV_" + a.kind, a.mb)
                    raise ScheduleError(r, step, f"{a} needs {recv} first: its input was sent (rank "
                                        f"{sent[message][1]}, step {sent[message][2]}) but is never received")
            r, step, action = waiting[0]
            raise ScheduleError(r, step, f"deadlock: {action} waits forever (blocked: "
                                + ", ".join(f"rank {w[0]} at {w[2]}" for w in waiting) + ")")
    for message, (_, r, step) in sent.items():
        if message not in received:
            raise ScheduleError(r, step, f"message {message[0]} for stage {message[1]}, micro-batch "
                                f"{message[2]} is sent but never received")
    makespan = max(clock) if clock else 0
    idle = pp * makespan - sum(busy)
    return Simulation(makespan, busy, idle / (pp * makespan) if makespan else 0.0)


def _message(a: Action) -> tuple[str, int, int]:
    """The message a SEND or RECV carries, keyed by the stage that consumes it."""
    if a.kind == "SEND_F":
        return ("F", a.stage + 1, a.mb)
    if a.kind == "SEND_B":
        return ("B", a.stage - 1, a.mb)
    return ("F" if a.kind == "RECV_F" else "B", a.stage, a.mb)


def _ready(a: Action, r: int, pp: int, n_stages: int, sent: dict, received: dict, done: dict,
           step: int) -> int | None:
    """Time at which action `a` on rank r may start, or None while it must wait."""
    if a.stage % pp != r:
        raise ScheduleError(r, step, f"{a} belongs to stage {a.stage}, which runs on rank {a.stage % pp}")
    if a.kind.startswith("RECV"):
        message = sent.get(_message(a))
        return None if message is None else message[0]
    if a.kind == "SEND_F":
        return done.get(("F", a.stage, a.mb))
    if a.kind == "SEND_B":
        return done.get(("B", a.stage, a.mb))
    if a.kind == "F":
        if a.stage == 0:
            return 0
        if (a.stage - 1) % pp == r:
            return done.get(("F", a.stage - 1, a.mb))
        return received.get(("F", a.stage, a.mb))
    own = done.get(("F", a.stage, a.mb))
    if own is None:
        return None
    if a.stage == n_stages - 1:
        return own
    grad = (done.get(("B", a.stage + 1, a.mb)) if (a.stage + 1) % pp == r
            else received.get(("B", a.stage, a.mb)))
    return None if grad is None else max(own, grad)


def _check_counts(schedule: Schedule, n_stages: int, microbatches: int) -> None:
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
    for kind in ("F", "B"):
        for s in range(n_stages):
            for m in range(microbatches):
                if (kind, s, m) not in seen:
                    raise ScheduleError(s % pp, len(schedule[s % pp]), f"missing {s}{kind}{m}")


# ------------------------------------------------------------------------------------------- files


def to_csv(schedule: Schedule) -> str:
    """Compute-only schedule, one row per pipeline rank, as torch.distributed.pipelining reads it
    (`_PipelineSchedule._load_csv`): comma-separated action strings."""
    return "".join(",".join(str(a) for a in actions if a.kind in COST) + "\n" for actions in schedule)


def from_csv(text: str) -> Schedule:
    return [[Action.parse(cell) for cell in line.split(",") if cell.strip()] for line in text.splitlines()]
