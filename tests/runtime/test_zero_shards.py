"""ZeRO pieces of uneven size: gathered, prefetched and reduce-scattered correctly on three gloo ranks,
by the programs' gathers and by the runtime's gradient buckets."""

from __future__ import annotations

import contextlib
import os
import types

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lcc.ops import ProgramContext, offload_gathered, zero_gather, zero_prefetch
from lcc.ops.zero import chunk_size, shard_flat
from lcc.plan.types import GradBucket, Parameter, Zero
from lcc.runtime.grad_sync import GradSync
from lcc.runtime.rendezvous import host_store, join_group
from lcc.runtime.zero import ZeroLayout

SHAPES = {"v": [7], "m": [5, 3], "tiny": [2]}  # 7 and 15 elements over 3 ranks; 2 elements: one rank gets none


def test_pieces_cover_the_tensor_once():
    t = torch.arange(7.0)
    pieces = [shard_flat(t, 3, i) for i in range(3)]
    assert [p.tolist() for p in pieces] == [[0, 1, 2], [3, 4, 5], [6, 0, 0]]
    assert chunk_size(2, 3) == 1 and shard_flat(torch.ones(2), 3, 2).tolist() == [0.0]



@pytest.mark.parametrize("experts, per, parts", [(4, 6, 3), (3, 5, 4), (2, 3, 5), (5, 2, 2)])
def test_expert_factors_scale_each_piece_as_the_whole(experts, per, parts):
    # pieces that start and end inside an expert, cover several, or are only padding
    meta = {"w": Parameter(name="w", global_shape=[experts, per], local_shape=[experts, per], stages=[0], expert=True,
                           zero=Zero("edp", parts))}
    factors = torch.arange(1.0, experts + 1, dtype=torch.float64) / 7
    whole = torch.randn(experts, per, dtype=torch.float64)
    expected = whole * factors.view(-1, 1)  # each expert's rows by its factor
    for index in range(parts):
        layout = ZeroLayout(meta, {"edp": index}, None)
        grad = shard_flat(whole, parts, index).clone()
        grad[(layout.bounds("w")[1] - layout.bounds("w")[0]):] = 5.0  # padding, whatever it held
        layout.scale_experts("w", grad, factors)
        assert torch.equal(grad, shard_flat(expected, parts, index))

def _rank(rank: int, port: int, errors: str) -> None:
    try:
        join_group("gloo", rank, 3, 60, port)
        full = {n: torch.arange(float(torch.Size(s).numel())).view(s) + 10 * i
                for i, (n, s) in enumerate(SHAPES.items())}
        P = {n: torch.nn.Parameter(shard_flat(t, 3, rank)) for n, t in full.items()}
        G = types.SimpleNamespace(dp=dist.group.WORLD)
        spec = {n: ("dp", s) for n, s in SHAPES.items()}
        for prefetch in (False, True):
            ctx = ProgramContext(routing=None)
            if prefetch:
                zero_prefetch(P, spec, G, ctx)
            with offload_gathered():
                W = zero_gather(P, spec, G, ctx)
                assert all(torch.equal(W[n], full[n]) for n in SHAPES)
                loss = sum(((rank + 1) * W[n] * W[n]).sum() for n in SHAPES)  # saves the gathered copies
            del W
            for p in P.values():
                p.grad = None
            loss.backward()  # re-gathers what the multiplications saved, reduce-scatters the gradients
            for n, t in full.items():
                expected = shard_flat(2 * t * (1 + 2 + 3), 3, rank)  # d/dW of sum_r (r+1) W^2
                assert torch.equal(P[n].grad, expected), (n, P[n].grad, expected)
        meta = {n: Parameter(n, list(s), list(s), [0], zero=Zero("dp", 3)) for n, s in SHAPES.items()}
        layout = ZeroLayout(meta, {"dp": rank}, G)
        for n, t in full.items():
            assert torch.equal(layout.unshard(n, shard_flat(t, 3, rank)), t)
        # the gradient buckets: reduce-scattered into uneven pieces (in each of two backwards, or once after
        # both), or all-reduced whole; d/dW of sum_r (r + 1) W^2 twice is 2 W x 6 x 2
        names = list(SHAPES)
        for op, when in (("reduce_scatter", "microbatch"), ("reduce_scatter", "step"), ("all_reduce", "step")):
            W = {n: torch.nn.Parameter(t.clone()) for n, t in full.items()}
            role = types.SimpleNamespace(grad_buckets=[GradBucket(op, ["dp"], names, 0, when)], forward=[], backward=[])
            sync = GradSync({0: role}, W, lambda axis: G.dp, lambda n: 3)
            for final in (False, True):
                sync.begin(0, final)
                sum(((rank + 1) * W[n] * W[n]).sum() for n in names).backward()
                sync.after_backward()
            sync.reduce_grad(0)
            reduced = sync.take()
            for n, t in full.items():
                want = 2 * t * 6 * 2
                assert torch.equal(reduced[n], shard_flat(want, 3, rank) if op == "reduce_scatter" else want), (
                    op, when, n)
    except Exception:
        import traceback

        with open(os.path.join(errors, f"rank{rank}.txt"), "w") as f:
            f.write(traceback.format_exc())
        raise
    finally:
        if dist.is_initialized():
            with contextlib.suppress(Exception):  # every rank done with its collectives before any tears down
                dist.barrier()
            dist.destroy_process_group()
    # everything checked and torn down: leave without the interpreter's own teardown, where gloo's threads
    # have aborted the process once in a full suite ("terminate called without an active exception")
    os._exit(0)


@pytest.mark.timeout(120)
def test_uneven_pieces_on_three_ranks(tmp_path):
    store = host_store()
    context = mp.start_processes(_rank, args=(store.port, str(tmp_path)), nprocs=3, join=False, start_method="spawn")
    try:
        while not context.join(timeout=100):
            pass
    except mp.ProcessRaisedException:
        pytest.fail("\n".join(p.read_text() for p in sorted(tmp_path.glob("rank*.txt"))))


def test_buckets_wait_only_for_earlier_buckets_of_their_own_group(monkeypatch):
    """Buckets are issued in the plan's order per process group as their gradients complete; a bucket of
    another group does not wait for them; one on a group the program itself uses waits for the end of
    backward (REDUCE_GRAD)."""
    x, y, tp = object(), object(), object()
    groups = {"dp": x, "edp": y, "tp": tp}
    W = {n: torch.nn.Parameter(torch.ones(3)) for n in ("a", "b", "c", "d")}
    buckets = [GradBucket("all_reduce", ["dp"], ["a"], 3), GradBucket("all_reduce", ["dp"], ["b"], 3),
               GradBucket("all_reduce", ["edp"], ["c"], 3), GradBucket("all_reduce", ["tp"], ["d"], 3)]
    uses_tp = [types.SimpleNamespace(axis="tp")]
    role = types.SimpleNamespace(grad_buckets=buckets, forward=uses_tp, backward=[])
    sync = GradSync({0: role}, W, groups.get, lambda n: 1)
    issued = []
    monkeypatch.setattr(sync, "_start", lambda i, b: issued.append(i))
    sync.begin(0, final=True)
    for name, after in (("c", [2]), ("b", [2]), ("d", [2]), ("a", [2, 0, 1])):
        W[name].sum().backward()  # one gradient completes
        assert issued == after, name
    sync._issue(complete_only=False)  # REDUCE_GRAD: what is left
    assert issued == [2, 0, 1, 3]
