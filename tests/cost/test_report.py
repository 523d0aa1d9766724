from __future__ import annotations

import json

import pytest

from lcc.compiler.cost import cost_report
from lcc.compiler.cost.report import expert_bytes_quantized
from lcc.spec import load_spec
from tests.conftest import SHIPPED, SPECS

REQUIRED = [
    ("params", "total"), ("params", "active_per_token", "min"), ("params", "active_per_token", "max"),
    ("params", "active_per_token", "expected"), ("memory", "worst_rank", "role"),
    ("memory", "worst_rank", "weights_bytes"), ("memory", "worst_rank", "grads_bytes"),
    ("memory", "worst_rank", "optimizer_bytes"), ("memory", "worst_rank", "activations_bytes"),
    ("memory", "worst_rank", "total_bytes"), ("memory", "worst_rank", "peak_bytes"),
    ("memory", "worst_rank", "peak_phase"), ("memory", "by_role"), ("experts", "bytes_train"),
    ("experts", "bytes_serve"), ("flops", "per_step"), ("comm", "bytes_per_step", "by_kind"),
    ("comm", "bytes_per_step", "by_link", "intra_node"), ("comm", "bytes_per_step", "by_link", "inter_node"),
    ("pipeline", "bubble_fraction"), ("time", "step_seconds_estimate"),
]


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_report_schema_and_determinism(path):
    spec = load_spec(path)
    report = cost_report(spec)
    for keys in REQUIRED:
        node = report
        for k in keys:
            node = node[k]
    assert report["schema"] == "lcc.report/1"
    assert json.dumps(report, sort_keys=True) == json.dumps(cost_report(load_spec(path)), sort_keys=True)
    w = report["memory"]["worst_rank"]
    parts = w["weights_bytes"] + w["grads_bytes"] + w["optimizer_bytes"] + w["activations_bytes"]
    assert abs(parts - w["total_bytes"]) <= 4
    assert w["peak_bytes"] == max(r["peak_bytes"] for r in report["memory"]["by_role"])
    assert report["memory"]["fits"] == (w["peak_bytes"] <= report["memory"]["device_bytes"])
    comm = report["comm"]["bytes_per_step"]
    assert sum(comm["by_kind"].values()) == pytest.approx(comm["total"])
    assert comm["by_link"]["intra_node"] + comm["by_link"]["inter_node"] == pytest.approx(comm["total"])


def test_longcat_claims():
    r = cost_report(load_spec(SPECS / "longcat-2.0.yaml"))
    assert r["params"]["total"] == pytest.approx(1.6e12, rel=0.03)
    assert r["memory"]["fits"]
    assert r["experts"]["bytes_serve"] <= 0.26 * r["experts"]["bytes_bf16"]
    assert r["memory"]["comparison"]["zero3_full_checkpointing_reduction"] > 0.6
    assert r["world_size"] == 2048 and r["layout"]["ep"] == 128
    # an EP group of 128 consecutive ranks spans 16 nodes of 8: 7 of 127 peers share a node
    assert r["comm"]["expert_alltoall_inter_node_share"] == pytest.approx(120 / 127)


def test_int4_bytes():
    assert expert_bytes_quantized(128 * 10, 4, 128, True) == 640 + 2 * 10
    assert expert_bytes_quantized(128 * 10, 4, 128, False) == 640 + 3 * 10


def test_zero_and_checkpointing_lower_the_peak():
    def peak(*overrides):
        return cost_report(load_spec(SPECS / "small-moe.yaml", list(overrides)))["memory"]["worst_rank"]

    base = peak()
    z1, z3 = peak("parallelism.zero=1"), peak("parallelism.zero=3")
    full = peak("parallelism.zero=3", "parallelism.activation_checkpointing=full")
    sel = peak("parallelism.activation_checkpointing=selective")
    assert base["optimizer_bytes"] > z1["optimizer_bytes"] and z1["grads_bytes"] == base["grads_bytes"]
    assert z3["weights_bytes"] - z3["weights_gathered_bytes"] < base["weights_bytes"]
    assert full["activations_bytes"] < sel["activations_bytes"] < base["activations_bytes"]
    assert base["total_bytes"] > z1["total_bytes"] > z3["total_bytes"] > full["total_bytes"]
    assert base["peak_bytes"] > z1["peak_bytes"] > z3["peak_bytes"] > full["peak_bytes"]


