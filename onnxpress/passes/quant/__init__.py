"""Quantization passes and the calibration they share.

    calibrate  the "calib" analysis: streaming histograms of every activation (one run, many passes)
    qdq        quant_int8: static QDQ int8 placed for onnxruntime's integer kernels
    latency    keep int8 only where it pays on the target runtime
    dynamic    quant_dynamic: int8 weights, activations quantized at run time
    fp16       fp16 / bf16: half precision, sensitive ops in fp32, IO types kept
    auto       quant_auto: per-layer sensitivity and mixed precision within a budget
    int4       quant_int4: block-wise weight-only int4 (MatMulNBits or int4 DequantizeLinear)
"""

from onnxpress.passes.quant import auto, calibrate, dynamic, fp16, int4, qdq  # noqa: F401
