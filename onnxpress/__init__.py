"""onnxpress: make trained neural networks small and fast for edge boards.

    import onnxpress as ox
    from onnxpress import passes

    model = ox.load("model.onnx")
    model = passes.apply(model, ["cleanup", "fuse", "quant_int8"], calib="calib.npz")
    ox.save(model, "model.opt.onnx")
"""

from onnxpress import backends, data, frontends, passes
from onnxpress.errors import *  # noqa: F401,F403
from onnxpress.errors import __all__ as _errors_all
from onnxpress.io import load, save
from onnxpress.stats import model_stats

__version__ = "0.1.0"

__all__ = ["load", "save", "model_stats", "passes", "frontends", "backends", "data",
           "__version__", *_errors_all]
