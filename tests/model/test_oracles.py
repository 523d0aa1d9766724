"""The reference trainer against oracles that share no code with it (DESIGN.md, "The plan is the truth"):
AdamW written out from its equations (tests/model/naive.py, itself checked against torch.optim.AdamW), the
learning-rate equation with `math.cos`, and the equations of routing steps 8 (load bias) and 11 (gradient
shaping)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import pytest
import torch

from lcc.model.routing import update_bias
from lcc.model.trainer import ReferenceTrainer, lr_at
from lcc.spec import load_spec
from lcc.spec.models import Routing, Spec
from tests.conftest import SPECS
from tests.model.naive import NaiveAdamW

TINY = ["train.dtype=float64", "train.seq_len=16", "train.global_batch=8", "parallelism.pipeline.microbatches=2",
        "model.n_layers=2", "train.steps=10", "train.optimizer.warmup_steps=2"]
STEPS = 2


@dataclass
class Run:
    spec: Spec
    initial: dict[str, torch.Tensor]  # parameters before the first step
    records: list[dict[str, Any]]  # train_step's record per step
    grads: list[dict[str, torch.Tensor]]  # shaped gradients before clipping, per step
    params: list[dict[str, torch.Tensor]]  # parameters after each step
    biases: list[dict[int, torch.Tensor]]  # each MoE layer's load bias after each step


def _snapshot(trainer: ReferenceTrainer) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in trainer.model.named_parameters()}


def _run(overrides: list[str], steps: int) -> Run:
    spec = load_spec(SPECS / "tiny-moe.yaml", [*TINY, *overrides])
    trainer = ReferenceTrainer(spec, keep_grads=True)
    run = Run(spec, _snapshot(trainer), [], [], [], [])
    for step in range(steps):
        run.records.append(trainer.train_step(step))
        run.grads.append(dict(trainer.last_grads))
        run.params.append(_snapshot(trainer))
        run.biases.append({i: b.router.bias_E.clone() for i, b in trainer.model.moe_blocks()})
    return run


@pytest.fixture(scope="module")
def shaped() -> Run:
    return _run(["train.gradient_shaping.experts=token_count"], STEPS)


@pytest.fixture(scope="module")
def unshaped() -> Run:
    return _run(["train.gradient_shaping.experts=none"], 1)


def _lr(lr: float, warmup: int, total: int, min_ratio: float, s: int) -> float:
    """docs/model.md: linear warm-up lr * (s + 1) / warmup, then cosine from lr down to min_ratio * lr,
    progress (s - warmup) / (total - warmup), held at the floor from s = total on."""
    if s < warmup:
        return lr * (s + 1) / warmup
    progress = min((s - warmup) / (total - warmup), 1.0)
    floor = min_ratio * lr
    return floor + (lr - floor) * (1 + math.cos(math.pi * progress)) / 2


def _clipped(grads: dict[str, torch.Tensor], max_norm: float) -> dict[str, torch.Tensor]:
    """Global-norm clipping by its equation: g * min(1, max_norm / (||g|| + 1e-6))."""
    norm = math.sqrt(sum(float((g * g).sum()) for g in grads.values()))
    coef = min(1.0, max_norm / (norm + 1e-6)) if max_norm > 0 else 1.0
    return {n: g * coef for n, g in grads.items()}


# -- optimizer ---------------------------------------------------------------------------------------------


def test_step_equals_the_adamw_equations(shaped):
    """Every parameter after each step equals the AdamW equations (tests/model/naive.py) on the clipped
    shaped gradients at the step's learning rate, weight decay on matrices only."""
    opt = shaped.spec.train.optimizer
    assert opt.grad_clip > 0 and opt.weight_decay > 0  # both parts of the step are exercised
    assert any(p.ndim < 2 for p in shaped.initial.values())  # and parameters without decay
    oracle = NaiveAdamW(tuple(opt.betas), opt.eps)
    params = dict(shaped.initial)
    for step in range(STEPS):
        lr = _lr(opt.lr, opt.warmup_steps, shaped.spec.train.steps, opt.min_lr_ratio, step)
        assert shaped.records[step]["lr"] == pytest.approx(lr, rel=1e-15)
        grads = _clipped(shaped.grads[step], opt.grad_clip)
        assert grads.keys() == params.keys()
        for n, p in params.items():
            params[n] = oracle.step(n, p, grads[n], lr, opt.weight_decay if p.ndim >= 2 else 0.0)
            torch.testing.assert_close(shaped.params[step][n], params[n], rtol=1e-12, atol=1e-15, msg=n)


