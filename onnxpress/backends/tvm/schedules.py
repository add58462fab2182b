"""Default CPU schedules without measurement ("untuned but usable").

`tvm.compile` on an llvm target leaves every loop nest serial and scalar. Here each fused
PrimFunc gets MetaSchedule's own design space for the target (multi-level tiling SSRSRS,
auto-inline, parallelize/vectorize/unroll), and the random decisions of that space are replaced
by fixed, shape-derived ones, dlight-style:

    spatial axes  s0 .. s(k-3)   s(k-2) "w"              s(k-1) "vector" (2 SIMD registers)
    tiles         [e,1,1,1]      [e/t, 1, t, 1]           [e/v, 1, 1, v]
                  (h-like axis <= 16: [1, e, 1, 1] keeps a weight slice hot in L2)
    reductions    [e, 1]         (all outside the register tile)

so the innermost body is a t x v register block of FMAs (t <= 8 rows, v = SIMD lanes), the outer
spatial loops run in parallel, padding is materialised once, and unrolling is moderate.
Convolutions are first converted to NHWC/HWIO so the vector axis is output channels
(contiguous in both the weights and the output). The result is marked scheduled; tuning
records, where present, win over these defaults.
"""

from __future__ import annotations

import contextlib
import logging

log = logging.getLogger(__name__)

REGISTER_ROWS = 8


