"""Integer convolutions and matmuls on CUDA GPUs: u8 x i8 -> i32 with `dp4a` (sm_61 and later).

The packed computations of int8_kernels.py (NHWC u8 activations, weights packed so that four
input channels are contiguous) are scheduled as a tiled GEMM whose innermost reduction of four
is a `dp4a` tensor intrinsic (one `dp4a.u32.s32` instruction: four u8 x s8 products added
to the int32 accumulator):

    spatial   M = output columns w (matmul: rows) | N = output channels; n, h (the batch) outside
    block     n*h x (M / (TM*tm)) x (N / (TN*tn)) thread blocks of TM x TN threads
    thread    a tm x tn tile of int32 accumulators in registers
    reduce    kh, kw, c4 / kc chunks: the chunk's activations and weights staged in shared
              memory by the whole block, then kc dp4a per accumulator

The epilogue (int32 bias, scale, requantize, clamp, cast) runs per thread tile on the
accumulators, so the int32 tensor never reaches global memory. Tile sizes are divisors of the
extents (no predicated tails around the intrinsic). Everything else in the model keeps TVM's
default GPU schedules (dlight).
"""

from __future__ import annotations

import logging

from .int8_kernels import RULE, RULE_MATMUL, _divisor, _epilogue, _find_block

log = logging.getLogger(__name__)

INTRIN = "onnxpress_dp4a_u8s8"
THREADS_M, THREADS_N = 8, 16      # threads per block along positions and output channels
TILE_M, TILE_N = 4, 4             # accumulators per thread
CHUNK_C4 = 8                      # groups of 4 input channels staged per shared-memory chunk


def has_dp4a(target) -> bool:
    """Whether a CUDA target's architecture has dp4a (compute capability 6.1 or later)."""
    arch = str(target.attrs.get("arch", "") or "")
    try:
        return int(arch.split("_")[-1].rstrip("af")) >= 61
    except ValueError:
        return False


def register_dp4a() -> str:
    """Register (once) the u8 x s8 dp4a intrinsic: operands staged in shared memory, the
    accumulator in a register. (TVM ships one in s_tir.tensor_intrin, but importing that
    package registers every tensor intrinsic TVM has: about a minute per process.)"""
    from tvm.s_tir import TensorIntrin
    from tvm.script import tirx as T

    try:
        TensorIntrin.get(INTRIN)
        return INTRIN
    except Exception:
        pass

    @T.prim_func(s_tir=True)
    def desc(A: T.Buffer((4,), "uint8", offset_factor=1, align=4, scope="shared"),
             B: T.Buffer((4,), "int8", offset_factor=1, align=4, scope="shared"),
             C: T.Buffer((1,), "int32", offset_factor=1, align=4, scope="local")) -> None:
        with T.sblock("root"):
            T.reads(C[0], A[0:4], B[0:4])
            T.writes(C[0])
            for i in range(0, 4):
                with T.sblock("update"):
                    vi = T.axis.remap("R", [i])
                    C[0] = C[0] + T.cast(A[vi], "int32") * T.cast(B[vi], "int32")

    @T.prim_func(s_tir=True)
    def impl(A: T.Buffer((4,), "uint8", offset_factor=1, align=4, scope="shared"),
             B: T.Buffer((4,), "int8", offset_factor=1, align=4, scope="shared"),
             C: T.Buffer((1,), "int32", offset_factor=1, align=4, scope="local")) -> None:
        with T.sblock("root"):
            T.reads(C[0], A[0:4], B[0:4])
            T.writes(C[0])
            C[0] = T.call_pure_extern("__dp4a", A.vload([0], "uint8x4"), B.vload([0], "int8x4"),
                                      C[0], dtype="int32")

    TensorIntrin.register(INTRIN, desc, impl, override=True)
    return INTRIN


def _bind_flat(sch, block, threads: int = 256, spatial: int | None = None) -> None:
    """A block left at the root: one element per thread over its first `spatial` loops (all of
    them by default; a reduction's spatial loops, its reduction loops staying serial inside)."""
    loops = sch.get_loops(block)[:spatial]
    if not loops:
        return
    fused = sch.fuse(*loops) if len(loops) > 1 else loops[0]
    extent = int(sch.get(fused).extent)
    bx, tx = sch.split(fused, [None, min(threads, extent)])
    sch.bind(bx, "blockIdx.x")
    sch.bind(tx, "threadIdx.x")


