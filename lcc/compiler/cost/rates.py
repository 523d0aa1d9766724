"""Achieved rates from `cluster.calibration` (what `lcc calibrate` measured), interpolated at the sizes a plan
runs: the seconds of one linear layer, one grouped-expert block, one attention core, an element-wise pass, an
optimizer step, one small operation's fixed cost and each collective, how much faster ranks that share
a host compute while fewer of them are busy, and how much faster (or slower) a layer's traced part runs under
torch.compile (docs/cost-model.md, "Calibration").

`Rates(cluster, bound)` reads the median figures (`mid`) or one end of their measured spread (`fast`: each
point's 10th percentile; `slow`: its 90th), so that the cost model gives a step-time range. Sizes between
two measured points interpolate log-log; beyond the largest a call's time grows at the last segment's
marginal rate (compute: a fixed part such as weight gradients plus a part that grows with the work) or
bandwidth (collectives); below the smallest a call runs at the smallest's rate (compute) or costs what it
did (collectives). Collective times are first made non-decreasing in size (pool-adjacent-violators), since
a small collective's time is mostly scheduling noise.
"""

from __future__ import annotations

import bisect
import math
from functools import cached_property
from typing import Any

COLUMN = {"mid": 0, "fast": 1, "slow": 2}  # offset of the figure after a row's median


def _interp(xs: list[float], ys: list[float], x: float) -> float:
    """Piecewise log-log interpolation of y(x) through sorted points, constant beyond either end."""
    if x <= xs[0]:
        return ys[0]
    if x >= xs[-1]:
        return ys[-1]
    i = bisect.bisect_right(xs, x)
    x0, x1, y0, y1 = xs[i - 1], xs[i], ys[i - 1], ys[i]
    t = (math.log(x) - math.log(x0)) / (math.log(x1) - math.log(x0))
    return math.exp(math.log(y0) + t * (math.log(y1) - math.log(y0)))


def _monotone(ys: list[float]) -> list[float]:
    """The closest non-decreasing sequence in least squares (pool adjacent violators)."""
    blocks: list[list[float]] = []  # [sum, count]
    for y in ys:
        blocks.append([y, 1.0])
        while len(blocks) > 1 and blocks[-2][0] / blocks[-2][1] > blocks[-1][0] / blocks[-1][1]:
            s, c = blocks.pop()
            blocks[-1][0] += s
            blocks[-1][1] += c
    return [b[0] / b[1] for b in blocks for _ in range(int(b[1]))]


class Ladder:
    """A rate (work per second) measured at sizes along one shape family; `rate(size)` interpolates it. The work
    of a call grows as size ** `power` (rows of a linear layer or an expert block: 1; an attention core's
    sequence: 2). Past the largest size a call's time grows by the last segment's marginal rate (a call's
    time is a fixed part, such as its weight gradients, plus a part that grows with its work), but no faster
    than `cap` (the best rate its table measured); where the last segment's time does not grow, the last rate
    holds."""

    def __init__(self, points: list[tuple[float, float]], power: float = 1.0, cap: float | None = None):
        points = sorted(points)
        self.sizes = [p[0] for p in points]
        self.rates = [max(p[1], 1e-30) for p in points]
        self.power, self.cap = power, cap

    def rate(self, size: float) -> float:
        size = max(size, 1e-30)
        if size <= self.sizes[-1] or len(self.sizes) < 2:
            return _interp(self.sizes, self.rates, size)
        (s0, s1), (r0, r1), p = self.sizes[-2:], self.rates[-2:], self.power
        t0, t1 = s0**p / r0, s1**p / r1
        if t1 <= t0:
            return self.rates[-1]
        rate = size**p / (t1 + (size**p - s1**p) * (t1 - t0) / (s1**p - s0**p))
        return min(rate, max(self.cap or rate, r1))


