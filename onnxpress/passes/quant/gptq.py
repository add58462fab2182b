"""GPTQ for quant_int4: block-wise int4 weights whose rounding errors are compensated, in order,
through the inverse Hessian of the layer's input (Frantar et al., "GPTQ", 2022).

    calibration batches -> X, the input of each MatMul (rows: every position of every sample)
    H = 2 X^T X / rows + damp * mean(diag) * I            [K, K], one per distinct input tensor
    U = upper Cholesky factor of H^-1
    for each row k of W [K, N] (one input channel), in order:
        at the start of a block: scale, zero point from the block's rows as they are now
        q_k = round(W_k / scale) + zp                      (the same grid as round-to-nearest)
        e_k = (W_k - dequant(q_k)) / U_kk
        W_{k+1:} -= U_{k, k+1:}^T e_k                      later rows absorb the error

Round-to-nearest minimises each weight's own error; GPTQ minimises the error of the layer's
output on the calibration inputs, ||X W - X W_q||, which is what the model sees.
"""

from __future__ import annotations

import numpy as np
import onnx

from onnxpress.passes.context import PassContext


def input_hessians(model: onnx.ModelProto, ctx: PassContext, tensors: list[str]
                   ) -> dict[str, np.ndarray]:
    """{tensor: 2 X^T X / rows} of main-graph float tensors over the calibration batches, X the
    tensor flattened to [rows, last dim]. Tensors shape inference cannot type are left out."""
    from onnxpress.passes.quant.calibrate import calibration_outputs

    shapes = ctx.analysis("shapes", model)
    names = [t for t in dict.fromkeys(tensors) if t in shapes]
    if not names:
        return {}
    sums: dict[str, np.ndarray] = {}
    rows: dict[str, int] = {}
    for _, values in calibration_outputs(model, ctx, names, desc="gptq: input statistics"):
        for name, value in values.items():
            x = np.asarray(value, np.float64)
            x = x.reshape(-1, x.shape[-1]) if x.ndim else x.reshape(1, 1)
            sums[name] = sums.get(name, 0.0) + x.T @ x
            rows[name] = rows.get(name, 0) + x.shape[0]
    return {n: 2.0 * sums[n] / max(rows[n], 1) for n in sums}


def _inverse_cholesky(h: np.ndarray, damp: float) -> np.ndarray | None:
    """Upper U with U^T U = (H + damping)^-1, the damping raised tenfold until H is positive
    definite (None if it never is). With the order reversed, H = R R^T for an upper R (a
    Cholesky factor of the reversed H), and then U = R^-1: one factorization, one inverse."""
    mean_diag = float(np.mean(np.diag(h))) or 1.0
    eye = np.eye(len(h))
    for _ in range(4):
        try:
            lower = np.linalg.cholesky((h + damp * mean_diag * eye)[::-1, ::-1])
            return np.triu(np.linalg.inv(lower[::-1, ::-1]))
        except np.linalg.LinAlgError:
            damp *= 10
    return None


def gptq_quantize_blocks(w: np.ndarray, hessian: np.ndarray, block_size: int, symmetric: bool,
                         damp: float = 0.01, grid: np.ndarray | None = None
                         ) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """w [K, N], H [K, K] -> (q uint4 values 0..15 [Kp, N], scale [nb, N], zero point [nb, N]),
    the layout of int4.quantize_blocks; None when H cannot be factored (use round-to-nearest)."""
    from onnxpress.passes.quant.int4 import block_qparams

    k, n = w.shape
    nb = -(-k // block_size)
    kp = nb * block_size
    W = np.zeros((kp, n), np.float64)
    W[:k] = w
    H = np.eye(kp)
    H[:k, :k] = hessian
    dead = np.diag(H) <= 0                 # inputs that are always zero: nothing to fit
    H[dead, dead] = 1.0
    W[dead] = 0.0
    U = _inverse_cholesky(H, damp)
    if U is None:
        return None
    q = np.empty((kp, n), np.uint8)
    scale = np.empty((nb, n), np.float32)
    zp = np.empty((nb, n), np.uint8)
    for b in range(nb):
        lo, hi = b * block_size, (b + 1) * block_size
        Wb = W[lo:hi]                       # a view: updates land in W
        s, z = block_qparams(Wb[None].astype(np.float32), symmetric, grid)
        scale[b], zp[b] = s[0], z[0]
        s64, z64 = s[0].astype(np.float64), z[0].astype(np.float64)
        err = np.empty((block_size, n))
        for i in range(block_size):
            qi = np.clip(np.round(Wb[i] / s64) + z64, 0, 15)
            q[lo + i] = qi
            err[i] = (Wb[i] - (qi - z64) * s64) / U[lo + i, lo + i]
            Wb[i + 1:] -= np.outer(U[lo + i, lo + i + 1:hi], err[i])
        W[hi:] -= U[lo:hi, hi:].T @ err
    return q, scale, zp
