"""TVM int8 (integer kernels) vs TVM fp32 vs onnxruntime int8 vs onnxruntime fp32, side by side in
one process, on the zoo's resnet18 after `fuse,quant_int8` (target tvm: plain ONNX QDQ).

    python -m bench --only tvm_int8

Rows: the quant_int8 model as quant_int8 writes it for target tvm (weight_range=auto: 7-bit
weights when the host has no VNNI, so that the vpmaddubsw dot product is exact; 8-bit with VNNI),
and on CPUs without VNNI also the full-range model (weight_range=full) for comparison. Columns: p50 latency (batch 1, 2 threads), integer kernels / ops on 8-bit
tensors / float, the share of elements of the last quantized activation (the 512 features the
classifier reads) that differ from onnxruntime's QDQ reference by one step (and the largest
difference), max abs logit error, top-1 agreement with onnxruntime int8 on the zoo's photos, and
the dot-product instructions in the x86 library; the CPU model and ISA flags are in the notes.
The aarch64 row cross-compiles quant_int8's model for target arm (8-bit weights) with +dotprod, counts sdot/udot with
aarch64-linux-gnu-objdump, and runs it under qemu-aarch64 on each photo (about 20 s a run): the
8-bit features' one-step share against onnxruntime's reference and the top-1 agreement, as for
the x86 rows (not timed: qemu speed says nothing).

Further rows, the same four latencies interleaved in this process: the digits CNN's plain torch
export (top-1 agreement with onnxruntime int8 and accuracy on all 450 test images), MiniLM at batch 1, sequence
128 (`fuse,quant_int8` target tvm; the Debian task accuracy of TVM int8's embeddings next to
onnxruntime int8's), and mobilenetv3_small_100, efficientnet_b0, convnext_atto at [1,3,224,224]
(top-1 agreement with onnxruntime int8 on the zoo's photos; how depthwise convs ran).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile

import numpy as np

RUNS = 20


def cpu_description() -> tuple[str, list[str]]:
    """(model name, the int8-relevant ISA flags) of this machine."""
    name, flags = "unknown", []
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and name == "unknown":
                    name = line.split(":", 1)[1].strip()
                if line.startswith("flags"):
                    have = set(line.split(":", 1)[1].split())
                    flags = [f for f in ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni",
                                         "amx_int8") if f in have]
                    break
    except OSError:
        pass
    return name, flags


def _with_feature_output(model):
    """The model with its last QuantizeLinear output (8-bit) as an extra graph output."""
    import onnx
    from onnx import helper

    out = onnx.ModelProto()
    out.CopyFrom(model)
    last = [n for n in out.graph.node if n.op_type == "QuantizeLinear"][-1]
    out.graph.output.append(helper.make_tensor_value_info(last.output[0], onnx.TensorProto.UINT8, None))
    return out, last.output[0]


def _count(lib: str, words: tuple[str, ...], objdump: str = "objdump") -> dict:
    if shutil.which(objdump) is None:
        return {}
    text = subprocess.run([objdump, "-d", lib], capture_output=True, text=True).stdout
    return {w: sum(1 for line in text.splitlines() if f"\t{w} " in line or f"\t{w}\t" in line)
            for w in words}


def run(quick: bool) -> dict:
    from bench.bench_quant import cnn_calib
    from onnxpress import passes, zoo
    from onnxpress.backends import ort
    from onnxpress.backends import tvm as ox_tvm
    from onnxpress.backends.tvm.int8_kernels import int8_isa
    from onnxpress.backends.tvm.targets import resolve_target

    cpu, flags = cpu_description()
    load0 = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    isa = int8_isa(resolve_target("x86").tvm_target())
    path = str(zoo.timm_model("resnet18"))
    photos = zoo.photo_batch(224)
    feeds = {"input": photos[:1]}
    fp32 = passes.apply(path, ["fuse"], target="tvm")
    calib = cnn_calib()
    res = passes.run(path, ["fuse", "quant_int8"], calib=calib, target="tvm")
    bits = res.reports[-1].figures["weight_bits"]
    full = passes.apply(path, ["fuse", "quant_int8:weight_range=full"], calib=calib, target="tvm")
    variants = {f"resnet18 fuse,quant_int8 (target tvm: {bits}-bit weights chosen)": res.model}
    if bits != 8:
        variants["resnet18 fuse,quant_int8:weight_range=full"] = full
    work = tempfile.mkdtemp(prefix="onnxpress-bench-tvm-int8-")
    rows = []
    try:
        tvm_fp32 = ox_tvm.compile(fp32, "x86", output_dir=os.path.join(work, "fp32"), progress=False)
        for label, model in variants.items():
            probe, feature = _with_feature_output(model)
            art = ox_tvm.compile(probe, "x86", output_dir=os.path.join(work, label.replace(" ", "_")),
                                 progress=False)
            ref = ort.run(probe, feeds, optimization="disable")
            got = art.run(feeds)
            d = np.abs(ref[feature].astype(int) - got[feature].astype(int))
            logit_err = float(np.abs(ref["output"] - got["output"]).max())
            agree = []
            for i in range(len(photos)):
                one = {"input": photos[i:i + 1]}
                agree.append(int(np.argmax(art.run(one)["output"])) ==
                             int(np.argmax(ort.run(model, one)["output"])))
            ms = _interleaved(fp32, model, tvm_fp32, art, feeds)
            info = art.manifest["integer"]
            dots = _count(str(art.library), ("vpdpbusd", "vpmaddubsw", "vpmaddwd", "tdpbusd"))
            rows.append({"model": label, **{f"{k}_ms": round(v, 2) for k, v in ms.items()},
                         "tvm_int8_vs_ort_int8": round(ms["tvm_int8"] / ms["ort_int8"], 2),
                         "tvm_fp32_vs_tvm_int8": round(ms["tvm_fp32"] / ms["tvm_int8"], 2),
                         "int8_kernels/int8_io/float": f"{info['int8_kernels']}/{info['int8_io']}/{info['float']}",
                         "feature_one_step_share": round(float((d == 1).mean()), 4),
                         "feature_max_steps": int(d.max()), "logits_max_abs_err": float(f"{logit_err:.2g}"),
                         "top1_agree_ort_int8": f"{sum(agree)}/{len(agree)}",
                         "x86_dot_instructions": " ".join(f"{k} {v}" for k, v in dots.items())})
            print(rows[-1], flush=True)
        arm = passes.apply(path, ["fuse", "quant_int8"], calib=calib, target="arm")  # 8-bit: sdot
        rows.append(_arm_row(arm, work, photos))
        print(rows[-1], flush=True)
        rows.append(_digits_row(work))
        print(rows[-1], flush=True)
        rows.append(_minilm_row(work, quick))
        print(rows[-1], flush=True)
        for name in CNNS:
            rows.append(_cnn_row(name, calib, work))
            print(rows[-1], flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    notes = (f"CPU: {cpu}; ISA flags: {' '.join(flags) or 'none found'}; load average at the start "
             f"{load0:.1f}, at the end {load:.1f} on {os.cpu_count()} cores (another job on the cores "
             "inflates every time, onnxruntime's spinning threads more than TVM's); int8 dot product chosen: "
             f"{isa[0] + ' (' + str(isa[1]) + ' int32 lanes)' if isa else 'none (generic integer kernels)'}. "
             "p50 latency, batch 1, 2 threads, interleaved 3 x "
             f"{RUNS} runs (median of the three p50s). TVM builds untuned (default schedules). "
             "onnxruntime int8 runs the same QDQ model with its graph optimizations (fused int8 kernels); "
             "the flip share compares the last 8-bit activation with onnxruntime's unoptimized session "
             "(QDQ's reference semantics). On CPUs without VNNI, convolutions whose weights would "
             "saturate vpmaddubsw run as float convs between 8-bit tensors (the manifest says which); "
             "7-bit weights ([-63, 63], quant_int8's weight_range) put every 3x3/1x1 conv on the integer kernel.")
    notes += (" MiniLM: batch 1, sequence 128 (shapes bound at compile), `fuse,quant_int8` target tvm "
              "(constant-weight MatMuls quantized; attention-score MatMuls stay float: quant_int8's "
              "matmul_activations=false); calibration 4 batches of 16 Debian-task training texts. Task "
              "accuracy: logistic regression on the embeddings (zoo.text_task_accuracy), onnxruntime int8 "
              "on texts tokenized to at most 128 tokens, TVM int8 on the same texts padded to 128 and run "
              "through an artifact of the same model compiled for batch 16. CNN rows: timm models at "
              "[1,3,224,224]; depthwise convs stay float (quant_int8's depthwise=false; the manifest says "
              "'not quantized in the model'), convs whose output channels do not fill the vector run as float "
              "convs between 8-bit tensors.")
    return {"title": "TVM int8 (integer kernels) vs TVM fp32 vs onnxruntime: resnet18, MiniLM, mobile CNNs",
            "rows": rows, "notes": notes}


CNNS = ("mobilenetv3_small_100", "efficientnet_b0", "convnext_atto")


def _interleaved(fp32, model, tvm_fp32, tvm_int8, feeds) -> dict:
    """Median over 3 interleaved rounds of each of the four p50 latencies (ms)."""
    from onnxpress.backends import ort

    t = {"ort_fp32": [], "ort_int8": [], "tvm_fp32": [], "tvm_int8": []}
    for _ in range(3):          # interleaved: load drift on a shared machine hits all alike
        t["ort_fp32"].append(ort.benchmark(fp32, feeds, threads=2, runs=RUNS).p50_ms)
        t["ort_int8"].append(ort.benchmark(model, feeds, threads=2, runs=RUNS).p50_ms)
        t["tvm_fp32"].append(tvm_fp32.benchmark(feeds, runs=RUNS).p50_ms)
        t["tvm_int8"].append(tvm_int8.benchmark(feeds, runs=RUNS).p50_ms)
    return {k: float(np.median(v)) for k, v in t.items()}


def _latency_cols(ms: dict, art) -> dict:
    info = art.manifest["integer"]
    dots = _count(str(art.library), ("vpdpbusd", "vpmaddubsw", "vpmaddwd", "tdpbusd"))
    return {**{f"{k}_ms": round(v, 2) for k, v in ms.items()},
            "tvm_int8_vs_ort_int8": round(ms["tvm_int8"] / ms["ort_int8"], 2),
            "tvm_fp32_vs_tvm_int8": round(ms["tvm_fp32"] / ms["tvm_int8"], 2),
            "int8_kernels/int8_io/float": f"{info['int8_kernels']}/{info['int8_io']}/{info['float']}",
            "x86_dot_instructions": " ".join(f"{k} {v}" for k, v in dots.items())}


def _minilm_row(work: str, quick: bool) -> dict:
    from bench.bench_quant import minilm_calib
    from onnxpress import passes, zoo
    from onnxpress.backends import ort
    from onnxpress.backends import tvm as ox_tvm

    path = zoo.minilm()
    task = zoo.debian_task()
    tok = zoo.minilm_tokenizer()
    rng = np.random.default_rng(0)
    calib_texts = [task.train_texts[i] for i in rng.permutation(len(task.train_texts))[:64]]
    calib = minilm_calib(calib_texts, 16, tok)
    fp32 = passes.apply(path, ["fuse"], target="tvm")
    q = passes.apply(path, ["fuse", "quant_int8"], calib=calib, target="tvm")
    seq, batch = 128, 16
    shapes = {"input_ids": [1, seq], "attention_mask": [1, seq]}
    tvm_fp32 = ox_tvm.compile(fp32, "x86", shapes=shapes, output_dir=os.path.join(work, "minilm_fp32"),
                              progress=False)
    art = ox_tvm.compile(q, "x86", shapes=shapes, output_dir=os.path.join(work, "minilm_int8"), progress=False)
    feeds = zoo.minilm_feeds(task.test_texts[:1], max_length=seq, pad_to_max=True, tokenizer=tok)
    ms = _interleaved(fp32, q, tvm_fp32, art, feeds)
    row = {"model": f"MiniLM [1,{seq}] fuse,quant_int8 (target tvm)", **_latency_cols(ms, art)}
    ref = ort.run(q, feeds)["embedding"]
    got = art.run(feeds)["embedding"]
    row["embedding_cos_vs_ort_int8"] = round(float((ref * got).sum() / np.linalg.norm(ref) / np.linalg.norm(got)), 5)

    # task accuracy: every text padded to 128, through a batch-16 build of the same model
    texts_tr, texts_te = task.train_texts, task.test_texts
    if quick:
        texts_tr, texts_te = texts_tr[:400], texts_te[:200]
    acc_art = ox_tvm.compile(q, "x86", shapes={"input_ids": [batch, seq], "attention_mask": [batch, seq]},
                             output_dir=os.path.join(work, "minilm_int8_b16"), progress=False)

    def tvm_embed(texts):
        out = []
        for i in range(0, len(texts), batch):
            chunk = list(texts[i:i + batch])
            n = len(chunk)
            f = zoo.minilm_feeds(chunk + [""] * (batch - n), max_length=seq, pad_to_max=True, tokenizer=tok)
            out.append(acc_art.run(f)["embedding"][:n])
        return np.concatenate(out)

    sub = task if not quick else _subtask(task, len(texts_tr), len(texts_te))
    ort_acc = zoo.text_task_accuracy(zoo.embed(q, texts_tr, tokenizer=tok, max_length=seq),
                                     zoo.embed(q, texts_te, tokenizer=tok, max_length=seq), sub)
    tvm_acc = zoo.text_task_accuracy(tvm_embed(texts_tr), tvm_embed(texts_te), sub)
    row["task_accuracy_tvm_int8"] = round(tvm_acc, 4)
    row["task_accuracy_ort_int8"] = round(ort_acc, 4)
    return row


def _subtask(task, n_train: int, n_test: int):
    import dataclasses

    return dataclasses.replace(task, train_texts=task.train_texts[:n_train], test_texts=task.test_texts[:n_test],
                               train_labels=task.train_labels[:n_train], test_labels=task.test_labels[:n_test])


def _cnn_row(name: str, calib, work: str) -> dict:
    from onnxpress import passes, zoo
    from onnxpress.backends import ort
    from onnxpress.backends import tvm as ox_tvm

    path = str(zoo.timm_model(name))
    photos = zoo.photo_batch(224)
    feeds = {"input": photos[:1]}
    fp32 = passes.apply(path, ["fuse"], target="tvm")
    q = passes.apply(path, ["fuse", "quant_int8"], calib=calib, target="tvm")
    tvm_fp32 = ox_tvm.compile(fp32, "x86", output_dir=os.path.join(work, f"{name}_fp32"), progress=False)
    art = ox_tvm.compile(q, "x86", output_dir=os.path.join(work, f"{name}_int8"), progress=False)
    ms = _interleaved(fp32, q, tvm_fp32, art, feeds)
    agree = []
    for i in range(len(photos)):
        one = {"input": photos[i:i + 1]}
        agree.append(int(np.argmax(art.run(one)["output"])) == int(np.argmax(ort.run(q, one)["output"])))
    nodes = art.manifest["integer"]["nodes"]
    dw = sum(n["kernel"] == "float" and "depthwise" in n.get("reason", "") for n in nodes)
    narrow = sum(n["kernel"] == "int8-io" and "do not fill" in n.get("reason", "") for n in nodes)
    return {"model": f"{name} fuse,quant_int8 (target tvm)", **_latency_cols(ms, art),
            "top1_agree_ort_int8": f"{sum(agree)}/{len(agree)}",
            "depthwise": f"{dw} float (not quantized)" if dw else "integer",
            "float_convs_between_8bit": narrow}


def _digits_row(work: str) -> dict:
    """The plain torch export of the digits CNN (batch 1, as torch.onnx.export writes it) after
    `fuse,quant_int8` (target tvm): top-1 agreement with onnxruntime int8 on every test image,
    and both accuracies."""
    import onnx

    from onnxpress import passes, zoo
    from onnxpress.backends import ort
    from onnxpress.backends import tvm as ox_tvm

    model = onnx.load(zoo.plain_export("digits_cnn"))
    name, out = model.graph.input[0].name, model.graph.output[0].name
    calib = [{name: b["input"][i:i + 1]} for b in zoo.digits_calib(64, 16) for i in range(16)]
    X, y = zoo.digits_data().test
    fp32 = passes.apply(model, ["fuse"], target="tvm")
    q = passes.apply(model, ["fuse", "quant_int8"], calib=calib, target="tvm")
    tvm_fp32 = ox_tvm.compile(fp32, "x86", output_dir=os.path.join(work, "digits_fp32"), progress=False)
    art = ox_tvm.compile(q, "x86", output_dir=os.path.join(work, "digits_int8"), progress=False)
    ms = _interleaved(fp32, q, tvm_fp32, art, {name: X[:1]})
    tvm_top = np.array([np.argmax(art.run({name: X[i:i + 1]})[out]) for i in range(len(X))])
    ort_top = np.array([np.argmax(ort.run(q, {name: X[i:i + 1]})[out]) for i in range(len(X))])
    return {"model": "digits CNN (plain export) fuse,quant_int8 (target tvm)", **_latency_cols(ms, art),
            "top1_agree_ort_int8": f"{int((tvm_top == ort_top).sum())}/{len(X)}",
            "task_accuracy_tvm_int8": round(float((tvm_top == y).mean()), 4),
            "task_accuracy_ort_int8": round(float((ort_top == y).mean()), 4)}


def _arm_row(model, work: str, photos: np.ndarray) -> dict:
    from onnxpress.backends import ort
    from onnxpress.backends import tvm as ox_tvm

    target = {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon", "+dotprod"], "num-cores": 4}
    row = {"model": "resnet18 quant_int8 (target arm), aarch64 +dotprod (cross-compiled; run under qemu, not timed)"}
    probe, feature = _with_feature_output(model)
    try:
        art = ox_tvm.compile(probe, target, output_dir=os.path.join(work, "arm"), progress=False)
    except Exception as exc:   # no cross compiler here
        row["aarch64_dot_instructions"] = f"not built: {str(exc).splitlines()[0]}"
        return row
    info = art.manifest["integer"]
    row["int8_kernels/int8_io/float"] = f"{info['int8_kernels']}/{info['int8_io']}/{info['float']}"
    dots = _count(str(art.library), ("sdot", "udot", "usdot", "smmla"), "aarch64-linux-gnu-objdump")
    row["aarch64_dot_instructions"] = " ".join(f"{k} {v}" for k, v in dots.items()) or "no aarch64 objdump"
    steps, agree = [], []
    try:
        for i in range(len(photos)):
            one = {"input": photos[i:i + 1]}
            got = art.run(one)                     # under qemu-aarch64
            ref = ort.run(probe, one, optimization="disable")
            steps.append(np.abs(ref[feature].astype(int) - got[feature].astype(int)))
            agree.append(int(np.argmax(got["output"])) == int(np.argmax(ref["output"])))
    except Exception as exc:   # no qemu or aarch64 runtime here
        row["qemu"] = f"not run: {str(exc).splitlines()[0]}"
        return row
    d = np.concatenate([s.ravel() for s in steps])
    row.update({"feature_one_step_share": round(float((d == 1).mean()), 4),
                "feature_max_steps": int(d.max()), "top1_agree_ort_int8": f"{sum(agree)}/{len(agree)}",
                "qemu": "ran under qemu-aarch64"})
    return row
    info = art.manifest["integer"]
    row["int8_kernels/int8_io/float"] = f"{info['int8_kernels']}/{info['int8_io']}/{info['float']}"
    dots = _count(str(art.library), ("sdot", "udot", "usdot", "smmla"), "aarch64-linux-gnu-objdump")
    row["aarch64_dot_instructions"] = " ".join(f"{k} {v}" for k, v in dots.items()) or "no aarch64 objdump"
    return row
