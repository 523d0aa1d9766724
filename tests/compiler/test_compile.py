from __future__ import annotations

import json

import pytest
import torch

from lcc.compiler.layout import coords
from lcc.compiler.output import first_difference
from lcc.compiler.plan import compile_plan
from lcc.model import build_model
from lcc.spec import SpecError, load_spec
from tests.conftest import ROOT, SHIPPED, SPECS
from tests.layouts import LAYOUTS

TINY_LAYOUTS = {**LAYOUTS, "tp4_kv_replicated": ["parallelism.tp=4", "parallelism.pp=1", "parallelism.dp=2",
                                                  "parallelism.ep=8"]}


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
@pytest.mark.parametrize("mode", ["train", "serve"])
def test_golden_files_are_current(path, mode):
    spec = load_spec(path)
    out = ROOT / "generated" / spec.name / ("serve" if mode == "serve" else "")
    files = compile_plan(spec, mode)
    assert first_difference(files, out) is None, "run `make golden` if the change is on purpose"
    assert compile_plan(load_spec(path), mode) == files  # same spec, same bytes


def test_longcat_plan_size():
    total = sum(p.stat().st_size for p in (ROOT / "generated" / "longcat-2.0").rglob("*") if p.is_file())
    assert total <= 5 * 1024 * 1024


