"""README's (and docs/*.md's) benchmark tables, rendered from the committed bench/results/*.json.

Every figure the README and the docs show about speed, size or accuracy sits between markers

    <!-- bench:NAME -->  ...generated...  <!-- /bench:NAME -->

and is rendered here from bench/results/<source>.json, with the machine and the date of the run
that measured it. After a benchmark run:

    python -m bench.readme            # rewrite the blocks in README.md and docs/*.md
    python -m bench.readme --check    # exit 1 and list the blocks that disagree (tests run this)

so a number in the README or the docs can only come from a committed measurement.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any, Callable

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
README = HERE.parent / "README.md"


def files() -> list[Path]:
    """Where blocks may sit: README.md and every page under docs/."""
    return [README, *sorted((HERE.parent / "docs").glob("*.md"))]
BLOCK = re.compile(r"<!-- bench:(?P<name>[\w-]+) -->\n(?P<body>.*?)<!-- /bench:(?P=name) -->", re.S)


def _load(source: str) -> dict:
    return json.loads((RESULTS / f"{source}.json").read_text())


def _x(v: Any, digits: int = 2) -> str:
    return "" if v in (None, "") else f"{float(v):.{digits}f}x"


def _num(v: Any, fmt: str = "{:.3g}") -> str:
    return "" if v in (None, "") else fmt.format(float(v))


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"] + \
        ["| " + " | ".join(r) + " |" for r in rows]


def _stamp(data: dict, source: str, extra: str = "") -> str:
    env = data.get("environment") or {}
    mode = " --quick" if data.get("quick") else ""
    isa = f" ({' '.join(env['isa'])})" if env.get("isa") else ""
    sc = env.get("sgemm_scaling") or {}
    scaling = (f" (fp32 GEMM from 1 to {sc['threads']} threads: {sc['scaling']}x)"
               if sc.get("scaling") else "")
    return (f"_{env.get('cpu', '?')}{isa}, {env.get('cores', '?')} cores{scaling}, onnxruntime "
            f"{env.get('onnxruntime', '?')}, {env.get('date', '?')}; "
            f"`python -m bench --only {source}{mode}`{extra}_")


def quant_speed(source: str = "quant") -> list[str]:
    """The quant bench's speed rows; source quant_xeon: the run kept from the Intel Xeon."""
    data = _load(source)
    rows = [r for r in data["rows"] if r.get("wall_ms_2t") is not None and r["model"] != "MiniLM"]
    models = list(dict.fromkeys(r["model"] for r in rows))
    out = []
    for m in models:
        by = {r["variant"]: r for r in rows if r["model"] == m}
        fp32 = by.get("fp32", {})
        ours = [v for v in by if v.startswith("onnxpress")]
        for v in ours or [None]:
            r, peer = by.get(v, {}), by.get("ORT quantize_static", {})
            nncf = by.get("NNCF quantize", {})
            out.append([m, v.replace("onnxpress ", "") if v else "", _num(fp32.get("wall_ms_2t"), "{:.2f}"),
                        f"{_x(peer.get('speedup_wall'))} faster, {_x(peer.get('size_x'), 3)} size"
                        if peer.get("speedup_wall") else (peer.get("decision") or "failed"),
                        f"{_x(nncf.get('speedup_wall'))} faster, cosine "
                        f"{_num(nncf.get('cosine'), '{:.5f}')}" if nncf else "",
                        f"**{_x(r.get('speedup_wall'))}** faster, {_x(r.get('size_x'), 3)} size",
                        r.get("int8_layers", ""), _num(r.get("cosine"), "{:.5f}"),
                        r.get("decision") or ""])
    header = ["model", "pipeline", "fp32 ms", "onnxruntime quantize_static", "NNCF quantize", "onnxpress",
              "int8 layers", "cosine to fp32", "kept float / decision"]
    return _table(header, out) + ["", _stamp(data, "quant", "" if source == "quant" else
                                             f" (kept as bench/results/{source}.json)")]


def quant_minilm() -> list[str]:
    data = _load("quant")
    rows = [r for r in data["rows"] if r["model"] == "MiniLM" and r.get("accuracy") is not None]
    out = [[r["variant"], f"{r['accuracy']:.3f}", _num(r.get("mean_cosine"), "{:.4f}"),
            _num(r.get("min_cosine"), "{:.3f}"), _x(r.get("size_x"), 3), _x(r.get("speedup_wall")),
            _x(r.get("speedup_cpu")), r.get("precisions") or ""] for r in rows]
    return _table(["MiniLM, Debian task", "accuracy", "mean cosine", "min cosine", "size",
                   "speed (2 threads)", "speed (CPU time, 1 thread)", "layers (quant_auto)"],
                  out) + ["", _stamp(data, "quant")]


