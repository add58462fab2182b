"""quant_int8's conv_kernel: onnxruntime runs an int8 Conv on its symmetric indirect-conv kernel
when the weight zero point is 0 and on its integer GEMM (AMX where the CPU has it) otherwise.
The GEMM form (weights - 1, zero point -1) holds the same values, so the outputs are
bit-identical; conv_kernel=auto keeps it only for the convs it measured faster."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime
import pytest
from onnx import numpy_helper

from onnxpress import passes, zoo
from onnxpress.backends import ort
from onnxpress.passes.quant.conv_kernels import candidates, choose_conv_kernels
from onnxpress.passes.quant.qdq import layer_precisions

QUANT = "quant_int8:latency_aware=false,report_error=false"


@pytest.fixture(scope="module")
def resnet18_int8():
    model = onnx.load(zoo.plain_export("resnet18"))
    rng = np.random.default_rng(0)
    calib = [{"x": rng.standard_normal((1, 3, 224, 224)).astype(np.float32)} for _ in range(2)]
    sym = passes.run(model, ["fuse", QUANT], calib=calib, progress=False)
    gemm = passes.run(model, ["fuse", QUANT + ",conv_kernel=gemm"], calib=calib, progress=False)
    return sym, gemm, calib[0]


def _weight_zero_points(model: onnx.ModelProto) -> list[np.ndarray]:
    inits = {t.name: t for t in model.graph.initializer}
    producer = {o: n for n in model.graph.node for o in n.output}
    return [numpy_helper.to_array(inits[producer[n.input[1]].input[2]])
            for n in model.graph.node if n.op_type == "Conv"]


def _fused_ops(model: onnx.ModelProto, tmp_path) -> list[str]:
    so = onnxruntime.SessionOptions()
    so.optimized_model_filepath = str(tmp_path / "opt.onnx")
    onnxruntime.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return [n.op_type for n in onnx.load(tmp_path / "opt.onnx").graph.node]


def test_the_gemm_form_holds_the_same_weights_and_gives_bit_identical_outputs(resnet18_int8, tmp_path):
    sym, gemm, feeds = resnet18_int8
    f = gemm.reports[-1].figures
    assert f["conv_kernels_eligible"] == 20 and f["conv_kernels_gemm"] == 20
    assert "conv_kernels_gemm" not in sym.reports[-1].figures      # latency_aware=false: as built
    assert all(np.all(z == 0) for z in _weight_zero_points(sym.model))
    assert all(np.all(z == -1) for z in _weight_zero_points(gemm.model))
    assert layer_precisions(gemm.model) == layer_precisions(sym.model)
    # onnxruntime still fuses every conv into QLinearConv: only the kernel behind it differs
    assert _fused_ops(gemm.model, tmp_path).count("QLinearConv") == 20
    a, b = ort.run(sym.model, feeds)["y"], ort.run(gemm.model, feeds)["y"]
    assert np.array_equal(a, b)
    assert abs(gemm.model.ByteSize() - sym.model.ByteSize()) < 0.01 * sym.model.ByteSize()


def test_auto_moves_only_convs_it_measured_faster_and_never_slows_the_model(resnet18_int8):
    sym, _, feeds = resnet18_int8
    assert len(candidates(sym.model)) == 20
    out, f = choose_conv_kernels(sym.model, feeds)
    assert f["conv_kernels_eligible"] == 20 and "conv_kernel_choice" in f
    moved = sum(np.all(z == -1) for z in _weight_zero_points(out))
    assert moved == f["conv_kernels_gemm"]
    if moved:              # kept only after the whole model ran faster by the 2% margin
        assert f["conv_kernels_speedup"] >= 1 / 0.98
    assert np.array_equal(ort.run(sym.model, feeds)["y"], ort.run(out, feeds)["y"])
    assert len(candidates(out)) == 20 - moved


def test_bias_correction_reads_the_weight_zero_point():
    """Bias correction recomputes each layer from Q(x) and Q(W): with the GEMM form it must
    dequantize W with its zero point, or every corrected bias is off by a whole step of W."""
    model = onnx.load(zoo.plain_export("digits_cnn"))
    calib = [{"x": b["input"][i:i + 1]} for b in zoo.digits_calib(16, 4) for i in range(4)]
    spec = QUANT + ",bias_correction=true,conv_kernel="
    sym = passes.run(model, spec + "symmetric", calib=calib, progress=False)
    gemm = passes.run(model, spec + "gemm", calib=calib, progress=False)
    assert gemm.reports[-1].figures["conv_kernels_gemm"] >= 2
    assert gemm.reports[-1].figures["bias_corrected"] == sym.reports[-1].figures["bias_corrected"] > 0
    a, b = ort.run(sym.model, calib[0])["y"], ort.run(gemm.model, calib[0])["y"]
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-6 * float(np.abs(a).max()))
