"""Integer convolution kernels on CPUs: u8 x i8 -> i32 dot products of 4, chosen by the target's ISA.

    relax.nn.conv2d(NHWC u8, HWIO i8, out_dtype i32)  --legalize-->
        pack:  W[kh, kw, ic, oc] -> Wp[kh, kw, ic/4, oc, 4]          (a constant: folded at build)
        conv:  out[n, h, w, oc] = sum_{kh, kw, c4, j} i32(x[n, h*s+kh, w*s+kw, 4*c4+j]) * i32(Wp[kh, kw, c4, oc, j])
    schedule:  parallel n*h | w / R | oc / (V*L) | kh, kw, c4 | R rows x V vectors of L int32 lanes,
               each a tensor intrinsic over (L output channels) x (4 input channels):

    ISA feature             intrinsic (L lanes)                        exact for
    avx512vnni (+bw)        vpdpbusd zmm (16)                          all int8 weights
    avxvnni                 vpdpbusd ymm, VEX (8)                      all int8 weights
    avx512bw                vpmaddubsw + vpmaddwd zmm (16)             weights with |w0|+|w1| <= 128
    avx2                    vpmaddubsw + vpmaddwd ymm (8)              weights with |w0|+|w1| <= 128
    aarch64 +dotprod        sdot on (x - 128) (4), + 128 * sum(w)      all int8 weights
    CUDA sm_61+             dp4a (u8 x s8, int8_cuda.py's GPU tiling)  all int8 weights

vpmaddubsw adds two u8 x i8 products into a saturating int16: 255 * (|w0| + |w1|) must stay
within 32767, which per-channel int8 weights (|w| up to 127) break. Convolutions whose weights
break it are not given these kernels on CPUs without VNNI (int8.py keeps them on the float conv,
exact); weights quantized to 7 bits (|w| <= 64) always fit.
"""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)

RULE = "onnxpress.conv2d_int8"
RULE_MATMUL = "onnxpress.matmul_int8"
GEOMETRY = "onnxpress.conv_geometry"   # [stride_h, stride_w, dilation_h, dilation_w] of a conv block
WEIGHTS_OUTER_BYTES = 256 << 10     # packed conv weights above this: output-channel blocks outermost
PMADDUBSW_PAIR_LIMIT = 128          # 255 * 128 = 32640 <= 32767


def int8_isa(target) -> tuple[str, int] | None:
    """(name, int32 lanes) of the best u8 x i8 dot-product instruction of an llvm target."""
    from tvm.target import codegen

    if target is not None and str(target.kind.name) == "cuda":
        from .int8_cuda import has_dp4a

        return ("dp4a", 1) if has_dp4a(target) else None
    if target is None or str(target.kind.name) != "llvm":
        return None

    def has(feature: str) -> bool:
        try:
            return bool(codegen.target_has_features(feature, target))
        except Exception:
            return False

    triple = str(target.attrs.get("mtriple", "") or "")
    if triple.startswith("aarch64"):
        # sdot multiplies signed by signed: activations are shifted to int8 (x - 128) and
        # 128 * sum(w) added back per output channel
        return ("dotprod", 4) if has("dotprod") else None
    if has("avx512vnni") and has("avx512bw"):
        return "avx512vnni", 16
    if has("avxvnni"):
        return "avxvnni", 8
    if has("avx512bw"):
        return "avx512bw", 16
    if has("avx2"):
        return "avx2", 8
    return None


