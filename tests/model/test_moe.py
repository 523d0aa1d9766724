from __future__ import annotations

import pytest
import torch

from lcc.model.moe import MoEBlock
from lcc.model.shaping import shape_expert_grads
from lcc.spec.models import MoE, Routing
from tests.model.naive import naive_moe


def make_block(n_shared=0, capacity=None, score="softmax", selection="least_loaded", renormalize=False, seed=0,
               kmin=1, kmax=3, threshold=0.5, dtype=torch.float32, sets=1, max_sets=None):
    moe = MoE(n_experts=12, n_groups=4, expert_d_ff=8, n_shared_experts=n_shared)
    routing = Routing(score=score, groups={"top": 2, "temperature": 0.5, "sets": sets, "max_sets": max_sets},
                      experts={"selection": selection},
                      k={"min": kmin, "max": kmax, "threshold": threshold}, renormalize=renormalize,
                      capacity_factor=capacity, gate_scale=1.5)
    block = MoEBlock(16, moe, routing, dtype=dtype)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in block.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=dtype) * 0.5)
        block.router.bias_E.copy_(torch.randn(12, generator=g, dtype=torch.float64) * 0.02)
    return block


CONFIGS = {
    "plain": {},
    "shared": {"n_shared": 2},
    "capacity": {"capacity": 1.0},
    "capacity_shared_renorm": {"capacity": 0.75, "n_shared": 1, "renormalize": True},
    "sigmoid_topscore": {"score": "sigmoid", "selection": "top_score"},
    "fixed_k": {"kmin": 2, "kmax": 2},
    "node_limited": {"sets": 2, "max_sets": 1},  # 2 sets of 2 groups: a token's groups both from its best set
}


def assert_rel(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-6) -> None:
    """Norm-relative error: ||a - b|| <= tol * ||b|| (exact zeros must match exactly)."""
    err, ref = (a - b).norm().item(), b.norm().item()
    assert err <= tol * ref or err == 0.0, f"relative error {err / max(ref, 1e-300):.3g}"


@pytest.mark.parametrize("name", list(CONFIGS))
def test_block_equals_naive_loop_forward_and_backward(name):
    block = make_block(**CONFIGS[name])
    x = torch.randn(40, 16, generator=torch.Generator().manual_seed(1), requires_grad=True)
    y = block(x.unsqueeze(0))[0]
    x2 = x.detach().clone().requires_grad_(True)
    y_ref, chosen = naive_moe(block, x2)
    assert_rel(y, y_ref)
    w = torch.randn_like(y)
    grads = torch.autograd.grad((y * w).sum(), [x, *block.parameters()], allow_unused=True)
    grads_ref = torch.autograd.grad((y_ref * w).sum(), [x2, *block.parameters()], allow_unused=True)
    for a, b in zip(grads, grads_ref, strict=True):
        if a is None or b is None:
            assert (a is None or not a.abs().any()) and (b is None or not b.abs().any())
            continue
        assert_rel(a, b)
    stats = block.last_stats
    assert stats.load_E.sum() == sum(len(c) for c in chosen)
    if "capacity" in name:
        assert stats.dropped == int(stats.k_T.sum()) - sum(len(c) for c in chosen)


def test_node_limited_routing_keeps_each_token_in_its_best_sets():
    """sets 4 (one group each), max_sets 2, top 2: the same as unlimited (the best 2 sets are the best 2
    groups); sets 2, max_sets 1: every token's experts in one set, chosen by the set's best group, and some
    tokens route differently from unlimited routing."""
    x = torch.randn(64, 16, generator=torch.Generator().manual_seed(4))
    unlimited = make_block().router(x)
    same = make_block(sets=4, max_sets=2).router(x)
    assert torch.equal(same.experts_TK, unlimited.experts_TK) and torch.equal(same.gates_TK, unlimited.gates_TK)
    limited = make_block(sets=2, max_sets=1).router(x)
    per_set = 12 // 2
    used = limited.experts_TK.masked_fill(~limited.mask_TK, -1)
    for t in range(64):
        sets = {int(e) // per_set for e in used[t] if e >= 0}
        assert len(sets) == 1, (t, used[t])
    assert not torch.equal(limited.experts_TK, unlimited.experts_TK)


def test_gradient_shaping_two_experts():
    moe = MoE(n_experts=2, n_groups=1, expert_d_ff=4)
    routing = Routing(groups={"top": 1}, experts={"selection": "top_score"}, k={"min": 1, "max": 1})
    block = MoEBlock(8, moe, routing, dtype=torch.float64)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in block.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64))
    x = torch.randn(10, 8, generator=g, dtype=torch.float64)
    block(x.unsqueeze(0)).sum().backward()
    route = block.router(x)
    e_T, gate_T = route.experts_TK[:, 0], route.gates_TK[:, 0]
    n = torch.bincount(e_T, minlength=2).to(torch.float64)
    assert (n > 0).all()
    ex = block.experts
    # analytic: d sum(y) / d w2[e] = sum over e's tokens of gate * h^T, with h = silu(w1 x) * (w3 x)
    expected = torch.zeros_like(ex.w2_EDF)
    for t in range(10):
        e = int(e_T[t])
        h = torch.nn.functional.silu(ex.w1_EFD[e] @ x[t]) * (ex.w3_EFD[e] @ x[t])
        expected[e] += gate_T[t].detach() * torch.ones(8, 1, dtype=torch.float64) * h.detach().unsqueeze(0)
    torch.testing.assert_close(ex.w2_EDF.grad, expected)
    shape_expert_grads(ex, block.last_stats.load_E, total_tokens=10)
    torch.testing.assert_close(ex.w2_EDF.grad, expected * (10 / n).view(2, 1, 1))


