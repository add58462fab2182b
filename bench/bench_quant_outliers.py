"""Outliers: SmoothQuant and bias correction on ViT and MiniLM, side by side in one run.

    ViT-tiny (timm vit_tiny_patch16_224, re-randomised weights) on crops of scikit-learn's sample
    photos; all-MiniLM-L6-v2 (real weights) on the Debian descriptions task:
        fp32 | quant_int8 | +smooth=auto | +bias_correction | +both | +smooth=0.5 (fixed alpha)
        | quant_auto (does it keep them?) | ORT quantize_static | ORT quantize_static SmoothQuant
    -> min / mean cosine to fp32 on held-out inputs, task accuracy (MiniLM) or top-1 agreement
       (ViT), size, latency (onnxruntime, interleaved: fastest wall at 2 threads, fastest
       process CPU time at 1 thread)

quant_int8 runs with latency_aware=false here so that every variant quantizes the same layers
(the timing decision would otherwise vary with the machine's load from variant to variant).
onnxruntime's SmoothQuant option needs Intel Neural Compressor 2.x
(neural_compressor.adaptor.ox_utils); without it that row says so.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

QUANT = "quant_int8:latency_aware=false"
VARIANTS = {
    "quant_int8": QUANT,
    "quant_int8 smooth=auto": QUANT + ",smooth=auto",
    "quant_int8 bias_correction": QUANT + ",bias_correction=true",
    "quant_int8 smooth=auto + bias_correction": QUANT + ",smooth=auto,bias_correction=true",
    "quant_int8 smooth=0.5": QUANT + ",smooth=0.5",
}
TIMED = ("fp32", "quant_int8", "quant_int8 smooth=auto",
         "quant_int8 smooth=auto + bias_correction")


def photo_crops(n: int, seed: int, size: int = 224) -> np.ndarray:
    """`n` random square crops (random size and place, half mirrored) of scikit-learn's two
    sample photos, resized and normalised as ImageNet models expect: (n, 3, size, size)."""
    from sklearn.datasets import load_sample_images

    imgs = load_sample_images().images
    rng = np.random.default_rng(seed)
    out = []
    for k in range(n):
        img = imgs[k % len(imgs)]
        h, w = img.shape[:2]
        s = int(rng.integers(size, min(h, w) + 1))
        y0, x0 = int(rng.integers(0, h - s + 1)), int(rng.integers(0, w - s + 1))
        idx = (np.arange(size) * s / size).astype(int)
        crop = img[y0:y0 + s, x0:x0 + s][idx][:, idx].astype(np.float32) / 255.0
        if rng.random() < 0.5:
            crop = crop[:, ::-1]
        crop = (crop - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])
        out.append(crop.transpose(2, 0, 1))
    return np.stack(out).astype(np.float32)


def ort_static(path: Path, out: Path, calib: list[dict], *, op_types: list[str] | None,
               smooth: bool) -> onnx.ModelProto:
    """onnxruntime's quantize_static (QDQ, per-channel, u8 activations; reduce_range where this
    CPU lacks VNNI, as quant_int8's weight_range=auto), optionally with its SmoothQuant."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    from onnxpress.passes.quant.qdq import needs_7_bit_weights

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter(calib)

        def get_next(self):
            return next(self.it, None)

        def rewind(self):          # SmoothQuant reads the data twice
            self.it = iter(calib)

    extra = {"QDQDisableWeightAdjustForInt32Bias": True}
    if smooth:
        extra.update(SmoothQuant=True, SmoothQuantAlpha=0.5, SmoothQuantFolding=True)
    kw = {"op_types_to_quantize": op_types} if op_types else {}
    quantize_static(str(path), str(out), Reader(), quant_format=QuantFormat.QDQ,
                    per_channel=True, reduce_range=needs_7_bit_weights("ort"),
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    extra_options=extra, **kw)
    return onnx.load(out)


