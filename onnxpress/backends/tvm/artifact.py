"""Compiled artifacts: a directory that the TVM runtime alone can load and run.

    ARTIFACT/
      model.so          the Relax VM executable with kernels and weights (aarch64 .so for arm)
      manifest.json     inputs, outputs, target, versions, passes applied, tuning summary
      run.py            standalone runner (numpy + apache-tvm), for boards and qemu
      cuda/SHA.ptx      CUDA targets: each CUDA module's PTX for the requested arch (made by nvcc),
      cuda/SHA.cu       named by the SHA-256 of its CUDA source; run.py loads the PTX from here
      kernels.ptx/.cu   CUDA targets: all modules' PTX and source, concatenated to read
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import tempfile
from collections import Counter
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from onnxpress.backends.ort import BenchResult, VerifyResult, compare_outputs
from onnxpress.backends.profile import Profile, make_profile
from onnxpress.errors import BackendError

from . import rpc as rpc_mod
from .targets import _first_line, host_is_aarch64

MANIFEST = "manifest.json"
LIBRARY = "model.so"
RUNNER = "run.py"


def random_inputs(specs: Mapping[str, Mapping[str, Any]], seed: int = 0) -> dict[str, np.ndarray]:
    """Random arrays for {input name: {"shape", "dtype"}}: integers and booleans 0/1 (valid
    token ids and masks), floats standard normal."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, spec in specs.items():
        dt = np.dtype(spec["dtype"])
        if dt.kind in "iub":
            out[name] = rng.integers(0, 2, size=spec["shape"]).astype(dt)
        else:
            out[name] = rng.standard_normal(spec["shape"]).astype(dt)
    return out


def kernels_summary(schedules: Mapping[str, Any]) -> str:
    """Where an artifact's kernels came from, from its manifest's "schedules" entry ("" when it
    has none). `from_db` counts the tuned build's kernels from the tuning DB; when the end-to-end
    check kept the default build instead, that is what runs, and this says so with both timings."""
    if schedules.get("chosen") == "default" and schedules.get("from_db_not_default") == 0:
        return (f"the default schedules (the tuning DB's {schedules.get('from_db', 0)} kernels are "
                "the defaults themselves: no searched schedule beat them)")
    if schedules.get("chosen") == "default":
        e2e = schedules.get("end_to_end_ms") or {}
        return (f"the default schedules; the build with {schedules.get('from_db', 0)} kernels from "
                f"the tuning DB ran {e2e.get('tuned', float('nan')):.2f} ms end to end against "
                f"{e2e.get('default', float('nan')):.2f} ms for the defaults, so it was not kept")
    if not schedules:
        return ""
    ratio = schedules.get("end_to_end_ratio")
    return (f"{schedules.get('from_db', 0)} from the tuning DB, "
            f"{schedules.get('default_scheduled', 0)} default-scheduled"
            + (f" (end to end {ratio:.2f}x the default schedules' time; two timings of one build "
               "can differ by 5%)" if ratio is not None else ""))


def _bench_result(times_ms: list[float], threads: int | None) -> BenchResult:
    t = sorted(times_ms)
    if not t:
        raise BackendError("benchmark produced no timings")
    return BenchResult(p50_ms=statistics.median(t),
                       p90_ms=t[min(len(t) - 1, int(round(0.9 * (len(t) - 1))))],
                       mean_ms=statistics.fmean(t), min_ms=t[0], runs=len(t), threads=threads,
                       optimization="tvm")


