"""How much of onnx's operator set distill's torch converter covers, measured on onnx's node cases.

Eligible: a generated node case (onnx.backend.test.loader, kind="node"; loaded and filtered by
tests/passes/conformance_cases.py) that onnxruntime runs and that has at least one floating-point
input. Matched: OnnxGraphModule (onnxpress/passes/torch_graph.py) builds the case's graph and its
outputs match onnxruntime's (rtol 1e-4, atol 1e-5).

    .venv/bin/python -m tests.passes.torch_coverage            # the figure, missing ops by count
    .venv/bin/python -m tests.passes.torch_coverage -v         # and one line per unmatched case
"""

from __future__ import annotations

import collections
import dataclasses
import sys
import warnings

import numpy as np

from onnxpress.backends import ort
from tests.passes.conformance_cases import Case, expected_outputs, node_cases

REQUIRED = 0.95  # the share of eligible cases the converter must match (issue 16's acceptance)


@dataclasses.dataclass
class Coverage:
    eligible: int = 0
    matched: int = 0
    unsupported: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    failures: list[str] = dataclasses.field(default_factory=list)

    @property
    def fraction(self) -> float:
        return self.matched / max(self.eligible, 1)

    def summary(self) -> str:
        lines = [f"distill's torch converter matches onnxruntime on {self.matched} of "
                 f"{self.eligible} onnx node cases with float inputs ({100 * self.fraction:.1f}%)"]
        if self.unsupported:
            lines.append("  cases by unsupported op: " + ", ".join(
                f"{op} {n}" for op, n in self.unsupported.most_common()))
        return "\n".join(lines)


def _eligible(case: Case) -> bool:
    if case.model is None or case.feeds is None:
        return False
    if any(v.dtype == object for v in case.feeds.values()):
        return False
    if not any(v.dtype.kind == "f" for v in case.feeds.values()):
        return False
    return expected_outputs(case) is not None


def _to_numpy(value):
    import torch

    if isinstance(value, (list, tuple)):
        return [_to_numpy(v) for v in value]
    if isinstance(value, torch.Tensor):
        if value.dtype == torch.bfloat16:
            value = value.float()
        return value.detach().numpy()
    return value


def run_case(case: Case, cov: Coverage) -> None:
    """Count one eligible case in `cov`."""
    import torch

    from onnxpress.errors import UnsupportedOpError
    from onnxpress.passes.torch_graph import OnnxGraphModule

    cov.eligible += 1
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            module = OnnxGraphModule(case.model)
            got = module(**{k: torch.from_numpy(np.array(v)) for k, v in case.feeds.items()})
    except UnsupportedOpError as exc:
        cov.unsupported[getattr(exc, "op_type", "?")] += 1
        cov.failures.append(f"{case.name}: {exc}")
        return
    except Exception as exc:  # a crash of the converter on a case it claims to support
        cov.failures.append(f"{case.name}: crashed: {type(exc).__name__}: {str(exc)[:200]}")
        return
    result = ort.compare_outputs(expected_outputs(case), {k: _to_numpy(v) for k, v in got.items()},
                                 rtol=1e-4, atol=1e-5)
    if result.ok:
        cov.matched += 1
    else:
        cov.failures.append(f"{case.name}: outputs differ: {str(result).splitlines()[0]}")


def measure() -> Coverage:
    cov = Coverage()
    for case in node_cases():
        if _eligible(case):
            run_case(case, cov)
    return cov


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    cov = measure()
    print(cov.summary())
    if "-v" in argv:
        for line in cov.failures:
            print("  " + line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
