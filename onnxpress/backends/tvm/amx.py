"""Intel AMX int8 tiles for the integer matmuls and convolutions of int8_kernels.py (Sapphire
Rapids and later).

An AMX core holds eight tile registers of up to 16 rows x 64 bytes. One `tdpbusd` multiplies a
16 x 64 u8 tile by a 64 x 16 s8 tile (stored as 16 rows of 16 columns x 4 consecutive k, the
"VNNI" order) into a 16 x 16 int32 tile: 16,384 multiply-adds, where AVX-512 VNNI's vpdpbusd
does 64. The packed weights of int8_kernels (Wp[k/4, n, 4]) are already in that order: a B tile
is 16 rows of Wp at a stride of n*4 bytes.

    out[m, n] = sum_k x[m, k] * W[k, n]       (u8 x s8 -> i32, then the requantizing epilogue)
    schedule:  parallel n / 32 | m / (32*R) | one intrinsic call:
               tiles 0-3: a 32 x 32 int32 block of out (2 x 2 tiles), tiles 4-5: two 16-row
               strips of x, tiles 6-7: two 16-column strips of Wp; for each 64-wide k step:
               4 tile loads, 4 tdpbusd; R such blocks down the rows per call, one ldtilecfg.

Used where the target has amx-int8 and amx-tile (read from the TVM target, never the build
machine) and the shape fills whole tiles: k a multiple of 64, m and n multiples of 32;
any other matmul stays on vpdpbusd. Measured on the 2-core Emerald Rapids VM, one thread,
exact against numpy: [128 x 384] x [384 x 1536] 0.17 ms (vpdpbusd 0.24), [128 x 1536] x
[1536 x 384] 0.10 ms (0.22).

Convolutions (NHWC u8, weights packed Wp[kh, kw, c/4, oc, 4]) take the same tiles per output
row: a pixel tile is `rows` consecutive output pixels, read at a stride of stride_w * channels
bytes, 64 channels wide; for each (kh, kw) and 64-channel step, 2 pixel tiles x 2 weight tiles.
A kernel row of few channels (a 7x7 stem's 7 x 4 bytes) is one tile row: the pixel tile takes
the whole row and the kw loop disappears (`folds_kernel_row`).

Linux hands the tile state to a process only when it asks (Linux 5.16+:
arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)); without it the first tile instruction
stops the process with an illegal instruction. `request_permission` asks once per process:
artifacts whose manifest lists AMX kernels call it as they load (run_artifact.check_cpu), and so
do the tuning runner's worker processes.
"""

from __future__ import annotations

import logging
import re

log = logging.getLogger(__name__)

TILE_ROWS = 16              # rows of a tile; 64 bytes per row
BLOCK = 32                  # output rows and columns per 2 x 2 tiles
MAX_ROW_BLOCKS = 4          # 32-row blocks per intrinsic call (one ldtilecfg each)
MARK = "onnxpress.amx"       # root-block annotation of a kernel scheduled on AMX tiles
_permitted: bool | None = None
_REGISTERED: set[str] = set()


def has_amx(target) -> bool:
    """The TVM target's CPU has AMX int8 tiles."""
    from tvm.target import codegen

    if target is None or str(target.kind.name) != "llvm":
        return False
    try:
        return bool(codegen.target_has_features("amx-int8", target)
                    and codegen.target_has_features("amx-tile", target))
    except Exception:
        return False


def fits(m: int, n: int, k: int) -> bool:
    """A matmul of [m, k] x [k, n] fills whole 2 x 2 tile blocks."""
    return m % BLOCK == 0 and n % BLOCK == 0 and k % 64 == 0 and k > 0


def row_blocks(m: int) -> int:
    """32-row blocks per intrinsic call: the most, up to MAX_ROW_BLOCKS, that divide m / 32."""
    blocks = m // BLOCK
    return max(d for d in range(1, MAX_ROW_BLOCKS + 1) if blocks % d == 0)


