"""Intel AMX int8 tiles for the integer matmuls of int8_kernels.py (Sapphire Rapids and later).

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

Linux hands the tile state to a process only when it asks (Linux 5.16+:
arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)); without it the first tile instruction
stops the process with an illegal instruction. `request_permission` asks once per process:
artifacts whose manifest lists AMX kernels call it as they load (run_artifact.check_cpu), and so
do the tuning runner's worker processes.
"""

from __future__ import annotations

import logging

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


def intrinsic(k: int, blocks: int) -> str:
    """Register (once) and return the tensor intrinsic of a (32 * blocks) x 32 output block over
    the whole reduction k (a multiple of 64)."""
    name = f"onnxpress_amx_{BLOCK * blocks}x{BLOCK}x{k}"
    if name in _REGISTERED:
        return name
    from tvm.s_tir import TensorIntrin
    from tvm.script import tirx as T

    k4, steps, rows = k // 4, k // 64, BLOCK * blocks

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
            # tile configuration: palette 1, eight tiles of 16 rows x 64 bytes
            cfg = T.alloc_buffer((64,), "uint8", scope="local")
            cfg[T.ramp(0, 1, 64)] = T.broadcast(T.uint8(0), 64)
            cfg[0] = T.uint8(1)
            for t in range(8):
                cfg[16 + 2 * t] = T.uint8(64)
                cfg[48 + t] = T.uint8(TILE_ROWS)
            T.evaluate(T.call_llvm_intrin("void", "llvm.x86.ldtilecfg", cfg.access_ptr("r")))
            for blk in range(blocks):
                for tm in T.unroll(2):
                    for tn in T.unroll(2):
                        T.evaluate(T.call_llvm_intrin(
                            "void", "llvm.x86.tileloadd64", T.uint8(tm * 2 + tn),
                            C.access_ptr("r", offset=(blk * BLOCK + tm * 16) * sc + tn * 16),
                            T.int64(sc * 4)))
                for s in range(steps):
                    for tm in T.unroll(2):
                        T.evaluate(T.call_llvm_intrin(
                            "void", "llvm.x86.tileloadd64", T.uint8(4 + tm),
                            A.access_ptr("r", offset=(blk * BLOCK + tm * 16) * sa + s * 64), T.int64(sa)))
                    for tn in T.unroll(2):
                        T.evaluate(T.call_llvm_intrin(
                            "void", "llvm.x86.tileloadd64", T.uint8(6 + tn),
                            B.access_ptr("r", offset=s * 16 * sb0 + tn * 16 * sb1), T.int64(sb0)))
                    for tm in T.unroll(2):
                        for tn in T.unroll(2):
                            T.evaluate(T.call_llvm_intrin("void", "llvm.x86.tdpbusd", T.uint8(tm * 2 + tn),
                                                          T.uint8(4 + tm), T.uint8(6 + tn)))
                for tm in T.unroll(2):
                    for tn in T.unroll(2):
                        T.evaluate(T.call_llvm_intrin(
                            "void", "llvm.x86.tilestored64", T.uint8(tm * 2 + tn),
                            C.access_ptr("w", offset=(blk * BLOCK + tm * 16) * sc + tn * 16),
                            T.int64(sc * 4)))
            T.evaluate(T.call_llvm_intrin("void", "llvm.x86.tilerelease"))

    TensorIntrin.register(name, desc, impl, override=True)
    _REGISTERED.add(name)
    return name


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


def uses_amx(func) -> bool:
    """The PrimFunc was scheduled on AMX tiles (schedule_matmul marks its root block)."""
    block = getattr(getattr(func, "body", None), "block", None)
    return block is not None and bool(block.annotations.get(MARK, 0))
