"""The pass registry: names -> passes, with typed, validated options.

A pass is a plain function ``fn(model, ctx, *, opt: type = default, ...)``. Its keyword-only
parameters are its options: their annotations give the type (bool, int, float, str, Literal[...],
Optional[...], list[str], or Annotated[T, Range(lo, hi)]) and their defaults the default values.
The docstring's first line is the one-line summary `onnxpress passes` prints.

    @passes.register("my_pass")
    def my_pass(model, ctx, *, factor: float = 1.0):
        '''Scale every float initializer by `factor`.'''
        ...
        return model

Third-party packages register passes through the entry-point group ``onnxpress.passes``: each
entry point names a callable (registered on load under the entry point's name unless it already
registered itself).
"""

from __future__ import annotations

import dataclasses
import inspect
import types
import typing
from importlib import metadata
from typing import Any, Callable, Literal

from onnxpress.errors import PassOptionError, UnknownPassError

ENTRY_POINT_GROUP = "onnxpress.passes"


@dataclasses.dataclass(frozen=True)
class Range:
    """Closed (or half-open) numeric range for an option: Annotated[float, Range(0, 1)]."""

    lo: float | None = None
    hi: float | None = None
    lo_inclusive: bool = True
    hi_inclusive: bool = True

    def check(self, value: float) -> bool:
        if self.lo is not None and (value < self.lo or (value == self.lo and not self.lo_inclusive)):
            return False
        if self.hi is not None and (value > self.hi or (value == self.hi and not self.hi_inclusive)):
            return False
        return True

    def __str__(self) -> str:
        lo = "-inf" if self.lo is None else f"{self.lo:g}"
        hi = "inf" if self.hi is None else f"{self.hi:g}"
        return f"{'[' if self.lo_inclusive else '('}{lo}, {hi}{']' if self.hi_inclusive else ')'}"


@dataclasses.dataclass
class OptionSpec:
    """One option of a pass, derived from the pass function's signature."""

    name: str
    annotation: Any
    default: Any
    base: Any  # bool, int, float, str, list, dict, or Any
    choices: tuple | None = None
    range: Range | None = None
    optional: bool = False

    @property
    def type_name(self) -> str:
        if self.choices is not None:
            return "|".join(str(c) for c in self.choices)
        name = getattr(self.base, "__name__", str(self.base))
        if self.base is list:
            name = "list (a+b+c)"
        if self.range is not None:
            name += f" in {self.range}"
        return name + (" or none" if self.optional else "")

    def coerce(self, value: Any, pass_name: str) -> Any:
        """Turn a spec-string or Python value into this option's type, or raise PassOptionError."""
        where = f"option '{self.name}' of pass '{pass_name}'"
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            if self.optional or self.default is None:
                return None
            raise PassOptionError(f"{where} cannot be none (expected {self.type_name})")
        base = self.base
        try:
            if base is bool:
                if isinstance(value, bool):
                    out = value
                elif isinstance(value, (int,)) and value in (0, 1):
                    out = bool(value)
                elif isinstance(value, str) and value.lower() in ("true", "1", "yes", "on"):
                    out = True
                elif isinstance(value, str) and value.lower() in ("false", "0", "no", "off"):
                    out = False
                else:
                    raise ValueError
            elif base is int:
                if isinstance(value, bool):
                    raise ValueError
                if isinstance(value, float) and not value.is_integer():
                    raise ValueError
                out = int(value) if not isinstance(value, str) else int(value, 0)
            elif base is float:
                if isinstance(value, bool):
                    raise ValueError
                out = float(value)
            elif base is str:
                if not isinstance(value, (str, int, float)) or isinstance(value, bool):
                    raise ValueError
                out = str(value)
            elif base is list:
                if isinstance(value, str):
                    out = [v for v in value.replace("|", "+").split("+") if v]
                elif isinstance(value, (list, tuple, set)):
                    out = list(value)
                else:
                    raise ValueError
            elif base is dict:
                if isinstance(value, dict):
                    out = dict(value)
                elif isinstance(value, str):
                    out = {}
                    for item in value.split("+"):
                        k, _, v = item.partition("/")
                        out[k] = v
                else:
                    raise ValueError
            else:
                out = value
        except (TypeError, ValueError):
            raise PassOptionError(
                f"{where}: cannot use {value!r}, expected {self.type_name}"
            ) from None
        if self.choices is not None and out not in self.choices:
            raise PassOptionError(
                f"{where}: {out!r} is not one of {', '.join(map(str, self.choices))}"
            )
        if self.range is not None and not self.range.check(out):
            raise PassOptionError(f"{where}: {out!r} is out of range {self.range}")
        return out