class Artifact:
    """A compiled model: `run(feeds)`, `benchmark()`, `verify(onnx_model, feeds)`.

    Where it runs: on this host when the target matches it; an aarch64 artifact on an x86 host runs
    under qemu-aarch64; with `rpc="HOST:PORT", key=K` (given here or to compile()) it runs on the
    board registered at that tracker.
    """

    def __init__(self, path: str | os.PathLike, manifest: Mapping[str, Any] | None = None, *,
                 rpc: str | None = None, key: str | None = None):
        self.path = Path(path)
        if manifest is None:
            try:
                manifest = json.loads((self.path / MANIFEST).read_text())
            except FileNotFoundError:
                raise BackendError(f"{self.path} is not a TVM artifact: no {MANIFEST}") from None
            except (OSError, json.JSONDecodeError) as exc:
                raise BackendError(f"cannot read {self.path / MANIFEST}: {exc}") from None
        self.manifest = dict(manifest)
        self.rpc = rpc
        self.key = key
        self._vm = None
        self._lib = None

    # -- facts ---------------------------------------------------------------------------------
    @property
    def inputs(self) -> list[dict]:
        return list(self.manifest["inputs"])

    @property
    def outputs(self) -> list[dict]:
        return list(self.manifest["outputs"])

    @property
    def target_name(self) -> str:
        return self.manifest["target"]["name"]

    @property
    def library(self) -> Path:
        return self.path / self.manifest.get("library", LIBRARY)

    def where(self, rpc: str | None = None) -> str:
        if rpc or self.rpc:
            return "rpc"
        if self.manifest["target"]["family"] == "gpu":
            return "local"
        if self.target_name == "arm" and not host_is_aarch64():
            return "qemu"
        return "local"

    def __repr__(self) -> str:
        return f"Artifact({str(self.path)!r}, target={self.target_name})"

    # -- inputs --------------------------------------------------------------------------------
    def _feeds(self, feeds: Mapping[str, np.ndarray] | None, seed: int = 0) -> dict[str, np.ndarray]:
        if feeds is None:
            return random_inputs({spec["name"]: spec for spec in self.inputs}, seed)
        result = {}
        for spec in self.inputs:
            if spec["name"] not in feeds:
                raise BackendError(f"missing input '{spec['name']}'; the artifact needs "
                                   f"{', '.join(i['name'] for i in self.inputs)}")
            arr = np.ascontiguousarray(np.asarray(feeds[spec["name"]]))
            if list(arr.shape) != list(spec["shape"]):
                raise BackendError(f"input '{spec['name']}' has shape {list(arr.shape)}; this artifact "
                                   f"was compiled for {spec['shape']} (recompile with --shape)")
            if arr.dtype != np.dtype(spec["dtype"]):
                arr = arr.astype(spec["dtype"])
            result[spec["name"]] = arr
        return result

    # -- local -----------------------------------------------------------------------------------
    def _local_vm(self):
        if self._vm is None:
            from tvm.runtime.vm import VirtualMachine

            lib, dev = self._local_library()
            try:
                self._vm = (VirtualMachine(lib, dev), dev)
            except Exception as exc:
                raise BackendError(f"cannot load {self.library}: {_first_line(exc)}") from None
        return self._vm

    def _local_library(self):
        """(the loaded model.so, the device it runs on here)."""
        if self._lib is None:
            import tvm

            from .run_artifact import check_cpu

            try:
                check_cpu(self.manifest)
            except RuntimeError as exc:
                raise BackendError(f"{self.path}: {exc}") from None
            try:
                dev = tvm.cpu(0)
                if self.manifest["target"]["family"] == "gpu":
                    from .run_artifact import ensure_cuda_runtime, use_stored_ptx

                    ensure_cuda_runtime()
                    dev = tvm.cuda(0)
                    if not dev.exist:
                        raise BackendError("this artifact targets CUDA and no GPU is present here "
                                           "(or TVM's CUDA runtime cannot find the CUDA driver)")
                    use_stored_ptx(str(self.path), self.manifest)
                lib = tvm.runtime.load_module(_fresh_path(self.library))
                self._lib = (lib, dev)
            except BackendError:
                raise
            except Exception as exc:
                raise BackendError(f"cannot load {self.library}: {_first_line(exc)}") from None
        return self._lib

    def _outputs(self, result) -> dict[str, np.ndarray]:
        outs = [result] if hasattr(result, "numpy") else list(result)
        return {o["name"]: t.numpy() for o, t in zip(self.outputs, outs)}

    # -- qemu --------------------------------------------------------------------------------------
    def _qemu(self, feeds: dict, bench: int = 0, warmup: int = 3) -> tuple[dict, list[float]]:
        cmd = rpc_mod.qemu_python_command()
        with tempfile.TemporaryDirectory(prefix="onnxpress-qemu-") as tmp:
            np.savez(os.path.join(tmp, "in.npz"), **feeds)
            args = [*cmd, str(self.path / RUNNER), str(self.path), "--inputs",
                    os.path.join(tmp, "in.npz"), "--outputs", os.path.join(tmp, "out.npz")]
            if bench:
                args += ["--bench", str(bench), "--warmup", str(warmup)]
            proc = subprocess.run(args, env=rpc_mod.qemu_env(), capture_output=True, text=True)
            if proc.returncode != 0:
                tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
                raise BackendError(f"the aarch64 run under qemu failed: {' | '.join(tail)}")
            with np.load(os.path.join(tmp, "out.npz")) as z:
                outs = {k: z[k] for k in z.files}
            times = []
            for line in proc.stdout.splitlines():
                if line.startswith("{"):
                    times = json.loads(line)["times_ms"]
            return outs, times

    # -- rpc ---------------------------------------------------------------------------------------
    def _remote(self, rpc: str, key: str):
        import tvm
        from tvm.runtime.vm import VirtualMachine

        remote = rpc_mod.connect(rpc, key)
        try:
            remote.upload(str(self.library))
            lib = remote.load_module(self.library.name)
            dev = remote.cuda(0) if self.manifest["target"]["family"] == "gpu" else remote.cpu(0)
            return remote, VirtualMachine(lib, dev), dev
        except Exception as exc:
            raise BackendError(f"the RPC server '{key}' at {rpc} cannot load {self.library.name}: "
                               f"{_first_line(exc)}") from None
        del tvm

    # -- public ------------------------------------------------------------------------------------
    def run(self, feeds: Mapping[str, np.ndarray] | None = None, *, rpc: str | None = None,
            key: str | None = None) -> dict[str, np.ndarray]:
        """Run once; returns {output name: array}. Without feeds, inputs are generated."""
        import tvm

        feeds = self._feeds(feeds)
        rpc, key = rpc or self.rpc, key or self.key
        mode = self.where(rpc)
        if mode == "qemu":
            return self._qemu(feeds)[0]
        if mode == "rpc":
            if not key:
                raise BackendError("running over RPC needs the server's key (key=... / --key)")
            _remote, vm, dev = self._remote(rpc, key)
        else:
            vm, dev = self._local_vm()
        try:
            args = [tvm.runtime.tensor(feeds[i["name"]], dev) for i in self.inputs]
            return self._outputs(vm["main"](*args))
        except Exception as exc:
            raise BackendError(f"running {self.path} failed: {_first_line(exc)}") from None

    def benchmark(self, feeds: Mapping[str, np.ndarray] | None = None, *, runs: int = 50,
                  warmup: int = 5, rpc: str | None = None, key: str | None = None) -> BenchResult:
        """Latency of one inference (p50/p90 in ms), timed by TVM's own time_evaluator."""
        import tvm

        feeds = self._feeds(feeds)
        rpc, key = rpc or self.rpc, key or self.key
        mode = self.where(rpc)
        threads = self.manifest["target"].get("spec", {}).get("num-cores")
        if mode == "qemu":
            return _bench_result(self._qemu(feeds, bench=runs, warmup=warmup)[1], 1)
        if mode == "rpc":
            if not key:
                raise BackendError("benchmarking over RPC needs the server's key (key=... / --key)")
            _remote, vm, dev = self._remote(rpc, key)
        else:
            vm, dev = self._local_vm()
        try:
            args = [tvm.runtime.tensor(feeds[i["name"]], dev) for i in self.inputs]
            vm.set_input("main", *args)
            for _ in range(max(0, warmup)):
                vm.invoke_stateful("main")
            timer = vm.time_evaluator("invoke_stateful", dev, number=1, repeat=max(1, runs))
            res = timer("main")
        except Exception as exc:
            raise BackendError(f"benchmarking {self.path} failed: {_first_line(exc)}") from None
        return _bench_result([float(r) * 1e3 for r in res.results], threads)

    def profile(self, feeds: Mapping[str, np.ndarray] | None = None, *, runs: int = 20,
                warmup: int = 5) -> Profile:
        """Where one inference's time goes: every kernel of the artifact, the slowest first.

        One run of the VM with an instrument on every call it makes: a kernel of model.so is
        timed just before it runs, on the very arguments it is about to get (TVM's
        time_evaluator: the median of `runs` single calls, as benchmark() takes the median of
        whole runs; on a GPU, of `runs` means of 10 calls, timed by CUDA events), then runs as
        usual. VM builtins (allocation, shape checks) are counted, not timed; the latency they
        and the dispatch between kernels add is `other_ms`. Works on any artifact as built:
        TVM 0.27 dropped the relax VM profiler (`profile=True`), the instrument hook is what
        remains, and it needs nothing compiled in.

        Local artifacts only: under qemu the times would be emulation's, and the instrument is a
        Python callback that RPC cannot carry to a board. The profiling VM is one of its own,
        whose outputs are dropped: a kernel that writes into its input runs many times there."""
        import tvm
        from tvm.runtime.vm import VirtualMachine

        mode = self.where()
        if mode == "qemu":
            raise BackendError(f"{self.path} is an aarch64 artifact, which runs here only under qemu: "
                               "emulated kernel times say nothing about a board; profile it on an "
                               "aarch64 host")
        if mode == "rpc":
            raise BackendError(f"cannot profile {self.path} over RPC: the per-kernel profile hooks a "
                               "Python callback into the VM, which TVM RPC cannot carry to the "
                               "board; profile it on the board itself")
        feeds = self._feeds(feeds)
        latency = self.benchmark(feeds, runs=runs, warmup=warmup).p50_ms
        lib, dev = self._local_library()
        modules = list(_imported_modules(lib))
        # on a GPU one call per timing is mostly launch and synchronisation, which a run overlaps
        # with the kernel before: there each timing is the mean of 10 calls back to back
        number = 10 if self.manifest["target"]["family"] == "gpu" else 1
        timers: dict[str, Any] = {}
        calls: Counter[str] = Counter()
        ms: Counter[str] = Counter()
        vm_calls: Counter[str] = Counter()

        def time_kernel(func, name, before, ret, *args):
            if not before:
                return 0
            if name not in timers:
                timers[name] = next((m.time_evaluator(name, dev, number=number, repeat=max(3, runs))
                                     for m in modules if m.implements_function(name)), None)
            if timers[name] is None:     # a VM builtin or a Relax function calling kernels
                vm_calls[name] += 1
            else:
                calls[name] += 1
                ms[name] += float(timers[name](*args).median) * 1e3
            return 0

        try:
            vm = VirtualMachine(lib, dev)
            vm.set_input("main", *[tvm.runtime.tensor(feeds[i["name"]], dev) for i in self.inputs])
            vm.set_instrument(time_kernel)
            vm.invoke_stateful("main")
        except Exception as exc:
            raise BackendError(f"profiling {self.path} failed: {_first_line(exc)}") from None
        if not calls:
            raise BackendError(f"profiling {self.path}: the VM called no kernel of {self.library.name}")
        return make_profile({k: (calls[k], ms[k]) for k in calls}, latency, backend="tvm",
                            runs=runs, other_calls=sum(vm_calls.values()))

    def verify(self, onnx_model, feeds: Mapping[str, np.ndarray] | None = None, *,
               rtol: float | None = None, atol: float | None = None, rpc: str | None = None,
               key: str | None = None, optimization: str = "auto",
               min_cosine: float = 0.9995) -> VerifyResult:
        """Compare this artifact's outputs with onnxruntime running `onnx_model` on the same feeds.

        optimization: onnxruntime's graph optimizations for the reference run. "auto" disables
        them for models with QuantizeLinear/DequantizeLinear: QDQ's meaning is float arithmetic
        between dequantize and quantize, which TVM compiles, while onnxruntime's optimized
        session fuses them into int8 kernels that round differently (mobilenetv3 after
        quant_int8: 3e-3 apart from its own unoptimized run, TVM 2e-7 from that run).

        Tolerance: rtol 1e-4 / atol 1e-5 by default. An artifact that runs integer kernels
        (manifest "integer") rounds each requantization as the reference does, but a value
        exactly between two steps in float may land on either side after integer accumulation
        and the flip carries on through later layers: unless rtol/atol are given, such an
        artifact is judged by at most one step on integer outputs and a cosine of at least
        `min_cosine` on float ones."""
        from onnxpress.backends import ort
        from onnxpress.io import load

        feeds = self._feeds(feeds)
        if optimization == "auto":
            proto = load(onnx_model, check=False)
            qdq = {"QuantizeLinear", "DequantizeLinear"}
            optimization = "disable" if any(n.op_type in qdq for n in proto.graph.node) else "all"
            onnx_model = proto
        expected = ort.run(onnx_model, feeds, optimization=optimization)
        actual = self.run(feeds, rpc=rpc, key=key)
        integer = (self.manifest.get("integer") or {}).get("int8_kernels", 0) > 0
        if not integer or rtol is not None or atol is not None:
            return compare_outputs(expected, actual, rtol=1e-4 if rtol is None else rtol,
                                   atol=1e-5 if atol is None else atol)
        result = compare_outputs(expected, actual, rtol=0.0, atol=1.0)
        for o in result.outputs:
            ref = np.asarray(expected.get(o.name)) if o.name in expected else None
            floating = ref is not None and ref.dtype.kind in "fc"
            o.ok = (o.cosine >= min_cosine) if floating else o.max_abs <= 1.0
        result.ok = all(o.ok for o in result.outputs)
        result.criterion = f"integer kernels: <= 1 step on integer outputs, cosine >= {min_cosine:g} on float ones"
        return result


