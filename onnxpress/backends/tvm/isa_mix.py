"""The instruction mix of an artifact's kernels: a static cost estimate for builds without a board.

    model.so --objdump -d (aarch64-linux-gnu-objdump / objdump)--> functions by symbol
      X_compute_ (+ its parallel-lambda bodies, unnamed, inside its range) --> kernel X
      __tvm_ffi_X (argument checks), CRT and runtime helpers                --> left out
    each instruction --> vector (v/q/z registers; xmm/ymm/zmm packed) | scalar FP | branch | other
    scalar FP loads read next as a vector lane (ldr s28 ... v28.s[0])  --> vector
    per kernel and its inner loop: vector share, vector FMAs, lanes and loads per FMA;
    kernels ranked by estimated FLOPs

A schedule change that leaves a convolution's loops scalar shows up here as `fmadd` (one lane)
instead of `fmla v.4s` (four): a vector-FMA share near zero and more loads per FMA, long before
anyone times it on a board. (The share of vector instructions alone drops less: LLVM vectorises
the copies and padding of unscheduled code on its own.)

What "hot" means: with the ONNX model at hand (given, or the manifest's `source_model`), each
kernel is weighted by TVM's FLOP estimate of its fused PrimFunc (`estimate_tir_flops`) times the
number of calls in the model, from the same lowering compile() runs; without it, by the
multiply-accumulate lanes in its code (a code-size proxy, `weighted_by` says which). The hot
kernels are the heaviest ones that together make up HOT_SHARE of the weight.

This is static: instructions in the code, not instructions executed, and no timing. Loop bodies
count once whatever their trip count, so prologues and boundary code weigh as much as the inner
loop; the figures say whether the code is vector code, not how fast it runs.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from onnxpress.errors import BackendError

HOT_SHARE = 0.9

ELF_MACHINES = {183: "aarch64", 62: "x86_64"}
OBJDUMPS = {"aarch64": ("aarch64-linux-gnu-objdump", "objdump"),
            "x86_64": ("x86_64-linux-gnu-objdump", "objdump")}

_FUNCTION = re.compile(r"^([0-9a-f]+) <(.+)>:$")
_INSTRUCTION = re.compile(r"^\s*([0-9a-f]+):\s+(\S+)\s*(.*)$")
_KERNEL = re.compile(r"^(.+?)_compute_")
_WRAPPER = "__tvm_ffi_"


# -- classification -------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Instruction:
    """One instruction's class: kind is "vector", "scalar_fp", "branch" or "other"; macs is the
    multiply-accumulates it does (fmla v.4s: 4, sdot v.4s: 16, fmadd s: 1, others 0)."""

    kind: str
    load: bool = False
    store: bool = False
    macs: int = 0


_A64_VECTOR = re.compile(r"\b(?:v(?:[12]?\d|3[01])\.(\d*)([bhsdq])\b|q(?:[12]?\d|3[01])\b|z(?:[12]?\d|3[01])\.[bhsdq]\b)")
_A64_SCALAR_FP = re.compile(r"\b[bhsd](?:[12]?\d|3[01])\b")
_A64_BRANCHES = {"b", "bl", "blr", "br", "ret", "cbz", "cbnz", "tbz", "tbnz", "braa", "blraa", "retaa"}
_A64_FMA = re.compile(r"^(?:fmla|fmls|bfmla|mla|mls|[su]mlal2?|[su]mlsl2?|f[n]?m(?:add|sub)|"
                      r"[su]dot|usdot|bfdot|[su]mmla|usmmla|bfmmla)$")


def classify_aarch64(mnemonic: str, operands: str) -> Instruction:
    """Class of one AArch64 instruction as objdump prints it (operands without comments)."""
    m = mnemonic.lower()
    if m in _A64_BRANCHES or m.startswith("b."):
        return Instruction("branch")
    load = m.startswith("ld") and not m.startswith("ldadd")
    store = m.startswith("st")
    if m in ("adr", "adrp"):
        return Instruction("other")
    if _A64_VECTOR.search(operands):
        return Instruction("vector", load, store, _a64_vector_macs(m, operands) if _A64_FMA.match(m) else 0)
    if _A64_SCALAR_FP.search(operands):
        fma = m in ("fmadd", "fmsub", "fnmadd", "fnmsub")
        return Instruction("scalar_fp", load, store, 1 if fma else 0)
    return Instruction("other", load, store)


def _a64_vector_macs(m: str, operands: str) -> int:
    """Multiply-accumulates of a vector FMA-like instruction, from its destination arrangement."""
    first = operands.split(",")[0]
    arr = _A64_VECTOR.search(first)
    if arr is None or not arr.group(2):       # a q register or SVE: one 128-bit register's worth
        lanes = 4
    else:
        lanes = int(arr.group(1)) if arr.group(1) else 1     # v0.4s: 4; an element, v0.s[1]: 1
    if m in ("sdot", "udot", "usdot", "bfdot"):
        return lanes * (4 if m != "bfdot" else 2)
    if m in ("smmla", "ummla", "usmmla"):
        return 32
    if m == "bfmmla":
        return 16
    return lanes


_X86_VREG = re.compile(r"%([xyz])mm\d+")
_X86_BITS = {"x": 128, "y": 256, "z": 512}
_X86_SCALAR = re.compile(r"^(?!v?p)v?\w*?(ss|sd)[lq]?$")
_X86_FMA = re.compile(r"^v?f(?:n)?m(?:add|sub|addsub|subadd)(?:132|213|231)([ps])([sdh])$")
_X86_DOT = {"vpdpbusd": (32, 4), "vpdpbusds": (32, 4), "vpdpwssd": (32, 2), "vpdpwssds": (32, 2),
            "vpmaddubsw": (16, 2), "pmaddubsw": (16, 2), "vpmaddwd": (32, 2), "pmaddwd": (32, 2)}
_X86_PREFIXES = {"lock", "rep", "repz", "repnz", "repe", "repne", "notrack", "data16", "cs", "ds", "bnd"}


def _x86_operands(operands: str) -> list[str]:
    parts, depth, cur = [], 0, ""
    for ch in operands:
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append(cur.strip())
            cur = ""
        else:
            cur += ch
    if cur.strip():
        parts.append(cur.strip())
    return parts


def classify_x86(mnemonic: str, operands: str) -> Instruction:
    """Class of one x86-64 instruction in objdump's AT&T syntax (destination last)."""
    m = mnemonic.lower()
    if m.startswith(("j", "call", "ret", "loop")):
        return Instruction("branch")
    ops = _x86_operands(operands)
    memory = [i for i, o in enumerate(ops) if "(" in o]
    if m.startswith(("lea", "nop")) or not memory:
        load = store = False
    else:
        store = len(ops) > 1 and memory[-1] == len(ops) - 1
        load = any(i < len(ops) - 1 for i in memory) or len(ops) == 1
    widths = [_X86_BITS[r] for r in _X86_VREG.findall(operands)]
    if not widths:
        return Instruction("other", load, store)
    bits = max(widths)
    broadcast = m.startswith(("vbroadcast", "vpbroadcast"))
    if _X86_SCALAR.match(m) and bits == 128 and not broadcast:
        fma = _X86_FMA.match(m)
        return Instruction("scalar_fp", load, store, 1 if fma else 0)
    macs = 0
    fma = _X86_FMA.match(m)
    if fma:
        macs = bits // {"s": 32, "d": 64, "h": 16}[fma.group(2)]
    elif m in _X86_DOT:
        lane_bits, per_lane = _X86_DOT[m]
        macs = bits // lane_bits * per_lane
    return Instruction("vector", load, store, macs)


