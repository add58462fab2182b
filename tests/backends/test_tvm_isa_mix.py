"""The instruction mix of compiled kernels (onnxpress/backends/tvm/isa_mix.py): the classifier on
hand-written objdump text, then the digits CNN cross-compiled for aarch64, whose hottest conv must
be NEON code, and the same model with the default schedules switched off, which must fail that."""

from __future__ import annotations

import importlib.util
import json
import shutil

import pytest

from onnxpress.backends.tvm.isa_mix import CLASSIFIERS, kernel_mixes

# A 4-row x 1-register NEON register block, as the default schedules emit it for an NHWC conv.
NEON_CONV = """
00000000000059b0 <fused_conv2d_add_relu_compute_>:
    59b0:\tsub\tsp, sp, #0x30
    5a28:\tldr\tq17, [x18]
    5a34:\tldp\ts19, s20, [x17, #-32]
    5a38:\tldp\ts21, s22, [x17, #-24]
    5a40:\tfmla\tv5.4s, v17.4s, v19.s[0]
    5a44:\tfmla\tv6.4s, v17.4s, v20.s[0]
    5a48:\tfmla\tv3.4s, v17.4s, v21.s[0]
    5a4c:\tfmla\tv2.4s, v17.4s, v22.s[0]
    5ae0:\tfmaxnm\tv16.4s, v16.4s, v0.4s
    5b00:\tstr\tq16, [x14]
    5b20:\tb.eq\t5d20 <fused_conv2d_add_relu_compute_+0x370>  // b.none
    5b24:\tadd\tw8, w8, #0x1
000000000000627c <__tvm_ffi_fused_conv2d_add_relu>:
    627c:\tldr\tx8, [x0]
    6280:\tfmadd\ts0, s1, s2, s0
"""

# The same conv left scalar: one output element per fmadd, two loads for each.
SCALAR_CONV = """
00000000000059b0 <fused_conv2d_add_relu_compute_>:
    59b0:\tldr\ts1, [x9, x10, lsl #2]
    59b4:\tldr\ts2, [x11], #4
    59b8:\tfmadd\ts0, s1, s2, s0
    59bc:\tldr\ts1, [x9, #4]
    59c0:\tldr\ts2, [x11], #4
    59c4:\tfmadd\ts0, s1, s2, s0
    59c8:\tadd\tx10, x10, #0x1
    59cc:\tcmp\tx10, #0x90
    59d0:\tb.ne\t59b0 <fused_conv2d_add_relu_compute_>  // b.any
    59d4:\tfmaxnm\ts0, s0, s3
    59d8:\tstr\ts0, [x12]
"""


def test_neon_register_block_is_vector_code():
    k = kernel_mixes(NEON_CONV, "aarch64")
    assert list(k) == ["fused_conv2d_add_relu"]          # the __tvm_ffi_ wrapper is left out
    conv = k["fused_conv2d_add_relu"]
    # ldp s19, s20 feed fmla's by-element operand (v19.s[0]): lane loads, counted as vector
    assert (conv.instructions, conv.vector, conv.scalar_fp, conv.branches, conv.other) == (12, 9, 0, 1, 2)
    assert (conv.fma, conv.vector_fma, conv.fma_lanes) == (4, 4, 16)
    assert (conv.loads, conv.vector_loads, conv.stores) == (3, 3, 1)
    assert conv.loads_per_fma == pytest.approx(0.75) and conv.lanes_per_fma == 4.0
    assert conv.vector_fma_share == 1.0 and conv.vector_share == 1.0


def test_scalar_fmadd_loop_is_flagged_scalar():
    conv = kernel_mixes(SCALAR_CONV, "aarch64")["fused_conv2d_add_relu"]
    assert conv.vector == 0 and conv.scalar_fp == 8
    assert conv.vector_share == 0.0 and conv.vector_fma_share == 0.0
    assert (conv.fma, conv.fma_lanes, conv.loads_per_fma) == (2, 2, 2.0)
    # the inner loop: from the b.ne's target (59b0) to the b.ne, the fmaxnm/str after it excluded
    assert (conv.loop.start, conv.loop.end, conv.loop.instructions) == (0x59b0, 0x59d0, 9)
    assert conv.loop.loads_per_fma == 2.0 and conv.loop.lanes_per_fma == 1.0


@pytest.mark.parametrize("arch, mnemonic, operands, kind, macs, load, store", [
    ("aarch64", "fmla", "v0.4s, v1.4s, v2.s[1]", "vector", 4, False, False),
    ("aarch64", "fmla", "v0.2d, v1.2d, v2.2d", "vector", 2, False, False),
    ("aarch64", "sdot", "v0.4s, v1.16b, v2.4b[0]", "vector", 16, False, False),
    ("aarch64", "ld1", "{v0.4s, v1.4s}, [x0], #32", "vector", 0, True, False),
    ("aarch64", "ldr", "q3, [x1, #16]", "vector", 0, True, False),
    ("aarch64", "stp", "q0, q1, [x2]", "vector", 0, False, True),
    ("aarch64", "fmadd", "d0, d1, d2, d0", "scalar_fp", 1, False, False),
    ("aarch64", "ldr", "s4, [x3]", "scalar_fp", 0, True, False),
    ("aarch64", "madd", "x0, x1, x2, x0", "other", 0, False, False),
    ("aarch64", "ldr", "x8, [x8, #4056]", "other", 0, True, False),
    ("aarch64", "bl", "5164", "branch", 0, False, False),
    ("x86_64", "vfmadd231ps", "%ymm9,%ymm1,%ymm0", "vector", 8, False, False),
    ("x86_64", "vfmadd231ps", "(%rax){1to16},%zmm1,%zmm0", "vector", 16, True, False),
    ("x86_64", "vfmadd231ss", "%xmm2,%xmm1,%xmm0", "scalar_fp", 1, False, False),
    ("x86_64", "vbroadcastss", "0x10(%rdi),%ymm3", "vector", 0, True, False),
    ("x86_64", "vmovups", "%ymm2,0xf0(%rsp)", "vector", 0, False, True),
    ("x86_64", "vpminsd", "%ymm1,%ymm2,%ymm3", "vector", 0, False, False),
    ("x86_64", "vpdpbusd", "%zmm1,%zmm2,%zmm3", "vector", 64, False, False),
    ("x86_64", "vmovss", "(%rax),%xmm0", "scalar_fp", 0, True, False),
    ("x86_64", "lea", "(%r15,%rax,4),%rdi", "other", 0, False, False),
    ("x86_64", "mov", "0x48(%rsp),%r8", "other", 0, True, False),
    ("x86_64", "jne", "5f23", "branch", 0, False, False),
])
def test_classifier(arch, mnemonic, operands, kind, macs, load, store):
    ins = CLASSIFIERS[arch](mnemonic, operands)
    assert (ins.kind, ins.macs, ins.load, ins.store) == (kind, macs, load, store)


