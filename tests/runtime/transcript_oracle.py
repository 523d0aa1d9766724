"""The transcript oracle: what each rank must issue in a step, read from plan.json alone.

For each pipeline action of a rank: the role's forward collectives in order (F), its backward
collectives as a multiset (B: autograd orders them; with the gradient buckets issued during it), a send
or a receive, a stage's REDUCE_GRAD (its buckets' further axes, in order), then the step actions'
collectives in order. Static shapes must match exactly;
all-to-alls by op, axis, dtype and feature size, with their row splits equal to the expert counts
exchanged just before in the same forward.

The oracle shares no code with what it checks: its expectations come from plan.json and its own reading of
it, never from the program checker or codegen. It reads one thing of lcc.plan.op_table, as data: which
collectives the declared ops issue, so a plan listing a collective no op declares is refused here too.
"""

from __future__ import annotations

import math
from collections import Counter

from lcc.plan.op_table import collective_kinds


def _key(c: dict) -> tuple:
    shape = c["shape"]
    if shape is not None and -1 in shape:  # rows vary: the feature size must match
        shape = ["rows", *shape[1:]]
    return c["op"], c["axis"], tuple(shape) if shape is not None else None, c["dtype"]


def _piece(bucket: dict, params_of: dict) -> int:
    """Elements of this rank's pieces of a reduce-scattered bucket."""
    return sum(math.ceil(math.prod(params_of[n]["local_shape"]) / params_of[n]["zero"]["parts"])
               for n in bucket["params"])


def expected(plan: dict, pp_rank: int) -> list[tuple[str, list[tuple]]]:
    """Segments of one step: ("ordered" | "set", collectives), from the plan alone."""
    roles = {r["stage"]: r for r in plan["roles"]}
    declared = collective_kinds()
    for r in plan["roles"]:
        for c in r["forward"] + r["backward"]:
            assert c["op"] in declared, f"role {r['name']}: {c['op']} at {c['site']} is issued by no declared op"
    params_of = {p["name"]: p for p in plan["parameters"]}
    params = plan["precision"]["params"]
    out: list[tuple[str, list[tuple]]] = []
    actions = plan["schedule"]["actions"][pp_rank]
    merged = set()  # actions counted with the stage's last backward
    for index, text in enumerate(actions):
        stage = int(text[:len(text) - len(text.lstrip("0123456789"))])
        kind = text[len(str(stage)):].rstrip("0123456789")
        role = roles[stage]
        if index in merged:
            continue
        if kind == "F":
            out.append(("forward", [_key(c) for c in role["forward"]]))
        elif kind == "I":  # zero bubble: the input's gradient, the backward's collectives (the first stage: at W)
            if stage > 0:
                out.append(("set", [_key(c) for c in role["backward"]]))
        elif kind in ("B", "W"):
            # buckets issued as backward completes them: `microbatch` ones in every backward of the stage,
            # all of them in its last (the stage's REDUCE_GRAD issues what was left); a W, the weights' part
            final = index == max(i for i, a in enumerate(actions) if a.startswith(f"{stage}{kind}"))
            buckets = [("reduce_scatter" if b["op"] == "reduce_scatter" else "all_reduce", b["axes"][0],
                        (b["elements"],), params) for b in role["grad_buckets"] if final or b["when"] == "microbatch"]
            # ZeRO 3 reducing once per step: the programs' reduce-scatters over dp / edp in the last backward only
            once = plan["memory"]["zero"] >= 3 and plan["memory"]["grad_reduce"] == "step"
            backward = [c for c in role["backward"] if final or not once
                        or not (c["op"] == "reduce_scatter" and c["axis"] in ("dp", "edp"))]
            if kind == "W" and stage > 0:
                backward = []
            sends = []
            if final and f"{stage}REDUCE_GRAD" in actions[index + 1:index + 3]:
                # a bucket on a group the program also uses is issued by REDUCE_GRAD, after the backward's
                # send to the previous stage: the three are one segment, in an order the buckets decide
                for j in range(index + 1, actions.index(f"{stage}REDUCE_GRAD", index)):
                    merged.add(j)
                    sends.append(("send", "pp", ("mb",), params))
            out.append(("set", [_key(c) for c in backward] + buckets + sends))
        elif kind == "REDUCE_GRAD":  # then each bucket's further axes, in order, on the reduced result
            out.append(("ordered", [("all_reduce", axis, (_piece(b, params_of) if b["op"] == "reduce_scatter"
                                                           else b["elements"],), params)
                                    for b in role["grad_buckets"] for axis in b["axes"][1:]]))
        else:
            op = "send" if kind.startswith("SEND") else "recv"
            out.append(("ordered", [(op, "pp", ("mb",), params)]))
    for action in plan["schedule"]["step"][pp_rank]:
        out.append(("ordered", [_key(c) for c in action["collectives"]]))
    return out


