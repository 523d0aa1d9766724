from __future__ import annotations

import pytest
import torch

from lcc.model import build_model, init_values
from lcc.spec import load_spec
from tests.conftest import SPECS


@pytest.fixture(scope="module")
def tiny():
    return load_spec(SPECS / "tiny-moe.yaml")


def test_longcat_builds_on_meta():
    model = build_model(load_spec(SPECS / "longcat-2.0.yaml"), device="meta")
    n = sum(p.numel() for p in model.parameters())
    assert n == pytest.approx(1.6e12, rel=0.03)
    assert all(p.device.type == "meta" for p in model.parameters())
    w1 = model.layers[0].ffn.experts.w1_EFD
    assert tuple(w1.shape) == (16000, 256, 4096)  # stacked, not one module per expert


def test_parameter_built_twice_is_bitwise_equal(tiny):
    a, b = build_model(tiny), build_model(tiny)
    for (name, p), (_, q) in zip(a.named_parameters(), b.named_parameters(), strict=True):
        assert torch.equal(p, q), name


def test_expert_slice_equals_rows_of_the_full_tensor(tiny):
    model = build_model(tiny)
    name = "layers.1.ffn.experts.w1_EFD"
    full = dict(model.named_parameters())[name]
    part = init_values(tiny, name, tuple(full.shape), full.dtype, experts=range(16, 32))
    assert torch.equal(part, full[16:32].detach())


def test_values_depend_on_seed_and_name(tiny):
    shape = (8, 8)
    a = init_values(tiny, "layers.0.ffn.router.weight_ED", shape, torch.float32)
    b = init_values(tiny, "layers.1.ffn.router.weight_ED", shape, torch.float32)
    c = init_values(tiny.model_copy(update={"seed": 1}), "layers.0.ffn.router.weight_ED", shape, torch.float32)
    assert not torch.equal(a, b) and not torch.equal(a, c)


def test_init_statistics(tiny):
    model = build_model(tiny)
    w1 = model.layers[0].ffn.experts.w1_EFD.detach()
    assert w1.std().item() == pytest.approx((2 / tiny.model.d_model) ** 0.5, rel=0.05)  # He-normal, fan_in D
    wq = model.layers[0].attn.wq.weight.detach().double()
    torch.testing.assert_close(wq @ wq.T, torch.eye(wq.shape[0], dtype=torch.float64), atol=1e-5, rtol=0)
    assert model.layers[0].attn_norm.weight.detach().eq(1).all()
    assert model.embed.weight.std().item() == pytest.approx(tiny.train.init.std, rel=0.05)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_forward_backward_in_each_precision(tiny, dtype):
    model = build_model(tiny, dtype=dtype)
    tokens = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(0))
    logits = model(tokens)
    assert logits.dtype == dtype and torch.isfinite(logits.float()).all()
    torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), tokens.flatten()).backward()
    assert all(torch.isfinite(p.grad.float()).all() for p in model.parameters() if p.grad is not None)
