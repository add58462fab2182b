"""Scale: time and peak memory of `cleanup,fuse,quant_dynamic,reuse` on generated BERT-style
encoders of growing depth (random float32 weights, stored as external data).

    python -m bench --only scale            # 6, 12, 24 layers at hidden 1536 (24 layers: ~2.7 GB)
    python -m bench --only scale --quick    # 2, 4, 8 layers at hidden 384

Each encoder layer is written out as an exporter writes it: Q/K/V/output projections as
MatMul+Add, attention with Reshape/Transpose/Softmax, LayerNorm as ReduceMean/Sub/Pow/Sqrt/Div,
GELU as Div/Erf/Add/Mul, FFN 4x hidden. The weights are written straight to the external data
file one tensor at a time, so generating a 2.7 GB model never holds it in memory.

Each model goes through the pipeline in a fresh subprocess (load from the file, run the passes,
save), which reports its own peak RSS (VmHWM: getrusage's ru_maxrss would count the parent's
memory that the child was forked from, up to the exec): the figure a user sees for
`onnxpress optimize`. Time per node is the pipeline's time over the input model's node count.
The smallest model's output is compared with the original's on onnxruntime (cosine).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

ROOT = Path(__file__).resolve().parent.parent
PIPELINE = "cleanup,fuse,quant_dynamic,reuse"
FULL = {"layers": (6, 12, 24), "hidden": 1536}
QUICK = {"layers": (2, 4, 8), "hidden": 384}
BATCH, SEQ = 1, 128


class _Writer:
    """Initializers whose bytes go straight to one external data file."""

    def __init__(self, directory: Path, data_name: str, seed: int):
        self.data_name = data_name
        self.f = open(directory / data_name, "wb")
        self.rng = np.random.default_rng(seed)
        self.inits: list[TensorProto] = []
        self.params = 0

    def external(self, name: str, shape: tuple[int, ...], std: float = 0.02,
                 mean: float = 0.0) -> str:
        arr = (self.rng.standard_normal(shape, dtype=np.float32) * np.float32(std)
               + np.float32(mean))
        offset = self.f.tell()
        pad = (-offset) % 4096          # onnxruntime maps aligned offsets
        if pad:
            self.f.write(b"\0" * pad)
            offset += pad
        data = arr.tobytes()
        self.f.write(data)
        t = TensorProto(name=name, data_type=TensorProto.FLOAT, dims=list(shape))
        t.data_location = TensorProto.EXTERNAL
        for k, v in (("location", self.data_name), ("offset", str(offset)), ("length", str(len(data)))):
            e = t.external_data.add()
            e.key, e.value = k, v
        self.inits.append(t)
        self.params += arr.size
        return name

    def const(self, name: str, values, dtype=np.int64) -> str:
        self.inits.append(onnx.numpy_helper.from_array(np.asarray(values, dtype), name))
        return name

    def close(self) -> None:
        self.f.close()


def make_encoder(path: str | os.PathLike, layers: int, hidden: int, *, seed: int = 0) -> dict:
    """Write a BERT-style encoder (input x [batch, seq, hidden] -> y) to `path`, its weights to
    `<name>.data` beside it. Returns {"params", "nodes", "bytes"} (bytes: .onnx + .data)."""
    path = Path(path)
    heads = max(1, hidden // 64)
    dh = hidden // heads
    w = _Writer(path.parent, path.name + ".data", seed)
    nodes: list[onnx.NodeProto] = []

    def node(op, inputs, name, **attrs):
        out = f"{name}_out"
        nodes.append(helper.make_node(op, inputs, [out], name=name, **attrs))
        return out

    def linear(x, k, n, name):
        y = node("MatMul", [x, w.external(f"{name}.weight", (k, n))], f"{name}/MatMul")
        return node("Add", [y, w.external(f"{name}.bias", (n,))], f"{name}/Add")

    def layernorm(x, name):
        mean = node("ReduceMean", [x], f"{name}/ReduceMean", axes=[-1])
        d = node("Sub", [x, mean], f"{name}/Sub")
        sq = node("Pow", [d, w.const(f"{name}.two", 2.0, np.float32)], f"{name}/Pow")
        var = node("ReduceMean", [sq], f"{name}/ReduceMean_1", axes=[-1])
        std = node("Sqrt", [node("Add", [var, w.const(f"{name}.eps", 1e-5, np.float32)],
                                 f"{name}/Add")], f"{name}/Sqrt")
        y = node("Div", [d, std], f"{name}/Div")
        y = node("Mul", [y, w.external(f"{name}.weight", (hidden,), 0.02, 1.0)], f"{name}/Mul")
        return node("Add", [y, w.external(f"{name}.bias", (hidden,))], f"{name}/Add_1")

    def gelu(x, name):
        e = node("Erf", [node("Div", [x, w.const(f"{name}.sqrt2", 1.4142135, np.float32)],
                              f"{name}/Div")], f"{name}/Erf")
        h = node("Mul", [x, node("Add", [e, w.const(f"{name}.one", 1.0, np.float32)],
                                 f"{name}/Add")], f"{name}/Mul")
        return node("Mul", [h, w.const(f"{name}.half", 0.5, np.float32)], f"{name}/Mul_1")

    split = w.const("shape.heads", [0, 0, heads, dh])
    merge = w.const("shape.hidden", [0, 0, hidden])
    x = "x"
    for i in range(layers):
        p = f"layer{i}"

        def heads_of(t, name, perm=(0, 2, 1, 3)):
            return node("Transpose", [node("Reshape", [t, split], f"{name}/Reshape")],
                        f"{name}/Transpose", perm=list(perm))

        q = heads_of(linear(x, hidden, hidden, f"{p}.attn.q"), f"{p}.attn.q")
        k = heads_of(linear(x, hidden, hidden, f"{p}.attn.k"), f"{p}.attn.k", (0, 2, 3, 1))
        v = heads_of(linear(x, hidden, hidden, f"{p}.attn.v"), f"{p}.attn.v")
        s = node("MatMul", [q, k], f"{p}.attn/MatMul")
        s = node("Div", [s, w.const(f"{p}.attn.scale", float(np.sqrt(dh)), np.float32)],
                 f"{p}.attn/Div")
        a = node("Softmax", [s], f"{p}.attn/Softmax", axis=-1)
        c = node("MatMul", [a, v], f"{p}.attn/MatMul_1")
        c = node("Transpose", [c], f"{p}.attn/Transpose", perm=[0, 2, 1, 3])
        c = node("Reshape", [c, merge], f"{p}.attn/Reshape")
        o = linear(c, hidden, hidden, f"{p}.attn.out")
        x = layernorm(node("Add", [o, x], f"{p}.attn/residual"), f"{p}.ln1")
        f = gelu(linear(x, hidden, 4 * hidden, f"{p}.ffn.up"), f"{p}.ffn.gelu")
        f = linear(f, 4 * hidden, hidden, f"{p}.ffn.down")
        x = layernorm(node("Add", [f, x], f"{p}.ffn/residual"), f"{p}.ln2")
    nodes.append(helper.make_node("Identity", [x], ["y"], name="output"))
    w.close()
    graph = helper.make_graph(
        nodes, f"encoder_{layers}x{hidden}",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", hidden])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq", hidden])],
        initializer=w.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)],
                              producer_name="onnxpress bench_scale")
    model.ir_version = 8
    path.write_bytes(model.SerializeToString())
    size = path.stat().st_size + (path.parent / w.data_name).stat().st_size
    return {"params": w.params, "nodes": len(nodes), "bytes": size}


# the pipeline in a fresh process: its peak RSS is what `onnxpress optimize` would need
_CHILD = r"""
import json, resource, sys, time
t0 = time.perf_counter()


