"""`lcc run generate` as a user runs it: output, and refusals before any rank starts (exit 2, the reason
named, no traceback)."""

from __future__ import annotations

import json
from types import SimpleNamespace

from typer.testing import CliRunner

from lcc.cli import app
from tests.conftest import SPECS, write
from tests.serve.plans import FLOAT64, LAYOUTS


def lcc(*args: str) -> SimpleNamespace:
    """The command in this process (a world-1 plan runs its one rank here): exit code, stdout, stderr."""
    result = CliRunner().invoke(app, list(args))
    return SimpleNamespace(returncode=result.exit_code, stdout=result.stdout, stderr=result.stderr)

WORLD1 = [a for s in [*LAYOUTS["world1"], *FLOAT64] for a in ("--set", s)]


def test_json_lines_per_prompt():
    out = lcc("run", "generate", str(SPECS / "tiny-moe.yaml"), *WORLD1, "--prompt-ids", "72,101", "--prompt", "Hello",
              "--max-tokens", "8", "--json")
    assert out.returncode == 0, out.stderr
    lines = [json.loads(x) for x in out.stdout.splitlines()]
    assert [len(x["token_ids"]) for x in lines] == [8, 8]
    for x in lines:
        assert x["text"] == bytes(x["token_ids"]).decode("utf-8", errors="replace")
        assert x["finish_reason"] == "length"
    assert "no --checkpoint" in out.stderr  # serving random weights is said


def test_text_is_printed_as_it_comes_and_stops_at_a_stop_string():
    out = lcc("run", "generate", str(SPECS / "tiny-moe.yaml"), *WORLD1, "--prompt", "a", "--max-tokens", "40",
              "--json")
    full = json.loads(out.stdout)["text"]
    stop = full[8:10]
    out = lcc("run", "generate", str(SPECS / "tiny-moe.yaml"), *WORLD1, "--prompt", "a", "--max-tokens", "40",
              "--stop", stop)
    assert out.returncode == 0, out.stderr
    assert out.stdout == full[:full.index(stop)] + "\n"


def test_refusals_before_launch(tmp_path, tiny_text):
    spec = str(SPECS / "tiny-moe.yaml")
    long = ",".join(["65"] * 300)
    cases = [
        (["run", "generate", spec, *WORLD1, "--prompt-ids", long], "prompt 1: the prompt has 300 tokens"),
        (["run", "generate", "generated/tiny-moe", "--prompt", "a"], "a train plan; lcc run generate executes serve"),
        (["run", "generate", spec, *WORLD1], "give --prompt TEXT or --prompt-ids"),
        (["run", "generate", spec, *WORLD1, "--prompt-ids", "1,x"], "expected comma-separated token ids"),
        (["run", "generate", spec, "--set", "serve.dtype=float32", "--set", "quantization.experts.group_size=16",
          "--set", "serve.cpu_kernels=torch", "--prompt", "a"],
         "quantization.experts.group_size: group_size 16: PyTorch's CPU int4 kernel (serve.cpu_kernels torch) takes"),
        (["run", "generate", spec, *WORLD1, "--prompt", "a", "--checkpoint", str(tmp_path / "nothing")],
         "no such file or directory"),
    ]
    no_serve = write(tmp_path, tiny_text[:tiny_text.index("serve:")])
    cases.append((["compile", str(no_serve), "--mode", "serve", "--out", str(tmp_path / "x")],
                  "a serve plan needs a serve section"))
    for args, message in cases:
        out = lcc(*args)
        assert out.returncode == 2, (args, out.stdout, out.stderr)
        assert message in out.stderr, (args, out.stderr)
        assert "Traceback" not in out.stderr


def test_a_machine_without_the_native_kernel_is_told_what_to_do(monkeypatch):
    """A plan whose experts run on lcc's native CPU kernel, on a machine that cannot build or run it: refused
    before any rank starts, with the reason and the spec setting that serves through PyTorch's kernel."""
    from lcc.backends.cpu import native

    monkeypatch.setattr(native, "unavailable", lambda: "it needs a CPU with AVX-512 (PyTorch reports AVX2)")
    out = lcc("run", "generate", str(SPECS / "tiny-moe.yaml"), "--set", "serve.dtype=float32", "--prompt", "a",
              "--max-tokens", "2")
    assert out.returncode == 2, (out.stdout, out.stderr)
    assert "the plan runs lcc's native CPU kernels, and it needs a CPU with AVX-512" in out.stderr
    assert "--set serve.cpu_kernels=torch" in out.stderr
    assert "Traceback" not in out.stderr
    out = lcc("run", "generate", str(SPECS / "tiny-moe.yaml"), "--set", "serve.dtype=float32", "--set",
              "serve.cpu_kernels=torch", "--prompt", "a", "--max-tokens", "2", "--json")
    assert out.returncode == 0, out.stderr
    assert len(json.loads(out.stdout)["token_ids"]) == 2
