"""Model statistics: node and parameter counts, bytes, op histogram and MACs per layer.

MACs are counted the usual way: one multiply-accumulate per weight use. Conv:
N*Cout*Hout*Wout * (Cin/group)*kH*kW; ConvTranspose: N*Cin*Hin*Win * (Cout/group)*kH*kW;
MatMul/Gemm: batch*M*N*K. Elementwise ops, pooling and normalisation are not counted (they are
memory-bound and conventionally left out of MAC figures).
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from typing import Iterator

import numpy as np
import onnx


def iter_graphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    """The graph and every subgraph (If/Loop/Scan bodies), depth first."""
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from iter_graphs(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for g in attr.graphs:
                    yield from iter_graphs(g)


def iter_nodes(graph: onnx.GraphProto) -> Iterator[onnx.NodeProto]:
    for g in iter_graphs(graph):
        yield from g.node


def _tensor_elems(t: onnx.TensorProto) -> int:
    return int(np.prod(t.dims)) if len(t.dims) else 1


def count_nodes(model: onnx.ModelProto) -> int:
    return sum(1 for _ in iter_nodes(model.graph))


def iter_constant_tensors(model: onnx.ModelProto) -> Iterator[tuple[str, onnx.TensorProto]]:
    """(name, tensor) of every constant, subgraphs included: initializers, sparse initializers'
    values and Constant-node tensors (PaddlePaddle's exporter and others keep weights there)."""
    for g in iter_graphs(model.graph):
        for t in g.initializer:
            yield t.name, t
        for t in g.sparse_initializer:
            yield t.values.name, t.values
        for node in g.node:
            if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
                for a in node.attribute:
                    if a.type == onnx.AttributeProto.TENSOR:
                        yield node.output[0], a.t


def count_params(model: onnx.ModelProto) -> int:
    """Elements in initializers and Constant-node tensors, subgraphs included."""
    return sum(_tensor_elems(t) for _, t in iter_constant_tensors(model))


def model_bytes(model: onnx.ModelProto) -> int:
    """Serialized size in bytes (external data included when loaded), to within a few bytes.

    protobuf's ByteSize() walks every byte of big weights (0.3 s on a 90 MB model); raw tensor
    data is counted by length instead, everything else by ByteSize().
    """
    total = 0
    for g in iter_graphs(model.graph):
        for t in g.initializer:
            if t.HasField("raw_data"):
                n = len(t.raw_data)
                # field tag + varint length + payload, plus the small fields around it
                total += n + 12 + len(t.name) + 11 * len(t.dims) + 4
            else:
                total += t.ByteSize() + 4
        total += sum(n.ByteSize() + 3 for n in g.node if not _has_graph_attr(n))
        total += sum(v.ByteSize() + 3 for v in list(g.input) + list(g.output) + list(g.value_info))
    for f in model.functions:
        total += f.ByteSize()
    total += sum(p.ByteSize() + 3 for p in model.metadata_props)
    total += sum(o.ByteSize() + 2 for o in model.opset_import)
    total += len(model.doc_string) + len(model.producer_name) + len(model.producer_version) + 16
    return total


def _has_graph_attr(node: onnx.NodeProto) -> bool:
    # nodes holding subgraphs are counted through iter_graphs (their bodies) instead
    return any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute)


def weight_bytes(model: onnx.ModelProto) -> int:
    """Bytes of every constant tensor (see iter_constant_tensors)."""
    return sum(_tensor_elems(t) * _itemsize(t.data_type) for _, t in iter_constant_tensors(model))


def _itemsize(data_type: int) -> int:
    try:
        return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(data_type)).itemsize
    except (KeyError, TypeError):
        return 1


@dataclasses.dataclass
class LayerMacs:
    node: str
    op_type: str
    macs: int
    params: int


@dataclasses.dataclass
class ModelStats:
    nodes: int
    params: int
    bytes: int
    weight_bytes: int
    macs: int
    op_histogram: dict[str, int]
    layers: list[LayerMacs]
    opset: dict[str, int]
    inputs: list[tuple[str, str, list]]
    outputs: list[tuple[str, str, list]]
    unknown_shape_layers: list[str]
    initializer_inputs: int = 0          # graph inputs that are also initializers (IR 3)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _shape_map(model: onnx.ModelProto) -> dict[str, list]:
    from onnxpress.passes.graph import infer_shapes

    inferred = infer_shapes(model, symbolic=True, weights=False)
    shapes = {}
    for g in iter_graphs(inferred.graph):
        for vi in list(g.value_info) + list(g.input) + list(g.output):
            if vi.type.HasField("tensor_type") and vi.type.tensor_type.HasField("shape"):
                shapes[vi.name] = [
                    d.dim_value if d.HasField("dim_value") else None
                    for d in vi.type.tensor_type.shape.dim
                ]
        for t in g.initializer:
            shapes[t.name] = list(t.dims)
        for node in g.node:
            if node.op_type == "Constant":
                for a in node.attribute:
                    if a.name == "value":
                        shapes[node.output[0]] = list(a.t.dims)
    return shapes


