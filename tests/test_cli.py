"""The `lcc` command as a user runs it: exit codes, messages without tracebacks, fast start."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest
import typer.main
from typer.testing import CliRunner

from lcc.cli import app
from tests.conftest import ROOT, SPECS, line_of, write


def lcc(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "lcc", *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=timeout)


def test_validate_ok():
    out = lcc("validate", "specs/longcat-2.0.yaml")
    assert out.returncode == 0, out.stderr
    assert "world 2048" in out.stdout


def test_validate_error_has_location_and_no_traceback(tmp_path, tiny_text):
    text = tiny_text.replace("n_groups: 8 ", "n_groups: 7 ")
    path = write(tmp_path, text)
    out = lcc("validate", str(path))
    assert out.returncode == 2
    assert f"{path}:{line_of(text, 'n_experts: 64')}:5: model.moe.n_experts" in out.stderr
    assert "Traceback" not in out.stderr + out.stdout


def test_compile_refuses_a_spec_named_dot_dot(tmp_path, tiny_text):
    # generated/../ is the working directory: the plan must not land there
    text = tiny_text.replace("name: tiny-moe", "name: '..'")
    path = write(tmp_path, text)
    work = tmp_path / "work"
    work.mkdir()
    out = subprocess.run([sys.executable, "-m", "lcc", "compile", str(path)], capture_output=True, text=True,
                         cwd=work, timeout=120)
    assert out.returncode == 2
    assert f"{path}:{line_of(text, 'name:')}:1: name: '..' is not a plain folder name" in out.stderr
    assert "hint:" in out.stderr and "Traceback" not in out.stderr
    assert list(work.iterdir()) == []


def test_bad_override_exits_2():
    out = lcc("report", "specs/tiny-moe.yaml", "--set", "parallelism.zeroo=2")
    assert out.returncode == 2 and "did you mean 'zero'" in out.stderr and "Traceback" not in out.stderr


def test_missing_file_exits_2():
    out = lcc("validate", "specs/nope.yaml")
    assert out.returncode == 2 and "cannot read spec" in out.stderr


def test_report_json_and_overrides():
    out = lcc("report", "specs/tiny-moe.yaml", "--json", "--set", "parallelism.zero=1")
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert data["layout"]["zero"] == 1 and data["schema"] == "lcc.report/1"


def test_report_human_output():
    out = lcc("report", "specs/longcat-2.0.yaml")
    assert out.returncode == 0, out.stderr
    for needle in ("Memory per rank", "worst rank", "Claims, side by side", "step time"):
        assert needle in out.stdout


def test_schema_is_json_schema():
    out = lcc("schema")
    schema = json.loads(out.stdout)
    assert schema["additionalProperties"] is False
    assert {"name", "model", "parallelism", "cluster", "train"} <= set(schema["properties"])
    assert "description" in schema["$defs"]["MoE"]["properties"]["n_experts"]


@pytest.mark.parametrize("code", [
    "import lcc",
    "import lcc.cli",
    "from lcc.compiler.cost import cost_report; from lcc.spec import load_spec; "
    f"cost_report(load_spec({str(SPECS / 'longcat-2.0.yaml')!r}))",
])
def test_no_torch_on_the_report_path(code):
    out = subprocess.run([sys.executable, "-c", f"{code}; import sys; assert 'torch' not in sys.modules"],
                         capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert out.returncode == 0, out.stderr


def _commands(group: Any, path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], Any]]:
    """Every command (not group) of click's command tree, with its words."""
    for name, sub in group.commands.items():
        yield from _commands(sub, (*path, name)) if hasattr(sub, "commands") else [((*path, name), sub)]


COMMANDS = list(_commands(typer.main.get_command(app)))


@pytest.mark.parametrize(("path", "command"), COMMANDS, ids=[" ".join(p) for p, _ in COMMANDS])
def test_usage_lines_name_the_arguments(path, command):
    result = CliRunner().invoke(app, [*path, "--help"], prog_name="lcc")
    assert result.exit_code == 0, result.output
    names = [(p.metavar or p.name.upper()) + ("..." if p.nargs == -1 else "")  # variadic: NAME...
                 for p in command.params if p.param_type_name == "argument"]
    assert result.output.splitlines()[0] == " ".join(["Usage: lcc", *path, "[OPTIONS]", *names])


def test_plan_diff_refuses_an_invalid_spec_as_validate_does_before_importing_torch(tmp_path):
    bad = write(tmp_path, "name: x\nmodel: {d_model: -1}\n")
    code = ("import sys\nfrom lcc.cli import app\ntry:\n"
            f"    app(['plan', 'diff', 'specs/tiny-moe.yaml', {str(bad)!r}])\n"
            "except SystemExit as exc:\n    code = exc.code\n"
            "assert 'torch' not in sys.modules, 'torch was imported'\nsys.exit(code)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    validate = CliRunner().invoke(app, ["validate", str(bad)])
    assert validate.exit_code == out.returncode == 2, out.stderr
    assert out.stderr == validate.stderr and f"{bad}:2:9: model.d_model" in out.stderr


def test_plan_search_says_what_it_does_on_stderr_and_json_stays_alone_on_stdout():
    result = CliRunner().invoke(app, ["plan", "search", str(SPECS / "tiny-moe.yaml"), "--gpus", "8", "--top", "1",
                                      "--fix", "parallelism.tp=2", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    said = result.stderr.splitlines()
    assert all(line.startswith("lcc plan search: ") for line in said), said
    assert said[0].startswith(f"lcc plan search: {data['considered']:,} layouts of 8 GPUs (1 x 8): checking")
    assert said[-1].startswith("lcc plan search: done in ") and f"({data['evaluated']:,} layouts estimated" in said[-1]


def test_report_plot_says_it_is_drawing_on_stderr_and_json_stays_alone_on_stdout(tmp_path, monkeypatch):
    from lcc.compiler import plan as compiler
    from lcc.inspect import plot

    # the committed plan and no picture: the messages are under test here, the picture in test_pictures
    committed = {"plan.json": (ROOT / "generated" / "tiny-moe" / "plan.json").read_text()}
    monkeypatch.setattr(compiler, "compile_plan", lambda spec, mode: committed)
    drawn = []
    monkeypatch.setattr(plot, "report_picture", lambda data, mode, target, path, why: drawn.append(path))
    png = tmp_path / "r.png"
    result = CliRunner().invoke(app, ["report", str(SPECS / "tiny-moe.yaml"), "--json", "--plot", str(png)])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["schema"] == "lcc.report/1" and drawn == [png]
    said = result.stderr.splitlines()
    assert said[0].startswith(f"lcc report: drawing {png}") and said[-1] == f"wrote {png}", said
