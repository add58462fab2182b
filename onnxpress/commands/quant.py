"""`onnxpress sensitivity MODEL --calib calib.npz`: how much each weighted layer hurts the outputs
when quantized alone (int8 static, int4 weight-only...), most sensitive first."""

from __future__ import annotations

import argparse
import json


def add_commands(subparsers) -> None:
    p = subparsers.add_parser(
        "sensitivity", help="per-layer quantization sensitivity on calibration data (a table)")
    p.add_argument("model")
    p.add_argument("--calib", required=True,
                   help=".npz with arrays named after the inputs, batch on axis 0")
    p.add_argument("--batch-size", type=int, default=None,
                   help="samples per calibration batch (default: the batch the model's inputs "
                        "fix, as plain torch exports fix 1; else 8)")
    p.add_argument("--max-batches", type=int, default=4, help="calibration batches compared")
    p.add_argument("--metric", choices=["cosine", "rel_l2"], default="cosine",
                   help="cosine: 1 - min cosine to fp32; rel_l2: relative L2 error")
    p.add_argument("--precisions", default="int8,int4",
                   help="comma-separated precisions measured (int8, int4, fp16)")
    p.add_argument("--method", choices=["minmax", "percentile", "entropy", "mse"],
                   default="percentile", help="activation range method for int8")
    p.add_argument("--target", default="ort")
    p.add_argument("--top", type=int, default=0, help="show only the N most sensitive layers")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_sensitivity)


def cmd_sensitivity(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from onnxpress import data
    from onnxpress.errors import PassOptionError
    from onnxpress.io import load
    from onnxpress.passes.quant.auto import PRECISIONS, sensitivity_table

    precisions = tuple(p.strip() for p in args.precisions.split(",") if p.strip())
    bad = [p for p in precisions if p not in PRECISIONS or p == "fp32"]
    if bad:
        raise PassOptionError(f"--precisions: unknown {', '.join(bad)}; use int8, int4, fp16")
    model = load(args.model)
    calib = data.npz(args.calib, batch_size=args.batch_size or data.static_batch(model) or 8)
    rows = sensitivity_table(model, calib, metric=args.metric, precisions=precisions,
                             max_batches=args.max_batches, method=args.method,
                             target=args.target, progress=not args.json)
    rows.sort(key=lambda r: -max((r.get(p) or 0.0) for p in precisions))
    if args.top:
        rows = rows[:args.top]
    if args.json:
        print(json.dumps({"metric": args.metric, "layers": rows}, indent=2))
        return 0
    what = "1 - min cosine" if args.metric == "cosine" else "relative L2"
    table = Table(title=f"quantization sensitivity ({what} to fp32, layer quantized alone)")
    table.add_column("layer")
    table.add_column("op")
    table.add_column("params", justify="right")
    for p in precisions:
        table.add_column(p, justify="right")
    for r in rows:
        table.add_row(r["layer"], r["op"], f"{r['params']:,}",
                      *("-" if r.get(p) is None else f"{r[p]:.2e}" for p in precisions))
    Console().print(table)
    return 0
