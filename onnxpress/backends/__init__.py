"""Backends: `ort` (onnxruntime, the embedded default) and `tvm` (Apache TVM, imported lazily)."""

from __future__ import annotations

import importlib
from typing import Any

from onnxpress.backends import ort

__all__ = ["ort", "tvm"]


def __getattr__(name: str) -> Any:
    if name == "tvm":
        return importlib.import_module("onnxpress.backends.tvm")
    raise AttributeError(name)