CLASSIFIERS = {"aarch64": classify_aarch64, "x86_64": classify_x86}


# -- figures --------------------------------------------------------------------------------------
@dataclasses.dataclass
class Mix:
    """Instruction counts of a stretch of code and the ratios the cost estimate reports."""

    instructions: int = 0
    vector: int = 0
    scalar_fp: int = 0
    branches: int = 0
    other: int = 0
    loads: int = 0
    data_loads: int = 0          # loads into SIMD/FP registers (operands, spills), not pointers
    vector_loads: int = 0
    stores: int = 0
    fma: int = 0                 # FMA-like instructions (fmla, fmadd, sdot, vfmadd231ps, ...)
    vector_fma: int = 0
    fma_lanes: int = 0           # multiply-accumulates those instructions do

    def add(self, ins: Instruction) -> None:
        self.instructions += 1
        if ins.kind == "vector":
            self.vector += 1
        elif ins.kind == "scalar_fp":
            self.scalar_fp += 1
        elif ins.kind == "branch":
            self.branches += 1
        else:
            self.other += 1
        self.loads += ins.load
        self.data_loads += ins.load and ins.kind in ("vector", "scalar_fp")
        self.vector_loads += ins.load and ins.kind == "vector"
        self.stores += ins.store
        if ins.macs:
            self.fma += 1
            self.vector_fma += ins.kind == "vector"
            self.fma_lanes += ins.macs

    @property
    def vector_share(self) -> float:
        """Vector instructions over all SIMD/FP instructions (vector + scalar FP): the integer
        address arithmetic and loop control are there in scalar and vector code alike."""
        simd_fp = self.vector + self.scalar_fp
        return self.vector / simd_fp if simd_fp else 0.0

    @property
    def vector_share_of_all(self) -> float:
        """Vector instructions over every instruction, integer ones included."""
        return self.vector / self.instructions if self.instructions else 0.0

    @property
    def vector_fma_share(self) -> float | None:
        """Vector FMAs over all FMA instructions: LLVM vectorises copies and padding on its own, so
        a kernel left scalar can still be mostly vector instructions; its FMAs are not."""
        return self.vector_fma / self.fma if self.fma else None

    @property
    def loads_per_fma(self) -> float | None:
        """SIMD/FP loads per FMA instruction (None without FMAs): a register-blocked loop loads
        each weight vector and input value once for several FMAs (NEON 7x2 block: 9 loads, 14
        FMAs); an unblocked or scalar loop needs one or two per FMA, spilled accumulators more."""
        return self.data_loads / self.fma if self.fma else None

    @property
    def lanes_per_fma(self) -> float | None:
        """Multiply-accumulates per FMA instruction: 4 for NEON fp32, 8/16 for AVX2/AVX-512, 1 scalar."""
        return self.fma_lanes / self.fma if self.fma else None

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        for key in ("vector_share", "vector_share_of_all", "vector_fma_share", "loads_per_fma",
                    "lanes_per_fma"):
            value = getattr(self, key)
            d[key] = None if value is None else round(value, 4)
        return d


