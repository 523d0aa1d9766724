"""Compiled plans run on gloo ranks compute what the single-process reference computes (float64)."""

from __future__ import annotations

import json

import pytest

from lcc.compiler.output import write
from lcc.compiler.plan import compile_plan
from lcc.model.trainer import ReferenceTrainer
from lcc.runtime.launch import launch, read_metrics
from lcc.spec import load_spec
from tests.conftest import SPECS
from tests.layouts import LAYOUTS
from tests.runtime.equivalence import LIGHT, SMALL, assert_run_matches_reference


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layout_equals_reference(layout, tmp_path, reference, monkeypatch):
    spec = load_spec(SPECS / "tiny-moe.yaml", [*SMALL, *LAYOUTS[layout]])
    assert_run_matches_reference(spec, tmp_path, reference, monkeypatch)


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("layout", ["tp4_kv2", "sp_dp2_tp2_ep4_zero3_selective"])
def test_query_and_key_norm_over_all_heads_under_tp(layout, tmp_path, reference, monkeypatch):
    """One mean square over every rank's heads (an all-reduce over tp, and one in backward); copies of a kv
    head on two ranks counted once each."""
    spec = load_spec(SPECS / "tiny-moe.yaml", [*SMALL, *LAYOUTS[layout], "model.attention.qk_norm=all"])
    assert_run_matches_reference(spec, tmp_path, reference, monkeypatch, steps=3)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_switch_loss_with_tp_equals_reference(tmp_path, reference, monkeypatch):
    """Each TP rank routes half of a unit's tokens; the balance loss still counts the whole unit."""
    spec = load_spec(SPECS / "tiny-moe.yaml", [*LIGHT, *LAYOUTS["tp2"], "routing.balance.aux_loss_coef=0.01"])
    assert_run_matches_reference(spec, tmp_path, reference, monkeypatch)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_float32_step_one(tmp_path):
    overrides = [o for o in SMALL if "dtype" not in o] + LAYOUTS["dp2_tp2_ep4"]
    spec = load_spec(SPECS / "tiny-moe.yaml", overrides)
    plan_dir = tmp_path / "plan"
    write(compile_plan(spec), plan_dir)
    launch(plan_dir, 1, tmp_path / "metrics.jsonl", quiet=True)
    loss = read_metrics(tmp_path / "metrics.jsonl")[0]["loss"]
    assert loss == pytest.approx(ReferenceTrainer(spec).train_step(0)["loss"], rel=1e-5)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_runtime_reads_no_layout_from_the_spec(tmp_path, reference):
    """The plan is the truth: a spec.json that describes another layout (one rank) changes nothing."""
    spec = load_spec(SPECS / "tiny-moe.yaml", [*LIGHT, *LAYOUTS["pp2_dp2_ep2"]])
    plan_dir = tmp_path / "plan"
    write(compile_plan(spec), plan_dir)
    resolved = json.loads((plan_dir / "spec.json").read_text())
    resolved["parallelism"].update(pp=1, dp=1, tp=1, ep=1, zero=0)
    resolved["parallelism"]["pipeline"].update(schedule="gpipe", microbatches=1)
    resolved["cluster"]["gpus_per_node"] = 1
    (plan_dir / "spec.json").write_text(json.dumps(resolved))
    launch(plan_dir, 3, tmp_path / "metrics.jsonl", quiet=True)
    records = read_metrics(tmp_path / "metrics.jsonl")
    ref_losses, _, ref_loads = reference(spec)
    assert [m["loss"] for m in records] == pytest.approx(ref_losses[:3], rel=1e-8, abs=0)
    assert [{site: r["load_per_expert"] for site, r in m["router"].items()} for m in records] == ref_loads[:3]
