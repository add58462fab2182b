"""Pipelines: parse a spec into passes, validate every option, run them, report and verify.

Spec forms (all equivalent):

    "fold_constants,dce,prune:sparsity=0.5,structured=true,quant_int8"
    ["fold_constants", "dce", "prune:sparsity=0.5,structured=true", "quant_int8"]
    ["prune:0.5"]                                  # a bare value binds the first option
    [{"name": "prune", "sparsity": 0.5}, ("quant_int8", {"per_channel": True})]

In a string, commas separate passes and options alike: a piece holding `=` before any `:` is an
option of the pass before it. List values use `+` (`fuse:disable=gelu+layernorm`).
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import time
import warnings
import zlib
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import onnx

from onnxpress import stats
from onnxpress.errors import (
    OnnxPressError,
    PassError,
    PassOptionError,
    VerificationError,
)
from onnxpress.io import ModelLike, check_model, checker_problem, load
from onnxpress.passes import registry
from onnxpress.passes.context import PassContext
from onnxpress.passes.graph import initializer_inputs
from onnxpress.units import human_bytes, human_count


@dataclasses.dataclass
class PassStep:
    """One resolved step of a pipeline: a registered pass and its bound options."""

    info: registry.PassInfo
    options: dict[str, Any]

    @property
    def name(self) -> str:
        return self.info.name

    def __str__(self) -> str:
        changed = {k: v for k, v in self.options.items() if v != self.info.options[k].default}
        if not changed:
            return self.name
        return self.name + ":" + ",".join(f"{k}={_fmt(v)}" for k, v in changed.items())


def _fmt(v: Any) -> str:
    if isinstance(v, (list, tuple)):
        return "+".join(map(str, v))
    if isinstance(v, bool):
        return "true" if v else "false"
    return str(v)


def _split_spec_string(spec: str) -> list[tuple[str, list[str]]]:
    """'a,b:x=1,y=2,c:0.5' -> [('a', []), ('b', ['x=1', 'y=2']), ('c', ['0.5'])]."""
    steps: list[tuple[str, list[str]]] = []
    for piece in (p.strip() for p in spec.split(",")):
        if not piece:
            continue
        eq, colon = piece.find("="), piece.find(":")
        if eq != -1 and (colon == -1 or eq < colon):
            if not steps:
                raise PassOptionError(f"option '{piece}' comes before any pass name in '{spec}'")
            steps[-1][1].append(piece)
            continue
        name, _, rest = piece.partition(":")
        steps.append((name.strip(), [rest.strip()] if rest.strip() else []))
    return steps


def _options_from_tokens(info: registry.PassInfo, tokens: list[str]) -> dict[str, Any]:
    options: dict[str, Any] = {}
    for tok in tokens:
        key, eq, value = tok.partition("=")
        if not eq:
            first = info.first_option
            if first is None:
                raise PassOptionError(f"pass '{info.name}' takes no options, got '{tok}'")
            if first in options:
                raise PassOptionError(f"pass '{info.name}': '{first}' given twice")
            options[first] = tok
        else:
            options[key.strip()] = value.strip()
    return options


def parse_pipeline(spec: Any) -> list[PassStep]:
    """Resolve a pipeline spec into validated steps; raise before anything runs."""
    if isinstance(spec, (str, Mapping, PassStep)) or (
            isinstance(spec, tuple) and len(spec) == 2 and isinstance(spec[0], str)
            and not isinstance(spec[1], str)):
        items: Sequence[Any] = [spec]
    else:
        items = list(spec)
    steps: list[PassStep] = []
    for item in items:
        if isinstance(item, PassStep):
            steps.append(item)
        elif isinstance(item, str):
            for name, tokens in _split_spec_string(item):
                info = registry.get(name)
                steps.append(PassStep(info, info.bind(_options_from_tokens(info, tokens))))
        elif isinstance(item, Mapping):
            item = dict(item)
            if "name" in item:
                name = item.pop("name")
                opts = item.pop("options", None) or item
            elif len(item) == 1:
                name, opts = next(iter(item.items()))
                opts = opts or {}
            else:
                raise PassOptionError(
                    f"cannot read pass spec {item!r}: use {{'name': pass, option: value}} "
                    "or {pass: {option: value}}")
            info = registry.get(name)
            steps.append(PassStep(info, info.bind(dict(opts))))
        elif isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str):
            info = registry.get(item[0])
            opts = item[1]
            if not isinstance(opts, Mapping):
                opts = {info.first_option: opts} if info.first_option else {}
            steps.append(PassStep(info, info.bind(dict(opts))))
        elif callable(item) and isinstance(getattr(item, "pass_info", None), registry.PassInfo):
            steps.append(PassStep(item.pass_info, item.pass_info.bind({})))
        else:
            raise PassOptionError(
                f"cannot read pass spec {item!r}: give a name, 'name:opt=value', a dict or a "
                "(name, options) tuple")
    return steps


@dataclasses.dataclass
class PassReport:
    """What one pass did."""

    name: str
    options: dict[str, Any]
    nodes_before: int
    nodes_after: int
    params_before: int
    params_after: int
    bytes_before: int
    bytes_after: int
    seconds: float
    modified: bool
    figures: dict[str, Any] = dataclasses.field(default_factory=dict)
    verify: dict[str, Any] | None = None
    children: list[PassReport] = dataclasses.field(default_factory=list)   # a named pipeline's
    warnings: list[str] = dataclasses.field(default_factory=list)   # what the pass warned about

    def to_dict(self) -> dict[str, Any]:
        return _jsonable(dataclasses.asdict(self))

    def summary(self) -> str:
        figs = ", ".join(f"{k}={_short(v)}" for k, v in self.figures.items()
                         if not isinstance(v, (dict, list)))
        return (f"{self.name}: nodes {self.nodes_before}->{self.nodes_after}, "
                f"bytes {self.bytes_before}->{self.bytes_after}, {self.seconds:.2f}s"
                + (f" ({figs})" if figs else ""))


def _short(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, float) and not np.isfinite(obj):
        return str(obj)
    return obj


@dataclasses.dataclass
class PipelineResult:
    """The optimized model and one report per pass."""

    model: onnx.ModelProto
    reports: list[PassReport]

    def to_dict(self) -> dict[str, Any]:
        return {"passes": [r.to_dict() for r in self.reports]}

    def table(self) -> PassTable:
        """The reports as a table: `print(result.table())` or rich's `console.print(...)`."""
        return PassTable(self.reports)


