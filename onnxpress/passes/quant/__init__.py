"""Quantization passes and the calibration they share.

    calibrate  the "calib" analysis: streaming histograms of every activation (one run, many passes)
    qdq        quant_int8: static QDQ int8 placed for onnxruntime's integer kernels
    latency    keep int8 only where it pays on the target runtime
"""

from onnxpress.passes.quant import calibrate, qdq  # noqa: F401
