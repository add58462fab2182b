"""Run an ONNX graph as a trainable PyTorch module (onnxpress's own converter, used by `distill`).

    module = OnnxGraphModule(model)          # float weights become nn.Parameters (same names)
    out = module(input=torch.randn(8, 1, 8, 8))["logits"]
    loss.backward(); opt.step()
    module.write_back(model)                 # trained values into the same initializers

The module interprets the graph node by node with torch operators, so the graph's structure is
never rebuilt: writing back only replaces initializer values. The op table (registry.py) is filled
by one module per family: elementwise (math, comparisons, logic, activations), tensor (shape,
indexing, reductions, sorting), nn (conv, pooling, normalisation, softmax, losses), attention,
resize (Resize, Upsample, GridSample), recurrent (RNN/LSTM/GRU), control (If/Loop/Scan,
sequences) and signal (DFT, STFT). Integer and shape computations run in torch too (no gradient
flows through them). An op or an attribute the table cannot express raises UnsupportedOpError
naming the node. Coverage on onnx's node cases (tests/passes/torch_coverage.py):

    .venv/bin/python -m tests.passes.torch_coverage

Why not onnx2torch: its release on PyPI (1.5.15) imports torchvision, and the torchvision built
for torch 2.13 does not import beside the CPU build this project uses.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from onnxpress.errors import BackendError, CalibrationError, MissingExtraError, OnnxPressError
from onnxpress.passes.torch_graph.registry import (
    OPS,
    SEQUENCE_VALUED,
    NodeContext,
    as_tensor,
    unsupported_error,
)

TRAINABLE_INPUTS = {
    "Conv": (1, 2), "ConvTranspose": (1, 2), "Gemm": (1, 2), "MatMul": (0, 1),
    "BatchNormalization": (1, 2), "LayerNormalization": (1, 2), "InstanceNormalization": (1, 2),
    "GroupNormalization": (1, 2), "RMSNormalization": (1,),
    "PRelu": (1,), "Mul": (0, 1), "Add": (0, 1),
}
FAMILIES = ("elementwise", "tensor", "nn", "attention", "resize", "recurrent", "control", "signal")


def _torch():
    try:
        import torch
    except ImportError:
        raise MissingExtraError("distill needs PyTorch: pip install 'onnxpress[torch]'") from None
    import importlib

    for family in FAMILIES:
        importlib.import_module(f"onnxpress.passes.torch_graph.{family}")
    return torch


def _attrs(node: onnx.NodeProto) -> dict[str, Any]:
    out = {}
    for a in node.attribute:
        v = onnx.helper.get_attribute_value(a)
        if isinstance(v, bytes):
            v = v.decode()
        elif isinstance(v, list) and v and isinstance(v[0], bytes):
            v = [s.decode() for s in v]
        if isinstance(v, onnx.TensorProto):
            v = numpy_helper.to_array(v)
        out[a.name] = v
    return out


class Interpreter:
    """Runs a graph (and its subgraphs) node by node through the op table; each graph's plan
    (op function, attributes, context per node) is built once."""

    def __init__(self, opset: int):
        self.opset = opset
        self.plans: dict[int, tuple[list, dict]] = {}

    def compile(self, graph: onnx.GraphProto, *, main: bool = False) -> tuple[list, dict]:
        """(steps, constants); the main graph's initializers are the module's to hold."""
        key = id(graph)
        if key not in self.plans:
            steps = []
            for node in graph.node:
                if node.domain not in ("", "ai.onnx") or node.op_type not in OPS:
                    raise unsupported_error(node)
                attrs = _attrs(node)
                for value in attrs.values():  # bodies of If/Loop/Scan: checked up front too
                    for sub in value if isinstance(value, list) else [value]:
                        if isinstance(sub, onnx.GraphProto):
                            self.compile(sub)
                steps.append((node, OPS[node.op_type], attrs, NodeContext(node, self.opset, self)))
            consts = {} if main else {t.name: as_tensor(numpy_helper.to_array(t))
                                      for t in graph.initializer}
            self.plans[key] = (steps, consts)
        return self.plans[key]

    def run(self, graph: onnx.GraphProto, inputs: list, scope: dict | None) -> list:
        steps, consts = self.compile(graph)
        env = dict(scope or {})
        env.update(consts)
        for vi, value in zip(graph.input, inputs):
            env[vi.name] = value
        self.run_steps(steps, env)
        return [env[o.name] for o in graph.output]

    @staticmethod
    def run_steps(steps: list, env: dict) -> None:
        for node, fn, attrs, ctx in steps:
            ctx.scope = env
            args = [env[i] if i else None for i in node.input]
            try:
                res = fn(args, attrs, ctx)
            except OnnxPressError:
                raise
            except Exception as exc:  # torch's own message, with the node it came from
                msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                raise BackendError(f"distill: node '{node.name}' ({node.op_type}) failed in "
                                   f"torch: {msg}") from exc
            if not isinstance(res, (list, tuple)) or node.op_type in SEQUENCE_VALUED:
                res = [res]
            for i, name in enumerate(node.output):
                if not name:
                    continue
                if i >= len(res) or res[i] is None:
                    raise unsupported_error(node, f"output {i} ('{name}') is not computed")
                env[name] = res[i]


def _opset(model: onnx.ModelProto) -> int:
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return int(imp.version)
    return onnx.defs.onnx_opset_version()


def trainable_names(model: onnx.ModelProto) -> list[str]:
    """Float initializers that act as weights (Conv/Gemm/MatMul/norm parameters, per-channel
    scales and offsets), directly or through an Identity."""
    inits = {t.name: t for t in model.graph.initializer
             if t.data_type == onnx.TensorProto.FLOAT and len(t.dims) >= 1
             and int(np.prod(t.dims)) > 1}
    alias = {n.output[0]: n.input[0] for n in model.graph.node
             if n.op_type == "Identity" and n.input[0] in inits}
    names = []
    for node in model.graph.node:
        for i in TRAINABLE_INPUTS.get(node.op_type, ()):
            if i < len(node.input):
                name = alias.get(node.input[i], node.input[i])
                if name in inits and name not in names:
                    names.append(name)
    return names


class _Mod:
    """Lazily built nn.Module subclass (torch imported only when used)."""

    cls = None


def OnnxGraphModule(model: onnx.ModelProto, trainable: list[str] | None = None):  # noqa: N802
    """Build the torch module for `model` (see the module docstring)."""
    torch = _torch()
    if _Mod.cls is None:
        _Mod.cls = _make_class(torch)
    return _Mod.cls(model, trainable)


def _make_class(torch):
    class _OnnxGraphModule(torch.nn.Module):
        def __init__(self, model: onnx.ModelProto, trainable: list[str] | None):
            super().__init__()
            if model.functions:
                model = onnx.inliner.inline_local_functions(model)
            self.graph = model.graph
            self.interpreter = Interpreter(_opset(model))
            self.steps, _ = self.interpreter.compile(model.graph, main=True)  # unsupported ops raise here
            names = trainable_names(model) if trainable is None else list(trainable)
            self.keys = {n: f"p{i}" for i, n in enumerate(names)}
            self.params = torch.nn.ParameterDict()
            self.consts: dict[str, Any] = {}
            for t in model.graph.initializer:
                arr = numpy_helper.to_array(t)
                if t.name in self.keys:
                    self.params[self.keys[t.name]] = torch.nn.Parameter(torch.from_numpy(arr.copy()))
                else:
                    self.consts[t.name] = as_tensor(arr)
            inits = {t.name for t in model.graph.initializer}
            self.inputs = [i.name for i in model.graph.input if i.name not in inits]
            self.outputs = [o.name for o in model.graph.output]

        def masks_from_zeros(self, min_fraction: float = 0.01) -> dict[str, Any]:
            """{param key: mask} for weights that are at least `min_fraction` exact zeros."""
            out = {}
            for k, p in self.params.items():
                if p.dim() >= 2:
                    z = (p.detach() == 0)
                    if float(z.float().mean()) >= min_fraction:
                        out[k] = (~z).to(p.dtype)
            return out

        def forward(self, **inputs):
            env: dict[str, Any] = dict(self.consts)
            for name, key in self.keys.items():
                env[name] = self.params[key]
            missing = [n for n in self.inputs if n not in inputs]
            if missing:
                raise CalibrationError(f"distill: no value for the model's input(s) {missing}")
            for k, v in inputs.items():
                env[k] = v if isinstance(v, torch.Tensor) else as_tensor(v)
            self.interpreter.run_steps(self.steps, env)
            return {o: env[o] for o in self.outputs}

        def write_back(self, model: onnx.ModelProto) -> int:
            """Copy the trained values into `model`'s initializers of the same names."""
            n = 0
            for t in model.graph.initializer:
                key = self.keys.get(t.name)
                if key is None:
                    continue
                arr = self.params[key].detach().cpu().numpy().astype(
                    onnx.helper.tensor_dtype_to_np_dtype(t.data_type))
                t.CopyFrom(numpy_helper.from_array(arr, t.name))
                n += 1
            return n

    return _OnnxGraphModule
