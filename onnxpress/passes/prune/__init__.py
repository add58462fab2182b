"""`prune`: make a model smaller by removing weights (unstructured, N:M) or whole channels.

    prune:sparsity=0.8                      80% of Conv/Gemm/MatMul weights zeroed (global magnitude)
    prune:sparsity=0.8,scope=layer          80% in every layer
    prune:nm=2:4                            2 of every 4 consecutive input weights kept
    prune:sparsity=0.5,structured=true     half of the output channels of every prunable
                                            dependency group removed (MACs, params, latency drop)

Modules: groups.py (the `channel_groups` analysis), structured.py, unstructured.py.
"""

from __future__ import annotations

import copy
import warnings
from typing import Annotated, Literal

import numpy as np
import onnx

from onnxpress import stats
from onnxpress.errors import PassError, PassOptionError
from onnxpress.passes.context import PassContext
from onnxpress.passes.graph import copy_model_fields
from onnxpress.passes.prune.groups import ChannelGroup, ChannelGroups, channel_groups
from onnxpress.passes.prune.structured import group_scores, prune_channels
from onnxpress.passes.prune.unstructured import prune_unstructured, sparse_bytes, zipped_bytes
from onnxpress.passes.registry import Range, register

__all__ = ["prune", "channel_groups", "ChannelGroups", "ChannelGroup", "prune_channels",
           "prune_unstructured", "remember_teacher", "calib_error", "calibration_sample"]

TEACHER_KEY = "onnxpress.teacher"
# onnxruntime's CPU convolutions work on channel blocks of 8 (AVX2) or 16 (AVX-512) in NCHWc
# layout; a conv whose channel count is off that grid falls back to a plain kernel, which made
# mobilenetv3 pruned 30% unrounded 1.9x slower than the original here, and 0.7x rounded to 8.
AUTO_ROUND_TO = 8


def remember_teacher(model: onnx.ModelProto, ctx: PassContext) -> None:
    """Keep the model as it was before the first lossy pass, for `distill` to use as teacher."""
    if TEACHER_KEY not in ctx.options:
        ctx.options[TEACHER_KEY] = copy.deepcopy(model)


def calibration_sample(calib, max_samples: int, batch_size: int = 64,
                       model: onnx.ModelProto | None = None) -> list[dict]:
    """The first `max_samples` calibration samples, re-cut into batches of `batch_size` when the
    batches stack (an .npz gives one sample per batch), else the batches as they come. A
    `model` whose inputs have a fixed batch dimension (plain torch exports: 1) gets batches of
    that size: onnxruntime rejects any other."""
    from onnxpress.data import static_batch

    fixed = static_batch(model) if model is not None else None
    if fixed:
        batch_size = fixed
    batches, n = [], 0
    for b in calib:
        batches.append(b)
        n += len(next(iter(b.values()))) if b and np.ndim(next(iter(b.values()))) else 1
        if n >= max_samples:
            break
    try:
        stacked = {k: np.concatenate([b[k] for b in batches])[:max_samples] for k in batches[0]}
    except ValueError:
        return batches
    total = len(next(iter(stacked.values())))
    if fixed:
        total -= total % fixed            # a ragged last batch would not fit the model either
    return [{k: v[i:i + batch_size] for k, v in stacked.items()} for i in range(0, total, batch_size)]


def calib_error(before: onnx.ModelProto, after: onnx.ModelProto, ctx: PassContext,
                max_samples: int = 256) -> dict:
    """The standard error figures (passes/error.py) of a lossy pass on up to `max_samples`
    calibration samples (empty when there is no calibration data)."""
    if ctx.calib is None:
        return {}
    from onnxpress.passes.error import output_error

    return output_error(before, after, calibration_sample(ctx.calib, max_samples, model=before))


def _blockers(cg: ChannelGroups, groups: list[ChannelGroup] | None = None) -> str:
    """'name (why it stays whole); ...' for the frozen groups (or `groups`), the first eight."""
    if groups is None:
        groups = [g for g in cg.groups.values() if g.sources and g.frozen]
    named = [f"{g.name} ({g.frozen})" for g in groups]
    return "; ".join(named[:8]) + (f"; and {len(named) - 8} more" if len(named) > 8 else "")