def request_permission() -> bool:
    """Ask Linux for the AMX tile state for this process (once); True when granted. Any other
    OS, or a kernel older than 5.16, answers False."""
    global _permitted
    if _permitted is None:
        from .run_artifact import request_amx

        _permitted = request_amx()
    return _permitted


_MACROS: tuple = ()


def _tile_macros() -> tuple:
    """TVMScript macros shared by the matmul and conv intrinsics (built once, on first use):
    configure(c_rows, a_rows, a_cols, b_rows): palette 1, output tiles 0-3 (c_rows x 64 bytes),
        pixel/row tiles 4-5 (a_rows x a_cols), weight tiles 6-7 (b_rows x 64), then ldtilecfg;
    out_tiles(op, mode, C, sc, row0, rows, tm): tileloadd64/tilestored64 of the tm x 2 output
        tiles, the first row at row0 of C (a row stride of sc int32), rows apart;
    dot(tm): the tm x 2 tdpbusd of one k step."""
    global _MACROS
    if _MACROS:
        return _MACROS
    from tvm.script import tirx as T

    @T.macro
    def configure(c_rows, a_rows, a_cols, b_rows):
        cfg = T.alloc_buffer((64,), "uint8", scope="local")
        cfg[T.ramp(0, 1, 64)] = T.broadcast(T.uint8(0), 64)
        cfg[0] = T.uint8(1)
        for t in range(4):
            cfg[16 + 2 * t] = T.uint8(64)
            cfg[48 + t] = T.uint8(c_rows)
        for t in range(2):
            cfg[24 + 2 * t] = T.uint8(a_cols)
            cfg[52 + t] = T.uint8(a_rows)
            cfg[28 + 2 * t] = T.uint8(64)
            cfg[54 + t] = T.uint8(b_rows)
        T.evaluate(T.call_llvm_intrin("void", "llvm.x86.ldtilecfg", cfg.access_ptr("r")))

    @T.macro
    def out_tiles(op, mode, C, sc, row0, rows, tm):
        for t_m in T.unroll(tm):
            for t_n in T.unroll(2):
                T.evaluate(T.call_llvm_intrin(
                    "void", op, T.uint8(t_m * 2 + t_n),
                    C.access_ptr(mode, offset=(row0 + t_m * rows) * sc + t_n * 16), T.int64(sc * 4)))

    @T.macro
    def dot(tm):
        for t_m in T.unroll(tm):
            for t_n in T.unroll(2):
                T.evaluate(T.call_llvm_intrin("void", "llvm.x86.tdpbusd", T.uint8(t_m * 2 + t_n),
                                              T.uint8(4 + t_m), T.uint8(6 + t_n)))

    _MACROS = (configure, out_tiles, dot)
    return _MACROS


