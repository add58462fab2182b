"""The op table of the torch converter: ONNX op type -> a small function of torch tensors.

Each family module registers its ops with `@op("Name", ...)`; a function receives the node's
inputs (None for an omitted optional input), its attributes (a dict, defaults not filled in)
and the node's context (opset, name, and a runner for subgraphs), and returns one tensor or a
list of outputs.

    @op("Relu")
    def relu(args, a, ctx):
        return torch.relu(args[0])
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import onnx

from onnxpress.errors import UnsupportedOpError

OpFn = Callable[[list, dict, "NodeContext"], Any]
OPS: dict[str, OpFn] = {}
SEQUENCE_VALUED: set[str] = set()  # ops whose one output is a sequence (a list of tensors)


def op(*names: str, sequence: bool = False) -> Callable[[OpFn], OpFn]:
    """Register a function for one or more op types (default ONNX domain); `sequence`: its
    single output is a sequence, returned as a Python list."""
    def deco(fn: OpFn) -> OpFn:
        for name in names:
            OPS[name] = fn
            if sequence:
                SEQUENCE_VALUED.add(name)
        return fn
    return deco


class NodeContext:
    """What an op function may need besides its inputs: the opset, the node (for messages),
    the enclosing scope (outer values a subgraph reads) and the graph runner."""

    __slots__ = ("node", "opset", "interpreter", "scope")

    def __init__(self, node: onnx.NodeProto, opset: int, interpreter):
        self.node = node
        self.opset = opset
        self.interpreter = interpreter
        self.scope: dict | None = None

    def unsupported(self, what: str) -> UnsupportedOpError:
        return unsupported_error(self.node, what)

    def run_graph(self, graph: onnx.GraphProto, inputs: list) -> list:
        """Run a subgraph (If/Loop/Scan body) with `inputs` bound to its graph inputs; outer
        names resolve in the enclosing scope."""
        return self.interpreter.run(graph, inputs, self.scope)


def unsupported_error(node: onnx.NodeProto, what: str | None = None) -> UnsupportedOpError:
    op_name = f"{node.domain + '.' if node.domain not in ('', 'ai.onnx') else ''}{node.op_type}"
    tail = f": {what}" if what else " is not supported by onnxpress's torch converter"
    err = UnsupportedOpError(f"distill: op {op_name} (node '{node.name}'){tail}")
    err.op_type = op_name
    return err


# -- helpers shared by the families --------------------------------------------------------------
def arg(args: list, i: int):
    """Input i, or None when omitted."""
    return args[i] if len(args) > i else None


def ints(x) -> list[int]:
    """A 1-D int tensor, array or list as a Python list."""
    if x is None:
        return []
    if hasattr(x, "tolist"):
        x = x.tolist()
    if isinstance(x, (int, float)):
        return [int(x)]
    return [int(v) for v in x]


def scalar(x) -> float | int | bool:
    return x.reshape(-1)[0].item() if hasattr(x, "reshape") else x


def torch_dtype(onnx_type: int, node: onnx.NodeProto | None = None):
    import torch

    table = {
        onnx.TensorProto.FLOAT: torch.float32, onnx.TensorProto.DOUBLE: torch.float64,
        onnx.TensorProto.FLOAT16: torch.float16, onnx.TensorProto.BFLOAT16: torch.bfloat16,
        onnx.TensorProto.INT8: torch.int8, onnx.TensorProto.INT16: torch.int16,
        onnx.TensorProto.INT32: torch.int32, onnx.TensorProto.INT64: torch.int64,
        onnx.TensorProto.UINT8: torch.uint8, onnx.TensorProto.UINT16: torch.uint16,
        onnx.TensorProto.UINT32: torch.uint32, onnx.TensorProto.UINT64: torch.uint64,
        onnx.TensorProto.BOOL: torch.bool,
    }
    if onnx_type not in table:
        name = onnx.TensorProto.DataType.Name(onnx_type)
        if node is not None:
            raise unsupported_error(node, f"element type {name} has no torch equivalent")
        raise UnsupportedOpError(f"distill: element type {name} has no torch equivalent")
    return table[onnx_type]


def as_tensor(value, node: onnx.NodeProto | None = None):
    """A numpy array (initializer, attribute) as a torch tensor (copied: torch may write)."""
    import torch

    arr = np.asarray(value)
    if arr.dtype == object or arr.dtype.kind in "SU":
        if node is not None:
            raise unsupported_error(node, "string tensors have no torch equivalent")
        raise UnsupportedOpError("distill: string tensors have no torch equivalent")
    try:
        return torch.from_numpy(np.array(arr))
    except TypeError:
        what = f"element type {arr.dtype} has no torch equivalent"
        raise (unsupported_error(node, what) if node is not None
               else UnsupportedOpError(f"distill: {what}")) from None
