"""`search`: per-layer pruning ratios under a budget, with the least output error on calib data.

    before: every channel group at 0%          budget: MACs <= 50% of the original
    after:  conv1 10%, conv2 60%, fc1 30% ...  (the cheapest error per unit of cost removed)

Greedy descent over the channel dependency groups (see prune/groups.py): at every step each
group is tried one `step` further; the model is really pruned, its cost measured (MACs,
parameters, weight bytes, or onnxruntime latency) and its outputs compared with the original's
on calibration data (KL divergence of softmax outputs for logits, relative MSE otherwise). The
move with the least error added per unit of cost removed wins, until the budget is met.
"""

from __future__ import annotations

import dataclasses
from typing import Annotated, Literal

import numpy as np
import onnx

from onnxpress import stats
from onnxpress.errors import PassError
from onnxpress.passes.context import PassContext
from onnxpress.passes.graph import copy_model_fields
from onnxpress.passes.prune import AUTO_ROUND_TO, calib_error, calibration_sample, remember_teacher
from onnxpress.passes.prune.groups import channel_groups
from onnxpress.passes.prune.structured import group_scores, prune_channels
from onnxpress.passes.registry import Range, register


def model_cost(model: onnx.ModelProto, metric: str, feed: dict | None = None) -> float:
    """The budgeted quantity of a model: MACs, parameters, weight bytes or latency (ms, ort)."""
    if metric == "latency":
        from onnxpress.backends import ort

        return ort.benchmark(model, feed, threads=1, warmup=3, runs=30).min_ms
    s = stats.model_stats(model)
    return float({"macs": s.macs, "params": s.params, "bytes": s.weight_bytes}[metric])


def output_divergence(reference: list[dict], model: onnx.ModelProto, batches: list[dict]) -> float:
    """Mean output error against reference outputs: KL(softmax(ref) || softmax(out)) for 2-D
    logits, MSE divided by the reference's variance otherwise."""
    from onnxpress.backends import ort

    sess = ort.session(model, threads=1)
    names = list(reference[0])
    total = 0.0
    for ref, batch in zip(reference, batches):
        outs = sess.run(names, batch)
        for name, out in zip(names, outs):
            r = ref[name].astype(np.float64)
            o = out.astype(np.float64)
            if r.ndim == 2 and r.shape[1] > 1:
                pr = np.exp(r - r.max(1, keepdims=True))
                pr /= pr.sum(1, keepdims=True)
                lo = o - o.max(1, keepdims=True)
                lo = lo - np.log(np.exp(lo).sum(1, keepdims=True))
                lr = np.log(np.clip(pr, 1e-12, None))
                total += float((pr * (lr - lo)).sum(1).mean())
            else:
                total += float(((r - o) ** 2).mean() / max(r.var(), 1e-12))
    return total / max(len(batches), 1)


@dataclasses.dataclass
class SearchResult:
    model: onnx.ModelProto
    ratios: dict[str, float]
    kept: dict[str, str]
    cost_ratio: float
    error: float
    evaluations: int


