"""The cost model at achieved rates (`cluster.calibration`): the table is read and interpolated as documented,
a layer's operations add up to the FLOPs the datasheet model counts, the step range brackets the estimate, and
the report says which figures come from calibration."""

from __future__ import annotations

import math

import pytest
import yaml

from lcc.compiler.cost.model import CostModel, step_seconds
from lcc.compiler.cost.rates import Ladder, Rates, _monotone
from lcc.compiler.cost.report import cost_report
from lcc.compiler.cost.work import layer_forward_flops, recompute_flops
from lcc.spec import SpecError, load_spec, resolved
from lcc.spec.calibration import Calibration
from tests.conftest import SPECS

RATE = 2e10  # FLOP/s of every compute table below
TINY = 1e-12  # seconds of everything else


def table(rate: float = RATE, spread: float = 1.0, fixed: float = TINY, rows_slow: float = 1.0) -> dict:
    """A calibration where compute runs at `rate` (FLOP/s, forward or forward and backward) at every size,
    `rows_slow` times slower at the fewest rows; its spread `spread` times the median either way."""
    def point(flops_fwd: float, slow: float) -> list[float]:
        t = 3 * flops_fwd / rate * slow
        return [flops_fwd / rate * slow, t, t / spread, t * spread]

    linear = [[r, w, w, *point(2 * r * w * w, rows_slow if r == 16 else 1.0)] for w in (256, 1024)
              for r in (16, 256, 4096)]
    experts = [[8, r, w, w, *point(6 * 8 * r * w * w, rows_slow if r == 4 else 1.0)] for w in (256, 1024)
               for r in (4, 64, 1024)]
    attention = [[8, s, d, *point(2 * 8 * d * s * s, 1.0)] for d in (64, 128) for s in (64, 1024)]
    small = [fixed, fixed / spread, fixed * spread]
    return {"ranks": 4, "linear": linear, "experts": experts, "attention": attention,
            "elementwise": [[1024, *small], [1 << 26, *small]], "optimizer": [[1024, *small], [1 << 24, *small]],
            "op_seconds": small,
            "collectives": {k: [[n, b, *small] for n in (2, 4) for b in (1024, 1 << 23)]
                            for k in ("all_reduce", "all_to_all", "all_gather", "reduce_scatter", "send_recv")}}


def calibrated(tmp_path, calibration: dict, overrides: list[str] = ()):
    base = load_spec(SPECS / "small-moe.yaml", ["train.global_batch=4", "train.seq_len=128", *overrides])
    data = resolved(base)
    data["cluster"]["calibration"] = calibration
    path = tmp_path / "calibrated.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return load_spec(path)


def test_a_ladder_interpolates_log_log_and_holds_its_ends():
    ladder = Ladder([(100.0, 1000.0), (1.0, 10.0)])
    assert ladder.rate(10.0) == pytest.approx(100.0)  # halfway in log size: halfway in log rate
    assert ladder.rate(1000.0) == 1000.0 and ladder.rate(0.1) == 10.0


def test_collective_times_are_made_non_decreasing_and_extrapolate_by_bandwidth():
    assert _monotone([3.0, 1.0, 2.0, 5.0]) == [2.0, 2.0, 2.0, 5.0]
    rows = {"all_reduce": [[4, 1000, 1e-3, 1e-3, 1e-3], [4, 2000, 5e-4, 5e-4, 5e-4], [4, 3000, 3e-3, 3e-3, 3e-3]]}
    cal = Calibration.model_validate({**table(), "collectives": rows})
    rates = Rates(cal)
    assert rates.collective("all_reduce", 1500, 4) == pytest.approx(7.5e-4)  # pooled: 0.75 ms at 1 and 2 kB
    assert rates.collective("all_reduce", 4000, 4) == pytest.approx(3e-3 + 1000 * (3e-3 - 7.5e-4) / 1000)
    assert rates.collective("all_reduce", 10, 4) == pytest.approx(7.5e-4)
    assert rates.collective("all_reduce", 10, 1) == 0.0 and rates.collective("all_to_all", 10, 4) is None


def test_compute_tables_give_the_rate_they_were_measured_at():
    slow = Rates(Calibration.model_validate(table(rows_slow=4.0)))
    assert slow.linear(4096, 1024, 1024) == pytest.approx(6 * 4096 * 1024 * 1024 / RATE)
    assert slow.linear(16, 256, 256) == pytest.approx(4 * 6 * 16 * 256 * 256 / RATE)
    between = slow.linear(64, 256, 256) / (6 * 64 * 256 * 256 / RATE)  # 64 rows: halfway from 16 to 256 in log
    assert between == pytest.approx(math.sqrt(4.0))
    assert slow.linear(256, 512, 512, backward=False) == pytest.approx(2 * 256 * 512 * 512 / RATE)