# figures a reader looks for first, whichever pass wrote them
_KEY_FIGURES = ("int8_compute_nodes", "layers_float", "fusions_fired", "sparsity", "min_cosine",
                "speedup", "arena_bytes", "tensors_unplanned", "peak_bytes")


def _summary(r: PassReport, limit: int = 4) -> str:
    figs = {k: v for k, v in r.figures.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and "." not in k}
    keys = [k for k in _KEY_FIGURES if k in figs] + [k for k in figs if k not in _KEY_FIGURES]
    shown = [f"{k}={_short(figs[k])}" for k in keys]
    if r.verify:
        shown.insert(0, f"max_abs_err={r.verify.get('max_abs', 0):.2g}")
    more = len(shown) - limit
    return ", ".join(shown[:limit]) + (f" (+{more} more in the JSON/report)" if more > 0 else "")


def _walk(reports: list[PassReport], depth: int = 0):
    """(report, depth) for each report and, under it, a named pipeline's inner passes."""
    for r in reports:
        yield r, depth
        yield from _walk(r.children, depth + 1)


class PassTable:
    """The pass reports as a rich renderable that fits the terminal: one row per pass with
    nodes/params/bytes/time; the key figures in a column when there is room (100+ columns),
    otherwise on a line of their own under the table, so nothing wraps a few characters a line."""

    def __init__(self, reports: list[PassReport]):
        self.reports = reports

    def _table(self, with_figures: bool):
        from rich.table import Table

        t = Table(title="onnxpress passes (before>after)")
        cols = ["pass", "nodes", "params", "bytes", "time"] + (["figures"] if with_figures else [])
        for col in cols:
            t.add_column(col, justify="left" if col in ("pass", "figures") else "right",
                         no_wrap=col != "figures")
        for r, depth in _walk(self.reports):
            row = ["  " * depth + ("└ " if depth else "") + r.name,
                   f"{r.nodes_before}>{r.nodes_after}",
                   f"{_count(r.params_before)}>{_count(r.params_after)}",
                   f"{_human(r.bytes_before)}>{_human(r.bytes_after)}", f"{r.seconds:.2f}s"]
            t.add_row(*row, *([_summary(r)] if with_figures else []),
                      style="dim" if depth else None)
        return t

    def __rich_console__(self, console, options):
        from rich.padding import Padding
        from rich.text import Text

        if options.max_width >= 100:
            yield self._table(True)
            return
        yield self._table(False)
        for r, depth in _walk(self.reports):
            line = _summary(r)
            if line:
                yield Padding(Text(f"{r.name}: {line}"), (0, 0, 0, 2 + 2 * depth))

    def __str__(self) -> str:
        import io
        import shutil

        from rich.console import Console

        buf = io.StringIO()
        Console(file=buf, width=shutil.get_terminal_size((100, 24)).columns,
                force_terminal=False, color_system=None).print(self)
        return "\n".join(line.rstrip() for line in buf.getvalue().rstrip("\n").splitlines())


