"""Which of onnxruntime's two integer convolution kernels runs each int8 Conv, chosen by the clock.

onnxruntime fuses DQ -> Conv -> Q into QLinearConv, whose kernel depends on the weight zero point:

    zero point 0 (symmetric)   MLAS's indirect "ConvSym" kernel (AVX2 / AVX-512 VNNI dot products)
    any other zero point       im2col + MLAS's integer GEMM, which runs on AMX tiles where the CPU
                               has them

The same weights can take either form: int8 weights in -127..127 with zero point 0 equal, value
for value, the weights minus 1 (-128..126) with zero point -1. Which is faster depends on the CPU
and the layer: on a Xeon with AMX the GEMM ran resnet18's deep 3x3 convs up to 2x faster, its
56x56 ones 1.5x slower (2 threads). So each conv is profiled in both forms on this machine, at
one thread and at the session's threads, and moves to the GEMM form only where that is faster in
both; the mix must then beat the symmetric model end to end, or the symmetric model is kept.
Outputs are bit-identical either way.
"""

from __future__ import annotations

import collections
import json
import os
import re
import tempfile

import numpy as np
import onnx
from onnx import numpy_helper

from onnxpress.passes.quant.latency import node_key, timing_session

_NAME = "oxkconv{}"
_NAME_RE = re.compile(r"^oxkconv(\d+)(?:_|$)")


def _weight_dqs(model: onnx.ModelProto):
    """(index, conv, its weight's DequantizeLinear, weight initializer, zero point initializer)
    for each main-graph Conv whose weight is DequantizeLinear(initializer, scale, initializer
    zero point) with int8 weights and zero point."""
    inits = {t.name: t for t in model.graph.initializer}
    producer = {o: n for n in model.graph.node for o in n.output}
    for i, n in enumerate(model.graph.node):
        dq = producer.get(n.input[1]) if n.op_type == "Conv" and len(n.input) > 1 else None
        if dq is None or dq.op_type != "DequantizeLinear" or len(dq.input) < 3:
            continue
        w, zp = inits.get(dq.input[0]), inits.get(dq.input[2])
        if w is not None and zp is not None and w.data_type == onnx.TensorProto.INT8 \
                and zp.data_type == onnx.TensorProto.INT8:
            yield i, n, dq, w, zp


def candidates(model: onnx.ModelProto) -> list[int]:
    """Indices of the Convs (main graph) whose weight is DequantizeLinear(int8 constant) with a
    zero point of 0 and no value at -128: those can take the GEMM form unchanged in value."""
    return [i for i, _, _, w, zp in _weight_dqs(model)
            if not np.any(numpy_helper.to_array(zp) != 0) and numpy_helper.to_array(w).min() >= -127]