def intrinsic(k: int, blocks: int) -> str:
    """Register (once) and return the tensor intrinsic of a (32 * blocks) x 32 output block over
    the whole reduction k (a multiple of 64)."""
    name = f"onnxpress_amx_{BLOCK * blocks}x{BLOCK}x{k}"
    if name in _REGISTERED:
        return name
    from tvm.s_tir import TensorIntrin
    from tvm.script import tirx as T

    k4, steps, rows = k // 4, k // 64, BLOCK * blocks
    configure, out_tiles, dot = _tile_macros()

    @T.prim_func(s_tir=True)
    def desc(a: T.handle, b: T.handle, c: T.handle) -> None:
        A = T.match_buffer(a, (rows, k), "uint8", offset_factor=1)
        B = T.match_buffer(b, (k4, BLOCK, 4), "int8", offset_factor=1)
        C = T.match_buffer(c, (rows, BLOCK), "int32", offset_factor=1)
        with T.sblock("root"):
            T.reads(C[0:rows, 0:BLOCK], A[0:rows, 0:k], B[0:k4, 0:BLOCK, 0:4])
            T.writes(C[0:rows, 0:BLOCK])
            for i, j, r, q in T.grid(rows, BLOCK, k4, 4):
                with T.sblock("update"):
                    vi, vj, vr, vq = T.axis.remap("SSRR", [i, j, r, q])
                    C[vi, vj] = C[vi, vj] + T.cast(A[vi, vr * 4 + vq], "int32") * T.cast(B[vr, vj, vq], "int32")

    @T.prim_func(s_tir=True)
    def impl(a: T.handle, b: T.handle, c: T.handle) -> None:
        sa = T.int32()
        sb0 = T.int32()
        sb1 = T.int32()
        sc = T.int32()
        A = T.match_buffer(a, (rows, k), "uint8", offset_factor=1, strides=[sa, 1])
        B = T.match_buffer(b, (k4, BLOCK, 4), "int8", offset_factor=1, strides=[sb0, sb1, 1])
        C = T.match_buffer(c, (rows, BLOCK), "int32", offset_factor=1, strides=[sc, 1])
        with T.sblock("root"):
            T.reads(C[0:rows, 0:BLOCK], A[0:rows, 0:k], B[0:k4, 0:BLOCK, 0:4])
            T.writes(C[0:rows, 0:BLOCK])
            configure(TILE_ROWS, TILE_ROWS, 64, TILE_ROWS)     # eight tiles of 16 x 64 bytes
            for blk in range(blocks):
                out_tiles("llvm.x86.tileloadd64", "r", C, sc, blk * BLOCK, TILE_ROWS, 2)
                for s in range(steps):
                    for tm in T.unroll(2):
                        T.evaluate(T.call_llvm_intrin(
                            "void", "llvm.x86.tileloadd64", T.uint8(4 + tm),
                            A.access_ptr("r", offset=(blk * BLOCK + tm * 16) * sa + s * 64), T.int64(sa)))
                    for tn in T.unroll(2):
                        T.evaluate(T.call_llvm_intrin(
                            "void", "llvm.x86.tileloadd64", T.uint8(6 + tn),
                            B.access_ptr("r", offset=s * 16 * sb0 + tn * 16 * sb1), T.int64(sb0)))
                    dot(2)
                out_tiles("llvm.x86.tilestored64", "w", C, sc, blk * BLOCK, TILE_ROWS, 2)
            T.evaluate(T.call_llvm_intrin("void", "llvm.x86.tilerelease"))

    TensorIntrin.register(name, desc, impl, override=True)
    _REGISTERED.add(name)
    return name


_NAMED = re.compile(r"onnxpress_amx_(?:conv_(\d+)x(\d+)_(\d+)x(\d+)x(\d+)_s(\d+)_d(\d+)x(\d+)|(\d+)x32x(\d+))")


