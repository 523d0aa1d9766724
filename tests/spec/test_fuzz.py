"""Property: whatever the input, loading gives a Spec or a SpecError, never another exception."""

from __future__ import annotations

import contextlib
import copy

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lcc.spec import SpecError, validate
from lcc.spec.overrides import apply_overrides
from lcc.spec.yaml_source import load_yaml
from tests.conftest import SHIPPED

BASES = [yaml.safe_load(p.read_text()) for p in SHIPPED]

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20), st.sampled_from(["all", "1f1b", "softmax", "cuda", "float64", "[]", "{}"]),
)
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8),
                                                                                          inner, max_size=3),
                      max_leaves=8)


def _paths(node, prefix=()):
    yield prefix
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _paths(v, (*prefix, i))


def _mutate(data, path, action, value):
    data = copy.deepcopy(data)
    if not path:
        return value if action == "replace" else data
    parent = data
    for part in path[:-1]:
        parent = parent[part]
    key = path[-1]
    if action == "delete":
        del parent[key]
    elif action == "replace":
        parent[key] = value
    elif action == "rename" and isinstance(parent, dict):
        parent[str(key) + "_x"] = parent.pop(key)
    return data


def _load(text: str | bytes):
    try:
        return validate(load_yaml(text, "fuzz.yaml"))
    except SpecError:
        return None


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_mutated_shipped_specs(data):
    base = data.draw(st.sampled_from(BASES))
    paths = list(_paths(base))
    for _ in range(data.draw(st.integers(1, 3))):
        path = data.draw(st.sampled_from(paths))
        action = data.draw(st.sampled_from(["replace", "delete", "rename"]))
        base = _mutate(base, path, action, data.draw(values))
        paths = list(_paths(base))
    _load(yaml.safe_dump(base, allow_unicode=True))


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=400))
def test_garbage_bytes(raw):
    _load(raw)


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=st.sampled_from(list("ab:-[]{}&*!|>'\"#,?\n\t 01.%@`")), max_size=200))
def test_garbage_yaml_text(text):
    _load(text)


@settings(max_examples=150, deadline=None)
@given(st.lists(st.text(alphabet=st.sampled_from(list("abcdemnoprstuz._=[]0123456789-")), max_size=30),
                max_size=3))
def test_garbage_overrides(overrides):
    source = load_yaml(SHIPPED[0].read_bytes(), "s.yaml")
    with contextlib.suppress(SpecError):
        validate(apply_overrides(source, overrides))
