"""What `lcc calibrate` times on each rank, every rank at once: the operation classes a training step is made
of, each at a ladder of sizes, as the runtime runs them (autograd's forward and backward included).

- linear: `x[rows, inner] @ W[outer, inner]^T`, forward and forward + backward (input and weight gradients);
- experts: lcc's grouped SwiGLU over `experts` experts of `rows` rows each, forward and forward + backward;
- attention: lcc's causal attention core (RoPE, scaled dot product) of one sequence, forward and forward +
  backward;
- elementwise: `y += x` over `bytes` moved (two reads and a write): norms, activations, gradient
  accumulation, the gradient norm and its scaling, zeroing;
- optimizer: lcc's AdamW (fused) step over `params` parameters;
- op: the fixed cost of one operation dispatched to PyTorch's kernels, over a chain of small autograd
  operations, forward and backward (PyTorch's dispatch, autograd's bookkeeping, Python);
- collectives: all-reduce, all-to-all, all-gather, reduce-scatter and a send/receive pair by bytes, over
  groups of each size that divides the ranks, all groups of a size at once;
- concurrency: one reference workload, a small MoE layer's operations (a linear layer, a grouped expert block
  and an element-wise pass, forward and backward), with 1, 2, ... of the ranks computing at once and the
  others idle: ranks that share a host's cores, caches and memory bus compute faster while some of them
  wait (a pipeline's fill and drain);
- compiled (`lcc calibrate --compiled`): the traced part of a reference layer (RMSNorm, the attention
  block, residuals, a dense SwiGLU: what `train.compile: inductor` compiles) forward and backward, eager and
  under torch.compile, by tokens, one call of each in turn; compiling happens before the timing.

Each point is timed in batches of calls; a point's figure is the median over ranks and batches, its spread
the 10th and 90th percentiles. A ladder stops at the first size after its FEWEST_POINTS whose call takes
longer than `LONGEST_CALL_S` or a quarter of a point's time (larger ones run at that rate); a call longer than
a point's time is timed twice.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

LINEAR_ROWS = (16, 64, 256, 1024, 4096, 16384)
LINEAR_WIDTHS = (256, 1024, 4096)
EXPERT_ROWS = (4, 16, 64, 256, 1024, 4096)
EXPERT_SHAPES = ((8, 256), (8, 512), (4, 1024))  # (experts, d_model = d_ff)
ATTENTION_SEQS = (64, 256, 1024, 4096)
ATTENTION_HEADS = ((8, 64), (8, 128))  # (heads, head_dim); key-value heads: half
ELEMENTWISE_BYTES = (1 << 14, 1 << 18, 1 << 22, 1 << 26)
OPTIMIZER_PARAMS = (1 << 16, 1 << 20, 1 << 23)
COLLECTIVE_BYTES = (1 << 10, 1 << 14, 1 << 18, 1 << 21, 1 << 23)
COLLECTIVES = ("all_reduce", "all_to_all", "all_gather", "reduce_scatter", "send_recv")
REFERENCE = {"rows": 256, "width": 512, "experts": 8, "expert_rows": 32, "bytes": 1 << 22}  # the concurrency probe
COMPILED_TOKENS = (256, 1024)  # one and four sequences of LAYER["seq"]
LAYER = {"width": 512, "heads": 8, "kv_heads": 4, "head_dim": 64, "seq": 256, "ffn": 1024}  # the compiled probe
LONGEST_CALL_S = 0.05
FEWEST_POINTS = 2
BATCHES = 5


class Clock:
    """Seconds per call, in batches, on one device (a GPU's stream is synchronised around each batch)."""

    def __init__(self, device: Any, seconds: float, barrier: Callable[[], None]):
        import torch

        self.sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        self.seconds, self.barrier, self.device = seconds, barrier, device

    def batches(self, fn: Callable[[], Any]) -> list[float]:
        """Per-call seconds of BATCHES batches after a warm-up call, together with the other ranks: every
        rank makes as many calls per batch as the slowest rank's first call allows in `seconds / BATCHES`."""
        import torch
        import torch.distributed as dist

        self.barrier()
        start = time.perf_counter()
        fn()
        self.sync()
        first = torch.tensor([time.perf_counter() - start], device=self.device)  # NCCL reduces device tensors
        if dist.is_initialized():
            dist.all_reduce(first, op=dist.ReduceOp.MAX)
        per_call = max(float(first), 1e-7)
        calls = max(1, int(self.seconds / BATCHES / per_call))
        batches = max(2, min(BATCHES, int(self.seconds / per_call)))  # a call longer than the budget: two
        out = []
        for _ in range(batches):
            self.barrier()
            start = time.perf_counter()
            for _ in range(calls):
                fn()
            self.sync()
            out.append((time.perf_counter() - start) / calls)
        return out


def _ladder(clock: Clock, sizes: tuple[int, ...], make: Callable[[int], Callable[[], Any]],
            key: Callable[[int], list[float]], also: Callable[[int], Callable[[], Any]] | None = None) -> list:
    """Time `make(size)` for each size until one call is longer than LONGEST_CALL_S. Each entry: key(size),
    then the batches' per-call seconds (and those of `also(size)`, the forward alone, first). Every rank
    stops at the same size."""
    import torch
    import torch.distributed as dist

    out = []
    for i, size in enumerate(sizes):
        fwd = clock.batches(also(size)) if also is not None else None
        total = clock.batches(make(size))
        out.append([*key(size), *([fwd] if fwd is not None else []), total])
        longest = torch.tensor([min(total)], device=clock.device)
        if dist.is_initialized():
            dist.all_reduce(longest, op=dist.ReduceOp.MAX)
        if float(longest) > min(LONGEST_CALL_S, clock.seconds / 4) and i + 1 >= FEWEST_POINTS:
            break
    return out


def _train(fn: Callable[[], Any], leaves: list[Any]) -> Callable[[], None]:
    """Forward and backward of fn (its output summed), gradients of `leaves` dropped after each call."""
    def call() -> None:
        fn().sum().backward()
        for t in leaves:
            t.grad = None
    return call


def compute_probes(clock: Clock, kind: Any, device: Any) -> dict[str, list]:
    import torch

    from lcc.model.moe import swiglu_segments
    from lcc.ops.layers import attention
    from lcc.runtime.step_figures import squared_norm

    def tensor(*shape: int, grad: bool = True) -> torch.Tensor:
        return torch.randn(*shape, dtype=kind, device=device).mul_(0.02).requires_grad_(grad)

    out: dict[str, list] = {"linear": [], "experts": [], "attention": []}
    for width in LINEAR_WIDTHS:
        w = tensor(width, width)

        def linear(rows: int, w: torch.Tensor = w, width: int = width) -> Callable[[], Any]:
            x = tensor(rows, width)
            return _train(lambda: x @ w.T, [x, w])

        def linear_forward(rows: int, w: torch.Tensor = w, width: int = width) -> Callable[[], Any]:
            x = tensor(rows, width)
            return lambda: x @ w.T

        out["linear"] += _ladder(clock, LINEAR_ROWS, linear, lambda r, width=width: [r, width, width],
                                 linear_forward)
    for experts, width in EXPERT_SHAPES:
        w1, w3, w2 = tensor(experts, width, width), tensor(experts, width, width), tensor(experts, width, width)

        def block(rows: int, experts: int = experts, width: int = width, w: tuple = (w1, w3, w2),
                  grad: bool = True) -> Callable[[], Any]:
            x = tensor(rows * experts, width)
            counts = torch.full((experts,), rows, dtype=torch.int64, device=device)
            fn = lambda: swiglu_segments(x, counts, *w)  # noqa: E731
            return _train(fn, [x, *w]) if grad else fn

        out["experts"] += _ladder(clock, EXPERT_ROWS, block, lambda r, e=experts, d=width: [e, r, d, d],
                                  lambda r, b=block: b(r, grad=False))
    for heads, head_dim in ATTENTION_HEADS:
        def core(seq: int, heads: int = heads, head_dim: int = head_dim, grad: bool = True) -> Callable[[], Any]:
            q = tensor(1, seq, heads * head_dim)
            k, v = tensor(1, seq, heads * head_dim // 2), tensor(1, seq, heads * head_dim // 2)
            fn = lambda: attention(q, k, v, head_dim, 10000.0)  # noqa: E731
            return _train(fn, [q, k, v]) if grad else fn

        out["attention"] += _ladder(clock, ATTENTION_SEQS, core, lambda s, h=heads, d=head_dim: [h, s, d],
                                    lambda s, c=core: c(s, grad=False))
    size = torch.tensor([], dtype=kind).element_size()

    def add(nbytes: int) -> Callable[[], Any]:
        x = torch.ones(max(1, nbytes // (3 * size)), dtype=kind, device=device)
        y = torch.zeros_like(x)
        return lambda: y.add_(x)

    out["elementwise"] = [[b, clock.batches(add(b))] for b in ELEMENTWISE_BYTES]

    def step(params: int) -> Callable[[], Any]:
        from types import SimpleNamespace

        from lcc.model.trainer import adamw
        from lcc.spec.models import Optimizer

        p = [torch.zeros(params, dtype=kind, device=device, requires_grad=True)]
        p[0].grad = torch.full_like(p[0], 1e-3)
        opt = adamw(SimpleNamespace(train=SimpleNamespace(optimizer=Optimizer())), p, [])

        def call() -> None:
            squared_norm(p[0].grad)  # the gradient norm the step takes first
            opt.step()
        return call

    out["optimizer"] = [[n, clock.batches(step(n))] for n in OPTIMIZER_PARAMS]
    x = tensor(8)

    def ops() -> None:
        y = x
        for _ in range(32):
            y = y * 1.0
        y.sum().backward()
        x.grad = None

    out["op"] = [t / dispatches(ops) for t in clock.batches(ops)]
    return out


def dispatches(fn: Callable[[], Any]) -> int:
    """The operations one call of fn dispatches to PyTorch's kernels (views included), forward and backward."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        calls = 0

        def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
            Count.calls += 1
            return func(*args, **(kwargs or {}))

    with Count():
        fn()
    return Count.calls


def collective_probes(clock: Clock, rank: int, world: int, device: Any) -> dict[str, dict[int, list]]:
    """Every collective by bytes per rank (a send/receive pair: the bytes each sends) over each group size
    that divides `world`: groups of consecutive ranks, all of a size at once."""
    import torch
    import torch.distributed as dist

    out: dict[str, dict[int, list]] = {name: {} for name in COLLECTIVES}
    for n in (s for s in range(2, world + 1) if world % s == 0):
        groups = [dist.new_group(list(range(g, g + n))) for g in range(0, world, n)]
        group, me = groups[rank // n], rank % n
        for name in COLLECTIVES:
            rows = []
            for nbytes in COLLECTIVE_BYTES:
                elements = max(n, nbytes // 4 // n * n)
                t = torch.ones(elements, device=device)
                o = torch.empty(elements * n if name == "all_gather" else elements // n if name == "reduce_scatter"
                                else elements, device=device)
                peer = dist.get_global_rank(group, me ^ 1) if me ^ 1 < n else None  # pairs: even places send first
                rows.append([elements * 4, clock.batches(_collective(name, t, o, group, peer, me % 2 == 0))])
            out[name][n] = rows
    return out


def _collective(name: str, t: Any, o: Any, group: Any, peer: int | None, first: bool) -> Callable[[], Any]:
    import torch.distributed as dist

    from lcc.ops import c10d

    if name == "all_reduce":
        return lambda: dist.all_reduce(t, group=group)
    if name == "all_to_all":
        return lambda: dist.all_to_all_single(o, t, group=group)
    if name == "all_gather":
        return lambda: c10d.all_gather_single(o, t, group=group)
    if name == "reduce_scatter":
        return lambda: c10d.reduce_scatter_single(o, t, group=group)
    return _pair(t, o, peer, first)


def _pair(t: Any, o: Any, peer: int | None, first: bool) -> Callable[[], None]:
    import torch.distributed as dist

    def call() -> None:
        if peer is None:
            return
        if first:
            dist.send(t, peer)
            dist.recv(o, peer)
        else:
            dist.recv(o, peer)
            dist.send(t, peer)
    return call


def concurrency_probe(clock: Clock, rank: int, world: int, kind: Any, device: Any) -> list[list]:
    """Per-call seconds of the reference workload (REFERENCE) on this rank with `busy` ranks (the first ones)
    computing it at once, for busy = 1 .. world: [busy, this rank's batches, or None where it stood idle]."""
    import torch

    from lcc.model.moe import swiglu_segments

    ref = REFERENCE
    width, experts = ref["width"], ref["experts"]

    def tensor(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, dtype=kind, device=device).mul_(0.02).requires_grad_(True)

    x, w, tokens = tensor(ref["rows"], width), tensor(width, width), tensor(experts * ref["expert_rows"], width)
    weights = [tensor(experts, width, width) for _ in range(3)]
    counts = torch.full((experts,), ref["expert_rows"], dtype=torch.int64, device=device)
    a = torch.ones(max(1, ref["bytes"] // (3 * x.element_size())), dtype=kind, device=device)
    b = torch.zeros_like(a)
    layer = _train(lambda: x @ w.T, [x, w])
    block = _train(lambda: swiglu_segments(tokens, counts, *weights), [tokens, *weights])

    def work() -> None:
        layer()
        block()
        b.add_(a)

    longer = Clock(clock.device, 5 * clock.seconds, clock.barrier)  # batches long enough to share the cores fairly
    out = []
    for busy in range(1, world + 1):
        times = longer.batches(work if rank < busy else (lambda: None))
        out.append([busy, times if rank < busy else None])
    return out


def compiled_probe(clock: Clock, kind: Any, device: Any, backend: str = "inductor") -> list[list]:
    """[tokens, eager batches, compiled batches] of the reference layer's traced part (LAYER) at each of
    COMPILED_TOKENS, forward and backward; `backend` is torch.compile's."""
    import torch

    from lcc.runtime.compiled import prepare_inductor

    prepare_inductor()
    compiled = torch.compile(traced_layer, backend=backend, dynamic=False)
    d, f, hd = LAYER["width"], LAYER["ffn"], LAYER["head_dim"]

    def tensor(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, dtype=kind, device=device).mul_(0.02).requires_grad_(True)

    weights = [tensor(d), tensor(LAYER["heads"] * hd, d), tensor(LAYER["kv_heads"] * hd, d),
               tensor(LAYER["kv_heads"] * hd, d), tensor(d, LAYER["heads"] * hd), tensor(d), tensor(f, d),
               tensor(f, d), tensor(d, f)]
    out = []
    for tokens in COMPILED_TOKENS:
        x = tensor(tokens // LAYER["seq"], LAYER["seq"], d)
        eager = _train(lambda x=x: traced_layer(x, *weights), [x, *weights])
        fast = _train(lambda x=x: compiled(x, *weights), [x, *weights])
        fast()  # compiles (each rank on its own), outside the timing
        out.append([tokens, *_alternating(clock, eager, fast)])
    return out


def _alternating(clock: Clock, a: Callable[[], Any], b: Callable[[], Any]) -> tuple[list[float], list[float]]:
    """Seconds of single calls of `a` and of `b`, one after the other in each round (so that a shared
    machine's load weighs on both alike), every rank in step: as many rounds as 5 x `clock.seconds` allows
    (BATCHES at least)."""
    import torch
    import torch.distributed as dist

    def timed(fn: Callable[[], Any]) -> float:
        start = time.perf_counter()
        fn()
        clock.sync()
        return time.perf_counter() - start

    clock.barrier()
    first = torch.tensor([timed(a) + timed(b)], device=clock.device)
    if dist.is_initialized():
        dist.all_reduce(first, op=dist.ReduceOp.MAX)
    rounds = max(BATCHES, int(5 * clock.seconds / max(float(first), 1e-7)))
    ta, tb = [], []
    for _ in range(rounds):
        clock.barrier()
        ta.append(timed(a))
        tb.append(timed(b))
    return ta, tb


def traced_layer(x: Any, norm1: Any, wq: Any, wk: Any, wv: Any, wo: Any, norm2: Any, w1: Any, w3: Any,
                 w2: Any) -> Any:
    """A dense layer as a program's traced ops compute it (lcc.ops.layers): what a compiled region holds."""
    import torch.nn.functional as F

    from lcc.ops.layers import attention, linear, rms_norm

    h = rms_norm(x, norm1, 1e-5)
    x = x + linear(attention(linear(h, wq), linear(h, wk), linear(h, wv), LAYER["head_dim"], 10000.0), wo)
    h = rms_norm(x, norm2, 1e-5)
    return x + linear(F.silu(linear(h, w1)) * linear(h, w3), w2)


def summary(samples: list[list[float]]) -> list[float]:
    """[median, 10th percentile, 90th percentile] over every rank's batches of one point."""
    flat = sorted(x for rank in samples for x in rank)
    at = lambda q: flat[min(len(flat) - 1, int(q * (len(flat) - 1) + 0.5))]  # noqa: E731
    return [statistics.median(flat), at(0.1), at(0.9)]
