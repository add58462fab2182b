"""Target names -> TVM targets.

    x86           llvm for the host CPU (mcpu detected by LLVM, num-cores = physical cores)
    arm           llvm for aarch64-linux-gnu with NEON (cross-compiled, exported with aarch64-linux-gnu-gcc)
    cuda          CUDA for an architecture (default sm_80; "cuda:sm_90" picks another), host llvm
    {dict}        any TVM target dict, e.g. {"kind": "llvm", "mcpu": "znver5", "num-cores": 2}
"""

from __future__ import annotations

import dataclasses
import os
import platform
from collections.abc import Mapping
from typing import Any

from onnxpress.errors import BackendError

ARM_TRIPLE = "aarch64-linux-gnu"
DEFAULT_CUDA_ARCH = "sm_80"


@dataclasses.dataclass
class ResolvedTarget:
    name: str                    # x86, arm, cuda or custom
    spec: dict                   # the JSON dict given to tvm.target.Target
    host: dict | None            # host target dict for device targets (cuda)
    family: str                  # "cpu" or "gpu"
    cross: bool                  # the library cannot run on this host (needs qemu or a board)

    def tvm_target(self):
        import tvm

        try:
            if self.host is not None:
                return tvm.target.Target(self.spec, host=self.host)
            return tvm.target.Target(self.spec)
        except Exception as exc:
            raise BackendError(f"TVM rejects the target {self.spec}: {_first_line(exc)}") from None

    @property
    def mcpu(self) -> str | None:
        return self.spec.get("mcpu")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith(("File ", "Traceback", "  ")):
            return line
    return type(exc).__name__


def use_all_cores() -> None:
    """Make TVM's CPU thread pool use every physical core (unless TVM_NUM_THREADS/OMP_NUM_THREADS
    say otherwise). Without it TVM starts hardware_concurrency / 2 threads on x86, assuming
    hyper-threading: one thread on a 2-core machine without SMT, which halved every kernel
    (resnet18: 38.4 -> 20.3 ms) and made tuning measure single-threaded candidates. The pool
    reads this when it is first used, so it is set on import, before any TVM code runs;
    MetaSchedule's measurement workers inherit it."""
    global _THREADS_SET_HERE
    if "TVM_NUM_THREADS" not in os.environ and "OMP_NUM_THREADS" not in os.environ:
        os.environ["TVM_NUM_THREADS"] = str(physical_cores())
        _THREADS_SET_HERE = os.environ["TVM_NUM_THREADS"]


_THREADS_SET_HERE: str | None = None


def threads_chosen_by_user() -> bool:
    """Whether TVM_NUM_THREADS in the environment is the user's, not use_all_cores()'s."""
    value = os.environ.get("TVM_NUM_THREADS")
    return value is not None and value != _THREADS_SET_HERE


def physical_cores() -> int:
    try:
        import psutil

        n = psutil.cpu_count(logical=False)
        if n:
            return int(n)
    except ImportError:
        pass
    return os.cpu_count() or 1


def host_cpu() -> str:
    from tvm.target import codegen

    return str(codegen.llvm_get_system_cpu())