@dataclasses.dataclass
class LoopMix(Mix):
    """An innermost loop: the code between a backward branch's target and the branch."""

    start: int = 0
    end: int = 0


@dataclasses.dataclass
class KernelMix(Mix):
    """The instruction mix of one kernel (its `_compute_` function and parallel-lambda bodies),
    and of its inner loop: the innermost loop with the most multiply-accumulate lanes."""

    name: str = ""
    flops: float | None = None   # TVM's estimate for the model's calls of this kernel
    calls: int | None = None
    weight: float = 0.0          # what ranks it: flops, or fma_lanes without the model
    loop: LoopMix | None = None

    def to_dict(self) -> dict:
        d = super().to_dict()
        d["loop"] = self.loop.to_dict() if self.loop is not None else None
        return d


@dataclasses.dataclass
class InstructionMix:
    """Per-kernel instruction mixes of one library, heaviest first (see the module docstring)."""

    library: str
    arch: str
    objdump: str
    weighted_by: str                       # "flops" (TVM's estimate) or "fma_lanes" (static)
    kernels: list[KernelMix]

    @property
    def hot(self) -> list[KernelMix]:
        """The heaviest kernels that together make up HOT_SHARE of the total weight."""
        total = sum(k.weight for k in self.kernels)
        out, acc = [], 0.0
        for k in self.kernels:
            if total <= 0 or acc >= HOT_SHARE * total or k.weight <= 0:
                break
            out.append(k)
            acc += k.weight
        return out

    def hottest(self, contains: str = "conv") -> KernelMix:
        """The heaviest kernel whose name contains `contains` (e.g. the hottest convolution)."""
        for k in self.kernels:
            if contains in k.name:
                return k
        raise BackendError(f"{self.library} has no kernel named like '{contains}' "
                           f"(kernels: {', '.join(k.name for k in self.kernels)})")

    def _weighted(self, value) -> float | None:
        pairs = [(k.weight, value(k)) for k in self.hot if value(k) is not None]
        total = sum(w for w, _ in pairs)
        return sum(w * v for w, v in pairs) / total if total else None

    @property
    def hot_vector_share(self) -> float | None:
        """Vector share of the hot kernels, each weighted by its weight."""
        return self._weighted(lambda k: k.vector_share)

    @property
    def hot_loads_per_fma(self) -> float | None:
        """Loads per FMA instruction of the hot kernels, each weighted by its weight."""
        return self._weighted(lambda k: k.loads_per_fma)

    @property
    def hot_vector_fma_share(self) -> float | None:
        """Share of vector FMAs in the hot kernels, each weighted by its weight."""
        return self._weighted(lambda k: k.vector_fma_share)

    @property
    def hot_loop_loads_per_fma(self) -> float | None:
        """Loads per FMA in the hot kernels' inner loops (the steady state), weighted."""
        return self._weighted(lambda k: k.loop.loads_per_fma if k.loop is not None else None)

    @property
    def hot_lanes_per_fma(self) -> float | None:
        """Multiply-accumulates per FMA instruction in the hot kernels, each weighted by its weight."""
        return self._weighted(lambda k: k.lanes_per_fma)

    def summary(self) -> str:
        """One line for a bench row or the compile output."""
        share, loads, lanes = self.hot_vector_share, self.hot_loads_per_fma, self.hot_lanes_per_fma
        if share is None:
            return f"{self.arch}: no kernel with a weight"
        fma, loop = self.hot_vector_fma_share, self.hot_loop_loads_per_fma

        def fmt(v):
            return "-" if v is None else f"{v:.2f}"

        return (f"{len(self.hot)} hot kernel(s) ({self.arch}, by {self.weighted_by}): "
                f"{100 * share:.0f}% vector SIMD/FP instructions, {100 * (fma or 0):.0f}% vector FMAs, "
                f"{lanes or 0:.1f} lanes/FMA, {fmt(loads)} loads/FMA ({fmt(loop)} in the inner loops)")

    def table(self, top: int = 10) -> str:
        """Fixed-width table of the heaviest `top` kernels (0: all)."""
        total = sum(k.weight for k in self.kernels) or 1.0
        rows = [f"{'kernel':40s} {'weight':>7s} {'instr':>6s} {'simd/fp':>7s} {'vector':>7s} "
                f"{'FMA':>5s} {'vec.FMA':>7s} {'lanes':>5s} {'ld/FMA':>7s} {'loop':>5s} {'ld/FMA':>7s}"]

        def pct(v):
            return "-" if v is None else f"{100 * v:.1f}%"

        def num(v, digits=2):
            return "-" if v is None else f"{v:.{digits}f}"

        for k in self.kernels[: top or None]:
            loop = k.loop
            rows.append(f"{k.name[:40]:40s} {100 * k.weight / total:6.1f}% {k.instructions:6d} "
                        f"{k.vector + k.scalar_fp:7d} {pct(k.vector_share):>7s} {k.fma:5d} "
                        f"{pct(k.vector_fma_share):>7s} {num(k.lanes_per_fma, 1):>5s} "
                        f"{num(k.loads_per_fma):>7s} {loop.instructions if loop else '-':>5} "
                        f"{num(loop.loads_per_fma if loop else None):>7s}")
        return "\n".join(rows)

    def to_dict(self) -> dict:
        return {"library": self.library, "arch": self.arch, "objdump": self.objdump,
                "weighted_by": self.weighted_by, "hot_share": HOT_SHARE,
                "hot": [k.name for k in self.hot],
                "hot_vector_share": self.hot_vector_share,
                "hot_vector_fma_share": self.hot_vector_fma_share,
                "hot_loads_per_fma": self.hot_loads_per_fma,
                "hot_loop_loads_per_fma": self.hot_loop_loads_per_fma,
                "hot_lanes_per_fma": self.hot_lanes_per_fma,
                "kernels": [k.to_dict() for k in self.kernels]}


