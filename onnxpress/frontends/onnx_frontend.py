"""ONNX files: load, check and infer shapes."""

from __future__ import annotations

import onnx

from onnxpress.io import ModelLike, load
from onnxpress.passes.graph import copy_model_fields, infer_shapes


def import_model(model: ModelLike) -> onnx.ModelProto:
    """Load an ONNX model (path, bytes or ModelProto), check it and annotate inferred shapes."""
    proto = load(model)
    out = infer_shapes(proto)
    return copy_model_fields(proto, out)