def peak_rss():
    try:
        with open("/proc/self/status") as f:
            return next(int(ln.split()[1]) * 1024 for ln in f if ln.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


from onnxpress import io, passes
# what the passes import on first use, imported before the baseline is taken
import onnx_graphsurgeon, onnxruntime, onnxscript
passes.parse_pipeline(sys.argv[3])
src, dst, spec, dims = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
with open("/proc/self/statm") as f:
    base_rss = int(f.read().split()[1]) * resource.getpagesize()
t1 = time.perf_counter()
model = io.load(src)
t2 = time.perf_counter()
result = passes.run(model, spec, shapes=dims, inplace=True)
t3 = time.perf_counter()
del model
io.save(result.model, dst)
t4 = time.perf_counter()
print("RESULT " + json.dumps({
    "import_s": t1 - t0, "load_s": t2 - t1, "passes_s": t3 - t2, "save_s": t4 - t3,
    "per_pass_s": {r.name: round(r.seconds, 3) for r in result.reports},
    "nodes_out": result.reports[-1].nodes_after,
    "peak_rss": peak_rss(), "base_rss": base_rss}))
"""


def run_pipeline(src: Path, dst: Path, spec: str = PIPELINE, dims: dict | None = None,
                 timeout: float = 3600) -> dict:
    """Run `spec` on the model at `src` in a subprocess, save to `dst`; timings and peak RSS."""
    dims = dims or {"batch": BATCH, "seq": SEQ}
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", _CHILD, str(src), str(dst), spec, json.dumps(dims)],
                          capture_output=True, text=True, timeout=timeout, env=env, cwd=str(ROOT))
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        raise RuntimeError(f"pipeline on {src.name} failed (rc {proc.returncode}): " + " | ".join(tail))
    return json.loads(lines[-1][len("RESULT "):])


def output_cosine(original: Path, processed: Path, hidden: int, seed: int = 0) -> float:
    """Cosine between the original's and the processed model's outputs on one random input."""
    import onnxruntime as rt

    x = np.random.default_rng(seed).standard_normal((BATCH, SEQ, hidden), dtype=np.float32)
    so = rt.SessionOptions()
    so.log_severity_level = 3
    so.intra_op_num_threads = 2
    outs = [rt.InferenceSession(str(p), so, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
            for p in (original, processed)]
    a, b = (o.astype(np.float64).ravel() for o in outs)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-30))


def measure(layers: int, hidden: int, directory: Path, *, check: bool = False) -> dict:
    src = directory / f"encoder_{layers}x{hidden}.onnx"
    dst = directory / f"encoder_{layers}x{hidden}.opt.onnx"
    t0 = time.perf_counter()
    made = make_encoder(src, layers, hidden, seed=layers)
    gen_s = time.perf_counter() - t0
    r = run_pipeline(src, dst)
    out_bytes = sum(p.stat().st_size for p in directory.glob(dst.name + "*"))
    row = {"layers": layers, "hidden": hidden, "params": made["params"], "model_bytes": made["bytes"],
           "nodes": made["nodes"], "nodes_out": r["nodes_out"],
           "passes_s": round(r["passes_s"], 2), "ms_per_node": round(1e3 * r["passes_s"] / made["nodes"], 3),
           "load_s": round(r["load_s"], 2), "save_s": round(r["save_s"], 2),
           "peak_rss": r["peak_rss"], "rss_per_model_byte": round(r["peak_rss"] / made["bytes"], 3),
           "base_rss": r["base_rss"],
           "rss_over_base_per_model_byte": round((r["peak_rss"] - r["base_rss"]) / made["bytes"], 3),
           "out_bytes": out_bytes, "per_pass_s": r["per_pass_s"], "generate_s": round(gen_s, 1)}
    if check:
        row["cosine"] = round(output_cosine(src, dst, hidden), 6)
    for p in list(directory.glob(src.name + "*")) + list(directory.glob(dst.name + "*")):
        p.unlink()
    return row


def run(quick: bool = False) -> dict:
    cfg = QUICK if quick else FULL
    rows = []
    with tempfile.TemporaryDirectory(prefix="onnxpress-scale-") as tmp:
        for i, layers in enumerate(cfg["layers"]):
            rows.append(measure(layers, cfg["hidden"], Path(tmp), check=quick or i == 0))
            print(json.dumps(rows[-1]), flush=True)
    base = rows[0]["ms_per_node"]
    for r in rows:
        r["ms_per_node_vs_smallest"] = round(r["ms_per_node"] / base, 3)
    return {"title": f"Scale: `{PIPELINE}` on generated encoders, hidden {cfg['hidden']}",
            "rows": rows,
            "notes": (f"BERT-style encoders with random weights stored as external data, input "
                      f"[{BATCH}, {SEQ}, hidden]. Each model is loaded, run through the pipeline and "
                      "saved in a fresh process; peak_rss is that process's peak resident memory "
                      "(VmHWM), base_rss its resident memory once its libraries are imported; "
                      "ms_per_node is "
                      "passes_s over the input's node count; cosine compares the smallest model's "
                      "output with the original on onnxruntime.")}


if __name__ == "__main__":
    print(json.dumps(run(quick="--full" not in sys.argv), indent=2))