def quant_digits() -> list[str]:
    data = _load("quant")
    rows = [r for r in data["rows"] if r["model"] == "digits CNN"]
    out = [[r["variant"], f"{r['accuracy']:.4f}", _num(r.get("drop_points"), "{:.2f}"),
            _num(r.get("size_KB"), "{:.1f} KB"), _x(r.get("size_x"), 3)] for r in rows]
    return _table(["digits CNN (450 test images)", "accuracy", "drop (points)", "size", "size x"],
                  out) + ["", _stamp(data, "quant")]


def quant_calibration() -> list[str]:
    data = _load("quant")
    rows = [r for r in data["rows"] if str(r["variant"]).startswith("calibration")]
    out = [[r["variant"], str(r["tensors"]), _num(r["rss_at_batch_10_MB"], "{:.1f} MB"),
            _num(r["rss_at_last_batch_MB"], "{:.1f} MB"), _num(r["growth_MB"], "+{:.1f} MB"),
            _num(r["seconds"], "{:.1f} s")] for r in rows]
    return _table(["MiniLM calibration", "activations histogrammed", "RSS at batch 10",
                   "RSS at the last batch", "growth", "time"], out) + ["", _stamp(data, "quant")]


def fuse() -> list[str]:
    data = _load("fuse")
    out = [[r["model"], str(r["nodes original"]), f"**{r['nodes onnxpress']}**", str(r["nodes onnxslim"]),
            _num(r.get("(a) speedup"), "{:.2f}"), _num(r.get("(b) speedup"), "{:.2f}")]
           for r in data["rows"]]
    return _table(["model", "nodes: original", "onnxpress", "onnxslim", "speed-up, ORT opts off",
                   "speed-up, ORT_ENABLE_ALL"], out) + ["", _stamp(data, "fuse")]


def fuse_detail() -> list[str]:
    """docs/fuse.md: wall and CPU-time speed-ups with onnxruntime's optimizations off and at ALL."""
    data = _load("fuse")
    out = [[r["model"], str(r["nodes original"]), str(r["nodes onnxpress"]), str(r["nodes onnxslim"]),
            f"{_num(r.get('(a) speedup'), '{:.2f}')} / {_num(r.get('(a) cpu-time speedup'), '{:.2f}')}",
            f"{_num(r.get('(b) speedup'), '{:.2f}')} / {_num(r.get('(b) cpu-time speedup'), '{:.2f}')}",
            str(r.get("(c) slim speedup no-opt / ALL", "")), str(r.get("max abs err", ""))]
           for r in data["rows"]]
    secs = data.get("fuse_seconds_minilm")
    return _table(["model", "nodes original", "onnxpress", "onnxslim",
                   "(a) ORT opt off: speed-up wall / cpu", "(b) ORT_ENABLE_ALL: speed-up wall / cpu",
                   "(c) onnxslim, opt off / ALL: wall", "max abs err"], out) + [
        "", (f"`fuse` itself on MiniLM (after `fold_constants,dce,simplify`): {secs:.2f} s. "
             if secs else "") + _stamp(data, "fuse")]


def prune() -> list[str]:
    data = _load("prune")
    out = []
    for r in data["rows"]:
        acc = r.get("acc_before_distill")
        after = r.get("acc_after_distill")
        out.append([r["model"], r["config"], "" if acc in (None, "") else f"{float(acc):.3f}",
                    "" if after in (None, "") else f"{float(after):.3f}",
                    _x(r.get("macs_ratio")), _x(r.get("params_ratio")), _x(r.get("latency_ratio"))])
    return _table(["model", "pruning", "accuracy", "after distill", "MACs", "params", "latency"],
                  out) + ["", _stamp(data, "prune")]


