"""Recipes: every built-in recipe runs on the digits CNN (real weights, real test accuracy); recipe
files are checked before anything runs; `onnxpress recipes` and `optimize --recipe`."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from onnxpress import recipes, zoo
from onnxpress.backends import ort
from onnxpress.errors import CalibrationError, PassOptionError, UnknownPassError

ALL = recipes.builtin_names()


def test_builtins_exist_and_parse():
    assert {"lossless", "int8-cpu", "small-board", "memory-lean"} <= set(ALL)
    for r in recipes.builtins():
        assert r.description and r.passes
        assert recipes.loads(r.to_toml(), validate=False).passes == r.passes  # TOML round trip


@pytest.mark.parametrize("name", ALL)
def test_builtin_recipe_runs_on_digits_cnn(name, digits_cnn_path, digits):
    recipe = recipes.load(name, validate=False)
    if not recipe.available:
        pytest.skip(f"recipe '{name}' needs passes not registered in this checkout: "
                    f"{', '.join(recipe.missing_passes())}")
    X, y = digits.test
    base_acc = zoo.accuracy(str(digits_cnn_path), X, y)
    result = recipes.run(recipe, str(digits_cnn_path), calib=zoo.digits_calib())
    assert [r.name for r in result.reports] == [p["name"] for p in recipe.passes]
    if recipe.verify:
        assert all(r.verify is not None for r in result.reports)
    acc = zoo.accuracy(result.model, X, y)
    lossy = any(r.verify and r.verify.get("lossy") for r in result.reports)
    if not lossy:
        assert acc == base_acc
        feeds = {"input": X[:32]}
        np.testing.assert_allclose(ort.run(result.model, feeds)["logits"],
                                   ort.run(str(digits_cnn_path), feeds)["logits"], rtol=1e-4, atol=1e-4)
    else:
        assert acc >= base_acc - 0.05, (name, base_acc, acc)
    if any(p["name"].startswith("quant_") for p in recipe.passes):
        # int8 weights: a quarter of the float bytes, plus scales (fusions must not hide layers)
        ratio = result.reports[-1].bytes_after / result.reports[0].bytes_before
        assert ratio < 0.35, (name, ratio)
    if any(p["name"] == "reuse" for p in recipe.passes):
        keys = {p.key for p in result.model.metadata_props}
        assert "onnxpress.memory_plan" in keys


def test_unknown_pass_fails_before_anything_runs(tmp_path, digits_cnn_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('name = "bad"\n[[pass]]\nname = "cleanup"\n[[pass]]\nname = "no_such_pass"\n')
    with pytest.raises(UnknownPassError, match="no_such_pass"):
        recipes.load(bad)
    out = tmp_path / "out.onnx"
    proc = subprocess.run([sys.executable, "-m", "onnxpress", "optimize", str(digits_cnn_path),
                           "--recipe", str(bad), "-o", str(out)], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2 and "no_such_pass" in proc.stderr
    assert not out.exists()


def test_bad_recipes_name_file_and_key(tmp_path):
    p = tmp_path / "r.toml"
    p.write_text('name = "x"\ncolour = "red"\n[[pass]]\nname = "cleanup"\n')
    with pytest.raises(PassOptionError, match=r"r\.toml.*colour"):
        recipes.load(p)
    p.write_text('[[pass]]\nname = "dce"\nbogus = 1\n')
    with pytest.raises(PassOptionError, match="bogus"):
        recipes.load(p)
    p.write_text('[[pass]\nname = "dce"\n')
    with pytest.raises(PassOptionError, match="not valid TOML"):
        recipes.load(p)
    with pytest.raises(PassOptionError, match="built-in"):
        recipes.load("no-such-recipe")
    needs = recipes.loads('name = "q"\n[[pass]]\nname = "dce"\n[calibration]\nrequired = true\n')
    with pytest.raises(CalibrationError, match="--calib"):
        needs.calibration()


def test_recipe_file_with_calibration_beside_it(tmp_path, digits_cnn_path):
    X = zoo.digits_data().train[0][:32]
    np.savez(tmp_path / "calib.npz", input=X)
    (tmp_path / "mine.toml").write_text(
        'name = "mine"\ndescription = "cleanup then a memory plan"\n'
        '[pipeline]\nverify = true\nshapes = { batch = 1 }\n'
        '[[pass]]\nname = "cleanup"\n[[pass]]\nname = "reuse"\nbatch = 1\n'
        '[calibration]\nsource = "calib.npz"\n'
        '[outputs]\nmodel = "{stem}.mine.onnx"\nreport = "{stem}.mine.html"\n')
    proc = subprocess.run([sys.executable, "-m", "onnxpress", "optimize", str(digits_cnn_path),
                           "--recipe", str(tmp_path / "mine.toml"), "-q", "--no-latency"],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "digits_cnn.mine.onnx").exists()
    data = json.loads((tmp_path / "digits_cnn.mine.json").read_text())
    assert [p["name"] for p in data["passes"]] == ["cleanup", "reuse"]
    assert data["memory"]["arena_bytes"] >= data["memory"]["lower_bound_bytes"] > 0


def test_recipe_report_goes_beside_the_output_the_user_names(tmp_path, digits_cnn_path):
    """`-o out/model.onnx --recipe lossless` from another directory: the report the recipe names
    is written beside the model, not into the working directory."""
    (tmp_path / "cwd").mkdir()
    out = tmp_path / "out" / "digits.lossless.onnx"
    out.parent.mkdir()
    proc = subprocess.run([sys.executable, "-m", "onnxpress", "optimize", str(digits_cnn_path),
                           "--recipe", "lossless", "-o", str(out), "-q", "--no-latency"],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path / "cwd")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert out.exists() and (out.parent / "digits_cnn.lossless.html").exists()
    assert list((tmp_path / "cwd").iterdir()) == []


def test_recipes_command_lists_builtins():
    proc = subprocess.run([sys.executable, "-m", "onnxpress", "recipes", "--json"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    listed = {r["name"]: r for r in json.loads(proc.stdout)}
    assert set(listed) == set(ALL)
    assert listed["lossless"]["pipeline"] == "cleanup,fuse" and listed["lossless"]["available"]
    proc = subprocess.run([sys.executable, "-m", "onnxpress", "recipes", "small-board"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "tune_trials = 2000" in proc.stdout