def test_at_one_rate_a_layer_costs_the_flops_the_datasheet_model_counts(tmp_path):
    """With every operation at RATE and nothing else costing time, a calibrated layer is exactly its forward,
    backward and recomputed FLOPs on one rank (lcc.compiler.cost.work, the datasheet model's count) at RATE."""
    for overrides in ([], ["parallelism.activation_checkpointing=selective"], ["parallelism.ep=4"],
                      ["parallelism.activation_checkpointing=full", "parallelism.tp=2", "parallelism.dp=2"]):
        spec = calibrated(tmp_path, table(), overrides)
        cm = CostModel(spec)
        from lcc.compiler.cost import measured

        tokens = cm.tokens
        for layer in range(spec.model.n_layers):
            flops = (3 * layer_forward_flops(spec, layer) + recompute_flops(spec, layer)) * tokens
            flops /= spec.parallelism.tp  # the datasheet model's share of one rank
            got = measured.layer_compute(cm, cm.rates, layer)
            assert got == pytest.approx(flops / RATE, rel=1e-6), overrides


def test_the_step_range_brackets_the_estimate_and_the_report_names_its_sources(tmp_path):
    spec = calibrated(tmp_path, table(spread=1.5, fixed=1e-4), ["parallelism.zero=1"])
    time = cost_report(spec)["time"]
    assert time["rates"] == {"compute": "calibrated", "communication": "calibrated", "compiled": None}
    assert time["step_seconds_low"] < time["step_seconds_estimate"] < time["step_seconds_high"]
    assert time["step_seconds_estimate"] == step_seconds(CostModel(spec))
    plain = cost_report(load_spec(SPECS / "small-moe.yaml"))["time"]
    assert plain["rates"] == {"compute": "datasheet", "communication": "datasheet", "compiled": None}
    assert plain["step_seconds_low"] is None and plain["step_seconds_high"] is None


def test_zero_stages_cost_what_they_run(tmp_path):
    """ZeRO 1 all-reduces like ZeRO 0 and cuts out its piece, ZeRO 2 reduce-scatters; both step over a shard
    and gather the updated pieces; ZeRO 3 gathers each layer's parameters and reduce-scatters its gradients.
    At measured rates their estimates differ (a datasheet cluster without latencies prices ZeRO 0-2 alike)."""
    cal = table(fixed=1e-3)
    cal["optimizer"] = [[1024, 1e-6, 1e-6, 1e-6], [1 << 24, 1.6e-2, 1.6e-2, 1.6e-2]]  # 1 ns a parameter
    steps = [step_seconds(CostModel(calibrated(tmp_path, cal, [f"parallelism.zero={z}"]))) for z in (0, 1, 2, 3)]
    assert len(set(steps)) == 4
    assert steps[1] > steps[2]  # the same optimizer shard; an all-reduce where ZeRO 2 reduce-scatters


def test_a_bad_calibration_row_names_its_place(tmp_path):
    bad = table()
    bad["linear"][1] = [256, 256, 256, 0.1]
    with pytest.raises(SpecError, match=r"calibrated\.yaml:\d+:\d+: cluster\.calibration\.linear\[1\]"):
        calibrated(tmp_path, bad)


def test_past_its_largest_size_a_ladder_grows_by_its_last_segments_marginal_rate():
    # 1 and 2 units of work took 0.1 and 0.1333 s: a fixed 0.0667 s and 30 units a second beyond it
    ladder = Ladder([(1.0, 10.0), (2.0, 15.0)])
    assert ladder.rate(4.0) == pytest.approx(4.0 / (0.1 + 3 / 30))
    assert Ladder([(1.0, 10.0), (2.0, 15.0)], cap=18.0).rate(100.0) == pytest.approx(18.0)
    # an attention core's work grows as its sequence squared: work 1 and 4 took 0.1 and 0.2 s (30 a second
    # beyond the first), so sequence 3's work of 9 takes 0.2 s and 5 more units at 30 a second
    assert Ladder([(1.0, 10.0), (2.0, 20.0)], power=2.0).rate(3.0) == pytest.approx(9.0 / (0.2 + 5 / 30))


