"""CUDA artifacts: integer convolutions and matmuls on dp4a, PTX for every module kept in the
artifact and handed to the driver at load (no compiler where the artifact runs), tuning of the
float kernels (checked here with a runner that measures nothing; refused where no GPU is).
Building needs nvcc only; the `gpu` tests run the builds
where a GPU is present (elsewhere they are reported as skipped: no GPU)."""

from __future__ import annotations

import hashlib
import json
import shutil

import numpy as np
import pytest

pytest.importorskip("tvm")

from onnxpress.backends import tvm as ox_tvm  # noqa: E402
from onnxpress.errors import BackendError  # noqa: E402

from .test_tvm_int8 import _compare, cnn_model, encoder_block_model  # noqa: E402

pytestmark = pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc (CUDA toolkit) not on PATH")


@pytest.fixture(scope="module")
def cuda_cnn(tmp_path_factory):
    model = cnn_model()
    art = ox_tvm.compile(model, "cuda:sm_80", output_dir=tmp_path_factory.mktemp("cuda") / "cnn", progress=False)
    return model, art


@pytest.fixture(scope="module")
def cuda_encoder(tmp_path_factory):
    model = encoder_block_model()
    art = ox_tvm.compile(model, "cuda:sm_80", output_dir=tmp_path_factory.mktemp("cuda") / "enc", progress=False)
    return model, art


def _dp4a_in_ptx(art) -> int:
    return (art.path / "kernels.ptx").read_text().count("dp4a.u32.s32")


def test_quantized_cnn_convs_run_on_dp4a(cuda_cnn):
    _model, art = cuda_cnn
    info = art.manifest["integer"]
    convs = [n for n in info["nodes"] if n["op"] in ("Conv", "Gemm") and n["kernel"] == "int8"]
    assert len(convs) >= 4, info["nodes"]
    sched = art.manifest["schedules"]
    # the dense convs and the gemm are scheduled around dp4a; grouped/depthwise ones are not
    # packed (TVM's generic integer conv, default GPU schedule)
    assert sched["dp4a_scheduled"] >= 2 and sched["dp4a_failed"] == 0, sched
    assert sched["conv2d_layout"] == "NHWC"
    assert _dp4a_in_ptx(art) >= 2 * sched["dp4a_scheduled"]


def test_encoder_matmuls_run_on_dp4a(cuda_encoder):
    _model, art = cuda_encoder
    sched = art.manifest["schedules"]
    assert sched["dp4a_scheduled"] >= 3 and sched["dp4a_failed"] == 0, sched
    assert _dp4a_in_ptx(art) > 0


def test_fp32_models_build_no_integer_kernels(digits_cnn_path, tmp_path):
    art = ox_tvm.compile(digits_cnn_path, "cuda:sm_80", output_dir=tmp_path / "fp32", progress=False)
    assert art.manifest["schedules"]["dp4a_scheduled"] == 0
    assert _dp4a_in_ptx(art) == 0
    assert art.manifest["target"]["spec"]["max_threads_per_block"] == 1024


def test_every_cuda_module_keeps_its_ptx_keyed_by_its_source(cuda_cnn):
    _model, art = cuda_cnn
    modules = art.manifest["cuda_modules"]
    assert modules, art.manifest["files"]
    for m in modules:
        source = (art.path / m["source"]).read_text()
        assert hashlib.sha256(source.encode()).hexdigest() == m["sha256"]
        ptx = (art.path / m["ptx"]).read_text()
        # the PTX text itself (not a repr of nvcc's bytearray: the driver rejects that image)
        assert ptx.startswith("//") and "\n.version " in ptx and "\n.target sm_80" in ptx and ".entry" in ptx
    assert json.loads((art.path / "manifest.json").read_text())["cuda_modules"] == modules


def test_the_load_callback_answers_with_the_stored_ptx(cuda_cnn):
    """At load, TVM asks tvm_callback_cuda_compile for device code of the CUDA C in model.so:
    the artifact answers with its PTX, so a GPU box needs neither TVM's compiler nor nvcc."""
    import tvm_ffi

    from onnxpress.backends.tvm.run_artifact import use_stored_ptx

    _model, art = cuda_cnn
    previous = tvm_ffi.get_global_func("tvm_callback_cuda_compile", allow_missing=True)
    try:
        use_stored_ptx(str(art.path), art.manifest)
        callback = tvm_ffi.get_global_func("tvm_callback_cuda_compile")
        m = art.manifest["cuda_modules"][0]
        source = (art.path / m["source"]).read_text()
        # NUL-terminated: the driver reads PTX as a C string
        assert bytes(callback(source)) == (art.path / m["ptx"]).read_bytes() + b"\0"
        with pytest.raises(Exception, match="no PTX in the artifact"):
            callback(source + "\n// changed")
    finally:
        if previous is not None:
            tvm_ffi.register_global_func("tvm_callback_cuda_compile", previous, override=True)


def _no_gpu() -> bool:
    from onnxpress.backends.tvm.compiler import _local_gpu

    return not _local_gpu()


@pytest.mark.skipif("not _no_gpu()", reason="a GPU is present: tuning runs there")
def test_cuda_tuning_without_a_gpu_fails_with_a_clear_error(digits_cnn_path, tmp_path):
    with pytest.raises(BackendError, match="tuning for CUDA needs a GPU"):
        ox_tvm.compile(digits_cnn_path, "cuda", tune_trials=8, output_dir=tmp_path / "t", progress=False)
    assert not (tmp_path / "t").exists()


