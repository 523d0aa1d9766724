"""From a file (plus --set overrides) to a validated Spec, or a SpecError that says where and why."""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import re
import stat
from typing import Any

from pydantic import ValidationError

from lcc.spec.checks import check
from lcc.spec.errors import Location, Path, Problem, SpecError
from lcc.spec.fields import model_at, suggest
from lcc.spec.models import Spec
from lcc.spec.overrides import apply_overrides
from lcc.spec.yaml_source import MAX_BYTES, SourceMap, load_yaml


def _data_path(data: Any, loc: tuple[Any, ...], missing: bool) -> Path:
    """Keep the parts of a pydantic error location that index into the data (drops union member tags)."""
    path: list[str | int] = []
    node = data
    for i, part in enumerate(loc):
        in_dict = isinstance(node, dict) and isinstance(part, str) and part in node
        in_list = isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node)
        if in_dict or in_list:
            node = node[part]
            path.append(part)
        elif missing and i == len(loc) - 1 and isinstance(part, str):
            path.append(part)
    return tuple(path)


def _plain_name(text: str) -> str:
    """A valid spec name close to `text` ('' when nothing usable is left): lowercase, other characters as '-'."""
    name = re.sub(r"[^a-z0-9._-]+", "-", text.lower())
    return re.sub(r"^[^a-z0-9]+", "", name)[:100]


def _describe(error: dict[str, Any], path: Path) -> tuple[str, str | None]:
    kind = error["type"]
    if kind == "string_pattern_mismatch" and path == ("name",):
        suggestion = _plain_name(str(error.get("input")))
        return (f"{error.get('input')!r} is not a plain folder name: use lowercase letters, digits, '.', '_' and '-', "
                "starting with a letter or digit",
                f"the name is also the output folder generated/<name>/; try name: {suggestion or 'my-model'}")
    if kind == "extra_forbidden":
        name = str(path[-1])
        return f"unknown field {name!r}", suggest(name, model_at(path[:-1]))
    if kind == "missing":
        return "required field is missing", None
    value = error.get("input")
    shown = repr(value) if not isinstance(value, (dict, list)) else type(value).__name__
    if len(shown) > 60:
        shown = shown[:57] + "..."
    message = error["msg"]
    if kind in ("literal_error",):
        message = message.replace("Input should be", "expected")
    return f"{message}; got {shown}", None


def _problems(exc: ValidationError, source: SourceMap) -> list[Problem]:
    by_path: dict[Path, list[tuple[str, str | None]]] = {}
    for error in exc.errors(include_url=False):
        path = _data_path(source.data, error["loc"], error["type"] == "missing")
        described = _describe(error, path)
        if described not in by_path.setdefault(path, []):
            by_path[path].append(described)
    problems = []
    for path, found in by_path.items():
        if len(found) == 1:
            message, hint = found[0]
        else:  # a union: one error per alternative
            message = "matches none of the allowed forms: " + "; ".join(m for m, _ in found)
            hint = next((h for _, h in found if h), None)
        problems.append(Problem(source.locate(path), path, message, hint))
    return problems


def validate(source: SourceMap) -> Spec:
    """Validate parsed data: field types and ranges first, then the cross-field rules."""
    if not isinstance(source.data, dict):
        kind = "list" if isinstance(source.data, list) else type(source.data).__name__
        raise SpecError([Problem(source.locate(()), (), f"a spec is a mapping of sections; got a {kind}",
                                 "start with name:, model:, parallelism:, cluster:, train: (see docs/spec.md)")])
    try:
        spec = Spec.model_validate(source.data)
    except ValidationError as exc:
        raise SpecError(_problems(exc, source)) from None
    problems = check(spec, source)
    if problems:
        raise SpecError(problems)
    spec._source = source
    return spec


def load_spec(path: str | os.PathLike[str], overrides: list[str] | tuple[str, ...] = ()) -> Spec:
    """Read, override and validate a spec file. Raises SpecError (never another exception) on bad input."""
    name = os.fspath(path)
    try:
        mode = os.stat(name).st_mode
    except OSError as exc:
        raise SpecError([Problem(Location(name), (), f"cannot read spec: {exc.strerror}")]) from None
    if not stat.S_ISREG(mode):  # a folder, a FIFO or a device would hang or fail later
        kind = "a folder" if stat.S_ISDIR(mode) else "not a regular file"
        raise SpecError([Problem(Location(name), (), f"cannot read spec: {kind} (a spec is a YAML file)")])
    try:
        with open(name, "rb") as f:
            raw = f.read(MAX_BYTES + 1)  # enough to tell that it is too large
    except OSError as exc:
        raise SpecError([Problem(Location(name), (), f"cannot read spec: {exc.strerror}")]) from None
    spec = validate(apply_overrides(load_yaml(raw, name), overrides))
    spec._folder = pathlib.Path(name).parent  # train.data.path is relative to it (lcc.spec.data)
    return spec


def locate(spec: Spec, path: Path) -> Location:
    """Where a field of a loaded spec was written (file:line:col, or the --set that gave it)."""
    source = spec._source
    if isinstance(source, SourceMap):
        return source.locate(path)
    return Location(spec.name)


def resolved(spec: Spec) -> dict[str, Any]:
    """The spec with every default filled in, as plain JSON data (what plans and caches are keyed by)."""
    return spec.model_dump(mode="json")


def spec_hash(spec: Spec) -> str:
    text = json.dumps(resolved(spec), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()