CONCURRENCY = [[1, 0.5, 0.5, 0.5], [2, 0.75, 0.75, 0.75], [4, 1.0, 1.0, 1.0]]  # alone: 2x; two at once: 1.33x


def test_fewer_ranks_computing_at_once_compute_at_the_concurrency_tables_speed():
    rates = Rates(Calibration.model_validate({**table(), "concurrency": CONCURRENCY}))
    assert rates.speed(1) == 2.0 and rates.speed(4) == 1.0 and rates.speed(3) == pytest.approx(1 / 0.875)
    assert Rates(Calibration.model_validate(table())).speed(1) == 1.0  # no table: every rank at the all-busy rate


def test_the_simulated_schedule_says_which_pipeline_ranks_compute_when():
    from lcc.compiler.cost.contention import busy_intervals
    from lcc.compiler.schedule import add_p2p, generate, simulate

    for schedule, pp, virtual, m in (("gpipe", 2, 1, 1), ("1f1b", 4, 1, 8), ("interleaved_1f1b", 2, 2, 4),
                                     ("zb_h1", 4, 1, 4), ("zbv", 2, 2, 4)):
        intervals = busy_intervals(schedule, pp, virtual, m)
        sim = simulate(add_p2p(generate(schedule, pp, virtual, m), pp * virtual, schedule), pp * virtual, m,
                       placement=schedule)
        assert sum(length for length, _ in intervals) == sim.makespan
        assert sum(length * len(busy) for length, busy in intervals) == sum(sim.busy)
    # GPipe with one micro-batch: one pipeline rank at a time, F on 0 then 1, B on 1 then 0
    assert busy_intervals("gpipe", 2, 1, 1) == ((1.0, {0}), (1.0, {1}), (2.0, {1}), (2.0, {0}))


def test_a_pipelines_fill_and_drain_compute_at_the_speed_of_the_ranks_then_busy(tmp_path):
    """GPipe with one micro-batch keeps one pipeline rank (dp 2 x tp 1 = 2 ranks) computing at a time: at the
    table's speed for 2 ranks its compute takes 0.75 of its all-busy time, and the bubble stretches that."""
    over = ["parallelism.pp=2", "parallelism.dp=2", "parallelism.ep=2", "parallelism.pipeline.schedule=gpipe",
            "parallelism.pipeline.microbatches=1"]
    plain = CostModel(calibrated(tmp_path, table(fixed=1e-4), over))
    shared = CostModel(calibrated(tmp_path, {**table(fixed=1e-4), "concurrency": CONCURRENCY}, over))
    assert plain.compute_stretch == 1.0 and shared.compute_stretch == pytest.approx(0.75)
    compute, inside, _ = max((plain.role_seconds(r) for r in plain.roles), key=lambda s: s[0] + s[1])
    assert step_seconds(plain) - step_seconds(shared) == pytest.approx(0.25 * compute / (1 - 0.5), rel=1e-9)
    # every rank busy at once (no pipeline) computes at the all-busy rate the other tables were measured at
    flat = CostModel(calibrated(tmp_path, {**table(), "concurrency": CONCURRENCY}, ["parallelism.dp=4"]))
    assert flat.compute_stretch == 1.0


def test_a_concurrency_table_must_end_at_all_ranks_busy(tmp_path):
    bad = {**table(), "concurrency": [[1, 0.5, 0.5, 0.5], [2, 0.75, 0.75, 0.75]]}
    with pytest.raises(SpecError, match=r"cluster\.calibration.*concurrency: rows by ranks computing at once"):
        calibrated(tmp_path, bad)


