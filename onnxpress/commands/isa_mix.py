"""`onnxpress isa-mix DIR`: the instruction mix of a compiled artifact's kernels, no board needed.

    onnxpress isa-mix out/arm [--model model.onnx] [--top 10] [--min-vector-share 0.5] [--json]

Prints, per kernel (heaviest first), the instructions, the vector share, FMA lanes and loads per
FMA from the cross objdump (onnxpress/backends/tvm/isa_mix.py). --min-vector-share exits 1 when
the hottest convolution (or, without one, the hottest kernel) has a smaller share of vector
instructions, or of vector FMAs, than that: a CI gate for schedule changes that leave ARM code
scalar.
"""

from __future__ import annotations

import argparse
import json


def cmd_isa_mix(args: argparse.Namespace) -> int:
    from onnxpress.backends.tvm import instruction_mix

    mix = instruction_mix(args.artifact, args.model)
    if args.json:
        print(json.dumps(mix.to_dict(), indent=2))
    else:
        print(f"{mix.library} ({mix.arch}, {mix.objdump}); kernels weighted by {mix.weighted_by}")
        print(mix.table(args.top))
        print(mix.summary())
    if args.min_vector_share is not None:
        convs = [k for k in mix.kernels if "conv" in k.name]
        gate = convs[0] if convs else mix.kernels[0]
        fma_share = gate.vector_fma_share
        if gate.vector_share < args.min_vector_share or (fma_share is not None and fma_share < args.min_vector_share):
            print(f"{gate.name}: {100 * gate.vector_share:.0f}% vector instructions, "
                  f"{100 * (fma_share or 0):.0f}% vector FMAs; the gate is {100 * args.min_vector_share:.0f}%")
            return 1
    return 0


def add_commands(subparsers) -> None:
    p = subparsers.add_parser("isa-mix", help="vector vs scalar instruction mix of an artifact's kernels",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("artifact", help="directory written by `onnxpress compile` (or a model.so)")
    p.add_argument("--model", help="the ONNX model it was compiled from, to weigh kernels by FLOPs "
                                   "(default: the manifest's source_model when it exists)")
    p.add_argument("--top", type=int, default=10, help="kernels shown (0: all)")
    p.add_argument("--min-vector-share", type=float, default=None, metavar="FRACTION",
                   help="exit 1 when the hottest conv's share of vector instructions or of vector "
                        "FMAs is below this (e.g. 0.5)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_isa_mix)
