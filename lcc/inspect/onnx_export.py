"""A role's program as an ONNX model (the `onnx` package; opens in Netron): the program's nodes in program
order, lcc's operations and every collective as nodes of the custom `lcc` domain with their attributes
(mesh axis and group size, split sizes, int4 group size), standard ONNX operations where one is exactly
equivalent (Add, Mul, Sigmoid, Gather, Reshape, and Cast where torch promotes a bfloat16 branch added to
the float32 residual), parameters as typed graph inputs with the rank's local
shapes (no weights), and `value_info` giving every value's type and shape, which ONNX's shape inference
cannot derive through custom operations. Checked with `onnx.checker.check_model(full_check=True)`."""

from __future__ import annotations

import json
from typing import Any

from lcc.inspect.program_graph import Graph, role_graph
from lcc.inspect.target import InspectError, Target

OPSET = 21


def _onnx() -> Any:
    try:
        import onnx
    except ImportError:
        raise InspectError("--format onnx needs the onnx package: pip install -e '.[onnx]'") from None
    return onnx


def model(target: Target, role_name: str) -> bytes:
    onnx = _onnx()
    from onnx import TensorProto, helper

    from lcc import __version__

    dtypes = {"float32": TensorProto.FLOAT, "bfloat16": TensorProto.BFLOAT16, "float64": TensorProto.DOUBLE,
              "float16": TensorProto.FLOAT16, "int64": TensorProto.INT64, "int32": TensorProto.INT32,
              "uint8": TensorProto.UINT8, "bool": TensorProto.BOOL}
    plan = target.plan
    role = next(r for r in plan.roles if r.name == role_name)
    k_max = json.loads(target.text("spec.json"))["routing"]["k"]["max"] if plan.experts is not None else 1
    g: Graph = role_graph(plan, role, target.text(role.program), k_max)

    def info(v: Any) -> Any:
        return helper.make_tensor_value_info(v.name, dtypes[v.dtype], v.shape)

    constants = set(g.constants)
    boundary = {v.name for v in g.inputs} | {v.name for v in g.outputs} | constants
    nodes = [helper.make_node(n.op, n.inputs, n.outputs, name=f"{i}_{n.op}", domain=n.domain,
                              **({**n.attrs, "to": dtypes[n.attrs["to"]]} if n.op == "Cast" else n.attrs))
             for i, n in enumerate(g.nodes)]
    initializers = [helper.make_tensor(name, TensorProto.INT64, [len(dims)], dims)
                    for name, dims in g.constants.items()]
    graph = helper.make_graph(
        nodes, f"{plan.spec_name} {plan.mode} {role.name}",
        [info(v) for v in g.inputs], [info(v) for v in g.outputs], initializers,
        doc_string=f"lcc plan of {plan.spec_name} ({plan.mode}), role {role.name}: stage {role.stage} on pipeline "
                   f"rank {role.pp_rank}, layers [{role.layers[0]}, {role.layers[1]}); local shapes of one rank; "
                   f"program {role.program}",
        value_info=[info(v) for name, v in g.values.items() if name not in boundary])
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid("lcc", 1)],
                          producer_name="lcc", producer_version=__version__)
    try:
        onnx.checker.check_model(m, full_check=True)
    except onnx.checker.ValidationError as exc:  # a bug of lcc's, not of the user's input
        raise RuntimeError(f"the ONNX model of {role.name} does not check: {exc}") from None
    return m.SerializeToString()


def models(target: Target, role: str | None = None) -> dict[str, bytes]:
    """`<role>.onnx` for every role of the plan (or the one named)."""
    names = [r.name for r in target.plan.roles]
    if role is not None and role not in names:
        raise InspectError(f"--role {role}: the plan's roles are {', '.join(names)}")
    return {f"{name}.onnx": model(target, name) for name in names if role is None or name == role}
