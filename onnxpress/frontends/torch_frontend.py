"""PyTorch: export an nn.Module to a checked ONNX model with torch.onnx.export.

    model = ox.frontends.torch.export(module, torch.randn(1, 1, 8, 8),
                                      input_names=["x"], dynamic_axes={"x": {0: "batch"}})

Uses the TorchScript exporter (`dynamo=False`), which needs nothing beyond torch itself.
"""

from __future__ import annotations

import io
import warnings
from typing import Any, Mapping, Sequence

import onnx

from onnxpress.errors import FrontendError, MissingExtraError
from onnxpress.frontends.onnx_frontend import import_model


def _torch():
    try:
        import torch
    except ImportError:
        raise MissingExtraError(
            "the PyTorch frontend needs torch: pip install 'onnxpress[torch]' "
            "(install torch==2.13.0 first to get the CPU build)") from None
    return torch


def export(
    module: Any,
    example_inputs: Any,
    *,
    input_names: Sequence[str] | None = None,
    output_names: Sequence[str] | None = None,
    dynamic_axes: Mapping[str, Any] | None = None,
    opset: int = 17,
    do_constant_folding: bool = True,
) -> onnx.ModelProto:
    """Export `module` on `example_inputs` (a tensor, a tuple of tensors or a dict of kwargs)."""
    torch = _torch()
    if not isinstance(module, torch.nn.Module):
        raise FrontendError(f"export() needs a torch.nn.Module, got {type(module).__name__}")
    args = example_inputs
    if isinstance(args, torch.Tensor):
        args = (args,)
    elif isinstance(args, list):
        args = tuple(args)
    elif isinstance(args, Mapping):
        args = ((), dict(args)) if False else (dict(args),)
    if input_names is None:
        if isinstance(example_inputs, Mapping):
            input_names = list(example_inputs)
        else:
            input_names = [f"input_{i}" if len(args) > 1 else "input" for i in range(len(args))]
    known = set(input_names) | set(output_names or ())
    unknown = sorted(set(dynamic_axes or {}) - known)
    if unknown:
        # torch drops such keys with a warning nobody sees: the user would get static dims
        raise FrontendError(
            f"dynamic_axes names {', '.join(repr(u) for u in unknown)}, which is not an input or "
            f"output name; the export's names are {', '.join(repr(k) for k in list(input_names) + list(output_names or ()))}"
            " (set input_names=/output_names= to choose them)")
    buf = io.BytesIO()
    was_training = module.training
    module.eval()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with torch.no_grad():
                torch.onnx.export(
                    module, args, buf, input_names=list(input_names),
                    output_names=list(output_names) if output_names else None,
                    dynamic_axes=dict(dynamic_axes) if dynamic_axes else None,
                    opset_version=opset, do_constant_folding=do_constant_folding, dynamo=False)
    except Exception as exc:
        msg = str(exc).strip().splitlines()
        raise FrontendError(
            f"torch.onnx.export failed for {type(module).__name__}: {msg[0] if msg else exc}"
        ) from None
    finally:
        module.train(was_training)
    return import_model(buf.getvalue())
