"""Frontends: bring a model from its framework into checked, shape-inferred ONNX.

    ox.frontends.onnx.import_model("model.onnx")
    ox.frontends.torch.export(module, example_inputs)     # needs the `torch` extra

Heavy frameworks are imported only when used; a missing one raises MissingExtraError naming the
extra to install.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["onnx", "torch", "tf"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        return importlib.import_module(f"onnxpress.frontends.{name}_frontend" if name != "onnx"
                                       else "onnxpress.frontends.onnx_frontend")
    raise AttributeError(name)