def distill() -> list[str]:
    """docs/prune.md: the torch converter's coverage and the pruned segmenter (bench_distill)."""
    data = _load("distill")
    cov = data["coverage"]
    refused = ", ".join(f"{op} {n}" for op, n in cov["unsupported"].items())
    lines = [f"Converter: **{cov['matched']} of {cov['eligible']}** onnx node cases with a float "
             f"input match onnxruntime ({100 * cov['fraction']:.1f}%); refused by name: {refused}; "
             f"outputs that differ: {cov['unmatched']}.", ""]
    out = [[r["model"], r["config"], _num(r.get("miou"), "{:.3f}"),
            _num(r.get("miou_distilled"), "{:.3f}"), _num(r.get("pixel_accuracy"), "{:.3f}"),
            _num(r.get("pixel_accuracy_distilled"), "{:.3f}"), _x(r.get("macs_ratio")),
            _x(r.get("params_ratio"))] for r in data["rows"]]
    return lines + _table(["model", "pruning", "mean IoU", "after distill", "pixel accuracy",
                           "after distill", "MACs", "params"], out) + ["", _stamp(data, "distill")]


def memory() -> list[str]:
    data = _load("memory")
    out = []
    for r in data["rows"]:
        tvm = r.get("tvm_planned_bytes")
        out.append([r["model"], f"{r['arena_bytes'] / 2**20:.2f} MiB",
                    _x(r.get("arena_vs_lower_bound")), _x(r.get("arena_vs_naive"), 3),
                    _x(r["arena_bytes"] / tvm) if tvm else ""])
    return _table(["model (batch 1)", "planned arena", "vs lower bound", "vs no reuse",
                   "vs TVM's planner"], out) + ["", _stamp(data, "memory")]


def tvm() -> list[str]:
    data = _load("tvm")
    rows = [r for r in data["rows"] if " after " not in r["model"]]
    out = [[r["model"], _num(r.get("ort_fp32_ms"), "{:.3g}"), _x(r.get("untuned_vs_ort")),
            _x(r.get("tuned_vs_ort")) + (" (kept the default kernels: the tuned ones lost end "
                                         "to end)" if r.get("tuned_build") == "default" else "")
            + (f" ({r['tasks_beating_default']} kernels beat their default side by side)"
               if r.get("tasks_beating_default") else ""),
            f"{r.get('trials', '')} ({_num(r.get('tune_s'), '{:.0f}')} s)"
            if r.get("trials") else ""] for r in rows]
    header = ["model", "onnxruntime fp32 ms", "TVM untuned / onnxruntime", "TVM tuned / onnxruntime",
              "trials (tuning time)"]
    if any(r.get("slowest_kernels") for r in rows):      # results from before profiles lack it
        header.append("slowest kernels (share of one inference)")
        for cells, r in zip(out, rows):
            cells.append(r.get("slowest_kernels") or "")
    return _table(header, out) + ["", _stamp(data, "tvm")]


def tvm_int8(source: str = "tvm_int8") -> list[str]:
    """The tvm_int8 bench's rows; source tvm_int8_xeon: the run kept from the Intel Xeon."""
    data = _load(source)
    out = []
    for r in data["rows"]:
        acc = ""
        if r.get("task_accuracy_tvm_int8") is not None:
            acc = f"{r['task_accuracy_tvm_int8']:.3f} / {r.get('task_accuracy_ort_int8', 0):.3f}"
        out.append([r["model"], _num(r.get("ort_fp32_ms"), "{:.3g}"), _num(r.get("ort_int8_ms"), "{:.3g}"),
                    _num(r.get("tvm_fp32_ms"), "{:.3g}"), _num(r.get("tvm_int8_ms"), "{:.3g}"),
                    _x(r.get("tvm_fp32_vs_tvm_int8")), _x(r.get("tvm_int8_vs_ort_int8")),
                    str(r.get("int8_kernels/int8_io/float", "")), _exactness(r), acc,
                    str(r.get("x86_dot_instructions") or r.get("aarch64_dot_instructions") or "")])
    return _table(["model", "ORT fp32 ms", "ORT int8 ms", "TVM fp32 ms", "TVM int8 ms",
                   "TVM int8 speed-up over TVM fp32", "TVM int8 / ORT int8 latency",
                   "integer kernels / 8-bit io / float",
                   "vs ORT's reference: one-step share (max steps); same top-1",
                   "task accuracy TVM / ORT int8", "dot instructions"], out) + [
        "", _stamp(data, "tvm_int8", "" if source == "tvm_int8" else f" (kept as bench/results/{source}.json)")]


def _exactness(r: dict) -> str:
    """The 8-bit features against onnxruntime's QDQ reference and the top-1 agreement with
    onnxruntime int8, where the row measured them (or why it could not)."""
    parts = []
    if r.get("feature_one_step_share") is not None:
        parts.append(f"{r['feature_one_step_share']:.3f} ({r.get('feature_max_steps')})")
    if r.get("top1_agree_ort_int8"):
        parts.append(str(r["top1_agree_ort_int8"]))
    if str(r.get("qemu", "")).startswith("not run"):
        parts.append(r["qemu"])
    return "; ".join(parts)


