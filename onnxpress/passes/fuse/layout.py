"""Redundant layout ops: pairs that cancel, chains that collapse, constants pre-transposed.

    before: y = Transpose(Transpose(x, p), q)           after: y = Transpose(x, p∘q)  (or x)
    before: y = Transpose(C)  (C constant)              after: y = C' (a new constant)
    before: y = Reshape(Reshape|Flatten(x), s)          after: y = Reshape(x, s)
    before: y = Squeeze(Unsqueeze(x, a), a)             after: y = x   (and Unsqueeze(Squeeze))
    before: y = Concat(x)                               after: y = x
    before: y = Concat(Split(x, axis a)..., axis a)     after: y = x   (all outputs, in order)
"""

from __future__ import annotations

import numpy as np

from onnxpress.passes.fuse.api import attr, const, fusion, new_initializer, rank, shape


# -- Transpose -------------------------------------------------------------------------------
def _perm(value, r: int | None) -> list[int] | None:
    p = attr(value, "perm", None)
    if p is None:
        return list(reversed(range(r))) if r is not None else None
    return [int(i) for i in p]


def _composed(x, first, second) -> list[int] | None:
    r = rank(x)
    p1, p2 = _perm(first, r), _perm(second, r)
    if p1 is None or p2 is None or len(p1) != len(p2):
        return None
    return [p1[i] for i in p2]


fusion("transpose_pair", family="layout", priority=80,
       pattern=lambda op, x: op.Transpose(op.Transpose(x, _outputs=["first"]),
                                          _outputs=["second"]),
       condition=lambda ctx, x, first, second: _composed(x, first, second) is not None,
       replacement=lambda op, x, first, second: (
           op.Identity(x) if _composed(x, first, second) == sorted(_composed(x, first, second))
           else op.Transpose(x, perm=_composed(x, first, second))),
       doc="Transpose(Transpose(x, p), q) -> Transpose(x, p∘q), or x when that is the identity")


def _transposed_constant(c, out):
    arr = const(c)
    if arr is None:
        return None
    p = _perm(out, arr.ndim)
    return None if p is None or len(p) != arr.ndim else np.ascontiguousarray(arr.transpose(p))


fusion("transpose_constant", family="layout", priority=81,
       pattern=lambda op, c: op.Transpose(c, _outputs=["out"]),
       condition=lambda ctx, c, out: _transposed_constant(c, out) is not None,
       replacement=lambda op, c, out: op.Identity(
           new_initializer(op, _transposed_constant(c, out), "transposed")),
       doc="Transpose(constant) -> the transposed constant")


# -- Reshape / Flatten -----------------------------------------------------------------------
def _reshape_target_ok(s, out) -> bool:
    target = const(s)
    if target is None:
        return False
    return bool(attr(out, "allowzero", 0)) or not np.any(target == 0)


for _inner in ("Reshape", "Flatten"):
    fusion(f"{_inner.lower()}_reshape_chain", family="layout", priority=82,
           pattern=(lambda inner: lambda op, x, s: op.Reshape(
               getattr(op, inner)(x, _allow_other_inputs=True), s, _outputs=["out"]))(_inner),
           condition=lambda ctx, x, s, out: _reshape_target_ok(s, out),
           replacement=lambda op, x, s, out: op.Reshape(x, s),
           doc=f"Reshape({_inner}(x), s) -> Reshape(x, s) (s constant, no 0 entries)")


def _same_static_shape(x, out) -> bool:
    sx, so = shape(x), shape(out)
    return (sx is not None and so is not None and sx == so
            and all(isinstance(d, int) and d >= 0 for d in sx))


fusion("noop_reshape", family="layout", priority=83,
       pattern=lambda op, x, s: op.Reshape(x, s, _outputs=["out"]),
       condition=lambda ctx, x, out: _same_static_shape(x, out),
       replacement=lambda op, x: op.Identity(x),
       doc="Reshape(x) to x's own static shape -> x")


# -- Squeeze / Unsqueeze ---------------------------------------------------------------------
def _axes(value, r: int | None) -> list[int] | None:
    node = value.producer()
    if len(node.inputs) > 1 and node.inputs[1] is not None:
        a = const(node.inputs[1])
    else:
        a = attr(value, "axes", None)
    if a is None or r is None:
        return None
    return sorted(int(i) % r for i in np.ravel(a))


def _squeeze_pair_ok(x, first, second, unsqueeze_first: bool) -> bool:
    r = rank(x)
    if r is None:
        return False
    if unsqueeze_first:      # Squeeze(Unsqueeze(x, a), a): always x
        a1 = _axes(first, r + len(np.ravel(_raw_axes(first))))
        a2 = _axes(second, rank(first))
        return a1 is not None and a1 == a2
    a1 = _axes(first, r)     # Unsqueeze(Squeeze(x, a), a): x when the axes had size 1 (they must)
    a2 = _axes(second, r)
    return a1 is not None and a1 == a2


def _raw_axes(value):
    node = value.producer()
    if len(node.inputs) > 1 and node.inputs[1] is not None:
        a = const(node.inputs[1])
    else:
        a = attr(value, "axes", None)
    return [] if a is None else a


fusion("unsqueeze_squeeze", family="layout", priority=84,
       pattern=lambda op, x: op.Squeeze(op.Unsqueeze(x, _allow_other_inputs=True,
                                                     _outputs=["first"]),
                                        _allow_other_inputs=True, _outputs=["second"]),
       condition=lambda ctx, x, first, second: _squeeze_pair_ok(x, first, second, True),
       replacement=lambda op, x: op.Identity(x),
       doc="Squeeze(Unsqueeze(x, a), a) -> x")

fusion("squeeze_unsqueeze", family="layout", priority=84,
       pattern=lambda op, x: op.Unsqueeze(op.Squeeze(x, _allow_other_inputs=True,
                                                     _outputs=["first"]),
                                          _allow_other_inputs=True, _outputs=["second"]),
       condition=lambda ctx, x, first, second: _squeeze_pair_ok(x, first, second, False),
       replacement=lambda op, x: op.Identity(x),
       doc="Unsqueeze(Squeeze(x, a), a) -> x")


# -- Concat ----------------------------------------------------------------------------------
fusion("single_concat", family="layout", priority=85,
       pattern=lambda op, x: op.Concat(x),
       replacement=lambda op, x: op.Identity(x),
       doc="Concat of one input -> that input")


@fusion("split_concat", family="layout", priority=86)
def split_concat(model) -> int:
    """Concat(Split(x, axis a) outputs, all of them in order, axis a) -> x."""
    from onnxscript import ir

    count = 0
    for node in list(model.graph):
        if node.op_type != "Concat" or node.domain not in ("", "ai.onnx") or not node.inputs:
            continue
        first = node.inputs[0]
        split = first.producer() if first is not None else None
        if split is None or split.op_type != "Split" or split.domain not in ("", "ai.onnx"):
            continue
        if list(node.inputs) != list(split.outputs):
            continue
        x = split.inputs[0]
        r = rank(x)
        if r is None:
            continue
        if (int(attr(first, "axis", 0)) % r) != (int(attr(node.outputs[0], "axis", 0)) % r):
            continue
        out = node.outputs[0]
        was_output = out.is_graph_output()
        if was_output and (x.is_graph_input() or x.is_initializer() or x.is_graph_output()):
            continue
        ir.convenience.replace_all_uses_with(out, x, replace_graph_outputs=True)
        if was_output:
            x.name = out.name
        model.graph.remove(node, safe=True)
        count += 1
    return count


