"""`distill`: recover the accuracy a compressed model lost, from the original model as teacher.

    before: student = prune(teacher)            (weights changed, accuracy down)
    after:  student, same graph, float weights retrained on calibration inputs so that its
            outputs match the teacher's (soft targets at temperature T; hard labels optional)

The teacher runs once on onnxruntime over the calibration inputs; the student runs as a torch
module interpreting its own ONNX graph (onnxpress.passes.torch_graph), and the trained values
are written back into the same initializers, so the graph keeps its structure. Weights that
unstructured pruning zeroed stay zero (keep_sparsity).
"""

from __future__ import annotations

import copy
from typing import Annotated, Literal

import numpy as np
import onnx

from onnxpress.errors import CalibrationError, PassError, PassOptionError
from onnxpress.passes.context import PassContext
from onnxpress.passes.prune import TEACHER_KEY
from onnxpress.passes.registry import Range, register


def _stack_batches(batches: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray] | None:
    """Concatenate calibration batches sample-wise when their shapes allow it."""
    try:
        return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}
    except ValueError:
        return None


def distill_model(student: onnx.ModelProto, teacher: onnx.ModelProto, batches: list[dict],
                  *, labels: np.ndarray | None = None, epochs: int = 30, lr: float = 5e-3,
                  temperature: float = 4.0, alpha: float = 0.5, batch_size: int = 64,
                  loss: str = "auto", keep_sparsity: bool = True, weight_decay: float = 0.0,
                  seed: int = 0, progress=None) -> dict:
    """Train `student`'s float weights in place to match `teacher` on `batches`; returns figures."""
    import torch

    from onnxpress.backends import ort
    from onnxpress.passes.torch_graph import OnnxGraphModule

    names_s = [o.name for o in student.graph.output]
    names_t = [o.name for o in teacher.graph.output]
    if names_s != names_t:
        raise PassError(f"distill: teacher outputs {names_t} differ from the student's {names_s}")
    sess = ort.session(teacher)
    targets = [dict(zip(names_t, sess.run(names_t, b))) for b in batches]
    data = _stack_batches(batches)
    tdata = _stack_batches(targets) if data is not None else None
    if data is not None and tdata is not None:
        n = len(next(iter(data.values())))
        if labels is not None and len(labels) != n:
            raise PassOptionError(f"distill: {len(labels)} labels for {n} calibration samples")
    else:
        n = None
        if labels is not None:
            raise PassOptionError("distill: labels need calibration batches of one shape")

    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    module = OnnxGraphModule(student)
    batch_size, batch_note = _batch_size_that_runs(torch, module, student, data, n, batch_size)
    # small models train fastest on one thread (thread hand-offs cost more than the math)
    threads_before = torch.get_num_threads()
    if sum(p.numel() for p in module.parameters()) < 2_000_000:
        torch.set_num_threads(1)
    try:
        figures = _train(torch, module, student, batches, targets, data, tdata, n, labels, names_s,
                         gen, epochs=epochs, lr=lr, temperature=temperature, alpha=alpha,
                         batch_size=batch_size, loss=loss, keep_sparsity=keep_sparsity,
                         weight_decay=weight_decay, progress=progress)
    finally:
        torch.set_num_threads(threads_before)
    if batch_note:
        figures["batch_size"] = batch_note
    return figures


def _batch_size_that_runs(torch, module, student, data, n, batch_size: int) -> tuple[int, str]:
    """The training batch: `batch_size`, unless the model fixes its batch dimension and a
    bigger batch does not run through it (a plain torch export of a ViT bakes batch 1 into the
    class token's Expand; resnet18's export trains at 64 all the same). Returns (size, a note
    for the figures, empty when unchanged)."""
    from onnxpress.data import static_batch

    fixed = static_batch(student)
    if n is None or not fixed or min(batch_size, n) == fixed:
        return batch_size, ""
    probe = {k: torch.from_numpy(v[:min(batch_size, n)]) for k, v in data.items()}
    try:
        with torch.no_grad():
            module(**probe)
        return batch_size, ""
    except Exception:      # noqa: BLE001 -- whatever a baked-in shape breaks, batch `fixed` runs
        return fixed, (f"{fixed} (the model fixes its batch dimension at {fixed} and "
                       f"batches of {min(batch_size, n)} do not run through it)")


