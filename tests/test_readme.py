"""The README's quoted command output is what the commands print: every `$ lcc ...` block's lines (`...`
marks omitted lines) appear in the command's output, in order."""

from __future__ import annotations

import os
import shlex

import pytest
from typer.testing import CliRunner

from lcc.cli import app
from tests.conftest import ROOT


def quoted_commands(text: str) -> list[tuple[str, list[str]]]:
    """(command, expected lines) for each indented block that starts with `$ lcc`."""
    out: list[tuple[str, list[str]]] = []
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("    $ lcc "):
            expected = []
            for follow in lines[i + 1:]:
                if not follow.startswith("    ") or follow.startswith("    $ "):
                    break
                expected.append(follow[4:].rstrip())
            out.append((line[6:], expected))
    return out


BLOCKS = quoted_commands((ROOT / "README.md").read_text())


def test_the_readme_quotes_commands():
    assert len(BLOCKS) >= 2


@pytest.mark.parametrize(("command", "expected"), BLOCKS, ids=[c for c, _ in BLOCKS])
def test_readme_output_is_what_the_command_prints(command, expected, monkeypatch):
    monkeypatch.chdir(ROOT)
    monkeypatch.setitem(os.environ, "COLUMNS", "120")
    result = CliRunner().invoke(app, shlex.split(command)[1:])
    printed = [line.rstrip() for line in result.output.splitlines()]
    position = 0
    for want in expected:
        if want == "...":
            continue
        assert want in printed[position:], f"{command}: the README shows\n{want}\nwhich the command does not print " \
                                           f"(after line {position}):\n" + "\n".join(printed)
        position = printed.index(want, position) + 1
