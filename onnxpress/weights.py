"""Keeping a model's weights out of the copies that do not need them.

The weights are nearly all of a model's bytes, and protobuf (upb) never shares a tensor between
two messages: every copy, serialization or graph-library round trip costs the model's size
again, and memory a message once held is only given back when the whole message goes. So:

    light_copy(model)        the model without its big weights (typed graph inputs instead):
                             for shape inference and the ONNX checker
    stub_copy(model)         the model with its big weights replaced by stubs (name, type and
                             dims, no data): for analyses that must see initializers as such
    stub_of(tensor)          one stub; is_stub(tensor) tells one; stub_source(tensor) names the
                             initializer it stands for
    adopt(model, out)        make `model` what `out` describes, in place: the stubs in `out`
                             stand for `model`'s own weights, which stay where they are
    drop_initializers(graph, keep)   remove initializers in place (rebuilding the list copies
                             every tensor that stays)
"""

from __future__ import annotations

from typing import Callable, Container

import numpy as np
import onnx

STUB_LOCATION = "onnxpress:stub"
_SOURCE_KEY = "onnxpress.source"
# tensors at most this big stay in light and stub copies whatever their kind
SMALL_TENSOR_BYTES = 1024


def tensor_nbytes(t: onnx.TensorProto) -> int:
    """The bytes `t` declares (dims times item size; strings count one byte per element)."""
    try:
        itemsize = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t.data_type)).itemsize
    except (KeyError, TypeError, ValueError):
        itemsize = 1
    return int(np.prod(t.dims, dtype=np.int64)) * itemsize


def is_weight(t: onnx.TensorProto) -> bool:
    """A tensor worth keeping out of copies: its data is in memory and over SMALL_TENSOR_BYTES."""
    return (t.HasField("raw_data") and t.data_location != onnx.TensorProto.EXTERNAL
            and tensor_nbytes(t) > SMALL_TENSOR_BYTES)


def set_external(t: onnx.TensorProto, entries: dict[str, object]) -> onnx.TensorProto:
    """Mark `t` as holding its data elsewhere, described by `entries` (location, offset...)."""
    t.data_location = onnx.TensorProto.EXTERNAL
    del t.external_data[:]
    for key, value in entries.items():
        entry = t.external_data.add()
        entry.key, entry.value = key, str(value)
    return t


def stub_of(t: onnx.TensorProto) -> onnx.TensorProto:
    """A stand-in for `t`: its name, type and dims without data, marked as a stub."""
    return set_external(onnx.TensorProto(name=t.name, data_type=t.data_type, dims=list(t.dims)),
                        {"location": STUB_LOCATION, _SOURCE_KEY: t.name})


def stub_source(t: onnx.TensorProto) -> str | None:
    """The name of the initializer `t` stands for when `t` is a stub, else None."""
    if t.data_location != onnx.TensorProto.EXTERNAL or not t.external_data:
        return None
    entries = {e.key: e.value for e in t.external_data}
    return entries.get(_SOURCE_KEY) if entries.get("location") == STUB_LOCATION else None


def is_stub(t: onnx.TensorProto) -> bool:
    return stub_source(t) is not None


def copy_fields(src, dst, skip: Container[str] = ()) -> None:
    """Set every field of `dst` (a message of `src`'s type) but those in `skip` to `src`'s."""
    for f in src.DESCRIPTOR.fields:
        if f.name in skip:
            continue
        dst.ClearField(f.name)
        if f.is_repeated:
            getattr(dst, f.name).extend(getattr(src, f.name))
        elif src.HasField(f.name):
            if f.message_type is not None:
                getattr(dst, f.name).CopyFrom(getattr(src, f.name))
            else:
                setattr(dst, f.name, getattr(src, f.name))


