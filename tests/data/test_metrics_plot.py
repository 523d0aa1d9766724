"""`lcc plot METRICS.jsonl --out PNG`: a run's metrics drawn (training and validation loss, learning rate,
gradient norm, expert load balance); a file that is not a metrics file is named with its line."""

from __future__ import annotations

import json

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
