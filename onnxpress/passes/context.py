"""What a pass sees besides the model: calibration data, target, seed, shared analyses.

Analyses (shapes, calibration statistics, liveness...) are computed lazily, cached on the
context and invalidated by the pipeline after any pass that changed the model, unless that pass
listed them in `ctx.preserve(...)`. Register one with `@register_analysis("name")`; a pass asks
for it with `ctx.analysis("name", model, **params)`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterable, Mapping

import numpy as np
import onnx

from onnxpress.data import CalibrationData, as_calibration
from onnxpress.errors import CalibrationError, PassError, PassOptionError

_ANALYSES: dict[str, Callable[..., Any]] = {}
# what a pipeline can be run for: onnxruntime, or the TVM backend (host, or a named target)
TARGETS = ("ort", "tvm", "x86", "arm", "cuda")


def register_analysis(name: str) -> Callable:
    """Register `fn(model, ctx, **params) -> value` as a cached analysis named `name`."""

    def decorate(fn: Callable) -> Callable:
        _ANALYSES[name] = fn
        return fn

    return decorate


def _freeze(value: Any) -> Any:
    if isinstance(value, Mapping):
        return tuple(sorted((k, _freeze(v)) for k, v in value.items()))
    if isinstance(value, (list, tuple, set)):
        return tuple(_freeze(v) for v in value)
    return value


@dataclasses.dataclass
class PassContext:
    """Shared state for one pipeline run.

    calib:   calibration data (CalibrationData; anything `calib=` accepts is normalised)
    target:  the backend the model is meant for: "ort" (default), "tvm", "x86", "arm", "cuda"
    seed:    seed for every random choice a pass makes (use `ctx.rng()`)
    shapes:  sizes for dynamic dims, {input name: shape} or {dim name: size}
    progress: show progress bars on long work
    keep_initializer_inputs: initializers also listed as graph inputs stay overridable inputs
        (by default the pipeline makes them constants first: see `constant_initializers`)
    """

    calib: Any = None
    target: str = "ort"
    seed: int = 0
    shapes: dict[str, Any] | None = None
    progress: bool = True
    keep_initializer_inputs: bool = False
    options: dict[str, Any] = dataclasses.field(default_factory=dict)
    _cache: dict = dataclasses.field(default_factory=dict, repr=False)
    _figures: dict = dataclasses.field(default_factory=dict, repr=False)
    _preserved: set = dataclasses.field(default_factory=set, repr=False)
    _current_pass: str | None = dataclasses.field(default=None, repr=False)
    _children: list = dataclasses.field(default_factory=list, repr=False)   # a pipeline's reports

    def __post_init__(self) -> None:
        self.calib = as_calibration(self.calib)
        target = (self.target or "ort").lower()
        if target not in TARGETS:
            raise PassOptionError(f"unknown target '{self.target}'; use one of {', '.join(TARGETS)} "
                                  "(ort: onnxruntime with its contrib ops; tvm/x86/arm/cuda: plain "
                                  "ONNX for the TVM backend)")
        self.target = target

    @property
    def for_onnxruntime(self) -> bool:
        """Whether the model is meant for onnxruntime (contrib ops and its timings apply)."""
        return self.target == "ort"

    # -- calibration ------------------------------------------------------------------------
    def require_calib(self, model: onnx.ModelProto | None = None) -> CalibrationData:
        """The calibration data, validated against `model`; a clear error when there is none."""
        if self.calib is None:
            who = f"pass '{self._current_pass}'" if self._current_pass else "this pass"
            raise CalibrationError(
                f"{who} needs calibration data: pass calib= (a list of {{input: array}} dicts, an "
                ".npz path or a callable) or --calib FILE.npz on the command line"
            )
        if model is not None:
            key = ("__calib_valid__", id(self.calib), tuple(i.name for i in model.graph.input))
            if key not in self._cache:
                self.calib.validate(model)
                self._cache[key] = True
        return self.calib

    # -- randomness -------------------------------------------------------------------------
    def rng(self, salt: int = 0) -> np.random.Generator:
        return np.random.default_rng(self.seed + salt)

    # -- analyses ---------------------------------------------------------------------------
    def analysis(self, name: str, model: onnx.ModelProto, **params: Any) -> Any:
        if name not in _ANALYSES:
            # analyses live beside the passes that own them: load those modules, then retry
            from onnxpress.passes.registry import _load_builtins

            _load_builtins()
        if name not in _ANALYSES:
            raise PassError(f"no analysis named '{name}'; known: {', '.join(sorted(_ANALYSES))}")
        key = (name, _freeze(params))
        if key not in self._cache:
            self._cache[key] = _ANALYSES[name](model, self, **params)
        return self._cache[key]

    def preserve(self, *names: str) -> None:
        """Declare that the current pass kept these analyses valid (they survive it)."""
        self._preserved.update(names)

    def invalidate(self, keep: Iterable[str] = ()) -> None:
        keep = set(keep)
        self._cache = {k: v for k, v in self._cache.items()
                       if k[0] in keep or k[0] == "__calib_valid__"}

    # -- reporting --------------------------------------------------------------------------
    def record(self, **figures: Any) -> None:
        """Add pass-specific figures to the current pass's report (patterns fused, sparsity...)."""
        self._figures.update(figures)

    def progress_bar(self, iterable: Iterable, *, desc: str, total: int | None = None):
        """A tqdm progress bar over `iterable` when progress is on; the iterable itself otherwise."""
        if not self.progress:
            return iterable
        from tqdm.auto import tqdm

        return tqdm(iterable, desc=desc, total=total, leave=False, dynamic_ncols=True)


@register_analysis("shapes")
def _shapes_analysis(model: onnx.ModelProto, ctx: PassContext, *,
                     symbolic: bool = True) -> dict[str, tuple[int, list]]:
    """{tensor name: (elem_type, dims)} from onnx shape inference (dims: int, str or None),
    completed by onnxruntime's symbolic inference unless `symbolic=False` (use that where a
    wrong static dim would change results, e.g. constant folding)."""
    from onnxpress.passes.graph import infer_shapes

    inferred = infer_shapes(model, strict=False, symbolic=symbolic, weights=False)
    out = {}
    from onnxpress.stats import iter_graphs

    for g in iter_graphs(inferred.graph):
        for vi in list(g.input) + list(g.value_info) + list(g.output):
            tt = vi.type.tensor_type
            if not vi.type.HasField("tensor_type"):
                continue
            dims = None
            if tt.HasField("shape"):
                dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
                        for d in tt.shape.dim]
            out[vi.name] = (tt.elem_type, dims)
        for t in g.initializer:
            out[t.name] = (t.data_type, list(t.dims))
    return out

