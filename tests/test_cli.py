"""The command line: each command end to end, and one-line errors with a non-zero exit."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import onnx
import pytest

from onnxpress.cli import main


def run_cli(*args, capsys):
    code = main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_passes_lists_builtins(capsys):
    code, out, _ = run_cli("passes", "--json", capsys=capsys)
    assert code == 0
    listing = {p["name"]: p for p in json.loads(out)}
    for name in ("shape_infer", "fold_constants", "dce", "simplify", "opset", "cleanup"):
        assert name in listing
    assert listing["fold_constants"]["options"]["max_bytes"]["default"] == 1 << 20


def test_inspect_reports_macs_and_io(digits_cnn_path, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    code, out, _ = run_cli("inspect", digits_cnn_path, capsys=capsys)
    assert code == 0
    assert "MACs 337,536" in out and "parameters 38,282" in out
    assert "[batch, 1, 8, 8]" in out and "/features/features.3/Conv" in out
    code, out, _ = run_cli("inspect", digits_cnn_path, "--json", capsys=capsys)
    data = json.loads(out)
    assert data["macs"] == 337536 and data["op_histogram"]["Conv"] == 2


def test_optimize_writes_and_verifies(tmp_path, minilm_path, capsys):
    out = tmp_path / "minilm.opt.onnx"
    report = tmp_path / "report.json"
    code, stdout, err = run_cli("optimize", minilm_path, "-p", "fold_constants,dce,simplify",
                                "-o", out, "--verify", "--report-json", report, capsys=capsys)
    assert code == 0, err
    assert "wrote" in stdout
    reports = json.loads(report.read_text())["passes"]
    assert [r["name"] for r in reports] == ["fold_constants", "dce", "simplify"]
    assert all(r["verify"]["ok"] for r in reports)
    assert len(onnx.load(out).graph.node) < len(onnx.load(minilm_path).graph.node)


def test_optimize_with_calibration_npz(tmp_path, digits_cnn_path, digits, capsys):
    calib = tmp_path / "calib.npz"
    np.savez(calib, input=digits.train[0][:8])
    code, _, err = run_cli("optimize", digits_cnn_path, "-p", "cleanup", "-o", tmp_path / "o.onnx",
                           "--calib", calib, "--verify", "-q", capsys=capsys)
    assert code == 0, err
    np.savez(calib, pixels=digits.train[0][:8])
    code, _, err = run_cli("optimize", digits_cnn_path, "-p", "cleanup", "-o", tmp_path / "o.onnx",
                           "--calib", calib, "--verify", "-q", capsys=capsys)
    assert code == 2 and "unknown name(s) pixels" in err and "input" in err


def test_bench_side_by_side(digits_cnn_path, tmp_path, capsys):
    code, out, _ = run_cli("bench", digits_cnn_path, "--vs", digits_cnn_path, "--runs", "20",
                           "--rounds", "1", "--json", capsys=capsys)
    assert code == 0
    rows = json.loads(out)
    assert len(rows) == 2 and all(r["p50_ms"] > 0 and r["p90_ms"] >= r["p50_ms"] for r in rows)


@pytest.mark.parametrize("args,message", [
    (["optimize", "{model}", "-p", "dce,nope", "-o", "{tmp}/o.onnx"], "unknown pass 'nope'"),
    (["optimize", "{model}", "-p", "fold_constants:max_bytes=-1", "-o", "{tmp}/o.onnx"], "out of range"),
    (["optimize", "{model}", "-p", "dce", "-o", "{model}"], "never writes over its input"),
    (["optimize", "{tmp}/missing.onnx", "-p", "dce", "-o", "{tmp}/o.onnx"], "no such file"),
    (["inspect", "{tmp}/garbage.onnx"], "not an ONNX model"),
])
def test_errors_are_one_line(tmp_path, digits_cnn_path, capsys, args, message):
    (tmp_path / "garbage.onnx").write_bytes(b"\x00\x01garbage" * 50)
    before = digits_cnn_path.read_bytes()
    code, _, err = run_cli(*[a.format(model=digits_cnn_path, tmp=tmp_path) for a in args], capsys=capsys)
    assert code == 2
    assert err.startswith("onnxpress: error: ") and message in err
    assert len(err.strip().splitlines()) == 1
    assert digits_cnn_path.read_bytes() == before
    assert not (tmp_path / "o.onnx").exists()


def test_python_dash_m_is_the_same_cli(digits_cnn_path):
    r = subprocess.run([sys.executable, "-m", "onnxpress", "inspect", str(digits_cnn_path), "--json"],
                       capture_output=True, text=True)
    assert r.returncode == 0 and json.loads(r.stdout)["params"] == 38282
    r = subprocess.run([sys.executable, "-m", "onnxpress", "inspect", "/nonexistent.onnx"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "Traceback" not in r.stderr


def test_optimize_table_reads_at_80_columns(tmp_path, digits_cnn_path, digits, capsys,
                                            monkeypatch):
    """No figure is broken over lines at the commonest terminal width, and print() of the
    Python API's table prints the table, not an object repr."""
    from onnxpress import passes, zoo

    monkeypatch.setenv("COLUMNS", "80")
    calib = tmp_path / "calib.npz"
    np.savez(calib, input=digits.train[0][:32])
    code, out, err = run_cli("optimize", digits_cnn_path, "-p", "fuse,quant_int8",
                             "-o", tmp_path / "o.onnx", "--calib", calib, capsys=capsys)
    assert code == 0, err
    lines = out.splitlines()
    assert max(len(line) for line in lines) <= 80
    figures = [line for line in lines if line.strip().startswith("quant_int8:")]
    assert figures and "int8_compute_nodes=4" in figures[0]
    res = passes.run(onnx.load(digits_cnn_path), "quant_int8", calib=zoo.digits_calib(32, 16))
    text = str(res.table())
    assert "<rich" not in text and "quant_int8" in text and "int8_compute_nodes=4" in text
