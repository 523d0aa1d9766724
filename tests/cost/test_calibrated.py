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
    assert time["rates"] == {"compute": "calibrated", "communication": "calibrated"}
    assert time["step_seconds_low"] < time["step_seconds_estimate"] < time["step_seconds_high"]
    assert time["step_seconds_estimate"] == step_seconds(CostModel(spec))
    plain = cost_report(load_spec(SPECS / "small-moe.yaml"))["time"]
    assert plain["rates"] == {"compute": "datasheet", "communication": "datasheet"}
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