def register_named(text: str) -> int:
    """Register every AMX intrinsic named in `text` (a tuning database's records), from the
    parameters its name spells out; returns how many names were found. A record names the
    intrinsic its schedule tensorizes with, and MetaSchedule replays every record as it opens
    the database: in a process that has not built that kernel yet it failed ("TensorIntrin
    'onnxpress_amx_conv_2x7_3x3x16_s1_d1x1' is not registered")."""
    found = 0
    for m in _NAMED.finditer(text):
        found += 1
        if m.group(1):
            tm, rows, kh, kw, c4, sw, dh, dw = (int(g) for g in m.groups()[:8])
            conv_intrinsic((kh, kw, c4, sw, dh, dw), tm, rows)
        else:
            intrinsic(int(m.group(10)), int(m.group(9)) // BLOCK)
    return found


def schedule_matmul(sch, block, epilogue) -> None:
    """Schedule the dot-product matmul `block` of `sch` (int8_kernels._matmul_te, unscheduled) on
    AMX tiles, its requantizing `epilogue` (or None) computed per row block."""
    *batch, m, n, rc, rj = sch.get_loops(block)
    m_ext, k = int(sch.get(m).extent), 4 * int(sch.get(rc).extent)
    blocks = row_blocks(m_ext)
    mo, mi = sch.split(m, [None, BLOCK * blocks])
    no, ni = sch.split(n, [None, BLOCK])
    sch.reorder(*batch, no, mo, mi, ni, rc, rj)
    if epilogue is not None:
        sch.reverse_compute_at(epilogue, mo, preserve_unit_loops=True)
        inner = sch.get_loops(epilogue)[-1]
        if int(sch.get(inner).extent) % 16 == 0:
            inner = sch.split(inner, [None, 16])[1]
        sch.vectorize(inner)
    sch.parallel(sch.fuse(*batch, no) if batch else no)
    init = sch.decompose_reduction(block, mi)
    sch.vectorize(sch.get_loops(init)[-1])
    sch.tensorize(mi, intrinsic(k, blocks))
    sch.annotate(sch.get_sblock("root"), MARK, 1)


def conv_rows(width: int) -> tuple[int, int] | None:
    """(row tiles, rows per tile) of a conv's AMX block along the output width: two tiles of
    width/2/k rows where that divides (56 -> 2 x 14, 14 -> 2 x 7), else one (7 -> 1 x 7);
    None where no tile of at most 16 rows divides the width."""
    for tm in (2, 1):
        for rows in range(TILE_ROWS, 0, -1):
            if width % (tm * rows) == 0 and rows >= 4:
                return tm, rows
    return None


def conv_fits(width: int, channels: int, out_channels: int, kw: int = 1, dw: int = 1) -> bool:
    """An int8 conv's block fills whole tiles: input channels a multiple of 64 (one tile row of
    bytes), or a kernel row of few channels that fits one tile row (kw * channels <= 64, no
    dilation: a 7x7 stem's 7 x 4 channels), output channels a multiple of 32, and a width
    conv_rows can split."""
    return ((channels % 64 == 0 or folds_kernel_row(kw, channels, dw))
            and out_channels % BLOCK == 0 and conv_rows(width) is not None)


def folds_kernel_row(kw: int, channels: int, dw: int) -> bool:
    """A kernel row's kw x channels bytes are contiguous in NHWC and fit one tile row: the pixel
    tile takes them all (its k dimension is kw x channels) and the kw loop disappears."""
    return dw == 1 and channels % 64 != 0 and kw * channels <= 64


def conv_intrinsic(geometry: tuple, tm: int, rows: int) -> str:
    """Register (once) and return the intrinsic of a (tm * rows) x 32 output block of a conv
    (one output row, tm * rows consecutive pixels, 32 channels) over its whole reduction:
    geometry = (kh, kw, c4, stride_w, dilation_h, dilation_w)."""
    kh, kw, c4, sw, dh, dw = geometry
    folded = folds_kernel_row(kw, 4 * c4, dw)
    name = f"onnxpress_amx_conv_{tm}x{rows}_{kh}x{kw}x{c4}_s{sw}_d{dh}x{dw}"
    if name in _REGISTERED:
        return name
    from tvm.s_tir import TensorIntrin
    from tvm.script import tirx as T

    px = tm * rows
    span_h = (kh - 1) * dh + 1
    span_w = (px - 1) * sw + (kw - 1) * dw + 1
    c = 4 * c4
    # k steps of one tile row (64 bytes) each; folded: one step per kernel row, of kw * c bytes
    steps, a_cols, b_rows, kx = (1, kw * c, kw * c4, 1) if folded else (c // 64, 64, TILE_ROWS, kw)
    configure, out_tiles, dot = _tile_macros()

    # the block drops reduction loops of extent 1 (a stem's one group of 4 channels, a 1x1
    # kernel's window): the pattern tensorize matches must drop them too
    if c4 == 1 and kh * kw > 1:
        @T.prim_func(s_tir=True)
        def desc(a: T.handle, b: T.handle, o: T.handle) -> None:
            A = T.match_buffer(a, (span_h, span_w, c), "uint8", offset_factor=1)
            B = T.match_buffer(b, (kh, kw, c4, BLOCK, 4), "int8", offset_factor=1)
            C = T.match_buffer(o, (px, BLOCK), "int32", offset_factor=1)
            with T.sblock("root"):
                T.reads(C[0:px, 0:BLOCK], A[0:span_h, 0:span_w, 0:c], B[0:kh, 0:kw, 0:c4, 0:BLOCK, 0:4])
                T.writes(C[0:px, 0:BLOCK])
                for i, j, y, x, q in T.grid(px, BLOCK, kh, kw, 4):
                    with T.sblock("update"):
                        vi, vj, vy, vx, vq = T.axis.remap("SSRRR", [i, j, y, x, q])
                        C[vi, vj] = C[vi, vj] + T.cast(A[vy * dh, vi * sw + vx * dw, vq], "int32") \
                            * T.cast(B[vy, vx, 0, vj, vq], "int32")
    elif kh * kw == 1:
        @T.prim_func(s_tir=True)
        def desc(a: T.handle, b: T.handle, o: T.handle) -> None:
            A = T.match_buffer(a, (span_h, span_w, c), "uint8", offset_factor=1)
            B = T.match_buffer(b, (kh, kw, c4, BLOCK, 4), "int8", offset_factor=1)
            C = T.match_buffer(o, (px, BLOCK), "int32", offset_factor=1)
            with T.sblock("root"):
                T.reads(C[0:px, 0:BLOCK], A[0:span_h, 0:span_w, 0:c], B[0:kh, 0:kw, 0:c4, 0:BLOCK, 0:4])
                T.writes(C[0:px, 0:BLOCK])
                for i, j, r, q in T.grid(px, BLOCK, c4, 4):
                    with T.sblock("update"):
                        vi, vj, vr, vq = T.axis.remap("SSRR", [i, j, r, q])
                        C[vi, vj] = C[vi, vj] + T.cast(A[0, vi * sw, vr * 4 + vq], "int32") \
                            * T.cast(B[0, 0, vr, vj, vq], "int32")
    else:
        @T.prim_func(s_tir=True)
        def desc(a: T.handle, b: T.handle, o: T.handle) -> None:
            A = T.match_buffer(a, (span_h, span_w, c), "uint8", offset_factor=1)
            B = T.match_buffer(b, (kh, kw, c4, BLOCK, 4), "int8", offset_factor=1)
            C = T.match_buffer(o, (px, BLOCK), "int32", offset_factor=1)
            with T.sblock("root"):
                T.reads(C[0:px, 0:BLOCK], A[0:span_h, 0:span_w, 0:c], B[0:kh, 0:kw, 0:c4, 0:BLOCK, 0:4])
                T.writes(C[0:px, 0:BLOCK])
                for i, j, y, x, r, q in T.grid(px, BLOCK, kh, kw, c4, 4):
                    with T.sblock("update"):
                        vi, vj, vy, vx, vr, vq = T.axis.remap("SSRRRR", [i, j, y, x, r, q])
                        C[vi, vj] = C[vi, vj] + T.cast(A[vy * dh, vi * sw + vx * dw, vr * 4 + vq], "int32") \
                            * T.cast(B[vy, vx, vr, vj, vq], "int32")

    @T.prim_func(s_tir=True)
    def impl(a: T.handle, b: T.handle, o: T.handle) -> None:
        sa0 = T.int32()
        sa1 = T.int32()
        sb0 = T.int32()
        sb1 = T.int32()
        sb2 = T.int32()
        sb3 = T.int32()
        sc = T.int32()
        A = T.match_buffer(a, (span_h, span_w, c), "uint8", offset_factor=1, strides=[sa0, sa1, 1])
        B = T.match_buffer(b, (kh, kw, c4, BLOCK, 4), "int8", offset_factor=1,
                           strides=[sb0, sb1, sb2, sb3, 1])
        C = T.match_buffer(o, (px, BLOCK), "int32", offset_factor=1, strides=[sc, 1])
        with T.sblock("root"):
            T.reads(C[0:px, 0:BLOCK], A[0:span_h, 0:span_w, 0:c], B[0:kh, 0:kw, 0:c4, 0:BLOCK, 0:4])
            T.writes(C[0:px, 0:BLOCK])
            # tiles 0-3: output (rows x 16 int32), 4-5: pixels (rows x a_cols bytes of channels),
            # 6-7: weights (b_rows groups of 4 channels x 16 outputs x 4)
            configure(rows, rows, a_cols, b_rows)
            out_tiles("llvm.x86.tileloadd64", "r", C, sc, 0, rows, tm)
            for y, x, s in T.grid(kh, kx, steps):
                for t_m in T.unroll(tm):
                    T.evaluate(T.call_llvm_intrin(
                        "void", "llvm.x86.tileloadd64", T.uint8(4 + t_m),
                        A.access_ptr("r", offset=y * dh * sa0 + (t_m * rows * sw + x * dw) * sa1 + s * 64),
                        T.int64(sw * sa1)))
                for t_n in T.unroll(2):
                    T.evaluate(T.call_llvm_intrin(
                        "void", "llvm.x86.tileloadd64", T.uint8(6 + t_n),
                        B.access_ptr("r", offset=y * sb0 + x * sb1 + s * 16 * sb2 + t_n * 16 * sb3),
                        T.int64(sb2)))
                dot(tm)
            out_tiles("llvm.x86.tilestored64", "w", C, sc, 0, rows, tm)
            T.evaluate(T.call_llvm_intrin("void", "llvm.x86.tilerelease"))

    TensorIntrin.register(name, desc, impl, override=True)
    _REGISTERED.add(name)
    return name


def schedule_conv(sch, block, epilogue, geometry: tuple, weights_outer: bool) -> None:
    """Schedule the dot-product conv `block` of `sch` (int8_kernels._conv_te, unscheduled) on AMX
    tiles: parallel rows (output-channel blocks outermost when `weights_outer`), per row
    blocks of conv_rows pixels x 32 channels, each one intrinsic call over the whole kh x kw x
    channels reduction; the requantizing `epilogue` (or None) per block."""
    n, h, w, oc, rh, rw, rc, rj = sch.get_loops(block)
    tm, rows = conv_rows(int(sch.get(w).extent))
    wo, wi = sch.split(w, [None, tm * rows])
    oo, oi = sch.split(oc, [None, BLOCK])
    # reduction loops of extent 1 go outside the tensorized block (conv_intrinsic's pattern has
    # none): left inside, tensorize sees their block variable bound outside and matches nothing
    unit = [lp for lp in (rh, rw, rc) if int(sch.get(lp).extent) == 1]
    inner = [lp for lp in (rh, rw, rc) if int(sch.get(lp).extent) != 1]
    if weights_outer:
        sch.reorder(oo, n, h, wo, *unit, wi, oi, *inner, rj)
        tile, outer = wo, (oo, n, h)
    else:
        sch.reorder(n, h, wo, oo, *unit, wi, oi, *inner, rj)
        tile, outer = oo, (n, h)
    if epilogue is not None:
        sch.reverse_compute_at(epilogue, tile, preserve_unit_loops=True)
        inner = sch.get_loops(epilogue)[-1]
        if int(sch.get(inner).extent) % 16 == 0:
            inner = sch.split(inner, [None, 16])[1]
        sch.vectorize(inner)
    sch.parallel(sch.fuse(*outer))
    init = sch.decompose_reduction(block, unit[0] if unit else wi)
    sch.vectorize(sch.get_loops(init)[-1])
    sch.tensorize(wi, conv_intrinsic(geometry, tm, rows))
    sch.annotate(sch.get_sblock("root"), MARK, 1)


def uses_amx(func) -> bool:
    """The PrimFunc was scheduled on AMX tiles (schedule_matmul marks its root block)."""
    block = getattr(getattr(func, "body", None), "block", None)
    return block is not None and bool(block.annotations.get(MARK, 0))