def _variants(fp32: onnx.ModelProto, path: Path, calib: list[dict], auto_spec: str,
              ort_ops: list[str] | None, sq_calib: list[dict] | None = None
              ) -> tuple[dict, dict, dict]:
    """{label: model}, {label: what the pass reported}, {label: seconds to quantize}.
    sq_calib: the same calibration data in equal shapes, for Neural Compressor's SmoothQuant
    (it concatenates the batches' activations)."""
    from onnxpress import passes

    models, notes, seconds = {"fp32": fp32}, {}, {}
    for label, spec in {**VARIANTS, "quant_auto": auto_spec}.items():
        t0 = time.perf_counter()
        res = passes.run(fp32, spec, calib=calib, progress=False)
        seconds[label] = time.perf_counter() - t0
        models[label] = res.model
        f = res.reports[0].figures
        what = []
        if f.get("smooth_groups"):
            what.append(f"{f['smooth_layers']} layers in {f['smooth_groups']} groups smoothed "
                        f"({f['smooth_folded_into_layernorm']} into LayerNorm, "
                        f"{f['smooth_mul_inserted']} Mul)")
        elif "smooth=auto" in spec:
            what.append("nothing smoothed (no group gained 1.5x)")
        if f.get("bias_corrected"):
            what.append(f"{f['bias_corrected']} biases corrected")
        if label == "quant_auto":        # its trials: 1 - min cosine on its held-out batches
            trials = {k: "/".join(f"{v:.5f}" for v in f[k].values() if isinstance(v, float))
                      for k in ("smooth_trial", "bias_correction_trial") if f.get(k)}
            what = [f"smooth: {f.get('smooth', '-')}"
                    + (f" (1-cos {trials['smooth_trial']})" if "smooth_trial" in trials else ""),
                    f"bias correction: {f.get('bias_correction', '-')}"
                    + (f" (1-cos {trials['bias_correction_trial']})"
                       if "bias_correction_trial" in trials else ""),
                    f"{f.get('layers_int8', 0)} int8 / {f.get('layers_fp32', 0)} fp32 layers"]
        notes[label] = "; ".join(what)
    tmp = Path(tempfile.mkdtemp(prefix="bench-outliers-"))
    for label, smooth in (("ORT quantize_static", False), ("ORT quantize_static SmoothQuant", True)):
        t0 = time.perf_counter()
        try:
            data = sq_calib if smooth and sq_calib is not None else calib
            models[label] = ort_static(path, tmp / f"{int(smooth)}.onnx", data,
                                       op_types=ort_ops, smooth=smooth)
            seconds[label] = time.perf_counter() - t0
            notes[label] = ("SmoothQuant alpha 0.5 (Intel Neural Compressor 2.x)"
                            + (", calibration padded to 64 tokens" if data is not calib else "")
                            if smooth else "")
        except Exception as exc:       # the peer's optional dependency: say why in the table
            msg = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
            notes[label] = f"not run: {msg}"
    return models, notes, seconds


def _row(model: str, label: str, m, fp32, cos: np.ndarray, notes: dict, seconds: dict,
         timing: dict, *, plain: np.ndarray | None = None, **metric) -> dict:
    """plain: plain quant_int8's cosines on the same inputs, for the share of inputs this
    variant brings closer to fp32 (a minimum is one input; the share says how many moved)."""
    row = {"model": model, "variant": label, **metric,
           "min_cosine": round(float(cos.min()), 5) if cos is not None else None,
           "mean_cosine": round(float(cos.mean()), 5) if cos is not None else None,
           "size_x": round(m.ByteSize() / fp32.ByteSize(), 3) if m is not None else None}
    if plain is not None and cos is not None and label not in ("fp32", "quant_int8"):
        row["inputs_closer_than_quant_int8"] = round(float((cos > plain).mean()), 3)
    if label in timing:
        row.update(timing[label])
    row["quantize_s"] = round(seconds.get(label, 0.0), 1)
    row["what"] = notes.get(label, "")
    return row


def _timing(models: dict, feeds: dict, quick: bool) -> dict:
    from bench.bench_quant import latencies

    names = [n for n in TIMED if n in models]
    wall, cpu = latencies([models[n] for n in names], feeds, quick=quick)
    return {n: {"wall_ms_2t": round(wall[k], 2), "speedup_wall": round(wall[0] / wall[k], 2),
                "cpu_ms_1t": round(cpu[k], 2), "speedup_cpu": round(cpu[0] / cpu[k], 2)}
            for k, n in enumerate(names)}


def vit_rows(quick: bool) -> list[dict]:
    from bench.bench_quant import cosines
    from onnxpress import zoo
    from onnxpress.backends import ort

    path = zoo.timm_model("vit_tiny_patch16_224")
    fp32 = onnx.load(path)
    cal = photo_crops(16, seed=0)
    calib = [{"input": cal[i:i + 1]} for i in range(len(cal))]
    held = photo_crops(32 if quick else 96, seed=1)
    auto = "quant_auto:max_batches=2" if quick else "quant_auto"
    models, notes, seconds = _variants(fp32, path, calib, auto, None)

    def outputs(m):
        sess = ort.session(m)
        return np.concatenate([sess.run(None, {"input": held[i:i + 1]})[0]
                               for i in range(len(held))])

    ref = outputs(fp32)

    def agreement(out):
        return round(float((ref.argmax(1) == out.argmax(1)).mean()), 4)

    timing = _timing(models, {"input": held[:1]}, quick)
    rows, by_label = [], {}
    for label in ["fp32"] + list(VARIANTS) + ["quant_auto", "ORT quantize_static",
                                              "ORT quantize_static SmoothQuant"]:
        m = models.get(label)
        out = outputs(m) if m is not None else None
        cos = by_label[label] = cosines(ref, out) if out is not None else None
        rows.append(_row("ViT-tiny", label, m, fp32, cos, notes, seconds, timing,
                         top1_agreement=agreement(out) if out is not None else None,
                         plain=by_label.get("quant_int8")))
    # the worst held-out crop of plain quant_int8, calibrated again with that crop added: how
    # much of the min cosine is ranges the 16 calibration crops never reached (which neither
    # smoothing nor bias correction can give back)
    from onnxpress import passes

    label = "quant_int8, its worst held-out crop added to the calibration"
    worst = int(np.argmin(by_label["quant_int8"]))
    t0 = time.perf_counter()
    m = passes.run(fp32, QUANT, calib=calib + [{"input": held[worst:worst + 1]}],
                   progress=False).model
    seconds[label] = time.perf_counter() - t0
    out = outputs(m)
    cos = cosines(ref, out)
    notes[label] = (f"crop {worst}: 1-cos {1 - by_label['quant_int8'][worst]:.5f} -> "
                    f"{1 - cos[worst]:.5f} (its ranges were outside the 16 calibration crops')")
    rows.append(_row("ViT-tiny", label, m, fp32, cos, notes, seconds, timing,
                     top1_agreement=agreement(out), plain=by_label["quant_int8"],
                     worst_crop_1cos_before=round(float(1 - by_label["quant_int8"][worst]), 6),
                     worst_crop_1cos_after=round(float(1 - cos[worst]), 6)))
    return rows


