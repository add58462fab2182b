"""`onnxpress recipes`, and what `optimize --recipe/--report` needs from recipes and the report.

    onnxpress recipes                 # table of the built-in recipes (name, passes, target, ...)
    onnxpress recipes int8-cpu        # the recipe as TOML, to copy into a file and edit
    onnxpress recipes --json
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path
from typing import Any

from onnxpress.errors import ModelSaveError, PassOptionError


def cmd_recipes(args: argparse.Namespace) -> int:
    from onnxpress import recipes

    if args.name:
        r = recipes.load(args.name, validate=False)
        print(r.to_toml(), end="")
        return 0
    items = recipes.builtins()
    if args.json:
        print(json.dumps([{
            "name": r.name, "description": r.description, "pipeline": r.spec, "target": r.target,
            "calibration": r.calib_source or ("required" if r.calib_required else None),
            "compile": r.compile, "available": r.available, "missing_passes": r.missing_passes(),
            "figures": r.figures} for r in items], indent=2, default=str))
        return 0
    from rich.console import Console
    from rich.table import Table

    t = Table(title="built-in recipes (onnxpress optimize MODEL --recipe NAME)")
    for c in ("recipe", "pipeline", "target", "calibration", "what it is for"):
        t.add_column(c, overflow="fold")
    for r in items:
        desc = r.description
        if not r.available:
            desc += f" [yellow](needs passes not installed: {', '.join(r.missing_passes())})[/yellow]"
        target = r.target + (f" -> compile {r.compile.get('target')}, tune {r.compile.get('tune_trials', 0)}"
                             if r.compile else "")
        calib = "--calib" if r.calib_required else (r.calib_source or "-")
        t.add_row(r.name, r.spec.replace(",", ", "), target, calib, desc)
    Console(highlight=False).print(t)
    return 0


def add_commands(subparsers: Any) -> None:
    p = subparsers.add_parser("recipes", help="list the built-in pipeline recipes (TOML), or print one")
    p.add_argument("name", nargs="?", help="a built-in recipe (or .toml path) to print as TOML")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_recipes)


# -- what cmd_optimize calls ----------------------------------------------------------------
def apply_recipe_args(args: argparse.Namespace) -> None:
    """Fill `optimize`'s arguments from --recipe: passes, target, shapes, verify, calibration and
    default output paths. Flags given on the command line win over the recipe's values."""
    recipe_name = getattr(args, "recipe", None)
    if not recipe_name:
        if not getattr(args, "output", None):
            raise PassOptionError("give the output model with -o OUT.onnx")
        args.target = getattr(args, "target", None) or "ort"
        return
    from onnxpress import recipes

    if args.passes:
        raise PassOptionError("give either -p/--passes or --recipe, not both")
    r = recipes.load(recipe_name)  # every pass and option checked here, before the model is read
    args._recipe = r
    args.passes = [dict(p) for p in r.passes]
    if getattr(args, "target", None) in (None, ""):
        args.target = r.target
    if r.verify:
        args.verify = True
    if r.shapes and not args.shape:
        args.shape = [f"{k}={','.join(map(str, v)) if isinstance(v, (list, tuple)) else v}"
                      for k, v in r.shapes.items()]
    calib = r.calibration(args.calib)
    args.calib = calib
    output_given = bool(args.output)
    if not args.output:
        out = r.output_path("model", args.model)
        if out is None:
            raise PassOptionError(f"recipe '{r.name}' names no [outputs] model: give -o OUT.onnx")
        args.output = str(out)
    if not getattr(args, "report", None):
        rep = r.output_path("report", args.model)
        if rep is not None:
            if output_given and not rep.is_absolute():
                # the report goes with the model the user placed, not into the working directory
                rep = Path(args.output).parent / rep
            args.report = str(rep)
    args.target = args.target or "ort"


def import_model(path: str):
    """The CLI's model reader: .onnx, .keras/.h5 and SavedModel directories."""
    from onnxpress.frontends.auto import import_any

    return import_any(path)


def keep_before(args: argparse.Namespace, model: Any) -> Any:
    """A copy of the input model when a report will compare against it (optimize runs in place)."""
    return copy.deepcopy(model) if getattr(args, "report", None) else None


def report_instruments(args: argparse.Namespace) -> list:
    """With --report: measure each lossy pass's output error against the input model (the
    report's quality panel)."""
    if not getattr(args, "report", None):
        return []
    from onnxpress.passes.error import InputError

    return [InputError()]


def write_optimize_report(args: argparse.Namespace, before: Any, result: Any) -> Path | None:
    """Write --report HTML (and its .json twin) after optimize; returns the HTML path."""
    if not getattr(args, "report", None) or before is None:
        return None
    from onnxpress.report import write_report

    path = Path(args.report)
    if path.suffix.lower() not in (".html", ".htm"):
        raise ModelSaveError(f"--report {path}: give an .html path (the JSON twin is written beside it)")
    r = getattr(args, "_recipe", None)
    extra: dict[str, Any] = {"input": str(args.model), "output": str(args.output),
                             "target": args.target or "ort"}
    if r is not None:
        extra["recipe"] = r.name
        if r.compile:
            extra["compile next"] = (f"onnxpress compile {args.output} --target {r.compile.get('target')}"
                                     f" --tune {r.compile.get('tune_trials', 0)}")
    from onnxpress.cli import parse_shapes

    return write_report(path, before=before, after=result.model, pipeline_result=result, extra=extra,
                        title=f"onnxpress: {Path(str(args.model)).name}",
                        measure_latency=not getattr(args, "no_latency", False),
                        shapes=parse_shapes(args.shape))
