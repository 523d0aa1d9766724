"""Walk the spec models by dotted path: which fields exist where, and what type a field holds."""

from __future__ import annotations

import difflib
import types
import typing
from typing import Any

from pydantic import BaseModel

from lcc.spec.errors import Path
from lcc.spec.models import Spec


def _members(annotation: Any) -> list[Any]:
    """The alternatives of a (possibly Annotated / Optional / Union) annotation."""
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return _members(typing.get_args(annotation)[0])
    if origin in (typing.Union, types.UnionType):
        return [m for arg in typing.get_args(annotation) for m in _members(arg)]
    return [annotation]


def submodel(annotation: Any) -> type[BaseModel] | None:
    for member in _members(annotation):
        if isinstance(member, type) and issubclass(member, BaseModel):
            return member
    return None


def model_at(path: Path) -> type[BaseModel] | None:
    """The pydantic model that a mapping at `path` is validated against (None if it is not a mapping)."""
    model: type[BaseModel] | None = Spec
    for part in path:
        if model is None or not isinstance(part, str) or part not in model.model_fields:
            return None
        model = submodel(model.model_fields[part].annotation)
    return model


def annotation_at(path: Path) -> Any:
    """The annotation of the field at `path`; KeyError naming the first unknown part."""
    model: type[BaseModel] | None = Spec
    annotation: Any = None
    for i, part in enumerate(path):
        if model is None or part not in model.model_fields:
            raise KeyError(i)
        annotation = model.model_fields[part].annotation
        model = submodel(annotation)
    return annotation


def is_text(annotation: Any) -> bool:
    """True when the field holds free text, so a command-line value must stay a string."""
    members = [m for m in _members(annotation) if m is not type(None)]
    return bool(members) and all(m is str for m in members)


def suggest(name: str, model: type[BaseModel] | None) -> str | None:
    if model is None:
        return None
    fields = list(model.model_fields)
    close = difflib.get_close_matches(name, fields, n=1, cutoff=0.6)
    if close:
        return f"did you mean {close[0]!r}?"
    return "known fields here: " + ", ".join(fields)


def allows_none(annotation: Any) -> bool:
    return type(None) in _members(annotation)
