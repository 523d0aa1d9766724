"""Each command's synopsis in the docs names exactly the arguments and flags the command takes, and every
command has one.

A synopsis is a fenced block whose info string is `synopsis`. In it, a line that starts with `lcc ` begins
one command's synopsis (the command, its arguments in the order it takes them, then its options); indented
lines continue it, and `#` starts a comment:

    ```synopsis
    lcc run train SPEC|PLAN_DIR [--steps N] [--metrics FILE]
                  [--checkpoint-dir DIR] [--resume | --resume-if-any] ...
    ```

The commands' arguments and flags come from the click commands typer builds from `lcc.cli.app`, not from
their help text."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import typer.main

from lcc.cli import app
from tests.conftest import ROOT

FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")
DOCS = sorted((ROOT / "docs").glob("*.md")) + [ROOT / "README.md"]


@dataclass
class Synopsis:
    where: str  # file:line
    text: str  # the synopsis, its lines joined

    def words(self) -> list[str]:
        return self.text.split()


def synopses(path: Path) -> list[Synopsis]:
    found: list[Synopsis] = []
    inside = False
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if line.startswith("```"):
            inside = not inside and line[3:].strip() == "synopsis"
            continue
        if not inside:
            continue
        text = line.split("#", 1)[0].rstrip()
        if text.startswith("lcc "):
            found.append(Synopsis(f"{path.relative_to(ROOT)}:{number}", text))
        elif text.strip():
            assert found and line[:1].isspace(), f"{path.relative_to(ROOT)}:{number}: a synopsis block line that " \
                                                 "neither starts with `lcc ` nor continues one (indented)"
            found[-1].text += " " + text.strip()
    return found


def commands(group: Any, path: tuple[str, ...] = ("lcc",)) -> dict[tuple[str, ...], Any]:
    """Every command (not group) of the click tree, by its words."""
    out: dict[tuple[str, ...], Any] = {}
    for name, sub in group.commands.items():
        if hasattr(sub, "commands"):
            out.update(commands(sub, (*path, name)))
        else:
            out[(*path, name)] = sub
    return out


COMMANDS = commands(typer.main.get_command(app))
DOCUMENTED = [s for doc in DOCS for s in synopses(doc)]


def command_of(synopsis: Synopsis) -> tuple[tuple[str, ...], list[str]]:
    """The command's words and the words after them."""
    words = synopsis.words()
    for n in range(len(words), 1, -1):
        if tuple(words[:n]) in COMMANDS:
            return tuple(words[:n]), words[n:]
    raise AssertionError(f"{synopsis.where}: `{synopsis.text}` names no lcc command")


def test_every_command_has_a_synopsis():
    documented = {command_of(s)[0] for s in DOCUMENTED}
    missing = sorted(" ".join(c) for c in set(COMMANDS) - documented)
    assert not missing, f"no ```synopsis block in docs/ for: {', '.join(missing)}"


@pytest.mark.parametrize("synopsis", DOCUMENTED, ids=[f"{s.where} {' '.join(s.words()[:3])}" for s in DOCUMENTED])
def test_synopsis_lists_the_commands_arguments_and_flags(synopsis):
    words, rest = command_of(synopsis)
    command = COMMANDS[words]
    params = [p for p in command.params if not p.hidden]
    arguments = [(p.metavar or p.name.upper()) + ("..." if p.nargs == -1 else "")  # variadic: NAME...
                 for p in params if p.param_type_name == "argument"]
    positional = []
    for word in rest:
        if word.startswith(("[", "-", "(")):
            break
        positional.append(word)
    assert positional == arguments, f"{synopsis.where}: {' '.join(words)} takes {arguments}; the synopsis shows " \
                                    f"{positional}"
    flags = {f for p in params if p.param_type_name == "option" for f in (*p.opts, *p.secondary_opts)}
    shown = set(FLAG.findall(" ".join(rest)))
    assert shown - flags == set(), f"{synopsis.where}: {' '.join(words)} has no {sorted(shown - flags)}"
    assert flags - shown == set(), f"{synopsis.where}: the synopsis of {' '.join(words)} leaves out " \
                                   f"{sorted(flags - shown)}"
