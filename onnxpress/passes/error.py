"""What a lossy pass cost, in one vocabulary: the output error of the model a pass returns against
a reference model (its input, or the teacher for `distill`) on calibration batches.

    min_cosine       worst per-sample cosine similarity of any float output (1.0 = identical)
    rel_l2           worst relative L2 error of a float output, ||y - y_ref|| / ||y_ref||
    max_abs          largest absolute difference of any float output element
    top1_agreement   share of samples whose argmax agrees (first output, when it is [batch, classes])

Every built-in lossy pass (prune, clip, quant_*, fp16, distill, search) records these keys; a
custom pass should too (docs/custom_pass.md lists the standard figures).
"""

from __future__ import annotations

from typing import Iterable, Mapping

import numpy as np
import onnx

ERROR_KEYS = ("min_cosine", "rel_l2", "max_abs", "top1_agreement")


def output_error(reference: onnx.ModelProto, candidate: onnx.ModelProto,
                 batches: Iterable[Mapping[str, np.ndarray]]) -> dict:
    """The standard error figures of `candidate` against `reference` over `batches`."""
    from onnxpress.backends import ort

    s_ref, s_new = ort.session(reference, threads=1), ort.session(candidate, threads=1)
    names = [o.name for o in s_ref.get_outputs()]
    cos, rel, max_abs, agree, n = 1.0, 0.0, 0.0, 0, 0
    for batch in batches:
        ys, yc = s_ref.run(names, dict(batch)), s_new.run(names, dict(batch))
        for k, (a, b) in enumerate(zip(ys, yc)):
            a, b = np.asarray(a), np.asarray(b)
            if a.dtype.kind != "f" or a.shape != b.shape:
                continue
            a64, b64 = a.astype(np.float64), b.astype(np.float64)
            if a64.size:
                max_abs = max(max_abs, float(np.abs(a64 - b64).max()))
            rows_a = a64.reshape(len(a64), -1) if a64.ndim else a64.reshape(1, 1)
            rows_b = b64.reshape(rows_a.shape)
            na, nb = np.linalg.norm(rows_a, axis=1), np.linalg.norm(rows_b, axis=1)
            c = np.where((na > 0) & (nb > 0),
                         (rows_a * rows_b).sum(1) / np.maximum(na * nb, 1e-30),
                         np.where(na == nb, 1.0, 0.0))
            if c.size:
                cos = min(cos, float(c.min()))
            rel = max(rel, float(np.linalg.norm(a64 - b64) / max(np.linalg.norm(a64), 1e-30)))
            if k == 0 and a.ndim == 2:
                agree += int((a.argmax(1) == b.argmax(1)).sum())
                n += a.shape[0]
    out = {"min_cosine": round(cos, 6), "rel_l2": round(rel, 6), "max_abs": float(f"{max_abs:.4g}")}
    if n:
        out["top1_agreement"] = round(agree / n, 6)
    return out