def tvm_schedules() -> list[str]:
    """docs/tvm.md: untuned TVM before and after the register block from the ISA and prepacked
    weights, against onnxruntime fp32 (bench/bench_tvm_schedules.py)."""
    data = _load("tvm_schedules")

    def cell(r, key):
        return f"{_num(r.get(key + '_ms'), '{:.3g}')} ({_x(r.get(key + '_vs_ort'))})" if r.get(key + "_ms") else ""

    out = [[r["model"], str(r.get("threads", "")), _num(r.get("ort_fp32_ms"), "{:.3g}"),
            cell(r, "previous"), cell(r, "register_block"), cell(r, "current"),
            _num(r.get("load_avg"), "{:.1f}")] for r in data["rows"] if "error" not in r]
    notes = data.get("notes", "")
    machine = notes.split(" (per row")[0] if "CPU:" in notes else ""
    hot = [f"{k[len('hot_conv_'):]}: {v}" for r in data["rows"] for k, v in r.items() if k.startswith("hot_conv_")]
    return _table(["model", "threads", "onnxruntime fp32 ms", "previous ms (/ ort)",
                   "register block ms (/ ort)", "current ms (/ ort)", "load avg"], out) + \
        ["", f"_{machine}_" if machine else "", *(["", "resnet18's hottest conv, inner loop: " + "; ".join(hot)]
                                                 if hot else []), "", _stamp(data, "tvm_schedules")]


def cuda() -> list[str]:
    """docs/tvm.md: CUDA artifacts built here and run on a GPU (bench/bench_cuda.py)."""
    data = _load("cuda")
    out = []
    for r in data["rows"]:
        steps = [v for k, v in r.items() if k.endswith("_max_steps")]
        cos = [v for k, v in r.items() if k.endswith("_cosine")]
        top = [v for k, v in r.items() if k.endswith("_top1_same")]
        if "error" in r:
            match = f"not run: {r['error']}"
        else:
            parts = []
            if steps:
                parts.append("exact on 8-bit outputs" if max(steps) == 0 else
                             f"<= {max(steps)} step on 8-bit outputs")
            if cos:
                parts.append(f"cosine {min(cos)}")
            if not r["int8"]:
                parts.append(f"max abs {max(v for k, v in r.items() if k.endswith('_max_abs')):g}")
            match = ", ".join(parts)
        out.append([r["case"], str(r.get("int8_kernels", 0)), str(r.get("dp4a_scheduled", 0)), match,
                    ("yes" if all(top) else "no") if top else "n/a", _num(r.get("p50_ms"), "{:.3f}")])
    env = data.get("environment") or {}
    return _table(["case", "int8 kernels", "on dp4a", "vs onnxruntime's reference", "same top-1",
                   "p50 ms"], out) + ["", f"_{data['title']}; built on {env.get('cpu', '?')}, "
                                      f"{env.get('date', '?')}; `python -m bench.bench_cuda build DIR` "
                                      "then `run DIR` on the GPU_"]


def remote_cpu() -> list[str]:
    """docs/tvm.md: x86 artifacts built here for another CPU and run there with TVM's runtime
    alone (bench/bench_remote_cpu.py): fp32 and int8, TVM against onnxruntime, per build."""
    data = _load("remote_cpu")
    cpu = data["cpu"]
    out = []
    for run in data["runs"]:
        for r in run["rows"]:
            if "error" in r:
                out.append([r["model"], run["mcpu"], "", "", "", "", "", "", "", f"not run: {r['error']}"])
                continue
            tvm_cos = [v for k, v in r.items() if k.startswith("int8_") and k.endswith("_cosine")]
            ort_cos = [v for k, v in r.items() if k.startswith("ort_int8_") and k.endswith("_cosine")]
            out.append([r["model"], run["mcpu"], _num(r["ort_fp32_ms"]), _num(r["ort_int8_ms"]),
                        _num(r["tvm_fp32_ms"]), _num(r["tvm_int8_ms"]), _x(r["tvm_fp32_vs_ort_fp32"]),
                        _x(r["tvm_fp32_vs_tvm_int8"]), _x(r["tvm_int8_vs_ort_int8"]),
                        str(r.get("int8_kernels/int8_io/float", "")),
                        f"{min(tvm_cos)} / {min(ort_cos)}" if tvm_cos and ort_cos else ""])
    flags = " ".join(cpu.get("flags", []))
    return _table(["model", "built for", "ORT fp32 ms", "ORT int8 ms", "TVM fp32 ms", "TVM int8 ms",
                   "TVM fp32 / ORT fp32", "TVM int8 speed-up over TVM fp32", "TVM int8 / ORT int8",
                   "integer kernels / 8-bit io / float", "int8 cosine to the reference: TVM / ORT"], out) + \
        ["", f"_{cpu.get('cpu', '?')} ({flags}; L2 {cpu.get('L2 cache', '?')}), 2 threads, onnxruntime "
             f"{data.get('onnxruntime', '?')}, {data.get('date', '?')}; built on {data.get('built_on', '?')} with "
             "`python -m bench.bench_remote_cpu build DIR --mcpu M`, run there with `run DIR`_"]


