"""Default CPU schedules without measurement ("untuned but usable").

`tvm.compile` on an llvm target leaves every loop nest serial and scalar. Here each fused
PrimFunc gets MetaSchedule's own design space for the target (multi-level tiling SSRSRS,
auto-inline, parallelize/vectorize/unroll), and the random decisions of that space are replaced
by fixed, shape-derived ones, dlight-style:

    spatial axes  s0 .. s(k-3)   s(k-2) "rows" (width / M)  s(k-1) "columns" (channels / N)
    tiles         [e,1,1,1]      [e/r, 1, r, 1]             [e/(V*L), 1, 1, V*L]
                  (h-like axis <= 16: [1, e, 1, 1] keeps a weight slice hot in L2)
    reductions    [e, 1]         (all outside the register tile)

so the innermost body is an r x V register block of vector FMAs, the outer spatial loops run in
parallel, padding is materialised once, and unrolling is moderate. Convolutions are first
converted to NHWC/HWIO so the vector axis is output channels (contiguous in both the weights and
the output). The result is marked scheduled; tuning records, where present, win over these
defaults.

The register block comes from the target's ISA (`vector_isa`), read from the TVM target's
features (`codegen.target_has_features`), never from the build machine, so cross targets get
their own: L float32 lanes and N architectural vector registers,

    AVX-512 (avx512f)           L = 16, N = 32 zmm
    AVX / AVX2 (x86, no 512)    L =  8, N = 16 ymm
    SSE (older x86)             L =  4, N = 16 xmm
    aarch64 NEON                L =  4, N = 32 v
    anything else               L =  4, N = 16 (conservative)

(`llvm_get_vector_width` is not used: TVM 0.27 answers 512 bits for every x86 CPU, AVX2 ones
included, which made 8 rows x 4 ymm = 32 accumulators on 16 registers.) `register_tile` then
picks, like the micro-kernels of BLIS and oneDNN:

- V vectors of output channels per row, V <= MAX_VECTORS (2: on AVX-512, 2 x 16 lanes beat 1 by
  1.5x and 4 by 1.4x on resnet18; 3 on AVX2 was 10x slower on MiniLM's matmuls, LLVM splitting
  the 24-float vectors badly), only where V * L divides the channels; otherwise one vector, or
  the largest divisor of the channels below L (a partial vector). Depthwise convs, which
  broadcast no input (`broadcasts_an_input`), get one vector;
- r rows (output pixels, or matrix rows), with the accumulators, the V weight vectors and one
  broadcast register all in registers:
  r * V <= N - V - 1, and r <= MAX_ROWS (8: what AVX-512 was measured with; more rows only
  lower the loads per FMA from 0.63 towards 0.5). AVX2: 6 x 2 at most (12 ymm accumulators);
  AVX-512 and NEON: 8 x 2;
- among the (r, V) that fit, the one with the most accumulators (independent FMA chains: an FMA
  has 4-5 cycles of latency and most cores issue two a cycle, so fewer than 8 leave the FMA units
  idle), then the fewest loads per FMA, (r + V) / (r * V). On AVX2 a 56-wide output gets 4 x 2,
  a 7-wide one 7 x 1, not 1 x 2. (7 x 2 there needs 17 registers: the spilled accumulator's
  store-to-load round trip on every iteration made it 2.5x slower at 56 wide; ordering the
  block weight-vector-first, 16 live registers, LLVM still spilled: 3.6 ms against 2.2.)
- the rows are rh x rw output pixels, rh dividing the height and rw the width
  (`register_block`), where a conv's weights do not depend on the output row
  (`weights_shared_across_height`; never a batched matmul's heads) and the kernel broadcasts
  an input: rows from the width alone stop at a divisor of the width, and 14 is 2 x 7. On AVX2
  a 14 x 14 output gets 2 x 2 rows x 2 ymm (8 accumulators, 6 loads per 8 FMAs) instead of
  7 x 1 ymm (7 accumulators, 8 loads per 7): resnet18's 256-channel 3x3 conv went from
  2.25-2.35 ms to 1.41-1.67 ms on the Zen 3 here. Rows from the height are taken only when they
  give more accumulators than the width alone; a 7 x 7 output stays 7 x 1 (7 is prime in both).

Threads: the outer spatial tiles are fused into one parallel loop, which TVM's thread pool runs
on the target's `num-cores` (physical cores: onnxpress sets TVM_NUM_THREADS from them), with
MetaSchedule's ParallelizeVectorizeUnroll bounding the loop to 16 jobs per core.

Weights: constant inputs of a kernel (weights, biases) are prepacked at build time into the
order its register block reads them (`apply_default_schedules`, `attach_layout_free_buffers`):
read in HWIO order, a task's weight slice strides through memory and never stays in cache.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging

log = logging.getLogger(__name__)

MAX_ROWS = 8
MAX_VECTORS = 2
REGISTER_ROWS = MAX_ROWS          # kept for callers of the old name


@dataclasses.dataclass(frozen=True)
class VectorISA:
    """The vector unit a target compiles for: what the register block is sized from."""
    name: str          # avx512, avx2, avx, sse, neon, generic
    lanes: int         # float32 lanes per vector register
    registers: int     # architectural vector registers


def _has(feature: str, target) -> bool:
    from tvm.target import codegen

    try:
        return bool(codegen.target_has_features(feature, target))
    except Exception:
        return False


def vector_isa(target) -> VectorISA:
    """The target's vector ISA from its LLVM features (mcpu / mattr / mtriple), never the host's."""
    if target is None:
        return VectorISA("generic", 4, 16)
    triple = str(target.attrs.get("mtriple", "") or "")
    if triple.startswith(("aarch64", "arm64")) or target.attrs.get("feature.is_aarch64", False) \
            or _has("neon", target):
        return VectorISA("neon", 4, 32)
    if _has("avx512f", target):
        return VectorISA("avx512", 16, 32)
    if _has("avx", target):
        return VectorISA("avx2" if _has("avx2", target) else "avx", 8, 16)
    if _has("sse2", target):
        return VectorISA("sse", 4, 16)
    return VectorISA("generic", 4, 16)


def simd_lanes(target) -> int:
    """float32 lanes of the target's vector unit (16 for AVX-512, 8 for AVX/AVX2, 4 for SSE and NEON)."""
    return vector_isa(target).lanes


