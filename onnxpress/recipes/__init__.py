"""Recipes: a pipeline in a TOML file people can review, version and share.

    onnxpress recipes                          # the built-in recipes
    onnxpress recipes int8-cpu                 # print one, to copy and edit
    onnxpress optimize model.onnx --recipe int8-cpu --calib calib.npz
    onnxpress optimize model.keras --recipe my_recipe.toml

    from onnxpress import recipes
    recipe = recipes.load("lossless")          # a built-in name or a .toml path
    result = recipes.run(recipe, "model.onnx", calib=calib)

A recipe file:

    name = "int8-cpu"
    description = "Fuse, then static int8 QDQ for onnxruntime on x86/ARM CPUs."

    [pipeline]
    target = "ort"                      # what the passes optimize for: ort, tvm, x86, arm, cuda
    verify = true                       # checker + onnxruntime comparison after every pass
    shapes = { batch = 1 }              # sizes for dynamic dims (optional)

    [[pass]]                            # in order; options by name, exactly as `onnxpress passes`
    name = "cleanup"
    [[pass]]
    name = "quant_int8"
    method = "percentile"

    [calibration]
    source = "calib.npz"                # .npz beside the recipe, or "cli" (--calib), or "zoo:digits"
    required = true

    [compile]                           # for `onnxpress compile` and the TVM backend (optional)
    target = "arm"
    tune_trials = 2000                  # the tuning budget

    [outputs]                           # default paths; {stem} is the input's name without suffix
    model = "{stem}.int8.onnx"
    report = "{stem}.int8.html"

Every pass name and option is checked (UnknownPassError, PassOptionError) when the recipe is
loaded, before any model is read.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import Any

import tomllib

from onnxpress.errors import CalibrationError, PassOptionError, UnknownPassError

BUILTIN_PACKAGE = "onnxpress.recipes.builtin"
_TOP_KEYS = {"name", "description", "pipeline", "pass", "calibration", "compile", "outputs", "figures"}
_PIPELINE_KEYS = {"target", "verify", "shapes", "seed", "rtol", "atol"}
_CALIB_KEYS = {"source", "required"}
_OUTPUT_KEYS = {"model", "report", "report_json"}


class RecipeError(PassOptionError):
    """A recipe file that cannot be read or holds an unknown key (names the file and the key)."""


@dataclasses.dataclass
class Recipe:
    """A parsed recipe. `passes` are pipeline specs ({"name": ..., option: value})."""

    name: str
    description: str
    passes: list[dict[str, Any]]
    target: str = "ort"
    verify: bool = False
    shapes: dict[str, Any] | None = None
    seed: int = 0
    rtol: float | None = None
    atol: float | None = None
    calib_source: str | None = None
    calib_required: bool = False
    compile: dict[str, Any] = dataclasses.field(default_factory=dict)
    outputs: dict[str, str] = dataclasses.field(default_factory=dict)
    figures: dict[str, Any] = dataclasses.field(default_factory=dict)
    path: Path | None = None
    builtin: bool = False

    # -- checks -------------------------------------------------------------------------------
    def missing_passes(self) -> list[str]:
        """Pass names this recipe uses that are not registered here."""
        from onnxpress.passes import registry

        known = {p.name for p in registry.list_passes()}
        return [p["name"] for p in self.passes if p["name"] not in known]

    @property
    def available(self) -> bool:
        return not self.missing_passes()

    def steps(self) -> list:
        """The validated pipeline (UnknownPassError / PassOptionError before anything runs)."""
        from onnxpress.passes.pipeline import parse_pipeline

        try:
            return parse_pipeline([dict(p) for p in self.passes])
        except UnknownPassError as exc:
            raise UnknownPassError(f"recipe '{self.name}'{self._where()}: {exc}") from None
        except PassOptionError as exc:
            raise type(exc)(f"recipe '{self.name}'{self._where()}: {exc}") from None

    def _where(self) -> str:
        return f" ({self.path})" if self.path and not self.builtin else ""

    @property
    def spec(self) -> str:
        """The pipeline as a `-p` string."""
        out = []
        for p in self.passes:
            opts = {k: v for k, v in p.items() if k != "name"}
            if not opts:
                out.append(p["name"])
                continue
            vals = ",".join(f"{k}={_spec_value(v)}" for k, v in opts.items())
            out.append(f"{p['name']}:{vals}")
        return ",".join(out)

    # -- calibration and outputs --------------------------------------------------------------
    def calibration(self, given: Any = None) -> Any:
        """What to pass as calib=: the caller's data first, else the recipe's source."""
        if given is not None:
            return given
        src = self.calib_source
        if src in (None, "", "cli"):
            if self.calib_required:
                raise CalibrationError(
                    f"recipe '{self.name}' needs calibration data: give --calib FILE.npz "
                    "(arrays named after the model inputs, batch on axis 0) or calib=")
            return None
        if src.startswith("zoo:"):
            from onnxpress import zoo

            which = src[4:]
            if which != "digits":
                raise RecipeError(f"recipe '{self.name}': calibration source '{src}' is unknown "
                                  "(zoo:digits is the one built in)")
            return zoo.digits_calib()
        path = Path(src)
        if not path.is_absolute() and self.path is not None and not self.builtin:
            path = self.path.parent / path
        return str(path)

    def output_path(self, kind: str, model_path: str | os.PathLike) -> Path | None:
        pattern = self.outputs.get(kind)
        if not pattern:
            return None
        stem = _stem(Path(model_path))
        try:
            return Path(pattern.format(stem=stem, name=self.name))
        except (KeyError, IndexError) as exc:
            raise RecipeError(f"recipe '{self.name}': outputs.{kind} = '{pattern}' uses an unknown "
                              f"field {exc}; use {{stem}} or {{name}}") from None

    def to_toml(self) -> str:
        """The recipe as TOML text (what `onnxpress recipes NAME` prints)."""
        lines = [f"name = {_toml(self.name)}", f"description = {_toml(self.description)}", "",
                 "[pipeline]", f"target = {_toml(self.target)}", f"verify = {_toml(self.verify)}"]
        if self.shapes:
            lines.append(f"shapes = {_toml(self.shapes)}")
        for p in self.passes:
            lines += ["", "[[pass]]"] + [f"{k} = {_toml(v)}" for k, v in p.items()]
        if self.calib_source or self.calib_required:
            lines += ["", "[calibration]"]
            if self.calib_source:
                lines.append(f"source = {_toml(self.calib_source)}")
            lines.append(f"required = {_toml(self.calib_required)}")
        for section, values in (("compile", self.compile), ("outputs", self.outputs),
                                ("figures", self.figures)):
            if values:
                lines += ["", f"[{section}]"] + [f"{k} = {_toml(v)}" for k, v in values.items()]
        return "\n".join(lines) + "\n"


def _stem(path: Path) -> str:
    return path.name if path.is_dir() else path.stem


def _spec_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (list, tuple)):
        return "+".join(map(str, v))
    return str(v)


def _toml(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml(x) for x in v) + "]"
    if isinstance(v, Mapping):
        return "{ " + ", ".join(f"{k} = {_toml(x)}" for k, x in v.items()) + " }"
    return _toml(str(v))


def _unknown(keys: Any, allowed: set[str], where: str) -> None:
    extra = sorted(set(keys) - allowed)
    if extra:
        raise RecipeError(f"{where}: unknown key{'s' if len(extra) > 1 else ''} {', '.join(extra)}; "
                          f"known: {', '.join(sorted(allowed))}")


def parse(data: Mapping[str, Any], *, where: str = "recipe", path: Path | None = None,
          builtin: bool = False, validate: bool = True) -> Recipe:
    """Build a Recipe from parsed TOML (a dict); check every key, pass and option."""
    _unknown(data, _TOP_KEYS, where)
    pipeline = data.get("pipeline", {}) or {}
    calib = data.get("calibration", {}) or {}
    outputs = data.get("outputs", {}) or {}
    for section, value, allowed in (("pipeline", pipeline, _PIPELINE_KEYS),
                                    ("calibration", calib, _CALIB_KEYS),
                                    ("outputs", outputs, _OUTPUT_KEYS)):
        if not isinstance(value, Mapping):
            raise RecipeError(f"{where}: [{section}] must be a table")
        _unknown(value, allowed, f"{where} [{section}]")
    raw_passes = data.get("pass", [])
    if not isinstance(raw_passes, list) or not raw_passes:
        raise RecipeError(f"{where}: no passes; add [[pass]] tables with name = \"...\"")
    passes = []
    for i, p in enumerate(raw_passes):
        if not isinstance(p, Mapping) or not isinstance(p.get("name"), str):
            raise RecipeError(f"{where}: [[pass]] number {i + 1} has no name = \"...\"")
        passes.append(dict(p))
    name = data.get("name") or (path.stem if path else "recipe")
    recipe = Recipe(
        name=str(name), description=str(data.get("description", "")), passes=passes,
        target=str(pipeline.get("target", "ort")), verify=bool(pipeline.get("verify", False)),
        shapes=dict(pipeline["shapes"]) if pipeline.get("shapes") else None,
        seed=int(pipeline.get("seed", 0)), rtol=pipeline.get("rtol"), atol=pipeline.get("atol"),
        calib_source=calib.get("source"), calib_required=bool(calib.get("required", False)),
        compile=dict(data.get("compile", {}) or {}), outputs={k: str(v) for k, v in outputs.items()},
        figures=dict(data.get("figures", {}) or {}), path=path, builtin=builtin)
    if validate:
        recipe.steps()
    return recipe


def loads(text: str, *, where: str = "recipe", validate: bool = True) -> Recipe:
    """Parse recipe TOML text."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise RecipeError(f"{where} is not valid TOML: {exc}") from None
    return parse(data, where=where, validate=validate)


