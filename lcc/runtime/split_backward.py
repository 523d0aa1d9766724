"""A stage's backward in two actions, for the zero-bubble schedules (zb_h1, zbv): `I` computes the gradient of
the stage's input (everything between the stage's outputs and its input, collectives included, so that the
previous stage can go on at once), and `W` later the gradients of the weights.

In the autograd graph of a stage's forward, a weight enters at a *consumer*: the first node, coming from the
outputs, whose inputs include a weight (through nodes that see only weights: a transpose, a view, a cast).
`I` asks autograd for the input's gradient only, so consumers on its path compute their activations'
gradients and skip the weights' (autograd computes only what is asked for); a pre-hook keeps the gradient
each consumer received. `W` runs the backward from those kept gradients to the consumers' weights only
(consumers sharing a weight in one backward, so that its gradient accumulates once): no node between the
outputs and the consumers runs twice, no collective is issued again, and the weights' gradients accumulate
through autograd as a whole backward's do (their hooks fire: gradient buckets, ZeRO pieces). Numerically it
is the same backward, only split. A recomputed layer (activation checkpointing) and ZeRO-3's gathered
weights are one node for both parts: the spec checks refuse them with these schedules.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.autograd.graph import GradientEdge, Node


class SplitBackwardError(RuntimeError):
    """A graph the split cannot run exactly (the plan would not run as it says)."""


@dataclass
class Pending:
    """What `I` left for `W`: each consumer, the gradients it received and the weights it leads to."""

    consumers: list[Any] = field(default_factory=list)  # per group of consumers: (edges, gradients, weights)


def _weight_side(roots: Iterable[Node], weights: dict[Node, torch.Tensor]) -> tuple[dict[Node, set[Node]], set[Node]]:
    """(node -> the weights' accumulators it leads to through weight-only nodes, for the weight-only nodes
    and the accumulators themselves; every node reachable from `roots`)."""
    seen: set[Node] = set()
    order: list[Node] = []  # children before parents (an iterative post-order walk)
    stack: list[tuple[Node, bool]] = [(r, False) for r in roots]
    while stack:
        node, done = stack.pop()
        if done:
            order.append(node)
            continue
        if node in seen:
            continue
        seen.add(node)
        stack.append((node, True))
        stack += [(n, False) for n, _ in node.next_functions if n is not None and n not in seen]
    only: dict[Node, set[Node]] = {}
    for node in order:
        if node in weights:
            only[node] = {node}
            continue
        nexts = [n for n, _ in node.next_functions if n is not None]
        if nexts and all(n in only for n in nexts):
            only[node] = set().union(*(only[n] for n in nexts))
    return only, seen


def backward_input(ends: list[torch.Tensor], grads: list[torch.Tensor | None], stage_input: torch.Tensor | None,
                   weights: list[torch.Tensor]) -> Pending:
    """`I`: the stage input's gradient (accumulated into `stage_input.grad`), keeping what `W` needs."""
    acc = {}
    for w in weights:
        if w.requires_grad:
            edge = torch.autograd.graph.get_gradient_edge(w)
            acc[edge.node] = w
    roots = [e.grad_fn for e in ends if e.grad_fn is not None]
    only, reachable = _weight_side(roots, acc)
    pending = Pending()
    kept: dict[Node, Any] = {}
    handles = []
    for node in reachable:
        if node in only:
            continue
        leads = [n for n, _ in node.next_functions if n is not None and n in only]
        if not leads:
            continue
        params = [acc[a] for n in leads for a in only[n]]
        pending.consumers.append((node, (), params))
        handles.append(node.register_prehook(lambda g, node=node: kept.__setitem__(node, g)))
    try:
        (grad,) = torch.autograd.grad(ends, [stage_input], grads, retain_graph=True)
    finally:
        for h in handles:
            h.remove()
    stage_input.grad = grad if stage_input.grad is None else stage_input.grad + grad
    missing = [n.name() for n, _, _ in pending.consumers if n not in kept]
    if missing:
        raise SplitBackwardError(f"weights enter the stage off its input's path ({', '.join(missing[:3])}): "
                                 "their gradients cannot wait for W")
    pending.consumers = [(node, kept[node], params) for node, _, params in pending.consumers]
    pending.consumers = _joined(pending.consumers)
    return pending


def _joined(consumers: list[tuple[Node, tuple, list[torch.Tensor]]]) -> list[tuple[list[GradientEdge], list, list]]:
    """Consumers that share a weight (a weight split into per-group blocks, each with its matmul) in one
    backward each: a weight's gradient then accumulates once per W, as a whole backward's does, and its hooks
    fire once. Returns (edges, their gradients, the weights) per group of consumers."""
    group_of: dict[int, int] = {}
    groups: list[tuple[list[GradientEdge], list, dict[int, torch.Tensor]]] = []
    for node, grads, params in consumers:
        edges = [(GradientEdge(node, i), g) for i, g in enumerate(grads) if g is not None]
        hit = sorted({group_of[id(p)] for p in params if id(p) in group_of})
        target = hit[0] if hit else len(groups)
        if not hit:
            groups.append(([], [], {}))
        for other in hit[1:]:  # merge groups this consumer joins
            e, g, ps = groups[other]
            groups[target][0].extend(e)
            groups[target][1].extend(g)
            groups[target][2].update(ps)
            for key in ps:
                group_of[key] = target
            groups[other] = ([], [], {})
        groups[target][0].extend(e for e, _ in edges)
        groups[target][1].extend(g for _, g in edges)
        for p in params:
            groups[target][2][id(p)] = p
            group_of[id(p)] = target
    return [(e, g, list(ps.values())) for e, g, ps in groups if e]


def backward_weight(pending: Pending) -> None:
    """`W`: the weights' gradients from the gradients their consumers received in `I`."""
    for edges, grads, params in pending.consumers:
        torch.autograd.backward(edges, grads, inputs=params)
    pending.consumers.clear()
