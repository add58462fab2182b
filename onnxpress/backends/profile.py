"""Per-kernel profiles: where one inference spends its time, the slowest kernel first.

    prof = tvm.load_artifact("out/x86").profile(feeds)   # each fused TVM kernel timed in place
    prof = ort.profile("model.onnx", feeds)              # onnxruntime's own per-node profiler
    prof.kernels[0]     KernelTime(name='fused_conv2d1_add1_relu1', calls=1, total_ms=0.39, share=87.2, ...)
    prof.slowest(3)     'fused_conv2d1_add1_relu1 87%, fused_matmul_add2_relu2 5%, ...'

    latency (measured) ------------------------------------------------  total_ms
    | kernel | kernel | kernel | ... |  other: VM / executor overhead  |
    <-------------- kernel_ms ------->

Shares are of `total_ms`: the measured latency, or the sum of kernel times where that is larger
(kernels timed one by one, warm in cache, can add up to a little more than a run). `other_ms` is
the rest of the latency that no kernel accounts for, so the rows and `other` make 100 %.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping


@dataclasses.dataclass
class KernelTime:
    """One kernel (a TVM fused function, an onnxruntime node) per inference."""

    name: str
    calls: int          # calls in one inference
    total_ms: float     # all its calls in one inference
    mean_ms: float      # one call
    share: float        # percent of the profile's total_ms
    op: str = ""        # onnxruntime: the node's op type

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class Profile:
    backend: str                 # "tvm" or "onnxruntime"
    kernels: list[KernelTime]    # the slowest first
    latency_ms: float            # p50 of whole inferences, measured beside the kernels
    other_ms: float              # latency that no kernel accounts for (>= 0)
    other_calls: int             # calls in one inference that are no kernel (VM builtins)
    runs: int                    # timed repetitions behind each figure

    @property
    def kernel_ms(self) -> float:
        return sum(k.total_ms for k in self.kernels)

    @property
    def total_ms(self) -> float:
        return self.kernel_ms + self.other_ms

    def slowest(self, n: int = 3) -> str:
        """'name 41%, name 12%, name 9%': the n slowest kernels and their shares."""
        return ", ".join(f"{k.name} {k.share:.0f}%" for k in self.kernels[:n])

    def to_dict(self) -> dict:
        return {"backend": self.backend, "latency_ms": self.latency_ms, "kernel_ms": self.kernel_ms,
                "other_ms": self.other_ms, "other_calls": self.other_calls, "runs": self.runs,
                "kernels": [k.to_dict() for k in self.kernels]}


def make_profile(per_kernel: Mapping[str, tuple[int, float]], latency_ms: float, *, backend: str,
                 runs: int, other_calls: int = 0, ops: Mapping[str, str] | None = None) -> Profile:
    """A Profile from {kernel: (calls in one inference, ms in one inference)} and the latency."""
    kernel_ms = sum(ms for _, ms in per_kernel.values())
    other_ms = max(0.0, latency_ms - kernel_ms)
    total = kernel_ms + other_ms
    ops = ops or {}
    rows = [KernelTime(name=name, calls=calls, total_ms=ms, mean_ms=ms / max(1, calls),
                       share=100.0 * ms / total if total > 0 else 0.0, op=ops.get(name, ""))
            for name, (calls, ms) in per_kernel.items()]
    rows.sort(key=lambda k: (-k.total_ms, k.name))
    return Profile(backend=backend, kernels=rows, latency_ms=latency_ms, other_ms=other_ms,
                   other_calls=other_calls, runs=runs)