# -- real builds ------------------------------------------------------------------------------
needs_tvm = pytest.mark.skipif(importlib.util.find_spec("tvm") is None, reason="apache-tvm not installed")
cross_tools = [t for t in ("aarch64-linux-gnu-gcc", "aarch64-linux-gnu-objdump") if shutil.which(t) is None]
needs_cross = pytest.mark.skipif(bool(cross_tools), reason=f"not found: {', '.join(cross_tools)}")


@pytest.fixture(scope="module")
def arm_digits(digits_cnn_path, tmp_path_factory):
    from onnxpress.backends import tvm as ox_tvm

    out = tmp_path_factory.mktemp("isa") / "digits-arm"
    return ox_tvm.compile(digits_cnn_path, "arm", shapes={"input": [8, 1, 8, 8]}, output_dir=out,
                          progress=False)


@needs_tvm
@needs_cross
def test_hottest_arm_conv_is_neon_code(arm_digits, digits_cnn_path):
    from onnxpress.backends import tvm as ox_tvm

    mix = ox_tvm.instruction_mix(arm_digits, digits_cnn_path)
    assert mix.arch == "aarch64" and mix.weighted_by == "flops"
    conv = mix.hottest("conv")
    assert conv is mix.kernels[0]              # the 3x3 conv on 16 channels: 87% of the FLOPs
    assert conv.flops > 0.8 * sum(k.flops for k in mix.kernels)
    assert conv.vector_share >= 0.5, mix.table()
    assert conv.vector_fma == conv.fma > 0 and conv.lanes_per_fma == 4.0, mix.table()
    assert conv.loads_per_fma < 0.5, mix.table()     # register-blocked: a load feeds several FMAs
    assert conv.loop.vector_fma_share == 1.0 and conv.loop.loads_per_fma < 0.5, mix.table()
    assert mix.hot_vector_share >= 0.5 and mix.hot_lanes_per_fma == 4.0


@needs_tvm
@needs_cross
def test_arm_conv_without_default_schedules_is_flagged_scalar(digits_cnn_path, tmp_path, monkeypatch):
    """The check can fail: with the default schedules switched off, TVM leaves the loop nests
    serial and LLVM turns the conv's reduction into scalar fmadd."""
    from onnxpress.backends import tvm as ox_tvm
    from onnxpress.backends.tvm import compiler

    monkeypatch.setattr(compiler, "apply_default_schedules", lambda mod, target: (mod, {}))
    art = ox_tvm.compile(digits_cnn_path, "arm", shapes={"input": [8, 1, 8, 8]},
                         output_dir=tmp_path / "plain", progress=False)
    conv = ox_tvm.instruction_mix(art, digits_cnn_path).hottest("conv")
    assert conv.vector_share < 0.5 or conv.vector_fma_share < 0.5, conv
    assert conv.lanes_per_fma < 2.0 and conv.loads_per_fma > 1.0, conv
    assert conv.loop.lanes_per_fma == 1.0 and conv.loop.loads_per_fma >= 1.0, conv


@needs_tvm
@needs_cross
def test_cli_isa_mix_gates_on_vector_share(arm_digits, digits_cnn_path, capsys):
    from onnxpress.cli import main

    assert main(["isa-mix", str(arm_digits.path), "--model", str(digits_cnn_path), "--json",
                 "--min-vector-share", "0.5"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["hot"][0] == report["kernels"][0]["name"] and report["hot_vector_share"] >= 0.5
    assert main(["isa-mix", str(arm_digits.path), "--min-vector-share", "0.99"]) == 1
    assert "the gate is 99%" in capsys.readouterr().out


@needs_tvm
def test_host_build_mix_is_vector_code(digits_cnn_path, tmp_path):
    """The same classifier shape on the host's code (x86: ymm/zmm FMAs, 8 or 16 lanes)."""
    from onnxpress.backends import tvm as ox_tvm

    if shutil.which("objdump") is None:
        pytest.skip("objdump not found")
    art = ox_tvm.compile(digits_cnn_path, "x86", shapes={"input": [8, 1, 8, 8]},
                         output_dir=tmp_path / "x86", progress=False)
    conv = ox_tvm.instruction_mix(art, digits_cnn_path).hottest("conv")
    assert conv.vector_share >= 0.5 and conv.vector_fma_share == 1.0 and conv.lanes_per_fma >= 4