# -- disassembly ----------------------------------------------------------------------------------
def elf_arch(library: str | os.PathLike) -> str:
    """"aarch64" or "x86_64" from the ELF header's e_machine."""
    try:
        with open(library, "rb") as f:
            head = f.read(20)
    except OSError as exc:
        raise BackendError(f"cannot read {library}: {exc}") from None
    if head[:4] != b"\x7fELF":
        raise BackendError(f"{library} is not an ELF shared library")
    machine = int.from_bytes(head[18:20], "little")
    if machine not in ELF_MACHINES:
        raise BackendError(f"{library}: ELF machine {machine} has no instruction classifier "
                           f"(supported: aarch64, x86_64)")
    return ELF_MACHINES[machine]


def find_objdump(arch: str) -> str:
    """The cross objdump for `arch`, or the plain one when this host is `arch`."""
    import platform

    host = {"arm64": "aarch64", "amd64": "x86_64"}.get(platform.machine().lower(), platform.machine().lower())
    for name in OBJDUMPS[arch]:
        if name == "objdump" and host != arch:
            continue
        if shutil.which(name):
            return name
    raise BackendError(f"disassembling {arch} code needs {OBJDUMPS[arch][0]} (Debian: "
                       f"binutils-{arch.replace('_', '-')}-linux-gnu)")