def register_tile(isa: VectorISA, rows_extent: int | None, cols_extent: int | None, *,
                  max_vectors: int = MAX_VECTORS, max_rows: int = MAX_ROWS) -> tuple[int, int]:
    """(r, c): the register block of an output of rows_extent x cols_extent (width x channels,
    M x N), c = V * lanes columns, by the rules in the module docstring. Unknown extents (None)
    count as divisible by anything."""
    _rh, r, c = register_block(isa, None, rows_extent, cols_extent, max_vectors=max_vectors,
                               max_rows=max_rows)
    return r, c


def register_block(isa: VectorISA, outer_extent: int | None, rows_extent: int | None,
                   cols_extent: int | None, *, max_vectors: int = MAX_VECTORS,
                   max_rows: int = MAX_ROWS) -> tuple[int, int, int]:
    """(rh, rw, c): the register block of an output of outer x rows x cols (height x width x
    channels), rh * rw rows of c = V * lanes columns. outer_extent None: rows from the width
    alone (rh = 1), as for a matmul. Rows from both axes reach blocks that one prime width
    cannot: a 14 x 14 output gets 2 x 2 rows x 2 ymm (8 accumulators, 6 loads per 8 FMAs) on
    AVX2, where rows from the width alone stop at 7 x 1 ymm (7 accumulators, 8 loads per 7)."""
    lanes, regs = isa.lanes, isa.registers

    def rows(cap):
        """(rh, rw), rh | outer and rw | width, the most rows up to cap, the widest rw first."""
        if rows_extent is None:
            return 1, cap
        rw_options = [d for d in range(min(rows_extent, cap), 0, -1) if rows_extent % d == 0]
        best = (1, rw_options[0])
        if outer_extent is not None:
            for rw in rw_options:
                rh = _largest_divisor(outer_extent, cap // rw)
                if rh * rw > best[0] * best[1]:
                    best = (rh, rw)
        return best

    if cols_extent is not None and cols_extent % lanes != 0:
        narrow = lanes // 2
        while narrow >= 4 and cols_extent % narrow != 0:
            narrow //= 2
        if narrow >= 4:
            # the narrower vector of the same ISA that divides the channels (AVX-512's ymm
            # half, AVX2's xmm half): 40 channels are 5 x 8 lanes; as a 10-lane "vector" LLVM
            # splits every load, FMA and store into pieces (efficientnet's 24- and 40-channel
            # convs and every 1000-class head on AVX-512)
            return register_block(dataclasses.replace(isa, lanes=narrow), outer_extent,
                                  rows_extent, cols_extent, max_vectors=max_vectors,
                                  max_rows=max_rows)
        # a partial vector: one register, as many rows as fit beside it
        return (*rows(min(max_rows, regs - 2)), _largest_divisor(cols_extent, lanes))
    best = None
    for v in range(1, max(1, max_vectors) + 1):
        if cols_extent is not None and cols_extent % (v * lanes) != 0:
            continue
        cap = min(max_rows, (regs - v - 1) // v)
        if cap < 1:
            continue
        rh, rw = rows(cap)
        r = rh * rw
        key = (r * v, -(r + v) / (r * v))
        if best is None or key > best[0]:
            best = (key, rh, rw, v)
    if best is None:
        return 1, 1, lanes
    return best[1], best[2], best[3] * lanes


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
    from .int8_kernels import register_tuning_rules

    register_tuning_rules(target)          # the int8 rule needs the target's ISA
    ctx = ms.TuneContext.__new__(ms.TuneContext)
    ctx.__init_handle_by_constructor__(
        _ffi_api.TuneContext, mod, target, space_generator, search_strategy, task_name,
        num_threads, rand_state, get_logging_func(logger or get_logger("onnxpress.tvm")))
    _ffi_api.TuneContextInitialize(ctx)
    return ctx


def vector_tile(target) -> int:
    """The widest channel tile of a register-block row: MAX_VECTORS SIMD registers (measured on
    resnet18 with AVX-512: 2 x 16 lanes x 7 rows beat 1 x 16 by 1.5x and 4 x 16 by 1.4x)."""
    return MAX_VECTORS * simd_lanes(target)


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


def _heaviest_reduction(mod):
    """The block of mod["main"] with the most reduction iterations (None when none)."""
    from tvm import s_tir

    sch = s_tir.Schedule(mod)
    best, best_extent = None, 0
    for block_rv in sch.get_child_blocks(sch.get_sblock("root")):
        block = sch.get(block_rv)
        extent = 1
        for iv in block.iter_vars:
            if int(iv.iter_type) == 2:
                extent *= int(iv.dom.extent)
        if extent > best_extent and extent > 1:
            best, best_extent = block, extent
    return best


def _input_vars(block):
    """[(name, vars its indices use)] for each tensor the block reads and does not write."""
    from tvm.tirx.analysis import undefined_vars

    written = {_region_tensor(w).name for w in block.writes}
    return [(_region_tensor(region).name, [v for r in region.region for v in undefined_vars(r.min)])
            for region in block.reads if _region_tensor(region).name not in written]


def broadcasts_an_input(mod) -> bool:
    """Whether the heaviest reduction of mod["main"] reads some input without its innermost
    spatial axis (the vectorised channels / N), so one broadcast value feeds a whole vector: a
    conv's input pixel, a matmul's row. A depthwise conv reads input and weights by the same
    channel, so a wider row of vectors adds no reuse, only registers. True when unsure."""
    try:
        best = _heaviest_reduction(mod)
        if best is None:
            return True
        spatial = [iv.var for iv in best.iter_vars if int(iv.iter_type) == 0]
        if not spatial:
            return True
        channel = spatial[-1]
        return any(not any(v.same_as(channel) for v in used) for _name, used in _input_vars(best))
    except Exception:
        return True


def weights_shared_across_height(mod) -> bool:
    """Whether the heaviest reduction has four spatial axes (n, h, w, channels: an NHWC conv)
    and an input read by the channels but not by the height (the weights), so register-block
    rows taken from the height reuse each loaded weight vector as rows from the width do. A
    batched matmul's third axis indexes its weights: False there, and when unsure."""
    try:
        best = _heaviest_reduction(mod)
        spatial = [] if best is None else [iv.var for iv in best.iter_vars
                                           if int(iv.iter_type) == 0]
        if len(spatial) != 4:
            return False
        height, channel = spatial[1], spatial[-1]
        return any(any(v.same_as(channel) for v in used) and not any(v.same_as(height) for v in used)
                   for _name, used in _input_vars(best))
    except Exception:
        return False


def _const_extent(loop) -> int | None:
    """A loop's constant extent (None: not a loop, or symbolic)."""
    import tvm

    if isinstance(loop, tvm.tirx.For) and isinstance(loop.extent, tvm.tirx.IntImm):
        return int(loop.extent)
    return None


def _parallel_tasks(tiles: int, cores: int) -> int:
    """How many parallel tasks `tiles` equal tiles split into: the fewest (each task's tiles
    stay together, so its weight rows stream in one pass) that keep every core busy, i.e. the
    smallest divisor of `tiles` that is at least `cores` (all of them when none is)."""
    return next((d for d in range(max(1, cores), tiles + 1) if tiles % d == 0), max(1, tiles))


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


def schedule_primfunc(func, target, *, lanes: int | None = None, rows: int | None = None):
    """Return `func` scheduled with fixed decisions (attr tirx.is_scheduled), or None on failure."""
    sch = default_schedule(func, target, lanes=lanes, rows=rows)
    if sch is None:
        return None
    return sch.mod["main"].with_attr("tirx.is_scheduled", True)


def einsum_padding(mod, lanes: int, max_rows: int) -> tuple[str, list[int]] | None:
    """(block name, pad_einsum factors) for a matmul whose output extents tile badly, else None.

    Tile sizes are divisors of the extents (MetaSchedule's perfect tiles). A ViT's 197 tokens
    are prime: the attention scores [197 x 197] got no vector lanes and the projections one
    row per register block (ViT-tiny on a 2-core AVX2 host: QK^T 5.7 ms, 0.24 ms padded to 200;
    fc2 2.4 -> 0.73 ms). Padded, the innermost output extent is a multiple of the vector lanes
    and the rows' a multiple of MAX_ROWS; the pad blocks copy in and out around the matmul, so
    columns are padded only where half-vectors do not fit them and there are rows to pay for it.
    Convolutions (windowed indices) are not einsums and are left alone."""
    from tvm import s_tir

    sch = s_tir.Schedule(mod)
    blocks = [sch.get(b) for b in sch.get_child_blocks(sch.get_sblock("root"))]
    reductions = [b for b in blocks if _is_reduction(b)]
    if len(reductions) != 1:
        return None
    block = reductions[0]
    kinds = [int(iv.iter_type) for iv in block.iter_vars]
    extents = [iv.dom.extent for iv in block.iter_vars]
    if not all(hasattr(e, "value") for e in extents):
        return None
    spatial = [i for i, k in enumerate(kinds) if k == 0]
    if len(spatial) < 2 or kinds[-1] != 2:
        return None
    padding = [1] * len(kinds)
    cols, rows = int(extents[spatial[-1]].value), int(extents[spatial[-2]].value)
    # columns that fill half-vectors run unpadded (register_block's narrow vectors: 1000 = 125 x
    # 8 on AVX-512), and with few rows the pad, a copy of the whole weight on every call, costs
    # more than lanes gain: a [1, 1024] x [1024, 1000] classifier head ran 0.40 ms padded to
    # 1008 columns against onnxruntime's 0.06 ms
    if cols > lanes and cols % max(lanes // 2, 1) and rows >= max_rows:
        padding[spatial[-1]] = lanes
    if rows > max_rows and not any(rows % r == 0 for r in range(2, max_rows + 1)):
        padding[spatial[-2]] = max_rows
    if all(p == 1 for p in padding):
        return None
    try:                                  # an einsum only: pad_einsum checks the accesses
        s_tir.Schedule(mod).pad_einsum(block.name_hint, padding)
    except Exception:
        return None
    return block.name_hint, padding


def default_schedule(func, target, *, lanes: int | None = None, rows: int | None = None):
    """The fixed-decision schedule of `func` as a traced s_tir.Schedule (None when no rule fits);
    its trace is what tuning starts from. `lanes` caps the channels of a register-block row
    (default `vector_tile(target)`), `rows` its rows (default: what the target's registers hold,
    see `register_tile`)."""
    import tvm
    from tvm import s_tir

    mod = tvm.IRModule({"main": func})
    from .int8_kernels import has_int8_conv, schedule_int8_conv

    if has_int8_conv(mod):
        # u8 x i8 dot-product convolutions: their own tiling around a tensor intrinsic
        return schedule_int8_conv(func, target)
    isa = vector_isa(target)
    max_vectors = max(1, (lanes or vector_tile(target)) // isa.lanes)
    if not broadcasts_an_input(mod):
        # depthwise convs: every multiply-add needs its own input vector, a second vector per
        # row only takes registers (measured 1.5-2.5x slower on mobilenetv3's 5x5 depthwise
        # layers); 1x1 convs on few channels broadcast their input and keep two
        max_vectors = 1
    max_rows = rows or MAX_ROWS
    padding = einsum_padding(mod, isa.lanes, max_rows)

    def start():
        """A schedule of `mod`, its einsum padded first when it is (the pad is in the trace)."""
        sch = s_tir.Schedule(mod)
        if padding is not None:
            sch.pad_einsum(sch.get_sblock(padding[0]), padding[1])
        return sch

    cores = int(target.attrs.get("num-cores", 2) or 2)

    # the design space of the padded function: its trace replays onto start()
    ctx = tune_context(start().mod, target, cpu_space_generator(), rand_state=1)
    spaces = ctx.generate_design_space()
    if not spaces:
        return None
    trace = _pick_space(spaces).trace
    roles = _tile_roles(trace)
    if not any(kind == "spatial" for _inst, kind, _pos in roles):
        # no multi-level tiling applies (pooling, global means): MetaSchedule's space would
        # rfactor a 3x3 window into scalar code (resnet18's max pool: 3.5 ms, 8% of the model)
        reduce_outer = reduce_outer_schedule(mod, isa.lanes)
        if reduce_outer is not None:
            return reduce_outer
        narrow = narrow_injective_schedule(mod, cores)
        if narrow is not None:
            return narrow
        rowwise = rowwise_schedule(mod, isa.lanes)
        if rowwise is not None:
            return rowwise
    sch = start()
    single_row = [False]            # the rows decision saw one row (a GEMV)
    planned_cols: list = []         # [channels seen by the rows decision, channel tile chosen]
    planned_rows: list = []         # [width seen by the height decision, rows of the width]
    height_rows = max_vectors > 1 and weights_shared_across_height(mod)

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
            if pos == 2 and height_rows:
                # the height's share of the block, chosen with the width and channels in view
                width = _const_extent(sch.get(inputs[0]).body)
                cols = _const_extent(getattr(sch.get(inputs[0]).body, "body", None))
                if width is not None:
                    rh, rw, c = register_block(isa, extent, width, cols, max_vectors=max_vectors,
                                               max_rows=max_rows)
                    planned_rows[:] = [width, rw]
                    planned_cols[:] = [cols, c]
                    if extent <= 16:
                        return [1, extent // rh, rh, 1]
                    return [extent // rh, 1, rh, 1]
            if pos == 1:
                single_row[0] = extent == 1
                # the rows of the register block, chosen with the channels (the next loop) in view
                if planned_rows and planned_rows[0] == extent:
                    r = planned_rows[1]
                else:
                    cols = _const_extent(sch.get(inputs[0]).body)
                    r, c = register_tile(isa, extent, cols, max_vectors=max_vectors,
                                         max_rows=max_rows)
                    planned_cols[:] = [cols, c]
                planned_rows.clear()
                return [extent // r, 1, r, 1]
            if pos == 0:
                if planned_cols and planned_cols[0] == extent:
                    c = planned_cols[1]
                else:
                    c = register_tile(isa, None, extent, max_vectors=max_vectors)[1]
                planned_cols.clear()
                if single_row[0]:
                    # one row (a classifier head's GEMV): the reduction runs outside the channel
                    # tiles, so each task streams whole weight rows once into its accumulators
                    tasks = _parallel_tasks(extent // c, cores)
                    return [tasks, 1, extent // (tasks * c), c]
                return [extent // c, 1, 1, c]
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
        sch = start()
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
        reductions = [b for b in blocks if _is_reduction(sch.get(b))]
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
    # an elementwise chain after the reduction (a mean's division, then a requantize: divide,
    # round, add, clamp, cast) becomes one consumer block: left as six, none was scheduled
    # with the reduction, and efficientnet's int8 squeeze-excite means ran 10x slower than fp32's
    _inline_elementwise_chain(sch, main)
    consumers = list(sch.get_consumers(main))
    known = [sch.get(main)] + [sch.get(c) for c in consumers]     # RVs differ, blocks compare
    for b in sch.get_child_blocks(sch.get_sblock("root")):
        if not any(sch.get(b).same_as(k) for k in known):
            return False
    if any(_is_reduction(sch.get(c)) for c in consumers):
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


def _inline_elementwise_chain(sch, main) -> None:
    """Inline every block after `main` that another block reads (so not an output): the
    consumers that remain write the function's outputs."""
    root = sch.get_sblock("root")
    for b in sch.get_child_blocks(root):
        if sch.get(b).same_as(sch.get(main)) or _is_reduction(sch.get(b)):
            continue
        if not sch.get_consumers(b):
            continue
        try:
            sch.compute_inline(b)
        except Exception as exc:      # (not elementwise: the schedule checks and declines)
            log.debug("could not inline %s: %s", sch.get(b).name_hint, exc)


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
    """Register the CPU rules TOPI's pooling blocks and the int8 dot-product blocks ask for
    (idempotent)."""
    import tvm

    for name in ("pool_max", "pool_avg", "adaptive_pool_max", "adaptive_pool_avg"):
        tvm.register_global_func(f"s_tir.meta_schedule.cpu.meta_schedule.{name}", _pool_rule,
                                 override=True)
    from .int8_kernels import register_tuning_rules

    register_tuning_rules()


def _all_float(block) -> bool:
    return all(str(_region_tensor(r).dtype).startswith(("float", "bfloat"))
               for r in list(block.reads) + list(block.writes))


def _is_reduction(block) -> bool:
    """Whether a TIR block (an SBlock, not its RV) has a reduction iterator (CommReduce)."""
    return any(int(iv.iter_type) == 2 for iv in block.iter_vars)


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


NARROW = 4           # innermost extents up to this are unrolled by narrow_injective_schedule


def narrow_injective_schedule(mod, cores: int = 2):
    """Elementwise chains with no reduction whose output's innermost axis is at most 4 wide (a
    model's input quantized, padded to 4 channels and moved to NHWC): every step inlined into
    the last one, parallel over the outer axes but the last two, the channel loop unrolled.
    row-wise (below) computed each of the seven steps of mobilenetv3's input quantization per
    output pixel into its own full-size buffer (0.16 ms); MetaSchedule's own space vectorises a
    fused index with divisions and gathers (0.61 ms); this: 0.03 ms. Wider rows stay row-wise,
    which vectorises their float steps (on 16 channels this was 2-3x slower). None when the
    function does not have that shape."""
    from tvm import s_tir

    sch = s_tir.Schedule(mod)
    try:
        blocks = sch.get_child_blocks(sch.get_sblock("root"))
        if any(_is_reduction(sch.get(b)) for b in blocks):
            return None
        for block in reversed(blocks[:-1]):
            sch.compute_inline(block)
        last = sch.get_child_blocks(sch.get_sblock("root"))[-1]
        loops = sch.get_loops(last)
        if len(loops) < 3 or int(sch.get(loops[-1]).extent) > NARROW:
            return None
        outer = sch.fuse(*loops[:-2]) if len(loops) > 3 else loops[0]
        if int(sch.get(outer).extent) < 2 * cores:
            return None
        sch.parallel(outer)
        sch.unroll(loops[-1])
    except Exception as exc:
        log.debug("narrow injective schedule does not apply: %s", exc)
        return None
    return sch


def rowwise_schedule(mod, lanes: int):
    """Row-wise reductions over the last axis (softmax, layer norm): one parallel loop over the
    rows of the output, every producer computed inside it, row by row, and the elementwise
    steps vectorised along the row:

        parallel rows: max = reduce(x[r, :]); e[:] = exp(x[r, :] - max); s = sum(e); y[r, :] = e / s

    MetaSchedule's space leaves these serial (MiniLM's softmax: 2.3 ms a call, onnxruntime 0.13).

    The reductions along the row (max, sum, mean) run `lanes` partial results at once, when the
    row is a whole number of vectors: the row is split into [n / lanes, lanes] and the lanes
    factored out (rfactor) into a vector accumulator, reduced across its lanes at the end.

        acc[0:L] = init; for k0: acc[0:L] = max(acc[0:L], x[r, k0*L : k0*L+L]); max = reduce(acc)

    A scalar reduction is one dependent chain, one add per 4 cycles (the add's latency): at 1
    thread ViT-tiny's layer norms [197 x 192] took 2.6 ms of its 30 against onnxruntime's 1.1, and
    MiniLM's softmax [12 x 128 x 128] 0.51 ms a call, 0.14 with the lanes. Rows that are no whole
    number of vectors keep the scalar chain: TVM 0.27's rfactor of an imperfect split dropped
    the split's bound (reads past the row). A softmax over such rows (ViT's 197 tokens) is padded
    to whole vectors before it gets here (compiler._softmax_in_whole_vectors). None when the
    function does not have that shape."""
    from tvm import s_tir

    sch = s_tir.Schedule(mod)
    try:
        blocks = sch.get_child_blocks(sch.get_sblock("root"))
        if len(blocks) < 2:
            return None
        last = blocks[-1]
        if _is_reduction(sch.get(last)) or len(sch.get_loops(last)) < 2:
            return None
        factored = _factor_row_reductions(sch, blocks[:-1], lanes)
        blocks = sch.get_child_blocks(sch.get_sblock("root"))
        loops = sch.get_loops(last)
        rows = sch.fuse(*loops[:-1]) if len(loops) > 2 else loops[0]
        for block in reversed(blocks[:-1]):
            sch.compute_at(block, rows, preserve_unit_loops=True)
        sch.parallel(rows)
        for block in blocks:
            if sch.get(block).name_hint in factored:      # (partial results: reductions)
                _vectorize_lanes(sch, block, rows, lanes)
            elif not _is_reduction(sch.get(block)):
                _vectorize_innermost(sch, block, rows, lanes)
    except Exception as exc:
        log.debug("row-wise schedule does not apply: %s", exc)
        return None
    return sch


def _factor_row_reductions(sch, blocks, lanes: int) -> set[str]:
    """rfactor every float reduction among `blocks` whose innermost loop (the row) is a whole
    number of `lanes`-wide vectors, at least two: the names of the blocks of partial results."""
    made = set()
    for block in blocks:
        b = sch.get(block)
        if not _is_reduction(b) or not _all_float(b) or len(b.writes) != 1:
            continue
        inner = sch.get_loops(block)[-1]
        n = sch.get(inner).extent
        if not hasattr(n, "value") or n.value % lanes or n.value < 2 * lanes:
            continue
        try:
            _, lane = sch.split(inner, factors=[None, lanes])
            rf = sch.rfactor(lane, factor_axis=len(b.writes[0].region))
        except Exception as exc:        # (a tuple reduction, a reduction not along the row)
            log.debug("row reduction %s not factored: %s", b.name_hint, exc)
            continue
        made.add(sch.get(rf).name_hint)
    return made


def _vectorize_lanes(sch, block, rows, lanes: int) -> None:
    """The block of partial results of a factored reduction, computed under `rows`: its lane
    loop (the first of extent `lanes`: rfactor puts the new spatial axis first) moved innermost
    and vectorised, so each step reads one vector of the row into one vector accumulator."""
    loops = sch.get_loops(block)
    row = sch.get(rows)
    inner = loops[[sch.get(lp).same_as(row) for lp in loops].index(True) + 1:]
    lane = next(lp for lp in inner if int(sch.get(lp).extent) == lanes)
    rest = [lp for lp in inner if not sch.get(lp).same_as(sch.get(lane))]
    if rest:
        sch.reorder(*rest, lane)
    sch.vectorize(lane)


def apply_default_schedules(mod, target, *, prepack_weights: bool = True):
    """Schedule every PrimFunc of `mod` not yet scheduled (by the tuning database); returns
    (mod, counts). prepack_weights: constant weights are stored in the order the register block
    reads them (see `attach_layout_free_buffers`)."""
    if prepack_weights:
        try:
            packed, info = _apply(attach_layout_free_buffers(mod), target)
            return _prepack(packed), {**info, "prepacked_weights": _count_prepacked(packed)}
        except Exception as exc:   # the kernels stay correct without it, only slower
            log.debug("weight prepacking failed, kernels read the weights as they are: %s", exc)
            mod = _without_layout_free_buffers(mod)
    return _apply(mod, target)


def _without_layout_free_buffers(mod):
    """`mod` with the layout-free marks taken off the kernels still to schedule: a default
    schedule would otherwise rewrite the weights' layout inside the kernel, on every call."""
    import tvm

    out = tvm.IRModule(dict(mod.functions_items()), attrs=mod.attrs)
    for gv, func in unscheduled_primfuncs(mod):
        if func.attrs is not None and "layout_free_buffers" in func.attrs:
            out[gv] = func.without_attr("layout_free_buffers")
    return out


def attach_layout_free_buffers(mod):
    """Mark the PrimFunc parameters that every call passes a constant (weights, biases) as
    layout-free (attr `layout_free_buffers`), so MetaSchedule's RewriteLayout postproc stores
    them in the order the schedule reads them: a conv's [kh, kw, ic, oc] weights become
    [oc / c, kh, kw, ic, c] for a register block c channels wide, one contiguous stream per
    parallel task. Read as [kh, kw, ic, oc] a 7x7x512 layer's task strides 2 KiB per input
    channel, which maps every line to 1 in 32 cache sets: the weights came from L3 on every
    output row (resnet18 conv kernels 1.5x slower, the 7x7 ones 2.5x). Unlike relax's
    AttachAttrLayoutFreeBuffers this keeps the kernels' names (the profile and isa-mix match
    them), and leaves functions alone whose call sites disagree."""
    import tvm
    from tvm import relax

    seen: dict = {}

    def visit(expr):
        if isinstance(expr, relax.Call) and getattr(expr.op, "name", "") == "relax.call_tir":
            gv, args = expr.args[0], expr.args[1]
            fields = list(args.fields) if isinstance(args, relax.Tuple) else [args]
            consts = tuple(i for i, a in enumerate(fields) if isinstance(a, tvm.ir.expr.Constant))
            seen.setdefault(gv.name_hint, set()).add(consts)

    for _gv, func in mod.functions_items():
        if isinstance(func, relax.Function):
            relax.analysis.post_order_visit(func, visit)
    out = mod
    for gv, func in mod.functions_items():
        if not isinstance(func, tvm.tirx.PrimFunc) or len(seen.get(gv.name_hint, ())) != 1:
            continue
        if func.attrs is not None and (func.attrs.get("tirx.is_scheduled", False)
                                       or "layout_free_buffers" in func.attrs):
            continue
        (consts,) = seen[gv.name_hint]
        if consts:
            out = out if out is not mod else tvm.IRModule(dict(mod.functions_items()), attrs=mod.attrs)
            out[gv] = func.with_attr("layout_free_buffers", list(consts))
    return out


def _has_prepack(func) -> bool:
    """Whether a kernel still rewrites a weight's layout itself (a block RewriteLayout added)."""
    import tvm
    from tvm import s_tir

    try:
        sch = s_tir.Schedule(tvm.IRModule({"main": func}))
        blocks = sch.get_child_blocks(sch.get_sblock("root"))
    except Exception:
        return False
    return any("meta_schedule.layout_rewrite_preproc" in sch.get(b).annotations for b in blocks)


def _count_prepacked(mod) -> int:
    import tvm

    return sum(1 for _gv, f in mod.functions_items()
               if isinstance(f, tvm.tirx.PrimFunc) and _has_prepack(f))


def _prepack(mod):
    """Move each kernel's weight-layout rewrite into a function of its own, run it on the
    constant weights now (at build time), so the kernel reads prepacked weights, and give the
    kernels back their names (SplitLayoutRewritePreproc appends `_prepacked`)."""
    import tvm
    from tvm import relax

    if not _count_prepacked(mod):
        return mod
    names = {gv.name_hint for gv, _f in mod.functions_items()}
    mod = relax.transform.SplitLayoutRewritePreproc()(mod)
    mod = relax.transform.FoldConstant()(mod)
    # rename X_prepacked to X: NormalizeGlobalVar names a function after its global_symbol
    renamed = []
    for gv, func in list(mod.functions_items()):
        name = gv.name_hint
        if isinstance(func, tvm.tirx.PrimFunc) and name.endswith("_prepacked") and name[:-10] in names:
            mod[gv] = func.with_attr("global_symbol", name[:-10])
            renamed.append(name[:-10])
    mod = relax.transform.NormalizeGlobalVar()(mod)
    for gv, func in list(mod.functions_items()):
        if gv.name_hint in renamed:
            mod[gv] = func.without_attr("global_symbol")
    mod = relax.transform.CanonicalizeBindings()(mod)
    mod = relax.transform.DeadCodeElimination()(mod)
    if _count_prepacked(mod):
        raise RuntimeError("a layout rewrite was left inside a kernel")
    return mod


def unscheduled_primfuncs(mod):
    """(GlobalVar, PrimFunc) of every PrimFunc of `mod` nothing has scheduled yet (neither the
    tuning database nor a default rule)."""
    import tvm

    for gv, func in list(mod.functions.items()):
        if isinstance(func, tvm.tirx.PrimFunc) and not (
                func.attrs is not None and func.attrs.get("tirx.is_scheduled", False)):
            yield gv, func


def with_attrs_of(scheduled, func):
    """`scheduled` carrying the function attributes of the `func` it was made from."""
    for k, v in (dict(func.attrs) if func.attrs is not None else {}).items():
        if k != "tirx.is_scheduled":
            scheduled = scheduled.with_attr(k, v)
    return scheduled


def _apply(mod, target):
    import tvm_ffi

    cache: dict = {}
    done = failed = 0
    for gv, func in unscheduled_primfuncs(mod):
        key = tvm_ffi.structural_hash(func)
        if key not in cache:
            try:
                cache[key] = schedule_primfunc(func, target)
            except Exception as exc:  # an op MetaSchedule's rules reject keeps TVM's default lowering
                log.debug("no default schedule for %s: %s", gv.name_hint, exc)
                cache[key] = None
        scheduled = cache[key]
        if scheduled is None:
            failed += 1
            continue
        mod[gv] = with_attrs_of(scheduled, func)
        done += 1
    return mod, {"default_scheduled": done, "left_unscheduled": failed}
