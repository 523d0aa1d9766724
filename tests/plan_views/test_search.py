"""`lcc plan search` against an exhaustive enumeration of its own: every layout tried through `lcc`'s spec
loading (--set overrides, the spec's rules) and the cost report, nothing of lcc.search."""

from __future__ import annotations

import itertools
import json
import re

import pytest
from typer.testing import CliRunner

from lcc.cli import app
from lcc.compiler.cost import cost_report
from lcc.spec import SpecError, load_spec
from lcc.spec.load import validate
from lcc.spec.overrides import apply_overrides
from lcc.spec.yaml_source import load_yaml
from tests.conftest import SPECS

TINY = SPECS / "tiny-moe.yaml"
GPUS = 4
SMALL = ["train.global_batch=16"]  # fewer micro-batch choices


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def exhaustive(gpus: int, nodes: int = 1, exchanges: tuple[str, ...] = ("flat",), extra: tuple[str, ...] = (),
               only: dict | None = None) -> list[tuple[float, dict, int]]:
    """(estimated step, layout, worst rank's memory) of every valid layout of tiny-moe (with `extra` overrides) on
    `gpus` devices in `nodes` nodes that fits, as docs/search.md defines the space, with the expert exchanges
    `exchanges` (on one node the spec refuses every hierarchical one; with ep >= 2 the flat one also
    overlapped) and the fields in `only` fixed, sorted by step."""
    base = load_spec(TINY, [*SMALL, *extra])
    raw = TINY.read_bytes()
    only = only or {}
    out = []
    for tp in _divisors(gpus // nodes):
        for pp in _divisors(gpus // tp):
            dp = gpus // (tp * pp)
            pipes = [("1f1b", 1)] if pp == 1 else [("gpipe", 1), ("1f1b", 1)] + [
                ("interleaved_1f1b", v) for v in (2, 4, 8) if pp * v <= base.model.n_layers] + [("zb_h1", 1)] + (
                [("zbv", 2)] if 2 * pp <= base.model.n_layers else [])
            for ep in _divisors(dp * tp):
                kinds = [(e, False) for e in exchanges] + ([("flat", True)] if ep > 1 and "flat" in exchanges else [])
                for zero in range(4):
                    for recompute in ("none", "selective", "full"):
                        for sp in (False, True) if tp > 1 else (False,):
                            for schedule, v in pipes:
                                for m, (exchange, overlap) in itertools.product(
                                        _divisors(base.train.global_batch // dp), kinds):
                                    layout = {"tp": tp, "pp": pp, "dp": dp, "ep": ep, "zero": zero,
                                              "recompute": recompute, "sp": sp, "schedule": schedule,
                                              "microbatches": m, "virtual_stages": v, "exchange": exchange,
                                              "overlap": overlap}
                                    if any(layout[field] != value for field, value in only.items()):
                                        continue
                                    sets = [f"parallelism.tp={tp}", f"parallelism.pp={pp}", f"parallelism.dp={dp}",
                                            f"parallelism.ep={ep}", f"parallelism.zero={zero}",
                                            f"parallelism.activation_checkpointing={recompute}",
                                            f"parallelism.sequence_parallel={str(sp).lower()}",
                                            f"parallelism.pipeline.schedule={schedule}",
                                            f"parallelism.pipeline.microbatches={m}",
                                            f"parallelism.pipeline.virtual_stages={v}",
                                            f"parallelism.expert_exchange={exchange}",
                                            f"parallelism.expert_overlap={str(overlap).lower()}",
                                            f"cluster.gpus_per_node={gpus // nodes}", f"cluster.nodes={nodes}"]
                                    try:  # what load_spec does, the file read once
                                        spec = validate(apply_overrides(load_yaml(raw, str(TINY)),
                                                                        [*SMALL, *extra, *sets]))
                                    except SpecError:
                                        continue
                                    report = cost_report(spec)
                                    if report["memory"]["fits"]:
                                        out.append((report["time"]["step_seconds_estimate"], layout,
                                                    report["memory"]["worst_rank"]["peak_bytes"]))
    return sorted(out, key=lambda r: r[0])


@pytest.fixture(scope="module")
def reference() -> list[tuple[float, dict, int]]:
    return exhaustive(GPUS)


def run(*args: object) -> tuple[int, str]:
    result = CliRunner().invoke(app, ["plan", "search", *map(str, args)])
    return result.exit_code, result.output


def _search(*args: object, gpus: int = GPUS) -> list[tuple[float, dict]]:
    if "--nodes" not in args:
        args = ("--nodes", 1, *args)
    result = CliRunner().invoke(app, ["plan", "search", *map(str, (TINY, "--gpus", gpus, "--set", SMALL[0],
                                                                    "--json", *args))])
    assert result.exit_code == 0, result.output
    return [(t["step_seconds"], t["layout"]) for t in json.loads(result.stdout)["top"]]  # progress: on stderr


def _key(layout: dict) -> tuple:
    return tuple(sorted(layout.items()))


def test_without_pruning_the_search_finds_exactly_the_valid_fitting_layouts(reference):
    found = _search("--no-prune", "--top", 100_000)
    assert {_key(lay) for _, lay in found} == {_key(lay) for _, lay, _ in reference}
    assert [s for s, _ in found] == sorted(s for s, _ in found)  # sorted by estimate
    steps = {_key(lay): s for s, lay, _ in reference}
    assert all(s == steps[_key(lay)] for s, lay in found)  # the cost report's own estimate


def test_overlapped_exchanges_and_zero_bubble_schedules_are_listed_only_where_valid(reference):
    """The listed set is the reference (above); in it, the overlapped exchange has ep >= 2, the flat exchange
    and no selective recomputation, and the zero-bubble schedules run on a pipeline with at least pp
    micro-batches, zbv with its 2 stages a rank."""
    overlapped = [lay for _, lay, _ in reference if lay["overlap"]]
    zero_bubble = [lay for _, lay, _ in reference if lay["schedule"] in ("zb_h1", "zbv")]
    assert overlapped and zero_bubble
    assert all(lay["ep"] >= 2 and lay["exchange"] == "flat" and lay["recompute"] != "selective" for lay in overlapped)
    assert all(lay["pp"] > 1 and lay["microbatches"] >= lay["pp"] for lay in zero_bubble)
    assert all(lay["virtual_stages"] == (2 if lay["schedule"] == "zbv" else 1) for lay in zero_bubble)


@pytest.mark.parametrize("k", [1, 5, 20])
def test_with_pruning_the_top_k_is_the_exhaustive_top_k_ties_included(reference, k):
    cut = reference[k - 1][0]
    want = {_key(lay) for s, lay, _ in reference if s <= cut}
    assert {_key(lay) for _, lay in _search("--top", k)} == want


def test_by_memory_the_top_k_is_the_exhaustive_top_k(reference):
    by_memory = sorted(reference, key=lambda r: r[2])
    cut = by_memory[4][2]
    want = {_key(lay) for _, lay, memory in by_memory if memory <= cut}
    assert {_key(lay) for _, lay in _search("--objective", "memory", "--top", 5)} == want


MULTI_NODE = {"pp": 1, "recompute": "none"}  # a small space of tiny-moe on 8 GPUs in 4 nodes of 2


@pytest.mark.parametrize("extra", [(), ("routing.groups.sets=2", "routing.groups.max_sets=1")])
def test_on_several_nodes_the_search_lists_hierarchical_exchanges_only_where_the_spec_allows(extra):
    """A hierarchical exchange needs an EP group over whole nodes, at least two (ep 4 or 8 here); with 2 sets of
    groups, an EP group over 4 nodes (ep 8) would split a set, so no layout with ep 8 is valid at all."""
    reference = exhaustive(8, nodes=4, exchanges=("flat", "hierarchical"), extra=extra, only=MULTI_NODE)
    sets = [a for e in extra for a in ("--set", e)]
    fixes = ["--fix", "parallelism.pp=1", "--fix", "parallelism.activation_checkpointing=none"]

    def found(*args: object) -> list[tuple[float, dict]]:
        return _search("--nodes", 4, *sets, *fixes, *args, gpus=8)

    everything = found("--no-prune", "--top", 100_000)
    assert {_key(lay) for _, lay in everything} == {_key(lay) for _, lay, _ in reference}
    hierarchical = {lay["ep"] for _, lay in everything if lay["exchange"] == "hierarchical"}
    assert hierarchical == ({4} if extra else {4, 8})
    assert all(lay["ep"] != 8 for _, lay in everything) if extra else True
    cut = reference[2][0]
    assert {_key(lay) for _, lay in found("--top", 3)} == {_key(lay) for s, lay, _ in reference if s <= cut}


def test_fix_keeps_every_listed_layout_and_write_saves_a_compilable_spec(tmp_path):
    out = tmp_path / "best.yaml"
    code, text = run(TINY, "--gpus", 8, "--fix", "parallelism.tp=2", "--top", 5, "--write", out)
    assert code == 0, text
    rows = [line for line in text.splitlines() if line[:4].strip().isdigit()]
    assert rows and all(" tp2 " in f" {row.split()[1]} " for row in rows)
    assert "layouts of 8 GPUs" in text and "estimated" in text and "pruned" in text
    spec = load_spec(out)
    assert spec.parallelism.tp == 2 and spec.parallelism.world_size == 8
    code, text = CliRunner().invoke(app, ["compile", str(out), "--out", str(tmp_path / "plan")]).exit_code, ""
    assert code == 0


@pytest.mark.parametrize("args,message", [
    (["--fix", "parallelism.tp=3"], "no layout of 8 GPUs (1 x 8) has parallelism.tp = 3"),
    (["--fix", "parallelism.pipeline.schedule=interleaved_1f1b", "--fix", "parallelism.pipeline.microbatches=1"],
     "no valid layout of 8 GPUs (1 x 8) with parallelism.pipeline.schedule = interleaved_1f1b, "
     "parallelism.pipeline.microbatches = 1: every one breaks a rule of the spec, e.g. parallelism.pipeline"),
    (["--fix", "parallelism.bogus=1"], "--fix 'parallelism.bogus=1': expected FIELD=VALUE"),
    (["--set", "cluster.device.memory_gib=0.00001"], "fits 1e-05 GiB a device"),
    (["--nodes", 3], "8 GPUs do not split into 3 equal nodes"),
])
def test_impossible_requests_end_with_one_message_and_exit_2(args, message):
    code, out = run(TINY, "--gpus", 8, *args)
    assert code == 2 and message in out, out
    assert "Traceback" not in out


def test_calibrate_writes_a_cluster_section_a_spec_takes(tmp_path):
    out = tmp_path / "calibrated.yaml"
    result = CliRunner().invoke(app, ["calibrate", "--ranks", "2", "--seconds", "0.02", "--spec", str(TINY),
                                      "--out", str(out)])
    assert result.exit_code == 0, result.output
    # the spec keeps its 8-rank layout, and the line says so, and which settings run it on the 2 ranks measured
    assert result.stderr.startswith(f"wrote {out}: spec tiny-moe with the cluster measured on 2 ranks; its layout "
                                    "needs 8 ranks (pp 2 x dp 4 x tp 1), so lcc validate refuses it on this "
                                    "cluster: run it here with --set "), result.stderr
    with pytest.raises(SpecError, match="world size pp\\*dp\\*tp = 2\\*4\\*1 = 8 differs"):
        load_spec(out)
    load_spec(out, re.findall(r"--set (\S+)", result.stderr))
    spec = load_spec(out, ["parallelism.pp=1", "parallelism.dp=2", "parallelism.ep=2"])
    device, network = spec.cluster.device, spec.cluster.network
    assert spec.cluster.gpus_per_node == 2 and device.kind == "cpu"
    assert device.peak_tflops > 0 and device.memory_tbps > 0 and network.intra_node_gbps > 0
    assert network.intra_node_latency_us == network.inter_node_latency_us > 0  # gloo's fixed cost, one machine
    table = spec.cluster.calibration
    assert table.ranks == 2 and {"all_reduce", "all_to_all", "all_gather", "reduce_scatter", "send_recv"} <= set(
        table.collectives)
    assert min(len(table.linear), len(table.experts), len(table.attention)) >= 4
    assert [row[0] for row in table.concurrency] == [1, 2]  # one rank computing alone, then both at once
    time = cost_report(spec)["time"]
    assert time["rates"] == {"compute": "calibrated", "communication": "calibrated", "compiled": None}
    assert 0 < time["step_seconds_low"] <= time["step_seconds_estimate"] <= time["step_seconds_high"]


def test_the_compiled_probe_times_the_traced_layer_eager_and_compiled(monkeypatch, tmp_path):
    """The probe's rows are a reference layer's traced part timed eagerly and through torch.compile (here
    its `aot_eager` backend, which traces forward and backward as Inductor does, without generating code;
    and a narrower layer); `lcc calibrate` keeps them as the `compiled` table."""
    import torch

    from lcc.search import probes
    from lcc.search.calibrate import merged
    from lcc.search.probes import Clock, compiled_probe

    monkeypatch.setattr(probes, "LAYER", {"width": 64, "heads": 2, "kv_heads": 1, "head_dim": 32, "seq": 16,
                                          "ffn": 128})
    monkeypatch.setattr(probes, "COMPILED_TOKENS", COMPILED_TOKENS := (16, 64))
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))  # which the probe points Inductor at

    calls = []
    backend = lambda gm, inputs: calls.append(gm) or torch._dynamo.backends.debugging.aot_eager(gm, inputs)  # noqa: E731
    rows = compiled_probe(Clock(torch.device("cpu"), 0.02, lambda: None), torch.float32, torch.device("cpu"),
                          backend=backend)
    assert [r[0] for r in rows] == list(COMPILED_TOKENS) and len(calls) == len(COMPILED_TOKENS)  # one per size
    assert all(t > 0 for r in rows for t in (*r[1], *r[2]))
    rank = {"compiled": rows}
    table = merged([{**rank, **{k: [] for k in ("linear", "experts", "attention", "elementwise", "optimizer")},
                     "op": [1e-6], "concurrency": []}])["compiled"]
    assert [len(row) for row in table] == [5, 5] and table[0][0] == COMPILED_TOKENS[0]


@pytest.mark.parametrize("args,message", [
    (["--compiled", "--dtype", "float64"], "float64 runs stay eager"),
])
def test_calibrate_refuses_a_compiled_probe_that_would_not_compile(args, message):
    result = CliRunner().invoke(app, ["calibrate", *args])
    assert result.exit_code == 2 and message in result.stderr, result.output


@pytest.mark.parametrize("schedule,pp,virtual", [("gpipe", 2, 1), ("gpipe", 4, 1), ("1f1b", 2, 1), ("1f1b", 4, 1),
                                                  ("interleaved_1f1b", 2, 2), ("interleaved_1f1b", 2, 4),
                                                  ("interleaved_1f1b", 4, 2), ("zb_h1", 2, 1), ("zb_h1", 4, 1),
                                                  ("zb_h1", 8, 1), ("zbv", 2, 2), ("zbv", 4, 2), ("zbv", 8, 2)])
def test_ranked_bubble_is_the_schedule_simulators(schedule, pp, virtual):
    """The search ranks by the report's closed-form bubble; it is the schedule simulator's figure (the one
    plans carry) for every schedule and micro-batch count it enumerates."""
    from lcc.compiler.layout import bubble_fraction
    from lcc.compiler.schedule import add_p2p, generate, simulate

    for m in (1, 2, 3, 4, 6, 8, 12, 16, 32):
        if schedule == "interleaved_1f1b" and m % pp or schedule.startswith("zb") and m < pp:
            continue  # the spec's rules refuse these
        n_stages = pp * virtual
        lowered = add_p2p(generate(schedule, pp, virtual, m), n_stages, schedule)
        sim = simulate(lowered, n_stages, m, placement=schedule)
        assert sim.bubble_fraction == pytest.approx(bubble_fraction(pp, virtual, m, schedule), abs=1e-12), (m, sim)


def test_only_the_rules_that_read_the_layout_are_asked_of_every_layout():
    """A rule that reads neither `parallelism` nor `cluster` judges every layout of a model as it judged the
    spec, so the search asks it once; one that finds a problem in the model itself is still asked of each."""
    from lcc.search.validity import layout_rules

    spec = load_spec(TINY)
    asked = {fn.__name__ for fn in layout_rules(spec)}
    assert {"routing_counts", "quantization", "expert_groups", "moe_sections"}.isdisjoint(asked), asked
    assert {"world", "batch", "pipeline", "expert_parallel", "attention_heads"} <= asked, asked
    k = spec.routing.k.model_copy(update={"expected": 99.0})
    broken = spec.model_copy(update={"routing": spec.routing.model_copy(update={"k": k})})
    assert "routing_counts" in {fn.__name__ for fn in layout_rules(broken)}