def _count(n: float) -> str:
    return human_count(n)

def _human(n: int) -> str:
    return human_bytes(n, 1, compact=True)

def keep_model_fields(before: onnx.ModelProto, after: onnx.ModelProto) -> None:
    """What a pass that built a new model dropped comes back from the model it was given:
    metadata_props entries it did not set itself, producer, doc strings, graph name, functions.
    (A pass may still change any of them: what it set wins.) The pipeline does this for every
    pass, built-in or custom, so no pass has to."""
    have = {p.key for p in after.metadata_props}
    after.metadata_props.extend(p for p in before.metadata_props if p.key not in have)
    for field in ("producer_name", "producer_version", "domain", "doc_string"):
        if not getattr(after, field) and getattr(before, field):
            setattr(after, field, getattr(before, field))
    if not after.model_version and before.model_version:
        after.model_version = before.model_version
    if not after.graph.name and before.graph.name:
        after.graph.name = before.graph.name
    if not after.graph.doc_string and before.graph.doc_string:
        after.graph.doc_string = before.graph.doc_string
    if not after.functions and before.functions:
        after.functions.extend(before.functions)


def _model_state(model: onnx.ModelProto) -> tuple[str, int, int, int]:
    return (fingerprint(model), stats.count_nodes(model), stats.count_params(model),
            stats.model_bytes(model))


def fingerprint(model: onnx.ModelProto) -> str:
    """A hash of the graph's structure and weights, to tell whether a pass changed anything."""
    h = hashlib.blake2b(digest_size=16)
    for g in stats.iter_graphs(model.graph):
        for node in g.node:
            h.update(node.SerializeToString(deterministic=True))
        for t in g.initializer:
            # raw bytes hashed directly: serializing a 90 MB model per pass costs seconds
            h.update(t.name.encode())
            h.update(bytes(str((t.data_type, tuple(t.dims), t.data_location)), "ascii"))
            if t.HasField("raw_data"):
                h.update(zlib.crc32(t.raw_data).to_bytes(4, "little"))
            else:
                h.update(t.SerializeToString(deterministic=True))
        for v in list(g.input) + list(g.output):
            h.update(v.SerializeToString(deterministic=True))
    for o in model.opset_import:
        h.update(o.SerializeToString(deterministic=True))
    for p in model.metadata_props:
        h.update(p.SerializeToString(deterministic=True))
    return h.hexdigest()


def _io_signature(model: onnx.ModelProto) -> tuple:
    inits = {t.name for t in model.graph.initializer}

    def sig(v):
        tt = v.type.tensor_type
        dims = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or "?")
                     for d in tt.shape.dim) if tt.HasField("shape") else None
        return (v.name, tt.elem_type, dims)

    return (tuple(sig(v) for v in model.graph.input if v.name not in inits),
            tuple(sig(v) for v in model.graph.output))


def _check_io(before: tuple, after: tuple, step: PassStep) -> None:
    if before == after:
        return
    for kind, b, a in (("input", before[0], after[0]), ("output", before[1], after[1])):
        if [x[0] for x in b] != [x[0] for x in a]:
            raise PassError(
                f"pass '{step.name}' changed the graph {kind} names from {[x[0] for x in b]} "
                f"to {[x[0] for x in a]}; passes must keep them")
        for x, y in zip(b, a):
            if x[1] != y[1]:
                raise PassError(f"pass '{step.name}' changed the type of graph {kind} '{x[0]}'")
            if x[2] is not None and y[2] is not None and len(x[2]) == len(y[2]):
                for dx, dy in zip(x[2], y[2]):
                    if isinstance(dx, int) and isinstance(dy, int) and dx != dy and dx > 0 and dy > 0:
                        raise PassError(
                            f"pass '{step.name}' changed the shape of graph {kind} '{x[0]}' "
                            f"from {x[2]} to {y[2]}")


