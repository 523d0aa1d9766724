"""The shape rules of the MoE block's ops for lcc.inspect.program_graph: routing, the exchange plans, the
all-to-alls (flat, hierarchical, and overlapped halves with their waits), the experts and the combine."""

from __future__ import annotations

from typing import Any

from lcc.inspect.graph_values import Struct, Value
from lcc.plan.op_table import Op


class MoERules:
    """Mixed into program_graph's reader: `rule_<graph>` methods, as the op table names them."""

    def _route(self, x: Value, inputs: list[Value], name: str, op: str) -> Struct:
        k = self.k_max
        rows = x.shape[0]
        fields = {"experts_TK": self.new(f"{name}.experts", "int64", [rows, k]),
                  "gates_TK": self.new(f"{name}.gates", "float32", [rows, k]),
                  "mask_TK": self.new(f"{name}.mask", "bool", [rows, k])}
        self.node(op, inputs, list(fields.values()))
        return Struct(fields)

    def rule_route(self, op: Op, args, kw, name, target):
        x, centroids, weight, bias = args[:4]
        return self._route(x, [x, centroids, weight, bias], name, op.name)

    def rule_route_tables(self, op: Op, args, kw, name, target):
        x, tables = args
        return self._route(x, [x, *tables.fields.values()], name, op.name)

    def rule_unit_balance(self, op: Op, args, kw, name, target):
        """The routing result passes on; the node all-reduces the unit's expert counts into its balance loss."""
        route, g = args
        self.node(op.name, list(route.fields.values()), [self.new(f"{name}.aux_loss", "float32", [])],
                  **self._group(g))
        return route

    def rule_moe_plan(self, op: Op, args, kw, name, target):
        route, n_experts, g = args[0], kw["n_experts"], kw["group"]
        per = n_experts // g.size
        fields = {"token_S": self.new(f"{name}.token_S", "int64", ["slots"]),
                  "send": self.new(f"{name}.send", "int64", [g.size]),
                  "recv": self.new(f"{name}.recv", "int64", [g.size]),
                  "order": self.new(f"{name}.order", "int64", ["received_rows"]),
                  "inverse": self.new(f"{name}.inverse", "int64", ["received_rows"]),
                  "local_counts_E": self.new(f"{name}.local_counts_E", "int64", [per])}
        self.node("moe_plan", list(route.fields.values()), list(fields.values()), n_experts=n_experts,
                  **self._group(g))
        fields["gates"] = route.fields["gates_TK"]
        return Struct(fields)

    def rule_node_plan(self, op: Op, args, kw, name, target):
        """Rows per (token, node) out; in, the slots this rank forwards: rows, gates, slots per expert."""
        route, n_experts, g = args[0], kw["n_experts"], kw["group"]
        gates = route.fields["gates_TK"].dtype
        forwarded = {"token_S": self.new(f"{name}.forwarded.token_S", "int64", ["forwarded_slots"]),
                     "gates_TK": self.new(f"{name}.forwarded.gates", gates, ["forwarded_slots"]),
                     "counts_E": self.new(f"{name}.forwarded.counts_E", "int64", [n_experts // g.size])}
        fields = {"token_S": self.new(f"{name}.token_S", "int64", ["node_rows"]),
                  **{k: self.new(f"{name}.{k}", "int64", [g.size]) for k in ("send", "recv")}}
        self.node("node_plan", list(route.fields.values()), [*fields.values(), *forwarded.values()],
                  n_experts=n_experts, **self._group(g))
        ones = self.new(f"{name}.ones", gates, ["node_rows"])
        return Struct({**fields, "gates": ones, "forwarded": Struct(forwarded)})

    def rule_all_to_all(self, op: Op, args, kw, name, target):
        x, send, recv, g = args
        rows = "received_rows" if recv.name.endswith(".recv") else "slots"
        out = self.new(name, x.dtype, [rows, *x.shape[1:]])
        self.node("all_to_all", [x, send, recv], [out], split_sizes="data-dependent (send, recv)", **self._group(g))
        return out

    def _experts(self, args, name, op: str) -> Value:
        x, counts, w1, w3, w2 = args
        inputs = [x, counts]
        attrs: dict[str, Any] = {}
        for w in (w1, w3, w2):
            inputs += list(w.fields.values()) if isinstance(w, Struct) else [w]
        if isinstance(w2, Struct):
            d = w2.fields["packed"].shape[1]
            attrs["int4_group_size"] = self.plan.serving.group_size
            attrs["expert_kernel"] = self.plan.serving.expert_kernel
        else:
            d = w2.shape[1]
        dtype = self.compute if self.plan.mode == "train" else x.dtype  # grouped matmuls autocast
        out = self.new(name, dtype, [x.shape[0], d])
        self.node(op, inputs, [out], **attrs)
        return out

    def rule_experts(self, op: Op, args, kw, name, target):
        return self._experts(args, name, op.name)

    def rule_combine_tokens(self, op: Op, args, kw, name, target):
        y, plan, x = args
        out = self.new(name, y.dtype, x.shape)  # the experts' outputs, gate-weighted, in their dtype
        self.node("combine_tokens", [y, plan.fields["token_S"], plan.fields["gates"]], [out])
        return out

    def rule_moe_plan_halves(self, op: Op, args, kw, name, target):
        """Two exchange plans (each half of the tokens), each as moe_plan's; both halves' slots in order."""
        route, n_experts, g = args[0], kw["n_experts"], kw["group"]
        halves = {h: self.rule_moe_plan(op, args, kw, f"{name}.{h}", target) for h in ("a", "b")}
        fields = {"token_S": self.new(f"{name}.token_S", "int64", ["slots"]),
                  "slots_a": self.new(f"{name}.slots_a", "int64", ["slots_a"]),
                  "slots_b": self.new(f"{name}.slots_b", "int64", ["slots_b"])}
        self.node("moe_plan_halves", list(route.fields.values()), list(fields.values()), n_experts=n_experts,
                  **self._group(g))
        return Struct({**fields, **halves, "gates": route.fields["gates_TK"]})

    def rule_all_to_all_start(self, op: Op, args, kw, name, target):
        """The exchange, begun: its output (read after exchange_wait) and the pending work."""
        x, send, recv, g = args
        out = self.new(name, x.dtype, ["received_rows" if recv.name.endswith(".recv") else "slots", *x.shape[1:]])
        work = self.new(f"{name}.work", "int64", [])
        self.node("all_to_all_start", [x, send, recv], [out, work], split_sizes="data-dependent (send, recv)",
                  **self._group(g))
        return out, work

    def rule_exchange_wait(self, op: Op, args, kw, name, target):
        x, work = args
        out = self.new(name, x.dtype, x.shape)
        self.node("exchange_wait", [x, work], [out])
        return out

    def rule_cat_rows(self, op: Op, args, kw, name, target):
        a, b = args
        out = self.new(name, a.dtype, ["slots", *a.shape[1:]])
        self.node("Concat", [a, b], [out], domain="", axis=0)
        return out
