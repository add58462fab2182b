"""Redundant layout ops: pairs that cancel, chains that collapse, constants pre-transposed.

    before: y = Transpose(Transpose(x, p), q)           after: y = Transpose(x, p∘q)  (or x)
    before: y = Transpose(C)  (C constant)              after: y = C' (a new constant)
    before: y = Reshape(Reshape|Flatten(x), s)          after: y = Reshape(x, s)
    before: y = Squeeze(Unsqueeze(x, a), a)             after: y = x   (and Unsqueeze(Squeeze))
    before: y = Concat(x)                               after: y = x
    before: y = Concat(Split(x, axis a)..., axis a)     after: y = x   (all outputs, in order)
    before: Slice(x, i, i+1, a) for every i (unbind)    after: Split(x, a) (one node, same outputs)
    before: Reshape(Transpose(Reshape(x, [-1,S,d]), [0,2,1]), [..,d,S])   after: Transpose(x, ..)

The last two are how torch's dynamo exporter writes `unbind` and a transpose of a rank-4
tensor; the fusions downstream (attention) match the forms they become.
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


# -- the dynamo exporter's forms of Split and Transpose ----------------------------------------
def _unit_slice(node, dims) -> tuple[int, int] | None:
    """(axis, start) of a Slice that takes one index, with constant operands and step 1."""
    if node.op_type != "Slice" or node.domain not in ("", "ai.onnx") or len(node.inputs) < 3:
        return None
    given = (list(node.inputs[1:]) + [None, None])[:4]       # starts, ends, axes, steps
    starts, ends, axes, steps = (const(v) if v is not None else None for v in given)
    if starts is None or ends is None or starts.size != 1 or ends.size != 1:
        return None
    if (given[2] is not None and (axes is None or axes.size != 1)) \
            or (given[3] is not None and (steps is None or int(np.ravel(steps)[0]) != 1)):
        return None
    axis = int(np.ravel(axes)[0]) if axes is not None else 0
    axis %= len(dims)
    dim = dims[axis]
    if not isinstance(dim, int) or dim <= 0:
        return None
    start = int(np.ravel(starts)[0])
    start = start + dim if start < 0 else start
    end = int(np.ravel(ends)[0])
    end = end + dim if end < 0 else min(end, dim)
    return (axis, start) if 0 <= start < dim and end == start + 1 else None


@fusion("slices_to_split", family="layout", priority=87)
def slices_to_split(model) -> int:
    """One-index Slices of x along one axis that take every index -> one Split of x."""
    from onnxscript import ir

    count = 0
    for value in list(model.graph.inputs) + [o for n in list(model.graph) for o in n.outputs]:
        dims = shape(value)
        if dims is None or not dims or value.const_value is not None:
            continue
        taken: dict[int, dict[int, object]] = {}
        for use in value.uses():
            node = use.node
            picked = _unit_slice(node, dims) if use.idx == 0 else None
            if picked is not None and node.graph is model.graph:
                taken.setdefault(picked[0], {}).setdefault(picked[1], node)
        for axis, by_start in taken.items():
            if len(by_start) < 2 or sorted(by_start) != list(range(dims[axis])):
                continue
            sizes = ir.Value(name=f"{value.name}_split{axis}_sizes",
                             const_value=ir.tensor(np.ones(dims[axis], np.int64)))
            model.graph.register_initializer(sizes)
            split = ir.Node("", "Split", [value, sizes], attributes=[ir.AttrInt64("axis", axis)],
                            num_outputs=dims[axis], name=f"{value.name}_unbind")
            nodes = [by_start[i] for i in range(dims[axis])]
            ids = {id(n) for n in nodes}
            model.graph.insert_before(next(n for n in model.graph if id(n) in ids), split)
            renamed = []
            for out, node in zip(split.outputs, nodes):
                old = node.outputs[0]
                out.name = old.name + "_unbind"
                out.shape, out.type = old.shape, old.type
                if old.is_graph_output():
                    renamed.append((out, old.name))
                ir.convenience.replace_all_uses_with(old, out, replace_graph_outputs=True)
            for node in nodes:
                model.graph.remove(node, safe=True)
            for out, name in renamed:
                out.name = name
            count += 1
    return count


def _transpose_via_reshape(x, t, out) -> list[int] | None:
    """The perm of the rank-r Transpose that Reshape(Transpose(Reshape(x, [-1, S, d]),
    [0, 2, 1]), L + [d, S]) is, for x of static shape L + [S, d]; None when it is not one."""
    sx, st, so = shape(x), shape(t), shape(out)
    if sx is None or st is None or so is None or len(sx) < 3 or len(st) != 3:
        return None
    if not all(isinstance(d, int) and d > 0 for d in list(sx) + list(st) + list(so)):
        return None
    lead, (s_, d) = list(sx[:-2]), sx[-2:]
    if list(st) != [int(np.prod(lead)), d, s_] or list(so) != lead + [d, s_] or \
            _perm(t, 3) != [0, 2, 1]:
        return None
    r = len(sx)
    return list(range(r - 2)) + [r - 1, r - 2]


fusion("transpose_via_reshape", family="layout", priority=88,
       pattern=lambda op, x, s1, s2: op.Reshape(
           op.Transpose(op.Reshape(x, s1, _allow_other_attributes=True), _outputs=["t"]), s2,
           _allow_other_attributes=True, _outputs=["out"]),
       condition=lambda ctx, x, t, out, **_: _transpose_via_reshape(x, t, out) is not None,
       replacement=lambda op, x, t, out, **_: op.Transpose(x, perm=_transpose_via_reshape(x, t, out)),
       doc="Reshape(Transpose(Reshape(x, [-1,S,d]), [0,2,1]), L+[d,S]) -> Transpose(x) swapping "
           "the last two axes (torch's dynamo export of k.transpose(-2, -1))")