class Instrument:
    """Hooks around every pass (TVM-style instruments): subclass and override what you need."""

    def before_pass(self, step: PassStep, model: onnx.ModelProto, ctx: PassContext) -> None:
        pass

    def after_pass(self, step: PassStep, model: onnx.ModelProto, ctx: PassContext,
                   report: PassReport) -> None:
        pass


def verification_inputs(model: onnx.ModelProto, ctx: PassContext) -> dict[str, np.ndarray]:
    """What verification feeds: the first calibration batch, else inputs generated at the bound
    shapes with the pipeline's seed."""
    if ctx.calib is not None:
        return ctx.require_calib(model).first()
    from onnxpress.data import make_inputs

    return make_inputs(model, shapes=ctx.shapes, seed=ctx.seed)


class _Verifier(Instrument):
    """Checker plus onnxruntime comparison after every pass; names the pass that broke it."""

    def __init__(self, rtol: float, atol: float, ctx: PassContext):
        self.rtol, self.atol = rtol, atol
        self.ctx = ctx
        self.feeds = None
        self.expected = None

    def start(self, model: onnx.ModelProto) -> None:
        from onnxpress.backends import ort

        self.feeds = verification_inputs(model, self.ctx)
        try:
            self.expected = ort.run(model, self.feeds)
        except OnnxPressError as exc:
            raise VerificationError(
                f"verify=True: onnxruntime cannot run the input model, so nothing can be "
                f"compared ({exc})") from None

    def after_pass(self, step, model, ctx, report) -> None:
        from onnxpress.backends import ort

        problem = checker_problem(model)
        if problem is not None:
            raise VerificationError(
                f"pass '{step}' produced a model that fails the ONNX checker: {problem}")
        try:
            actual = ort.run(model, self.feeds)
        except OnnxPressError as exc:
            raise VerificationError(
                f"pass '{step}' produced a model onnxruntime cannot run: {exc}") from None
        result = ort.compare_outputs(self.expected, actual, rtol=self.rtol, atol=self.atol)
        report.verify = {"ok": result.ok, "max_abs": result.max_abs, "max_rel": result.max_rel,
                         "min_cosine": result.min_cosine, "lossy": step.info.lossy}
        if not result.ok and not step.info.lossy:
            raise VerificationError(
                f"pass '{step}' changed the model's outputs beyond rtol={self.rtol:g}, "
                f"atol={self.atol:g}:\n{result}")
        bad_shape = [o for o in result.outputs if o.max_abs == float("inf")]
        if bad_shape:
            raise VerificationError(
                f"pass '{step}' broke output '{bad_shape[0].name}' (shape or NaN/inf mismatch)")
        self.expected = actual  # the next pass is compared with this one