def _builtin_files() -> dict[str, Any]:
    root = resources.files(BUILTIN_PACKAGE)
    return {Path(f.name).stem: f for f in root.iterdir() if f.name.endswith(".toml")}


def builtin_names() -> list[str]:
    return sorted(_builtin_files())


def load(recipe: str | os.PathLike | Recipe, *, validate: bool = True) -> Recipe:
    """A built-in recipe by name, or a recipe from a .toml path."""
    if isinstance(recipe, Recipe):
        if validate:
            recipe.steps()
        return recipe
    files = _builtin_files()
    key = str(recipe)
    if key in files and not Path(key).suffix:
        try:
            data = tomllib.loads(files[key].read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as exc:
            raise RecipeError(f"built-in recipe '{key}' is not valid TOML: {exc}") from None
        return parse(data, where=f"built-in recipe '{key}'", builtin=True, validate=validate)
    path = Path(recipe)
    if not path.exists():
        raise RecipeError(f"no recipe '{recipe}': not a file and not a built-in "
                          f"({', '.join(builtin_names())}); see `onnxpress recipes`")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise RecipeError(f"{path} is not valid TOML: {exc}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise RecipeError(f"cannot read recipe {path}: {exc}") from None
    return parse(data, where=str(path), path=path, validate=validate)


def builtins(*, available_only: bool = False) -> list[Recipe]:
    """Every built-in recipe (validated only when all of its passes are registered)."""
    out = []
    for name in builtin_names():
        r = load(name, validate=False)
        if r.available:
            r.steps()
        elif available_only:
            continue
        out.append(r)
    return out


def run(recipe: str | os.PathLike | Recipe, model: Any, *, calib: Any = None,
        shapes: Mapping[str, Any] | None = None, verify: bool | None = None,
        progress: bool = False, inplace: bool = False):
    """Run a recipe's pipeline on a model (any source import_any takes); a PipelineResult."""
    from onnxpress.frontends.auto import import_any
    from onnxpress.passes.pipeline import run as run_pipeline

    r = load(recipe)
    steps = r.steps()
    data = r.calibration(calib)
    proto = import_any(model)
    kwargs: dict[str, Any] = {}
    if r.rtol is not None:
        kwargs["rtol"] = float(r.rtol)
    if r.atol is not None:
        kwargs["atol"] = float(r.atol)
    return run_pipeline(proto, steps, calib=data, target=r.target, seed=r.seed,
                        shapes=dict(shapes) if shapes else r.shapes,
                        verify=r.verify if verify is None else verify, progress=progress,
                        inplace=inplace or not isinstance(model, type(proto)), **kwargs)


__all__ = ["Recipe", "RecipeError", "builtin_names", "builtins", "load", "loads", "parse", "run"]
