"""Integer lowering of quantized ONNX models for TVM.

TVM's ONNX importer turns QuantizeLinear/DequantizeLinear into float arithmetic (dequantize,
float conv, quantize), so a QDQ model computes in float. Before import, `lower_integer` rewrites
the ONNX graph so that quantized tensors stay uint8/int8 from one quantized op to the next and
the heavy ops run on integer kernels:

    DQ(x u8) , DQ(W i8 per-channel) , DQ(b i32) -> Conv/MatMul/Gemm [-> Relu/Clip] -> Q(y)
        ==>  onnxpress.int8.QConv / QMatMul (x u8, W i8, b)  -> y u8
             relax: conv2d/matmul(u8 x i8, out_dtype int32) + int32 bias
                    -> requantize in float32: round_half_even(float(acc) * (xs*ws/ys)) + zy, clip
    DQ(a), DQ(b) -> Add [-> Relu/Clip] -> Q          ==>  QAdd (requantized in float32)
    DQ(x) -> Relu/Clip -> Q                          ==>  QRequant (a clamp when params agree)
    DQ(x) -> MaxPool/Reshape/Flatten/Transpose/Squeeze/Unsqueeze/Identity -> Q(same params)
                                                     ==>  the same op on the integer tensor
    DQ(x) -> GlobalAveragePool/AveragePool -> Q      ==>  QPool (integer in, integer out)
    QLinearConv, QLinearMatMul, ConvInteger, MatMulInteger (QOperator models) go through the
    same QConv/QMatMul converters.

Requantization uses a float32 scale and round-half-to-even, not a fixed-point multiplier and
shift: onnxruntime's QLinearConv requantizes in float with nearbyint too, multiplying by one
folded scale xs*ws/ys per channel, and so does this (fixed-point differs by one step wherever
the product lands near .5). The QDQ reference (DequantizeLinear, float op, QuantizeLinear)
divides by ys instead; a divide costs about eight multiplies per output element, which on convs
with few input channels was more than the dot products, so outputs may sit one step from the
reference where the two round apart (the share the tests bound and the bench reports). Every
CPU target here has a float unit.

The private nodes (domain `onnxpress.int8`) exist only between this rewrite and TVM's importer,
where `integer_converters()` adds their converters. Nodes that cannot become integer stay float;
`lower_integer` says which and why (the artifact's manifest records it).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections import defaultdict

import numpy as np
import onnx
from onnx import helper, numpy_helper

DOMAIN = "onnxpress.int8"
INT_TYPES = (np.uint8, np.int8)
SHAPE_OPS = ("MaxPool", "Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze", "Identity")
CLAMP_OPS = ("Relu", "Clip")
QOPERATOR_OPS = ("QLinearConv", "QLinearMatMul", "ConvInteger", "MatMulInteger")


@dataclasses.dataclass(frozen=True)
class QParam:
    scale: float          # float32 value
    zp: int
    dtype: str            # "uint8" | "int8"

    @property
    def qmin(self) -> int:
        return 0 if self.dtype == "uint8" else -128

    @property
    def qmax(self) -> int:
        return 255 if self.dtype == "uint8" else 127


@dataclasses.dataclass
class Decision:
    node: str
    op: str
    kernel: str           # "int8" (integer kernel), "int8-io" (integer in and out), "float"
    reason: str = ""

    def to_dict(self) -> dict:
        d = {"node": self.node, "op": self.op, "kernel": self.kernel}
        if self.reason:
            d["reason"] = self.reason
        return d


def _attr(node: onnx.NodeProto, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


class _Graph:
    def __init__(self, model: onnx.ModelProto):
        self.model = model
        g = model.graph
        self.consts = {t.name: numpy_helper.to_array(t) for t in g.initializer}
        for n in g.node:
            if n.op_type == "Constant" and n.output:
                with contextlib.suppress(Exception):
                    self.consts[n.output[0]] = numpy_helper.to_array(_attr(n, "value"))
        self.producer = {o: n for n in g.node for o in n.output}
        self.consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
        for n in g.node:
            for i in n.input:
                if i:
                    self.consumers[i].append(n)
        self.graph_outputs = {o.name for o in g.output}
        self.names = {o for n in g.node for o in n.output} | set(self.consts) | {i.name for i in g.input}

    def fresh(self, base: str) -> str:
        name, k = base, 0
        while name in self.names:
            k += 1
            name = f"{base}_{k}"
        self.names.add(name)
        return name

    def scalar_qparam(self, scale: str, zp: str | None, dtype_hint=np.uint8) -> QParam | None:
        s = self.consts.get(scale)
        if s is None or s.size != 1 or s.dtype != np.float32:
            return None
        if zp:
            z = self.consts.get(zp)
            if z is None or z.size != 1 or z.dtype.type not in INT_TYPES:
                return None
            return QParam(float(s.reshape(())), int(z.reshape(())), np.dtype(z.dtype).name)
        return QParam(float(s.reshape(())), 0, np.dtype(dtype_hint).name)


def _q_of(gr: _Graph, node: onnx.NodeProto) -> QParam | None:
    """Per-tensor params of a QuantizeLinear / DequantizeLinear node (None: per-channel, blocked,
    dynamic or not 8-bit)."""
    if _attr(node, "block_size", 0):
        return None
    zp = node.input[2] if len(node.input) > 2 else None
    return gr.scalar_qparam(node.input[1], zp)


def _dq_activation(gr: _Graph, tensor: str):
    """(the integer tensor, its params) when `tensor` = DequantizeLinear(integer tensor, per-tensor)."""
    n = gr.producer.get(tensor)
    if n is None or n.op_type != "DequantizeLinear" or n.input[0] in gr.consts:
        return None
    qp = _q_of(gr, n)
    return (n.input[0], qp) if qp is not None else None


def _zero_centred(q: np.ndarray, zp: np.ndarray, axis: int) -> np.ndarray | None:
    """The integer weights with their zero point subtracted, when that is exact in 8 bits (the
    kernels take zero point 0): q itself for zero point 0; q - zp as int8 for others, e.g.
    onnxruntime's GEMM form (weights - 1, zero point -1) or uint8 weights around 128; None when
    the difference does not fit int8."""
    if not np.any(zp != 0):
        return q
    z = zp.astype(np.int16)
    if z.size > 1:
        shape = [1] * q.ndim
        shape[axis % q.ndim] = z.size
        z = z.reshape(shape)
    d = q.astype(np.int16) - z
    if d.min() < -128 or d.max() > 127:
        return None
    return d.astype(np.int8)


def _dq_const(gr: _Graph, tensor: str):
    """(integer array, float32 scale array, zero point array, axis) when `tensor` =
    DequantizeLinear(constant)."""
    n = gr.producer.get(tensor)
    if n is None or n.op_type != "DequantizeLinear" or n.input[0] not in gr.consts:
        return None
    if _attr(n, "block_size", 0):
        return None
    q = gr.consts[n.input[0]]
    s = gr.consts.get(n.input[1])
    z = gr.consts.get(n.input[2]) if len(n.input) > 2 and n.input[2] else np.zeros((), q.dtype)
    if s is None or z is None or s.dtype != np.float32:
        return None
    return q, s, z, int(_attr(n, "axis", 1))


def _out_q(gr: _Graph, tensor: str):
    """(params, the Q nodes) when every consumer of `tensor` is a QuantizeLinear with the same
    per-tensor params and the tensor is not a graph output; else None."""
    if tensor in gr.graph_outputs:
        return None
    cons = gr.consumers.get(tensor, [])
    if not cons or any(c.op_type != "QuantizeLinear" for c in cons):
        return None
    params = {_q_of(gr, c) for c in cons}
    if len(params) != 1 or None in params:
        return None
    return params.pop(), cons


def _clamp_bounds(gr: _Graph, node: onnx.NodeProto) -> tuple[float, float] | None:
    """Float bounds of a Relu / Clip node (None: bounds not constant)."""
    if node.op_type == "Relu":
        return 0.0, float("inf")
    lo, hi = _attr(node, "min", float("-inf")), _attr(node, "max", float("inf"))
    if len(node.input) > 1 and node.input[1]:
        if node.input[1] not in gr.consts:
            return None
        lo = float(gr.consts[node.input[1]])
    if len(node.input) > 2 and node.input[2]:
        if node.input[2] not in gr.consts:
            return None
        hi = float(gr.consts[node.input[2]])
    return float(lo), float(hi)


def _q_bounds(qp: QParam, clamp: tuple[float, float] | None) -> tuple[int, int]:
    """Integer output bounds: the dtype's range, narrowed by a Relu/Clip folded before Q.
    Q(clip(y, lo, hi)) = clip(Q(y), Q(lo), Q(hi)) since Q is monotonic."""
    lo, hi = qp.qmin, qp.qmax
    if clamp is not None:
        s = np.float32(qp.scale)
        if np.isfinite(clamp[0]):
            lo = max(lo, int(np.clip(np.rint(np.float32(clamp[0]) / s) + qp.zp, qp.qmin, qp.qmax)))
        if np.isfinite(clamp[1]):
            hi = min(hi, int(np.clip(np.rint(np.float32(clamp[1]) / s) + qp.zp, qp.qmin, qp.qmax)))
    return lo, hi


def _output_target(gr: _Graph, node: onnx.NodeProto):
    """Where `node`'s result goes: ("q", params, clamp, Q nodes, clamp node) when it is quantized
    (optionally through one Relu/Clip), ("float", None, None, [], None) when it goes on in float."""
    out = node.output[0]
    found = _out_q(gr, out)
    if found is not None:
        return "q", found[0], None, found[1], None
    cons = gr.consumers.get(out, [])
    if len(cons) == 1 and cons[0].op_type in CLAMP_OPS and out not in gr.graph_outputs:
        clamp = _clamp_bounds(gr, cons[0])
        found = _out_q(gr, cons[0].output[0])
        if clamp is not None and found is not None:
            return "q", found[0], clamp, found[1], cons[0]
    return "float", None, None, [], None


class _Rewriter:
    def __init__(self, model: onnx.ModelProto, isa: tuple[str, int] | None = None):
        self.isa = isa
        self.gr = _Graph(model)
        self.decisions: list[Decision] = []
        self.replaced: dict[int, list[onnx.NodeProto]] = {}   # id(node) -> its replacement
        self.dropped: set[int] = set()                          # Q / Relu nodes folded in
        self.new_inits: list[onnx.TensorProto] = []

    def const(self, arr: np.ndarray, base: str) -> str:
        name = self.gr.fresh(base)
        self.new_inits.append(numpy_helper.from_array(np.ascontiguousarray(arr), name))
        self.gr.consts[name] = arr
        return name

    def decide(self, node, kernel, reason=""):
        self.decisions.append(Decision(node.name or node.output[0], node.op_type, kernel, reason))

    # -- output plumbing -------------------------------------------------------------------------
    def _finish(self, node, new_nodes, target):
        """Point the integer result at the Q node's output; drop the Q (and folded clamp) nodes."""
        kind, _qp, _clamp, qnodes, clamp_node = target
        if kind == "q":
            out = qnodes[0].output[0]
            new_nodes[-1].output[0] = out
            for q in qnodes[1:]:     # several identical Q nodes: identities of the first
                new_nodes.append(helper.make_node("Identity", [out], [q.output[0]]))
            for q in qnodes:
                self.dropped.add(id(q))
            if clamp_node is not None:
                self.dropped.add(id(clamp_node))
        else:
            new_nodes[-1].output[0] = node.output[0]
        self.replaced[id(node)] = new_nodes

    def _out_attrs(self, target) -> dict:
        kind, qp, clamp, _q, _c = target
        if kind != "q":
            return {"out_float": 1}
        lo, hi = _q_bounds(qp, clamp)
        return {"y_scale": qp.scale, "y_zero_point": qp.zp, "y_dtype": qp.dtype, "y_min": lo, "y_max": hi}

    # -- ops -------------------------------------------------------------------------------------
    def conv_like(self, node) -> str | None:
        """Conv / MatMul / Gemm in QDQ form -> QConv / QMatMul. Returns the reason when not."""
        gr = self.gr
        x = _dq_activation(gr, node.input[0])
        if x is None:
            wp = gr.producer.get(node.input[1]) if len(node.input) > 1 else None
            if wp is None or wp.op_type != "DequantizeLinear":
                dw = node.op_type == "Conv" and int(_attr(node, "group", 1)) > 1
                return ("not quantized in the model: float " + ("depthwise/grouped conv" if dw else "layer")
                        + " (quant_int8 keeps depthwise convs float unless depthwise=true)" * dw)
            return "input is not a per-tensor dequantized 8-bit tensor"
        w = _dq_const(gr, node.input[1]) if len(node.input) > 1 else None
        if w is None:
            if node.op_type == "MatMul":
                b = _dq_activation(gr, node.input[1])
                if b is not None:
                    return self._matmul_act(node, x, b)
            return "weight is not a dequantized 8-bit constant"
        wq, ws, wz, axis = w
        if wq.dtype.type not in INT_TYPES:
            return f"weight is {wq.dtype}, not 8-bit"
        wq = _zero_centred(wq, wz, axis)
        if wq is None:
            return "weight zero point is not 0 (and the weights minus it do not fit int8)"
        bias = None
        if len(node.input) > 2 and node.input[2]:
            bias = self._bias(node.input[2])
            if bias is None:
                return "bias is neither a constant nor a dequantized int32 constant"
        target = _output_target(gr, node)
        xq, xp = x
        attrs = {"x_scale": xp.scale, "x_zero_point": xp.zp, **self._out_attrs(target)}
        if node.op_type == "Conv":
            if wq.ndim != 4:
                return f"{wq.ndim - 2}-d convolution (only 2-d is lowered)"
            if ws.size not in (1, wq.shape[0]) or (ws.size > 1 and axis != 0):
                return "weight scale is neither per-tensor nor per-output-channel"
            if _attr(node, "auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
                return "auto_pad is not lowered"
            scales = np.broadcast_to(ws.reshape(-1), (wq.shape[0],)).astype(np.float32)
            inputs = [xq, self.const(wq, node.input[1] + "_i8"), self.const(scales, node.input[1] + "_ws")]
            for k in ("strides", "pads", "dilations", "group"):
                v = _attr(node, k)
                if v is not None:
                    attrs[k] = v
            op = "QConv"
            why_float = self._float_conv_reason(wq, int(_attr(node, "group", 1)))
            if why_float:
                attrs["float_kernel"] = 1
        else:
            if node.op_type == "Gemm":
                if _attr(node, "transA", 0):
                    return "Gemm with transA is not lowered"
                if _attr(node, "transB", 0):
                    wq = wq.T
                    axis = 1 if axis == 0 else 0
                alpha = float(_attr(node, "alpha", 1.0))
                beta = float(_attr(node, "beta", 1.0))
                if bias is not None and (beta != 1.0 or alpha != 1.0):
                    # alpha * (x @ W) + beta * C: a bias folded into the int32 accumulator
                    # would be scaled by alpha too, so it is added in float after the scale
                    kind, arr, bscale = bias
                    f = arr.astype(np.float32) * (bscale if kind == "int" else np.float32(1))
                    bias = ("float", f * np.float32(beta), None)
                attrs["alpha"] = alpha
            if wq.ndim != 2:
                return f"{wq.ndim}-d constant weight (only 2-d is lowered)"
            if ws.size not in (1, wq.shape[1]) or (ws.size > 1 and axis not in (1, -1)):
                return "weight scale is neither per-tensor nor per-column"
            scales = np.broadcast_to(ws.reshape(-1), (wq.shape[1],)).astype(np.float32)
            inputs = [xq, self.const(np.ascontiguousarray(wq), node.input[1] + "_i8"),
                      self.const(scales, node.input[1] + "_ws")]
            op = "QMatMul"
            why_float = self._float_matmul_reason(wq)
            if why_float:
                attrs["float_kernel"] = 1
        if bias is not None:
            kind, arr, bscale = bias
            if kind == "int":
                # the reference adds bq * bias_scale; fold it into the int32 accumulator when
                # bias_scale is exactly x_scale * w_scale (what quant_int8 writes), else in float
                expected = (np.float32(xp.scale) * scales).astype(np.float32)
                if np.array_equal(np.broadcast_to(bscale.reshape(-1), expected.shape), expected):
                    inputs.append(self.const(arr.astype(np.int32).reshape(-1), node.input[2] + "_i32"))
                else:
                    inputs.append(self.const(arr.astype(np.float32) * bscale, node.input[2] + "_f"))
            else:
                inputs.append(self.const(arr.astype(np.float32).reshape(-1), node.input[2] + "_f"))
        self._finish(node, [helper.make_node(op, inputs, [self.gr.fresh(node.output[0] + "_i")],
                                             name=node.name, domain=DOMAIN, **attrs)], target)
        out = "float output" if target[0] == "float" else f"{target[1].dtype} output"
        if why_float:
            what = "conv" if op == "QConv" else "matmul"
            self.decide(node, "int8-io", f"float {what} between 8-bit tensors: {why_float}")
        else:
            group = int(_attr(node, "group", 1)) if op == "QConv" else 1
            self.decide(node, "int8", f"integer kernel ({self._kernel_name(op, wq, group)}), {out}")
        return None

    def _float_conv_reason(self, wq: np.ndarray, group: int) -> str:
        """Why a convolution is better computed in float on this target ('' = integer kernel)."""
        from .int8_kernels import lanes_for, needs_pair_limit, pairs_fit_pmaddubsw

        if self.isa is None or group != 1:
            return ""
        isa, lanes = self.isa
        oc = wq.shape[0]
        if lanes_for(self.isa, oc) is None:
            fewest = lanes // 2 if isa.startswith("avx512") else lanes
            return (f"{oc} output channels are not a multiple of {fewest} ({isa}'s dot product; "
                    "the generic integer conv is slower than float here)")
        if needs_pair_limit(isa) and not pairs_fit_pmaddubsw(wq):
            return (f"{isa} has no VNNI and vpmaddubsw would saturate on these weights "
                    "(|w0|+|w1| > 128 for adjacent input channels; 7-bit weights fit)")
        return ""

    def _float_matmul_reason(self, wq: np.ndarray) -> str:
        """Why a constant-weight matmul is better computed in float ('' = integer kernel): only
        where the packed dot product would take it and vpmaddubsw would saturate."""
        from .int8_kernels import lanes_for, needs_pair_limit, pairs_fit_pmaddubsw

        if self.isa is None or wq.ndim != 2 or lanes_for(self.isa, wq.shape[1]) is None:
            return ""
        if needs_pair_limit(self.isa[0]) and not pairs_fit_pmaddubsw(wq.T):
            return (f"{self.isa[0]} has no VNNI and vpmaddubsw would saturate on these weights "
                    "(|w0|+|w1| > 128 for adjacent rows; 7-bit weights fit)")
        return ""

    def _kernel_name(self, op: str, wq: np.ndarray, group: int = 1) -> str:
        from .int8_kernels import lanes_for

        if op == "QConv" and wq.ndim == 4 and group == 1 and lanes_for(self.isa, wq.shape[0]):
            return f"{self.isa[0]} dot product, {lanes_for(self.isa, wq.shape[0])} lanes"
        if op == "QMatMul" and wq.ndim == 2 and lanes_for(self.isa, wq.shape[1]):
            return f"{self.isa[0]} dot product, {lanes_for(self.isa, wq.shape[1])} lanes"
        if op == "QConv" and group > 1:
            return f"generic, {group} groups"
        return "generic"

    def _matmul_act(self, node, a, b) -> str | None:
        """MatMul of two quantized activations (attention scores)."""
        target = _output_target(self.gr, node)
        attrs = {"x_scale": a[1].scale, "x_zero_point": a[1].zp, "b_scale": b[1].scale,
                 "b_zero_point": b[1].zp, **self._out_attrs(target)}
        self._finish(node, [helper.make_node("QMatMul", [a[0], b[0]], [self.gr.fresh(node.output[0] + "_i")],
                                             name=node.name, domain=DOMAIN, **attrs)], target)
        self.decide(node, "int8", "integer kernel, two quantized activations")
        return None

    def _bias(self, tensor: str):
        gr = self.gr
        if tensor in gr.consts:
            return "float", gr.consts[tensor].astype(np.float32), None
        d = _dq_const(gr, tensor)
        if d is None:
            return None
        q, s, z, _axis = d
        if q.dtype != np.int32 or np.any(z != 0):
            return None
        return "int", q, s.astype(np.float32)

    def add(self, node) -> str | None:
        gr = self.gr
        ins = [_dq_activation(gr, i) for i in node.input]
        if any(i is None for i in ins) or len(ins) != 2:
            return "an input is not a per-tensor dequantized 8-bit tensor"
        target = _output_target(gr, node)
        if target[0] != "q":
            return "result is not quantized"
        (a, ap), (b, bp) = ins
        attrs = {"a_scale": ap.scale, "a_zero_point": ap.zp, "b_scale": bp.scale,
                 "b_zero_point": bp.zp, **self._out_attrs(target)}
        self._finish(node, [helper.make_node("QAdd", [a, b], [gr.fresh(node.output[0] + "_i")],
                                             name=node.name, domain=DOMAIN, **attrs)], target)
        self.decide(node, "int8-io", "requantized add")
        return None

    def clamp(self, node) -> str | None:
        gr = self.gr
        x = _dq_activation(gr, node.input[0])
        if x is None:
            return "input is not a per-tensor dequantized 8-bit tensor"
        bounds = _clamp_bounds(gr, node)
        target = _output_target(gr, node)
        if bounds is None or target[0] != "q":
            return "bounds not constant" if bounds is None else "result is not quantized"
        target = ("q", target[1], bounds, target[3], None)
        attrs = {"x_scale": x[1].scale, "x_zero_point": x[1].zp, **self._out_attrs(target)}
        self._finish(node, [helper.make_node("QRequant", [x[0]], [gr.fresh(node.output[0] + "_i")],
                                             name=node.name, domain=DOMAIN, **attrs)], target)
        self.decide(node, "int8-io", "clamp in the integer domain")
        return None

    def shape_op(self, node) -> str | None:
        gr = self.gr
        x = _dq_activation(gr, node.input[0])
        if x is None:
            return "input is not a per-tensor dequantized 8-bit tensor"
        if any(i in gr.producer and gr.producer[i].op_type == "DequantizeLinear" for i in node.input[1:]):
            return "a second input is dequantized"
        if len(node.output) != 1 or (node.op_type == "MaxPool" and len(node.output) > 1):
            return "more than one output"
        target = _output_target(gr, node)
        if target[0] != "q":
            return "result is not quantized"
        xq, xp = x
        same = (target[1] == xp and target[2] is None)
        copy = helper.make_node(node.op_type, [xq, *node.input[1:]],
                                [gr.fresh(node.output[0] + "_i")], name=node.name)
        copy.attribute.extend(node.attribute)
        nodes = [copy]
        if not same:
            attrs = {"x_scale": xp.scale, "x_zero_point": xp.zp, **self._out_attrs(target)}
            nodes.append(helper.make_node("QRequant", [copy.output[0]], [gr.fresh(node.output[0] + "_r")],
                                          domain=DOMAIN, **attrs))
        self._finish(node, nodes, target)
        self.decide(node, "int8-io", "on the integer tensor" + ("" if same else ", requantized"))
        return None

    def pool(self, node) -> str | None:
        gr = self.gr
        x = _dq_activation(gr, node.input[0])
        if x is None:
            return "input is not a per-tensor dequantized 8-bit tensor"
        target = _output_target(gr, node)
        if target[0] != "q":
            return "result is not quantized"
        attrs = {"x_scale": x[1].scale, "x_zero_point": x[1].zp, "pool": node.op_type,
                 **self._out_attrs(target)}
        for a in node.attribute:
            attrs[a.name] = helper.get_attribute_value(a)
        if attrs.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
            return "auto_pad is not lowered"
        self._finish(node, [helper.make_node("QPool", [x[0]], [gr.fresh(node.output[0] + "_i")],
                                             name=node.name, domain=DOMAIN, **attrs)], target)
        self.decide(node, "int8-io", "integer sum, requantized")
        return None

    def qlinear(self, node) -> str | None:
        """QOperator nodes: QLinearConv, QLinearMatMul, ConvInteger, MatMulInteger."""
        gr = self.gr
        c = gr.consts
        op = node.op_type
        ins = list(node.input) + [""] * 9
        if op in ("QLinearConv", "QLinearMatMul"):
            x, xs, xz, w, ws, wz, ys, yz = ins[:8]
            bias = ins[8] if op == "QLinearConv" else ""
        else:
            x, w, xz, wz = ins[:4]
            xs = ws = ys = yz = bias = ""
        xp = gr.scalar_qparam(xs, xz) if xs else (QParam(1.0, int(c[xz].reshape(())) if xz in c else 0, "uint8")
                                                 if (not xz or xz in c) else None)
        if xp is None:
            return "input scale / zero point not constant per-tensor"
        if w not in c:
            return "weight is not a constant"
        wq = c[w]
        if wz and wz not in c:
            return "weight zero point is not a constant"
        if wz:
            wq = _zero_centred(wq, c[wz], 0 if op in ("QLinearConv", "ConvInteger") else 1)
            if wq is None:
                return "weight zero point is not 0 (and the weights minus it do not fit int8)"
        if op in ("QLinearConv", "ConvInteger"):
            n_out = wq.shape[0]
        else:
            if wq.ndim != 2:
                return "weight is not 2-d"
            n_out = wq.shape[1]
        scales = np.broadcast_to(c[ws].astype(np.float32).reshape(-1), (n_out,)).copy() if ws else \
            np.ones(n_out, np.float32)
        attrs = {"x_scale": xp.scale, "x_zero_point": xp.zp}
        if ys:
            yp = gr.scalar_qparam(ys, yz)
            if yp is None:
                return "output scale / zero point not constant per-tensor"
            attrs.update({"y_scale": yp.scale, "y_zero_point": yp.zp, "y_dtype": yp.dtype,
                          "y_min": yp.qmin, "y_max": yp.qmax})
        else:
            attrs["out_int32"] = 1
        inputs = [x, self.const(wq, w + "_i8"), self.const(scales, w + "_ws")]
        if bias:
            if bias not in c:
                return "bias is not a constant"
            inputs.append(self.const(c[bias].astype(np.int32).reshape(-1), bias + "_i32"))
        if op in ("QLinearConv", "ConvInteger"):
            for k in ("strides", "pads", "dilations", "group"):
                v = _attr(node, k)
                if v is not None:
                    attrs[k] = v
            if _attr(node, "auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
                return "auto_pad is not lowered"
            new = "QConv"
            why_float = self._float_conv_reason(wq, int(_attr(node, "group", 1)))
            if why_float:
                attrs["float_kernel"] = 1
        else:
            new, why_float = "QMatMul", self._float_matmul_reason(wq)
            if why_float:
                attrs["float_kernel"] = 1
        self.replaced[id(node)] = [helper.make_node(new, inputs, [node.output[0]], name=node.name,
                                                    domain=DOMAIN, **attrs)]
        if why_float:
            what = "conv" if new == "QConv" else "matmul"
            self.decide(node, "int8-io", f"float {what} between 8-bit tensors: {why_float}")
        else:
            group = int(_attr(node, "group", 1)) if new == "QConv" else 1
            self.decide(node, "int8", f"integer kernel ({self._kernel_name(new, wq, group)}, QOperator)")
        return None

    # -- driver ----------------------------------------------------------------------------------
    def run(self) -> onnx.ModelProto:
        gr = self.gr
        for node in list(gr.model.graph.node):
            op = node.op_type
            if node.domain not in ("", "ai.onnx") or id(node) in self.dropped:
                continue
            if op in ("Conv", "MatMul", "Gemm"):
                handler = self.conv_like
            elif op == "Add":
                handler = self.add
            elif op in CLAMP_OPS:
                handler = self.clamp
            elif op in SHAPE_OPS:
                handler = self.shape_op
            elif op in ("GlobalAveragePool", "AveragePool"):
                handler = self.pool
            elif op in ("QLinearConv", "QLinearMatMul", "ConvInteger", "MatMulInteger"):
                handler = self.qlinear
            else:
                continue
            if op in ("Conv", "MatMul", "Gemm", "Add", "GlobalAveragePool", "AveragePool",
                      "QLinearConv", "QLinearMatMul", "ConvInteger", "MatMulInteger") \
                    or _dq_activation(gr, node.input[0]) is not None:
                reason = handler(node)
                if reason is not None:
                    self.decide(node, "float", reason)
        return self._emit()

    def _emit(self) -> onnx.ModelProto:
        gr = self.gr
        model = onnx.ModelProto()
        model.CopyFrom(gr.model)
        nodes = []
        for node in gr.model.graph.node:
            if id(node) in self.dropped:
                continue
            nodes.extend(self.replaced.get(id(node), [node]))
        # dequantize / constant nodes nothing reads any more
        needed = {o.name for o in model.graph.output}
        kept = []
        for node in reversed(nodes):
            if node.op_type in ("DequantizeLinear", "Constant") and not any(o in needed for o in node.output):
                continue
            kept.append(node)
            needed.update(i for i in node.input if i)
        kept.reverse()
        del model.graph.node[:]
        model.graph.node.extend(kept)
        inits = [t for t in model.graph.initializer if t.name in needed]
        inits += [t for t in self.new_inits if t.name in needed]
        del model.graph.initializer[:]
        model.graph.initializer.extend(inits)
        del model.graph.value_info[:]
        if not any(o.domain == DOMAIN for o in model.opset_import):
            model.opset_import.append(helper.make_opsetid(DOMAIN, 1))
        return model


def has_quantization(model: onnx.ModelProto) -> bool:
    ops = {"QuantizeLinear", "DequantizeLinear", "QLinearConv", "QLinearMatMul", "ConvInteger",
           "MatMulInteger"}
    return any(n.op_type in ops for n in model.graph.node)


def lower_integer(model: onnx.ModelProto, target=None) -> tuple[onnx.ModelProto, list[Decision]]:
    """The model with quantized groups as integer nodes, and a decision per candidate node.
    target: the TVM target, whose ISA decides which convolutions get dot-product kernels."""
    from .int8_kernels import int8_isa

    if not has_quantization(model):
        return model, []
    rw = _Rewriter(model, int8_isa(target) if target is not None else None)
    out = rw.run()
    if not any(n.domain == DOMAIN for n in out.graph.node) and not any(
            d.kernel == "int8-io" for d in rw.decisions):
        return model, rw.decisions
    return out, rw.decisions


def summarize(decisions: list[Decision]) -> dict:
    """Manifest entry: counts by kernel kind, and every node with its kind and reason."""
    counts: dict[str, int] = defaultdict(int)
    for d in decisions:
        counts[d.kernel] += 1
    return {"int8_kernels": counts.get("int8", 0), "int8_io": counts.get("int8-io", 0),
            "float": counts.get("float", 0), "nodes": [d.to_dict() for d in decisions]}


# -- Relax converters for the private nodes ------------------------------------------------------

def _s(v) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def _np(expr) -> np.ndarray:
    """The value of a constant the importer made of an initializer (tvm.ir.GenericConst in 0.27)."""
    value = getattr(expr, "value", None)
    if value is None:
        value = expr.data
    return value.numpy()


def _is_const(expr) -> bool:
    import tvm

    return isinstance(expr, getattr(tvm.ir, "GenericConst", ())) or type(expr).__name__ == "Constant"


def _requantize(f, attr: dict, *, scaled: bool = False):
    """float32 real value -> the output integer type: round-half-to-even(f * (1 / y_scale))
    + y_zp, clipped. A multiply, not onnxruntime's QuantizeLinear divide: a vector divide costs
    about 8 multiplies, once per output element, which on convs with few input channels (16-24:
    efficientnet's first blocks) was more than the dot products; where f / y and f * (1 / y)
    round apart the output moves one step (the flip share the tests and the bench report).
    scaled: f is already in output steps (the caller folded 1 / y_scale into its own scale)."""
    from tvm import relax

    if attr.get("out_float"):
        return f
    q = f if scaled else relax.op.multiply(f, relax.const(_reciprocal(attr["y_scale"])))
    q = relax.op.round(q)
    q = relax.op.add(q, relax.const(np.float32(attr["y_zero_point"])))
    # maximum/minimum, not relax.op.clip: clip has no layout rule, so ConvertLayout wrapped every
    # requantize in NHWC->NCHW->NHWC transposes and kept it out of the conv's fused epilogue
    # (float32 conv outputs written, transposed, clipped in a second kernel: resnet18 spent ~1/3
    # of its time there)
    q = relax.op.maximum(q, relax.const(np.float32(attr["y_min"])))
    q = relax.op.minimum(q, relax.const(np.float32(attr["y_max"])))
    return relax.op.astype(q, _s(attr["y_dtype"]))


def _reciprocal(scale) -> np.float32:
    return np.float32(np.float32(1.0) / np.float32(scale))


def _dequantized(x, scale: float, zp: int):
    """(float(x) - zp) * scale, onnxruntime's DequantizeLinear."""
    from tvm import relax

    f = relax.op.astype(x, "float32")
    if zp:
        f = relax.op.subtract(f, relax.const(np.float32(zp)))
    return relax.op.multiply(f, relax.const(np.float32(scale)))


def _bias_and_scale(acc, inputs, attr: dict, n_out: int, shape: tuple, wsum: np.ndarray):
    """int32 accumulator -> float32 real value: + int32 bias - zx * sum(w), then * xs * ws
    (per output channel, broadcast as `shape`), + float bias."""
    from tvm import relax

    zx = int(attr.get("x_zero_point", 0))
    ibias = -zx * wsum.astype(np.int64)
    fbias = None
    if len(inputs) > 3 and inputs[3] is not None:
        b = _np(inputs[3])
        if b.dtype == np.int32:
            ibias = ibias + b.astype(np.int64)
        else:
            fbias = b.astype(np.float32)
    if np.any(ibias):
        acc = relax.op.add(acc, relax.const(ibias.astype(np.int32).reshape(shape)))
    if attr.get("out_int32"):
        return acc
    m = (np.float32(attr["x_scale"]) * _np(inputs[2]).astype(np.float32)).astype(np.float32)
    if float(attr.get("alpha", 1.0)) != 1.0:
        m = (m * np.float32(attr["alpha"])).astype(np.float32)
    scaled = not attr.get("out_float")
    if scaled:       # one multiply per element: (xs * ws) / ys folded, as QLinearConv's requantize
        m = (m / np.float32(attr["y_scale"])).astype(np.float32)
        fbias = None if fbias is None else (fbias / np.float32(attr["y_scale"])).astype(np.float32)
    f = relax.op.multiply(relax.op.astype(acc, "float32"), relax.const(m.reshape(shape)))
    if fbias is not None:
        f = relax.op.add(f, relax.const(fbias.reshape(shape)))
    return _requantize(f, attr, scaled=scaled)


def _converters() -> dict:
    from tvm import relax
    from tvm.relax.frontend.onnx import onnx_frontend as fe

    class QConv(fe.OnnxOpConverter):
        @classmethod
        def _impl_v1(cls, bb, inputs, attr, params):
            x, w = inputs[0], inputs[1]
            wnp = _np(w)
            if attr.get("float_kernel"):
                return cls._float(bb, inputs, attr)
            pads = list(attr.get("pads", (0, 0, 0, 0)))
            t, left, b, r = pads if len(pads) == 4 else (0, 0, 0, 0)
            zx = int(attr.get("x_zero_point", 0))
            if zx and any(pads):
                # padding means real zero, which is zx in the integer domain
                x = bb.normalize(relax.op.nn.pad(x, [0, 0, 0, 0, t, b, left, r], pad_value=float(zx)))
                t = left = b = r = 0
            acc = relax.op.nn.conv2d(x, w, strides=tuple(attr.get("strides", (1, 1))),
                                     padding=(t, left, b, r),
                                     dilation=tuple(attr.get("dilations", (1, 1))),
                                     groups=int(attr.get("group", 1)), out_dtype="int32")
            n_out = wnp.shape[0]
            return _bias_and_scale(acc, inputs, attr, n_out, (1, n_out, 1, 1),
                                   wnp.astype(np.int64).sum(axis=(1, 2, 3)))

        @classmethod
        def _float(cls, bb, inputs, attr):
            """QDQ's own semantics: dequantize, float conv, + bias, quantize (8-bit in and out)."""
            wnp = _np(inputs[1])
            ws = _np(inputs[2]).astype(np.float32)
            wf = (wnp.astype(np.float32) * ws[:, None, None, None]).astype(np.float32)
            xs = np.float32(attr["x_scale"])
            f = relax.op.nn.conv2d(_dequantized(inputs[0], xs, int(attr.get("x_zero_point", 0))),
                                   relax.const(wf), strides=tuple(attr.get("strides", (1, 1))),
                                   padding=tuple(attr.get("pads", (0, 0, 0, 0))),
                                   dilation=tuple(attr.get("dilations", (1, 1))),
                                   groups=int(attr.get("group", 1)))
            n_out = wnp.shape[0]
            if len(inputs) > 3 and inputs[3] is not None:
                b = _np(inputs[3])
                if b.dtype == np.int32:
                    b = b.astype(np.float32) * (xs * ws).astype(np.float32)
                f = relax.op.add(f, relax.const(b.astype(np.float32).reshape(1, n_out, 1, 1)))
            if attr.get("out_int32"):
                # ConvInteger: scales are 1, so f holds the integer sums (exact below 2**24)
                return relax.op.astype(relax.op.round(f), "int32")
            return _requantize(f, attr)

    class QMatMul(fe.OnnxOpConverter):
        @classmethod
        def _impl_v1(cls, bb, inputs, attr, params):
            x, w = inputs[0], inputs[1]
            if attr.get("float_kernel"):
                return cls._float(bb, inputs, attr)
            if _is_const(w) and "b_scale" not in attr:
                wnp = _np(w)
                acc = relax.op.matmul(x, w, out_dtype="int32")
                return _bias_and_scale(acc, inputs, attr, wnp.shape[1], (wnp.shape[1],),
                                       wnp.astype(np.int64).sum(axis=0))
            # two activations: (a - za) @ (b - zb) = a@b - zb*rowsum(a) - za*colsum(b) + K*za*zb
            za, zb = int(attr["x_zero_point"]), int(attr["b_zero_point"])
            acc = relax.op.matmul(x, w, out_dtype="int32")
            k = int(bb.normalize(x).ty.shape[-1])
            if zb:
                rows = relax.op.sum(relax.op.astype(x, "int32"), axis=[-1], keepdims=True)
                acc = relax.op.subtract(acc, relax.op.multiply(rows, relax.const(np.int32(zb))))
            if za:
                cols = relax.op.sum(relax.op.astype(w, "int32"), axis=[-2], keepdims=True)
                acc = relax.op.subtract(acc, relax.op.multiply(cols, relax.const(np.int32(za))))
            if za and zb:
                acc = relax.op.add(acc, relax.const(np.int32(k * za * zb)))
            m = np.float32(np.float32(attr["x_scale"]) * np.float32(attr["b_scale"]))
            f = relax.op.multiply(relax.op.astype(acc, "float32"), relax.const(m))
            return _requantize(f, attr)

        @classmethod
        def _float(cls, bb, inputs, attr):
            """QDQ's own semantics: dequantize, float matmul, + bias, quantize (8-bit in and out)."""
            wnp = _np(inputs[1])
            ws = _np(inputs[2]).astype(np.float32)
            wf = (wnp.astype(np.float32) * ws[None, :]).astype(np.float32)
            xs = np.float32(attr["x_scale"])
            f = relax.op.matmul(_dequantized(inputs[0], xs, int(attr.get("x_zero_point", 0))), relax.const(wf))
            if float(attr.get("alpha", 1.0)) != 1.0:
                f = relax.op.multiply(f, relax.const(np.float32(attr["alpha"])))
            if len(inputs) > 3 and inputs[3] is not None:
                b = _np(inputs[3])
                if b.dtype == np.int32:
                    b = b.astype(np.float32) * (xs * ws).astype(np.float32)
                f = relax.op.add(f, relax.const(b.astype(np.float32).reshape(-1)))
            if attr.get("out_int32"):
                # MatMulInteger: scales are 1, so f holds the integer sums (exact below 2**24)
                return relax.op.astype(relax.op.round(f), "int32")
            return _requantize(f, attr)

    class QAdd(fe.OnnxOpConverter):
        @classmethod
        def _impl_v1(cls, bb, inputs, attr, params):
            fa = _dequantized(inputs[0], attr["a_scale"], int(attr["a_zero_point"]))
            fb = _dequantized(inputs[1], attr["b_scale"], int(attr["b_zero_point"]))
            return _requantize(relax.op.add(fa, fb), attr)

    class QRequant(fe.OnnxOpConverter):
        @classmethod
        def _impl_v1(cls, bb, inputs, attr, params):
            x = inputs[0]
            dtype = str(bb.normalize(x).ty.dtype)
            same = (np.float32(attr["x_scale"]) == np.float32(attr["y_scale"])
                    and int(attr["x_zero_point"]) == int(attr["y_zero_point"])
                    and dtype == _s(attr["y_dtype"]))
            if same:      # a clamp in the integer domain
                lo, hi = int(attr["y_min"]), int(attr["y_max"])
                info = np.iinfo(dtype)
                if lo > info.min:
                    x = relax.op.maximum(x, relax.const(np.array(lo, dtype)))
                if hi < info.max:
                    x = relax.op.minimum(x, relax.const(np.array(hi, dtype)))
                return x
            return _requantize(_dequantized(x, attr["x_scale"], int(attr["x_zero_point"])), attr)

    class QPool(fe.OnnxOpConverter):
        @classmethod
        def _impl_v1(cls, bb, inputs, attr, params):
            x = inputs[0]
            kind = _s(attr["pool"])
            shape = [int(d) for d in bb.normalize(x).ty.shape]
            if kind == "GlobalAveragePool":
                axes = list(range(2, len(shape)))
                n = int(np.prod(shape[2:]))
                s = relax.op.sum(relax.op.astype(x, "int32"), axis=axes, keepdims=True)
                zx = int(attr["x_zero_point"])
                if zx:
                    s = relax.op.subtract(s, relax.const(np.int32(zx * n)))
                # sum * (xs / n / ys): one multiply per channel
                m = np.float32(np.float32(attr["x_scale"]) / np.float32(n) / np.float32(attr["y_scale"]))
                f = relax.op.multiply(relax.op.astype(s, "float32"), relax.const(m))
                return _requantize(f, attr, scaled=True)
            f = bb.normalize(_dequantized(x, attr["x_scale"], int(attr["x_zero_point"])))
            pool_attr = {k: v for k, v in attr.items()
                         if k in ("kernel_shape", "strides", "pads", "ceil_mode", "count_include_pad",
                                  "dilations", "auto_pad")}
            pool_attr["tvm_custom"] = attr.get("tvm_custom", {})
            pooled = fe.AveragePool.get_converter(19)(bb, [f], pool_attr, params)
            return _requantize(pooled, attr)

    return {"QConv": QConv, "QMatMul": QMatMul, "QAdd": QAdd, "QRequant": QRequant, "QPool": QPool}


def _elementwise_qdq(op: str, fallback):
    """A converter for the QuantizeLinear / DequantizeLinear nodes left at float boundaries (SiLU
    gates, softmax, layer norms between quantized ops): per-tensor ones as plain elementwise ops
    (onnxruntime's arithmetic, but a multiply by 1 / scale for its divide: round half to even,
    + zp, saturate; (q - zp) * scale). TVM's own relax quantize/dequantize ops have no layout rule, so ConvertLayout
    wrapped each of them in NHWC<->NCHW transposes (efficientnet_b0: the SiLU gates ran
    transpose, dequantize, sigmoid, multiply, transpose, quantize, transpose). Per-channel,
    blocked and non-float32 ones keep TVM's converter."""
    from tvm.relax.frontend.onnx import onnx_frontend as fe

    class ElementwiseQDQ(fe.OnnxOpConverter):
        @classmethod
        def get_converter(cls, opset):
            orig = fallback.get_converter(opset)

            def convert(bb, inputs, attr, params):
                try:
                    x = inputs[0]
                    scale = inputs[1]
                    zp = inputs[2] if len(inputs) > 2 else None
                    if not _is_const(scale) or (zp is not None and not _is_const(zp)) \
                            or attr.get("block_size", 0) or attr.get("output_dtype", 0):
                        return orig(bb, inputs, attr, params)
                    s, z = _np(scale), (_np(zp) if zp is not None else np.zeros((), np.uint8))
                    xdtype = str(bb.normalize(x).ty.dtype)
                    if s.size != 1 or z.size != 1 or s.dtype != np.float32 \
                            or z.dtype.type not in INT_TYPES:
                        return orig(bb, inputs, attr, params)
                except Exception:
                    return orig(bb, inputs, attr, params)
                if op == "DequantizeLinear":
                    if xdtype not in ("uint8", "int8"):
                        return orig(bb, inputs, attr, params)
                    return _dequantized(x, float(s.reshape(())), int(z.reshape(())))
                if xdtype != "float32":
                    return orig(bb, inputs, attr, params)
                qp = QParam(float(s.reshape(())), int(z.reshape(())), np.dtype(z.dtype).name)
                return _requantize(x, {"y_scale": qp.scale, "y_zero_point": qp.zp, "y_dtype": qp.dtype,
                                       "y_min": qp.qmin, "y_max": qp.qmax})

            return convert

    return ElementwiseQDQ


@contextlib.contextmanager
def integer_converters():
    """TVM's ONNX importer with converters for the onnxpress.int8 nodes (restored on exit)."""
    from tvm.relax.frontend.onnx import onnx_frontend as fe

    original = fe._get_convert_map
    extra = _converters()
    base = original()
    extra.update({op: _elementwise_qdq(op, base[op]) for op in ("QuantizeLinear", "DequantizeLinear")
                  if op in base})

    def convert_map():
        table = original()
        table.update(extra)
        return table

    fe._get_convert_map = convert_map
    try:
        yield
    finally:
        fe._get_convert_map = original


def reduce_weight_range(model: onnx.ModelProto, limit: int = 64) -> onnx.ModelProto:
    """A copy of a QDQ model whose 8-bit weight constants (DequantizeLinear of an int8 initializer
    with zero point 0, read by Conv/MatMul/Gemm) are requantized to [-limit, limit] with the scale
    grown to match: onnxruntime's `reduce_range` idea. With limit 64, vpmaddubsw's int16 pair
    sums cannot saturate, so CPUs without VNNI (AVX2, AVX-512 without VNNI) can run every such
    convolution on the u8 x i8 dot product exactly. Costs one bit of weight precision."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    gr = _Graph(out)
    inits = {t.name: t for t in out.graph.initializer}
    done: set[str] = set()
    for node in out.graph.node:
        if node.op_type not in ("Conv", "MatMul", "Gemm") or len(node.input) < 2:
            continue
        dq = gr.producer.get(node.input[1])
        if dq is None or dq.op_type != "DequantizeLinear" or dq.input[0] in done:
            continue
        q, s = gr.consts.get(dq.input[0]), gr.consts.get(dq.input[1])
        z = gr.consts.get(dq.input[2]) if len(dq.input) > 2 and dq.input[2] else None
        if q is None or s is None or q.dtype != np.int8 or (z is not None and np.any(z != 0)):
            continue
        if dq.input[0] not in inits or dq.input[1] not in inits:
            continue
        if any(c.op_type != "DequantizeLinear" for c in gr.consumers[dq.input[0]]) or \
                len(gr.consumers[dq.input[1]]) != 1:
            continue             # shared with something else: leave it
        axis = int(_attr(dq, "axis", 1)) % q.ndim if s.size > 1 else None
        real = q.astype(np.float32) * (s.reshape([-1 if i == axis else 1 for i in range(q.ndim)])
                                       if axis is not None else s)
        peak = np.abs(q).max(axis=tuple(i for i in range(q.ndim) if i != axis), keepdims=True) \
            if axis is not None else np.abs(q).max()
        peak = np.maximum(peak, 1).astype(np.float32)
        new_s = (s.reshape(peak.shape) * peak / limit).astype(np.float32) if axis is not None else \
            np.float32(s * peak / limit)
        new_q = np.clip(np.rint(real / new_s), -limit, limit).astype(np.int8)
        inits[dq.input[0]].CopyFrom(numpy_helper.from_array(new_q, dq.input[0]))
        inits[dq.input[1]].CopyFrom(numpy_helper.from_array(np.asarray(new_s, np.float32).reshape(s.shape),
                                                            dq.input[1]))
        done.add(dq.input[0])
        # an int32 bias quantized with x_scale * w_scale follows the new weight scale
        if len(node.input) > 2 and node.input[2]:
            bdq = gr.producer.get(node.input[2])
            if bdq is not None and bdq.op_type == "DequantizeLinear" and bdq.input[0] in inits \
                    and bdq.input[1] in inits and len(gr.consumers[bdq.input[1]]) == 1:
                bq, bs = gr.consts[bdq.input[0]], gr.consts[bdq.input[1]]
                if bq.dtype == np.int32 and bs.size == np.asarray(new_s).size:
                    ratio = np.asarray(new_s, np.float32).reshape(bs.shape) / np.where(
                        s.reshape(bs.shape) == 0, 1, s.reshape(bs.shape))
                    nbs = (bs * ratio).astype(np.float32)
                    nbq = np.clip(np.rint(bq.astype(np.float64) * bs / nbs), -2**31, 2**31 - 1).astype(np.int32)
                    inits[bdq.input[0]].CopyFrom(numpy_helper.from_array(nbq, bdq.input[0]))
                    inits[bdq.input[1]].CopyFrom(numpy_helper.from_array(nbs, bdq.input[1]))
    return out
