"""One entry for every model source: what the command line calls where it takes a model.

    model = import_any("model.onnx")          # ONNX file (bytes and ModelProto too)
    model = import_any("model.keras")         # Keras archive (.keras, .h5)   -> tf frontend
    model = import_any("exported/")           # TensorFlow SavedModel dir     -> tf frontend
    model = import_any(keras_model)           # a keras.Model object          -> tf frontend

A torch.nn.Module needs example inputs to be traced: use ox.frontends.torch.export for it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import onnx

from onnxpress.errors import FrontendError, ModelLoadError

#: how the command line describes what it accepts
ACCEPTED = ".onnx file, .keras/.h5 Keras file or TensorFlow SavedModel directory"


def source_kind(model: Any) -> str:
    """'onnx', 'keras', 'saved_model', 'torch' or 'unknown' (cheap: imports no framework)."""
    if isinstance(model, (onnx.ModelProto, bytes, bytearray, memoryview)):
        return "onnx"
    if isinstance(model, (str, os.PathLike)):
        from onnxpress.frontends.tf_frontend import KERAS_SUFFIXES, is_saved_model

        p = Path(model)
        if is_saved_model(p):
            return "saved_model"
        if p.suffix.lower() in KERAS_SUFFIXES:
            return "keras"
        return "onnx"
    mod = type(model).__module__ or ""
    if mod.startswith("torch"):
        return "torch"
    if mod.startswith(("keras", "tf_keras")) or ".keras" in mod:
        return "keras"
    return "unknown"


def import_any(model: Any, **kwargs: Any) -> onnx.ModelProto:
    """Return a checked ONNX ModelProto from any supported source (see the module docstring).

    Keyword arguments go to the framework converter (e.g. `opset=`, `inputs_as_nchw=`).
    """
    kind = source_kind(model)
    if kind == "onnx":
        from onnxpress.io import load

        if isinstance(model, (str, os.PathLike)) and Path(model).is_dir():
            raise ModelLoadError(f"{model} is a directory, neither an .onnx file nor a TensorFlow "
                                 "SavedModel (no saved_model.pb in it)")
        return load(model)
    if kind in ("keras", "saved_model"):
        from onnxpress.frontends import tf_frontend

        return tf_frontend.convert(model, **kwargs)
    if kind == "torch":
        raise FrontendError("a torch.nn.Module needs example inputs: use "
                            "ox.frontends.torch.export(module, example_inputs)")
    raise FrontendError(f"cannot import a model from {type(model).__name__}: give an {ACCEPTED}, "
                        "bytes, an onnx.ModelProto or a Keras model")


__all__ = ["ACCEPTED", "import_any", "source_kind"]
