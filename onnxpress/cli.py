"""The onnxpress command line: a thin layer over the public API.

    onnxpress passes
    onnxpress inspect model.onnx
    onnxpress optimize model.onnx -p fold_constants,dce,simplify -o out.onnx [--calib c.npz] [--verify]
    onnxpress bench model.onnx --vs other.onnx
    onnxpress bench out/x86 --profile --top 10

Errors of onnxpress's own hierarchy print one line and exit 2; --debug shows the traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from pathlib import Path
from typing import Any, Sequence

from onnxpress.errors import OnnxPressError
from onnxpress.units import human_bytes, human_count


def _console(stderr: bool = False):
    from rich.console import Console

    return Console(stderr=stderr, highlight=False, soft_wrap=False)


def parse_shapes(items: Sequence[str] | None) -> dict[str, Any] | None:
    """`--shape input=1,3,224,224 --shape seq=128` -> {input: [1,3,224,224], seq: 128}."""
    if not items:
        return None
    from onnxpress.errors import PassOptionError

    out: dict[str, Any] = {}
    for item in items:
        name, eq, dims = item.partition("=")
        if not eq or not name or not dims:
            raise PassOptionError(f"--shape expects NAME=d1,d2,... or DIM=size, got '{item}'")
        try:
            values = [int(d) for d in dims.replace("x", ",").split(",") if d]
        except ValueError:
            raise PassOptionError(f"--shape {item}: sizes must be integers") from None
        out[name] = values[0] if len(values) == 1 else values
    return out


def _human(n: float) -> str:
    return human_bytes(n)

def _count(n: float) -> str:
    return human_count(n)

# -- passes ------------------------------------------------------------------------------------
def cmd_passes(args: argparse.Namespace) -> int:
    from rich.table import Table

    from onnxpress import passes

    infos = passes.list_passes()
    if args.json:
        print(json.dumps([{
            "name": p.name, "summary": p.summary, "lossy": p.lossy, "source": p.source,
            "requires": list(p.requires), "uses": list(p.uses),
            "options": {k: {"type": o.type_name, "default": o.default} for k, o in p.options.items()},
        } for p in infos], indent=2, default=str))
        return 0
    table = Table(title="onnxpress passes", show_lines=False)
    table.add_column("pass", style="bold")
    table.add_column("options (default)")
    table.add_column("what it does")
    for p in infos:
        opts = "\n".join(f"{k}: {o.type_name} = {o.default!r}" for k, o in p.options.items()) or "-"
        tags = []
        if p.lossy:
            tags.append("lossy")
        if p.requires:
            tags.append("needs " + ", ".join(p.requires))
        if p.uses:
            tags.append("uses " + ", ".join(p.uses) + " when given")
        if p.source != "builtin":
            tags.append(f"from {p.source}")
        table.add_row(p.name, opts, p.summary + (f" [dim]({'; '.join(tags)})[/dim]" if tags else ""))
    _console().print(table)
    if args.verbose:
        for p in infos:
            _console().rule(p.name)
            print(p.doc)
    return 0


# -- inspect -----------------------------------------------------------------------------------
def _inspect_artifact(args: argparse.Namespace) -> int:
    """`onnxpress inspect DIR` on a compiled TVM artifact: what it was built for and which nodes
    run as integer kernels, which stayed float and why (the manifest, read back)."""
    from onnxpress.backends.tvm import load_artifact
    from onnxpress.commands.tvm import integer_summary

    art = load_artifact(args.model)
    m = art.manifest
    if args.json:
        print(json.dumps(m, indent=2, default=str))
        return 0
    t = m["target"]
    print(f"{art.path}: TVM artifact for {t['name']} ({t['tvm']}), built {m.get('created', '?')}")
    print("  inputs: " + ", ".join(f"{i['name']} {i['shape']} {i['dtype']}" for i in m["inputs"]))
    print("  outputs: " + ", ".join(f"{o['name']} {o['shape']} {o['dtype']}" for o in m["outputs"]))
    if m.get("passes"):
        print(f"  passes applied before compiling: {', '.join(m['passes'])}")
    sched = m.get("schedules") or {}
    parts = [f"{v} {k.replace('_', ' ')}" for k, v in sched.items() if isinstance(v, int) and v]
    if parts:
        print(f"  kernels: {', '.join(parts)}")
    lines = integer_summary(m.get("integer"), limit=50, every_node=True)
    print("\n".join(lines) if lines else "  integer: no quantized nodes (a float model)")
    tuning = m.get("tuning") or {}
    if tuning.get("trials_measured"):
        print(f"  tuned: {tuning['trials_measured']} trials on {tuning['tasks_tuned']} task(s), DB {tuning['db']}")
    if m.get("cuda_modules"):
        print(f"  CUDA: {len(m['cuda_modules'])} module(s), PTX in {art.path / 'cuda'}")
    return 0


def cmd_inspect(args: argparse.Namespace, extensions: list) -> int:
    from rich.markup import escape
    from rich.table import Table

    import onnxpress as ox
    from onnxpress.commands.ecosystem import import_model
    from onnxpress.passes.graph import bind_input_shapes

    if Path(args.model).is_dir() and (Path(args.model) / "manifest.json").exists():
        return _inspect_artifact(args)
    model = import_model(args.model)  # .onnx, .keras/.h5 or a SavedModel directory
    shapes = parse_shapes(args.shape)
    st = ox.model_stats(bind_input_shapes(model, shapes) if shapes else model, batch=args.batch)
    if args.json:
        out = st.to_dict()
        for ext in extensions:  # e.g. --memory adds the activation plan's figures
            if hasattr(ext, "inspect_json"):
                out.update(ext.inspect_json(model, args))
        print(json.dumps(out, indent=2, default=str))
        return 0
    con = _console()
    con.print(f"[bold]{args.model}[/bold]  opset {st.opset}  ir {model.ir_version}"
              f"  producer {model.producer_name or '?'} {model.producer_version}")
    con.print(f"nodes {st.nodes}   parameters {st.params:,} ({_count(st.params)})   "
              f"weights {_human(st.weight_bytes)}   file {_human(st.bytes)}   "
              f"MACs {st.macs:,} ({_count(st.macs)}, batch {args.batch})")
    io = Table(title="inputs and outputs")
    for c in ("", "name", "type", "shape"):
        io.add_column(c)
    for kind, items in (("in", st.inputs), ("out", st.outputs)):
        for name, dtype, dims in items:
            io.add_row(kind, name, dtype, escape("[" + ", ".join(map(str, dims)) + "]"))
    con.print(io)
    if st.initializer_inputs:
        con.print(f"[yellow]{st.initializer_inputs} initializers are also graph inputs (exports "
                  "before ONNX 1.3 list every weight as an input): passes treat them as "
                  "constants; optimize --keep-initializer-inputs keeps them overridable[/yellow]")
    hist = Table(title="operators")
    hist.add_column("op")
    hist.add_column("count", justify="right")
    for op, n in st.op_histogram.items():
        hist.add_row(op, str(n))
    con.print(hist)
    if st.layers:
        layers = Table(title="MACs per layer")
        for c, j in (("layer", "left"), ("op", "left"), ("MACs", "right"), ("share", "right"),
                     ("params", "right")):
            layers.add_column(c, justify=j)
        shown = sorted(st.layers, key=lambda layer: -layer.macs)[: args.top] if args.top else st.layers
        for layer in shown:
            share = layer.macs / st.macs if st.macs else 0
            layers.add_row(escape(layer.node), layer.op_type, f"{layer.macs:,}", f"{share:.1%}",
                           f"{layer.params:,}")
        if args.top and len(st.layers) > args.top:
            layers.caption = f"top {args.top} of {len(st.layers)} layers by MACs (--top 0 shows all)"
        con.print(layers)
    if st.unknown_shape_layers:
        con.print(f"[yellow]MACs unknown (dynamic shapes) for {len(st.unknown_shape_layers)} "
                  f"layers: {', '.join(st.unknown_shape_layers[:5])}...[/yellow]")
    for ext in extensions:
        if hasattr(ext, "inspect_sections"):
            ext.inspect_sections(model, args, con)
    return 0


# -- optimize ----------------------------------------------------------------------------------
def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def cmd_optimize(args: argparse.Namespace) -> int:
    import onnxpress as ox
    from onnxpress import passes
    from onnxpress.commands.ecosystem import (
        apply_recipe_args,
        import_model,
        keep_before,
        report_instruments,
        write_optimize_report,
    )
    from onnxpress.errors import ModelSaveError

    apply_recipe_args(args)  # --recipe fills passes, target, calib, outputs; checks them all
    src, out = Path(args.model), Path(args.output)
    if _same_file(src, out) or src.resolve() == out.resolve():
        raise ModelSaveError(
            f"-o {out} is the input model; onnxpress never writes over its input, choose another path")
    pipeline = args.passes
    if not pipeline:
        raise ox.PassOptionError("give the passes to run with -p, e.g. -p fold_constants,dce,simplify,"
                                 " or a recipe with --recipe (see `onnxpress recipes`)")
    steps = passes.parse_pipeline(pipeline)  # fail on bad names/options before loading anything
    if Path(args.model).is_dir() and (Path(args.model) / "manifest.json").exists():
        return _inspect_artifact(args)
    model = import_model(args.model)  # .onnx, .keras/.h5 or a SavedModel directory
    before = keep_before(args, model)
    shapes = parse_shapes(args.shape)
    with warnings.catch_warnings():      # the passes' warnings are printed after the table
        warnings.simplefilter("ignore", UserWarning)
        result = passes.run(model, steps, calib=args.calib, target=args.target or "ort",
                            seed=args.seed, shapes=shapes, verify=args.verify,
                            progress=not args.quiet, inplace=True,
                            instruments=report_instruments(args),
                            keep_initializer_inputs=args.keep_initializer_inputs)
    ox.save(result.model, out, external_data=True if args.external_data else None)
    if args.report_json:
        Path(args.report_json).write_text(json.dumps(result.to_dict(), indent=2))
    report = write_optimize_report(args, before, result)
    if not args.quiet:
        con = _console()
        con.print(result.table())
        from rich.markup import escape

        for r in result.reports:
            for w in r.warnings:
                con.print(f"[yellow]warning[/yellow] {escape(w)}")
        first, last = result.reports[0], result.reports[-1]
        con.print(f"wrote {out}: nodes {first.nodes_before} -> {last.nodes_after}, "
                  f"{_human(first.bytes_before)} -> {_human(last.bytes_after)}")
        if report is not None:
            con.print(f"report {report} (and {report.with_suffix('.json').name})")
    for hook in getattr(args, "_after_optimize", []):
        hook(args, model, result)
    return 0


# -- bench -------------------------------------------------------------------------------------
def _load_feeds(path: str | None):
    if path is None:
        return None
    import numpy as np

    from onnxpress.errors import CalibrationError

    try:
        with np.load(path, allow_pickle=False) as f:
            return {k: f[k] for k in f.files}
    except (OSError, ValueError) as exc:
        raise CalibrationError(f"--inputs {path} is not a readable .npz file: {exc}") from None


def _bench_one(path: str, feeds, args):
    from onnxpress.backends import ort

    p = Path(path)
    if p.is_dir() and (p / "manifest.json").exists():
        from onnxpress.backends import tvm

        return tvm.benchmark_artifact(p, feeds, runs=args.runs, warmup=args.warmup)
    return ort.benchmark(path, feeds, threads=args.threads, runs=args.runs, warmup=args.warmup,
                         optimization=args.ort_opt, shapes=parse_shapes(args.shape))


def _runs_on(path: str, args) -> str:
    """What `_bench_one` timed `path` with, for the table: a TVM artifact runs on TVM's own
    runtime (its thread pool, not --threads or --ort-opt)."""
    p = Path(path)
    if p.is_dir() and (p / "manifest.json").exists():
        from onnxpress.backends import tvm

        art = tvm.load_artifact(p)
        return f"TVM {art.target_name} artifact ({art.where()})"
    return f"onnxruntime, {args.threads} threads, optimization={args.ort_opt}"


def _profile_one(path: str, feeds, args):
    from onnxpress.backends import ort

    p = Path(path)
    if p.is_dir():
        from onnxpress.backends import tvm

        return tvm.load_artifact(p).profile(feeds, runs=args.runs, warmup=args.warmup)
    return ort.profile(path, feeds, threads=args.threads, runs=args.runs, warmup=args.warmup,
                       optimization=args.ort_opt, shapes=parse_shapes(args.shape))


def _kernel_label(name: str, op: str = "", width: int = 38) -> str:
    """'Conv …/features.5/Relu_output_0_nchwc': the op, then the end of the name, which is where
    onnxruntime's node names and TVM's fused names say the most."""
    room = width - (len(op) + 1 if op else 0)
    short = name if len(name) <= room else "…" + name[-(room - 1):]
    return f"{op} {short}" if op else short


def _print_profile(model: str, prof, top: int) -> None:
    from rich.markup import escape
    from rich.table import Table

    shown = prof.kernels[:top] if top > 0 else prof.kernels
    rest = prof.kernels[len(shown):]
    t = Table(title=f"{escape(model)}: where {prof.latency_ms:.3f} ms go ({prof.backend})")
    for c in ("kernel", "calls", "ms", "mean ms", "share"):
        t.add_column(c, justify="left" if c == "kernel" else "right", no_wrap=True)
    for k in shown:
        t.add_row(escape(_kernel_label(k.name, k.op)), str(k.calls), f"{k.total_ms:.3f}",
                  f"{k.mean_ms:.3f}", f"{k.share:.1f}%")
    if rest:
        t.add_row(f"({len(rest)} more kernel{'s' if len(rest) > 1 else ''})", str(sum(k.calls for k in rest)),
                  f"{sum(k.total_ms for k in rest):.3f}", "", f"{sum(k.share for k in rest):.1f}%")
    other = "(VM: allocation, checks, dispatch)" if prof.backend == "tvm" else "(executor between nodes)"
    t.add_row(other, str(prof.other_calls or ""), f"{prof.other_ms:.3f}", "",
              f"{100 * prof.other_ms / prof.total_ms if prof.total_ms else 0:.1f}%", end_section=True)
    t.add_row("total", str(sum(k.calls for k in prof.kernels) + prof.other_calls),
              f"{prof.total_ms:.3f}", "", "100.0%", style="bold")
    con = _console()
    con.print(t)
    how = "each timed where the VM calls it" if prof.backend == "tvm" else "onnxruntime's profiler"
    con.print(f"p50 {prof.latency_ms:.3f} ms; kernels {prof.kernel_ms:.3f} ms ({how}; {prof.runs} runs)")
    if prof.kernel_ms > prof.latency_ms:
        con.print("the kernels, timed one by one, add up to more than a run: shares are of their sum")


def cmd_bench(args: argparse.Namespace) -> int:
    from rich.table import Table

    import onnxpress as ox
    from onnxpress.data import make_inputs

    feeds = _load_feeds(args.inputs)
    models = [args.model] + ([args.vs] if args.vs else [])
    if feeds is None:
        ref = next((m for m in models if not Path(m).is_dir()), None)
        if ref is not None:
            feeds = make_inputs(ox.load(ref), shapes=parse_shapes(args.shape), seed=0)
    if args.profile:
        profiles = [(m, _profile_one(m, feeds, args)) for m in models]
        if args.json:
            print(json.dumps([{"model": m, **p.to_dict()} for m, p in profiles], indent=2))
            return 0
        for m, p in profiles:
            _print_profile(m, p, args.top)
        return 0
    rounds = max(1, args.rounds)
    results: dict[str, list] = {m: [] for m in models}
    for _ in range(rounds):  # interleave so machine drift hits every model alike
        for m in models:
            results[m].append(_bench_one(m, feeds, args))
    import statistics

    rows = []
    for m in models:
        rs = results[m]
        rows.append((m, statistics.median(r.p50_ms for r in rs), statistics.median(r.p90_ms for r in rs)))
    if args.json:
        print(json.dumps([{"model": m, "p50_ms": a, "p90_ms": b} for m, a, b in rows], indent=2))
        return 0
    t = Table(title="latency")
    for c in ("model", "runs on", "p50 ms", "p90 ms", "speed-up vs --vs"):
        t.add_column(c, justify="left" if c in ("model", "runs on") else "right")
    base = rows[-1][1] if args.vs else None
    for m, p50, p90 in rows:
        t.add_row(m, _runs_on(m, args), f"{p50:.3f}", f"{p90:.3f}", f"{base / p50:.2f}x" if base else "-")
    _console().print(t)
    return 0


# -- parser ------------------------------------------------------------------------------------
def build_parser(extensions: list | None = None) -> argparse.ArgumentParser:
    from onnxpress import __version__

    extensions = extensions if extensions is not None else _extensions()
    parser = argparse.ArgumentParser(
        prog="onnxpress", description="Make neural networks small and fast for edge boards.")
    parser.add_argument("--version", action="version", version=f"onnxpress {__version__}")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("passes", help="list every registered pass with its options")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("-v", "--verbose", action="store_true", help="print each pass's full doc")
    p.set_defaults(func=cmd_passes)

    p = sub.add_parser("inspect", help="ops, parameters, bytes, MACs per layer, opset, IO")
    p.add_argument("model", help=".onnx file, .keras/.h5 Keras file or TensorFlow SavedModel directory")
    p.add_argument("--batch", type=int, default=1, help="batch size for dynamic batch dims")
    p.add_argument("--top", type=int, default=20, help="layers shown by MACs (0: all)")
    p.add_argument("--shape", action="append", metavar="NAME=DIMS",
                   help="bind dynamic dims: input_ids=1,128 or seq=128 (repeatable)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    for ext in extensions:
        if hasattr(ext, "add_inspect_options"):
            ext.add_inspect_options(p)
    p.set_defaults(func=lambda a: cmd_inspect(a, extensions))

    p = sub.add_parser("optimize", help="run a pass pipeline and write the result")
    p.add_argument("model", help=".onnx file, .keras/.h5 Keras file or TensorFlow SavedModel directory")
    p.add_argument("-p", "--passes", help="pipeline, e.g. fold_constants,dce,simplify")
    p.add_argument("-o", "--output", help="output .onnx (never the input; a recipe may name it)")
    p.add_argument("--recipe", metavar="NAME|FILE.toml",
                   help="run a pipeline recipe: a built-in name (`onnxpress recipes`) or a TOML file")
    p.add_argument("--report", metavar="FILE.html",
                   help="write a self-contained HTML report (and FILE.json with the same figures)")
    p.add_argument("--no-latency", action="store_true",
                   help="with --report: do not time the models before and after on onnxruntime")
    p.add_argument("--calib", help=".npz with arrays named after the inputs, batch on axis 0")
    p.add_argument("--target", default=None, choices=["ort", "tvm", "x86", "arm", "cuda"],
                   help="backend the model is for: ort (default), tvm, x86, arm, cuda")
    p.add_argument("--shape", action="append", metavar="NAME=DIMS",
                   help="bind dynamic dims: input=1,3,224,224 or dim=128 (repeatable)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--verify", action="store_true",
                   help="check and compare outputs with onnxruntime after every pass")
    p.add_argument("--keep-initializer-inputs", action="store_true",
                   help="keep initializers that are also graph inputs (IR-3 exports) overridable; "
                        "by default they become constants so folding and fusion see them")
    p.add_argument("--external-data", action="store_true", help="write weights to a .data file")
    p.add_argument("--report-json", metavar="FILE", help="write the per-pass reports as JSON")
    p.add_argument("-q", "--quiet", action="store_true")
    p.set_defaults(func=cmd_optimize)

    p = sub.add_parser("bench", help="latency p50/p90 side by side (onnxruntime or a TVM artifact)")
    p.add_argument("model", help=".onnx file or compiled artifact directory")
    p.add_argument("--vs", help="a second model or artifact to compare against")
    p.add_argument("--inputs", help=".npz of inputs (default: generated)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--runs", type=int, default=50)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds per model")
    p.add_argument("--ort-opt", default="all", choices=["disable", "basic", "extended", "layout", "all"])
    p.add_argument("--shape", action="append", metavar="NAME=DIMS")
    p.add_argument("--profile", action="store_true",
                   help="time per kernel (TVM artifact) or per node (onnxruntime), slowest first")
    p.add_argument("--top", type=int, default=10, help="with --profile: kernels shown (0: all)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_bench)

    for ext in extensions:
        if hasattr(ext, "add_commands"):
            ext.add_commands(sub)
    return parser


def _extensions() -> list:
    from onnxpress.commands import extension_modules

    return extension_modules()


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        if not getattr(args, "func", None):
            parser.print_help()
            return 1
        return int(args.func(args) or 0)
    except OnnxPressError as exc:
        if debug:
            raise
        print(f"onnxpress: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("onnxpress: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
