"""`--set a.b.c=value`: change any field of a spec before it is validated, typed by the schema."""

from __future__ import annotations

from typing import Any

import yaml

from lcc.spec.errors import Location, Path, Problem, SpecError
from lcc.spec.fields import allows_none, annotation_at, is_text, model_at, suggest
from lcc.spec.yaml_source import SourceMap


def parse_override(text: str) -> tuple[Path, Any]:
    """`'parallelism.pipeline.microbatches=8'` -> (path, 8). Raises SpecError for bad syntax or fields."""
    where = Location(f"--set {text}")
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise SpecError([Problem(where, (), "expected --set a.b.c=value", "e.g. --set parallelism.dp=8")])
    path: Path = tuple(part.strip() for part in key.split("."))
    if any(not part for part in path):
        raise SpecError([Problem(where, (), f"empty field name in {key!r}")])
    try:
        annotation = annotation_at(path)
    except KeyError as exc:
        i = exc.args[0]
        unknown = path[: i + 1]
        raise SpecError([Problem(where, unknown, f"unknown field {path[i]!r}",
                                 suggest(str(path[i]), model_at(path[:i])))]) from None
    if is_text(annotation):
        return path, None if raw.strip() in ("null", "~") and allows_none(annotation) else raw
    try:
        return path, yaml.safe_load(raw) if raw.strip() else None
    except (yaml.YAMLError, RecursionError):
        raise SpecError([Problem(where, path, f"cannot read value {raw[:60]!r}")]) from None


def apply_overrides(source: SourceMap, overrides: list[str] | tuple[str, ...]) -> SourceMap:
    """Return a new SourceMap with each override set; the overridden paths point at the command line."""
    if not overrides:
        return source
    if not isinstance(source.data, dict):
        return source  # the validator reports the malformed document itself
    data = _deep_copy(source.data)
    marks = dict(source.marks)
    for text in overrides:
        path, value = parse_override(text)
        node = data
        where = Location(f"--set {text}")
        for i, part in enumerate(path[:-1]):
            child = node.get(part)
            if not isinstance(child, dict):
                child = {}
                node[part] = child
                marks[path[: i + 1]] = where  # a section the override creates is located at the override
            node = child
        node[path[-1]] = value
        for existing in [p for p in marks if p[: len(path)] == path]:
            del marks[existing]
        marks[path] = where
    return SourceMap(source.name, data, marks)


def _deep_copy(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _deep_copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_deep_copy(v) for v in value]
    return value
