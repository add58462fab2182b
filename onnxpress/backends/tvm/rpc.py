"""TVM RPC for boards, and qemu-user for aarch64 on an x86 host.

    tracker (python -m tvm.exec.rpc_tracker) <- servers register by key (a board, or qemu-aarch64)
    client: connect_tracker(host, port).request(key) -> upload library -> run / time remotely

`local_cluster(arm=True)` starts a tracker and an aarch64 server under qemu on 127.0.0.1, which is
how tests and the ARM benchmark check everything a real board would do. qemu-user here has no
binfmt registration, so the emulated server gets a shim as its sys.executable: the popen workers
it starts for each session re-enter qemu.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from onnxpress.errors import BackendError

from .targets import threads_chosen_by_user

ARM_RUNTIME_ENV = "ONNXPRESS_ARM_RUNTIME"


def arm_runtime_dir() -> Path:
    return Path(os.environ.get(ARM_RUNTIME_ENV, Path.home() / ".cache" / "onnxpress" / "arm-runtime"))


def arm_runtime_problem() -> str | None:
    """Why emulated aarch64 runs cannot work here, or None when they can."""
    if shutil.which("qemu-aarch64") is None:
        return "qemu-aarch64 not found (Debian package qemu-user)"
    d = arm_runtime_dir()
    if not (d / "sysroot" / "usr" / "bin" / "python3.11").exists() or not (d / "site" / "tvm").exists():
        return f"no aarch64 Python runtime in {d} (run scripts/setup_arm_runtime.sh)"
    return None


def qemu_python_command() -> list[str]:
    problem = arm_runtime_problem()
    if problem:
        raise BackendError(f"cannot run aarch64 code on this host: {problem}")
    d = arm_runtime_dir()
    return ["qemu-aarch64", "-L", str(d / "sysroot"), str(d / "sysroot" / "usr" / "bin" / "python3.11")]


def qemu_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(arm_runtime_dir() / "site")
    env.pop("PYTHONHOME", None)
    env["PYTHONNOUSERSITE"] = "1"
    if not threads_chosen_by_user():
        env["TVM_NUM_THREADS"] = "1"   # emulated threads only add contention
    return env


def parse_address(address: str, default_port: int = 9190) -> tuple[str, int]:
    host, _, port = str(address).rpartition(":")
    if not host:
        return str(address), default_port
    try:
        return host, int(port)
    except ValueError:
        raise BackendError(f"RPC address '{address}' should be HOST:PORT") from None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_port(host: str, port: int, proc: subprocess.Popen, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise BackendError(f"{what} exited with code {proc.returncode} before listening")
        with socket.socket() as s:
            s.settimeout(0.5)
            if s.connect_ex((host, port)) == 0:
                return
        time.sleep(0.2)
    raise BackendError(f"{what} did not listen on {host}:{port} within {timeout:.0f} s")


def connect(rpc: str, key: str, *, timeout: float = 60.0):
    """A remote session from the tracker at `rpc` (HOST:PORT) for a server registered as `key`."""
    from tvm import rpc as tvm_rpc

    host, port = parse_address(rpc)
    try:
        tracker = tvm_rpc.connect_tracker(host, port)
        return tracker.request(key, priority=1, session_timeout=0)
    except Exception as exc:
        raise BackendError(f"no RPC server with key '{key}' through the tracker at {host}:{port}: "
                           f"{str(exc).strip().splitlines()[-1] if str(exc).strip() else exc}") from None


def wait_for_key(rpc: str, key: str, timeout: float = 120.0) -> None:
    from tvm import rpc as tvm_rpc

    host, port = parse_address(rpc)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            summary = tvm_rpc.connect_tracker(host, port).summary()
            if any(q.get("free", 0) > 0 for k, q in summary.get("queue_info", {}).items() if k == key):
                return
        except Exception:
            pass
        time.sleep(0.5)
    raise BackendError(f"no server registered as '{key}' at the tracker {host}:{port} within {timeout:.0f} s")


class LocalCluster:
    """A tracker and one server on 127.0.0.1, stopped (by pid) on close()."""

    def __init__(self, *, arm: bool, key: str | None = None, tracker_port: int | None = None):
        self.arm = arm
        self.key = key or ("onnxpress-qemu-aarch64" if arm else "onnxpress-local")
        self.tracker_port = tracker_port or free_port()
        self.rpc = f"127.0.0.1:{self.tracker_port}"
        self._procs: list[subprocess.Popen] = []
        self._tmp = tempfile.mkdtemp(prefix="onnxpress-rpc-")

    def start(self, timeout: float = 180.0) -> LocalCluster:
        log = open(os.path.join(self._tmp, "tracker.log"), "w")
        tracker = subprocess.Popen(
            [sys.executable, "-m", "tvm.exec.rpc_tracker", "--host", "127.0.0.1",
             "--port", str(self.tracker_port), "--port-end", str(self.tracker_port + 1), "--silent"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self._procs.append(tracker)
        _wait_port("127.0.0.1", self.tracker_port, tracker, 60, "the RPC tracker")
        port = free_port()
        server_args = ["-m", "tvm.exec.rpc_server", "--tracker", self.rpc, "--key", self.key,
                       "--host", "127.0.0.1", "--port", str(port), "--port-end", str(port + 50)]
        if self.arm:
            cmd, env = self._qemu_server(server_args)
        else:
            cmd, env = [sys.executable, *server_args], dict(os.environ)
        slog = open(os.path.join(self._tmp, "server.log"), "w")
        server = subprocess.Popen(cmd, env=env, stdout=slog, stderr=subprocess.STDOUT,
                                  start_new_session=True, cwd=self._tmp)
        self._procs.append(server)
        try:
            wait_for_key(self.rpc, self.key, timeout)
        except BackendError as exc:
            self.close()
            raise BackendError(f"{exc}; server log: {self.server_log()[-500:]}") from None
        return self

    def _qemu_server(self, server_args: list[str]):
        qemu = qemu_python_command()
        shim = os.path.join(self._tmp, "python-aarch64")
        with open(shim, "w") as f:
            f.write("#!/bin/sh\nexec " + " ".join(f"'{a}'" for a in qemu) + ' "$@"\n')
        os.chmod(shim, 0o755)
        # sys.executable must be the shim: the server starts popen workers with it
        boot = (f"import sys, runpy; sys.executable = {shim!r}; "
                f"sys.argv = ['rpc_server'] + {server_args[2:]!r}; "
                "runpy.run_module('tvm.exec.rpc_server', run_name='__main__')")
        return [*qemu, "-c", boot], qemu_env()

    def server_log(self) -> str:
        try:
            return Path(self._tmp, "server.log").read_text()
        except OSError:
            return ""

    def close(self) -> None:
        for proc in reversed(self._procs):
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, 15)       # its own session: the server's workers go too
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(proc.pid, 9)
                    proc.wait(5)
        self._procs.clear()
        shutil.rmtree(self._tmp, ignore_errors=True)

    def __enter__(self) -> LocalCluster:
        return self.start() if not self._procs else self

    def __exit__(self, *exc) -> None:
        self.close()


@contextlib.contextmanager
def local_cluster(*, arm: bool = True, key: str | None = None) -> Iterator[LocalCluster]:
    """Tracker + server on 127.0.0.1 (the server under qemu-aarch64 when arm=True)."""
    cluster = LocalCluster(arm=arm, key=key).start()
    try:
        yield cluster
    finally:
        cluster.close()