def host_cpu_model() -> str:
    """The host CPU's model name (/proc/cpuinfo), e.g. "AMD EPYC 7B13"; "" where unknown."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("model name", "Model")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or ""


def db_key(resolved: ResolvedTarget) -> str:
    """The tuning database's sub-directory for a target: MetaSchedule looks records up by the
    workload alone, never by the target, so one directory shared by two CPUs would hand each
    the other's schedules. x86 (the host): the LLVM CPU name and the CPU model; cross and
    custom targets: their target string; cuda: the arch."""
    import re

    spec = resolved.spec
    if resolved.name == "cuda":
        text = f"cuda-{spec.get('arch', '')}"
    elif resolved.name == "x86" and not resolved.cross:
        text = f"x86-{spec.get('mcpu', '')}-{host_cpu_model()}"
    else:
        text = f"{resolved.name}-{spec.get('mtriple', '')}-{spec.get('mcpu', 'generic')}-" + \
            "".join(str(a) for a in spec.get("mattr", []) or [])
    return re.sub(r"[^A-Za-z0-9._+-]+", "-", text).strip("-")[:120]


def cpu_features(target) -> list[str]:
    """The x86 instruction-set features (LLVM names, those that run.py's CPU_FLAGS maps to
    /proc/cpuinfo flags) that an llvm target for x86 may use; [] for other targets. Written
    into the manifest, so that running on a CPU without them is refused by name instead of
    dying of an illegal instruction."""
    from tvm.target import codegen

    from .run_artifact import CPU_FLAGS

    if str(target.kind.name) != "llvm" or str(target.attrs.get("mtriple", "") or "").split("-")[0] \
            not in ("", "x86_64"):
        return []
    found = []
    for feature in CPU_FLAGS:
        try:
            if codegen.target_has_features(feature, target):
                found.append(feature)
        except Exception:       # a feature this LLVM does not know
            continue
    return found


def host_is_aarch64() -> bool:
    return platform.machine().lower() in ("aarch64", "arm64")


def resolve_target(target: str | Mapping[str, Any], *, num_cores: int | None = None) -> ResolvedTarget:
    """Turn "x86" | "arm" | "cuda[:sm_XX]" | a target dict into a ResolvedTarget."""
    if isinstance(target, Mapping):
        spec = dict(target)
        kind = spec.get("kind")
        if not kind:
            raise BackendError(f"target dict {spec} has no 'kind' (e.g. 'llvm' or 'cuda')")
        host = spec.pop("host", None)
        if kind == "cuda":
            host = host or {"kind": "llvm"}
            return ResolvedTarget("cuda", spec, dict(host) if isinstance(host, Mapping) else host,
                                  "gpu", False)
        triple = str(spec.get("mtriple", ""))
        cross = bool(triple) and triple.split("-")[0] != platform.machine().lower()
        name = "arm" if triple.startswith("aarch64") else ("x86" if kind == "llvm" else "custom")
        return ResolvedTarget(name, spec, None, "cpu" if kind == "llvm" else "gpu", cross)
    if not isinstance(target, str):
        raise BackendError(f"target must be 'x86', 'arm', 'cuda' or a dict, not {type(target).__name__}")
    name, _, arg = target.partition(":")
    name = name.strip().lower()
    if name in ("x86", "x86_64", "host", "llvm", "cpu"):
        spec = {"kind": "llvm", "mcpu": host_cpu(), "num-cores": int(num_cores or physical_cores())}
        return ResolvedTarget("x86", spec, None, "cpu", host_is_aarch64())
    if name in ("arm", "aarch64", "arm64"):
        spec = {"kind": "llvm", "mtriple": ARM_TRIPLE, "mattr": ["+neon"],
                "num-cores": int(num_cores or 4)}
        if arg:
            spec["mcpu"] = arg
        return ResolvedTarget("arm", spec, None, "cpu", not host_is_aarch64())
    if name == "cuda":
        arch = arg or DEFAULT_CUDA_ARCH
        if not arch.startswith("sm_"):
            raise BackendError(f"CUDA arch '{arch}' should look like sm_80")
        # limits every CUDA GPU since sm_50 shares (48 KiB is the static shared memory a block
        # may use without opting in); schedules size their thread blocks and tiles by them
        spec = {"kind": "cuda", "arch": arch, "max_threads_per_block": 1024,
                "max_shared_memory_per_block": 49152, "thread_warp_size": 32}
        return ResolvedTarget("cuda", spec, {"kind": "llvm"}, "gpu", False)
    raise BackendError(f"unknown target '{target}': use x86, arm, cuda (or cuda:sm_XX) or a TVM target dict")