def test_the_adamw_oracle_equals_torch_adamw():
    """The oracle against torch.optim.AdamW, once: a matrix with decay and a vector without, five steps at
    changing learning rates, gradients from 1e-10 (where eps dominates the denominator) to 10, and zeros."""
    g = torch.Generator().manual_seed(0)
    shapes = {"w": (6, 5), "b": (7,)}
    start = {n: torch.randn(s, generator=g, dtype=torch.float64) for n, s in shapes.items()}
    theirs = {n: p.clone().requires_grad_(True) for n, p in start.items()}
    betas, eps, wd = (0.9, 0.95), 1e-8, 0.1
    torch_opt = torch.optim.AdamW([{"params": [theirs["w"]], "weight_decay": wd},
                                   {"params": [theirs["b"]], "weight_decay": 0.0}], lr=1.0, betas=betas, eps=eps)
    oracle, ours = NaiveAdamW(betas, eps), dict(start)
    for step, lr in enumerate([1e-3, 3e-3, 2e-3, 5e-4, 1e-2]):
        grads = {n: torch.randn(s, generator=g, dtype=torch.float64)
                 * 10.0 ** torch.randint(-10, 2, s, generator=g) for n, s in shapes.items()}
        grads["w"][0] = 0.0
        for n, p in theirs.items():
            p.grad = grads[n].clone()
        for group in torch_opt.param_groups:
            group["lr"] = lr
        torch_opt.step()
        for n in shapes:
            ours[n] = oracle.step(n, ours[n], grads[n], lr, wd if n == "w" else 0.0)
            torch.testing.assert_close(ours[n], theirs[n].detach(), rtol=1e-13, atol=0, msg=f"{n}, step {step}")


# -- learning rate ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("warmup", [0, 20])
def test_lr_schedule_equation(warmup):
    spec = load_spec(SPECS / "tiny-moe.yaml", [f"train.optimizer.warmup_steps={warmup}", "train.steps=200",
                                               "train.optimizer.lr=3e-3", "train.optimizer.min_lr_ratio=0.1"])
    lr, total, floor = 3e-3, 200, 3e-4
    expected = {
        0: lr / 20 if warmup else lr,  # first step
        **({9: lr * 10 / 20, 19: lr} if warmup else {}),  # warm-up, its last step reaches the peak
        warmup: lr,  # cosine starts at the peak
        warmup + (total - warmup) // 2: floor + (lr - floor) / 2,  # half-way: cos(pi / 2) = 0
        total - 1: floor + (lr - floor) * (1 + math.cos(math.pi * (total - 1 - warmup) / (total - warmup))) / 2,
        total: floor,
        total + 50: floor,  # beyond the schedule: held at the floor
    }
    for s, value in expected.items():
        assert lr_at(spec, s) == pytest.approx(value, rel=1e-12, abs=0), s
    for s in (1, 7, 33, 120, 187):  # and anywhere in between, by the equation
        assert lr_at(spec, s) == pytest.approx(_lr(lr, warmup, total, 0.1, s), rel=1e-12), s


# -- load bias (routing step 8) -----------------------------------------------------------------------------


def _routing(selection: str, rate: float = 1e-3) -> Routing:
    return Routing(experts={"selection": selection}, balance={"bias_rate": rate})