def minilm_rows(quick: bool) -> list[dict]:
    from bench.bench_quant import cosines, minilm_calib
    from onnxpress import zoo

    path, task, tok = zoo.minilm(), zoo.debian_task(), zoo.minilm_tokenizer()
    fp32 = onnx.load(path)
    # the calibration set of bench_quant's MiniLM rows: 128 training descriptions, batches of 16
    order = np.random.default_rng(0).permutation(len(task.train_texts))[:128]
    calib = minilm_calib([task.train_texts[i] for i in order], 16, tok)
    auto = "quant_auto:max_batches=2" if quick else "quant_auto"
    padded = [zoo.minilm_feeds([task.train_texts[i] for i in order[k:k + 16]], pad_to_max=True,
                               tokenizer=tok) for k in range(0, len(order), 16)]
    models, notes, seconds = _variants(fp32, path, calib, auto, ["MatMul"], sq_calib=padded)
    ref_train = zoo.embed(fp32, task.train_texts, tokenizer=tok)
    ref_test = zoo.embed(fp32, task.test_texts, tokenizer=tok)
    timing = _timing(models, zoo.minilm_feeds(task.test_texts[:8], tokenizer=tok), quick)
    rows, by_label = [], {}
    for label in ["fp32"] + list(VARIANTS) + ["quant_auto", "ORT quantize_static",
                                              "ORT quantize_static SmoothQuant"]:
        m = models.get(label)
        acc = cos = None
        if m is not None:
            tr = ref_train if label == "fp32" else zoo.embed(m, task.train_texts, tokenizer=tok)
            te = ref_test if label == "fp32" else zoo.embed(m, task.test_texts, tokenizer=tok)
            acc = round(zoo.text_task_accuracy(tr, te, task), 4)
            cos = np.concatenate([cosines(ref_train, tr), cosines(ref_test, te)])
        by_label[label] = cos
        rows.append(_row("MiniLM", label, m, fp32, cos, notes, seconds, timing, accuracy=acc,
                         plain=by_label.get("quant_int8")))
    return rows


def run(quick: bool) -> dict:
    from bench.bench_tvm_int8 import cpu_description

    cpu, flags = cpu_description()
    rows = vit_rows(quick) + minilm_rows(quick)
    return {
        "title": "Outliers: SmoothQuant and bias correction (quant_int8 options) vs plain int8 "
                 "and onnxruntime's SmoothQuant",
        "rows": rows,
        "notes": (
            f"CPU: {cpu}, ISA flags {', '.join(flags) or 'none of avx2/avx512/vnni'}. "
            "Cosine: each output (ViT logits of held-out photo crops; MiniLM embeddings of the "
            "3,000 train+test descriptions) vs its fp32 counterpart. ViT calibrates on 16 other "
            "crops of the same two photos, MiniLM on 128 training descriptions. ViT-tiny's "
            "weights are timm's initialisation re-randomised (no pretrained weights offline), so "
            "it has no trained outlier channels; MiniLM's are the real ones. quant_int8 runs "
            "with latency_aware=false (the same layers in every variant). Latency: onnxruntime, "
            "interleaved; wall_ms_2t = fastest wall-clock inference at 2 threads (batch 1 photo; "
            "8 sentences), cpu_ms_1t = fastest process CPU time at 1 thread."),
    }


if __name__ == "__main__":
    import json
    import sys

    quick = "--full" not in sys.argv
    fns = {"vit": lambda: vit_rows(quick), "minilm": lambda: minilm_rows(quick)}
    for w in [a for a in sys.argv[1:] if not a.startswith("--")] or list(fns):
        for row in fns[w]():
            print(json.dumps(row))