@pytest.mark.skipif("not _no_gpu()", reason="a GPU is present: tuning runs there")
def test_cli_cuda_tune_without_a_gpu_fails_with_a_clear_error(digits_cnn_path, tmp_path, capsys):
    from onnxpress.commands import tvm as cli

    code = cli.main(["compile", str(digits_cnn_path), "--target", "cuda", "--tune", "8",
                     "-o", str(tmp_path / "t"), "--quiet"])
    assert code != 0
    err = capsys.readouterr().err
    assert "tuning for CUDA needs a GPU" in err and "Traceback" not in err


def _fake_gpu_runner():
    """A MetaSchedule runner that measures nothing: each candidate library's "time" is drawn
    from its bytes (1-2 ms), so a search, its confirmation and the database they fill can be
    checked where no GPU is."""
    import hashlib

    from tvm.ir.utils import derived_object
    from tvm.s_tir.meta_schedule.runner import PyRunner, RunnerFuture, RunnerResult

    @derived_object
    class FakeRunner(PyRunner):
        def run(self, inputs):
            out = []
            for inp in inputs:
                with open(inp.artifact_path, "rb") as f:
                    secs = 1e-3 * (1 + hashlib.sha256(f.read()).digest()[0] / 256)
                out.append(RunnerFuture(lambda: True, lambda s=secs: RunnerResult([s], None)))
            return out

    return FakeRunner()


def test_cuda_tuning_searches_confirms_and_builds_its_picks(digits_cnn_path, tmp_path, monkeypatch):
    """MetaSchedule's CUDA space on the digits CNN's hottest task: candidates are scheduled and
    built with nvcc, the dlight default is measured beside them, the confirmed pick is what the
    artifact's kernel is compiled from, and a second compile reuses the database (on a GPU,
    test_gpu_tuned_digits_matches_onnxruntime measures for real)."""
    from onnxpress.backends.tvm import compiler

    monkeypatch.setattr(compiler, "_runner_for", lambda *a, **k: (_fake_gpu_runner(), "fake"))
    db = tmp_path / "db"
    art = ox_tvm.compile(digits_cnn_path, "cuda:sm_80", tune_trials=16, db=db,
                         output_dir=tmp_path / "tuned", progress=False)
    tuning = art.manifest["tuning"]
    assert tuning["tasks_tuned"] == 1 and tuning["trials_measured"] >= 8, tuning
    (task, row), = tuning["confirmed"].items()
    assert task in tuning["default_ms"]                      # dlight's schedule was measured
    assert row["kept"] == ("tuned" if row["tuned_ms"] < 0.98 * row["default_ms"] else "default"), row
    assert art.manifest["schedules"]["from_db"] == 1
    untuned = ox_tvm.compile(digits_cnn_path, "cuda:sm_80", output_dir=tmp_path / "untuned", progress=False)

    def kernel(a):
        ptx = (a.path / "kernels.ptx").read_text()
        start = ptx.index(f".entry {task}_kernel(")
        return ptx[start:ptx.index(".entry", start + 1) if ".entry" in ptx[start + 1:] else None]

    assert (kernel(art) != kernel(untuned)) == (row["kept"] == "tuned")
    again = ox_tvm.compile(digits_cnn_path, "cuda:sm_80", tune_trials=16, db=db,
                           output_dir=tmp_path / "again", progress=False)
    assert again.manifest["tuning"]["trials_measured"] == 0
    assert kernel(again) == kernel(art)


# -- on a GPU ------------------------------------------------------------------------------------

@pytest.mark.gpu
def test_gpu_cnn_matches_onnxruntime_qdq_reference(cuda_cnn):
    model, art = cuda_cnn
    rng = np.random.default_rng(1)
    for _ in range(3):
        _compare(model, art, {"x": rng.standard_normal((1, 8, 12, 12)).astype(np.float32) * 2})


@pytest.mark.gpu
def test_gpu_encoder_matches_onnxruntime_qdq_reference(cuda_encoder):
    model, art = cuda_encoder
    rng = np.random.default_rng(2)
    _compare(model, art, {"x": rng.standard_normal((1, 16, 64)).astype(np.float32)})


@pytest.mark.gpu
def test_gpu_fp32_digits_matches_onnxruntime(digits_cnn_path, digits_feeds, tmp_path):
    art = ox_tvm.compile(digits_cnn_path, "cuda:sm_80", output_dir=tmp_path / "fp32", progress=False)
    result = art.verify(digits_cnn_path, digits_feeds, rtol=1e-3, atol=1e-4)
    assert result.ok, str(result)


@pytest.mark.gpu
def test_gpu_tuned_digits_matches_onnxruntime(digits_cnn_path, digits_feeds, tmp_path):
    art = ox_tvm.compile(digits_cnn_path, "cuda:sm_80", tune_trials=32, db=tmp_path / "db",
                         output_dir=tmp_path / "tuned", progress=False)
    tuning = art.manifest["tuning"]
    assert tuning["runner"] == "local GPU" and tuning["trials_measured"] >= 16, tuning
    assert tuning["default_ms"] and tuning["confirmed"], tuning
    assert art.manifest["schedules"]["from_db"] >= 1
    result = art.verify(digits_cnn_path, digits_feeds, rtol=1e-3, atol=1e-4)
    assert result.ok, str(result)