def _imported_modules(lib) -> Iterator[Any]:
    """The modules model.so imports, depth first: the kernels live there, not in the VM's."""
    for m in lib.imports:
        yield m
        yield from _imported_modules(m)


def load_artifact(path: str | os.PathLike, *, rpc: str | None = None, key: str | None = None) -> Artifact:
    """Open an artifact directory written by compile()."""
    p = Path(path)
    if not p.is_dir():
        raise BackendError(f"{p} is not a directory (expected an artifact written by onnxpress compile)")
    art = Artifact(p, rpc=rpc, key=key)
    if not art.library.exists():
        raise BackendError(f"{p} has a manifest but no {art.library.name}")
    return art


_LOADED: dict[str, tuple[int, int]] = {}     # library path -> (inode, mtime) loaded from it


def _fresh_path(library: Path) -> str:
    """The path to dlopen `library` from. The dynamic loader hands back the library it already
    mapped for a path it has seen, even after the file was replaced: a model recompiled into the
    same directory in one process (a notebook) ran the old model's code. A file that changed
    since its path was loaded is loaded from a copy under a name of its own."""
    path = str(Path(library).resolve())
    try:
        st = os.stat(path)
    except OSError:
        return path
    ident = (st.st_ino, st.st_mtime_ns)
    seen = _LOADED.setdefault(path, ident)
    if seen == ident:
        return path
    copy = os.path.join(tempfile.mkdtemp(prefix="onnxpress-lib-"), f"{st.st_ino}-{st.st_mtime_ns}.so")
    try:
        os.link(path, copy)
    except OSError:
        shutil.copyfile(path, copy)
    return copy


def benchmark_artifact(path: str | os.PathLike, feeds: Mapping[str, np.ndarray] | None = None, *,
                       runs: int = 50, warmup: int = 5, rpc: str | None = None,
                       key: str | None = None, **_ignored) -> BenchResult:
    """p50/p90 latency of an artifact directory (used by `onnxpress bench DIR`)."""
    return load_artifact(path, rpc=rpc, key=key).benchmark(feeds, runs=runs, warmup=warmup)


def write_atomically(build_dir: Path, output_dir: Path) -> None:
    """Move a finished build into place; an existing artifact is replaced only at the end."""
    output_dir = output_dir.resolve()
    old = None
    if output_dir.exists():
        if not (output_dir / MANIFEST).exists() and any(output_dir.iterdir()):
            raise BackendError(f"{output_dir} exists and is not an onnxpress artifact; "
                               "refusing to overwrite it")
        old = output_dir.with_name(f".{output_dir.name}.old-{os.getpid()}")
        os.replace(output_dir, old)
    os.replace(build_dir, output_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