def simd_lanes(target) -> int:
    """float32 lanes of the target's vector unit (16 for AVX-512, 8 for AVX2, 4 for NEON)."""
    from tvm.target import codegen

    try:
        bits = int(codegen.llvm_get_vector_width(target))
    except Exception:
        bits = 128
    return max(4, bits // 32)


def cpu_space_generator():
    """MetaSchedule's default llvm rules minus the tensor-intrinsic ones (VNNI/AMX): building those
    imports every tensor intrinsic first, ~20 s per process, and fp32 models never use them."""
    from tvm.s_tir import meta_schedule as ms
    from tvm.s_tir.meta_schedule.schedule_rule import ReuseType

    register_custom_rules()
    rules = [
        ms.schedule_rule.ApplyCustomRule(),
        ms.schedule_rule.InlineConstantScalars(),
        ms.schedule_rule.AutoInline(into_producer=False, into_consumer=True, inline_const_tensor=True,
                                    disallow_if_then_else=True, require_injective=True,
                                    require_ordered=True, disallow_op=["tirx.exp"]),
        ms.schedule_rule.AddRFactor(max_jobs_per_core=16, max_innermost_factor=64),
        ms.schedule_rule.MultiLevelTiling(
            structure="SSRSRS", tile_binds=None, max_innermost_factor=64, vector_load_lens=None,
            reuse_read=None, reuse_write=ReuseType(req="may", levels=[1, 2], scope="global")),
        ms.schedule_rule.ParallelizeVectorizeUnroll(max_jobs_per_core=16, max_vectorize_extent=64,
                                                    unroll_max_steps=[0, 16, 64, 512],
                                                    unroll_explicit=True),
        ms.schedule_rule.RandomComputeLocation(),
    ]
    postprocs = [
        ms.postproc.DisallowDynamicLoop(),
        ms.postproc.RewriteParallelVectorizeUnroll(),
        ms.postproc.RewriteReductionBlock(),
        ms.postproc.RewriteLayout(),
    ]
    mutators = {
        ms.mutator.MutateTileSize(): 0.9,
        ms.mutator.MutateComputeLocation(): 0.05,
        ms.mutator.MutateUnroll(): 0.03,
        ms.mutator.MutateParallel(max_jobs_per_core=16): 0.02,
    }
    return ms.space_generator.PostOrderApply(sch_rules=rules, postprocs=postprocs,
                                             mutator_probs=mutators)


def tune_context(mod, target, space_generator, *, search_strategy="evolutionary",
                 task_name: str = "main", rand_state: int = 1, num_threads: int = 1, logger=None):
    """A MetaSchedule TuneContext built without `TuneContext.__init__`'s blanket import of every
    tensor intrinsic: that import parses hundreds of TVMScript functions, each calling
    inspect.stack(), which takes 20 s to minutes in a process that has torch loaded."""
    from tvm.s_tir import meta_schedule as ms
    from tvm.s_tir.meta_schedule import _ffi_api
    from tvm.s_tir.meta_schedule.logging import get_logger, get_logging_func

    if isinstance(search_strategy, str):
        search_strategy = ms.search_strategy.SearchStrategy.create(search_strategy)
    ctx = ms.TuneContext.__new__(ms.TuneContext)
    ctx.__init_handle_by_constructor__(
        _ffi_api.TuneContext, mod, target, space_generator, search_strategy, task_name,
        num_threads, rand_state, get_logging_func(logger or get_logger("onnxpress.tvm")))
    _ffi_api.TuneContextInitialize(ctx)
    return ctx


def vector_tile(target) -> int:
    """Output channels per register-tile row: two SIMD registers (measured on resnet18 with
    AVX-512: 2 x 16 lanes x 7 rows beat 1 x 16 by 1.5x and 4 x 16 by 1.4x)."""
    return 2 * simd_lanes(target)


def max_reduction_extent(mod) -> int:
    """Largest product of reduction extents over the blocks of mod["main"] (1: no reduction)."""
    from tvm import s_tir

    best = 1
    try:
        sch = s_tir.Schedule(mod)
        for block_rv in sch.get_child_blocks(sch.get_sblock("root")):
            extent = 1
            for iv in sch.get(block_rv).iter_vars:
                if int(iv.iter_type) == 2:          # CommReduce
                    with contextlib.suppress(TypeError, ValueError):
                        extent *= int(iv.dom.extent)
            best = max(best, extent)
    except Exception:
        return 1
    return best


def _largest_divisor(extent: int, cap: int) -> int:
    for d in range(min(extent, cap), 0, -1):
        if extent % d == 0:
            return d
    return 1


def _tile_roles(trace) -> dict:
    """Map each SamplePerfectTile instruction to (kind, position from the innermost axis)."""
    groups: list[tuple[int, list]] = []
    for inst in trace.insts:
        if inst.kind.name != "SamplePerfectTile":
            continue
        n = int(inst.attrs[0])
        if groups and groups[-1][0] == n:
            groups[-1][1].append(inst)
        else:
            groups.append((n, [inst]))
    roles = []
    for n, group in groups:
        for j, inst in enumerate(group):
            if n >= 4:
                roles.append((inst, "spatial", len(group) - 1 - j))
            else:
                roles.append((inst, "reduce", len(group) - 1 - j))
    return roles


MATERIALISE_BYTES = 1 << 16


def _region_tensor(region):
    """The tensor a block's read/write region covers (TVM 0.27: TensorRegion.source)."""
    return region.source if hasattr(region, "source") else region.buffer


def _written_bytes(sch, block_rv) -> int:
    """Bytes of the buffer a block writes (MATERIALISE_BYTES when unknown, e.g. symbolic)."""
    try:
        buf = _region_tensor(sch.get(block_rv).writes[0])
        size = int(buf.dtype.bits) // 8
        for d in buf.shape:
            size *= int(d)
        return size
    except (TypeError, ValueError, AttributeError, IndexError):
        return MATERIALISE_BYTES


def _pick_space(spaces):
    """Prefer the design space that fuses the epilogue into the tile (better locality)."""
    for sp in spaces:
        if any(i.kind.name == "ReverseComputeAt" for i in sp.trace.insts):
            return sp
    return spaces[0]


def schedule_primfunc(func, target, *, lanes: int, rows: int = REGISTER_ROWS):
    """Return `func` scheduled with fixed decisions (attr tirx.is_scheduled), or None on failure."""
    sch = default_schedule(func, target, lanes=lanes, rows=rows)
    if sch is None:
        return None
    return sch.mod["main"].with_attr("tirx.is_scheduled", True)


def default_schedule(func, target, *, lanes: int, rows: int = REGISTER_ROWS):
    """The fixed-decision schedule of `func` as a traced s_tir.Schedule (None when no rule fits);
    its trace is what tuning starts from."""
    import tvm
    from tvm import s_tir

    mod = tvm.IRModule({"main": func})
    from .int8_kernels import has_int8_conv, schedule_int8_conv

    if has_int8_conv(mod):
        # u8 x i8 dot-product convolutions: their own tiling around a tensor intrinsic
        return schedule_int8_conv(func, target)
    if max_reduction_extent(mod) < 64:
        # depthwise convs, pooling, norms: one register of channels per row (two measured
        # 6x slower on mobilenetv3's depthwise layers)
        lanes = max(4, lanes // 2) if lanes > simd_lanes(target) else lanes
    base = simd_lanes(target)
    ctx = tune_context(mod, target, cpu_space_generator(), rand_state=1)
    spaces = ctx.generate_design_space()
    if not spaces:
        return None
    trace = _pick_space(spaces).trace
    roles = _tile_roles(trace)
    if not any(kind == "spatial" for _inst, kind, _pos in roles):
        # no multi-level tiling applies (pooling, global means): MetaSchedule's space would
        # rfactor a 3x3 window into scalar code (resnet18's max pool: 3.5 ms, 8% of the model)
        reduce_outer = reduce_outer_schedule(mod, simd_lanes(target))
        if reduce_outer is not None:
            return reduce_outer
        rowwise = rowwise_schedule(mod, simd_lanes(target))
        if rowwise is not None:
            return rowwise
    sch = s_tir.Schedule(mod)

    def decide(inst, inputs, attrs, decision):
        kind = inst.kind.name
        if kind == "SamplePerfectTile":
            role = next(((k, pos) for i, k, pos in roles if i.same_as(inst)), None)
            if role is None:
                return decision
            extent = sch.get(inputs[0]).extent
            if not isinstance(extent, tvm.tirx.IntImm):
                return decision       # a symbolic extent keeps MetaSchedule's own choice
            extent = int(extent)
            n = int(attrs[0])
            if role[0] == "reduce":
                return [extent] + [1] * (n - 1)
            pos = role[1]
            if n != 4:
                return [extent] + [1] * (n - 1)
            if pos == 0:
                # the wide tile only where it divides evenly; partial vectors cost more than
                # they save (mobilenet's 24/40/72-channel layers)
                v = lanes if extent % lanes == 0 else _largest_divisor(extent, base)
                return [extent // v, 1, 1, v]
            if pos == 1:
                t = _largest_divisor(extent, rows)
                return [extent // t, 1, t, 1]
            if pos == 2 and extent <= 16:
                return [1, extent, 1, 1]
            return [extent, 1, 1, 1]
        if kind == "SampleCategorical":
            candidates = [int(c) for c in attrs[0]]
            return candidates.index(64) if 64 in candidates else decision
        if kind == "SampleComputeLocation":
            # padding of a big tensor is materialised at the root, once (-1): inlined, it costs a
            # bounds check per multiply-add. Small pads and other producers are inlined (-2): a
            # separate loop costs more (the digits CNN ran 2.3x slower, MiniLM 3x).
            block = sch.get(inputs[0])
            if "pad" in block.name_hint and _written_bytes(sch, inputs[0]) >= MATERIALISE_BYTES:
                return -1
            return -2
        return decision

    try:
        trace.apply_to_schedule(sch, remove_postproc=True, decision_provider=decide)
    except Exception:
        # symbolic shapes can defeat the fixed decisions: keep the sampled ones
        sch = s_tir.Schedule(mod)
        trace.apply_to_schedule(sch, remove_postproc=True)
    for postproc in ctx.space_generator.postprocs:
        if not postproc.apply(sch):
            return None
    return sch


def reduce_outer_schedule(mod, lanes: int):
    """Window reductions (pooling) as vector code: producers such as padding inlined, the
    reduction loops moved outside the innermost spatial axis (channels, in NHWC), which is
    vectorised, and the outer spatial axes run in parallel:

        parallel n*h: for w: for c0: for ry, rx: out[n,h,w,c0*L:(c0+1)*L] max= x[..., c0*L:...]

    None when the function is not one reduction block once its producers are inlined."""
    from tvm import s_tir

    sch = s_tir.Schedule(mod)
    try:
        blocks = sch.get_child_blocks(sch.get_sblock("root"))
        reductions = [b for b in blocks if any(int(iv.iter_type) == 2 for iv in sch.get(b).iter_vars)]
        if len(reductions) != 1:
            return None
        return sch if _reduce_outer(sch, reductions[0], lanes) else None
    except Exception as exc:
        log.debug("reduce-outer schedule does not apply: %s", exc)
        return None


def _reduce_outer(sch, main, lanes: int) -> bool:
    """Apply the reduce-outer schedule to block `main` of `sch` in place (False: it does not fit).
    Producers (padding) are inlined; elementwise consumers (a mean's division) are computed per
    parallel task. When the leading spatial axes are too short to share out (global pooling:
    n = h = w = 1), the parallel loop runs over channel chunks instead."""
    if "schedule_rule" in sch.get(main).annotations:
        sch.unannotate(main, "schedule_rule")
    for b in sch.get_producers(main):
        sch.compute_inline(b)
    consumers = list(sch.get_consumers(main))
    known = [sch.get(main)] + [sch.get(c) for c in consumers]     # RVs differ, blocks compare
    for b in sch.get_child_blocks(sch.get_sblock("root")):
        if not any(sch.get(b).same_as(k) for k in known):
            return False
    if any(any(int(iv.iter_type) == 2 for iv in sch.get(c).iter_vars) for c in consumers):
        return False
    kinds = [int(iv.iter_type) for iv in sch.get(main).iter_vars]
    loops = sch.get_loops(main)
    if len(loops) != len(kinds):
        return False
    spatial = [lp for lp, k in zip(loops, kinds) if k == 0]
    reduce = [lp for lp, k in zip(loops, kinds) if k == 2]
    if not spatial or not reduce or kinds != [0] * len(spatial) + [2] * len(reduce):
        return False
    lead = spatial[:-1]
    lead_extent = 1
    for lp in lead:
        lead_extent *= int(sch.get(lp).extent)
    inner = spatial[-1]
    extent = int(sch.get(inner).extent)
    outer_c = None
    if extent % lanes == 0 and extent > lanes:
        outer_c, inner = sch.split(inner, factors=[None, lanes])
    if outer_c is not None and lead_extent < 4:
        sch.reorder(outer_c, *lead, *reduce, inner)
        par = outer_c
    else:
        sch.reorder(*lead, *([outer_c] if outer_c is not None else []), *reduce, inner)
        par = sch.fuse(*lead[:2]) if len(lead) > 1 else (lead[0] if lead else None)
    if par is not None:
        sch.parallel(par)
    sch.vectorize(inner)
    init = sch.decompose_reduction(main, reduce[0])
    sch.vectorize(sch.get_loops(init)[-1])
    for c in consumers:
        if par is None:
            break
        sch.reverse_compute_at(c, par, preserve_unit_loops=True)
        _vectorize_innermost(sch, c, par, lanes)
    return True


def _pool_rule(sch, block):
    """MetaSchedule's custom rule for TOPI's pooling blocks (their `schedule_rule` annotation):
    the reduce-outer schedule as the only design space. Unregistered, MetaSchedule warns on
    every pooling task and falls back to rfactoring the window into scalar code."""
    from tvm.target import Target

    target = Target.current(allow_none=True)
    lanes = simd_lanes(target) if target is not None else 16
    candidate = sch.copy()
    try:
        if _reduce_outer(candidate, block, lanes):
            return [candidate]
    except Exception as exc:
        log.debug("pool rule does not apply: %s", exc)
    sch.unannotate(block, "schedule_rule")
    return [sch]


def register_custom_rules() -> None:
    """Register the CPU pooling rules TOPI's blocks ask for (idempotent)."""
    import tvm

    for name in ("pool_max", "pool_avg", "adaptive_pool_max", "adaptive_pool_avg"):
        tvm.register_global_func(f"s_tir.meta_schedule.cpu.meta_schedule.{name}", _pool_rule,
                                 override=True)


def _all_float(block) -> bool:
    return all(str(_region_tensor(r).dtype).startswith(("float", "bfloat"))
               for r in list(block.reads) + list(block.writes))


def _vectorize_innermost(sch, block, outer, lanes: int) -> None:
    """Vectorise the innermost loop of an elementwise `block` computed under loop `outer`, in
    chunks of `lanes` where they divide it. Blocks touching non-float tensors stay scalar:
    boolean vectors trip TVM 0.27's LLVM codegen (i1 & i8)."""
    inner = sch.get_loops(block)[-1]
    if inner.same_as(outer) or not _all_float(sch.get(block)):
        return
    extent = int(sch.get(inner).extent)
    if extent > lanes and extent % lanes == 0:
        inner = sch.split(inner, factors=[None, lanes])[1]
    sch.vectorize(inner)


def rowwise_schedule(mod, lanes: int):
    """Row-wise reductions over the last axis (softmax, layer norm): one parallel loop over the
    rows of the output, every producer computed inside it, row by row, and the elementwise
    steps vectorised along the row:

        parallel rows: max = reduce(x[r, :]); e[:] = exp(x[r, :] - max); s = sum(e); y[r, :] = e / s

    MetaSchedule's space leaves these serial (MiniLM's softmax: 2.3 ms a call, onnxruntime 0.13).
    None when the function does not have that shape."""
    from tvm import s_tir

    sch = s_tir.Schedule(mod)
    try:
        blocks = sch.get_child_blocks(sch.get_sblock("root"))
        if len(blocks) < 2:
            return None
        last = blocks[-1]
        if any(int(iv.iter_type) == 2 for iv in sch.get(last).iter_vars):
            return None
        loops = sch.get_loops(last)
        if len(loops) < 2:
            return None
        rows = sch.fuse(*loops[:-1]) if len(loops) > 2 else loops[0]
        for block in reversed(blocks[:-1]):
            sch.compute_at(block, rows, preserve_unit_loops=True)
        sch.parallel(rows)
        for block in blocks:
            if not any(int(iv.iter_type) == 2 for iv in sch.get(block).iter_vars):
                _vectorize_innermost(sch, block, rows, lanes)
    except Exception as exc:
        log.debug("row-wise schedule does not apply: %s", exc)
        return None
    return sch


def apply_default_schedules(mod, target):
    """Schedule every PrimFunc of `mod` not yet scheduled (by the tuning database); returns mod."""
    import tvm
    import tvm_ffi

    lanes = vector_tile(target)
    cache: dict = {}
    done = failed = 0
    for gv, func in list(mod.functions.items()):
        if not isinstance(func, tvm.tirx.PrimFunc):
            continue
        if func.attrs is not None and func.attrs.get("tirx.is_scheduled", False):
            continue
        key = tvm_ffi.structural_hash(func)
        if key not in cache:
            try:
                cache[key] = schedule_primfunc(func, target, lanes=lanes)
            except Exception as exc:  # an op MetaSchedule's rules reject keeps TVM's default lowering
                log.debug("no default schedule for %s: %s", gv.name_hint, exc)
                cache[key] = None
        scheduled = cache[key]
        if scheduled is None:
            failed += 1
            continue
        attrs = dict(func.attrs) if func.attrs is not None else {}
        for k, v in attrs.items():
            if k not in ("tirx.is_scheduled",):
                scheduled = scheduled.with_attr(k, v)
        mod[gv] = scheduled
        done += 1
    return mod, {"default_scheduled": done, "left_unscheduled": failed}
