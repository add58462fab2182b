"""Control flow (If, Loop, Scan: their bodies run through the same interpreter) and sequences
(Python lists of tensors)."""

from __future__ import annotations

import torch

from onnxpress.passes.torch_graph.registry import arg, op, scalar


@op("If")
def if_(args, a, ctx):
    branch = a["then_branch"] if bool(scalar(args[0])) else a["else_branch"]
    return ctx.run_graph(branch, [])


@op("Loop")
def loop(args, a, ctx):
    trips, cond = arg(args, 0), arg(args, 1)
    trips = int(scalar(trips)) if trips is not None else None
    cond = bool(scalar(cond)) if cond is not None else True
    carried = list(args[2:])
    body = a["body"]
    n_scan = len(body.output) - 1 - len(carried)
    scans: list[list] = [[] for _ in range(n_scan)]
    i = 0
    while cond and (trips is None or i < trips):
        outs = ctx.run_graph(body, [torch.tensor(i, dtype=torch.int64), torch.tensor(cond), *carried])
        cond = bool(scalar(outs[0]))
        carried = outs[1:1 + len(carried)]
        for acc, value in zip(scans, outs[1 + len(carried):]):
            acc.append(value)
        i += 1
    if any(not acc for acc in scans):
        raise ctx.unsupported("a Loop that runs no iteration has scan outputs of unknown shape")
    return carried + [torch.stack(acc) for acc in scans]


@op("Scan")
def scan(args, a, ctx):
    if ctx.opset < 9:
        raise ctx.unsupported("Scan-8 (batched, with sequence_lens)")
    m = a["num_scan_inputs"]
    states, xs = list(args[:len(args) - m]), args[len(args) - m:]
    in_axes = list(a.get("scan_input_axes", [0] * m))
    in_dirs = list(a.get("scan_input_directions", [0] * m))
    xs = [x.movedim(ax % x.dim(), 0) for x, ax in zip(xs, in_axes)]
    xs = [x.flip(0) if d else x for x, d in zip(xs, in_dirs)]
    body = a["body"]
    n_out = len(body.output) - len(states)
    outs: list[list] = [[] for _ in range(n_out)]
    for t in range(xs[0].shape[0] if xs else 0):
        res = ctx.run_graph(body, [*states, *(x[t] for x in xs)])
        states = res[:len(states)]
        for acc, value in zip(outs, res[len(states):]):
            acc.append(value)
    out_axes = list(a.get("scan_output_axes", [0] * n_out))
    out_dirs = list(a.get("scan_output_directions", [0] * n_out))
    stacked = []
    for acc, ax, d in zip(outs, out_axes, out_dirs):
        y = torch.stack(acc)
        y = y.flip(0) if d else y
        stacked.append(y.movedim(0, ax % y.dim()))
    return states + stacked


# -- sequences -----------------------------------------------------------------------------------
@op("SequenceConstruct", sequence=True)
def sequence_construct(args, a, ctx):
    return list(args)


@op("SequenceEmpty", sequence=True)
def sequence_empty(args, a, ctx):
    return []


@op("SequenceLength")
def sequence_length(args, a, ctx):
    return torch.tensor(len(args[0]), dtype=torch.int64)


@op("SequenceAt")
def sequence_at(args, a, ctx):
    return args[0][int(scalar(args[1]))]


@op("SequenceInsert", sequence=True)
def sequence_insert(args, a, ctx):
    seq = list(args[0])
    pos = arg(args, 2)
    seq.insert(int(scalar(pos)) if pos is not None else len(seq), args[1])
    return seq


@op("SequenceErase", sequence=True)
def sequence_erase(args, a, ctx):
    seq = list(args[0])
    pos = arg(args, 1)
    del seq[int(scalar(pos)) if pos is not None else -1]
    return seq


@op("ConcatFromSequence")
def concat_from_sequence(args, a, ctx):
    axis = a["axis"]
    if a.get("new_axis", 0):
        return torch.stack(args[0], dim=axis)
    return torch.cat(args[0], dim=axis)


@op("SplitToSequence", sequence=True)
def split_to_sequence(args, a, ctx):
    x, split = args[0], arg(args, 1)
    axis = a.get("axis", 0) % x.dim()
    if split is None:
        parts = torch.split(x, 1, dim=axis)
        return [p.squeeze(axis) for p in parts] if a.get("keepdims", 1) == 0 else list(parts)
    if split.dim() == 0:
        return list(torch.split(x, int(split), dim=axis))
    return list(torch.split(x, [int(v) for v in split.tolist()], dim=axis))
