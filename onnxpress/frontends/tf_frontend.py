"""TensorFlow / Keras: a Keras model, a `.keras` file or a SavedModel directory to checked ONNX.

    model = ox.frontends.tf.from_keras(keras_model)                 # a keras.Model object
    model = ox.frontends.tf.from_keras_file("model.keras")          # Keras 3 archive (or .h5)
    model = ox.frontends.tf.from_saved_model("exported/")           # tf.saved_model directory
    model = ox.frontends.tf.convert(anything_above)                 # picks one of the three

Conversion is done by tf2onnx (the maintained TensorFlow -> ONNX converter; Keras 3's own
`model.export(format="onnx")` calls the same library). Input and output names are kept: Keras
input layer names and output layer names, SavedModel signature keys. Layouts are kept too (Keras
is NHWC): `inputs_as_nchw=["image"]` makes an input NCHW, as PyTorch-style pipelines expect.

Needs the `tf` extra: pip install 'onnxpress[tf]' (tensorflow-cpu, tf2onnx; versions pinned in
constraints.txt).
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import onnx

from onnxpress.errors import FrontendError, MissingExtraError
from onnxpress.frontends.onnx_frontend import import_model

DEFAULT_OPSET = 17
KERAS_SUFFIXES = (".keras", ".h5", ".hdf5")

_INSTALL_HINT = "pip install 'onnxpress[tf]' (tensorflow-cpu and tf2onnx, pinned in constraints.txt)"


def _tf():
    # TensorFlow prints C++ banners on import unless told not to; keep the user's setting if any.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    try:
        import tensorflow as tf
    except ImportError:
        raise MissingExtraError(f"the TensorFlow/Keras frontend needs tensorflow: {_INSTALL_HINT}") from None
    return tf


def _tf2onnx():
    _tf()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import tf2onnx
    except ImportError:
        raise MissingExtraError(f"the TensorFlow/Keras frontend needs tf2onnx: {_INSTALL_HINT}") from None
    logging.getLogger("tf2onnx").setLevel(logging.ERROR)
    return tf2onnx


def available() -> bool:
    """True when tensorflow and tf2onnx both import."""
    try:
        _tf2onnx()
    except MissingExtraError:
        return False
    return True


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """tf2onnx logs and warns per op; its messages are not actionable for onnxpress users."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with contextlib.redirect_stdout(io.StringIO()):
            yield


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _finish(proto: onnx.ModelProto, source: str) -> onnx.ModelProto:
    proto.producer_name = proto.producer_name or "tf2onnx"
    meta = proto.metadata_props.add()
    meta.key, meta.value = "onnxpress.source", source
    try:
        return import_model(proto)
    except Exception as exc:
        raise FrontendError(f"{source}: tf2onnx produced an ONNX model that does not check: "
                            f"{_first_line(exc)}") from None


def _is_keras_model(obj: Any) -> bool:
    mod = type(obj).__module__ or ""
    if not (mod.startswith("keras") or mod.startswith("tf_keras") or ".keras" in mod):
        return False
    return hasattr(obj, "inputs") and hasattr(obj, "outputs") and hasattr(obj, "predict")


def from_keras(
    model: Any,
    *,
    opset: int = DEFAULT_OPSET,
    input_signature: Sequence[Any] | None = None,
    inputs_as_nchw: Sequence[str] | None = None,
    name: str | None = None,
) -> onnx.ModelProto:
    """Convert an in-memory Keras model (Keras 3 or tf.keras) to a checked ONNX model.

    Functional and Sequential models built with an Input know their signature; a subclassed model
    needs `input_signature=[tf.TensorSpec(shape, dtype, name=...)]`. The batch dimension stays
    dynamic when the Keras input leaves it as None.
    """
    tf = _tf()
    tf2onnx = _tf2onnx()
    if not _is_keras_model(model):
        raise FrontendError(f"from_keras() needs a Keras model, got {type(model).__name__}")
    source = name or f"keras model '{getattr(model, 'name', type(model).__name__)}'"
    if input_signature is None:
        specs = []
        try:
            for t in model.inputs or []:
                shape = tuple(t.shape)
                specs.append(tf.TensorSpec(shape, tf.as_dtype(t.dtype), name=_clean_name(t.name)))
        except (AttributeError, TypeError, ValueError):
            specs = []
        if not specs:
            raise FrontendError(
                f"{source} has no known inputs (a subclassed model that was never called?): "
                "give input_signature=[tf.TensorSpec(shape, dtype, name=...)]")
        input_signature = specs
    try:
        with _quiet():
            proto, _ = tf2onnx.convert.from_keras(
                model, input_signature=tuple(input_signature), opset=opset,
                inputs_as_nchw=list(inputs_as_nchw) if inputs_as_nchw else None)
    except Exception as exc:
        raise FrontendError(f"tf2onnx could not convert {source}: {_first_line(exc)}") from None
    return _finish(proto, source)


def _clean_name(name: str) -> str:
    # tf2onnx appends ':0' to tensor names on its own; Keras names have none.
    return name.split(":")[0]