def _planned_axis(have: tuple, want: tuple) -> tuple:
    """A group that is several axes at once (`tp|stage|world`) matches any of them."""
    return (have[0], want[1], *have[2:]) if want[1] in have[1].split("|") else have


def _match_axes(have: list[tuple], want: list[tuple]) -> list[tuple]:
    """Each issued collective on a group that is several axes takes the axis the plan has for it."""
    left = Counter(want)
    out = []
    for h in have:
        choice = next((a for a in h[1].split("|") if left[(h[0], a, *h[2:])] > 0), h[1])
        left[(h[0], choice, *h[2:])] -= 1
        out.append((h[0], choice, *h[2:]))
    return out


def check_rank(plan: dict, records: list[dict], rank: int, step: int = 0) -> int:
    pp_rank = plan["ranks"]["rows"][rank][1]
    got = [r for r in records if r["rank"] == rank and r["step"] == step]
    mb_shape = tuple(plan["schedule"]["boundary_shape"][:2])
    for r in got:  # a send or receive carries a micro-batch's activations or their gradient: (b, s or s / tp, d)
        if r["op"] in ("send", "recv"):
            assert tuple(r["shape"][:2]) == mb_shape, (rank, r)
    actual = [(r["op"], r["axis"], ("mb",) if r["op"] in ("send", "recv")
               else tuple(["rows", *r["shape"][1:]]) if r["op"] == "all_to_all" and r["in_splits"] is not None
               else tuple(r["shape"]),
               r["dtype"]) for r in got]
    i = 0
    for mode, want in expected(plan, pp_rank):
        have = actual[i:i + len(want)]
        if mode in ("ordered", "forward"):
            have = [_planned_axis(h, w) for h, w in zip(have, want, strict=False)]
            assert have == want, f"rank {rank}, collectives {i}..: issued {have}, plan says {want}"
            if mode == "forward":
                _check_splits(got[i:i + len(want)], rank)
        else:
            have = _match_axes(have, want)
            extra, missing = Counter(have) - Counter(want), Counter(want) - Counter(have)
            assert not extra and not missing, f"rank {rank}, backward at {i}: issued {extra} beyond the plan, " \
                                              f"missing {missing}"
        i += len(want)
    assert i == len(actual), f"rank {rank} issued {len(actual) - i} collectives the plan does not list: {actual[i:]}"
    return len(actual)


def _check_splits(forward: list[dict], rank: int) -> None:
    """In a forward, the dispatch all-to-all moves the rows the expert counts just exchanged over the same
    axis announce, and the combine all-to-all moves them back. The hierarchical exchange's first level
    (ep_inter) announces per node its rows (first column) and its slots per expert (the rest): each slot's
    row index and gate move as the slots do. The overlapped exchange announces both halves in one exchange,
    then moves each."""
    rows: dict[str, list[tuple]] = {}  # the counts exchanged on each axis, latest last
    slots: dict[str, tuple] = {}
    for r in forward:
        if r["op"] != "all_to_all":
            continue
        axis = r["axis"]
        if r["in_splits"] is None:  # a counts exchange (no row splits)
            sent, received = r["sent"], r["received"]
            if axis == "ep_inter":
                rows.setdefault(axis, []).append(([row[0] for row in sent], [row[0] for row in received]))
                slots[axis] = ([sum(row[1:]) for row in sent], [sum(row[1:]) for row in received])
            else:  # with the overlapped exchange each row is half A's counts, then half B's
                k = len(sent[0])
                for lo, hi in ((0, k), (0, k // 2), (k // 2, k)):
                    rows.setdefault(axis, []).append(([sum(row[lo:hi]) for row in sent],
                                                      [sum(row[lo:hi]) for row in received]))
        elif len(r["shape"]) == 1:  # a value per slot: its row index or its gate
            assert (r["in_splits"], r["out_splits"]) == slots.get(axis), (rank, r)
        else:  # the latest counts (all of them, or either half's)
            splits = (r["in_splits"], r["out_splits"])
            assert any(splits in (c, c[::-1]) for c in rows.get(axis, [])[-3:]), (rank, r)