def _train(torch, module, student, batches, targets, data, tdata, n, labels, names_s, gen, *,
           epochs, lr, temperature, alpha, batch_size, loss, keep_sparsity, weight_decay,
           progress) -> dict:
    masks = module.masks_from_zeros() if keep_sparsity else {}
    opt = torch.optim.Adam(module.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, epochs))

    def loss_fn(out, tgt, lab):
        total = 0.0
        for name in names_s:
            s, t = out[name], torch.from_numpy(np.asarray(tgt[name]))
            if not s.dtype.is_floating_point:
                continue
            kind = loss if loss != "auto" else ("kl" if s.dim() == 2 and s.shape[1] > 1 else "mse")
            if kind == "kl":
                total = total + torch.nn.functional.kl_div(
                    torch.log_softmax(s / temperature, 1), torch.softmax(t / temperature, 1),
                    reduction="batchmean") * temperature ** 2
            else:
                total = total + torch.nn.functional.mse_loss(s, t)
        if lab is not None:
            s0 = out[names_s[0]]
            total = (1 - alpha) * total + alpha * torch.nn.functional.cross_entropy(s0, lab)
        return total

    def minibatches():
        if n is not None:
            perm = torch.randperm(n, generator=gen).numpy()
            for i in range(0, n, batch_size):
                idx = perm[i:i + batch_size]
                lab = torch.from_numpy(np.asarray(labels)[idx]).long() if labels is not None else None
                yield ({k: torch.from_numpy(v[idx]) for k, v in data.items()},
                       {k: v[idx] for k, v in tdata.items()}, lab)
        else:
            for i in torch.randperm(len(batches), generator=gen).tolist():
                yield ({k: torch.from_numpy(v) for k, v in batches[i].items()}, targets[i], None)

    def evaluate() -> float:
        with torch.no_grad():
            tot, cnt = 0.0, 0
            for b, t in zip(batches, targets):
                out = module(**{k: torch.from_numpy(v) for k, v in b.items()})
                tot += float(loss_fn(out, t, None)) * len(next(iter(b.values())))
                cnt += len(next(iter(b.values())))
        return tot / max(cnt, 1)

    loss_before = evaluate()
    epochs_iter = range(epochs)
    bar = progress(epochs_iter, desc="distill", total=epochs) if progress else epochs_iter
    history = []
    for _ in bar:
        running, count = 0.0, 0
        for inputs, tgt, lab in minibatches():
            opt.zero_grad()
            out = module(**inputs)
            val = loss_fn(out, tgt, lab)
            val.backward()
            opt.step()
            if masks:
                with torch.no_grad():
                    for k, mk in masks.items():
                        module.params[k].mul_(mk)
            running += float(val.detach())
            count += 1
        sched.step()
        history.append(running / max(count, 1))
        if hasattr(bar, "set_postfix"):
            bar.set_postfix(loss=f"{history[-1]:.4f}")
    loss_after = evaluate()
    written = module.write_back(student)
    return {"loss_before": loss_before, "loss_after": loss_after, "epochs": epochs,
            "tensors_trained": written, "masked_tensors": len(masks),
            "samples": n if n is not None else sum(len(next(iter(b.values()))) for b in batches),
            "loss_history": [round(h, 5) for h in history]}


@register("distill", lossy=True, requires=("calib",))
def distill(model: onnx.ModelProto, ctx: PassContext, *,
            epochs: Annotated[int, Range(1)] = 30,
            temperature: Annotated[float, Range(0, None, lo_inclusive=False)] = 4.0,
            lr: Annotated[float, Range(0, None, lo_inclusive=False)] = 5e-3,
            batch_size: Annotated[int, Range(1)] = 64,
            teacher: str | None = None,
            labels: str | None = None,
            alpha: Annotated[float, Range(0, 1)] = 0.5,
            loss: Literal["auto", "kl", "mse"] = "auto",
            keep_sparsity: bool = True,
            weight_decay: Annotated[float, Range(0)] = 0.0) -> onnx.ModelProto:
    """Retrain the compressed model's float weights to match the original (teacher) on calib data.

    before: pruned/clipped model, accuracy lost    after: same graph, weights distilled
    teacher: ONNX path; default = the model as it was before the first lossy pass of this
    pipeline (prune/clip keep it). Unlabeled calibration inputs; soft targets with `temperature`
    (KL on 2-D logits, MSE on other outputs); `labels` = .npy of int labels in calibration order
    adds cross-entropy with weight `alpha`. Trains with PyTorch (Adam, cosine schedule).
    """
    calib = ctx.require_calib(model)
    if teacher is not None:
        from onnxpress.io import load

        teacher_model = load(teacher)
    elif TEACHER_KEY in ctx.options:
        teacher_model = ctx.options[TEACHER_KEY]
    else:
        raise PassOptionError(
            "pass 'distill' needs a teacher: give teacher=PATH.onnx, or run it after prune/clip in "
            "the same pipeline (they keep the original model)")
    label_arr = None
    if labels is not None:
        try:
            label_arr = np.load(labels, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise PassOptionError(f"option 'labels' of pass 'distill': cannot read {labels}: {exc}") from None
    batches = list(calib)
    if not batches:
        raise CalibrationError("distill: the calibration data is empty")
    student = copy.deepcopy(model)
    figures = distill_model(
        student, teacher_model, batches, labels=label_arr, epochs=epochs, lr=lr,
        temperature=temperature, alpha=alpha, batch_size=batch_size, loss=loss,
        keep_sparsity=keep_sparsity, weight_decay=weight_decay, seed=ctx.seed,
        progress=ctx.progress_bar if ctx.progress else None)
    from onnxpress.passes.prune import calib_error

    figures.update(calib_error(teacher_model, student, ctx), error_reference="teacher")
    ctx.record(**figures)
    return student
