"""lcc's native CPU router (csrc/routing.cpp) against the torch routing-table path it replaces
(lcc.ops.serve.RoutingTables, the reference routing with serving's settings): the same experts, k(x),
masks and counts, gates within float32 rounding, for every routing setting a spec can choose; and the used
slots it sorts by expert are those a stable sort by expert gives."""

from __future__ import annotations

import pytest
import torch
from lcc.backends.cpu import native

from lcc.ops import serve
from lcc.ops.serve import RoutingTables
from lcc.spec.models import Routing

if native.unavailable() is not None:
    pytest.skip(f"lcc's native CPU kernels cannot run here: {native.unavailable()}", allow_module_level=True)

SETTINGS = {
    "least loaded, k 1-4 by threshold": dict(k={"min": 1, "max": 4, "threshold": 0.5}),
    "top score, sigmoid scores": dict(score="sigmoid", experts={"selection": "top_score"}, k={"min": 1, "max": 2}),
    "renormalised and scaled gates": dict(renormalize=True, gate_scale=2.5, k={"min": 2, "max": 3, "threshold": 0.3}),
    "one group kept, sharp temperature": dict(groups={"top": 1, "temperature": 0.05}, k={"min": 1, "max": 2}),
}


def counted_native_route(monkeypatch) -> list[int]:
    """Counts the native router's calls from RoutingTables (one entry per call), so that a comparison of the two
    paths cannot quietly compare the torch path with itself."""
    calls, real = [], serve.native_route

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(serve, "native_route", counted)
    return calls


def tables(settings: dict, G: int, P: int, D: int, native_router: bool, seed: int = 0) -> RoutingTables:
    g = torch.Generator().manual_seed(seed)
    groups = {"top": 2, "temperature": 0.2, **settings.get("groups", {})}
    cfg = Routing.model_validate({**settings, "groups": groups})
    centroids, weight = torch.randn(G, D, generator=g), torch.randn(G * P, D, generator=g) / D**0.5
    bias = torch.randn(G * P, generator=g, dtype=torch.float64) * 1e-2
    return RoutingTables(centroids, weight, bias, cfg, native=native_router)


@pytest.mark.parametrize("name", list(SETTINGS))
@pytest.mark.parametrize("shape", [(4, 4, 64), (8, 16, 40)])  # (groups, experts per group, d_model); 40: a tail
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_native_decisions_equal_the_torch_path(name, shape, dtype, monkeypatch):
    G, P, D = shape
    torch_path, native_path = (tables(SETTINGS[name], G, P, D, n) for n in (False, True))
    x = torch.randn(37, D, generator=torch.Generator().manual_seed(1)).to(dtype)
    calls = counted_native_route(monkeypatch)
    want = torch_path.route(x)
    assert calls == []
    got = native_path.route(x)
    assert calls == [1]
    for field in ("experts_TK", "mask_TK", "k_T", "counts_E", "load_E"):
        assert torch.equal(getattr(got, field), getattr(want, field)), field
    assert got.gates_TK.dtype == want.gates_TK.dtype
    torch.testing.assert_close(got.gates_TK, want.gates_TK, rtol=1e-5, atol=1e-6)
    assert int(got.dropped) == 0 and float(got.aux_loss) == 0 and float(got.z_loss) == 0
    assert want.slots_S is None
    token_S, gate_S = got.slots_S
    # the oracle: every used slot as (expert, token, slot), sorted; then its token and gate
    used = sorted((int(got.experts_TK[t, j]), t, j) for t in range(x.shape[0]) for j in range(got.experts_TK.shape[1])
                  if got.mask_TK[t, j])
    assert token_S.tolist() == [t for _, t, _ in used]
    assert torch.equal(gate_S, torch.stack([got.gates_TK[t, j] for _, t, j in used]))


def test_equal_scores_rank_the_lower_expert_first(monkeypatch):
    """Identical router rows: every candidate ties, and both paths keep the lowest ids."""
    G, P, D = 2, 4, 16
    t = {n: tables({"experts": {"selection": "top_score"}, "k": {"min": 2, "max": 2}}, G, P, D, n) for n in (0, 1)}
    for r in t.values():
        r.weight_ED[:] = 1.0
        r.w_GPD = r.weight_ED.view(G, P, D)
    x = torch.ones(3, D)
    calls = counted_native_route(monkeypatch)
    want, got = t[0].route(x), t[1].route(x)
    assert calls == [1]
    assert torch.equal(got.experts_TK, want.experts_TK)


def test_float64_tables_stay_on_the_torch_path():
    r = tables(SETTINGS["least loaded, k 1-4 by threshold"], 4, 4, 32, True)
    wide = RoutingTables(r.centroids_GD.double(), r.weight_ED.double(), r.bias_E, r.cfg, native=True)
    assert r.native and not wide.native
