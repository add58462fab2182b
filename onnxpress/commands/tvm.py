"""`onnxpress compile` and `onnxpress run`: the TVM backend on the command line.

    onnxpress compile model.onnx --target x86|arm|cuda[:sm_XX] [--shape NAME=1,3,224,224 ...]
        [--tune N --db DIR] [--rpc HOST:PORT --key K] [--exact-math] -o DIR
    onnxpress compile model.onnx --recipe small-board [--tune 0] -o DIR   # the recipe's [compile]
    onnxpress run DIR --inputs x.npz [--verify model.onnx] [--rtol R --atol A] [--outputs y.npz]
        [--bench N] [--rpc HOST:PORT --key K]
"""

from __future__ import annotations

import argparse
import json
import sys

from onnxpress.errors import BackendError, OnnxPressError


def _parse_shapes(items) -> dict | None:
    if not items:
        return None
    out = {}
    for item in items:
        name, eq, dims = item.partition("=")
        if not eq or not name or not dims:
            raise BackendError(f"--shape expects NAME=d1,d2,..., got '{item}'")
        try:
            out[name] = [int(d) for d in dims.replace("x", ",").split(",") if d]
        except ValueError:
            raise BackendError(f"--shape {item}: sizes must be integers") from None
    return out


def _parse_target(text: str):
    text = text.strip()
    if text.startswith("{"):
        try:
            return json.loads(text)
        except json.JSONDecodeError as exc:
            raise BackendError(f"--target looks like JSON but does not parse: {exc}") from None
    return text


def integer_summary(info: dict | None, limit: int = 12, *, every_node: bool = False) -> list[str]:
    """Lines saying which quantized nodes run as integer kernels and which stayed float, and why
    (the manifest's "integer" entry); every_node lists the integer kernels too, not only the rest."""
    if not info:
        return []
    lines = [f"  integer: {info['int8_kernels']} integer kernel(s), {info['int8_io']} op(s) on 8-bit "
             f"tensors, {info['float']} left float"]
    others = [n for n in info["nodes"] if every_node or n["kernel"] != "int8"]
    by_reason: dict = {}
    for n in others:
        by_reason.setdefault((n["kernel"], n["op"], n.get("reason", "")), []).append(n)
    for (kind, _op, reason), nodes in list(by_reason.items())[:limit]:
        names = ", ".join(n["node"] for n in nodes[:3]) + (f" (+{len(nodes) - 3})" if len(nodes) > 3 else "")
        lines.append(f"    {kind:8s} {len(nodes):3d} x {nodes[0]['op']}: {reason} [{names}]")
    return lines


def _apply_recipe_compile(args: argparse.Namespace) -> None:
    """--recipe NAME|FILE: its [compile] section gives target, tune_trials, db, rpc and key;
    flags given on the command line win."""
    if args.recipe:
        from onnxpress import recipes

        section = recipes.load(args.recipe).compile
        if not section:
            from onnxpress.errors import PassOptionError

            raise PassOptionError(f"recipe '{args.recipe}' has no [compile] section; give --target")
        for flag, key in (("target", "target"), ("tune", "tune_trials"), ("db", "db"),
                          ("rpc", "rpc"), ("key", "key")):
            if getattr(args, flag) is None and section.get(key) is not None:
                setattr(args, flag, section[key])
    args.target = args.target or "x86"
    args.tune = int(args.tune or 0)


def cmd_compile(args: argparse.Namespace) -> int:
    from onnxpress.backends import tvm
    from onnxpress.backends.tvm.artifact import kernels_summary

    _apply_recipe_compile(args)
    art = tvm.compile(args.model, _parse_target(args.target), shapes=_parse_shapes(args.shape),
                      tune_trials=args.tune, db=args.db, rpc=args.rpc, key=args.key,
                      fast_math=not args.exact_math,
                      output_dir=args.output, progress=not args.quiet)
    m = art.manifest
    t = m["tuning"]
    print(f"compiled {args.model} for {m['target']['name']} ({m['target']['tvm']}) -> {art.path}")
    print("  inputs: " + ", ".join(f"{i['name']} {i['shape']} {i['dtype']}" for i in m["inputs"]))
    sched = m.get("schedules") or {}
    if sched:
        print(f"  kernels: {kernels_summary(sched)}")
    for line in integer_summary(m.get("integer")):
        print(line)
    if sched.get("amx_kernels"):
        print(f"  AMX tiles: {sched['amx_kernels']} int8 kernel(s) on tdpbusd (the rest on vpdpbusd); "
              "loading asks Linux for the tile state (5.16+)")
    if args.tune:
        if t.get("previous_trials"):
            print(f"  tuning: already tuned in {t['db']} ({t['previous_trials']} trials); nothing to do")
        else:
            print(f"  tuning: {t['trials_measured']} trials on {t['tasks_tuned']} task(s) in "
                  f"{t['seconds']:.0f} s; {t['tasks_from_db']} task(s) reused from {t['db']}"
                  + (f", {t['tasks_skipped_budget']} left for a larger budget" if t['tasks_skipped_budget'] else ""))
            confirmed = t.get("confirmed") or {}
            if confirmed:
                won = {k: v for k, v in confirmed.items() if v["kept"] == "tuned"}
                line = (f"  confirmed side by side: {len(won)} of {len(confirmed)} task(s) beat their "
                        "default schedule")
                if won:
                    name, v = max(won.items(), key=lambda kv: kv[1]["default_ms"] / kv[1]["tuned_ms"])
                    line += f" (most: {name} {v['default_ms']:.3f} -> {v['tuned_ms']:.3f} ms)"
                print(line)
    if m["files"].get("ptx"):
        print(f"  PTX: {art.path / m['files']['ptx']} ({m['target']['spec'].get('arch')})")
    if getattr(args, "report", None):
        from onnxpress.report import compile_report

        path = compile_report(args.report, args.model, art)
        print(f"  report: {path}")
    return 0