def test_more_micro_batches_shrink_the_bubble():
    a = cost_report(load_spec(SPECS / "tiny-moe.yaml"))
    b = cost_report(load_spec(SPECS / "tiny-moe.yaml", ["parallelism.pipeline.microbatches=8",
                                                          "train.global_batch=64"]))
    assert b["pipeline"]["bubble_fraction"] < a["pipeline"]["bubble_fraction"]


def test_does_not_fit_is_reported():
    r = cost_report(load_spec(SPECS / "longcat-2.0.yaml", ["cluster.device.memory_gib=8"]))
    assert not r["memory"]["fits"]


def test_pipeline_hops_split_by_node():
    # pp 4 over 2 nodes of 4 ranks (dp 2): only the hop between stages 1 and 2 leaves a node
    r = cost_report(load_spec(SPECS / "tiny-moe.yaml", ["parallelism.pp=4", "parallelism.dp=2", "parallelism.ep=2",
                                                        "cluster.nodes=2", "cluster.gpus_per_node=4"]))
    assert r["comm"]["bytes_per_step"]["by_kind"]["pipeline_p2p"] > 0
    pp_inter = r["comm"]["bytes_per_step"]["by_link"]["inter_node"]
    assert pp_inter == pytest.approx(r["comm"]["bytes_per_step"]["by_kind"]["pipeline_p2p"] / 3)


def test_zero1_moves_as_much_as_plain_data_parallelism():
    base = ["parallelism.pp=1", "parallelism.dp=8", "parallelism.ep=1", "parallelism.pipeline.microbatches=1"]

    def per_step(zero):
        r = cost_report(load_spec(SPECS / "tiny-moe.yaml", [*base, f"parallelism.zero={zero}"]))
        kinds = r["comm"]["bytes_per_step"]["by_kind"]
        return kinds["grad_reduce"] + kinds["param_gather"]

    assert per_step(1) == pytest.approx(per_step(0)) == pytest.approx(per_step(2))
    assert per_step(3) == pytest.approx(1.5 * per_step(0))  # ZeRO paper: 3 x parameters instead of 2 x


def test_interleaved_roles_list_each_stage():
    r = cost_report(load_spec(SPECS / "small-moe.yaml", ["parallelism.pp=2", "parallelism.dp=2",
                                                         "parallelism.pipeline.schedule=interleaved_1f1b",
                                                         "parallelism.pipeline.virtual_stages=2",
                                                         "parallelism.pipeline.microbatches=2"]))
    roles = r["memory"]["by_role"]
    assert roles[0]["stages"] == [0, 2] and roles[0]["layers"] == [[0, 2], [4, 6]]


def test_weights_are_read_forward_and_backward_and_again_when_recomputed():
    """docs/cost-model.md, "Compute time is a roofline": a layer's weights are read forward and backward, once
    more under full checkpointing; of the routed experts only as many as the micro-batch's routed slots. By
    hand for a tiny-moe layer on one rank, float32: dense q, o 128 x 128 each, k, v 128 x 64 each, 2 norms of
    128, router (8 centroids + 64 rows) x 128: 58624; 64 experts of 3 x 128 x 64: 1572864."""
    from lcc.compiler.cost.work import layer_weight_reads

    world1 = ["parallelism.pp=1", "parallelism.dp=1", "parallelism.ep=1", "cluster.gpus_per_node=1",
              "parallelism.pipeline.microbatches=1"]
    spec = load_spec(SPECS / "tiny-moe.yaml", world1)  # 32 sequences of 128 tokens reach every expert
    assert layer_weight_reads(spec, 0) == 2 * (58624 + 1572864) * 4 == 13_051_904
    full = load_spec(SPECS / "tiny-moe.yaml", [*world1, "parallelism.activation_checkpointing=full"])
    assert layer_weight_reads(full, 0) == 3 * (58624 + 1572864) * 4 == 19_577_856
    few = load_spec(SPECS / "tiny-moe.yaml", [*world1, "train.global_batch=1", "train.seq_len=8"])
    # 8 tokens x k.expected 2 = 16 routed slots: at most 16 of the 64 experts, 16 x 3 x 128 x 64 = 393216
    assert layer_weight_reads(few, 0) == 2 * (58624 + 393216) * 4 == 3_614_720


def test_slower_memory_raises_the_step_time_of_a_memory_bound_layout():
    # one 16-token sequence per micro-batch: far more weight bytes per step than arithmetic
    small_batch = ["train.global_batch=8", "parallelism.pipeline.microbatches=2", "train.seq_len=16"]

    def time(*overrides):
        return cost_report(load_spec(SPECS / "tiny-moe.yaml", [*small_batch, *overrides]))["time"]

    fast, slow = time("cluster.device.memory_tbps=20"), time("cluster.device.memory_tbps=0.002")
    assert slow["weight_read_seconds"] > slow["arithmetic_seconds"]  # memory-bound
    assert slow["step_seconds_estimate"] > fast["step_seconds_estimate"]
    assert slow["compute_seconds"] == pytest.approx(slow["weight_read_seconds"])
    assert fast["compute_seconds"] == pytest.approx(fast["arithmetic_seconds"])


