"""Unstructured pruning: zero the smallest weights (magnitude), globally, per layer, or N:M.

    before: W = [[0.8, -0.01, 0.3, 0.02], ...]     after (2:4): W = [[0.8, 0, 0.3, 0], ...]

The tensors keep their dense shape (onnxruntime and TVM run them as they are); what shrinks is
the compressed size (a bitmask plus the non-zero values, or gzip of the file) and, for 2:4, what
sparse tensor cores can skip. `distill` keeps the zeros at zero while it trains.
"""

from __future__ import annotations

import dataclasses
import zlib

import numpy as np
import onnx
from onnx import numpy_helper

from onnxpress.errors import PassOptionError

WEIGHT_OPS = {"Conv": 1, "ConvTranspose": 1, "Gemm": 1, "MatMul": 1}


@dataclasses.dataclass
class WeightRef:
    """A prunable weight: initializer `name`, read by `node` (first reader) as its weight;
    `reduce_axis` is the axis summed over (input features), used to group N:M blocks."""

    name: str
    node: str
    op_type: str
    reduce_axes: tuple[int, ...]


def prunable_weights(model: onnx.ModelProto, exclude: list[str] = ()) -> list[WeightRef]:
    """Float weights of Conv/ConvTranspose/Gemm/MatMul stored as initializers (each once)."""
    inits = {t.name: t for t in model.graph.initializer}
    seen, out = set(), []
    excl = set(exclude)
    for node in model.graph.node:
        idx = WEIGHT_OPS.get(node.op_type)
        if idx is None or len(node.input) <= idx:
            continue
        name = node.input[idx]
        t = inits.get(name)
        if t is None or t.data_type not in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16,
                                            onnx.TensorProto.DOUBLE, onnx.TensorProto.BFLOAT16):
            continue
        if len(t.dims) < 2 or name in seen or node.name in excl or name in excl:
            continue
        seen.add(name)
        nd = len(t.dims)
        if node.op_type == "Conv":
            red = tuple(range(1, nd))
        elif node.op_type == "ConvTranspose":
            red = (0,) + tuple(range(2, nd))
        elif node.op_type == "Gemm":
            trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
            red = (1,) if trans_b else (0,)
        else:
            red = (nd - 2,)
        out.append(WeightRef(name, node.name, node.op_type, red))
    return out


def parse_nm(spec: str) -> tuple[int, int]:
    try:
        n, m = (int(x) for x in str(spec).split(":"))
    except ValueError:
        raise PassOptionError(f"option 'nm' of pass 'prune': '{spec}' is not N:M (e.g. 2:4)") from None
    if not (0 < n < m):
        raise PassOptionError(f"option 'nm' of pass 'prune': need 0 < N < M, got {n}:{m}")
    return n, m


def nm_mask(w: np.ndarray, reduce_axes: tuple[int, ...], n: int, m: int) -> np.ndarray | None:
    """Keep the n largest |w| of every m consecutive weights along the reduction axes
    (None when that length is not a multiple of m)."""
    keep_axes = [a for a in range(w.ndim) if a not in reduce_axes]
    perm = keep_axes + list(reduce_axes)
    wt = np.transpose(np.abs(w), perm)
    outer = int(np.prod([w.shape[a] for a in keep_axes], dtype=np.int64))
    red = int(np.prod([w.shape[a] for a in reduce_axes], dtype=np.int64))
    if red % m:
        return None
    blocks = wt.reshape(outer, red // m, m)
    order = np.argsort(-blocks, axis=-1, kind="stable")
    mask_b = np.zeros_like(blocks, dtype=bool)
    np.put_along_axis(mask_b, order[..., :n], True, axis=-1)
    mask_t = mask_b.reshape(wt.shape)
    return np.transpose(mask_t, np.argsort(perm))


def magnitude_masks(weights: dict[str, np.ndarray], sparsity: float, scope: str) -> dict[str, np.ndarray]:
    """Masks (True = keep) removing the `sparsity` fraction of smallest |w|, over all weights
    together (global) or in each tensor (layer). Exactly floor(sparsity * count) are removed."""
    masks = {}
    if scope == "global":
        flat = np.concatenate([np.abs(w).ravel() for w in weights.values()])
        k = int(np.floor(sparsity * flat.size))
        if k == 0:
            return {n: np.ones(w.shape, bool) for n, w in weights.items()}
        # rank every weight; ties broken by position so the count is exact
        order = np.argsort(flat, kind="stable")
        keep_flat = np.ones(flat.size, bool)
        keep_flat[order[:k]] = False
        off = 0
        for n, w in weights.items():
            masks[n] = keep_flat[off:off + w.size].reshape(w.shape)
            off += w.size
        return masks
    for n, w in weights.items():
        flat = np.abs(w).ravel()
        k = int(np.floor(sparsity * flat.size))
        keep = np.ones(flat.size, bool)
        keep[np.argsort(flat, kind="stable")[:k]] = False
        masks[n] = keep.reshape(w.shape)
    return masks


def sparse_bytes(model: onnx.ModelProto) -> int:
    """Size of the weights stored as a 1-bit mask plus the non-zero values for tensors that are
    at least half zeros, dense otherwise (what a sparse format would need)."""
    total = 0
    for t in model.graph.initializer:
        a = numpy_helper.to_array(t)
        item = a.dtype.itemsize
        if a.dtype.kind == "f" and a.size >= 64:
            nnz = int(np.count_nonzero(a))
            if nnz <= a.size // 2:
                total += nnz * item + (a.size + 7) // 8
                continue
        total += a.size * item
    return total


def zipped_bytes(model: onnx.ModelProto) -> int:
    """The serialized model compressed with zlib (level 6): what a download or flash image costs."""
    return len(zlib.compress(model.SerializeToString(), 6))


def prune_unstructured(model: onnx.ModelProto, *, sparsity: float = 0.5, scope: str = "global",
                       nm: str | None = None, exclude: list[str] = ()) -> dict:
    """Zero weights of `model` in place; returns per-layer sparsity and totals."""
    refs = prunable_weights(model, exclude)
    inits = {t.name: t for t in model.graph.initializer}
    weights = {r.name: numpy_helper.to_array(inits[r.name]) for r in refs}
    skipped = []
    if nm:
        n, m = parse_nm(nm)
        masks = {}
        for r in refs:
            mk = nm_mask(weights[r.name], r.reduce_axes, n, m)
            if mk is None:
                skipped.append(r.node)
            else:
                masks[r.name] = mk
    else:
        masks = magnitude_masks(weights, sparsity, scope)
    per_layer = {}
    zeros = total = 0
    for r in refs:
        w = weights[r.name]
        if r.name in masks:
            w = np.where(masks[r.name], w, np.zeros((), w.dtype)).astype(w.dtype)
            inits[r.name].CopyFrom(numpy_helper.from_array(w, r.name))
        z = int(w.size - np.count_nonzero(w))
        per_layer[r.node] = round(z / w.size, 4)
        zeros += z
        total += w.size
    return {"layers": per_layer, "zeros": zeros, "weights": total,
            "sparsity": zeros / total if total else 0.0, "skipped": skipped}
