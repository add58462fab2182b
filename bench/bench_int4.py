"""int4 weight-only side by side: onnxpress quant_int4 (RTN, GPTQ; block 32 and 128; int8 for
the layers int4 breaks) vs onnxruntime's own MatMulNBitsQuantizer, on MiniLM.

    all-MiniLM-L6-v2 on the Debian descriptions task (as bench_quant):
        fp32 | onnxpress quant_int4 method=rtn|gptq, block 32|128, accuracy_level=auto
             | onnxpress quant_int4 gptq + int8_above (sensitivity) | onnxpress quant_dynamic
             | quant_int4 format=int8_kernels (int4 in the file, int8 kernels at run time)
             | onnxruntime MatMulNBitsQuantizer: default (RTN), RTN, GPTQ, HQQ configs
        -> accuracy (logistic regression on the embeddings), mean/min cosine to fp32 over all
           3,000 sentences, size, latency at batch 1, sequence 128
    accuracy_level: 0 (fp32 compute) vs 4 (int8 activations) for each block size, timed on
        this machine; the pass's own choice is in the quant_int4 rows
    kernels: one MiniLM-sized MatMul alone, fp32 vs MatMulNBits vs dynamic int8, M = 128 and 1

Latency: onnxruntime CPU, all variants interleaved in one process: wall_ms_2t is the fastest
wall-clock inference at 2 threads, cpu_ms_1t the fastest process-CPU-time inference at 1 thread
(this machine is shared, so wall clock swings; CPU time does not).
"""

from __future__ import annotations

import sys
import time

import numpy as np
import onnx

from bench.bench_quant import latencies, minilm_calib, minilm_task_rows

SENSITIVE = 0.002        # int8_above: MiniLM's int4 per-layer drops run 0.0001..0.005


def ort_nbits(model: onnx.ModelProto, algo: str, block_size: int, accuracy_level: int,
              calib: list[dict]) -> onnx.ModelProto:
    """onnxruntime's MatMulNBitsQuantizer with one of its algorithm configs."""
    from onnxruntime.quantization import CalibrationDataReader
    from onnxruntime.quantization import matmul_nbits_quantizer as mq

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter(calib)

        def get_next(self):
            return next(self.it, None)

        def rewind(self):
            self.it = iter(calib)

    configs = {
        "default": lambda: mq.DefaultWeightOnlyQuantConfig(
            block_size=block_size, is_symmetric=False, accuracy_level=accuracy_level),
        "RTN": lambda: mq.RTNWeightOnlyQuantConfig(),
        "GPTQ": lambda: mq.GPTQWeightOnlyQuantConfig(calibration_data_reader=Reader(),
                                                     block_size=block_size),
        "HQQ": lambda: mq.HQQWeightOnlyQuantConfig(block_size=block_size),
    }
    m = onnx.ModelProto()
    m.CopyFrom(model)
    q = mq.MatMulNBitsQuantizer(m, block_size=block_size, is_symmetric=False,
                                accuracy_level=accuracy_level, algo_config=configs[algo]())
    q.process()
    out = q.model.model
    for n in out.graph.node:                       # the same accuracy_level for every variant
        for a in n.attribute:
            if n.op_type == "MatMulNBits" and a.name == "accuracy_level":
                a.i = accuracy_level
    return out


def nbits_at_levels(fp32: onnx.ModelProto, options: str = "") -> dict[str, onnx.ModelProto]:
    """RTN MatMulNBits at block 32 and 128, each at accuracy_level 0 and 4."""
    from onnxpress import passes
    from onnxpress.passes.quant.int4 import set_accuracy_level

    out = {}
    for bs in (32, 128):
        q = passes.apply(fp32, f"quant_int4:block_size={bs},accuracy_level=0{options}")
        for level in (0, 4):
            v = onnx.ModelProto()
            v.CopyFrom(q)
            set_accuracy_level(v, level)
            out[f"b{bs} accuracy_level={level}"] = v
    return out


def timing_rows(model: str, variants: dict[str, onnx.ModelProto], feeds: dict, quick: bool,
                digits: int = 2) -> list[dict]:
    """Latency of each variant (the first is the baseline), interleaved."""
    wall, cpu = latencies(list(variants.values()), feeds, quick=quick)
    return [{"model": model, "variant": v,
             "wall_ms_2t": round(wall[i], digits), "speedup_wall": round(wall[0] / wall[i], 2),
             "cpu_ms_1t": round(cpu[i], digits), "speedup_cpu": round(cpu[0] / cpu[i], 2)}
            for i, v in enumerate(variants)]


def accuracy_level_rows(fp32: onnx.ModelProto, feeds: dict, quick: bool) -> list[dict]:
    """accuracy_level 0 vs 4 of the RTN model at block 32 and 128, interleaved with fp32."""
    variants = {"fp32": fp32}
    variants.update({f"onnxpress int4 rtn {k}": v for k, v in nbits_at_levels(fp32).items()})
    return timing_rows("MiniLM accuracy_level", variants, feeds, quick)