class Family:
    """Ladders keyed by a width (the square weight's side, the experts' width, the head dimension): `rate(width,
    size)` interpolates between the two nearest widths, log-log."""

    def __init__(self, ladders: dict[float, Ladder]):
        self.widths = sorted(ladders)
        self.ladders = ladders

    def rate(self, width: float, size: float) -> float:
        ws = self.widths
        if len(ws) == 1 or width <= ws[0]:
            return self.ladders[ws[0]].rate(size)
        if width >= ws[-1]:
            return self.ladders[ws[-1]].rate(size)
        i = bisect.bisect_right(ws, width)
        lo, hi = self.ladders[ws[i - 1]].rate(size), self.ladders[ws[i]].rate(size)
        return _interp([ws[i - 1], ws[i]], [lo, hi], width)


class Rates:
    """Seconds of each operation class from a cluster's calibration table (`cluster.calibration`). A compute
    row is its shape, the forward's median seconds, then forward and backward's [median, 10th, 90th
    percentile]; the forward alone at a spread's end scales with the whole."""

    def __init__(self, calibration: Any, bound: str = "mid"):
        self.c = calibration
        self.off = COLUMN[bound]

    def _families(self, rows: list[list[float]], key: int, power: float = 1.0) -> tuple[Family, Family]:
        """(forward, forward + backward) work per second of a compute table whose median is at `key`: rows
        [*shape, forward, median, fast, slow] with work(shape) and the width and size it is indexed by (the
        work growing as size ** `power` at one width)."""
        fwd: dict[float, list] = {}
        both: dict[float, list] = {}
        for row in rows:
            work, width, size = self._work(rows, row)
            total = row[key + self.off]
            fwd.setdefault(width, []).append((size, work / (row[key - 1] * total / row[key])))
            both.setdefault(width, []).append((size, 3 * work / total))

        def family(points: dict[float, list]) -> Family:
            cap = max(r for p in points.values() for _, r in p)
            return Family({w: Ladder(p, power, cap) for w, p in points.items()})
        return family(fwd), family(both)

    def _work(self, table: list, row: list[float]) -> tuple[float, float, float]:
        """(forward FLOPs, width, size) of one row of the linear, experts or attention table."""
        if table is self.c.linear:
            rows, inner, outer = row[:3]
            return 2 * rows * inner * outer, math.sqrt(inner * outer), rows
        if table is self.c.experts:
            experts, rows, d, f = row[:4]
            return 6 * experts * rows * d * f, math.sqrt(d * f), rows
        heads, seq, head_dim = row[:3]  # attention: QK^T and AV under the causal mask
        return 2 * heads * head_dim * seq * seq, head_dim, seq

    @cached_property
    def _linear(self) -> tuple[Family, Family]:
        return self._families(self.c.linear, 4)

    @cached_property
    def _experts(self) -> tuple[Family, Family]:
        return self._families(self.c.experts, 5)

    @cached_property
    def _attention(self) -> tuple[Family, Family]:
        return self._families(self.c.attention, 4, power=2.0)

    @staticmethod
    def _seconds(flops: float, families: tuple[Family, Family], width: float, size: float, backward: bool) -> float:
        fwd, both = families
        return (3 if backward else 1) * flops / (both if backward else fwd).rate(width, size)

    def linear(self, rows: float, inner: float, outer: float, backward: bool = True) -> float:
        """Seconds of one linear layer over `rows` rows: its forward, or forward and backward."""
        if min(rows, inner, outer) <= 0:
            return 0.0
        return self._seconds(2 * rows * inner * outer, self._linear, math.sqrt(inner * outer), rows, backward)

    def experts(self, experts: float, rows: float, d: float, f: float, backward: bool = True) -> float:
        """Seconds of a grouped SwiGLU block: `experts` experts of `rows` rows each, d_model `d`, width `f`."""
        if experts <= 0 or rows <= 0:
            return 0.0
        return self._seconds(6 * experts * rows * d * f, self._experts, math.sqrt(d * f), rows, backward)

    def attention(self, sequences: float, heads: float, seq: float, head_dim: float, backward: bool = True) -> float:
        """Seconds of the causal attention core (RoPE included) over `sequences` sequences of `heads` heads."""
        if sequences <= 0 or heads <= 0:
            return 0.0
        flops = 2 * sequences * heads * head_dim * seq * seq
        return self._seconds(flops, self._attention, head_dim, seq, backward)

    # ------------------------------------------------------------------ memory-bound work and fixed costs
    def _sized(self, rows: list) -> Ladder:
        """A ladder of rows [size, seconds: median, fast, slow] whose work is their size."""
        points = [(r[0], r[0] / r[1 + self.off]) for r in rows]
        return Ladder(points, cap=max(r for _, r in points))

    @cached_property
    def _stream(self) -> Ladder:
        return self._sized(self.c.elementwise)

    def elementwise(self, nbytes: float) -> float:
        """Seconds of element-wise passes moving `nbytes` (reads and writes)."""
        return nbytes / self._stream.rate(nbytes) if nbytes > 0 else 0.0

    @cached_property
    def _optimizer(self) -> Ladder:
        return self._sized(self.c.optimizer)

    def optimizer(self, params: float) -> float:
        """Seconds of the gradient norm and an AdamW step over `params` parameters."""
        return params / self._optimizer.rate(params) if params > 0 else 0.0

    @property
    def op(self) -> float:
        """Fixed seconds of one small operation, forward and backward."""
        return self.c.op_seconds[self.off]

    def speed(self, busy: float) -> float:
        """How much faster a rank computes with `busy` ranks of its host computing at once than with all the
        calibrated ranks busy (the concurrency table's medians, linear in between; 1 without the table)."""
        rows = self.c.concurrency
        if not rows:
            return 1.0
        ranks = [float(r[0]) for r in rows]
        seconds = [r[1] for r in rows]
        i = min(max(bisect.bisect_left(ranks, busy), 1), len(rows) - 1) if len(rows) > 1 else 0
        if len(rows) == 1 or busy <= ranks[0]:
            at = seconds[0]
        elif busy >= ranks[-1]:
            at = seconds[-1]
        else:
            t = (busy - ranks[i - 1]) / (ranks[i] - ranks[i - 1])
            at = seconds[i - 1] + t * (seconds[i] - seconds[i - 1])
        return seconds[-1] / at

    def compiled(self, tokens: float) -> float:
        """Seconds under torch.compile per eager second of a layer's traced part over `tokens` tokens (the
        `compiled` table's ratio, interpolated log-log in tokens, constant beyond its ends; 1 without the
        table: priced as eager)."""
        rows = self.c.compiled
        if not rows:
            return 1.0
        return _interp([r[0] for r in rows], [r[2 + self.off] / r[1] for r in rows], max(tokens, 1e-30))

    # ------------------------------------------------------------------ collectives
    @cached_property
    def _collectives(self) -> dict[tuple[str, int], tuple[list[float], list[float]]]:
        out = {}
        for kind, table in self.c.collectives.items():
            for n in sorted({r[0] for r in table}):
                rows = sorted(r[1:] for r in table if r[0] == n)
                out[(kind, n)] = ([r[0] for r in rows], _monotone([r[1 + self.off] for r in rows]))
        return out

    def collective(self, kind: str, nbytes: float, group: int) -> float | None:
        """Seconds of one collective of `nbytes` per rank over a group of `group` ranks (the nearest measured
        group size; for `send_recv` a message each way between two ranks); None where none was measured."""
        if group <= 1:
            return 0.0
        sizes = sorted({n for k, n in self._collectives if k == kind})
        if not sizes:
            return None
        n = min(sizes, key=lambda s: (abs(math.log(s / group)), -s))
        xs, ys = self._collectives[(kind, n)]
        if nbytes <= xs[0]:
            return ys[0]
        if nbytes >= xs[-1]:  # the last segment's bandwidth
            slope = (ys[-1] - ys[-2]) / (xs[-1] - xs[-2]) if len(xs) > 1 else ys[-1] / xs[-1]
            return ys[-1] + (nbytes - xs[-1]) * max(slope, 0.0)
        i = bisect.bisect_right(xs, nbytes)
        t = (nbytes - xs[i - 1]) / (xs[i] - xs[i - 1])
        return ys[i - 1] + t * (ys[i] - ys[i - 1])