def _shell(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of `model` without the main graph's initializers."""
    shell = onnx.ModelProto()
    copy_fields(model, shell, skip=("graph",))
    copy_fields(model.graph, shell.graph, skip=("initializer",))
    return shell


def _small_int(t: onnx.TensorProto) -> bool:
    return t.data_type in (onnx.TensorProto.INT64, onnx.TensorProto.INT32) and \
        int(np.prod(t.dims, dtype=np.int64)) <= 64


def light_copy(model: onnx.ModelProto,
               keep: Callable[[onnx.TensorProto], bool] = _small_int) -> onnx.ModelProto:
    """The model without its big weights: the main graph's initializers `keep` rejects become
    typed graph inputs (or just go, when already inputs). That is all shape inference needs
    of them (by default small integer constants stay, for Reshape targets and the like) and
    all the checker needs besides the per-tensor checks `check_weights` does. Subgraphs are
    kept as they are."""
    light = _shell(model)
    inputs = {i.name for i in model.graph.input}
    for t in model.graph.initializer:
        if keep(t) and not is_stub(t):
            light.graph.initializer.append(t)
        elif t.name not in inputs:
            light.graph.input.append(
                onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    return light


def stub_copy(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of `model` whose weights (`is_weight`) are stubs: for analyses of the graph that
    never read weight values (shapes, sizes, liveness). `adopt` or the original model gives the
    values back."""
    copy = _shell(model)
    copy.graph.initializer.extend(stub_of(t) if is_weight(t) else t for t in model.graph.initializer)
    return copy


def check_weights(model: onnx.ModelProto) -> None:
    """What the ONNX checker checks of the weights `light_copy` leaves out: each holds as many
    bytes as its type and dims declare, and (IR version 3) is also a graph input. Raises
    onnx.checker.ValidationError as the checker does."""
    inputs = {i.name for i in model.graph.input}
    for t in model.graph.initializer:
        if not is_weight(t):
            continue
        have, need = len(t.raw_data), tensor_nbytes(t)
        if have < need:
            raise onnx.checker.ValidationError(
                f"TensorProto (tensor name: {t.name}) raw_data size ({have} bytes) is too small "
                f"for the declared shape and type ({need} bytes required).")
        if model.ir_version <= 3 and t.name not in inputs:
            raise onnx.checker.ValidationError(
                f"{t.name} in initializer but not in graph input")


def drop_initializers(graph: onnx.GraphProto, keep: Callable[[onnx.TensorProto], bool]) -> int:
    """Remove the initializers of `graph` that `keep` rejects, in place; returns how many went.
    (Rebuilding the list instead, `del graph.initializer[:]` then `extend`, copies every tensor
    that stays.)"""
    gone = [i for i, t in enumerate(graph.initializer) if not keep(t)]
    for i in reversed(gone):
        del graph.initializer[i]
    return len(gone)


def adopt(model: onnx.ModelProto, out: onnx.ModelProto) -> onnx.ModelProto:
    """Make `model` the model `out` describes, in place, and return it.

    `out` is what a graph library (onnx-graphsurgeon, onnx_ir) wrote from `model` after
    `model`'s own weights were replaced by stubs (`stub_of`) in the library's graph: a stub
    named as the initializer it stands for keeps that initializer where it is, uncopied; a
    renamed stub, or one a subgraph took, gets a copy of it. Initializers `out` no longer has
    leave `model`; new ones are copied in; every other field is `out`'s."""
    g = model.graph
    own = {t.name: t for t in g.initializer}
    kept: set[str] = set()
    fresh: list[onnx.TensorProto] = []
    from onnxpress.stats import iter_graphs

    for sub in iter_graphs(out.graph):
        for t in sub.initializer:
            src = stub_source(t)
            if src is not None and src not in own:
                raise ValueError(f"stub '{t.name}' stands for '{src}', which the model lacks")
            if sub is out.graph and src == t.name and src not in kept:
                kept.add(src)
                continue
            if src is not None:
                name = t.name
                t.CopyFrom(own[src])
                t.name = name
            if sub is out.graph:
                fresh.append(t)
    drop_initializers(g, lambda t: t.name in kept)
    g.initializer.extend(fresh)
    order = {t.name: i for i, t in enumerate(out.graph.initializer)}
    g.initializer.sort(key=lambda t: order[t.name])      # pointers move, tensors do not
    copy_fields(out.graph, g, skip=("initializer",))
    copy_fields(out, model, skip=("graph",))
    return model
