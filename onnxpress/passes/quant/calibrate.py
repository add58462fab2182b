"""Calibration: activation statistics collected once, streaming, shared by every quant pass.

    calib batches --> onnxruntime (every float activation exposed as an output)
                  --> per tensor: running min/max, per-channel min/max, a histogram of values
                  --> ranges on demand: minmax | percentile | entropy (KL) | mse

Memory stays flat in the number of batches: a batch's activations are folded into fixed-size
histograms and dropped. A histogram covers [-R, R] with a fixed number of bins; when a batch
exceeds R, R doubles and pairs of bins merge (no re-read of earlier batches).

    stats = ctx.analysis("calib", model)          # CalibrationStats, cached on the context
    lo, hi = stats.range("x", method="entropy")   # the same statistics serve every method
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Iterator, Literal

import numpy as np
import onnx

from onnxpress.errors import CalibrationError
from onnxpress.passes.context import PassContext, register_analysis

Method = Literal["minmax", "percentile", "entropy", "mse"]
METHODS = ("minmax", "percentile", "entropy", "mse")
FLOAT_TYPES = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE,
               onnx.TensorProto.BFLOAT16)


@dataclasses.dataclass
class TensorStats:
    """Streaming statistics of one activation tensor."""

    name: str
    bins: int = 2048
    min: float = math.inf
    max: float = -math.inf
    radius: float = 0.0                       # the histogram covers [-radius, radius]
    hist: np.ndarray | None = None
    channel_min: np.ndarray | None = None     # along axis 1 (channels), when the rank allows
    channel_max: np.ndarray | None = None
    count: int = 0

    def update(self, x: np.ndarray) -> None:
        x = np.asarray(x, dtype=np.float32)
        if x.size == 0:
            return
        finite = x if np.isfinite(x).all() else x[np.isfinite(x)]
        if finite.size == 0:
            return
        lo, hi = float(finite.min()), float(finite.max())
        self.min, self.max = min(self.min, lo), max(self.max, hi)
        self.count += int(finite.size)
        if x.ndim >= 2 and finite is x:
            axes = tuple(i for i in range(x.ndim) if i != 1)
            cmin, cmax = x.min(axis=axes), x.max(axis=axes)
            if self.channel_min is None or self.channel_min.shape != cmin.shape:
                self.channel_min, self.channel_max = cmin, cmax
            else:
                np.minimum(self.channel_min, cmin, out=self.channel_min)
                np.maximum(self.channel_max, cmax, out=self.channel_max)
        need = max(abs(lo), abs(hi))
        if self.hist is None:
            self.hist = np.zeros(self.bins, dtype=np.int64)
            self.radius = need if need > 0 else 1e-8
        while need > self.radius:
            self._double()
        idx = ((finite.ravel() + self.radius) * (self.bins / (2 * self.radius))).astype(np.int64)
        np.clip(idx, 0, self.bins - 1, out=idx)
        self.hist += np.bincount(idx, minlength=self.bins)

    def _double(self) -> None:
        """Double the covered radius: merge bin pairs into the middle half."""
        merged = self.hist.reshape(-1, 2).sum(axis=1)
        new = np.zeros_like(self.hist)
        quarter = self.bins // 4
        new[quarter:quarter + merged.size] = merged
        self.hist = new
        self.radius *= 2

    # -- ranges ---------------------------------------------------------------------------------
    def edges(self) -> np.ndarray:
        return np.linspace(-self.radius, self.radius, self.bins + 1)

    def abs_hist(self) -> np.ndarray:
        """Histogram of |x| over [0, radius] with bins/2 bins."""
        half = self.bins // 2
        return self.hist[half:] + self.hist[:half][::-1]

    def range(self, method: str = "minmax", *, percentile: float = 99.999,
              qmax: int = 255, symmetric: bool = False) -> tuple[float, float]:
        """(lo, hi) of the tensor for quantization with `method`; lo <= 0 <= hi always."""
        if self.count == 0:
            raise CalibrationError(f"tensor '{self.name}' got no finite values during calibration")
        lo, hi = min(self.min, 0.0), max(self.max, 0.0)
        if method == "minmax":
            pass
        else:
            if method == "percentile":
                t = self._percentile_threshold(percentile)
            elif method == "entropy":
                t = self._entropy_threshold(levels=128 if symmetric or lo < 0 else 256)
            elif method == "mse":
                t = self._mse_threshold(qmax=qmax, symmetric=symmetric)
            else:
                raise CalibrationError(f"unknown calibration method '{method}'; use one of "
                                       f"{', '.join(METHODS)}")
            lo, hi = max(lo, -t), min(hi, t)
        if symmetric:
            m = max(abs(lo), abs(hi))
            lo, hi = -m, m
        return float(lo), float(hi)

    def _percentile_threshold(self, percentile: float) -> float:
        h = self.abs_hist()
        cdf = np.cumsum(h)
        total = cdf[-1]
        k = int(np.searchsorted(cdf, total * percentile / 100.0))
        width = self.radius / h.size
        return float(min((k + 1) * width, max(abs(self.min), abs(self.max))))

    def _entropy_threshold(self, levels: int = 128) -> float:
        """TensorRT-style: the |x| threshold whose quantized distribution has least KL to the data."""
        h = self.abs_hist().astype(np.float64)
        n = h.size
        width = self.radius / n
        top = int(np.nonzero(h)[0].max()) + 1 if h.any() else n
        if top <= levels:
            return top * width
        best, best_t = math.inf, top
        for t in np.unique(np.linspace(levels, top, 96).astype(int)):
            p = h[:t].copy()
            p[t - 1] += h[t:].sum()
            nz = p > 0
            # quantize the first t bins into `levels` groups, spread each back over its non-zeros
            groups = np.minimum((np.arange(t) * levels) // t, levels - 1)
            sums = np.bincount(groups, weights=h[:t], minlength=levels)
            counts = np.bincount(groups, weights=(h[:t] > 0).astype(np.float64), minlength=levels)
            q = np.where(h[:t] > 0, sums[groups] / np.maximum(counts[groups], 1), 0.0)
            ps, qs = p[nz] / p.sum(), q[nz]
            if qs.sum() <= 0 or np.any(qs == 0):
                continue
            qs = qs / qs.sum()
            kl = float(np.sum(ps * np.log(ps / qs)))
            if kl < best:
                best, best_t = kl, t
        return best_t * width

    def _mse_threshold(self, *, qmax: int = 255, symmetric: bool = False) -> float:
        """The clipping threshold that minimises the expected squared quantization error."""
        edges = self.edges()
        centers = (edges[:-1] + edges[1:]) / 2
        h = self.hist.astype(np.float64)
        keep = h > 0
        c, w = centers[keep], h[keep]
        full = max(abs(self.min), abs(self.max))
        best, best_t = math.inf, full
        for t in np.linspace(full * 0.05, full, 120):
            lo, hi = max(min(self.min, 0.0), -t), min(max(self.max, 0.0), t)
            if symmetric:
                m = max(-lo, hi)
                lo, hi = -m, m
            scale = (hi - lo) / qmax if hi > lo else 1.0
            q = np.clip(np.round((c - lo) / scale), 0, qmax) * scale + lo
            err = float(np.sum(w * (c - q) ** 2))
            if err < best:
                best, best_t = err, t
        return best_t


@dataclasses.dataclass
class CalibrationStats:
    """Statistics of every float activation of a model's main graph over the calibration data."""

    tensors: dict[str, TensorStats]
    batches: int
    samples: int

    def __contains__(self, name: str) -> bool:
        return name in self.tensors and self.tensors[name].count > 0

    def range(self, name: str, method: str = "minmax", **kw: Any) -> tuple[float, float]:
        if name not in self.tensors:
            raise CalibrationError(f"tensor '{name}' was not calibrated")
        return self.tensors[name].range(method, **kw)

    def channel_range(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """Per-channel (axis 1) running min and max of a tensor of rank >= 2."""
        st = self.tensors.get(name)
        if st is None or st.channel_min is None:
            raise CalibrationError(f"tensor '{name}' has no per-channel statistics (rank < 2 or "
                                   "not calibrated)")
        return np.minimum(st.channel_min, 0.0), np.maximum(st.channel_max, 0.0)


def float_activations(model: onnx.ModelProto, shapes: dict[str, tuple]) -> list[str]:
    """Float tensors of the main graph that are computed at run time (not constants)."""
    graph = model.graph
    consts = {t.name for t in graph.initializer}
    consts |= {o for n in graph.node if n.op_type == "Constant" for o in n.output}
    names: list[str] = []
    seen: set[str] = set()
    for inp in graph.input:
        if inp.name not in consts and inp.type.tensor_type.elem_type in FLOAT_TYPES:
            names.append(inp.name)
            seen.add(inp.name)
    for node in graph.node:
        if node.op_type == "Constant":
            continue
        for o in node.output:
            if o and o not in seen and o not in consts:
                et = shapes.get(o, (None,))[0]
                if et in FLOAT_TYPES:
                    names.append(o)
                    seen.add(o)
    return names


def _augment(model: onnx.ModelProto, names: list[str], shapes: dict) -> onnx.ModelProto:
    aug = onnx.ModelProto()
    aug.CopyFrom(model)
    outs = {o.name for o in aug.graph.output}
    for n in names:
        if n not in outs:
            aug.graph.output.append(onnx.helper.make_tensor_value_info(n, shapes[n][0], None))
    return aug


def calibration_outputs(model: onnx.ModelProto, ctx: PassContext, names: list[str], *,
                        desc: str, max_batches: int | None = None
                        ) -> Iterator[tuple[dict, dict[str, np.ndarray]]]:
    """(batch, {tensor: value}) for each calibration batch, run through onnxruntime with the
    main-graph tensors `names` exposed as outputs. Raises CalibrationError naming the batch and
    the input on bad data."""
    from onnxpress.backends import ort
    from onnxpress.data import check_feed, graph_input_specs

    calib = ctx.require_calib(model)
    shapes = ctx.analysis("shapes", model)
    sess = ort.session(_augment(model, names, shapes), optimization="basic")
    out_names = [o.name for o in sess.get_outputs()]
    specs = graph_input_specs(model)
    total = calib.length if getattr(calib, "length", None) is not None else None  # never count a stream
    if max_batches is not None and total is not None:
        total = min(total, max_batches)
    for i, batch in enumerate(ctx.progress_bar(calib, desc=desc, total=total)):
        if max_batches is not None and i >= max_batches:
            break
        where = f"calibration batch {i} ({calib.description})"
        check_feed(batch, specs, where)
        try:
            values = sess.run(out_names, batch)
        except Exception as exc:
            msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise CalibrationError(f"{where}: onnxruntime could not run it: {msg}") from None
        out = dict(zip(out_names, values))
        del values                    # one batch's activations alive at a time
        yield batch, out
        del out


def calibrate(model: onnx.ModelProto, ctx: PassContext, *, bins: int = 2048,
              tensors: tuple[str, ...] | None = None,
              max_batches: int | None = None) -> CalibrationStats:
    """Run the calibration data through onnxruntime and fold every float activation into
    streaming statistics. Raises CalibrationError naming the batch/input on bad data."""
    calib = ctx.require_calib(model)
    shapes = ctx.analysis("shapes", model)
    names = list(tensors) if tensors is not None else float_activations(model, shapes)
    names = [n for n in names if n in shapes]
    stats = {n: TensorStats(n, bins=bins) for n in names}
    batches = samples = 0
    for batch, values in calibration_outputs(model, ctx, names, desc="calibrating",
                                             max_batches=max_batches):
        for name, value in values.items():
            st = stats.get(name)
            if st is not None:
                st.update(value)
        del values
        batches += 1
        first = next(iter(batch.values()), None)
        samples += int(first.shape[0]) if first is not None and first.ndim else 1
    if batches == 0:
        raise CalibrationError(f"calibration data from {calib.description} is empty; give at "
                               "least one batch")
    return CalibrationStats(stats, batches, samples)


@register_analysis("calib")
def _calib_analysis(model: onnx.ModelProto, ctx: PassContext, **params: Any) -> CalibrationStats:
    """Cached calibration statistics of every float activation (see `calibrate`)."""
    return calibrate(model, ctx, **params)


def activation_qparams(lo: float, hi: float, *, signed: bool = False,
                       symmetric: bool = False) -> tuple[np.float32, int]:
    """(scale, zero_point) for an activation range; zero is exactly representable."""
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    if symmetric:
        m = max(-lo, hi)
        scale = m / 127.0 if signed else m / 255.0 * 2
        zp = 0 if signed else 128
    else:
        qmin, qmax = (-128, 127) if signed else (0, 255)
        scale = (hi - lo) / (qmax - qmin)
        zp = int(round(qmin - lo / scale)) if scale > 0 else 0
        zp = int(np.clip(zp, qmin, qmax))
    if not scale > 0 or not np.isfinite(scale):
        scale = 1.0
    return np.float32(scale), zp
