"""Reading and writing ONNX models, safely.

`load` accepts a path, raw bytes, a ModelProto or GraphProto, an onnx-graphsurgeon Graph or an
onnx_ir Model, and always returns a checked ModelProto.
`save` writes to a temporary file beside the destination and renames it into place, so a crash
never leaves a half-written model; models over 2 GiB (or on request) go out with external data.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Union

import onnx
from google.protobuf.message import DecodeError

from onnxpress.errors import InvalidModelError, ModelLoadError, ModelSaveError

# (also onnx.GraphProto, an onnx-graphsurgeon Graph and an onnx_ir Model: see graph_object_to_proto)
ModelLike = Union[str, os.PathLike, bytes, onnx.ModelProto, onnx.GraphProto]

# protobuf cannot serialize a single message over 2 GiB; stay clear of it.
EXTERNAL_DATA_THRESHOLD = 2**31 - 2**24


def checker_problem(model: onnx.ModelProto) -> str | None:
    """What the ONNX checker finds wrong with `model` (its first line), or None.

    It runs on a copy without the big weights (`weights.light_copy`: serializing them for the
    checker's C++ side cost twice the model's bytes) plus the checks of those weights the
    checker would have made (`weights.check_weights`), so models of any size are checked the
    same way, in memory."""
    from onnxpress.weights import check_weights, is_weight, light_copy

    try:
        check_weights(model)
        onnx.checker.check_model(light_copy(model, keep=lambda t: not is_weight(t)))
    except onnx.checker.ValidationError as exc:
        return str(exc).strip().splitlines()[0] if str(exc).strip() else repr(exc)
    except Exception as exc:  # the checker raises odd things on odd inputs
        return f"the checker failed: {exc}"
    return None


def check_model(model: onnx.ModelProto, where: str = "the model") -> None:
    """Raise InvalidModelError, saying `where` the model came from, when the checker rejects it."""
    problem = checker_problem(model)
    if problem is not None:
        raise InvalidModelError(f"{where} is not a valid ONNX model: {problem}")


def _parse_bytes(data: bytes, where: str) -> onnx.ModelProto:
    model = onnx.ModelProto()
    try:
        model.ParseFromString(data)
    except (DecodeError, RuntimeError, ValueError) as exc:
        raise ModelLoadError(
            f"{where} is not an ONNX model or is truncated ({type(exc).__name__}: {exc}); "
            "re-export it or check the download"
        ) from None
    if not model.HasField("graph") or model.ir_version == 0:
        raise ModelLoadError(
            f"{where} parsed as protobuf but holds no ONNX graph (ir_version={model.ir_version}); "
            "is it really an .onnx file?"
        )
    return model


def load(model: ModelLike, *, check: bool = True, load_external_data: bool = True) -> onnx.ModelProto:
    """Return a ModelProto from a path, bytes or a ModelProto (returned as is, not copied).

    A `.keras`/`.h5` file or a TensorFlow SavedModel directory is converted with the TensorFlow
    frontend (needs `pip install onnxpress[tf]`).

    External data next to the file is loaded. Raises ModelLoadError for unreadable input and
    InvalidModelError when the checker rejects the model.
    """
    if isinstance(model, onnx.ModelProto):
        if check:
            check_model(model, "the given ModelProto")
        return model
    if isinstance(model, (bytes, bytearray, memoryview)):
        proto = _parse_bytes(bytes(model), "the given bytes")
        if check:
            check_model(proto, "the given bytes")
        return proto
    if isinstance(model, (str, os.PathLike)):
        path = Path(model)
        if path.suffix.lower() in (".keras", ".h5") or (path / "saved_model.pb").exists():
            # Keras files and SavedModels convert through the TensorFlow frontend (extra `tf`)
            from onnxpress.frontends.auto import import_any

            return import_any(path)
        if path.is_dir():
            raise ModelLoadError(f"{path} is a directory, not an .onnx file")
        if not path.exists():
            raise ModelLoadError(f"{path}: no such file")
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise ModelLoadError(f"{path}: cannot read ({exc.strerror})") from None
        if not data:
            raise ModelLoadError(f"{path} is empty")
        proto = _parse_bytes(data, str(path))
        if load_external_data and _uses_external_data(proto):
            missing = sorted({loc for loc in _external_locations(proto)
                              if not (path.parent / loc).is_file()})
            if missing:
                raise ModelLoadError(
                    f"{path}: its weights are stored in {', '.join(repr(m) for m in missing)}, "
                    f"which is not beside it in {path.parent}; copy or move the model together "
                    "with its data file (a model renamed after export still names the old file)")
            try:
                onnx.external_data_helper.load_external_data_for_model(proto, str(path.parent))
            except (OSError, ValueError, onnx.checker.ValidationError) as exc:
                raise ModelLoadError(
                    f"{path}: its external data could not be read ({exc}); keep the data file "
                    "beside the model"
                ) from None
        if check:
            check_model(proto, str(path))
        return proto
    proto = graph_object_to_proto(model)
    if proto is not None:
        if check:
            check_model(proto, f"the given {type(model).__name__}")
        return proto
    raise ModelLoadError(
        f"cannot load a model from {type(model).__name__}; give a path, bytes, an "
        "onnx.ModelProto or GraphProto, an onnx-graphsurgeon Graph or an onnx_ir Model"
    )


# -- the graph objects people in this ecosystem hold ---------------------------------------------
def _graph_kind(obj) -> str | None:
    """'graphproto', 'gs' (onnx-graphsurgeon Graph) or 'ir' (onnx_ir Model), by type alone:
    neither library is imported unless the object comes from it."""
    if isinstance(obj, onnx.GraphProto):
        return "graphproto"
    module = type(obj).__module__ or ""
    if module.startswith("onnx_graphsurgeon") and type(obj).__name__ == "Graph":
        return "gs"
    if module.startswith("onnx_ir") and type(obj).__name__ == "Model":
        return "ir"
    return None


def graph_object_to_proto(obj) -> onnx.ModelProto | None:
    """A ModelProto for a GraphProto (opset: onnx's current one; better give a ModelProto),
    an onnx-graphsurgeon Graph or an onnx_ir Model; None for anything else."""
    kind = _graph_kind(obj)
    try:
        if kind == "graphproto":
            return onnx.helper.make_model(obj)
        if kind == "gs":
            import onnx_graphsurgeon as gs

            return gs.export_onnx(obj)
        if kind == "ir":
            import onnx_ir as ir

            return ir.to_proto(obj)
    except Exception as exc:
        raise ModelLoadError(f"cannot convert the given {type(obj).__name__} to ONNX: "
                             f"{str(exc).strip().splitlines()[0] if str(exc).strip() else exc}"
                             ) from None
    return None


def proto_as_kind_of(proto: onnx.ModelProto, like):
    """`proto` as the kind of object `like` is (bytes, GraphProto, gs.Graph, onnx_ir Model);
    a ModelProto otherwise."""
    if isinstance(like, (bytes, bytearray)):
        return proto.SerializeToString()
    kind = _graph_kind(like)
    if kind == "graphproto":
        return proto.graph
    if kind == "gs":
        import onnx_graphsurgeon as gs

        return gs.import_onnx(proto)
    if kind == "ir":
        import onnx_ir as ir

        return ir.from_proto(proto)
    return proto


def _uses_external_data(model: onnx.ModelProto) -> bool:
    return any(
        t.data_location == onnx.TensorProto.EXTERNAL
        for t in onnx.external_data_helper._get_all_tensors(model)
    )


def _external_locations(model: onnx.ModelProto) -> set[str]:
    return {e.value for t in onnx.external_data_helper._get_all_tensors(model)
            if t.data_location == onnx.TensorProto.EXTERNAL
            for e in t.external_data if e.key == "location"}


def save(
    model: onnx.ModelProto,
    path: str | os.PathLike,
    *,
    external_data: bool | None = None,
    size_threshold: int = 1024,
) -> Path:
    """Write `model` to `path` atomically; return the path.

    `external_data=None` picks external data only when the model would exceed protobuf's 2 GiB
    limit; True forces it (tensors over `size_threshold` bytes go to `<name>.data`).
    """
    if not isinstance(model, onnx.ModelProto):
        raise ModelSaveError(f"save() needs an onnx.ModelProto, got {type(model).__name__}")
    path = Path(path)
    if path.is_dir():
        raise ModelSaveError(f"{path} is a directory; give a file name such as {path / 'model.onnx'}")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.exists():
        parent.mkdir(parents=True, exist_ok=True)
    if external_data is None:
        external_data = _approx_size(model) > EXTERNAL_DATA_THRESHOLD
    tmpdir = tempfile.mkdtemp(prefix=f".{path.name}.", dir=parent)
    try:
        tmp_model = Path(tmpdir) / path.name
        if external_data and not _subgraph_weights(model, size_threshold):
            data_name = path.name + ".data"
            with open(Path(tmpdir) / data_name, "wb") as data, open(tmp_model, "wb") as f:
                write_serialized(model, f, emit=lambda t: _to_external(
                    t, data, data_name, size_threshold))
            os.replace(Path(tmpdir) / data_name, parent / data_name)
        elif external_data:   # weights inside If/Loop bodies too: onnx's writer finds them all
            proto = onnx.ModelProto()
            proto.CopyFrom(model)
            data_name = path.name + ".data"
            onnx.save_model(
                proto,
                str(tmp_model),
                save_as_external_data=True,
                all_tensors_to_one_file=True,
                location=data_name,
                size_threshold=size_threshold,
                convert_attribute=False,
            )
            os.replace(Path(tmpdir) / data_name, parent / data_name)
        else:
            with open(tmp_model, "wb") as f:
                write_serialized(model, f)
        os.replace(tmp_model, path)
    except (OSError, ValueError) as exc:
        raise ModelSaveError(f"could not write {path}: {exc}") from None
    finally:
        for leftover in Path(tmpdir).glob("*"):
            leftover.unlink()
        os.rmdir(tmpdir)
    return path


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        low, n = n & 0x7F, n >> 7
        out.append(low | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _length_delimited(field: int, size: int) -> bytes:
    return _varint(field << 3 | 2) + _varint(size)


def write_serialized(model: onnx.ModelProto, f, emit=None) -> None:
    """Write what `model.SerializeToString()` parses back to, one weight at a time: the
    serialized model is never all in memory (that cost its bytes twice over, once in protobuf's
    buffer and once as Python bytes). A message's bytes are its fields' bytes concatenated, so
    the graph goes out as its other fields followed by its initializers, each the tensor
    `emit(tensor)` returns when `emit` is given (called once per tensor, in order)."""
    from onnxpress.weights import copy_fields

    if not model.HasField("graph"):
        f.write(model.SerializeToString())
        return
    head = onnx.ModelProto()
    copy_fields(model, head, skip=("graph",))
    graph = onnx.GraphProto()
    copy_fields(model.graph, graph, skip=("initializer",))
    body = graph.SerializeToString()
    field = onnx.GraphProto.DESCRIPTOR.fields_by_name["initializer"].number
    tensors = list(model.graph.initializer) if emit is None else \
        [emit(t) for t in model.graph.initializer]
    sizes = [t.ByteSize() for t in tensors]
    total = len(body) + sum(len(_length_delimited(field, n)) + n for n in sizes)
    f.write(head.SerializeToString())
    f.write(_length_delimited(onnx.ModelProto.DESCRIPTOR.fields_by_name["graph"].number, total))
    f.write(body)
    for t, n in zip(tensors, sizes):
        f.write(_length_delimited(field, n))
        f.write(t.SerializeToString())


def _to_external(t: onnx.TensorProto, data, location: str, threshold: int) -> onnx.TensorProto:
    """`t` itself when it is small; else its bytes appended to the file `data` and a tensor
    that points there, as onnx's external data writer makes it."""
    if not t.HasField("raw_data") or len(t.raw_data) < threshold:
        return t
    from onnxpress.weights import copy_fields, set_external

    offset = data.tell()
    data.write(t.raw_data)
    out = onnx.TensorProto()
    copy_fields(t, out, skip=("raw_data", "external_data", "data_location"))
    return set_external(out, {"location": location, "offset": offset,
                              "length": data.tell() - offset})


def _subgraph_weights(model: onnx.ModelProto, threshold: int) -> bool:
    """Whether an If/Loop/Scan body holds an initializer that would go to external data."""
    from onnxpress.stats import iter_graphs

    return any(t.HasField("raw_data") and len(t.raw_data) >= threshold
               for g in iter_graphs(model.graph) if g is not model.graph for t in g.initializer)


def _approx_size(model: onnx.ModelProto) -> int:
    from onnxpress.stats import model_bytes

    return model_bytes(model)