def _stage(sch, main, buffer_index: int, at, threads: tuple[int, int]) -> None:
    """Copy what the chunk under `at` reads of input `buffer_index` into shared memory, every
    thread of the block fetching a share; a padding producer is computed in the copy."""
    shared = sch.cache_read(main, buffer_index, "shared")
    for p in sch.get_producers(shared):
        try:
            sch.compute_inline(p)            # pad_int8: padded values made while copying
        except Exception as exc:             # not inlinable: it stays its own kernel
            log.debug("producer stays at the root: %s", exc)
    sch.compute_at(shared, at, preserve_unit_loops=True)
    loops = sch.get_loops(shared)
    depth = next(i for i, lp in enumerate(loops) if sch.get(lp).same_as(sch.get(at))) + 1
    fused = sch.fuse(*loops[depth:])
    ty, tx = threads
    _, fy, fx = sch.split(fused, [None, ty, tx])
    sch.bind(fy, "threadIdx.y")
    sch.bind(fx, "threadIdx.x")


def schedule_dp4a(func, target):
    """`func` (a fused PrimFunc with a conv2d_int8 or matmul_int8 block) scheduled for the GPU
    around dp4a, marked scheduled; None when the schedule does not apply."""
    import tvm
    from tvm import s_tir

    if not has_dp4a(target):
        return None
    register_dp4a()
    # int32 loop indices: the dp4a intrinsic's are int32, and Relax's legalization writes int64
    mod = tvm.tirx.transform.ForceNarrowIndexToInt32()(tvm.IRModule({"main": func}))
    sch = s_tir.Schedule(mod)
    try:
        _schedule(sch)
    except Exception as exc:
        log.debug("dp4a schedule does not apply: %s", exc)
        return None
    return sch.mod["main"].with_attr("tirx.is_scheduled", True)


