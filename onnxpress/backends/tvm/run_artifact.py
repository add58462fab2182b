"""Run a compiled onnxpress artifact with the TVM runtime alone (numpy + apache-tvm).

Copied into every artifact as run.py, so a board (or qemu-aarch64) needs no onnxpress:

    python run.py ARTIFACT_DIR --inputs in.npz --outputs out.npz [--bench RUNS]
"""

import argparse
import hashlib
import json
import os
import sys


def source_key(code) -> str:
    """The name a CUDA module's PTX is stored under: the SHA-256 of its CUDA source."""
    data = code.encode() if isinstance(code, str) else bytes(code)
    return hashlib.sha256(data).hexdigest()


def use_stored_ptx(artifact_dir, manifest) -> None:
    """TVM keeps CUDA kernels in model.so as CUDA C and asks `tvm_callback_cuda_compile` for
    device code when the library loads: answer with the PTX compiled into the artifact, so
    running needs neither TVM's compiler nor nvcc (the driver JIT-compiles the PTX)."""
    modules = {m["sha256"]: os.path.join(artifact_dir, m["ptx"]) for m in manifest.get("cuda_modules") or []}
    if not modules:
        return
    import tvm_ffi

    def compile_from_artifact(code, *_):
        path = modules.get(source_key(code))
        if path is None:
            raise RuntimeError("a CUDA module in the library has no PTX in the artifact "
                               "(model.so and cuda/ come from different builds?)")
        with open(path, "rb") as f:
            # cuModuleLoadData reads PTX as a C string: it must end in NUL
            return f.read() + b"\0"

    tvm_ffi.register_global_func("tvm_callback_cuda_compile", compile_from_artifact, override=True)


def ensure_cuda_runtime() -> None:
    """Load TVM's CUDA runtime library if `import tvm` did not (runtime-only installs, as on a
    GPU box without TVM's compiler, skip the device backends)."""
    import tvm_ffi

    if tvm_ffi.get_global_func("device_api.cuda", allow_missing=True) is not None:
        return
    try:
        import ctypes

        from tvm.base import _LOADED_LIBS

        runtime_dir = os.path.dirname(os.path.realpath(_LOADED_LIBS["tvm_runtime"]._name))
        _LOADED_LIBS["tvm_runtime_cuda"] = ctypes.CDLL(
            os.path.join(runtime_dir, "libtvm_runtime_cuda.so"), mode=ctypes.RTLD_GLOBAL)
    except Exception:      # no CUDA runtime here: tvm.cuda(0).exist says so to the caller
        pass


# LLVM feature name -> the flag Linux prints in /proc/cpuinfo
CPU_FLAGS = {"sse4.2": "sse4_2", "avx": "avx", "avx2": "avx2", "fma": "fma", "f16c": "f16c",
             "avx512f": "avx512f", "avx512bw": "avx512bw", "avx512dq": "avx512dq",
             "avx512vl": "avx512vl", "avx512vnni": "avx512_vnni", "avxvnni": "avx_vnni",
             "avx512bf16": "avx512_bf16", "avx512fp16": "avx512_fp16", "amx-int8": "amx_int8"}


CPUINFO = "/proc/cpuinfo"


def missing_cpu_features(manifest, cpuinfo=None):
    """The instruction-set features an x86 artifact was compiled to use that this CPU lacks
    ([] where it has them all, or where the artifact or the host is not x86 Linux): loading
    such a library would stop the process with an illegal instruction, not an error."""
    wanted = (manifest.get("target") or {}).get("cpu_features") or []
    if not wanted:
        return []
    try:
        with open(cpuinfo or CPUINFO) as f:
            flags = next((set(line.split(":", 1)[1].split()) for line in f if line.startswith("flags")), None)
    except OSError:
        return []
    if flags is None:
        return []
    return [feat for feat in wanted if CPU_FLAGS.get(feat, feat) not in flags]


def check_cpu(manifest) -> None:
    missing = missing_cpu_features(manifest)
    if missing:
        spec = manifest["target"].get("spec") or {}
        raise RuntimeError(
            f"this artifact was compiled for the CPU '{spec.get('mcpu', '?')}' and uses {', '.join(missing)}, "
            "which this CPU lacks (it would stop with an illegal instruction): compile it for this "
            "machine (target x86) or run it on a CPU that has them")
    if (manifest.get("schedules") or {}).get("amx_kernels") and not request_amx():
        raise RuntimeError(
            "this artifact's int8 kernels run on AMX tiles, which this operating system does not "
            "let the process use (Linux 5.16+ grants them through arch_prctl(ARCH_REQ_XCOMP_PERM)): "
            "run it on a newer Linux, or compile it for a CPU without AMX (API: target={'kind': "
            "'llvm', 'mcpu': 'icelake-server'})")


def request_amx() -> bool:
    """Ask Linux for the AMX tile state (once per process): kernels that use AMX tiles stop the
    process with an illegal instruction without it. This file runs without onnxpress installed,
    so it asks by itself (amx.request_permission does the same inside onnxpress)."""
    import ctypes
    import platform

    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        return False
    try:
        # arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA), syscall 158 on x86-64
        return ctypes.CDLL(None, use_errno=True).syscall(158, 0x1023, 18) == 0
    except (OSError, AttributeError):
        return False


def load(artifact_dir, device=None):
    with open(os.path.join(artifact_dir, "manifest.json")) as f:
        manifest = json.load(f)
    if "TVM_NUM_THREADS" not in os.environ and "OMP_NUM_THREADS" not in os.environ:
        # TVM's default is half the logical CPUs (it assumes hyper-threading): use them all,
        # capped by the cores the artifact was compiled for
        cores = manifest["target"].get("spec", {}).get("num-cores") or os.cpu_count() or 1
        os.environ["TVM_NUM_THREADS"] = str(max(1, min(int(cores), os.cpu_count() or 1)))
    import tvm
    from tvm.runtime.vm import VirtualMachine

    check_cpu(manifest)
    if manifest["target"]["family"] == "gpu":
        ensure_cuda_runtime()
        use_stored_ptx(artifact_dir, manifest)
    lib = tvm.runtime.load_module(os.path.join(artifact_dir, manifest["library"]))
    dev = device or (tvm.cuda(0) if manifest["target"]["family"] == "gpu" else tvm.cpu(0))
    return manifest, VirtualMachine(lib, dev), dev


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("artifact", nargs="?", default=os.path.dirname(os.path.abspath(__file__)))
    ap.add_argument("--inputs", required=True)
    ap.add_argument("--outputs")
    ap.add_argument("--bench", type=int, default=0)
    ap.add_argument("--warmup", type=int, default=3)
    args = ap.parse_args(argv)

    import numpy as np
    import tvm

    manifest, vm, dev = load(args.artifact)
    feeds = np.load(args.inputs)
    tensors = [tvm.runtime.tensor(np.ascontiguousarray(feeds[i["name"]]), dev) for i in manifest["inputs"]]
    result = vm["main"](*tensors)
    outs = [result] if hasattr(result, "numpy") else list(result)
    if args.outputs:
        np.savez(args.outputs, **{o["name"]: t.numpy() for o, t in zip(manifest["outputs"], outs)})
    if args.bench:
        vm.set_input("main", *tensors)
        timer = vm.time_evaluator("invoke_stateful", dev, number=1, repeat=args.bench,
                                  min_repeat_ms=0)
        for _ in range(args.warmup):
            vm.invoke_stateful("main")
        res = timer("main")
        print(json.dumps({"times_ms": [r * 1e3 for r in res.results]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
