"""MatMul/Gemm fusions: bias adds into Gemm, chains of constant weights multiplied out.

    before: y = MatMul(x[M,K], W[K,N]) + b[N]              after: y = Gemm(x, W, b)
    before: y = MatMul(MatMul(x, A[K,M]), B[M,N])          after: y = MatMul(x, A @ B)
    before: y = Gemm(Gemm(x, A, a), B, b)                  after: y = Gemm(x, A @ B, a @ B + b)
    (a chain is multiplied out only when the product is no bigger than the two weights)
"""

from __future__ import annotations

import numpy as np

from onnxpress.passes.fuse.api import attr, const, fusion, is_float, new_initializer, rank


def _bias_vector(b, n: int) -> np.ndarray | None:
    arr = const(b)
    if arr is None or arr.dtype.kind != "f" or arr.size != n or arr.ndim > 2:
        return None
    if arr.ndim == 2 and arr.shape[0] != 1:
        return None
    return arr.reshape(n)


def _gemm_plan(x, w, b):
    weights = const(w)
    if weights is None or weights.ndim != 2 or weights.dtype.kind != "f" or rank(x) != 2 \
            or not is_float(x):
        return None
    bias = _bias_vector(b, weights.shape[1])
    return None if bias is None else bias


fusion("matmul_add_to_gemm", family="gemm", priority=60,
       pattern=lambda op, x, w, b: op.MatMul(x, w) + b,
       condition=lambda ctx, x, w, b: _gemm_plan(x, w, b) is not None,
       replacement=lambda op, x, w, b: op.Gemm(
           x, w, new_initializer(op, _gemm_plan(x, w, b), "gemm_bias")),
       doc="MatMul(x[M,K], W[K,N]) + b[N] -> Gemm(x, W, b)")


def _chain_ok(a: np.ndarray | None, b: np.ndarray | None) -> bool:
    if a is None or b is None or a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[0]:
        return False
    if a.dtype.kind != "f" or b.dtype.kind != "f":
        return False
    return a.shape[0] * b.shape[1] <= a.size + b.size


fusion("matmul_chain", family="constant_chain", priority=58,
       pattern=lambda op, x, a, b: op.MatMul(op.MatMul(x, a), b),
       condition=lambda ctx, x, a, b: is_float(x) and _chain_ok(const(a), const(b)),
       replacement=lambda op, x, a, b: op.MatMul(
           x, new_initializer(op, (const(a).astype(np.float64) @ const(b)).astype(
               const(a).dtype), "matmul_chain")),
       doc="MatMul(MatMul(x, A), B) with constant A, B -> MatMul(x, A @ B)")


def _gemm_matrix(value, w) -> np.ndarray | None:
    arr = const(w)
    if arr is None or arr.ndim != 2:
        return None
    arr = arr.T if attr(value, "transB", 0) else arr
    return arr * float(attr(value, "alpha", 1.0))


def _gemm_chain_plan(x, a, b, inner, outer):
    if attr(inner, "transA", 0) or attr(outer, "transA", 0) or not is_float(x):
        return None
    A, B = _gemm_matrix(inner, a), _gemm_matrix(outer, b)
    if not _chain_ok(A, B):
        return None
    inner_node, outer_node = inner.producer(), outer.producer()
    biases = []
    for node, value, n in ((inner_node, inner, A.shape[1]), (outer_node, outer, B.shape[1])):
        if len(node.inputs) > 2 and node.inputs[2] is not None:
            vec = _bias_vector(node.inputs[2], n)
            if vec is None:
                return None
            biases.append(vec * float(attr(value, "beta", 1.0)))
        else:
            biases.append(np.zeros(n, A.dtype))
    w = A.astype(np.float64) @ B
    c = biases[0].astype(np.float64) @ B + biases[1]
    return w.astype(A.dtype), c.astype(A.dtype)


fusion("gemm_chain", family="constant_chain", priority=59,
       pattern=lambda op, x, a, b: op.Gemm(
           op.Gemm(x, a, _allow_other_inputs=True, _outputs=["inner"]), b,
           _allow_other_inputs=True, _outputs=["outer"]),
       condition=lambda ctx, x, a, b, inner, outer:
           _gemm_chain_plan(x, a, b, inner, outer) is not None,
       replacement=lambda op, x, a, b, inner, outer: _gemm_chain_replacement(
           op, x, *_gemm_chain_plan(x, a, b, inner, outer)),
       doc="Gemm(Gemm(x, A, a), B, b) with constant A, B -> Gemm(x, A @ B, a @ B + b)")


def _gemm_chain_replacement(op, x, w, c):
    return op.Gemm(x, new_initializer(op, w, "gemm_chain_weight"),
                   new_initializer(op, c, "gemm_chain_bias"))
