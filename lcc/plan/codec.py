"""plan.json <-> Plan: deterministic text (sorted keys, one line per rank row), a version check on read,
and errors that say which field of which file is wrong."""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from functools import cache
from pathlib import Path
from typing import Any

from lcc.plan.types import PLAN_VERSION, Plan


class PlanFormatError(ValueError):
    """A plan file this lcc cannot execute: another version, or not a plan."""


def to_data(value: Any) -> Any:
    if dataclasses.is_dataclass(value):
        return {f.name: to_data(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (list, tuple)):
        return [to_data(v) for v in value]
    if isinstance(value, dict):
        return {str(k): to_data(v) for k, v in value.items()}
    return value


def dumps(plan: Plan) -> str:
    """Indented JSON with sorted keys, except that each rank row stays on one line (2,048 rows would
    otherwise be 20,000 lines)."""
    data = to_data(plan)
    rows = data["ranks"]["rows"]
    data["ranks"]["rows"] = "@ROWS@"
    text = json.dumps(data, indent=1, sort_keys=True)
    body = ",\n".join("   " + json.dumps(r, separators=(",", ":")) for r in rows)
    return text.replace('"@ROWS@"', "[\n" + body + "\n  ]") + "\n"


@cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _build(tp: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _build(options[0], value, where)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise PlanFormatError(f"{where}: expected an object, got {type(value).__name__}")
        hints = _hints(tp)
        kwargs = {}
        for f in dataclasses.fields(tp):
            if f.name in value:
                kwargs[f.name] = _build(hints[f.name], value[f.name], f"{where}.{f.name}")
            elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise PlanFormatError(f"{where}: missing field {f.name!r}")
        unknown = sorted(set(value) - {f.name for f in dataclasses.fields(tp)})
        if unknown:
            raise PlanFormatError(f"{where}: unknown field {unknown[0]!r}")
        return tp(**kwargs)
    if origin is list:
        if not isinstance(value, list):
            raise PlanFormatError(f"{where}: expected a list, got {type(value).__name__}")
        (item,) = typing.get_args(tp)
        return [_build(item, v, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise PlanFormatError(f"{where}: expected an object, got {type(value).__name__}")
        _, item = typing.get_args(tp)
        return {k: _build(item, v, f"{where}.{k}") for k, v in value.items()}
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp in (int, float, str, bool) and not isinstance(value, tp):
        raise PlanFormatError(f"{where}: expected {tp.__name__}, got {value!r}")
    return value


def loads(text: str, source: str = "plan.json") -> Plan:
    """Read a plan, refusing another plan version before anything else."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise PlanFormatError(f"{source}: not JSON ({exc})") from None
    if not isinstance(data, dict):
        raise PlanFormatError(f"{source}: not a plan")
    version = data.get("version")
    if version != PLAN_VERSION:
        raise PlanFormatError(f"{source}: plan version {version}, but this lcc executes version {PLAN_VERSION} "
                              "plans; compile the spec again with this lcc (lcc compile)")
    return _build(Plan, data, source)


def read_plan(plan_dir: Path) -> Plan:
    path = Path(plan_dir) / "plan.json"
    if not path.is_file():
        raise PlanFormatError(f"{path}: missing (not a compiled plan folder)")
    return loads(path.read_text(), str(path))