def _load_npz(path: str) -> dict:
    import numpy as np

    try:
        with np.load(path) as z:
            return {k: z[k] for k in z.files}
    except (OSError, ValueError) as exc:
        raise BackendError(f"cannot read inputs from {path}: {exc}") from None


def cmd_run(args: argparse.Namespace) -> int:
    import numpy as np

    from onnxpress.backends import tvm

    art = tvm.load_artifact(args.artifact, rpc=args.rpc, key=args.key)
    feeds = _load_npz(args.inputs) if args.inputs else None
    if args.verify:
        result = art.verify(args.verify, feeds, rtol=args.rtol, atol=args.atol)
        print(f"{art.target_name} artifact vs onnxruntime on {args.verify} ({art.where()}):")
        print(f"  max abs error {result.max_abs:.3g}, max rel error {result.max_rel:.3g}")
        print("\n".join("  " + line for line in str(result).splitlines()))
        if args.outputs:
            np.savez(args.outputs, **art.run(feeds))
        status = 0 if result.ok else 1
    else:
        outs = art.run(feeds)
        for name, value in outs.items():
            print(f"{name}: shape {list(value.shape)} {value.dtype}, "
                  f"first values {np.asarray(value).ravel()[:5].tolist()}")
        if args.outputs:
            np.savez(args.outputs, **outs)
        status = 0
    if args.bench:
        b = art.benchmark(feeds, runs=args.bench)
        print(f"latency ({art.where()}): p50 {b.p50_ms:.3f} ms, p90 {b.p90_ms:.3f} ms over {b.runs} runs")
    return status


def add_commands(subparsers) -> None:
    p = subparsers.add_parser("compile", help="compile (and tune) an ONNX model with Apache TVM",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="ONNX model")
    p.add_argument("--target", "-t", default=None,
                   help="x86 (host CPU, the default), arm (aarch64+NEON), cuda or cuda:sm_XX, or a "
                        "TVM target as JSON")
    p.add_argument("--recipe", metavar="NAME|FILE",
                   help="take target, tuning budget, db, rpc and key from a recipe's [compile] "
                        "section (onnxpress recipes lists them); flags override it")
    p.add_argument("--shape", action="append", metavar="NAME=D1,D2,...",
                   help="static shape for an input with dynamic dims (repeatable)")
    p.add_argument("--tune", type=int, default=None, metavar="N",
                   help="MetaSchedule trials (0, the default: default schedules, no measurement)")
    p.add_argument("--db", help="tuning database directory, reused by later compiles "
                                "(default ~/.cache/onnxpress/tvm-db when tuning)")
    p.add_argument("--rpc", metavar="HOST:PORT", help="TVM RPC tracker: tune/run on a board")
    p.add_argument("--key", help="the board's key at the tracker")
    p.add_argument("-o", "--output", required=True, help="artifact directory to write")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--exact-math", action="store_true",
                   help="keep libm's exp/erf/tanh (default: TVM's vectorised approximations, "
                        "which requantization in QDQ models amplifies to visible differences)")
    p.add_argument("--report", metavar="HTML",
                   help="write a self-contained HTML report (model, target, tuning, latency)")
    p.set_defaults(func=cmd_compile)

    r = subparsers.add_parser("run", help="run a compiled TVM artifact, optionally verify it against onnxruntime")
    r.add_argument("artifact", help="directory written by `onnxpress compile`")
    r.add_argument("--inputs", help=".npz with one array per input (default: random inputs)")
    r.add_argument("--verify", metavar="MODEL", help="compare with onnxruntime running this ONNX model")
    r.add_argument("--rtol", type=float, default=None,
                   help="relative tolerance (default 1e-4; integer-kernel artifacts: one step)")
    r.add_argument("--atol", type=float, default=None, help="absolute tolerance (default 1e-5)")
    r.add_argument("--outputs", help="write the outputs to this .npz")
    r.add_argument("--bench", type=int, default=0, metavar="RUNS", help="also time RUNS runs")
    r.add_argument("--rpc", metavar="HOST:PORT", help="run on the board behind this tracker")
    r.add_argument("--key")
    r.set_defaults(func=cmd_run)


def main(argv=None) -> int:
    """Standalone entry (tests): `python -m onnxpress.commands.tvm compile ...`."""
    parser = argparse.ArgumentParser(prog="onnxpress")
    add_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except OnnxPressError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