@register("prune", lossy=True, uses=("calib",))
def prune(model: onnx.ModelProto, ctx: PassContext, *,
          sparsity: Annotated[float, Range(0, 1, hi_inclusive=False)] = 0.5,
          structured: bool = False,
          nm: str | None = None,
          scope: Literal["auto", "global", "layer"] = "auto",
          criterion: Literal["l2", "l1", "activation"] = "l2",
          round_to: Annotated[int, Range(0)] = 0,
          exclude: list[str] = (),
          allow_partial: bool = False) -> onnx.ModelProto:
    """Prune weights (magnitude, N:M) or whole channels (structured=true) of Conv/Gemm/MatMul.

    unstructured: W[64,512] -> same shape, `sparsity` of the smallest |w| zeroed (scope=global:
        one threshold for all layers, the default; scope=layer: each layer alike); nm=2:4 keeps the
        2 largest of every 4 consecutive input weights.
    structured=true: Conv(32 filters) -> Conv(16 filters); BatchNorm, depthwise convs, the next
        layer's input channels, Flatten->Gemm columns and Reshape constants follow, residual
        Add/Concat/SE-gate groups prune together; graph inputs and outputs keep their shapes.
        Channels ranked by filter norm (criterion=l2|l1) or by mean |activation| on calibration
        data (criterion=activation). scope=layer (default): every group loses `sparsity` of its
        channels; scope=global: one threshold over all groups. round_to keeps channel counts a
        multiple of N (0 = auto: 8, the channel block of onnxruntime's NCHWc CPU kernels; counts
        off that grid fall back to slower kernels), 1 = exact. exclude: node names
        (unstructured) or group names (structured) to keep. When structured pruning can remove
        nothing although sparsity > 0 (every channel group blocked), the pass fails naming what
        blocks each group, unless allow_partial=true (then it warns and returns the model).
    Reports sparsity per layer, compressed size, MACs and parameters before/after.
    """
    remember_teacher(model, ctx)
    before = stats.model_stats(model)
    original = model
    if structured:
        if nm:
            raise PassOptionError("pass 'prune': option 'nm' is for unstructured pruning; "
                                  "drop it or set structured=false")
        calib = ctx.require_calib(model) if criterion == "activation" else None
        cg: ChannelGroups = ctx.analysis("channel_groups", model)
        excluded = set(exclude)
        unknown = excluded - {g.name for g in cg.groups.values()}
        if unknown:
            raise PassOptionError(
                f"pass 'prune': option 'exclude' names no channel group: {', '.join(sorted(unknown))}; "
                f"groups: {', '.join(g.name for g in cg.prunable())}")
        scores = group_scores(model, cg, criterion, calib)
        eff_scope = "layer" if scope == "auto" else scope
        round_to = round_to or AUTO_ROUND_TO
        if excluded:
            ratios = {g.name: (0.0 if g.name in excluded else sparsity) for g in cg.prunable()}
            out, results = prune_channels(model, ratios, cg=cg, scores=scores, round_to=round_to, ctx=ctx)
        else:
            out, results = prune_channels(model, sparsity, cg=cg, scores=scores, scope=eff_scope,
                                          round_to=round_to, ctx=ctx)
        copy_model_fields(original, out)
        removed = sum(r.channels - r.kept for r in results)
        after = stats.model_stats(out)
        if sparsity > 0 and removed == 0:
            why = _blockers(cg) or "no group has more than one channel"
            msg = (f"pass 'prune': structured sparsity={sparsity} removed no channel: "
                   f"{len(cg.prunable())} prunable group(s) of {len(cg.groups)}; blocked: {why}")
            if not allow_partial:
                raise PassError(msg + ". Pass allow_partial=true to accept an unchanged model.")
            warnings.warn(msg, stacklevel=3)
        elif sparsity > 0:
            # Some groups pruned, others held back by a node inside the graph (a normalization or
            # softmax over the channel axis, a reshape it cannot follow): the user asked for
            # `sparsity` everywhere, so name what kept each such group whole. Graph inputs and
            # outputs keep their shapes by design and are only listed in the figures.
            inner = [g for g in cg.groups.values()
                     if g.sources and g.frozen and not g.frozen.startswith(("graph input", "graph output"))]
            if inner:
                warnings.warn(
                    f"pass 'prune': {len(inner)} channel group(s) kept whole, so the model lost "
                    f"{1 - after.params / max(before.params, 1):.0%} of its "
                    f"parameters, not {sparsity:.0%}: " + _blockers(cg, inner), stacklevel=3)
        ctx.record(
            mode="structured", criterion=criterion, scope=eff_scope, round_to=round_to,
            groups=len(cg.groups), prunable_groups=len(cg.prunable()),
            channels_before=sum(r.channels for r in results),
            channels_after=sum(r.kept for r in results),
            macs_before=before.macs, macs_after=after.macs,
            macs_ratio=after.macs / before.macs if before.macs else 1.0,
            params_before=before.params, params_after=after.params,
            params_ratio=after.params / before.params if before.params else 1.0,
            per_group={r.group: f"{r.kept}/{r.channels}" for r in results},
            frozen_groups={g.name: g.frozen for g in cg.groups.values() if g.sources and g.frozen},
            **calib_error(original, out, ctx))
        return out
    if not nm and sparsity == 0:
        ctx.record(mode="unstructured", sparsity=0.0)
        return model
    eff_scope = "global" if scope == "auto" else scope
    work = copy.deepcopy(model)
    res = prune_unstructured(work, sparsity=sparsity, scope=eff_scope, nm=nm, exclude=exclude)
    ctx.record(
        mode=f"nm {nm}" if nm else "unstructured", scope=eff_scope,
        sparsity=round(res["sparsity"], 4), weights=res["weights"], zeros=res["zeros"],
        per_layer=res["layers"], skipped_layers=res["skipped"],
        dense_weight_bytes=before.weight_bytes, sparse_weight_bytes=sparse_bytes(work),
        zipped_bytes_before=zipped_bytes(model), zipped_bytes_after=zipped_bytes(work),
        macs_before=before.macs, params_before=before.params,
        nonzero_params=before.params - res["zeros"],
        **calib_error(original, work, ctx))
    return work