def run(
    model: ModelLike,
    pipeline: Any,
    *,
    calib: Any = None,
    target: str = "ort",
    seed: int = 0,
    shapes: Mapping[str, Any] | None = None,
    verify: bool = False,
    rtol: float = 1e-4,
    atol: float = 1e-5,
    inplace: bool = False,
    progress: bool = False,
    instruments: Iterable[Instrument] = (),
    ctx: PassContext | None = None,
    keep_initializer_inputs: bool = False,
) -> PipelineResult:
    """Run a pipeline and return the model with one report per pass.

    Every pass name and option is validated before the first pass runs. The caller's model is
    not changed unless `inplace=True`. With `verify=True`, the ONNX checker and an onnxruntime
    comparison run after each pass; the first pass that breaks the model is named in a
    VerificationError (lossy passes have their error reported, not enforced).
    Initializers also listed as graph inputs (IR-3 exports) are made constants first, by the
    pass `constant_initializers`, unless `keep_initializer_inputs=True`.
    """
    steps = parse_pipeline(pipeline)
    if ctx is None:
        ctx = PassContext(calib=calib, target=target, seed=seed,
                          shapes=dict(shapes) if shapes else None, progress=progress,
                          keep_initializer_inputs=keep_initializer_inputs)
    if isinstance(model, onnx.ModelProto):
        check_model(model, "the given model")
        working = model if inplace else copy.deepcopy(model)
    else:
        working = load(model)
    if not ctx.keep_initializer_inputs and initializer_inputs(working) and \
            not any(s.name == "constant_initializers" for s in steps):
        steps = parse_pipeline(["constant_initializers"]) + steps
    if ctx.calib is not None and any(s.info.reads("calib") for s in steps):
        ctx.require_calib(working)  # bad calibration data fails before the first pass runs
    instruments = list(instruments)
    if verify:
        verifier = _Verifier(rtol, atol, ctx)
        verifier.start(working)
        instruments.append(verifier)

    reports: list[PassReport] = []
    io_before = _io_signature(working)
    state = None                     # (fingerprint, nodes, params, bytes) of `working`
    bar = None
    if progress and len(steps) > 1:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(steps), desc="passes", leave=False, dynamic_ncols=True)
    try:
        for step in steps:
            if bar is not None:
                bar.set_postfix_str(step.name)
            for inst in instruments:
                inst.before_pass(step, working, ctx)
            if state is None:
                state = _model_state(working)
            before_fp, nodes_b, params_b, bytes_b = state
            ctx._figures = {}
            ctx._children = []
            ctx._preserved = set()
            ctx._current_pass = step.name
            t0 = time.perf_counter()
            try:
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    out = step.info.func(working, ctx, **step.options)
            except OnnxPressError:
                raise
            except Exception as exc:
                raise PassError(f"pass '{step}' failed: {type(exc).__name__}: {exc}") from exc
            seconds = time.perf_counter() - t0
            # what a pass warns about goes into its report and on to the caller, once
            said = list(dict.fromkeys(str(w.message) for w in caught
                                      if issubclass(w.category, UserWarning)))
            for w in caught:
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
            if out is None:
                out = working
            if not isinstance(out, onnx.ModelProto):
                raise PassError(f"pass '{step.name}' returned {type(out).__name__}, expected a ModelProto")
            if out is not working:
                keep_model_fields(working, out)
            working = out
            # the state after this pass is the state before the next: measured once per pass
            state = _model_state(working)
            modified = state[0] != before_fp
            if modified:
                ctx.invalidate(keep=ctx._preserved)
                if not step.info.changes_io:
                    _check_io(io_before, _io_signature(working), step)
                io_before = _io_signature(working)
            report = PassReport(
                name=step.name, options=dict(step.options),
                nodes_before=nodes_b, nodes_after=state[1],
                params_before=params_b, params_after=state[2],
                bytes_before=bytes_b, bytes_after=state[3],
                seconds=seconds, modified=modified, figures=dict(ctx._figures),
                children=list(ctx._children), warnings=said)
            for inst in instruments:
                inst.after_pass(step, working, ctx, report)
            reports.append(report)
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:   # an error then starts on a line of its own
            bar.close()
    ctx._current_pass = None
    return PipelineResult(working, reports)


def apply(model: ModelLike, pipeline: Any, **kwargs: Any) -> Any:
    """Run a pipeline and return the result as the kind of object given.

    A ModelProto gives a ModelProto, bytes give bytes, a GraphProto a GraphProto, an
    onnx-graphsurgeon Graph a Graph, an onnx_ir Model a Model; a path gives a ModelProto (nothing
    is written; use `onnxpress.save`). Keyword arguments are those of `run`.
    """
    from onnxpress.io import proto_as_kind_of

    return proto_as_kind_of(run(model, pipeline, **kwargs).model, model)


def register_pipeline(name: str, pipeline: Any, doc: str | None = None) -> None:
    """Register a named pipeline as a pass of its own (a pipeline is itself a pass)."""
    steps_spec = pipeline

    def _pipeline_pass(model, ctx):
        outer = ctx._current_pass
        inner = run(model, steps_spec, ctx=ctx, inplace=True)
        # the inner passes report as children; their figures must not pass for the pipeline's
        ctx._current_pass, ctx._figures, ctx._children = outer, {}, list(inner.reports)
        ctx.record(passes=len(inner.reports),
                   modified_by=",".join(r.name for r in inner.reports if r.modified) or "none")
        return inner.model

    _pipeline_pass.__doc__ = doc or f"The pipeline {steps_spec}."
    _pipeline_pass.__name__ = name
    _pipeline_pass.__module__ = "onnxpress.passes.pipelines"
    try:  # the contract is the union of its passes' (none known if they register later)
        inner = [s.info for s in parse_pipeline(steps_spec)]
    except OnnxPressError:
        inner = []
    requires = tuple(dict.fromkeys(r for i in inner for r in i.requires))
    registry.register(name, replace=True, lossy=any(i.lossy for i in inner),
                      changes_io=any(i.changes_io for i in inner), requires=requires,
                      uses=tuple(dict.fromkeys(u for i in inner for u in i.uses if u not in requires))
                      )(_pipeline_pass)