@pytest.mark.parametrize("imbalance", [1.0, 3.0, 6.0, 16.0])
@pytest.mark.parametrize("ep", [1, 2, 4, 16])
def test_the_busiest_expert_parallel_rank_holds_the_busiest_expert_and_an_even_share_of_the_rest(imbalance, ep):
    from lcc.compiler.cost.work import busiest_ep_share

    spec = load_spec(SPECS / "small-moe.yaml", [f"routing.balance.expected_imbalance={imbalance}",
                                                 f"parallelism.ep={ep}", "parallelism.dp=16", "parallelism.pp=1",
                                                 "cluster.gpus_per_node=16", "model.moe.n_groups=16"])
    n = spec.model.moe.n_experts
    loads = [imbalance] + [(n - imbalance) / (n - 1)] * (n - 1)  # the busiest expert first; mean load 1
    ranks = [sum(loads[r * n // ep:(r + 1) * n // ep]) for r in range(ep)]
    assert busiest_ep_share(spec) == pytest.approx(max(ranks) / (sum(ranks) / ep), rel=1e-12)


def test_an_expected_imbalance_slows_only_layouts_with_expert_parallelism(tmp_path):
    """The busiest rank's extra rows cost its experts' compute and exchange; with one rank holding every
    expert the load is its own whatever the routing."""
    for rates in (None, table(fixed=1e-4)):
        steps = {}
        for ep in (1, 4):
            for imbalance in (1.0, 4.0):
                over = [f"parallelism.ep={ep}", f"routing.balance.expected_imbalance={imbalance}"]
                spec = calibrated(tmp_path, rates, over) if rates else load_spec(SPECS / "small-moe.yaml", over)
                steps[ep, imbalance] = step_seconds(CostModel(spec))
        assert steps[1, 4.0] == steps[1, 1.0], rates is None
        assert steps[4, 4.0] > steps[4, 1.0], rates is None


def test_an_imbalance_beyond_all_tokens_on_one_expert_is_refused():
    with pytest.raises(SpecError, match=r"routing\.balance\.expected_imbalance: 17\.0 is more than the busiest of "
                                        r"16 experts can take"):
        load_spec(SPECS / "small-moe.yaml", ["routing.balance.expected_imbalance=17"])
    with pytest.raises(SpecError, match=r"routing\.balance\.expected_imbalance"):
        load_spec(SPECS / "small-moe.yaml", ["routing.balance.expected_imbalance=0.5"])


COMPILED = [[256, 1.0, 0.5, 0.4, 0.6], [1024, 1.0, 2.0, 1.6, 2.4]]  # compiled at half, then twice eager's seconds


def test_the_compiled_ratio_interpolates_log_log_in_tokens():
    rates = Rates(Calibration.model_validate({**table(), "compiled": COMPILED}))
    assert rates.compiled(512) == pytest.approx(1.0)  # halfway in log tokens: halfway in log ratio
    assert rates.compiled(64) == 0.5 and rates.compiled(4096) == 2.0
    assert Rates(Calibration.model_validate({**table(), "compiled": COMPILED}), "slow").compiled(256) == 0.6
    assert Rates(Calibration.model_validate(table())).compiled(512) == 1.0  # no table: priced as eager


def test_a_compiled_plan_prices_its_layers_traced_part_at_the_compiled_ratio(tmp_path):
    """At one rate for every operation, the attention block and the shared expert's SwiGLU (what a compiled
    region holds) cost the table's ratio of their FLOPs' time; routing and the routed experts cost as eager."""
    from lcc.compiler.cost import measured

    cal = {**table(), "compiled": [[64, 1.0, 0.5, 0.5, 0.5], [1 << 20, 1.0, 0.5, 0.5, 0.5]]}
    eager = CostModel(calibrated(tmp_path, cal))
    spec = calibrated(tmp_path, cal, ["train.compile=inductor"])
    compiled = CostModel(spec)
    m, att = spec.model, spec.model.attention
    q, kv, shared = att.n_heads * att.head_dim, att.n_kv_heads * att.head_dim, m.moe.expert_d_ff
    tokens, seq = compiled.tokens, spec.train.seq_len
    linears = 2 * m.d_model * (2 * q + 2 * kv) + 3 * 2 * m.d_model * shared  # per token, forward
    core = 2 * att.n_heads * att.head_dim * seq * seq  # per sequence, forward (QK^T and AV, causal)
    traced = 3 * (tokens * linears + tokens / seq * core) / RATE  # forward and backward
    for layer in range(m.n_layers):
        saved = measured.layer_compute(eager, eager.rates, layer) - measured.layer_compute(compiled, compiled.rates,
                                                                                           layer)
        assert saved == pytest.approx(0.5 * traced, rel=1e-6)
    assert cost_report(spec)["time"]["rates"]["compiled"] == "calibrated"
    assert cost_report(calibrated(tmp_path, table(), ["train.compile=inductor"]))["time"]["rates"]["compiled"] == \
        "as eager"
    # float64 runs stay eager whatever train.compile says
    exact = calibrated(tmp_path, {**cal, "dtype": "float64"}, ["train.compile=inductor", "train.dtype=float64"])
    assert cost_report(exact)["time"]["rates"]["compiled"] is None


def test_a_compiled_table_must_be_in_ascending_tokens(tmp_path):
    with pytest.raises(SpecError, match=r"cluster\.calibration.*compiled: rows by tokens, ascending"):
        calibrated(tmp_path, {**table(), "compiled": COMPILED[::-1]})