def single_matmul(m: int, k: int, n: int) -> onnx.ModelProto:
    from onnx import helper, numpy_helper

    w = (0.05 * np.random.default_rng(0).standard_normal((k, n))).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="matmul")], "matmul",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, m, k])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, m, n])],
        [numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def kernel_rows(quick: bool) -> list[dict]:
    """One MiniLM-sized MatMul alone: fp32 vs MatMulNBits (block 32/128, accuracy_level 0/4) vs
    onnxruntime's dynamic int8 kernel, at M = 128 (a sequence of 128) and M = 1 (one token)."""
    from onnxpress import passes

    rows = []
    for m, k, n in ((128, 384, 1536), (128, 1536, 384), (1, 384, 1536)):
        fp32 = single_matmul(m, k, n)
        variants = {"fp32 MatMul": fp32}
        variants.update({f"MatMulNBits {key}": v
                         for key, v in nbits_at_levels(fp32, ",min_weight=0").items()})
        variants["dynamic int8 (DynamicQuantizeMatMul)"] = passes.apply(
            fp32, "quant_dynamic:min_weight=0,embeddings=false")
        feeds = {"x": np.random.default_rng(1).standard_normal((1, m, k)).astype(np.float32)}
        rows += timing_rows(f"one MatMul [{m}x{k}] x [{k}x{n}]", variants, feeds, quick, 3)
    return rows


def minilm_int4_rows(quick: bool) -> list[dict]:
    from onnxpress import passes, zoo

    fp32 = onnx.load(zoo.minilm())
    task = zoo.debian_task()
    tok = zoo.minilm_tokenizer()
    rng = np.random.default_rng(0)
    calib_texts = [task.train_texts[i] for i in rng.permutation(len(task.train_texts))[:128]]
    calib = minilm_calib(calib_texts, 16, tok)
    # batch 1, sequence 128: one request as served
    feeds = zoo.minilm_feeds(task.test_texts[:1], max_length=128, pad_to_max=True, tokenizer=tok)

    variants: dict[str, onnx.ModelProto] = {"fp32": fp32}
    info: dict[str, dict] = {}

    def timed(name, fn):
        t0 = time.perf_counter()
        try:
            model, extra = fn()
        except Exception as exc:      # a peer that does not run here: say why in the table
            info[name] = {"failed": f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"}
            return
        variants[name] = model
        info[name] = {"quantize_s": round(time.perf_counter() - t0, 1), **extra}

    def onnxpress_int4(spec):
        res = passes.run(fp32, spec, calib=calib, progress=False)
        f = res.reports[0].figures
        return res.model, {"accuracy_level": f.get("accuracy_level"),
                           "int8_layers": len(f.get("int8_layers", []))}

    for bs in (32, 128):
        for method in ("rtn", "gptq"):
            timed(f"onnxpress int4 {method} b{bs}",
                  lambda bs=bs, method=method: onnxpress_int4(
                      f"quant_int4:method={method},block_size={bs}"))
    for method in ("rtn", "gptq"):
        timed(f"onnxpress int4 {method} b32 + awq",
              lambda method=method: onnxpress_int4(f"quant_int4:method={method},block_size=32,awq=true"))
    timed(f"onnxpress int4 gptq b32 + int8 (int8_above={SENSITIVE})",
          lambda: onnxpress_int4(f"quant_int4:method=gptq,block_size=32,int8_above={SENSITIVE}"))
    # int4 weights expanded to int8 when the session loads, on the dynamic int8 kernels
    for method in ("rtn", "gptq"):
        timed(f"onnxpress int4 {method} b32, format=int8_kernels",
              lambda method=method: onnxpress_int4(
                  f"quant_int4:format=int8_kernels,method={method},block_size=32"))
    timed(f"onnxpress int4 gptq b32, format=int8_kernels + int8 (int8_above={SENSITIVE})",
          lambda: onnxpress_int4("quant_int4:format=int8_kernels,method=gptq,block_size=32,"
                                 f"int8_above={SENSITIVE}"))
    timed("onnxpress quant_dynamic (int8, reference)",
          lambda: (passes.apply(fp32, "quant_dynamic"), {}))
    level = info["onnxpress int4 rtn b32"].get("accuracy_level") or 0
    peers = [("default", 32), ("default", 128), ("RTN", 32), ("GPTQ", 32)]
    if not quick:
        peers.append(("HQQ", 32))          # 100 s on this machine
    for algo, bs in peers:
        timed(f"ORT MatMulNBitsQuantizer {algo} b{bs}",
              lambda algo=algo, bs=bs: (ort_nbits(fp32, algo, bs, level, calib),
                                        {"accuracy_level": level}))

    rows = minilm_task_rows(variants, feeds, info, quick=quick)
    rows += [{"model": "MiniLM", "variant": name, **extra}
             for name, extra in info.items() if "failed" in extra]
    rows += accuracy_level_rows(fp32, feeds, quick)
    return rows


def run(quick: bool) -> dict:
    return {
        "title": "int4 weight-only: onnxpress quant_int4 vs onnxruntime's MatMulNBitsQuantizer",
        "rows": minilm_int4_rows(quick) + kernel_rows(quick),
        "notes": (
            "MiniLM (all-MiniLM-L6-v2) on the Debian descriptions task: accuracy = logistic "
            "regression (C=10) on the embeddings; cosine = each of the 3,000 embeddings vs fp32. "
            "Calibration (GPTQ Hessians, sensitivity, the accuracy_level timing): 128 training "
            "sentences in batches of 16. Latency at batch 1, sequence 128, onnxruntime CPU, "
            "interleaved in one run: wall_ms_2t = fastest wall-clock inference at 2 threads, "
            "cpu_ms_1t = fastest process-CPU-time inference at 1 thread. accuracy_level: the "
            "pass's choice (auto: timed on this machine); ORT's quantizer rows use the same "
            "level. ORT's quantizer leaves the embedding table fp32 (onnxpress makes it int8)."),
    }


if __name__ == "__main__":
    import json

    for row in run("--full" not in sys.argv)["rows"]:
        print(json.dumps(row))