def lanes_for(isa: tuple[str, int] | None, channels: int) -> int | None:
    """The int32 lanes a dot-product kernel over `channels` output channels uses: the ISA's full
    vector where the channels fill it, else on AVX-512 the 256-bit form of the same instruction
    (AVX-512 VL: vpdpbusd ymm; vpmaddubsw ymm) where they fill that; None: no packed kernel.
    mobilenetv3's 24/40/72/88/120-channel convs would otherwise miss VNNI's 16 lanes and run
    as float convs between 8-bit tensors (30 instead of 43 integer kernels)."""
    if isa is None:
        return None
    name, lanes = isa
    for width in (lanes, lanes // 2 if name.startswith("avx512") else 0):
        if width and channels % width == 0:
            return width
    return None


def weights_need_7_bits(target_name: str) -> bool:
    """Whether int8 weights must stay within +-64 for `target_name`'s dot product to be exact
    ("x86"/"tvm": the host CPU that compile() targets; "arm": sdot, never). Without VNNI the
    u8 x s8 dot product is vpmaddubsw, whose int16 pair sums saturate on full-range weights."""
    if target_name not in ("x86", "tvm"):
        return False
    import tvm

    from .targets import resolve_target

    isa = int8_isa(tvm.target.Target(resolve_target("x86").spec))
    return needs_pair_limit(isa[0] if isa else None)


def needs_pair_limit(isa: str | None) -> bool:
    return isa in ("avx512bw", "avx2")


def pairs_fit_pmaddubsw(w_oihw) -> bool:
    """Whether vpmaddubsw's int16 sums cannot saturate: for each output channel and each pair of
    consecutive input channels (the pairs it adds), |w0| + |w1| <= 128, at every kernel tap."""
    import numpy as np

    w = np.asarray(w_oihw).astype(np.int32)
    if w.shape[1] % 2:            # the padded input channel has weight 0
        w = np.concatenate([w, np.zeros_like(w[:, :1])], axis=1)
    pairs = np.abs(w[:, 0::2]) + np.abs(w[:, 1::2])
    return bool(pairs.max(initial=0) <= PMADDUBSW_PAIR_LIMIT)


# -- tensor intrinsics -------------------------------------------------------------------------

_REGISTERED: set[str] = set()


def intrinsic(isa: str, lanes: int) -> str:
    """Register (once) and return the name of the dot-product intrinsic for `isa`."""
    name = f"onnxpress_dot_{lanes}x4_{isa}"
    if name in _REGISTERED:
        return name
    from tvm.s_tir import TensorIntrin
    from tvm.script import tirx as T

    L = lanes
    AT = "int8" if isa == "dotprod" else "uint8"

    @T.prim_func(s_tir=True)
    def desc(A: T.Buffer((4,), AT, offset_factor=1), B: T.Buffer((L, 4), "int8", offset_factor=1),
             C: T.Buffer((L,), "int32", offset_factor=1)) -> None:
        with T.sblock("root"):
            T.reads(C[0:L], A[0:4], B[0:L, 0:4])
            T.writes(C[0:L])
            for i in T.serial(0, L):
                for k in T.serial(0, 4):
                    with T.sblock("update"):
                        vi, vk = T.axis.remap("SR", [i, k])
                        C[vi] = C[vi] + T.cast(A[vk], "int32") * T.cast(B[vi, vk], "int32")

    if isa == "dotprod":
        @T.prim_func(s_tir=True)
        def impl(A: T.Buffer((4,), "int8", offset_factor=1), B: T.Buffer((4, 4), "int8", offset_factor=1),
                 C: T.Buffer((4,), "int32", offset_factor=1)) -> None:
            with T.sblock("root"):
                T.reads(C[0:4], A[0:4], B[0:4, 0:4])
                T.writes(C[0:4])
                a = T.reinterpret(T.broadcast(T.reinterpret(A.vload([0], "int8x4"), dtype="int32"), 4),
                                  dtype="int8x16")
                C[T.ramp(T.int32(0), 1, 4)] = T.call_llvm_pure_intrin(
                    T.llvm_lookup_intrinsic_id("llvm.aarch64.neon.sdot.v4i32.v16i8"),
                    C.vload([0], dtype="int32x4"), a, B.vload([0, 0], dtype="int8x16"), dtype="int32x4")
    elif isa in ("avx512vnni", "avxvnni"):
        llvm = "llvm.x86.avx512.vpdpbusd.512" if L == 16 else "llvm.x86.avx512.vpdpbusd.256"

        @T.prim_func(s_tir=True)
        def impl(A: T.Buffer((4,), "uint8", offset_factor=1), B: T.Buffer((L, 4), "int8", offset_factor=1),
                 C: T.Buffer((L,), "int32", offset_factor=1)) -> None:
            with T.sblock("root"):
                T.reads(C[0:L], A[0:4], B[0:L, 0:4])
                T.writes(C[0:L])
                a = T.reinterpret(T.broadcast(T.reinterpret(A.vload([0], "uint8x4"), dtype="int32"), L),
                                  dtype=f"uint8x{4 * L}")
                C[T.ramp(T.int32(0), 1, L)] = T.call_llvm_pure_intrin(
                    T.llvm_lookup_intrinsic_id(llvm), C.vload([0], dtype=f"int32x{L}"), a,
                    B.vload([0, 0], dtype=f"int8x{4 * L}"), dtype=f"int32x{L}")
    else:
        ubsw = "llvm.x86.avx512.pmaddubs.w.512" if L == 16 else "llvm.x86.avx2.pmadd.ub.sw"
        wd = "llvm.x86.avx512.pmaddw.d.512" if L == 16 else "llvm.x86.avx2.pmadd.wd"

        @T.prim_func(s_tir=True)
        def impl(A: T.Buffer((4,), "uint8", offset_factor=1), B: T.Buffer((L, 4), "int8", offset_factor=1),
                 C: T.Buffer((L,), "int32", offset_factor=1)) -> None:
            with T.sblock("root"):
                T.reads(C[0:L], A[0:4], B[0:L, 0:4])
                T.writes(C[0:L])
                a = T.reinterpret(T.broadcast(T.reinterpret(A.vload([0], "uint8x4"), dtype="int32"), L),
                                  dtype=f"uint8x{4 * L}")
                pairs = T.call_llvm_pure_intrin(T.llvm_lookup_intrinsic_id(ubsw), a,
                                                B.vload([0, 0], dtype=f"int8x{4 * L}"),
                                                dtype=f"int16x{2 * L}")
                C[T.ramp(T.int32(0), 1, L)] = C.vload([0], dtype=f"int32x{L}") + T.call_llvm_pure_intrin(
                    T.llvm_lookup_intrinsic_id(wd), pairs, T.broadcast(T.int16(1), 2 * L),
                    dtype=f"int32x{L}")

    TensorIntrin.register(name, desc, impl, override=True)
    _REGISTERED.add(name)
    return name


# every (isa, lanes) int8_isa and lanes_for can answer: the intrinsics a tuning record may name
DOT_INTRINSICS = (("dotprod", 4), ("avx512vnni", 16), ("avx512vnni", 8), ("avxvnni", 8),
                  ("avx512bw", 16), ("avx512bw", 8), ("avx2", 8))


def register_all_intrinsics() -> None:
    """Register every dot-product intrinsic, the CPU ones and CUDA's dp4a. A tuning database's
    records name the intrinsics their schedules tensorize with, and MetaSchedule rebuilds each
    record's schedule as it opens the database: in a process that has not built an int8 kernel
    yet, opening a database tuned on an int8 model failed ("TensorIntrin 'onnxpress_dot_8x4_avx2'
    is not registered")."""
    from .int8_cuda import register_dp4a

    for isa, lanes in DOT_INTRINSICS:
        intrinsic(isa, lanes)
    register_dp4a()


# -- legalization ------------------------------------------------------------------------------

def _conv_te(data, wp, strides, padding, dilation, pad_value=0):
    from tvm import te, topi

    n, h, w, c = (int(d) for d in data.shape)
    kh, kw, c4, oc, _four = (int(d) for d in wp.shape)
    t, left, b, r = padding
    sh, sw = strides
    dh, dw = dilation
    extra = 4 * c4 - c            # input channels padded to a multiple of 4 (weights there are 0)
    if t or left or b or r or extra:
        data = topi.nn.pad(data, [0, t, left, 0], [0, b, r, extra], pad_value=pad_value, name="pad_int8")
    oh = (h + t + b - (kh - 1) * dh - 1) // sh + 1
    ow = (w + left + r - (kw - 1) * dw - 1) // sw + 1
    rh = te.reduce_axis((0, kh), "rh")
    rw = te.reduce_axis((0, kw), "rw")
    rc = te.reduce_axis((0, c4), "rc")
    rj = te.reduce_axis((0, 4), "rj")
    return te.compute(
        (n, oh, ow, oc),
        lambda nn, yy, xx, ff: te.sum(
            data[nn, yy * sh + rh * dh, xx * sw + rw * dw, rc * 4 + rj].astype("int32")
            * wp[rh, rw, rc, ff, rj].astype("int32"), axis=[rh, rw, rc, rj]),
        name="conv2d_int8", attrs={"schedule_rule": RULE, GEOMETRY: [sh, sw, dh, dw]})


def _shift_te(data):
    from tvm import te

    return te.compute(data.shape, lambda *i: (data(*i).astype("int32") - 128).astype("int8"),
                      name="shift_int8")


def _colsum128_te(wp):
    from tvm import te

    kh, kw, c4, oc, _four = (int(d) for d in wp.shape)
    a, b, c, j = (te.reduce_axis((0, n), k) for n, k in ((kh, "a"), (kw, "b"), (c4, "c"), (4, "j")))
    s = te.compute((oc,), lambda o: te.sum(wp[a, b, c, o, j].astype("int32"), axis=[a, b, c, j]),
                   name="colsum_int8")
    return te.compute((oc,), lambda o: s[o] * 128, name="colsum128_int8")


def _pack_te(weight):
    from tvm import te, tirx

    kh, kw, c, oc = (int(d) for d in weight.shape)
    c4 = (c + 3) // 4
    return te.compute((kh, kw, c4, oc, 4), lambda a, b, g, o, j: tirx.if_then_else(
        g * 4 + j < c, weight[a, b, tirx.min(g * 4 + j, c - 1), o], tirx.const(0, weight.dtype)),
        name="pack_int8")


def _matmul_te(data, wp, pad_value=0):
    from tvm import te, topi

    shape = [int(d) for d in data.shape]
    k = shape[-1]
    c4, n_out, _four = (int(d) for d in wp.shape)
    extra = 4 * c4 - k            # the reduction padded to a multiple of 4 (weights there are 0)
    if extra:
        data = topi.nn.pad(data, [0] * len(shape), [0] * (len(shape) - 1) + [extra],
                           pad_value=pad_value, name="pad_int8")
    rc = te.reduce_axis((0, c4), "rc")
    rj = te.reduce_axis((0, 4), "rj")
    return te.compute(
        (*shape[:-1], n_out),
        lambda *i: te.sum(data[(*i[:-1], rc * 4 + rj)].astype("int32")
                          * wp[rc, i[-1], rj].astype("int32"), axis=[rc, rj]),
        name="matmul_int8", attrs={"schedule_rule": RULE_MATMUL})


def _pack_kn_te(weight):
    """W[k, n] -> Wp[k/4, n, 4] (zero rows past k)."""
    from tvm import te, tirx

    k, n = (int(d) for d in weight.shape)
    c4 = (k + 3) // 4
    return te.compute((c4, n, 4), lambda g, o, j: tirx.if_then_else(
        g * 4 + j < k, weight[tirx.min(g * 4 + j, k - 1), o], tirx.const(0, weight.dtype)),
        name="pack_int8")


def _colsum128_kn_te(wp):
    from tvm import te

    c4, n, _four = (int(d) for d in wp.shape)
    c, j = te.reduce_axis((0, c4), "c"), te.reduce_axis((0, 4), "j")
    s = te.compute((n,), lambda o: te.sum(wp[c, o, j].astype("int32"), axis=[c, j]), name="colsum_int8")
    return te.compute((n,), lambda o: s[o] * 128, name="colsum128_int8")


def legalize_map(target) -> dict:
    """customize_legalize_map for relax.LegalizeOps: NHWC u8 x HWIO i8 -> i32 convolutions (groups
    1, output channels a multiple of the vector width; input channels padded to a multiple of 4
    with zero weights) as the packed
    dot-product convolution above; everything else TVM's default legalization."""
    import tvm

    found = int8_isa(target)
    if found is None:
        return {}
    isa, lanes = found
    default = tvm.ir.Op.get("relax.nn.conv2d").get_attr("FLegalize")

    def conv2d(bb, call):
        attrs = call.attrs
        data, weight = call.args
        try:
            dt, wt = str(data.ty.dtype), str(weight.ty.dtype)
            dshape = [int(d) for d in data.ty.shape]
            wshape = [int(d) for d in weight.ty.shape]
            ok = (dt == "uint8" and wt == "int8" and str(attrs.out_dtype) == "int32"
                  and attrs.data_layout == "NHWC" and attrs.kernel_layout == "HWIO"
                  and str(attrs.out_layout) in ("NHWC", "") and int(attrs.groups) == 1
                  and lanes_for(found, wshape[3]) is not None and wshape[2] == dshape[3])
        except (TypeError, ValueError, AttributeError):
            ok = False
        if not ok:
            return default(bb, call)
        wp = bb.emit_te(_pack_te, weight, primfunc_name_hint="pack_int8")
        geometry = ([int(s) for s in attrs.strides], [int(p) for p in attrs.padding],
                    [int(d) for d in attrs.dilation])
        if isa != "dotprod":
            return bb.call_te(_conv_te, data, wp, *geometry, primfunc_name_hint="conv2d_int8")
        shifted = bb.emit_te(_shift_te, data, primfunc_name_hint="shift_int8")
        conv = bb.emit_te(_conv_te, shifted, wp, *geometry, -128, primfunc_name_hint="conv2d_int8")
        fix = bb.emit_te(_colsum128_te, wp, primfunc_name_hint="colsum_int8")   # a constant
        from tvm import topi

        return bb.call_te(topi.add, conv, fix, primfunc_name_hint="unshift_int8")

    default_mm = tvm.ir.Op.get("relax.matmul").get_attr("FLegalize")

    def matmul(bb, call):
        data, weight = call.args
        try:
            dshape = [int(d) for d in data.ty.shape]
            wshape = [int(d) for d in weight.ty.shape]
            ok = (str(data.ty.dtype) == "uint8" and str(weight.ty.dtype) == "int8"
                  and str(call.attrs.out_dtype) == "int32" and len(wshape) == 2 and len(dshape) >= 2
                  and dshape[-1] == wshape[0] and lanes_for(found, wshape[1]) is not None)
        except (TypeError, ValueError, AttributeError):
            ok = False
        if not ok:
            return default_mm(bb, call)
        wp = bb.emit_te(_pack_kn_te, weight, primfunc_name_hint="pack_int8")
        if isa != "dotprod":
            return bb.call_te(_matmul_te, data, wp, primfunc_name_hint="matmul_int8")
        from tvm import topi

        shifted = bb.emit_te(_shift_te, data, primfunc_name_hint="shift_int8")
        mm = bb.emit_te(_matmul_te, shifted, wp, -128, primfunc_name_hint="matmul_int8")
        fix = bb.emit_te(_colsum128_kn_te, wp, primfunc_name_hint="colsum_int8")   # a constant
        return bb.call_te(topi.add, mm, fix, primfunc_name_hint="unshift_int8")

    return {"relax.nn.conv2d": conv2d, "relax.matmul": matmul}


# -- schedule ----------------------------------------------------------------------------------

def has_int8_conv(func) -> bool:
    from tvm import s_tir

    try:
        sch = s_tir.Schedule(func)
        return _find_block(sch) is not None
    except Exception:
        return False


def _find_block(sch, rules=(RULE, RULE_MATMUL)):
    for block in sch.get_child_blocks(sch.get_sblock("root")):
        if sch.get(block).annotations.get("schedule_rule", None) in rules:
            return block
    return None


def _divisor(extent: int, cap: int) -> int:
    for d in range(min(extent, cap), 0, -1):
        if extent % d == 0:
            return d
    return 1


def schedule_int8_conv(func, target):
    """The fixed schedule of a fused PrimFunc holding a conv2d_int8 block (None: it does not apply)."""
    import tvm
    from tvm import s_tir

    found = int8_isa(target)
    if found is None:
        return None
    from . import amx

    # AMX tiles first where the target has them; a block their intrinsic does not match (e.g. a
    # 1x1 strided conv) gets the dot-product schedule, never the generic one
    for tiles in ((amx, None) if amx.has_amx(target) else (None,)):
        sch = s_tir.Schedule(tvm.IRModule({"main": func}))
        try:
            _apply(sch, found, amx=tiles)
            return sch
        except Exception as exc:
            log.debug("int8 %s schedule does not apply: %s", "AMX" if tiles else "dot-product", exc)
    return None


def _amx_fits(sch, block, amx) -> bool:
    """The unscheduled matmul `block` of `sch` fills whole AMX tile blocks (amx.fits)."""
    *_batch, m, n, rc, _rj = sch.get_loops(block)
    return amx.fits(int(sch.get(m).extent), int(sch.get(n).extent), 4 * int(sch.get(rc).extent))


def _amx_conv(sch, block, amx) -> tuple[tuple, bool] | None:
    """(amx.conv_intrinsic's geometry, weights outermost) of the unscheduled conv `block` of
    `sch` where it fills whole AMX tiles (amx.conv_fits), else None."""
    geometry = sch.get(block).annotations.get(GEOMETRY)
    if geometry is None:
        return None
    _n, _h, w, oc, rh, rw, rc, _rj = sch.get_loops(block)
    kh, kw, c4, width, channels = (int(sch.get(lp).extent) for lp in (rh, rw, rc, w, oc))
    _sh, sw, dh, dw = (int(g) for g in geometry)
    if not amx.conv_fits(width, 4 * c4, channels, kw, dw):
        return None
    return (kh, kw, c4, sw, dh, dw), kh * kw * 4 * c4 * channels >= WEIGHTS_OUTER_BYTES


def _parallel_pads(sch) -> None:
    """The padding blocks of a scheduled conv: rows in parallel."""
    for b in sch.get_child_blocks(sch.get_sblock("root")):
        if "pad" in sch.get(b).name_hint:
            loops = sch.get_loops(b)
            if len(loops) >= 2:
                sch.parallel(sch.fuse(*loops[:2]))


def _apply(sch, found: tuple[str, int], tile: tuple[int, int] | None = None, amx=None) -> None:
    """Schedule the dot-product conv or matmul of `sch` in place; `tile`: (rows, vectors) of the
    register block instead of the one the register file suggests; `amx`: the amx module where
    the target has AMX tiles (matmuls and convs that fill whole tiles run on them, tile=None)."""
    isa = found[0]
    block = _find_block(sch, (RULE_MATMUL,))
    matmul = block is not None
    if not matmul:
        block = _find_block(sch, (RULE,))
    channels, _rows = _extents(sch, block, matmul)
    lanes = lanes_for(found, channels)
    intrin = intrinsic(isa, lanes)
    tiles = amx is not None and tile is None
    conv = _amx_conv(sch, block, amx) if tiles and not matmul else None
    if tiles and matmul and _amx_fits(sch, block, amx):
        sch.unannotate(block, "schedule_rule")
        amx.schedule_matmul(sch, block, _epilogue(sch, block))
    elif conv is not None:
        sch.unannotate(block, "schedule_rule")
        amx.schedule_conv(sch, block, _epilogue(sch, block), *conv)
        _parallel_pads(sch)
    elif matmul:
        _schedule_matmul(sch, intrin, lanes, _registers(isa), tile)
    else:
        _schedule(sch, intrin, lanes, _registers(isa), tile)


def _registers(isa: str) -> int:
    """Vector registers of the ISA's register file (zmm0-31 with AVX-512, v0-31 on aarch64)."""
    return 32 if isa.startswith("avx512") or isa == "dotprod" else 16


def _extents(sch, block, matmul: bool) -> tuple[int, int]:
    """(output channels, rows of the register block) of an unscheduled dot-product block: the
    conv's 4th and 3rd spatial loops (n, h, w, oc, ...), the matmul's last two (..., m, n)."""
    loops = sch.get_loops(block)
    return (int(sch.get(loops[-3 if matmul else -5]).extent),
            int(sch.get(loops[-4 if matmul else -6]).extent))


def _tiles(rows_extent: int, vectors: int, registers: int) -> list[tuple[int, int]]:
    """The register blocks a tuner may try: for each vector count dividing the channels, the
    most rows that fit the register file and half as many; the default (_register_tile) first."""
    budget = registers - 4
    out = [_register_tile(rows_extent, vectors, registers)]
    for v in (4, 3, 2, 1):
        if vectors % v:
            continue
        for cap in (budget // v, budget // v // 2):
            tile = (_divisor(rows_extent, max(1, cap)), v)
            if tile not in out:
                out.append(tile)
    return out


def tuning_rule(sch, block):
    """MetaSchedule's custom rule for the dot-product blocks (their `schedule_rule` annotation):
    the design space is the fixed schedule with each register block of _tiles, so tuning
    measures them and keeps the fastest (the default is one of them). Without it MetaSchedule
    tiled these blocks as generic integer code, never on the dot-product instruction."""
    from tvm.target import Target

    found = int8_isa(Target.current(allow_none=True) or _RULE_TARGET)
    out = []
    if found is not None:
        try:
            matmul = sch.get(block).annotations["schedule_rule"] == RULE_MATMUL
            channels, rows_extent = _extents(sch, block, matmul)
            lanes = lanes_for(found, channels)
            for tile in _tiles(rows_extent, channels // lanes, _registers(found[0])):
                candidate = sch.copy()
                try:
                    _apply(candidate, found, tile)
                    # the schedule is whole (parallel, vectorized, unrolled): the root block's
                    # annotation keeps MetaSchedule's parallel/vectorize rule off it, whose
                    # postprocessor rejected every candidate on the loops already bound
                    candidate.annotate(candidate.get_sblock("root"), "schedule_rule", "None")
                    out.append(candidate)
                except Exception as exc:        # a tile the loops do not take
                    log.debug("int8 tile %s does not apply: %s", tile, exc)
        except Exception as exc:
            log.debug("int8 tuning rule does not apply: %s", exc)
    if not out:
        sch.unannotate(block, "schedule_rule")
        return [sch]
    return out


_RULE_TARGET = None     # the target MetaSchedule generates spaces for (it enters no target scope)


def register_tuning_rules(target=None) -> None:
    """Register tuning_rule for the CPU targets (idempotent); `target`: the one being tuned."""
    import tvm

    global _RULE_TARGET
    if target is not None:
        _RULE_TARGET = target
    for rule in (RULE, RULE_MATMUL):
        tvm.register_global_func(f"s_tir.meta_schedule.cpu.{rule}", tuning_rule, override=True)


def _schedule(sch, intrin: str, lanes: int, registers: int, tile: tuple[int, int] | None = None) -> None:
    conv = _find_block(sch)
    sch.unannotate(conv, "schedule_rule")
    blocks = sch.get_child_blocks(sch.get_sblock("root"))
    # the epilogue (bias, scale, round, clip, cast): every elementwise block after the conv
    # inlined into the last one, which is computed per register tile
    consumers = []
    after = False
    for b in blocks:
        if sch.get(b).same_as(sch.get(conv)):
            after = True
            continue
        if after:
            consumers.append(b)
    for b in consumers[:-1]:
        sch.compute_inline(b)
    last = consumers[-1] if consumers else None

    n, h, w, oc, rh, rw, rc, rj = sch.get_loops(conv)
    ow = int(sch.get(w).extent)
    vectors = int(sch.get(oc).extent) // lanes
    # register tile: rows x vectors accumulators, leaving room for weights and the broadcast
    rows, v = tile or _register_tile(ow, vectors, registers)
    wo, wi = sch.split(w, [None, rows])
    oo, ov, ol = sch.split(oc, [None, v, lanes])
    weight_bytes = 1
    for lp in (rh, rw, rc, rj, oc):
        weight_bytes *= int(sch.get(lp).extent) if lp is not oc else int(sch.get(ov).extent) * lanes * int(sch.get(oo).extent)
    if weight_bytes >= WEIGHTS_OUTER_BYTES:
        # weights bigger than L2: output-channel blocks outermost, so each block's weights
        # (kh*kw*ic*V*L bytes) come from memory once and are reused from L2 over every output
        # row, instead of the whole tensor streaming once per row (resnet18's 512-channel 3x3
        # convs: 2.4 MB per row; 1.7 ms instead of 2-3.8 ms)
        sch.reorder(oo, n, h, wo, rh, rw, rc, wi, ov, ol, rj)
        tile, outer = wo, (oo, n, h)
    else:
        # small weights stay in L1/L2 anyway: rows outermost, the input rows shared by all blocks
        sch.reorder(n, h, wo, oo, rh, rw, rc, wi, ov, ol, rj)
        tile, outer = oo, (n, h)
    if last is not None:
        sch.reverse_compute_at(last, tile, preserve_unit_loops=True)
        loops = sch.get_loops(last)
        inner = loops[-1]
        extent = int(sch.get(inner).extent)
        if extent > lanes and extent % lanes == 0:
            inner = sch.split(inner, [None, lanes])[1]
        sch.vectorize(inner)
    par = sch.fuse(*outer)
    sch.parallel(par)
    init = sch.decompose_reduction(conv, rh)
    sch.vectorize(sch.get_loops(init)[-1])
    sch.tensorize(ol, intrin)
    sch.unroll(wi)
    sch.unroll(ov)
    _parallel_pads(sch)


def _epilogue(sch, main):
    """Every block after `main` inlined into the last one, which is returned (None: no epilogue)."""
    blocks = sch.get_child_blocks(sch.get_sblock("root"))
    consumers, after = [], False
    for b in blocks:
        if sch.get(b).same_as(sch.get(main)):
            after = True
        elif after:
            consumers.append(b)
    for b in consumers[:-1]:
        sch.compute_inline(b)
    return consumers[-1] if consumers else None


def _register_tile(m: int, vectors: int, registers: int) -> tuple[int, int]:
    """(rows, vectors) of the accumulator tile: as many accumulators as fit, leaving room for
    the weights and the broadcast input."""
    budget = registers - 4
    best = (1, 1)
    for v in (4, 3, 2, 1):
        if vectors % v:
            continue
        rows = _divisor(m, max(1, budget // v))
        if rows * v > best[0] * best[1]:
            best = (rows, v)
    return best


def _schedule_matmul(sch, intrin: str, lanes: int, registers: int,
                     tile: tuple[int, int] | None = None) -> None:
    """out[..., m, n] = sum_{c4, j} x[..., m, 4*c4+j] * Wp[c4, n, j]:

        parallel (batch, n / (V*L)) | m / R | c4 | R rows x V vectors of L lanes (intrinsic)

    Column strips run in parallel so that each core streams its strip of the packed weights
    (K*V*L bytes) from L1 while the rows of x come from L2; the epilogue (bias, scale,
    requantize) is computed per register tile."""
    mm = _find_block(sch, (RULE_MATMUL,))
    sch.unannotate(mm, "schedule_rule")
    last = _epilogue(sch, mm)
    loops = sch.get_loops(mm)
    *batch, m, n, rc, rj = loops
    rows, v = tile or _register_tile(int(sch.get(m).extent), int(sch.get(n).extent) // lanes, registers)
    mo, mi = sch.split(m, [None, rows])
    no, ov, ol = sch.split(n, [None, v, lanes])
    sch.reorder(*batch, no, mo, rc, mi, ov, ol, rj)
    if last is not None:
        try:
            sch.reverse_compute_at(last, mo, preserve_unit_loops=True)
            inner = sch.get_loops(last)[-1]
            extent = int(sch.get(inner).extent)
            if extent > lanes and extent % lanes == 0:
                inner = sch.split(inner, [None, lanes])[1]
            sch.vectorize(inner)
        except Exception as exc:       # an epilogue that does not follow the tile: on its own
            log.debug("int8 matmul epilogue stays at the root: %s", exc)
    par = sch.fuse(*batch, no) if batch else no
    sch.parallel(par)
    init = sch.decompose_reduction(mm, rc)
    sch.vectorize(sch.get_loops(init)[-1])
    sch.tensorize(ol, intrin)
    sch.unroll(mi)
    sch.unroll(ov)
    for b in sch.get_child_blocks(sch.get_sblock("root")):
        if "pad" in sch.get(b).name_hint or "shift" in sch.get(b).name_hint:
            loops = sch.get_loops(b)
            if len(loops) >= 2:
                sch.parallel(sch.fuse(*loops[:-1]))
