"""Imports every built-in pass module so their passes register themselves."""

from onnxpress.passes import (
    cleanup,  # noqa: F401
    fuse,  # noqa: F401
)
from onnxpress.passes import clip as _clip  # noqa: F401
from onnxpress.passes import distill as _distill  # noqa: F401
from onnxpress.passes import prune as _prune  # noqa: F401
from onnxpress.passes import quant as _quant  # noqa: F401
from onnxpress.passes import search as _search  # noqa: F401
from onnxpress.passes.memory import reuse as _reuse  # noqa: F401
from onnxpress.passes.pipeline import register_pipeline

register_pipeline(
    "cleanup", ["fold_constants", "dce", "simplify", "dce"],
    doc="fold_constants, dce, simplify, dce: the lossless cleanup every pipeline starts with.")
