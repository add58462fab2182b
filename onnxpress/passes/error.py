"""What a lossy pass cost, in one vocabulary: the output error of the model a pass returns against
a reference model (its input, or the teacher for `distill`) on calibration batches.

    min_cosine       worst per-sample cosine similarity of any float output (1.0 = identical)
    rel_l2           worst relative L2 error of a float output, ||y - y_ref|| / ||y_ref||
    max_abs          largest absolute difference of any float output element
    top1_agreement   share of samples whose argmax agrees (first output, when it is [batch, classes])

Every built-in lossy pass (prune, clip, quant_*, fp16, distill, search) records these keys; a
custom pass should too (docs/custom_pass.md lists the standard figures). `InputError`, an
instrument, records the same figures of every lossy pass against the pipeline's input model.
"""

from __future__ import annotations

import warnings
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import onnx

from onnxpress.errors import OnnxPressError
from onnxpress.passes import registry
from onnxpress.passes.pipeline import Instrument

ERROR_KEYS = ("min_cosine", "rel_l2", "max_abs", "top1_agreement")


class _Worst:
    """The standard figures, worst case over the output sets added so far."""

    def __init__(self) -> None:
        self.cos, self.rel, self.max_abs, self.agree, self.n = 1.0, 0.0, 0.0, 0, 0

    def add(self, reference: Sequence[Any], candidate: Sequence[Any]) -> None:
        for k, (a, b) in enumerate(zip(reference, candidate)):
            a, b = np.asarray(a), np.asarray(b)
            if a.dtype.kind != "f" or a.shape != b.shape:
                continue
            a64, b64 = a.astype(np.float64), b.astype(np.float64)
            if a64.size:
                self.max_abs = max(self.max_abs, float(np.abs(a64 - b64).max()))
            rows_a = a64.reshape(len(a64), -1) if a64.ndim else a64.reshape(1, 1)
            rows_b = b64.reshape(rows_a.shape)
            na, nb = np.linalg.norm(rows_a, axis=1), np.linalg.norm(rows_b, axis=1)
            c = np.where((na > 0) & (nb > 0),
                         (rows_a * rows_b).sum(1) / np.maximum(na * nb, 1e-30),
                         np.where(na == nb, 1.0, 0.0))
            if c.size:
                self.cos = min(self.cos, float(c.min()))
            self.rel = max(self.rel, float(np.linalg.norm(a64 - b64) / max(np.linalg.norm(a64), 1e-30)))
            if k == 0 and a.ndim == 2:
                self.agree += int((a.argmax(1) == b.argmax(1)).sum())
                self.n += a.shape[0]

    def figures(self) -> dict:
        out = {"min_cosine": round(self.cos, 6), "rel_l2": round(self.rel, 6),
               "max_abs": float(f"{self.max_abs:.4g}")}
        if self.n:
            out["top1_agreement"] = round(self.agree / self.n, 6)
        return out


def outputs_error(reference: Sequence[Any], candidate: Sequence[Any]) -> dict:
    """The standard error figures of one set of outputs against another (same order)."""
    worst = _Worst()
    worst.add(reference, candidate)
    return worst.figures()


def output_error(reference: onnx.ModelProto, candidate: onnx.ModelProto,
                 batches: Iterable[Mapping[str, np.ndarray]]) -> dict:
    """The standard error figures of `candidate` against `reference` over `batches`."""
    from onnxpress.backends import ort

    s_ref, s_new = ort.session(reference, threads=1), ort.session(candidate, threads=1)
    names = [o.name for o in s_ref.get_outputs()]
    worst = _Worst()
    for batch in batches:
        worst.add(s_ref.run(names, dict(batch)), s_new.run(names, dict(batch)))
    return worst.figures()


def is_lossy(name: str) -> bool:
    """Whether the registered pass `name` is lossy (False for a name not registered)."""
    try:
        return registry.get(name).lossy
    except OnnxPressError:
        return False


class InputError(Instrument):
    """After each lossy pass, the standard figures of the model it returned against the
    pipeline's input model, on the verification inputs (what `verify=True` feeds: the first
    calibration batch, else generated inputs at the bound shapes), as figures["vs_input"].
    A named pipeline counts as lossy when one of its passes is. The HTML report's quality panel
    reads them:

        result = passes.run(model, ["cleanup", "prune:0.5", "quant_int8"], calib=calib,
                            instruments=[InputError()])
        result.reports[-1].figures["vs_input"]   # {"min_cosine": ..., "rel_l2": ..., ...}
    """

    KEY = "vs_input"

    def __init__(self) -> None:
        self.feeds: dict | None = None
        self.reference: dict | None = None
        self.started = False

    def before_pass(self, step, model, ctx) -> None:
        if self.started:
            return
        self.started = True
        from onnxpress.backends import ort
        from onnxpress.passes.pipeline import verification_inputs

        try:
            self.feeds = verification_inputs(model, ctx)
            self.reference = ort.run(model, self.feeds)
        except OnnxPressError as exc:  # an input onnxruntime cannot run: nothing to compare
            warnings.warn(f"no output error against the input model: {exc}", stacklevel=2)

    def after_pass(self, step, model, ctx, report) -> None:
        lossy = step.info.lossy or any(is_lossy(c.name) for c in report.children)
        if self.reference is None or not lossy or not report.modified:
            return
        from onnxpress.backends import ort

        try:
            got = ort.run(model, self.feeds)
        except OnnxPressError as exc:
            report.figures[self.KEY] = {"not_measured": str(exc)}
            return
        names = list(self.reference)
        report.figures[self.KEY] = outputs_error([self.reference[n] for n in names],
                                                 [got.get(n) for n in names])