def _known(shape) -> bool:
    return shape is not None and all(isinstance(d, int) and d > 0 for d in shape)


def _prod(xs) -> int:
    return int(np.prod(xs, dtype=np.int64)) if len(xs) else 1


def node_macs(node: onnx.NodeProto, shapes: dict[str, list], batch: int = 1) -> int | None:
    """MACs of one node, or None when its shapes are unknown. Dynamic batch counts as `batch`."""
    def shp(name):
        s = shapes.get(name)
        if s is None:
            return None
        s = list(s)
        if s and s[0] is None:
            s[0] = batch
        return s

    op = node.op_type
    if op in ("Conv", "ConvInteger", "QLinearConv", "FusedConv"):
        w_idx = 3 if op == "QLinearConv" else 1
        y_idx = 0
        w, y = shp(node.input[w_idx]), shp(node.output[y_idx])
        if not (_known(w) and _known(y)):
            return None
        return _prod(y) * _prod(w[1:])
    if op == "ConvTranspose":
        x, w = shp(node.input[0]), shp(node.input[1])
        if not (_known(x) and _known(w)):
            return None
        # weight is (Cin, Cout/group, k...): every input element meets Cout/group * k weights
        return _prod(x) * w[1] * _prod(w[2:])
    if op in ("MatMul", "MatMulInteger", "QLinearMatMul", "FusedMatMul", "MatMulNBits",
              "MatMulIntegerToFloat"):
        a_idx, b_idx = (0, 3) if op == "QLinearMatMul" else (0, 1)
        a, y = shp(node.input[a_idx]), shp(node.output[0])
        if op == "MatMulNBits":
            k = next((x.i for x in node.attribute if x.name == "K"), None)
            if not (_known(y) and k):
                return None
            return _prod(y) * k
        if not (_known(a) and _known(y)):
            return None
        k = a[-1]
        return _prod(y) * k
    if op in ("Gemm", "FusedGemm"):
        a, y = shp(node.input[0]), shp(node.output[0])
        if not (_known(a) and _known(y)):
            return None
        trans_a = next((x.i for x in node.attribute if x.name == "transA"), 0)
        k = a[0] if trans_a else a[1]
        return _prod(y) * k
    return 0


MAC_OPS = {"Conv", "ConvInteger", "QLinearConv", "FusedConv", "ConvTranspose", "MatMul",
           "MatMulInteger", "QLinearMatMul", "FusedMatMul", "MatMulNBits", "MatMulIntegerToFloat",
           "Gemm", "FusedGemm"}


def model_stats(model: onnx.ModelProto, *, batch: int = 1) -> ModelStats:
    shapes = _shape_map(model)
    consts = dict(iter_constant_tensors(model))
    layers, unknown = [], []
    total_macs = 0
    hist: Counter = Counter()
    for node in iter_nodes(model.graph):
        hist[(node.domain + "." if node.domain not in ("", "ai.onnx") else "") + node.op_type] += 1
        if node.op_type not in MAC_OPS:
            continue
        macs = node_macs(node, shapes, batch)
        params = sum(_tensor_elems(consts[i]) for i in node.input if i in consts)
        if macs is None:
            unknown.append(node.name or node.output[0])
            macs = 0
        total_macs += macs
        layers.append(LayerMacs(node.name or node.output[0], node.op_type, macs, params))

    def io(values):
        out = []
        for v in values:
            tt = v.type.tensor_type
            dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?")
                    for d in tt.shape.dim] if tt.HasField("shape") else []
            dtype = onnx.TensorProto.DataType.Name(tt.elem_type) if tt.elem_type else "?"
            out.append((v.name, dtype.lower(), dims))
        return out

    inits = {t.name for t in model.graph.initializer}
    return ModelStats(
        nodes=count_nodes(model),
        params=count_params(model),
        bytes=model_bytes(model),
        weight_bytes=weight_bytes(model),
        macs=total_macs,
        op_histogram=dict(hist.most_common()),
        layers=layers,
        opset={(o.domain or "ai.onnx"): o.version for o in model.opset_import},
        inputs=io([i for i in model.graph.input if i.name not in inits]),
        outputs=io(model.graph.output),
        unknown_shape_layers=unknown,
        initializer_inputs=sum(1 for i in model.graph.input if i.name in inits),
    )