@dataclasses.dataclass
class PassInfo:
    """A registered pass: its function, options and contract."""

    name: str
    func: Callable
    options: dict[str, OptionSpec]
    doc: str
    lossy: bool = False
    changes_io: bool = False
    requires: tuple[str, ...] = ()
    uses: tuple[str, ...] = ()
    source: str = "builtin"

    def reads(self, what: str) -> bool:
        """Whether the pass reads `what` ("calib") from the context, needed or when given."""
        return what in self.requires or what in self.uses

    @property
    def summary(self) -> str:
        return self.doc.strip().splitlines()[0] if self.doc.strip() else ""

    @property
    def first_option(self) -> str | None:
        return next(iter(self.options), None)

    def bind(self, options: dict[str, Any]) -> dict[str, Any]:
        """Validate and coerce options; fill defaults. Raises PassOptionError."""
        bound = {}
        for key, value in options.items():
            if key not in self.options:
                valid = ", ".join(self.options) or "(this pass takes no options)"
                raise PassOptionError(
                    f"pass '{self.name}' has no option '{key}'; valid options: {valid}"
                )
            bound[key] = self.options[key].coerce(value, self.name)
        for key, spec in self.options.items():
            bound.setdefault(key, spec.default)
        return bound


def _unwrap(annotation: Any) -> tuple[Any, tuple | None, Range | None, bool]:
    """Return (base type, choices, range, optional) for an option annotation."""
    choices = None
    rng = None
    optional = False
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        args = typing.get_args(annotation)
        annotation = args[0]
        for extra in args[1:]:
            if isinstance(extra, Range):
                rng = extra
        origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        optional = len(args) < len(typing.get_args(annotation))
        annotation = args[0] if len(args) == 1 else Any
        if typing.get_origin(annotation) is typing.Annotated:
            inner, choices2, rng2, _ = _unwrap(annotation)
            return inner, choices2, rng2 or rng, optional
        origin = typing.get_origin(annotation)
    if origin is Literal:
        choices = typing.get_args(annotation)
        base = type(choices[0])
    elif origin in (list, tuple, set) or annotation in (list, tuple):
        base = list
    elif origin is dict or annotation is dict:
        base = dict
    elif annotation in (bool, int, float, str):
        base = annotation
    else:
        base = Any
    return base, choices, rng, optional


def options_from_signature(func: Callable) -> dict[str, OptionSpec]:
    sig = inspect.signature(func)
    try:
        hints = typing.get_type_hints(func, include_extras=True)
    except Exception:  # unresolvable forward references in a user's pass
        hints = {}
    params = list(sig.parameters.values())
    if len(params) < 2 or params[0].kind not in (params[0].POSITIONAL_ONLY, params[0].POSITIONAL_OR_KEYWORD):
        raise TypeError(
            f"a pass must take (model, ctx, *, options...); {func.__qualname__} has {sig}"
        )
    options = {}
    for p in params[2:]:
        if p.kind in (p.VAR_KEYWORD, p.VAR_POSITIONAL):
            continue
        if p.default is inspect.Parameter.empty:
            raise TypeError(f"option '{p.name}' of pass {func.__qualname__} needs a default")
        annotation = hints.get(p.name, type(p.default) if p.default is not None else Any)
        base, choices, rng, optional = _unwrap(annotation)
        if base is Any and p.default is not None and type(p.default) in (bool, int, float, str):
            base = type(p.default)
        options[p.name] = OptionSpec(
            p.name, annotation, p.default, base, choices, rng, optional or p.default is None
        )
    return options


