"""Safe YAML loading that remembers where every value came from.

PyYAML's composer gives nodes with marks; we build plain Python values from them ourselves, so that no
object is ever constructed from a tag, aliases cannot expand without bound, duplicate keys are errors,
and every key and value keeps its `line:column`. Nesting depth is checked on the event stream first,
because the composer recurses once per level.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import yaml

from lcc.spec.errors import Location, Path, Problem, SpecError

MAX_BYTES = 4 * 1024 * 1024
MAX_DEPTH = 64
MAX_VALUES = 200_000

try:  # the C parser is much faster; fall back to the pure-Python one
    _Loader: type = yaml.CSafeLoader
except AttributeError:  # pragma: no cover - depends on how PyYAML was built
    _Loader = yaml.SafeLoader

_SCALAR_TAGS = {
    "tag:yaml.org,2002:str",
    "tag:yaml.org,2002:int",
    "tag:yaml.org,2002:float",
    "tag:yaml.org,2002:bool",
    "tag:yaml.org,2002:null",
}


@dataclass
class SourceMap:
    """Plain data from a YAML document plus the location of each path in it."""

    name: str
    data: Any
    marks: dict[Path, Location] = field(default_factory=dict)

    def locate(self, path: Path) -> Location:
        """The location of `path`, or of its nearest ancestor that appears in the document."""
        for i in range(len(path), -1, -1):
            mark = self.marks.get(tuple(path[:i]))
            if mark is not None:
                return mark
        return Location(self.name, 1, 1)


def _fail(name: str, line: int, column: int, message: str, hint: str | None = None) -> SpecError:
    return SpecError([Problem(Location(name, line, column), (), message, hint)])


def _yaml_error(name: str, exc: yaml.YAMLError) -> SpecError:
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    line, column = (mark.line + 1, mark.column + 1) if mark is not None else (1, 1)
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    context = getattr(exc, "context", None)
    text = f"not valid YAML: {problem}" + (f" ({context})" if context else "")
    return _fail(name, line, column, text)


def _decode(name: str, raw: bytes) -> str:
    if len(raw) > MAX_BYTES:
        raise _fail(name, 1, 1, f"file is {len(raw):,} bytes; a spec is at most {MAX_BYTES:,} bytes")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        column = exc.start - (raw.rfind(b"\n", 0, exc.start) + 1) + 1
        raise _fail(name, line, column, "not UTF-8 text (is this a binary file?)") from None
    if "\x00" in text:
        offset = text.index("\x00")
        line = text.count("\n", 0, offset) + 1
        raise _fail(name, line, 1, "contains a NUL byte (is this a binary file?)")
    return text


def _check_depth(name: str, text: str) -> None:
    depth = 0
    for event in yaml.parse(text, Loader=_Loader):
        if isinstance(event, (yaml.MappingStartEvent, yaml.SequenceStartEvent)):
            depth += 1
            if depth > MAX_DEPTH:
                mark = event.start_mark
                raise _fail(name, mark.line + 1, mark.column + 1, f"nested more than {MAX_DEPTH} levels deep")
        elif isinstance(event, (yaml.MappingEndEvent, yaml.SequenceEndEvent)):
            depth -= 1


class _Builder:
    def __init__(self, name: str):
        self.name = name
        self.marks: dict[Path, Location] = {}
        self.count = 0
        self.scalars = yaml.SafeLoader("")  # only its scalar constructors are used

    def location(self, node: yaml.Node) -> Location:
        return Location(self.name, node.start_mark.line + 1, node.start_mark.column + 1)

    def error(self, node: yaml.Node, message: str, hint: str | None = None) -> SpecError:
        mark = node.start_mark
        return _fail(self.name, mark.line + 1, mark.column + 1, message, hint)

    def build(self, node: yaml.Node, path: Path) -> Any:
        self.count += 1
        if self.count > MAX_VALUES:
            raise self.error(node, f"document expands to more than {MAX_VALUES:,} values",
                             "YAML aliases (*name) that expand recursively are not allowed to blow up a spec")
        if len(path) > MAX_DEPTH:
            raise self.error(node, f"nested more than {MAX_DEPTH} levels deep (a recursive alias?)")
        self.marks.setdefault(path, self.location(node))
        if isinstance(node, yaml.ScalarNode):
            if node.tag not in _SCALAR_TAGS:
                raise self.error(node, f"unsupported YAML tag {node.tag!r}",
                                 "a spec holds only plain strings, numbers, booleans, null, lists and mappings")
            try:
                return self.scalars.construct_object(node, deep=True)
            except (yaml.YAMLError, ValueError) as exc:
                raise self.error(node, f"cannot read scalar {node.value!r}: {exc}") from None
        if isinstance(node, yaml.SequenceNode):
            if node.tag != "tag:yaml.org,2002:seq":
                raise self.error(node, f"unsupported YAML tag {node.tag!r}")
            return [self.build(item, (*path, i)) for i, item in enumerate(node.value)]
        if isinstance(node, yaml.MappingNode):
            if node.tag != "tag:yaml.org,2002:map":
                raise self.error(node, f"unsupported YAML tag {node.tag!r}")
            out: dict[str, Any] = {}
            for key_node, value_node in node.value:
                if isinstance(key_node, yaml.ScalarNode) and key_node.value == "<<":
                    raise self.error(key_node, "YAML merge keys (<<) are not supported in specs")
                if not isinstance(key_node, yaml.ScalarNode) or key_node.tag != "tag:yaml.org,2002:str":
                    raise self.error(key_node, "mapping keys must be plain names",
                                     "quote the key if it looks like a number, boolean or null")
                key = key_node.value
                if key in out:
                    first = self.marks[(*path, key)]
                    raise self.error(key_node, f"duplicate key {key!r} (first defined at line {first.line})")
                self.marks[(*path, key)] = self.location(key_node)
                out[key] = self.build(value_node, (*path, key))
            return out
        raise self.error(node, f"unsupported YAML node {type(node).__name__}")  # pragma: no cover


def load_yaml(raw: bytes | str, name: str) -> SourceMap:
    """Parse one YAML document into plain data and the locations of its paths. Raises SpecError."""
    text = _decode(name, raw.encode("utf-8") if isinstance(raw, str) else raw)
    try:
        _check_depth(name, text)
        documents = list(yaml.compose_all(text, Loader=_Loader))
    except yaml.YAMLError as exc:
        raise _yaml_error(name, exc) from None
    except RecursionError:  # pragma: no cover - prevented by _check_depth
        raise _fail(name, 1, 1, "nested too deeply") from None
    documents = [d for d in documents if d is not None]
    if not documents:
        raise _fail(name, 1, 1, "file is empty", "a spec needs at least: name, model, parallelism, cluster, train")
    if len(documents) > 1:
        raise _fail(name, documents[1].start_mark.line + 1, 1, "more than one YAML document (---) in a spec")
    builder = _Builder(name)
    data = builder.build(documents[0], ())
    return SourceMap(name, data, builder.marks)
