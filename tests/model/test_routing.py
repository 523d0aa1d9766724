from __future__ import annotations

import pytest
import torch

from lcc.model.routing import Router, stable_topk
from lcc.spec.models import MoE, Routing


def router(groups=2, per_group=2, top=1, kmin=1, kmax=2, threshold=0.5, selection="least_loaded", renorm=False,
           d=2):
    moe = MoE(n_experts=groups * per_group, n_groups=groups, expert_d_ff=4)
    cfg = Routing(groups={"top": top, "temperature": 1.0}, experts={"selection": selection},
                  k={"min": kmin, "max": kmax, "threshold": threshold}, renormalize=renorm,
                  gate_scale=2.0 if renorm else 1.0)
    r = Router(d, moe, cfg, dtype=torch.float64)
    with torch.no_grad():
        r.centroids_GD.zero_()
        r.weight_ED.zero_()
    return r


def test_stable_topk_breaks_ties_by_lower_index():
    values, index = stable_topk(torch.tensor([[1.0, 3.0, 3.0, 0.5, 3.0]]), 2)
    assert index.tolist() == [[1, 2]]


def test_cosine_group_choice():
    r = router(groups=3, per_group=2, top=1)
    with torch.no_grad():
        r.centroids_GD.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]], dtype=torch.float64) * 5)
    x = torch.tensor([[0.1, 2.0], [-3.0, 0.2], [4.0, 4.1]], dtype=torch.float64)  # scale does not matter
    kept, q = r.group_scores(x)
    assert kept[:, 0].tolist() == [1, 2, 1]
    assert torch.allclose(q, torch.ones_like(q))


def test_group_tie_keeps_lower_index():
    r = router(groups=2, per_group=2, top=1)
    with torch.no_grad():
        r.centroids_GD.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64))
    kept, _ = r.group_scores(torch.tensor([[1.0, 1.0]], dtype=torch.float64))
    assert kept.tolist() == [[0]]


def test_k_follows_probability_mass():
    # one group of 4 experts; logits give pi = [0.5, 0.25, 0.125, 0.125]
    r = router(groups=1, per_group=4, kmax=4)
    with torch.no_grad():
        r.centroids_GD.fill_(1.0)
        r.weight_ED[:, 0] = torch.log(torch.tensor([4.0, 2.0, 1.0, 1.0], dtype=torch.float64))
    x = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    for threshold, k in [(0.4, 1), (0.5, 1), (0.6, 2), (0.75, 2), (0.8, 3), (1.0, 4)]:
        r.cfg = r.cfg.model_copy(update={"k": r.cfg.k.model_copy(update={"threshold": threshold})})
        out = r(x)
        assert int(out.k_T[0]) == k, threshold
        assert out.mask_TK[0].tolist() == [i < k for i in range(4)]
        assert out.experts_TK[0, :k].tolist() == list(range(k))
        torch.testing.assert_close(out.gates_TK[0].sum(), torch.tensor([0.5, 0.25, 0.125, 0.125])[:k].sum()
                                   .to(torch.float64))


def test_k_clamped_to_min_and_max():
    r = router(groups=1, per_group=4, kmin=2, kmax=3, threshold=0.1)
    x = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    assert int(r(x).k_T[0]) == 2  # uniform pi = 0.25 reaches 0.1 at k=1, clamped up to 2
    r.cfg = r.cfg.model_copy(update={"k": r.cfg.k.model_copy(update={"threshold": 1.0})})
    assert int(r(x).k_T[0]) == 3  # mass 1.0 needs 4, clamped down to 3


def test_least_loaded_wins_ties_and_near_ties():
    r = router(groups=1, per_group=4, kmax=1, threshold=1.0)
    x = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    assert r(x).experts_TK[0, 0] == 0  # exact tie: lower index
    r.update_bias(torch.tensor([10.0, 0.0, 10.0, 10.0]))  # expert 1 was idle
    assert r(x).experts_TK[0, 0] == 1
    with torch.no_grad():  # a near-tie that favours expert 0 by less than the bias step
        r.weight_ED[0, 0] = 1e-4
    assert r(x).experts_TK[0, 0] == 1
    top = router(groups=1, per_group=4, kmax=1, threshold=1.0, selection="top_score")
    top.bias_E.copy_(r.bias_E)
    with torch.no_grad():
        top.weight_ED[0, 0] = 1e-4
    assert top(x).experts_TK[0, 0] == 0  # top_score ignores the bias


def test_bias_update_is_sign_of_load_gap():
    r = router(groups=1, per_group=4)
    r.update_bias(torch.tensor([4.0, 1.0, 2.5, 2.5]))
    assert r.bias_E.tolist() == [-1e-3, 1e-3, 0.0, 0.0]


