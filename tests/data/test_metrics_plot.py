"""`lcc plot METRICS.jsonl --out PNG`: a run's metrics drawn (training and validation loss, learning rate,
gradient norm, expert load balance); a file that is not a metrics file is named with its line."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from lcc.cli import app
from lcc.inspect.metrics_plot import read_records


def record(step: int, **extra) -> dict:
    return {"step": step, "loss": 5.0 - 0.1 * step, "lr": 1e-3, "grad_norm": 1.5,
            "router": {"layers.0.ffn": {"imbalance_expert": 1.2}, "layers.1.ffn": {"imbalance_expert": 1.8}}, **extra}


def test_a_runs_metrics_are_drawn_and_a_resumed_runs_later_records_win(tmp_path):
    lines = [record(1), record(2, val_loss=4.9, val_perplexity=134.3), record(3), record(2, loss=9.0), record(4)]
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    assert [r["step"] for r in read_records(tmp_path / "m.jsonl")] == [1, 2, 3, 4]
    assert read_records(tmp_path / "m.jsonl")[1]["loss"] == 9.0
    result = CliRunner().invoke(app, ["plot", str(tmp_path / "m.jsonl"), "--out", str(tmp_path / "m.png")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "m.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_file_that_is_not_a_metrics_file_is_named_with_its_line(tmp_path):
    (tmp_path / "m.jsonl").write_text(json.dumps(record(1)) + "\n" + '{"loss": 3}\n')
    result = CliRunner().invoke(app, ["plot", str(tmp_path / "m.jsonl"), "--out", str(tmp_path / "m.png")])
    assert result.exit_code == 2 and f"{tmp_path / 'm.jsonl'}:2: not a step record" in result.output
    assert not (tmp_path / "m.png").exists()


def test_tensorboard_scalars_are_the_metrics_records(tmp_path):
    """lcc run train --tensorboard: rank 0's event files hold each step's loss, validation loss and expert
    imbalance, as the metrics file has them (read back with TensorBoard's own reader)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from lcc.compiler.output import write
    from lcc.compiler.plan import compile_plan
    from lcc.runtime.launch import launch, read_metrics
    from lcc.spec import load_spec
    from tests.conftest import SPECS
    from tests.data.test_prepare import WORLD1

    write(compile_plan(load_spec(SPECS / "tiny-moe.yaml", [*WORLD1, "train.eval_every=2"])), tmp_path / "plan")
    launch(tmp_path / "plan", 2, tmp_path / "m.jsonl", quiet=True, tensorboard=tmp_path / "tb")
    records = read_metrics(tmp_path / "m.jsonl")
    board = EventAccumulator(str(tmp_path / "tb"))
    board.Reload()
    loss = [(e.step, e.value) for e in board.Scalars("train/loss")]
    assert loss == [(r["step"], pytest.approx(r["loss"], rel=1e-6)) for r in records]
    assert [(e.step, e.value) for e in board.Scalars("validation/loss")] == \
        [(2, pytest.approx(records[1]["val_loss"], rel=1e-6))]
    assert "experts/imbalance/layers.0.ffn" in board.Tags()["scalars"]