_REGISTRY: dict[str, PassInfo] = {}
_ENTRY_POINTS_LOADED = False


def register(
    name: str | Callable | None = None,
    *,
    lossy: bool = False,
    changes_io: bool = False,
    requires: tuple[str, ...] | list[str] = (),
    uses: tuple[str, ...] | list[str] = (),
    replace: bool = False,
) -> Callable:
    """Register a pass function under `name` (default: the function's name).

    `lossy` passes may change outputs beyond round-off (their error is reported, not enforced);
    `changes_io` passes may change graph input/output types or shapes; `requires` lists what the
    pass needs from the context ("calib", "target"), `uses` what it reads when given (a pass that
    measures its error on calibration data when there is some). A pass that reads calibration
    data declares it in one or the other: the pipeline then validates the data before the first
    pass runs.
    """

    def decorate(func: Callable) -> Callable:
        pass_name = name if isinstance(name, str) else func.__name__
        if pass_name in _REGISTRY and not replace and _REGISTRY[pass_name].func is not func:
            raise ValueError(
                f"a pass named '{pass_name}' is already registered "
                f"(by {_REGISTRY[pass_name].source}); pass replace=True to override it"
            )
        module = getattr(func, "__module__", "") or ""
        _REGISTRY[pass_name] = PassInfo(
            name=pass_name,
            func=func,
            options=options_from_signature(func),
            doc=inspect.getdoc(func) or "",
            lossy=lossy,
            changes_io=changes_io,
            requires=tuple(requires),
            uses=tuple(uses),
            source="builtin" if module.startswith("onnxpress.") else module or "user",
        )
        func.pass_info = _REGISTRY[pass_name]
        return func

    if callable(name) and not isinstance(name, str):
        return decorate(name)
    return decorate


def unregister(name: str) -> None:
    _REGISTRY.pop(name, None)


def _load_entry_points() -> None:
    global _ENTRY_POINTS_LOADED
    if _ENTRY_POINTS_LOADED:
        return
    _ENTRY_POINTS_LOADED = True
    for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
        try:
            obj = ep.load()
        except Exception as exc:  # a broken plugin must not break onnxpress
            import warnings

            warnings.warn(f"onnxpress: could not load pass plugin '{ep.name}' ({ep.value}): {exc}", stacklevel=2)
            continue
        if ep.name in _REGISTRY:
            continue
        info = getattr(obj, "pass_info", None)
        if isinstance(info, PassInfo):
            _REGISTRY.setdefault(ep.name, dataclasses.replace(info, name=ep.name))
        elif callable(obj):
            register(ep.name)(obj)
        _REGISTRY[ep.name].source = f"entry point {ep.value}"


def reload_entry_points() -> None:
    """Look at installed entry points again (after installing a plugin in the same process)."""
    global _ENTRY_POINTS_LOADED
    _ENTRY_POINTS_LOADED = False
    _load_entry_points()


def _load_builtins() -> None:
    # importing the modules registers their passes
    import onnxpress.passes.builtin  # noqa: F401


def get(name: str) -> PassInfo:
    _load_builtins()
    _load_entry_points()
    if name not in _REGISTRY:
        import difflib

        close = difflib.get_close_matches(name, _REGISTRY, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise UnknownPassError(
            f"unknown pass '{name}'{hint}; registered passes: {', '.join(sorted(_REGISTRY))}"
        )
    return _REGISTRY[name]


def list_passes() -> list[PassInfo]:
    """Every registered pass (built-in, decorated, entry points), sorted by name."""
    _load_builtins()
    _load_entry_points()
    return [_REGISTRY[k] for k in sorted(_REGISTRY)]


def is_registered(name: str) -> bool:
    _load_builtins()
    _load_entry_points()
    return name in _REGISTRY

