"""The Apache TVM backend: compile, tune and run ONNX models on x86, ARM (aarch64) and CUDA,
locally or on boards over TVM RPC.

    from onnxpress.backends import tvm
    art = tvm.compile("model.onnx", target="x86", tune_trials=0, output_dir="out/x86")
    art.run(feeds); art.benchmark(); art.verify("model.onnx", feeds)
    art = tvm.compile(model, target="arm", tune_trials=200, db="tvm-db",
                      rpc="127.0.0.1:9190", key="rk3588", output_dir="out/arm")
    tvm.benchmark_artifact("out/x86")                 # p50_ms / p90_ms, like ort.BenchResult
    tvm.instruction_mix("out/arm", "model.onnx")      # vector share, loads per FMA of the hot kernels

See docs/tvm.md.
"""

from __future__ import annotations

from .targets import use_all_cores

use_all_cores()

from .artifact import Artifact, benchmark_artifact, load_artifact  # noqa: E402
from .compiler import compile, default_db_dir  # noqa: E402
from .isa_mix import InstructionMix, KernelMix, instruction_mix  # noqa: E402
from .rpc import LocalCluster, arm_runtime_problem, local_cluster  # noqa: E402
from .targets import ResolvedTarget, resolve_target  # noqa: E402
from .tuning import TuneSummary  # noqa: E402

__all__ = [
    "Artifact",
    "InstructionMix",
    "KernelMix",
    "LocalCluster",
    "ResolvedTarget",
    "TuneSummary",
    "arm_runtime_problem",
    "benchmark_artifact",
    "compile",
    "default_db_dir",
    "instruction_mix",
    "load_artifact",
    "local_cluster",
    "resolve_target",
]