PEER_NAMES = {"oxint8": "onnxpress `quant_int8` (onnxruntime target)",
              "qstatic": "onnxruntime quantize_static (QDQ, per-channel)",
              "int4_b32_l0": "onnxpress `quant_int4` block 32, MatMulNBits accuracy_level 0",
              "int4_b32_l4": "onnxpress `quant_int4` block 32, MatMulNBits accuracy_level 4",
              "int4_b128_l4": "onnxpress `quant_int4` block 128, MatMulNBits accuracy_level 4"}


def remote_cpu_onnxruntime() -> list[str]:
    """docs/quant.md: the onnxruntime-only variants of the remote run (quantized models against
    onnxruntime fp32 on the other CPU), one row per variant and build."""
    data = _load("remote_cpu")
    cpu = data["cpu"]
    out = []
    for run in data["runs"]:
        for r in run["rows"]:
            for label in r.get("onnxruntime_only", ()):
                if f"ort_{label}_ms" not in r:
                    continue
                out.append([r["model"], f"run {run['mcpu']}", PEER_NAMES.get(label, label),
                            _num(r["ort_fp32_ms"]), _num(r[f"ort_{label}_ms"]),
                            _x(r[f"ort_{label}_speedup_vs_fp32"])])
    flags = " ".join(cpu.get("flags", []))
    return _table(["model", "in the run of", "variant", "ORT fp32 ms", "variant ms",
                   "speed-up over fp32"], out) + \
        ["", f"_{cpu.get('cpu', '?')} ({flags}), 2 threads, onnxruntime {data.get('onnxruntime', '?')}, "
             f"{data.get('date', '?')}; pattern weights; `python -m bench.bench_remote_cpu build DIR` "
             "here, `run DIR` there_"]


def scale() -> list[str]:
    """docs/memory.md: the pipeline on generated encoders of growing depth (bench/bench_scale.py)."""
    data = _load("scale")
    out = []
    for r in data["rows"]:
        out.append([str(r["layers"]), f"{r['params'] / 1e6:.0f}M", f"{r['model_bytes'] / 1e9:.2f} GB",
                    f"{r['nodes']} -> {r['nodes_out']}", _num(r["passes_s"], "{:.0f}"),
                    _num(r["ms_per_node"], "{:.0f}"), f"{r['peak_rss'] / 1e9:.1f} GB",
                    _num(r["rss_per_model_byte"], "{:.1f}x")])
    return _table(["layers", "params", "model", "nodes", "passes s", "ms / node", "peak RSS",
                   "RSS / model bytes"], out) + ["", _stamp(data, "scale")]


def quant_outliers() -> list[str]:
    data = _load("quant_outliers")
    out = []
    for r in data["rows"]:
        metric = r.get("accuracy") if r["model"] == "MiniLM" else r.get("top1_agreement")
        out.append([r["model"], r["variant"], _num(r.get("min_cosine"), "{:.4f}"),
                    _num(r.get("mean_cosine"), "{:.4f}"),
                    _num(r.get("inputs_closer_than_quant_int8"), "{:.0%}"),
                    _num(metric, "{:.3f}"),
                    _x(r.get("size_x"), 3), _x(r.get("speedup_wall")), r.get("what") or ""])
    return _table(["model", "variant", "min cosine", "mean cosine", "inputs closer than quant_int8",
                   "accuracy (MiniLM) / top-1 agreement (ViT)", "size", "speed (2 threads)",
                   "what it did"], out) + ["", _stamp(data, "quant_outliers")]