def to_gemm_form(model: onnx.ModelProto, convs: list[int]) -> onnx.ModelProto:
    """A copy where the given Convs read weights - 1 with zero point -1 (the same values).
    New initializers are added: a weight or zero point shared with other nodes stays as it was."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    inits = {t.name: t for t in m.graph.initializer}
    producer = {o: n for n in m.graph.node for o in n.output}
    twins: dict[str, onnx.NodeProto] = {}          # DQ output -> its GEMM-form twin
    for i in convs:
        conv = m.graph.node[i]
        dq = producer[conv.input[1]]
        if dq.output[0] not in twins:
            for k in (0, 2):
                name = dq.input[k] + "_gemm"
                if name not in inits:
                    a = numpy_helper.to_array(inits[dq.input[k]]).astype(np.int16) - 1
                    inits[name] = numpy_helper.from_array(a.astype(np.int8), name)
                    m.graph.initializer.append(inits[name])
            twin = onnx.NodeProto()
            twin.CopyFrom(dq)
            twin.name = (dq.name or dq.output[0]) + "_gemm"
            twin.input[0] += "_gemm"
            twin.input[2] += "_gemm"
            twin.output[0] += "_gemm"
            twins[dq.output[0]] = twin
        conv.input[1] = twins[dq.output[0]].output[0]
    nodes = []
    for n in m.graph.node:
        nodes.append(n)
        if n.op_type == "DequantizeLinear" and n.output[0] in twins:
            nodes.append(twins[n.output[0]])
    replaced = [n for n in m.graph.node if n.op_type == "DequantizeLinear" and n.output[0] in twins]
    del m.graph.node[:]
    m.graph.node.extend(nodes)
    _drop_replaced(m, replaced)
    return m


def gemm_form_of(model: onnx.ModelProto, keys: set[str]) -> onnx.ModelProto:
    """`model` with the eligible convs whose node_key is in `keys` in the GEMM form (the
    choice made on one quantization of a model, applied to another: latency.py's candidates)."""
    convs = [i for i in candidates(model) if node_key(model.graph.node[i]) in keys]
    return to_gemm_form(model, convs) if convs else model


def gemm_layers(model: onnx.ModelProto) -> list[str]:
    """node_key of each main-graph Conv that reads int8 weights with zero point -1 (the GEMM
    form): what a model finally holds, after choices that may have returned layers to float."""
    return [node_key(n) for _, n, _, _, zp in _weight_dqs(model)
            if np.all(numpy_helper.to_array(zp) == -1)]


def gemm_figures(model: onnx.ModelProto) -> dict:
    """conv_kernels_gemm(_layers) counted again on the model a pass returns."""
    layers = gemm_layers(model)
    return {"conv_kernels_gemm_layers": layers, "conv_kernels_gemm": len(layers)}


def _drop_replaced(m: onnx.ModelProto, replaced: list[onnx.NodeProto]) -> None:
    """Remove the DequantizeLinear nodes that `replaced` names and nothing reads any more, and
    their initializers that nothing else reads (candidates are main-graph convs, so subgraphs
    never read them)."""
    used = {i for n in m.graph.node for i in n.input} | {o.name for o in m.graph.output}
    gone = {dq.output[0] for dq in replaced if dq.output[0] not in used}
    if not gone:
        return
    keep = [n for n in m.graph.node if not (n.op_type == "DequantizeLinear" and n.output[0] in gone)]
    del m.graph.node[:]
    m.graph.node.extend(keep)
    used = {i for n in m.graph.node for i in n.input} | {o.name for o in m.graph.output}
    dropped = {t for dq in replaced if dq.output[0] in gone for t in dq.input} - used
    inits = [t for t in m.graph.initializer if t.name not in dropped]
    del m.graph.initializer[:]
    m.graph.initializer.extend(inits)


def node_times(models: list[onnx.ModelProto], feeds: dict, threads: int, *, rounds: int = 4,
               runs: int = 5) -> list[dict[int, float]]:
    """Median kernel time (µs) of each conv named oxkconvN, per model, from onnxruntime's own
    profiler; the models run interleaved so that drift hits them alike."""
    with tempfile.TemporaryDirectory(prefix="onnxpress-convk-") as tmp:
        sessions = [timing_session(model, threads, os.path.join(tmp, f"m{k}"))
                    for k, model in enumerate(models)]
        for s in sessions:
            for _ in range(2):
                s.run(None, feeds)
        for _ in range(rounds):
            for s in sessions:
                for _ in range(runs):
                    s.run(None, feeds)
        out = []
        for s in sessions:
            with open(s.end_profiling()) as f:
                events = json.load(f)
            times: dict[int, list[float]] = collections.defaultdict(list)
            for e in events:
                name = e.get("name", "")
                if e.get("cat") != "Node" or not name.endswith("_kernel_time"):
                    continue
                hit = _NAME_RE.match(name[:-len("_kernel_time")])
                if hit:
                    times[int(hit.group(1))].append(float(e["dur"]))
            # the warm-up runs are in the profile too: the median of all runs skips them
            out.append({k: float(np.median(v)) for k, v in times.items()})
    return out


def choose_conv_kernels(model: onnx.ModelProto, feeds: dict, *, threads: int = 2,
                        gain: float = 0.95, margin: float = 0.98
                        ) -> tuple[onnx.ModelProto, dict]:
    """(model, figures): each eligible int8 Conv in the form onnxruntime runs faster here.
    A conv moves to the GEMM form when its kernel time in that form is at most `gain` of the
    symmetric one at 1 thread and at `threads`; the mixed model is kept when it then runs at
    most `margin` of the symmetric model's time (relative_costs: CPU at 1 thread and wall at
    `threads`, both)."""
    from onnxpress.passes.quant.latency import relative_costs

    convs = candidates(model)
    figures: dict = {"conv_kernels_eligible": len(convs), "conv_kernels_gemm": 0}
    if not convs:
        return model, figures
    named = onnx.ModelProto()
    named.CopyFrom(model)
    for k, i in enumerate(convs):
        named.graph.node[i].name = _NAME.format(k)
    gemm = to_gemm_form(named, convs)
    faster = None
    for th in sorted({1, threads}):
        sym, alt = node_times([named, gemm], feeds, th)
        picked = {k for k in range(len(convs))
                  if k in sym and k in alt and alt[k] <= gain * sym[k]}
        faster = picked if faster is None else faster & picked
    if not faster:
        figures["conv_kernel_choice"] = "every int8 conv runs onnxruntime's symmetric kernel " \
                                        "(the GEMM form was not faster here)"
        return model, figures
    chosen = sorted(convs[k] for k in faster)
    keys = [node_key(model.graph.node[i]) for i in chosen]
    mixed = to_gemm_form(model, chosen)
    cost = relative_costs([model, mixed], feeds, threads=threads)[0][1]
    if cost > margin:
        figures["conv_kernel_choice"] = (
            f"kept onnxruntime's symmetric kernel for every conv: the {len(chosen)} convs whose "
            f"GEMM form was faster alone ran the model at {cost:.2f}x its time together")
        return model, figures
    figures.update(conv_kernels_gemm=len(chosen), conv_kernels_speedup=round(1 / cost, 3),
                   conv_kernels_gemm_layers=keys,
                   conv_kernel_choice=(
                       f"{len(chosen)} of {len(convs)} int8 convs run onnxruntime's integer GEMM "
                       f"(weight zero point -1, the same values), faster here than its symmetric "
                       f"kernel: the model at {cost:.2f}x the time"))
    return mixed, figures


def apply_choice(model: onnx.ModelProto, choice: str, feeds: dict, *, measure: bool
                 ) -> tuple[onnx.ModelProto, dict]:
    """The pass option conv_kernel: "auto" measures (when `measure`: latency_aware on
    onnxruntime) or keeps the symmetric form, "symmetric" keeps it, "gemm" moves every eligible
    conv without measuring (for a deployment CPU known to run the GEMM faster: one with AMX).
    The figures' conv_kernels_gemm_layers name the convs moved."""
    if choice == "gemm":
        convs = candidates(model)
        return to_gemm_form(model, convs), {
            "conv_kernels_eligible": len(convs), "conv_kernels_gemm": len(convs),
            "conv_kernels_gemm_layers": [node_key(model.graph.node[i]) for i in convs],
            "conv_kernel_choice": f"{len(convs)} int8 convs in the GEMM form (conv_kernel=gemm)"}
    if choice == "auto" and measure:
        return choose_conv_kernels(model, feeds)
    return model, {}
