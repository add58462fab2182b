"""int4 weight-only side by side: onnxpress quant_int4 (RTN, GPTQ; block 32 and 128; int8 for
the layers int4 breaks) vs onnxruntime's own MatMulNBitsQuantizer, on MiniLM.

    all-MiniLM-L6-v2 on the Debian descriptions task (as bench_quant):
        fp32 | onnxpress quant_int4 method=rtn|gptq, block 32|128, accuracy_level=auto
             | onnxpress quant_int4 gptq + int8_above (sensitivity) | onnxpress quant_dynamic
             | onnxruntime MatMulNBitsQuantizer: default (RTN), RTN, GPTQ, HQQ configs
        -> accuracy (logistic regression on the embeddings), mean/min cosine to fp32 over all
           3,000 sentences, size, latency at batch 1, sequence 128
    accuracy_level: 0 (fp32 compute) vs 4 (int8 activations) for each block size, timed on
        this machine; the pass's own choice is in the quant_int4 rows

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


def accuracy_level_rows(fp32: onnx.ModelProto, feeds: dict, quick: bool) -> list[dict]:
    """accuracy_level 0 vs 4 of the RTN model at block 32 and 128, interleaved with fp32."""
    from onnxpress import passes
    from onnxpress.passes.quant.int4 import set_accuracy_level

    models, names = [fp32], ["fp32"]
    for bs in (32, 128):
        base = passes.apply(fp32, f"quant_int4:block_size={bs},accuracy_level=0")
        for level in (0, 4):
            m = onnx.ModelProto()
            m.CopyFrom(base)
            set_accuracy_level(m, level)
            models.append(m)
            names.append(f"onnxpress int4 rtn b{bs}, accuracy_level={level}")
    wall, cpu = latencies(models, feeds, quick=quick)
    return [{"model": "MiniLM accuracy_level", "variant": n,
             "wall_ms_2t": round(wall[k], 2), "speedup_wall": round(wall[0] / wall[k], 2),
             "cpu_ms_1t": round(cpu[k], 2), "speedup_cpu": round(cpu[0] / cpu[k], 2)}
            for k, n in enumerate(names)]


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
    timed(f"onnxpress int4 gptq b32 + int8 (int8_above={SENSITIVE})",
          lambda: onnxpress_int4(f"quant_int4:method=gptq,block_size=32,int8_above={SENSITIVE}"))
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
        "rows": minilm_int4_rows(quick),
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
