"""PyTorch frontend: export a module, keep dynamic axes, clear errors."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import onnxpress as ox  # noqa: E402
from onnxpress.errors import FrontendError  # noqa: E402


class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(8)
        self.fc = torch.nn.Linear(8, 4)

    def forward(self, x):
        y = torch.relu(self.bn(self.conv(x)))
        return self.fc(y.mean(dim=(2, 3)))


def test_export_matches_torch_and_keeps_dynamic_batch():
    torch.manual_seed(0)
    module = Tiny().eval()
    model = ox.frontends.torch.export(module, torch.randn(1, 3, 16, 16), input_names=["image"],
                                      output_names=["scores"], dynamic_axes={"image": {0: "batch"}})
    dims = model.graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param == "batch" and [d.dim_value for d in dims[1:]] == [3, 16, 16]
    x = torch.randn(5, 3, 16, 16)
    with torch.no_grad():
        expected = module(x).numpy()
    got = ox.backends.ort.run(model, {"image": x.numpy()})["scores"]
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)
    assert len(model.graph.value_info) > 0, "the frontend returns a shape-inferred model"


def test_export_errors():
    with pytest.raises(FrontendError, match="needs a torch.nn.Module"):
        ox.frontends.torch.export(lambda x: x, torch.zeros(1))

    class Bad(torch.nn.Module):
        def forward(self, x):
            return torch.linalg.eig(x)[0]  # complex outputs cannot be exported

    with pytest.raises(FrontendError, match="torch.onnx.export failed for Bad"):
        ox.frontends.torch.export(Bad(), torch.randn(3, 3))


def test_dynamic_axes_naming_no_input_is_an_error():
    """torch drops unknown dynamic_axes keys under a warning: the user would get a static batch."""
    from onnxpress.frontends import torch_frontend

    net = torch.nn.Linear(4, 2)
    with pytest.raises(FrontendError, match="'x'.*input_names"):
        torch_frontend.export(net, torch.zeros(1, 4), dynamic_axes={"x": {0: "batch"}})
    proto = torch_frontend.export(net, torch.zeros(1, 4), input_names=["x"],
                                  dynamic_axes={"x": {0: "batch"}})
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
