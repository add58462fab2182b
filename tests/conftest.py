"""Shared fixtures: real models from onnxpress.zoo, built once and cached on disk
(.cache/onnxpress, shared by pytest-xdist workers through a file lock)."""

from __future__ import annotations

import os

import onnx
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _has_gpu() -> bool:
    import shutil
    import subprocess

    if shutil.which("nvidia-smi") is None:
        return False
    res = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True)
    return res.returncode == 0 and "GPU" in res.stdout


def pytest_collection_modifyitems(config, items):
    """`gpu` tests run where a CUDA GPU is present and are reported as skipped elsewhere."""
    if not any("gpu" in item.keywords for item in items) or _has_gpu():
        return
    skip = pytest.mark.skip(reason="no CUDA GPU here (run where one is present)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def digits_cnn_path():
    from onnxpress import zoo

    return zoo.digits_cnn()


@pytest.fixture(scope="session")
def digits_cnn(digits_cnn_path) -> onnx.ModelProto:
    """The trained digits CNN (a fresh copy per use is cheap: call onnx.load(path) to mutate)."""
    return onnx.load(digits_cnn_path)


@pytest.fixture(scope="session")
def digits():
    from onnxpress import zoo

    return zoo.digits_data()


@pytest.fixture(scope="session")
def minilm_path():
    from onnxpress import zoo

    return zoo.minilm()


@pytest.fixture(scope="session")
def timm_path():
    from onnxpress import zoo

    return zoo.timm_model