@pytest.mark.parametrize("layout", list(TINY_LAYOUTS))
def test_shards_reassemble_the_reference_parameters(layout):
    spec = load_spec(SPECS / "tiny-moe.yaml", TINY_LAYOUTS[layout])
    plan = json.loads(compile_plan(spec)["plan.json"])
    reference = dict(build_model(spec).named_parameters())
    par = spec.parallelism
    stages_of = {int(k): [int(s[5:]) for s in v] for k, v in plan["ranks"]["roles_of_pp_rank"].items()}
    assert {p["name"] for p in plan["parameters"]} == set(reference)
    for p in plan["parameters"]:
        full = reference[p["name"]].detach()
        rebuilt = torch.zeros_like(full)
        copies = torch.zeros(full.shape, dtype=torch.int64)
        for rank in range(par.world_size):
            c = coords(par, spec.cluster.gpus_per_node, rank)
            if not set(p["stages"]) & set(stages_of[c.pp]):
                continue
            index = [slice(None)] * full.dim()
            shard = p["shard"]
            if shard is not None:
                axis_index, axis_size = {"tp": (c.tp, par.tp), "ep": (c.ep, par.ep)}[shard["axis"]]
                part = axis_index * shard["parts"] // axis_size
                size = full.shape[shard["dim"]] // shard["parts"]
                index[shard["dim"]] = slice(part * size, (part + 1) * size)
            piece = full[tuple(index)]
            assert list(piece.shape) == p["local_shape"]
            rebuilt[tuple(index)] = piece
            copies[tuple(index)] += 1
        assert torch.equal(rebuilt, full), p["name"]  # nothing lost
        # every element is held by the same number of ranks: the declared replication, nothing more
        holders = par.world_size // par.pp * sum(len(set(p["stages"]) & set(s)) > 0 for s in stages_of.values())
        shards = p["shard"]["parts"] if p["shard"] else 1
        assert (copies == holders // shards).all(), p["name"]


def test_expert_and_tp_rules_in_plan():
    spec = load_spec(SPECS / "tiny-moe.yaml", TINY_LAYOUTS["tp4_kv_replicated"])
    plan = json.loads(compile_plan(spec)["plan.json"])
    params = {p["name"]: p for p in plan["parameters"]}
    assert params["layers.0.attn.wq.weight"]["shard"] == {"axis": "tp", "dim": 0, "parts": 4}
    assert params["layers.0.attn.wk.weight"]["shard"] == {"axis": "tp", "dim": 0, "parts": 2}  # 2 kv heads
    # each kv head's two copies see their own query heads: their gradients are summed over kv
    assert params["layers.0.attn.wk.weight"]["grad_reduce"] == ["dp", "kv"] and plan["mesh"]["kv"] == 2
    assert params["layers.0.attn.wo.weight"]["shard"] == {"axis": "tp", "dim": 1, "parts": 4}
    assert params["layers.0.ffn.experts.w1_EFD"]["shard"] == {"axis": "ep", "dim": 0, "parts": 8}
    assert params["layers.0.ffn.experts.w1_EFD"]["grad_reduce"] == ["edp"]
    assert params["layers.0.ffn.router.weight_ED"]["shard"] is None
    ops = [(c["op"], c["axis"]) for c in plan["roles"][0]["forward"]]
    # vocab-parallel embedding, row-parallel attention output, then the MoE block: expert counts, dispatch,
    # combine, the TP group's tokens
    assert ops[:6] == [("all_reduce", "tp"), ("all_reduce", "tp"), ("all_to_all", "ep"), ("all_to_all", "ep"),
                       ("all_to_all", "ep"), ("all_gather", "tp")]
    backward = {(c["op"], c["axis"]) for c in plan["roles"][0]["backward"]}
    assert ("all_gather", "tp") in backward  # the split tokens' gradients
    assert plan["roles"][0]["forward"][-3:] == [
        {"op": op, "axis": "tp", "site": "loss", "shape": [4 * 128], "dtype": "float32", "what": what}
        for op, what in (("all_reduce_max", "vocab-parallel cross-entropy: the logits' maximum over the vocabulary"),
                         ("all_reduce", "vocab-parallel cross-entropy: the sum of exponentials"),
                         ("all_reduce", "vocab-parallel cross-entropy: the target's logit"))]
    assert plan["experts"]["experts_per_rank"] == 8


def test_serve_plan_quantizes_experts():
    plan = json.loads(compile_plan(load_spec(SPECS / "longcat-2.0.yaml"), "serve")["plan.json"])
    w1 = next(p for p in plan["parameters"] if p["name"] == "layers.0.ffn.experts.w1_EFD")
    assert w1["serve"]["packed"] == [16000, 256, 2048] and w1["serve"]["scales"] == [16000, 256, 32]
    # a CUDA serve plan's experts run on lcc's Triton kernels, int4 dequantised in the kernel
    assert plan["backend"] == "triton" and plan["device"] == "cuda" and plan["mode"] == "serve"
    assert plan["serving"]["expert_kernel"] == "int4_triton" and plan["serving"]["group_size"] == 128
    train = json.loads(compile_plan(load_spec(SPECS / "longcat-2.0.yaml"), "train")["plan.json"])
    assert train["backend"] == "torch"  # training runs the experts through torch's grouped matmul


@pytest.mark.parametrize("group,width,ok", [(24, 384, False), (8, 512, False), (64, 512, True), (512, 512, True)])
def test_cuda_serve_plans_take_the_group_sizes_of_the_triton_kernels(group, width, ok):
    spec = load_spec(SPECS / "tiny-moe.yaml", ["cluster.device.kind=cuda", f"quantization.experts.group_size={group}",
                                               f"model.d_model={width}", f"model.moe.expert_d_ff={width}"])
    if ok:
        assert json.loads(compile_plan(spec, "serve")["plan.json"])["serving"]["expert_kernel"] == "int4_triton"
    else:
        with pytest.raises(SpecError, match=f"group_size {group}: lcc's Triton int4 kernels take powers of two"):
            compile_plan(spec, "serve")


def test_layout_over_memory_names_the_field():
    spec = load_spec(SPECS / "tiny-moe.yaml", ["cluster.device.memory_gib=0.001"])
    with pytest.raises(SpecError) as err:
        compile_plan(spec)
    assert err.value.first.path == ("cluster", "device", "memory_gib")
    assert "needs" in err.value.first.message


def test_cli_compile_rules(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from lcc.cli import app

    monkeypatch.chdir(ROOT)

    def lcc(*args):
        return CliRunner().invoke(app, list(args))

    out = lcc("compile", "specs/tiny-moe.yaml", "--set", "parallelism.zero=1")
    assert out.exit_code == 2 and "needs --out" in out.stderr
    out = lcc("compile", "specs/tiny-moe.yaml", "--set", "parallelism.zero=1", "--out", str(tmp_path))
    assert out.exit_code == 0, out.stderr
    (tmp_path / "actions.txt").write_text("changed\n")
    out = lcc("compile", "specs/tiny-moe.yaml", "--set", "parallelism.zero=1", "--out", str(tmp_path), "--check")
    assert out.exit_code == 1 and "actions.txt:1: differs" in out.stderr
    out = lcc("compile", "specs/tiny-moe.yaml", "--check")
    assert out.exit_code == 0, out.stderr
