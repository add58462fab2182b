"""Distillation on any graph: the torch converter's coverage of onnx's operators, and a pruned
segmenter whose decoder upsamples with Resize, distilled back.

    python -m bench --only distill [--quick]

Coverage: every onnx node case (onnx.backend.test.loader) that onnxruntime runs and that has a
float input goes through distill's converter (onnxpress/passes/torch_graph); matched = outputs
within rtol 1e-4, atol 1e-5 of onnxruntime's (tests/passes/torch_coverage.py). Segmenter:
zoo.digits_segmenter (a small U-Net, two Resize nodes, 11 classes per pixel), structured pruning,
then `distill` on the 1,347 unlabeled training images (teacher = the unpruned model, KL over the
class axis); mean IoU and pixel accuracy on the 450 test images.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import onnx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from onnxpress import passes, stats, zoo  # noqa: E402

DISTILL = "distill:epochs=30,lr=0.01,loss=kl"


def _coverage() -> dict:
    from tests.passes import torch_coverage

    t0 = time.time()
    cov = torch_coverage.measure()
    return {"matched": cov.matched, "eligible": cov.eligible, "fraction": round(cov.fraction, 4),
            "required_fraction": torch_coverage.REQUIRED,
            "unsupported": dict(cov.unsupported.most_common()),
            "unmatched": len(cov.failures) - sum(cov.unsupported.values()),
            "seconds": round(time.time() - t0, 1)}


def _segmenter_rows() -> list[dict]:
    path = zoo.digits_segmenter()
    model = onnx.load(path)
    seg = zoo.digits_segments()
    X, y = seg.test
    Xtr = seg.train[0]
    calib = [{"input": Xtr[i:i + 64]} for i in range(0, len(Xtr), 64)]
    base = stats.model_stats(model)
    scores = zoo.segment_scores(model, X, y)
    rows = [{"model": "digits_segmenter", "config": "unpruned fp32", "miou": scores["miou"],
             "miou_distilled": "", "pixel_accuracy": scores["pixel_accuracy"],
             "pixel_accuracy_distilled": "", "macs_ratio": 1.0, "params_ratio": 1.0}]
    for label, spec in (("structured 30%", "prune:sparsity=0.3,structured=true"),
                        ("structured 50%", "prune:sparsity=0.5,structured=true")):
        t0 = time.time()
        pruned = passes.apply(model, spec, seed=0)
        distilled = passes.apply(model, f"{spec},{DISTILL}", calib=calib, seed=0)
        s = stats.model_stats(pruned)
        before, after = zoo.segment_scores(pruned, X, y), zoo.segment_scores(distilled, X, y)
        rows.append({"model": "digits_segmenter", "config": label, "miou": before["miou"],
                     "miou_distilled": after["miou"], "pixel_accuracy": before["pixel_accuracy"],
                     "pixel_accuracy_distilled": after["pixel_accuracy"],
                     "macs_ratio": s.macs / base.macs, "params_ratio": s.params / base.params,
                     "seconds": round(time.time() - t0, 1)})
    return rows


def run(quick: bool = True) -> dict:
    coverage = _coverage()
    notes = (
        f"Converter coverage: {coverage['matched']} of {coverage['eligible']} onnx node cases "
        "with a float input that onnxruntime runs match it (rtol 1e-4, atol 1e-5); the rest are "
        "ops the converter refuses by name (UnsupportedOpError) or outputs that differ "
        "(DFT/STFT: onnxruntime's float32 transform differs from the exact one by more than "
        "atol). Segmenter: zoo.digits_segmenter, `" + DISTILL + "` after the prune, on the "
        "1,347 unlabeled training images; mean IoU over the 11 classes and pixel accuracy on "
        "the 450 test images.")
    return {"title": "Distillation: converter coverage, a pruned segmenter with Resize",
            "rows": _segmenter_rows(), "coverage": coverage, "notes": notes}


if __name__ == "__main__":
    import json

    print(json.dumps(run(quick="--full" not in sys.argv), indent=2, default=str))
