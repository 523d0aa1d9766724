"""The values, nodes and graphs `lcc.inspect.program_graph` builds from a program, and the arithmetic of
their dimensions: a dimension is a number or, where it depends on the data, a name ("tokens", "slots"),
so products and quotients of named dimensions stay readable expressions."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

Dim = int | str


class GraphError(ValueError):
    """A program line the graph reader does not know (a new op without its shape rule)."""


@dataclass
class Value:
    name: str
    dtype: str  # float32 | bfloat16 | float64 | int64 | uint8 | float16 | bool
    shape: list[Dim]


@dataclass
class Node:
    op: str
    domain: str  # "lcc" or "" (standard ONNX)
    inputs: list[str]
    outputs: list[str]
    attrs: dict[str, Any] = field(default_factory=dict)


@dataclass
class Struct:
    """A routing result or an expert-parallel exchange plan: several values under field names."""

    fields: dict[str, Value]


@dataclass
class Group:
    axis: str
    size: int


@dataclass
class Graph:
    name: str
    inputs: list[Value]
    outputs: list[Value]
    nodes: list[Node]
    values: dict[str, Value]  # every value, inputs and outputs included
    constants: dict[str, list[int]] = field(default_factory=dict)  # int64 initializers (Reshape's shapes)


def prod_dims(dims: list[Dim]) -> Dim:
    if all(isinstance(d, int) for d in dims):
        return math.prod(dims)  # type: ignore[arg-type]
    named = [str(d) for d in dims if d != 1]
    return "*".join(named) if len(named) > 1 else named[0]


def infer_dim(shape: list[Dim], known: list[Dim]) -> Dim:
    """The -1 of a reshape of `shape` whose other dims are `known`: what is left of shape's dims once the
    known ones are taken out (exactly, when they are among them), else the quotient."""
    rest = list(shape)
    for d in known:
        if d in rest:
            rest.remove(d)
        else:
            total, part = prod_dims(shape), prod_dims(known)
            return over(total, part) if isinstance(total, int) and isinstance(part, int) else f"{total}/{part}"
    return prod_dims(rest) if rest else 1


WIDTH = {"float64": 4, "float32": 3, "bfloat16": 2, "float16": 2}


def promote(a: str, b: str) -> str:
    """torch's type promotion of two floating dtypes (the residual stream in float32 plus a bfloat16
    branch under autocast is float32)."""
    return a if WIDTH.get(a, 0) >= WIDTH.get(b, 0) else b


def times(d: Dim, n: int) -> Dim:
    return d * n if isinstance(d, int) else f"{d}*{n}"


def over(d: Dim, n: int) -> Dim:
    return d // n if isinstance(d, int) and d % n == 0 else f"{d}/{n}"
