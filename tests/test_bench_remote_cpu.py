"""bench/bench_remote_cpu.py's stand-in weights: the build it ships to another machine must stay
small (patterns xz compresses), keep the graph, and keep activations bounded (else int8 rounding
makes the net chaotic and the exactness check meaningless)."""

import lzma

import numpy as np
import onnx
from onnx import numpy_helper

from bench.bench_remote_cpu import normalize_layers, pattern_weights
from onnxpress import passes, zoo
from onnxpress.backends import ort


def test_pattern_weights_compress_keep_the_graph_and_normalize_each_layer():
    fused = passes.apply(zoo.timm_model("resnet18"), ["fuse"], target="tvm")
    x = {"input": zoo.photo_batch(224)[:1]}
    before = {i.name: numpy_helper.to_array(i) for i in fused.graph.initializer}
    model = normalize_layers(pattern_weights(onnx.load_from_string(fused.SerializeToString())), x)
    after = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    assert {k: v.shape for k, v in after.items()} == {k: v.shape for k, v in before.items()}
    convs = [n for n in model.graph.node if n.op_type in ("Conv", "Gemm", "MatMul")]
    assert len(convs) == 21
    for node in convs:
        w = after[node.input[1]]
        assert len(np.unique(w)) == 3 and np.isclose(w.mean(), 0, atol=0.1 * w.std())   # {-a, 0, a}
        if len(node.input) > 2:
            assert not after[node.input[2]].any()                                       # biases 0
    raw = b"".join(after[n.input[1]].tobytes() for n in convs)
    assert len(lzma.compress(raw, preset=6)) < len(raw) / 50
    # every layer's output has unit standard deviation on the calibration input
    probe = onnx.load_from_string(model.SerializeToString())
    probe.graph.output.extend(onnx.helper.make_tensor_value_info(n.output[0], onnx.TensorProto.FLOAT, None)
                              for n in convs[:-1])
    outs = ort.run(probe, x, optimization="disable")
    stds = [float(outs[n.output[0]].std()) for n in convs[:-1]]
    assert np.allclose(stds, 1, rtol=1e-3), stds
