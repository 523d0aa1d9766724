"""Which layouts of a model the spec's rules allow, asked as cheaply as `lcc plan search` needs over hundreds
of thousands of layouts: a layout's spec (`on_cluster`), what the rules say against it (`problems`), the rules
that can judge layouts differently at all (`layout_rules`), and rules judged once per value of the few layout
fields they read, before a layout's spec is built (`early_refusal`)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from lcc.search.space import Layout
from lcc.spec.checks import (
    RULES,
    attention_heads,
    batch,
    expert_exchange,
    expert_overlap,
    expert_parallel,
    pipeline,
    tensor_parallel_widths,
    world,
)
from lcc.spec.models import Spec


def on_cluster(spec: Spec, layout: Layout, nodes: int, per_node: int, cluster: Any = None) -> Spec:
    """The spec with `layout` on `nodes` nodes of `per_node` devices (`cluster`: that cluster section, made
    once by a caller that builds many layouts)."""
    cluster = cluster or spec.cluster.model_copy(update={"nodes": nodes, "gpus_per_node": per_node})
    return spec.model_copy(update={"parallelism": layout.parallelism(), "cluster": cluster})


def problems(spec: Spec, rules: Iterable[Callable] = RULES) -> list[str]:
    return [f"{'.'.join(map(str, found.path))}: {found.message}" for fn in rules for found in fn(spec)]


class _ReadsLayout(Exception):
    pass


class _Unread:
    """Stands for a layout's sections (`parallelism`, `cluster`): reading it says the rule depends on them."""

    def __getattr__(self, name: str) -> Any:
        raise _ReadsLayout(name)


def layout_rules(spec: Spec, rules: Iterable[Callable] = RULES) -> list[Callable]:
    """The rules whose verdict can differ between layouts of `spec`'s model: those that read `parallelism` or
    `cluster` on their path through it (each run once with both sections replaced by a stand-in that refuses
    to be read), and those that find a problem in the model itself (every layout then gets it). The others
    take the same path through every layout, so they pass every layout as they pass this one."""
    stand_in = spec.model_copy(update={"parallelism": _Unread(), "cluster": _Unread()})
    out = []
    for fn in rules:
        try:
            if not any(True for _ in fn(stand_in)):
                continue
        except _ReadsLayout:
            pass
        out.append(fn)
    return out


def _ALWAYS(layout: Layout) -> bool:  # noqa: N802 - a constant predicate, named as one
    return True


# rules that read a few of a layout's fields (and the spec's model and cluster, the same for every layout):
# their verdict is kept per value of those fields, and a layout they refuse is not built
_FEW_FIELDS: tuple[tuple[Callable, Callable[[Layout], bool], Callable[[Layout], tuple]], ...] = (
    (expert_exchange, lambda lay: lay.exchange != "flat", lambda lay: (lay.tp, lay.pp, lay.dp, lay.ep, lay.exchange)),
    (expert_overlap, lambda lay: lay.overlap, lambda lay: (lay.ep, lay.exchange, lay.overlap, lay.recompute)),
    (pipeline, lambda lay: lay.pp > 1, lambda lay: (lay.pp, lay.schedule, lay.virtual_stages, lay.microbatches)),
    (attention_heads, _ALWAYS, lambda lay: (lay.tp,)),
    (tensor_parallel_widths, _ALWAYS, lambda lay: (lay.tp, lay.sp)),
    (world, _ALWAYS, lambda lay: (lay.tp, lay.pp, lay.dp)),
    (expert_parallel, _ALWAYS, lambda lay: (lay.tp, lay.dp, lay.ep)),
    (batch, _ALWAYS, lambda lay: (lay.tp, lay.dp, lay.microbatches)),
)


def early_refusal(spec: Spec, layout: Layout, cluster: Any, seen: dict[tuple, list[str]]) -> list[str]:
    """What the rules in _FEW_FIELDS say against `layout`, each asked once per value of the fields it reads."""
    for fn, applies, fields in _FEW_FIELDS:
        if applies(layout):
            key = (fn.__name__, *fields(layout))
            if key not in seen:
                seen[key] = problems(on_cluster(spec, layout, cluster.nodes, cluster.gpus_per_node, cluster), [fn])
            if seen[key]:
                return seen[key]
    return []


ALWAYS_ASKED_EARLY = frozenset(fn for fn, applies, _ in _FEW_FIELDS if applies is _ALWAYS)  # not asked again
