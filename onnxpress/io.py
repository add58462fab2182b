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


def _check(model: onnx.ModelProto, where: str, path: Path | None = None) -> None:
    try:
        if path is not None and _approx_size(model) > EXTERNAL_DATA_THRESHOLD:
            onnx.checker.check_model(str(path))
        else:
            onnx.checker.check_model(model)
    except onnx.checker.ValidationError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else repr(exc)
        raise InvalidModelError(f"{where} is not a valid ONNX model: {first}") from None
    except Exception as exc:  # the checker raises odd things on odd inputs
        raise InvalidModelError(f"{where} failed the ONNX checker: {exc}") from None


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
            _check(model, "the given ModelProto")
        return model
    if isinstance(model, (bytes, bytearray, memoryview)):
        proto = _parse_bytes(bytes(model), "the given bytes")
        if check:
            _check(proto, "the given bytes")
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
            try:
                onnx.external_data_helper.load_external_data_for_model(proto, str(path.parent))
            except (OSError, ValueError) as exc:
                raise ModelLoadError(
                    f"{path}: its external data could not be read ({exc}); keep the data file "
                    "beside the model"
                ) from None
        if check:
            _check(proto, str(path), path)
        return proto
    proto = graph_object_to_proto(model)
    if proto is not None:
        if check:
            _check(proto, f"the given {type(model).__name__}")
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
        if external_data:
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
                f.write(model.SerializeToString())
        os.replace(tmp_model, path)
    except (OSError, ValueError) as exc:
        raise ModelSaveError(f"could not write {path}: {exc}") from None
    finally:
        for leftover in Path(tmpdir).glob("*"):
            leftover.unlink()
        os.rmdir(tmpdir)
    return path


def _approx_size(model: onnx.ModelProto) -> int:
    from onnxpress.stats import model_bytes

    return model_bytes(model)