def test_renormalized_gates_sum_to_gate_scale():
    r = router(groups=2, per_group=3, top=2, kmax=3, threshold=0.7, renorm=True, d=4)
    with torch.no_grad():
        r.centroids_GD.normal_(generator=torch.Generator().manual_seed(0))
        r.weight_ED.normal_(generator=torch.Generator().manual_seed(1))
    out = r(torch.randn(20, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(2)))
    torch.testing.assert_close(out.gates_TK.sum(-1), torch.full((20,), 2.0, dtype=torch.float64))
    assert (out.gates_TK[~out.mask_TK] == 0).all()


def test_only_kept_groups_are_scored():
    r = router(groups=4, per_group=2, top=1, d=4)
    x = torch.randn(6, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        r.centroids_GD.normal_(generator=torch.Generator().manual_seed(1))
        r.weight_ED.normal_(generator=torch.Generator().manual_seed(2))
    kept, _ = r.group_scores(x)
    z = r.expert_logits(x, kept)
    for t in range(6):
        g = int(kept[t, 0])
        torch.testing.assert_close(z[t, 0], r.weight_ED[g * 2:(g + 1) * 2] @ x[t])


@pytest.mark.parametrize("skewed", [False, True])
def test_group_major_paths_equal_direct_scoring(skewed):
    r = router(groups=8, per_group=3, top=2, d=4)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 4, dtype=torch.float64, generator=g)
    with torch.no_grad():
        r.weight_ED.normal_(generator=g)
    if skewed:  # every token keeps groups 0 and 1; the other groups have no tokens
        kept = torch.tensor([[0, 1]] * 40)
    else:
        kept = torch.sort(torch.stack([torch.randperm(8, generator=g)[:2] for _ in range(40)]), dim=-1).values
    z = r.expert_logits(x, kept)
    for t in range(40):
        for j in range(2):
            gid = int(kept[t, j])
            torch.testing.assert_close(z[t, j], r.weight_ED[gid * 3:(gid + 1) * 3] @ x[t])


def test_split_unit_balance_losses_add_up_to_the_unit():
    """A unit's tokens split over two ranks (tp): with the counts summed over the halves (what
    ops.unit_balance all-reduces), the halves' Switch losses and their gradients add up to the unit's."""
    from lcc.model.routing import balance_loss_from, route
    from lcc.ops.moe import unit_balance

    moe = MoE(n_experts=12, n_groups=3, expert_d_ff=4)
    cfg = Routing(groups={"top": 2, "temperature": 0.5}, k={"min": 1, "max": 3, "threshold": 0.6},
                  balance={"aux_loss_coef": 0.01})
    r = Router(8, moe, cfg, dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        r.centroids_GD.normal_(generator=g)
        r.weight_ED.normal_(generator=g)
        r.bias_E.normal_(generator=g).mul_(0.01)
    x = torch.randn(40, 8, dtype=torch.float64, generator=g)
    params = [r.centroids_GD, r.weight_ED]

    def run(x_TD):
        return route(x_TD, r.centroids_GD, r.weight_ED, r.bias_E, cfg)

    whole = run(x)
    halves = [run(x[:20]), run(x[20:])]
    counts = halves[0].balance_counts + halves[1].balance_counts  # the all-reduce, without a process group
    assert torch.equal(counts, whole.balance_counts)
    assert counts[-1] == 40 and counts[-2] == whole.mask_TK.sum() and counts[:-2].sum() == counts[-2]
    assert not counts.requires_grad and whole.pi_sum_E.requires_grad
    shares = [balance_loss_from(counts, h.pi_sum_E, 12) for h in halves]
    torch.testing.assert_close(shares[0] + shares[1], whole.aux_loss, rtol=1e-13, atol=0)
    own = halves[0].aux_loss.detach() + halves[1].aux_loss.detach()  # each half with its own counts
    assert abs(float(own - whole.aux_loss.detach())) > 1e-6  # is not the unit's loss
    grads_whole = torch.autograd.grad(whole.aux_loss, params)
    grads_split = torch.autograd.grad(shares[0] + shares[1], params)
    for a, b in zip(grads_split, grads_whole, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-15)
    # a single rank (or no process group) leaves the result as it is
    assert unit_balance(whole, None) is whole


def test_balance_terms_only_when_the_loss_is_used():
    r = router(groups=2, per_group=2)
    out = r(torch.randn(5, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0)))
    assert out.balance_counts is None and out.pi_sum_E is None and out.aux_loss == 0