def search_ratios(model: onnx.ModelProto, batches: list[dict], *, budget: float = 0.5,
                  metric: str = "macs", step: float = 0.1, max_ratio: float = 0.9,
                  criterion: str = "l2", round_to: int = 1, ctx: PassContext | None = None,
                  progress=None) -> SearchResult:
    """Greedy per-group pruning ratios so that cost <= budget * original cost (see module doc)."""
    from onnxpress.backends import ort

    cg = channel_groups(model, ctx)
    groups = cg.prunable()
    if not groups:
        raise PassError("search: the model has no prunable channel group")
    scores = group_scores(model, cg, criterion, batches if criterion == "activation" else None)
    sess = ort.session(model, threads=1)
    names = [o.name for o in sess.get_outputs()]
    reference = [dict(zip(names, sess.run(names, b))) for b in batches]
    feed = batches[0] if metric == "latency" else None
    base_cost = model_cost(model, metric, feed)
    target = budget * base_cost
    kept = {g.name: g.size for g in groups}
    current, cur_cost, cur_err = model, base_cost, 0.0
    evaluations = 0
    bar = progress(range(10_000), desc="search", total=None) if progress else None

    def next_keep(g) -> int | None:
        """The next smaller channel count for a group: `step` of its channels (at least one
        block of `round_to`), on the round_to grid, never above max_ratio pruned."""
        k = kept[g.name] - max(round_to, int(round(step * g.size)), 1)
        if round_to > 1:
            k = (k // round_to) * round_to
        floor = max(1, int(np.ceil(g.size * (1 - max_ratio) - 1e-9)))
        return k if k >= floor and k > 0 else None

    while cur_cost > target:
        best = None
        for g in groups:
            k = next_keep(g)
            if k is None:
                continue
            trial = {name: 1.0 - n / grp.size for name, n, grp in
                     ((gg.name, kept[gg.name], gg) for gg in groups)}
            trial[g.name] = 1.0 - k / g.size
            cand, _ = prune_channels(model, trial, cg=cg, scores=scores, round_to=1)
            evaluations += 1
            cost = model_cost(cand, metric, feed)
            if cost >= cur_cost:
                continue
            err = output_divergence(reference, cand, batches)
            # error added per unit of cost removed
            merit = max(err - cur_err, 0.0) / (cur_cost - cost)
            if best is None or merit < best[0]:
                best = (merit, g.name, k, cand, cost, err)
        if best is None:
            break
        _, name, k, current, cur_cost, cur_err = best
        kept[name] = k
        if bar is not None:
            bar.update(1)
            if hasattr(bar, "set_postfix"):
                bar.set_postfix(cost=f"{cur_cost / base_cost:.3f}", err=f"{cur_err:.4f}")
    if bar is not None and hasattr(bar, "close"):
        bar.close()
    ratios = {g.name: 1.0 - kept[g.name] / g.size for g in groups}
    kept_str = {g.name: f"{kept[g.name]}/{g.size}" for g in groups}
    return SearchResult(current, ratios, kept_str, cur_cost / base_cost if base_cost else 1.0,
                        cur_err, evaluations)


@register("search", lossy=True, requires=("calib",))
def search(model: onnx.ModelProto, ctx: PassContext, *,
           budget: Annotated[float, Range(0, 1, lo_inclusive=False)] = 0.5,
           metric: Literal["macs", "params", "bytes", "latency"] = "macs",
           step: Annotated[float, Range(0.01, 0.5)] = 0.1,
           max_ratio: Annotated[float, Range(0, 0.99)] = 0.9,
           criterion: Literal["l2", "l1", "activation"] = "l2",
           round_to: Annotated[int, Range(0)] = 0,
           max_samples: Annotated[int, Range(1)] = 512) -> onnx.ModelProto:
    """Choose per-layer structured pruning ratios under a budget (MACs, params, bytes, latency).

    before: dense model       after: structured-pruned model whose cost <= budget x original,
    each channel group pruned by its own ratio (greedy steps of `step`, least calib output error
    per unit of cost) on the first `max_samples` calibration samples. round_to as in prune
    (0 = auto: multiples of 8). Reports the chosen ratio and kept channels per group.
    """
    calib = ctx.require_calib(model)
    remember_teacher(model, ctx)
    batches = calibration_sample(calib, max_samples, model=model)
    res = search_ratios(model, batches, budget=budget, metric=metric, step=step,
                        max_ratio=max_ratio, criterion=criterion, ctx=ctx,
                        round_to=round_to or AUTO_ROUND_TO,
                        progress=ctx.progress_bar if ctx.progress else None)
    out = res.model
    if out is model:
        out = onnx.ModelProto()
        out.CopyFrom(model)
    copy_model_fields(model, out)
    before, after = stats.model_stats(model), stats.model_stats(out)
    ctx.record(metric=metric, budget=budget, cost_ratio=res.cost_ratio, round_to=round_to or AUTO_ROUND_TO,
               budget_met=res.cost_ratio <= budget + 1e-9, calib_divergence=res.error,
               evaluations=res.evaluations,
               ratios={k: round(v, 3) for k, v in res.ratios.items()}, kept=res.kept,
               macs_before=before.macs, macs_after=after.macs,
               macs_ratio=after.macs / before.macs if before.macs else 1.0,
               params_before=before.params, params_after=after.params,
               params_ratio=after.params / before.params if before.params else 1.0,
               **calib_error(model, out, ctx))
    return out