def from_keras_file(path: str | os.PathLike, **kwargs: Any) -> onnx.ModelProto:
    """Load a `.keras` archive (or legacy `.h5`) with Keras and convert it (see from_keras)."""
    _tf()
    p = Path(path)
    if not p.exists():
        raise FrontendError(f"{p}: no such file")
    import keras

    try:
        with _quiet():
            model = keras.saving.load_model(str(p), compile=False)
    except Exception as exc:
        raise FrontendError(f"{p}: Keras could not load it ({_first_line(exc)}); is it a Keras "
                            "model saved with model.save('model.keras')?") from None
    return from_keras(model, name=str(p), **kwargs)


def is_saved_model(path: str | os.PathLike) -> bool:
    p = Path(path)
    return p.is_dir() and ((p / "saved_model.pb").exists() or (p / "saved_model.pbtxt").exists())


def from_saved_model(
    path: str | os.PathLike,
    *,
    signature: str | None = None,
    tag: str = "serve",
    opset: int = DEFAULT_OPSET,
    inputs_as_nchw: Sequence[str] | None = None,
) -> onnx.ModelProto:
    """Convert a TensorFlow SavedModel directory (`tf.saved_model.save`, `model.export(dir)`).

    The signature (default: the first one, usually `serving_default`) gives the graph's inputs
    and outputs; ONNX names are the signature's keys.
    """
    tf = _tf()
    tf2onnx = _tf2onnx()
    p = Path(path)
    if not is_saved_model(p):
        raise FrontendError(f"{p} is not a TensorFlow SavedModel directory (no saved_model.pb in it)")
    from tf2onnx import tf_loader

    try:
        with _quiet():
            graph_def, inputs, outputs, tables, renames = tf_loader.from_saved_model(
                str(p), None, None, tag=tag, signatures=[signature] if signature else None,
                return_initialized_tables=True, return_tensors_to_rename=True)
    except Exception as exc:
        raise FrontendError(f"{p}: TensorFlow could not load the SavedModel (tag '{tag}', signature "
                            f"'{signature or 'first'}'): {_first_line(exc)}") from None
    nchw = None
    if inputs_as_nchw:
        by_key = {v: k for k, v in renames.items()}
        nchw = [by_key.get(n, n) for n in inputs_as_nchw]
    try:
        with _quiet(), tf.device("/cpu:0"):
            # The same conversion tf2onnx's command line runs for --saved-model.
            proto, _ = tf2onnx.convert._convert_common(
                graph_def, name=str(p), opset=opset, input_names=inputs, output_names=outputs,
                tensors_to_rename=renames, initialized_tables=tables, inputs_as_nchw=nchw)
    except Exception as exc:
        raise FrontendError(f"tf2onnx could not convert the SavedModel {p}: {_first_line(exc)}") from None
    return _finish(proto, str(p))


def convert(model: Any, **kwargs: Any) -> onnx.ModelProto:
    """A Keras model object, a `.keras`/`.h5` file or a SavedModel directory -> ONNX."""
    if isinstance(model, (str, os.PathLike)):
        p = Path(model)
        if is_saved_model(p):
            return from_saved_model(p, **kwargs)
        if p.suffix.lower() in KERAS_SUFFIXES:
            return from_keras_file(p, **kwargs)
        if p.is_dir():
            raise FrontendError(f"{p} is a directory but not a TensorFlow SavedModel (no saved_model.pb)")
        raise FrontendError(f"{p}: not a Keras file ({', '.join(KERAS_SUFFIXES)}) or a SavedModel directory")
    if _is_keras_model(model):
        return from_keras(model, **kwargs)
    raise FrontendError(f"cannot convert {type(model).__name__} with the TensorFlow frontend: give a "
                        "Keras model, a .keras file or a SavedModel directory")


def run_reference(model: Any, feeds: Mapping[str, Any]) -> dict[str, Any]:
    """TensorFlow's own outputs for `feeds` (a Keras model, .keras file or SavedModel), keyed like
    the converted ONNX model's outputs: the reference the frontend's tests compare against."""
    import numpy as np

    tf = _tf()
    if isinstance(model, (str, os.PathLike)) and is_saved_model(model):
        loaded = tf.saved_model.load(str(model))
        fn = loaded.signatures[next(iter(loaded.signatures))]
        out = fn(**{k: tf.constant(v) for k, v in feeds.items()})
        return {k: np.asarray(v) for k, v in out.items()}
    if isinstance(model, (str, os.PathLike)):
        import keras

        model = keras.saving.load_model(str(model), compile=False)
    arrays = [feeds[_clean_name(t.name)] for t in model.inputs]
    out = model(arrays if len(arrays) > 1 else arrays[0], training=False)
    outs = out if isinstance(out, (list, tuple)) else [out]
    names = list(getattr(model, "output_names", None) or [f"output_{i}" for i in range(len(outs))])
    return {n: np.asarray(o) for n, o in zip(names, outs)}


__all__ = ["available", "convert", "from_keras", "from_keras_file", "from_saved_model",
           "is_saved_model", "run_reference", "DEFAULT_OPSET"]