def disassemble(library: str | os.PathLike, objdump: str) -> str:
    proc = subprocess.run([objdump, "-d", "--no-show-raw-insn", str(library)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise BackendError(f"{objdump} -d {library} failed: {proc.stderr.strip()[:200]}")
    return proc.stdout


def _strip_comment(operands: str, arch: str) -> str:
    operands = re.sub(r"<[^>]*>", "", operands)
    return operands.split("//")[0] if arch == "aarch64" else operands.split("#")[0]


Body = list[tuple[int, str, str]]          # (address, mnemonic, operands)


def _lane_loads(body: Body, classes: list[Instruction]) -> None:
    """NEON's by-element idiom: `ldr s28, [x19]` then `fmla v1.4s, v26.4s, v28.s[0]` broadcasts
    one input value across a vector FMA. Such a scalar-register load feeds vector work, so it
    counts as vector when the next instruction naming its register(s), in code order, reads them
    as a vector lane. Rewrites `classes` in place."""
    for i, ((_a, _m, operands), ins) in enumerate(zip(body, classes)):
        if not (ins.load and ins.kind == "scalar_fp"):
            continue
        regs = re.findall(r"\b[bhsd]((?:[12]?\d|3[01]))\b", operands.split("[")[0])
        if regs and all(_next_use_is_lane(body, i, r) for r in regs):
            classes[i] = dataclasses.replace(ins, kind="vector")


def _next_use_is_lane(body: Body, i: int, reg: str, horizon: int = 64) -> bool:
    any_view = re.compile(rf"\b(?:[bhsdq]{reg}\b|v{reg}\.)")
    lane = re.compile(rf"\bv{reg}\.\d*[bhsd]\[")
    for _a, _m, operands in body[i + 1: i + 1 + horizon]:
        if any_view.search(operands):
            return bool(lane.search(operands))
    return False


def _inner_loop(body: Body, classes: list[Instruction]) -> LoopMix | None:
    """The innermost loop (a backward branch's range holding no other such range) with the most
    multiply-accumulate lanes; None when no loop has an FMA."""
    loops = []
    for (addr, _m, operands), ins in zip(body, classes):
        target = re.search(r"(?:^|[\s,])([0-9a-f]+)\s*$", operands) if ins.kind == "branch" else None
        if target and int(target.group(1), 16) < addr:
            loops.append((int(target.group(1), 16), addr))
    innermost = [(a, b) for a, b in loops
                 if not any((c, d) != (a, b) and a <= c and d <= b for c, d in loops)]
    best = None
    for a, b in innermost:
        loop = LoopMix(start=a, end=b)
        for (addr, _m, _o), ins in zip(body, classes):
            if a <= addr <= b:
                loop.add(ins)
        if loop.fma_lanes and (best is None or (loop.fma_lanes, loop.instructions)
                               > (best.fma_lanes, best.instructions)):
            best = loop
    return best


def kernel_mixes(text: str, arch: str) -> dict[str, KernelMix]:
    """{kernel name: KernelMix} from objdump -d text. A kernel is a `NAME_compute_` function; the
    bodies of its parallel loops have no symbol of their own and follow it, so they count in its
    range. `__tvm_ffi_NAME` (argument unpacking) and runtime/CRT functions are left out."""
    classify = CLASSIFIERS[arch]
    bodies: dict[str, Body] = {}
    current: Body | None = None
    for line in text.splitlines():
        head = _FUNCTION.match(line)
        if head:
            symbol = head.group(2)
            name = _KERNEL.match(symbol)
            current = bodies.setdefault(name.group(1), []) \
                if name and not symbol.startswith(_WRAPPER) else None
            continue
        if current is None:
            continue
        ins = _INSTRUCTION.match(line)
        if not ins:
            continue
        mnemonic, operands = ins.group(2), ins.group(3)
        while arch == "x86_64" and mnemonic in _X86_PREFIXES and operands:
            mnemonic, _, operands = operands.partition(" ")
        if mnemonic.startswith(("(bad)", ".")):
            continue
        current.append((int(ins.group(1), 16), mnemonic, _strip_comment(operands, arch).strip()))
    kernels = {}
    for name, body in bodies.items():
        classes = [classify(m, ops) for _a, m, ops in body]
        if arch == "aarch64":
            _lane_loads(body, classes)
        kernels[name] = mix = KernelMix(name=name)
        for ins in classes:
            mix.add(ins)
        mix.loop = _inner_loop(body, classes)
    return kernels


# -- weights --------------------------------------------------------------------------------------
def kernel_flops(model, manifest: Mapping[str, Any]) -> dict[str, tuple[float, int]]:
    """{kernel name: (FLOPs over all its calls, calls)} from the lowering compile() runs (same
    target, shapes and fast-math setting as the artifact's manifest), by TVM's estimate."""
    import tvm
    from tvm import relax
    from tvm.s_tir.analysis import estimate_tir_flops

    from onnxpress.io import load

    from .compiler import lower_to_fused
    from .frontend import bind_shapes, to_relax
    from .targets import resolve_target

    proto = load(model, check=False)
    spec = dict(manifest["target"]["spec"])
    resolved = resolve_target(spec)
    target = resolved.tvm_target()
    shapes = {i["name"]: i["shape"] for i in manifest["inputs"]}
    # compile()'s default; an artifact built with integer=False says so nowhere, and its float
    # kernels then carry other names: those kernels keep no weight
    relax_mod = to_relax(proto, bind_shapes(proto, shapes), integer=True, decisions=[], target=target)
    fast_math = bool((manifest.get("schedules") or {}).get("fast_math", True))
    fused = lower_to_fused(relax_mod, resolved, target, {}, fast_math=fast_math)
    calls: dict[str, int] = {}

    def visit(expr):
        if isinstance(expr, relax.Call) and getattr(expr.op, "name", "") == "relax.call_tir":
            name = expr.args[0].name_hint
            calls[name] = calls.get(name, 0) + 1

    relax.analysis.post_order_visit(fused["main"], visit)
    out = {}
    for gv, func in fused.functions_items():
        if isinstance(func, tvm.tirx.PrimFunc):
            try:
                flops = float(estimate_tir_flops(tvm.IRModule({"main": func})))
            except Exception:
                flops = 0.0
            n = calls.get(gv.name_hint, 1)
            out[gv.name_hint] = (flops * n, n)
    return out


def instruction_mix(artifact, model=None, *, weigh: bool = True) -> InstructionMix:
    """The instruction mix of an artifact's kernels (an Artifact, an artifact directory or a
    model.so path). model: the ONNX model it was compiled from, to weigh kernels by FLOPs
    (default: the manifest's source_model when that file exists); weigh=False, or no model,
    ranks them by the multiply-accumulate lanes in their code instead."""
    from .artifact import Artifact

    manifest = None
    if isinstance(artifact, Artifact):
        library, manifest = artifact.library, artifact.manifest
    else:
        path = Path(artifact)
        if path.is_dir():
            art = Artifact(path)
            library, manifest = art.library, art.manifest
        else:
            library = path
    if manifest is not None and manifest["target"].get("family") == "gpu":
        raise BackendError(f"{library}: the instruction mix covers CPU kernels; CUDA kernels are "
                           "in kernels.ptx")
    if not Path(library).exists():
        raise BackendError(f"{library} does not exist")
    arch = elf_arch(library)
    objdump = find_objdump(arch)
    kernels = kernel_mixes(disassemble(library, objdump), arch)
    if not kernels:
        raise BackendError(f"{library} has no TVM kernel functions (symbols NAME_compute_)")
    if model is None and manifest is not None and manifest.get("source_model"):
        if Path(manifest["source_model"]).exists():
            model = manifest["source_model"]
    weighted_by = "fma_lanes"
    if weigh and model is not None and manifest is not None:
        flops = kernel_flops(model, manifest)
        matched = [k for k in kernels if k in flops]
        if matched:
            weighted_by = "flops"
            for name, k in kernels.items():
                k.flops, k.calls = flops.get(name, (0.0, None))
                k.weight = k.flops
    if weighted_by == "fma_lanes":
        for k in kernels.values():
            k.weight = float(k.fma_lanes)
    ranked = sorted(kernels.values(), key=lambda k: (-k.weight, -k.instructions, k.name))
    return InstructionMix(str(library), arch, objdump, weighted_by, ranked)