def test_memory_bandwidth_does_not_slow_a_compute_bound_layout():
    def step(tbps):
        r = cost_report(load_spec(SPECS / "longcat-2.0.yaml", [f"cluster.device.memory_tbps={tbps}"]))
        return r["time"]["step_seconds_estimate"]

    assert step(3.35) == step(1000)  # the roofline: weight reads hide behind the arithmetic


def test_device_is_in_the_json_and_the_human_report():
    import io

    from rich.console import Console

    from lcc.report_view import render

    report = cost_report(load_spec(SPECS / "longcat-2.0.yaml"))
    assert report["device"] == {"name": "H800-80GB", "kind": "cuda", "count": 2048, "memory_gib": 80,
                                "peak_tflops": 989, "memory_tbps": 3.35}
    out = io.StringIO()
    render(report, Console(file=out, width=120))
    assert "2048 x H800-80GB (cuda): 989 TFLOP/s, 3.35 TB/s, 80 GiB each" in out.getvalue()


def test_serve_report_kv_cache_and_decode_step():
    """tiny-moe served on its layout (pp 2 x dp 4, ep 4): each stage holds 2 layers of 2 kv heads of 32 in
    bfloat16: 2 x 2 x 64 x 2 = 512 bytes of KV cache per token; a decode step of 16 sequences per dp rank
    (64 tokens, 2 experts each of 64) reaches 1 - (1 - 2/64)^64 of each rank's experts, and reads them, the
    dense weights and the batch's KV cache at full context at the device's bandwidth, stage after stage."""
    spec = load_spec(SPECS / "tiny-moe.yaml")
    serve = cost_report(spec)["serve"]
    device = spec.cluster.device.memory_gib * 2**30
    bandwidth = spec.cluster.device.memory_tbps * 1e12
    touched = 1 - (1 - 2 / 64) ** 64
    assert serve["decode_step"]["experts_touched_share"] == pytest.approx(touched)
    for role in serve["by_role"]:
        assert role["kv_bytes_per_token"] == 512
        assert role["kv_cache_bytes"] == 16 * 256 * 512
        assert role["kv_tokens_fit"] == (device - role["weights_bytes"] - role["workspace_bytes"]) // 512
        assert role["decode_seconds"] == pytest.approx(role["decode_read_bytes"] / bandwidth)
        assert role["kv_cache_bytes"] < role["decode_read_bytes"] < role["kv_cache_bytes"] + role["weights_bytes"]
    step = serve["decode_step"]
    assert step["seconds"] == pytest.approx(sum(r["decode_seconds"] for r in serve["by_role"]))
    assert step["tokens_per_second"] == pytest.approx(16 * 4 / step["seconds"])
    # a longer context: more KV cache to read each step, fewer tokens per second
    longer = cost_report(load_spec(SPECS / "tiny-moe.yaml", ["serve.max_seq_len=1024", "model.max_seq_len=1024"]))
    assert longer["serve"]["decode_step"]["tokens_per_second"] < step["tokens_per_second"]


def test_report_mode_serve_from_the_command_line(tmp_path):
    from typer.testing import CliRunner

    from lcc.cli import app

    result = CliRunner().invoke(app, ["report", str(SPECS / "longcat-2.0.yaml"), "--mode", "serve"])
    assert result.exit_code == 0, result.output
    assert "Memory per rank (serving)" in result.output and "decode step (memory-bound): " in result.output
    assert "KV tokens that fit" in result.output
    tight = CliRunner().invoke(app, ["report", str(SPECS / "longcat-2.0.yaml"), "--mode", "serve", "--set",
                                     "serve.max_batch=4096"])
    assert tight.exit_code == 1 and "does NOT fit" in tight.output
    bad = CliRunner().invoke(app, ["report", str(SPECS / "tiny-moe.yaml"), "--mode", "infer"])
    assert bad.exit_code == 2 and "--mode must be train or serve" in bad.output
    none = CliRunner().invoke(app, ["report", str(SPECS / "tiny-moe.yaml"), "--mode", "serve", "--set", "serve=null"])
    assert none.exit_code == 2 and "no serve section" in none.output