def _schedule(sch) -> None:
    main = _find_block(sch, (RULE, RULE_MATMUL))
    if main is None:
        raise ValueError("no integer block")
    is_conv = sch.get(main).annotations["schedule_rule"] == RULE
    sch.unannotate(main, "schedule_rule")
    last = _epilogue(sch, main)
    loops = sch.get_loops(main)
    n_reduce = 4 if is_conv else 2
    spatial, reduce = loops[:-n_reduce], loops[-n_reduce:]
    *outer_reduce, rc, rj = reduce
    # tiles stay inside one output row (conv: n, h outermost; matmul: the batch): a tile that
    # straddled two rows would stage a region whose size depends on the block
    *outer, m, n = spatial
    m_ext, n_ext, c4 = (int(sch.get(lp).extent) for lp in (m, n, rc))
    tm = _divisor(m_ext, TILE_M)
    ty = _divisor(m_ext // tm, THREADS_M)
    tn = _divisor(n_ext, TILE_N)
    tx = _divisor(n_ext // tn, THREADS_N)
    kc = _divisor(c4, CHUNK_C4)
    mb, mt, mi = sch.split(m, [None, ty, tm])
    nb, nt, ni = sch.split(n, [None, tx, tn])
    rco, rci = sch.split(rc, [None, kc])
    sch.reorder(*outer, mb, nb, mt, nt, *outer_reduce, rco, rci, mi, ni, rj)
    sch.bind(sch.fuse(*outer, mb, nb), "blockIdx.x")
    sch.bind(mt, "threadIdx.y")
    sch.bind(nt, "threadIdx.x")
    if last is not None:
        sch.reverse_compute_at(last, nt, preserve_unit_loops=True)
        sch.set_scope(main, 0, "local")
    else:
        out = sch.cache_write(main, 0, "local")
        sch.reverse_compute_at(out, nt, preserve_unit_loops=True)
    _stage(sch, main, 0, rco, (ty, tx))
    _stage(sch, main, 1, rco, (ty, tx))
    sch.decompose_reduction(main, outer_reduce[0] if outer_reduce else rco)
    sch.tensorize(rj, INTRIN)
    for loop in (rci, mi, ni):          # the register tile: accumulators stay in registers
        sch.unroll(loop)
    for block in sch.get_child_blocks(sch.get_sblock("root")):
        if sch.get_loops(block) and not _is_bound(sch, block):
            _bind_flat(sch, block)


def _is_bound(sch, block) -> bool:
    return any(sch.get(lp).thread_binding is not None for lp in sch.get_loops(block))


def _dlight(func, target):
    """TVM's default GPU schedule of `func` as a traced s_tir.Schedule (dlight's rules in the
    CUDA pipeline's order, the first that applies), checked for what dlight cannot know: a
    cross-thread reduction it chose over loops that are not the deepest (grouped convolutions in
    NHWC) fails to lower, and gets dlight's fallback instead (None: neither lowers; TVM's
    pipeline will say why)."""
    import tvm
    from tvm.s_tir import dlight as dl

    from .schedules import max_reduction_extent

    rules = [dl.gpu.Matmul(), dl.gpu.GEMV(), dl.gpu.Reduction(), dl.gpu.GeneralReduction(),
             dl.gpu.Fallback()]
    reduces = max_reduction_extent(tvm.IRModule({"main": func})) > 1
    with target:
        for chosen in (rules, [dl.gpu.Fallback()]):
            try:
                sch = next(s for s in (rule.apply(func, target, False) for rule in chosen) if s is not None)
                if isinstance(sch, list):
                    sch = sch[0]
                if reduces:                              # lowering is where it fails
                    checked = sch.mod["main"].with_attr("global_symbol", "main")
                    tvm.compile(tvm.IRModule({"main": checked.with_attr("tirx.is_scheduled", True)}),
                                target=target)
                return sch
            except Exception as exc:
                log.debug("dlight schedule rejected: %s", exc)
    return None


def gpu_default_schedule(func, target):
    """The untuned GPU schedule of a float PrimFunc as a traced s_tir.Schedule: dlight's, or one
    thread per output where dlight's does not lower (None: neither applies). Its trace is the
    default that GPU tuning has to beat (tuning.measure_default_schedules)."""
    sch = _dlight(func, target)
    if sch is None:
        try:
            sch = _thread_per_output(func)
        except Exception as exc:    # TVM's pipeline will say what it cannot lower
            log.debug("no GPU schedule: %s", exc)
    return sch


def _thread_per_output(func):
    """The plainest correct GPU schedule, for what dlight's rules cannot lower: producers
    inlined, one thread per output element of each reduction (its reduction loops serial), one
    thread per element of everything else."""
    import tvm
    from tvm import s_tir

    sch = s_tir.Schedule(tvm.IRModule({"main": func}))
    blocks = sch.get_child_blocks(sch.get_sblock("root"))
    for b in blocks[:-1]:
        if all(int(iv.iter_type) == 0 for iv in sch.get(b).iter_vars):
            try:
                sch.compute_inline(b)
            except Exception:          # e.g. read by a reduction at another layout: it stays
                pass
    for b in sch.get_child_blocks(sch.get_sblock("root")):
        spatial = sum(1 for iv in sch.get(b).iter_vars if int(iv.iter_type) == 0)
        if spatial:
            _bind_flat(sch, b, spatial=spatial)
    return sch


def gpu_space_generator():
    """MetaSchedule's CUDA search space without its tensor-core rules: those need the wmma
    intrinsics registered (TVM's blanket import, about a minute per process), and the models
    tuned here are fp32 (tensor cores take fp16) or int8 (dp4a kernels, not tuned)."""
    from tvm.s_tir import meta_schedule as ms

    return ms.space_generator.PostOrderApply(
        sch_rules=ms.schedule_rule.ScheduleRule.create("cuda"),
        postprocs=ms.postproc.Postproc.create("cuda"),
        mutator_probs=ms.mutator.Mutator.create("cuda"))


def apply_gpu_schedules(mod, target, *, floats: bool = True):
    """Schedule every unscheduled PrimFunc of `mod` for the GPU: integer ones around dp4a, the
    rest (unless floats=False: tuning comes first for those) with TVM's default GPU schedules;
    returns (mod, manifest info)."""
    from .int8_kernels import has_int8_conv
    from .schedules import unscheduled_primfuncs, with_attrs_of

    done = failed = 0
    for gv, func in unscheduled_primfuncs(mod):
        if not has_int8_conv(func):
            if floats:
                sch = gpu_default_schedule(func, target)
                if sch is not None:
                    mod[gv] = sch.mod["main"].with_attr("tirx.is_scheduled", True)
            continue
        scheduled = schedule_dp4a(func, target)
        if scheduled is None:
            failed += 1
            continue
        mod[gv] = with_attrs_of(scheduled, func)
        done += 1
    return mod, {"dp4a_scheduled": done, "dp4a_failed": failed}