def quant_recurrent() -> list[str]:
    """docs/quant.md: char-level LSTM/GRU on the Debian descriptions (bench/bench_recurrent.py)."""
    data = _load("recurrent")
    out = []
    for r in data["rows"]:
        if r.get("agreement") is None:
            out.append([r["model"], r["variant"], "", "", "", "", "", r.get("note", "")])
            continue
        out.append([r["model"], r["variant"], f"{r['agreement']:.4f}", f"{r['accuracy']:.4f}",
                    _x(r.get("size_x"), 3), _x(r.get("speed_1t")), _x(r.get("speed_2t")),
                    r.get("recurrence", "")])
    return _table(["model", "variant", "per-step agreement", "next-char accuracy", "size",
                   "speed (1 thread, CPU time)", "speed (2 threads)", "what runs"], out) + \
        ["", _stamp(data, "recurrent")]


def quant_int4() -> list[str]:
    """docs/quant.md: MiniLM int4 (bench/bench_int4.py), onnxruntime's quantizer beside it."""
    data = _load("int4")
    out = []
    for r in data["rows"]:
        if r["model"] != "MiniLM":
            continue
        if r.get("failed"):
            out.append([r["variant"], f"failed: {r['failed']}"] + [""] * 6)
            continue
        level = r.get("accuracy_level")
        out.append([r["variant"], f"{r['accuracy']:.3f}", _num(r.get("mean_cosine"), "{:.4f}"),
                    _num(r.get("min_cosine"), "{:.3f}"), _x(r.get("size_x"), 3),
                    _x(r.get("speedup_wall")), _x(r.get("speedup_cpu")),
                    "" if level is None else str(level)])
    return _table(["MiniLM, Debian task", "accuracy", "mean cosine", "min cosine", "size",
                   "speed (2 threads)", "CPU time (1 thread)", "accuracy_level"],
                  out) + ["", _stamp(data, "int4")]


def quant_int4_kernels() -> list[str]:
    """docs/quant.md: MatMulNBits vs fp32 vs dynamic int8, whole MiniLM and one MatMul."""
    data = _load("int4")
    rows = [r for r in data["rows"] if r["model"] != "MiniLM"]
    out = [[r["model"], r["variant"], _x(r.get("speedup_cpu")), _x(r.get("speedup_wall"))]
           for r in rows]
    return _table(["what (batch 1)", "variant", "CPU time (1 thread) vs fp32",
                   "speed (2 threads) vs fp32"], out) + ["", _stamp(data, "int4")]


BLOCKS: dict[str, Callable[[], list[str]]] = {
    "quant-speed": quant_speed, "quant-speed-xeon": lambda: quant_speed("quant_xeon"),
    "quant-minilm": quant_minilm, "fuse": fuse, "prune": prune,
    "distill": distill,
    "quant-digits": quant_digits, "quant-calibration": quant_calibration, "fuse-detail": fuse_detail,
    "memory": memory, "tvm": tvm, "tvm-int8": tvm_int8,
    "tvm-int8-xeon": lambda: tvm_int8("tvm_int8_xeon"), "cuda": cuda, "scale": scale,
    "tvm-schedules": tvm_schedules, "remote-cpu": remote_cpu,
    "remote-cpu-onnxruntime": remote_cpu_onnxruntime,
    "quant-outliers": quant_outliers,
    "quant-recurrent": quant_recurrent,
    "quant-int4": quant_int4, "quant-int4-kernels": quant_int4_kernels,
}


def render(name: str) -> str:
    return "\n".join(BLOCKS[name]()) + "\n"


def update(text: str) -> tuple[str, list[str]]:
    """(text with every block re-rendered, names of blocks whose content changed)."""
    changed = []

    def sub(m: re.Match) -> str:
        name = m.group("name")
        if name not in BLOCKS:
            raise SystemExit(f"README block '{name}' has no renderer in bench/readme.py "
                             f"(have {', '.join(BLOCKS)})")
        body = render(name)
        if body != m.group("body"):
            changed.append(name)
        return f"<!-- bench:{name} -->\n{body}<!-- /bench:{name} -->"

    return BLOCK.sub(sub, text), changed


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    stale = []
    for path in files():
        text = path.read_text()
        if "<!-- bench:" not in text:
            continue
        new, changed = update(text)
        stale += [f"{path.name}:{name}" for name in changed]
        if changed and "--check" not in argv:
            path.write_text(new)
    if "--check" in argv:
        if stale:
            print(f"blocks that disagree with bench/results: {', '.join(stale)}; "
                  "run `python -m bench.readme`", file=sys.stderr)
            return 1
        return 0
    print(f"{len(stale)} block(s) rewritten ({', '.join(stale) or 'none'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
