"""Calibration and evaluation data: what `calib=` accepts, normalised to one re-iterable type.

`calib=` may be
  * an iterable of {input name: array} dicts (a list is re-iterable; a one-shot generator is
    consumed once and kept in memory, so prefer a callable for large sets),
  * a path to an `.npz` file whose arrays are named after the model inputs, batch on axis 0,
  * a callable returning a fresh iterator of such dicts (streamed: nothing is kept).

`CalibrationData.validate(model)` checks names, dtypes and static dimensions against the model's
graph inputs and raises CalibrationError naming the batch, input and what is wrong.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping

import numpy as np
import onnx

from onnxpress.errors import CalibrationError


class CalibrationData:
    """A re-iterable source of {input name: np.ndarray} batches."""

    def __init__(self, source: Callable[[], Iterable[Mapping[str, Any]]], *, description: str,
                 length: int | None = None):
        self._source = source
        self.description = description
        self.length = length

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        for i, batch in enumerate(self._source()):
            if not isinstance(batch, Mapping):
                raise CalibrationError(
                    f"calibration batch {i} from {self.description} is a {type(batch).__name__}, "
                    "expected a dict {input name: array}"
                )
            yield {k: np.asarray(v) for k, v in batch.items()}

    def __len__(self) -> int:
        if self.length is None:
            self.length = sum(1 for _ in self._source())
        return self.length

    def first(self) -> dict[str, np.ndarray]:
        for batch in self:
            return batch
        raise CalibrationError(f"calibration data from {self.description} is empty")

    def validate(self, model: onnx.ModelProto, *, max_batches: int | None = None) -> int:
        """Check every batch (or the first `max_batches`) against the model's inputs.

        Returns the number of batches checked. Raises CalibrationError on the first problem.
        """
        specs = graph_input_specs(model)
        n = 0
        for i, batch in enumerate(self):
            if max_batches is not None and i >= max_batches:
                break
            check_feed(batch, specs, f"calibration batch {i} ({self.description})")
            n += 1
        if n == 0:
            raise CalibrationError(
                f"calibration data from {self.description} is empty; give at least one batch"
            )
        return n


def graph_input_specs(model: onnx.ModelProto) -> dict[str, tuple[np.dtype, list]]:
    """{name: (numpy dtype, dims)} of the real graph inputs (initializers excluded);
    a dim is an int or a symbolic name / None."""
    inits = {i.name for i in model.graph.initializer}
    specs = {}
    for inp in model.graph.input:
        if inp.name in inits or not inp.type.HasField("tensor_type"):
            continue
        tt = inp.type.tensor_type
        dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type))
        dims = []
        if tt.HasField("shape"):
            for d in tt.shape.dim:
                dims.append(d.dim_value if d.HasField("dim_value") else (d.dim_param or None))
        else:
            dims = None
        specs[inp.name] = (dtype, dims)
    return specs


def static_batch(model: onnx.ModelProto) -> int | None:
    """The batch size every graph input of `model` fixes in its first dimension (None: some
    input's is symbolic or absent, so batches of any size run). Plain torch exports fix 1."""
    sizes = {dims[0] if dims and isinstance(dims[0], int) and dims[0] > 0 else None
             for _dtype, dims in graph_input_specs(model).values()}
    return sizes.pop() if len(sizes) == 1 and None not in sizes else None


def check_feed(feed: Mapping[str, np.ndarray], specs: dict, where: str) -> None:
    missing = [n for n in specs if n not in feed]
    extra = [n for n in feed if n not in specs]
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing input(s) {', '.join(missing)}")
        if extra:
            parts.append(f"unknown name(s) {', '.join(extra)}")
        raise CalibrationError(
            f"{where}: {'; '.join(parts)}; the model's inputs are {', '.join(specs)}"
        )
    for name, (dtype, dims) in specs.items():
        arr = np.asarray(feed[name])
        if arr.dtype != dtype:
            raise CalibrationError(
                f"{where}: input '{name}' has dtype {arr.dtype}, the model expects {dtype}; "
                f"convert with .astype(np.{dtype.name})"
            )
        if dims is None:
            continue
        if arr.ndim != len(dims):
            raise CalibrationError(
                f"{where}: input '{name}' has shape {tuple(arr.shape)} (rank {arr.ndim}), the model "
                f"expects rank {len(dims)} {tuple(d if isinstance(d, int) and d > 0 else '?' for d in dims)}"
            )
        for axis, (have, want) in enumerate(zip(arr.shape, dims)):
            if isinstance(want, int) and want > 0 and have != want:
                raise CalibrationError(
                    f"{where}: input '{name}' has size {have} on axis {axis}, the model expects {want} "
                    f"(shape {tuple(arr.shape)})"
                )


def npz(path: str | os.PathLike, *, batch_size: int = 1) -> CalibrationData:
    """Calibration batches from an .npz file: arrays named after the inputs, batch on axis 0."""
    path = Path(path)
    if not path.exists():
        raise CalibrationError(f"calibration file {path} does not exist")
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
    except (OSError, ValueError) as exc:
        raise CalibrationError(f"{path} is not a readable .npz file: {exc}") from None
    if not arrays:
        raise CalibrationError(f"calibration file {path} holds no arrays")
    sizes = {k: (v.shape[0] if v.ndim else 0) for k, v in arrays.items()}
    if len(set(sizes.values())) != 1:
        raise CalibrationError(
            f"{path}: arrays differ in batch size on axis 0: "
            + ", ".join(f"{k}={n}" for k, n in sizes.items())
        )
    total = next(iter(sizes.values()))
    if total == 0:
        raise CalibrationError(f"calibration file {path} is empty (0 samples on axis 0)")
    if batch_size < 1:
        raise CalibrationError(f"batch_size must be >= 1, got {batch_size}")

    def batches():
        for start in range(0, total, batch_size):
            yield {k: v[start:start + batch_size] for k, v in arrays.items()}

    return CalibrationData(batches, description=str(path), length=-(-total // batch_size))


def as_calibration(calib: Any) -> CalibrationData | None:
    """Normalise anything `calib=` accepts into CalibrationData (None stays None)."""
    if calib is None or isinstance(calib, CalibrationData):
        return calib
    if isinstance(calib, (str, os.PathLike)):
        return npz(calib)
    if isinstance(calib, Mapping):
        # a single batch given as a dict
        return CalibrationData(lambda: [calib], description="the given batch", length=1)
    if callable(calib):
        return CalibrationData(calib, description=getattr(calib, "__name__", "the given callable"))
    if isinstance(calib, (list, tuple)):
        items = list(calib)
        return CalibrationData(lambda: items, description=f"the given list of {len(items)} batches",
                               length=len(items))
    if isinstance(calib, Iterable):
        items = list(calib)  # one-shot iterator: keep it so several passes can read it
        return CalibrationData(lambda: items, description="the given iterable", length=len(items))
    raise CalibrationError(
        f"calib= got {type(calib).__name__}; give a list of {{input name: array}} dicts, "
        "an .npz path, or a callable returning an iterator"
    )


def make_inputs(model: onnx.ModelProto, *, shapes: Mapping[str, Any] | None = None,
                seed: int = 0, batch: int = 1) -> dict[str, np.ndarray]:
    """Generate a plausible feed for the model's inputs (for verification and benchmarks).

    Dynamic dims are taken from `shapes` ({input name: shape} or {dim name: size}), else `batch`
    for the first axis and 8 elsewhere. Integer inputs get small non-negative values (token ids),
    inputs named like masks get ones.
    """
    rng = np.random.default_rng(seed)
    shapes = dict(shapes or {})
    feed = {}
    for name, (dtype, dims) in graph_input_specs(model).items():
        if name in shapes:
            shape = tuple(int(s) for s in shapes[name])
        else:
            shape = []
            for axis, d in enumerate(dims or []):
                if isinstance(d, int) and d > 0:
                    shape.append(d)
                elif isinstance(d, str) and d in shapes:
                    shape.append(int(shapes[d]))
                else:
                    # a dynamic non-batch dim (a sequence, usually): 8 exercises more than 1
                    shape.append(batch if axis == 0 else 8)
            shape = tuple(shape)
        if dtype == np.bool_:
            arr = rng.random(shape) > 0.5
        elif np.issubdtype(dtype, np.integer):
            if "mask" in name.lower():
                arr = np.ones(shape, dtype=dtype)
            else:
                arr = rng.integers(0, 100, size=shape).astype(dtype)
        else:
            arr = rng.standard_normal(shape).astype(dtype)
        feed[name] = np.asarray(arr, dtype=dtype)  # a 0-d draw is a numpy scalar: make it an array
    return feed