def test_bias_update_equation_with_ties():
    load_E = torch.tensor([3, 0, 5, 3, 1, 6, 3, 2, 4, 3, 0, 3, 5, 2, 3, 5], dtype=torch.float64)  # mean 3
    ties = load_E == 3
    bias_E = torch.randn(16, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 0.01
    before = bias_E.clone()
    rate = 0.25
    update_bias(bias_E, load_E, _routing("least_loaded", rate))
    mean = sum(load_E.tolist()) / 16
    for e, load in enumerate(load_E.tolist()):
        step = rate if load < mean else -rate if load > mean else 0.0
        assert float(bias_E[e]) == float(before[e]) + step, e
    assert ties.sum() == 6 and torch.equal(bias_E[ties], before[ties])


def test_bias_update_float32_loads_and_top_score():
    load_E = torch.tensor([0.0, 3.0, 9.0, 3.0, 0.0, 3.0], dtype=torch.float32)  # mean 3
    bias_E = torch.zeros(6, dtype=torch.float64)
    update_bias(bias_E, load_E, _routing("least_loaded", 1e-3))
    assert bias_E.tolist() == [1e-3, 0.0, -1e-3, 0.0, 1e-3, 0.0]
    frozen = torch.full((6,), 0.5, dtype=torch.float64)
    update_bias(frozen, load_E, _routing("top_score", 1e-3))
    assert frozen.tolist() == [0.5] * 6


def test_trainer_bias_follows_the_equation(shaped):
    """After the first step (bias 0 before), each router's bias is bias_rate * sign(mean load - load) of
    the step's loads, summed over its units."""
    rate = shaped.spec.routing.balance.bias_rate
    for i, stats in shaped.records[0]["router"].items():
        load = stats["load_per_expert"]
        mean = sum(load) / len(load)
        expected = [rate if x < mean else -rate if x > mean else 0.0 for x in load]
        assert stats["tokens"] == shaped.records[0]["tokens"] == 128 and len(load) == 64, i
        assert shaped.biases[0][i].tolist() == expected


# -- gradient shaping (routing step 11) ---------------------------------------------------------------------


def test_expert_gradients_scaled_by_tokens_over_load(shaped, unshaped):
    T = shaped.records[0]["tokens"]
    assert T == 8 * 16
    experts = ("w1_EFD", "w3_EFD", "w2_EDF")
    for i, stats in shaped.records[0]["router"].items():
        load = stats["load_per_expert"]
        assert load == unshaped.records[0]["router"][i]["load_per_expert"]  # same routing in both runs
        assert 0 in load and any(n > 0 for n in load)  # both cases of the equation occur
        factor_E = torch.tensor([T / n if n > 0 else 0.0 for n in load], dtype=torch.float64)
        for w in experts:
            name = f"layers.{i}.ffn.experts.{w}"
            plain, got = unshaped.grads[0][name], shaped.grads[0][name]
            torch.testing.assert_close(got, plain * factor_E.view(-1, 1, 1), rtol=1e-13, atol=0)
            idle = torch.tensor([n == 0 for n in load])
            assert not got[idle].any()
    for name, g in unshaped.grads[0].items():  # everything else is untouched
        if name.split(".")[-1] not in experts:
            assert torch.equal(shaped.grads[0][name], g), name


def test_shaping_comes_before_clipping(shaped, unshaped):
    """The step's reported pre-clip norm is the norm of the shaped gradients (and differs from the unshaped)."""
    for run in (shaped, unshaped):
        norm = math.sqrt(sum(float((g * g).sum()) for g in run.grads[0].values()))
        assert run.records[0]["grad_norm"] == pytest.approx(norm, rel=1e-12)
    assert shaped.records[0]["grad_norm"] != pytest.approx(unshaped.records[0]["grad_norm"], rel=1e-3)
    # and the first update is AdamW on the clipped shaped gradients (test_step_equals_the_adamw_equations): the
    # clip coefficient uses the shaped norm
    assert shaped.records[0]["grad_norm"] > shaped.spec.train.optimizer.grad_clip
