"""The overlapped expert exchange (`parallelism.expert_overlap`), priced: one MoE layer's forward on one rank
with the micro-batch's tokens in two halves A and B (lcc.ops.overlap), a compute stream and a
communication stream (docs/cost-model.md, "Overlap").

    comm:     | dispatch A | dispatch B |          | combine A |          | combine B |
    compute:               | experts A  |          | experts B |

Both dispatches begin at once (B's queued behind A's), half A's experts wait for A's rows, half A's combine
begins once its experts are done and B's dispatch has left, half B's experts run while it travels, and half
B's combine ends the layer. What hides: B's dispatch behind A's experts, A's combine behind B's experts;
what cannot: A's dispatch (nothing to compute before it) and B's combine (nothing after it). While a
collective runs beside them, the experts run on the streaming multiprocessors the collective leaves:
`SM_SHARE` of the device goes to the communication kernels. Backward runs the reverse exchanges
synchronously (`lcc.ops.collectives.all_to_all_start`), so nothing hides there.
"""

from __future__ import annotations

from dataclasses import dataclass

# Share of the device's compute the communication kernels take while they overlap compute: DeepSeek-V3
# (arXiv 2412.19437, section 3.2.2) runs its all-to-all on 20 of an H800's 132 SMs.
SM_SHARE = 20 / 132


@dataclass(frozen=True)
class Span:
    stream: str  # "comm" or "compute"
    name: str  # "dispatch A", "experts A", ...
    start: float
    end: float


def _slowed(compute: float, beside: float, share: float) -> float:
    """How long `compute` seconds of work take when a collective of `beside` seconds starts with it: at
    `1 - share` of the device while the collective runs, in full after."""
    if compute <= (1 - share) * beside:
        return compute / (1 - share)
    return compute + share * beside


def halves(dispatch: float, combine: float, experts: float, share: float = SM_SHARE) -> list[Span]:
    """The spans of one overlapped MoE forward from its first dispatch: `dispatch` and `combine` are one
    half's exchange seconds, `experts` one half's experts (alone on the device)."""
    d, c, e = dispatch, combine, experts
    a_end = d + _slowed(e, d, share)
    t1 = max(a_end, 2 * d)  # half B's experts and half A's combine both wait for A's experts and B's rows
    b_end = t1 + _slowed(e, c, share)
    c_b = max(t1 + c, b_end)
    return [Span("comm", "dispatch A", 0.0, d), Span("comm", "dispatch B", d, 2 * d),
            Span("compute", "experts A", d, a_end), Span("compute", "experts B", t1, b_end),
            Span("comm", "combine A", t1, t1 + c), Span("comm", "combine B", c_b, c_b + c)]


def hidden(dispatch: float, combine: float, experts: float, share: float = SM_SHARE) -> float:
    """Seconds the two halves save against running the same spans one after the other (2 dispatch + 2
    experts + 2 combine): min(e, (1 - share) d) + min(e, (1 - share) c). At most the exchange's 2 d + 2 c,
    and at most the experts' 2 e."""
    spans = halves(dispatch, combine, experts, share)
    return 2 * (dispatch + combine + experts) - max(s.end for s in spans)