def test_unrouted_expert_gradient_stays_zero():
    block = make_block()
    x = torch.randn(3, 16, generator=torch.Generator().manual_seed(5))
    block(x.unsqueeze(0)).sum().backward()
    load = block.last_stats.load_E
    assert (load == 0).any()
    shape_expert_grads(block.experts, load, total_tokens=3)
    assert not block.experts.w1_EFD.grad[load == 0].any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_and_loop_expert_paths_agree(dtype):
    from lcc.model.moe import grouped_mm_ok, swiglu_grouped, swiglu_loop

    g = torch.Generator().manual_seed(0)
    E, D, Fd = 6, 32, 16
    ws = [(torch.randn(E, Fd, D, generator=g) * 0.1).to(dtype).requires_grad_() for _ in range(2)]
    w2 = (torch.randn(E, D, Fd, generator=g) * 0.1).to(dtype).requires_grad_()
    x = torch.randn(20, D, generator=g).to(dtype).requires_grad_()
    counts = [5, 0, 7, 0, 8, 0]  # empty experts included
    assert grouped_mm_ok(x, ws[0], w2)
    outs, grads = [], []
    for fn in (swiglu_grouped, swiglu_loop):
        y = fn(x, counts, ws[0], ws[1], w2)
        y.sum().backward()  # an expanded incoming gradient
        outs.append(y.detach().float())
        grads.append([t.grad.float().clone() for t in (x, *ws, w2)])
        for t in (x, *ws, w2):
            t.grad = None
    tol = 1e-6 if dtype == torch.float32 else 2e-2
    assert_rel(outs[0], outs[1], tol)
    for a, b in zip(grads[0], grads[1], strict=True):
        assert_rel(a, b, tol)


def test_balance_and_z_losses_per_unit():
    block = make_block(capacity=1.0)
    cfg = block.router.cfg
    block.router.cfg = cfg.model_copy(update={"balance": cfg.balance.model_copy(
        update={"aux_loss_coef": 0.01, "z_loss_coef": 0.001})})
    x = torch.randn(30, 16, generator=torch.Generator().manual_seed(4))
    block(x.unsqueeze(0))
    _, chosen = naive_moe(block, x)
    E = 12
    f = torch.zeros(E)
    for slots in chosen:
        for e, _ in slots:
            f[e] += 1
    f = f / f.sum()
    P = naive_moe.pi_TE.mean(0)
    stats = block.last_stats
    torch.testing.assert_close(stats.aux_loss.detach(), E * (f * P.float()).sum(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(stats.z_loss.detach(), naive_moe.lse_T.detach().pow(2).mean(), rtol=1e-5, atol=1e-6)


def test_losses_skipped_when_unused():
    block = make_block()
    block(torch.randn(1, 5, 16))
    assert block.last_stats.aux_loss.item() == 0 and block.last_stats.z_loss.item() == 0


def test_empty_input():
    block = make_block()
    x = torch.zeros(0, 1, 16, requires_grad=True)
    y = block(x)
    assert y.shape == (0, 1, 16)
    y.sum().backward()


def test_experts_compute_in_the_autocast_dtype():
    """Under bfloat16 autocast the experts' grouped matmuls run in bfloat16, as autocast runs a matmul;
    their float32 weights get float32 gradients."""
    from lcc.model.moe import swiglu_segments

    g = torch.Generator().manual_seed(0)
    E, D, Fd = 4, 32, 16
    ws = [(torch.randn(E, Fd, D, generator=g) * 0.1).requires_grad_() for _ in range(2)]
    w2 = (torch.randn(E, D, Fd, generator=g) * 0.1).requires_grad_()
    x = torch.randn(12, D, generator=g)
    counts = torch.tensor([5, 0, 3, 4])
    want = swiglu_segments(x, counts, ws[0], ws[1], w2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = swiglu_segments(x, counts, ws[0], ws[1], w2)
    assert want.dtype == torch.float32 and got.dtype == torch.bfloat16
    assert_rel(got.float(), want.detach(), 2e-2)
    got.float().sum().backward()
    assert ws[0].grad.dtype == torch.float32 and ws[0].grad.abs().sum() > 0
