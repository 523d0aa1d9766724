"""The `lcc` command as a user runs it: exit codes, messages without tracebacks, fast start."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

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
