"""The HTML report: built from the digits CNN pipeline, opened in headless Chromium (Debian's
chromium, driven over the DevTools protocol), screenshotted, charts checked, no script errors,
no network requests, no external URL in the file."""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from onnxpress import passes, zoo
from onnxpress.passes.error import InputError, outputs_error
from onnxpress.report import build, write_report
from onnxpress.report.figures import collect

CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--hide-scrollbars", "--mute-audio"]
EXTERNAL_URL = re.compile(r"(?:https?|ftp|wss?)://|(?:src|href)\s*=\s*[\"']?//|url\(\s*[\"']?(?!data:|#)",
                          re.I)


def _pipeline() -> list[str]:
    """Every capability the report draws (a built-in pass that disappears fails here, loudly)."""
    return ["cleanup", "fuse:disable=conv_activation+gemm_activation", "prune:sparsity=0.5",
            "quant_auto:precisions=int8+int4+fp32,objective=size", "reuse:batch=1"]


@pytest.fixture(scope="module")
def digits_report(digits_cnn_path, tmp_path_factory):
    out = tmp_path_factory.mktemp("report") / "digits.html"
    result = passes.run(digits_cnn_path, _pipeline(), calib=zoo.digits_calib(),
                        instruments=[InputError()])
    write_report(out, before=digits_cnn_path, after=result.model, pipeline_result=result,
                 measure_latency=True, title="digits CNN")
    return out, result


def test_report_figures_and_json_twin(digits_report, digits_cnn_path):
    html_path, result = digits_report
    data = json.loads(html_path.with_suffix(".json").read_text())
    before, after = data["models"]["before"], data["models"]["after"]
    assert before["macs"] == 337_536 and before["params"] > 38_000
    assert after["nodes"] == result.reports[-1].nodes_after
    assert [p["name"] for p in data["passes"]] == [r.name for r in result.reports]
    assert "Conv" in data["size_by_op"]["op_types"] and "Gemm" in data["size_by_op"]["op_types"]
    assert sum(data["size_by_op"]["before"]) == before["weight_bytes"]
    assert len(data["latency"]["labels"]) >= 2 and all(ms > 0 for ms in data["latency"]["ms"])
    mem = data["memory"]
    assert max(mem["live_bytes"]) == mem["lower_bound_bytes"] <= mem["arena_bytes"]
    assert after["peak_memory_bytes"] == mem["arena_bytes"]
    # the input had no plan: it is planned with the same bindings, for a like-for-like card
    assert before["peak_memory_bytes"] >= before["peak_lower_bound_bytes"] > 0
    prune = next(r for r in result.reports if r.name == "prune")
    per_layer = prune.figures["per_layer"]
    assert per_layer and data["sparsity"]["layers"] == list(per_layer)
    assert data["sparsity"]["values"] == pytest.approx(list(per_layer.values()))
    sens = data["sensitivity"]
    assert sens["pass"] == "quant_auto" and len(sens["layers"]) == 4
    assert set(sens["series"]) >= {"int8", "int4"} and all(v > 0 for v in sens["values"])
    # quality: each lossy pass against the input model on the verification inputs (the first
    # calibration batch); quant_auto's row is the end-to-end error, reuse being lossless
    quality = data["quality"]["rows"]
    assert [r["pass"] for r in quality] == ["prune", "quant_auto"]
    from onnxpress.backends import ort

    feeds = zoo.digits_calib()[0]
    ref, got = ort.run(digits_cnn_path, feeds), ort.run(result.model, feeds)
    end_to_end = outputs_error(list(ref.values()), [got[n] for n in ref])
    assert {k: v for k, v in quality[-1].items() if k != "pass"} == \
        pytest.approx(end_to_end, rel=1e-3, abs=1e-6)
    assert 0 < quality[0]["rel_l2"] and quality[-1]["min_cosine"] > 0.9
    assert quality[-1]["top1_agreement"] >= 0.9
    # the same figures are embedded in the page
    html = html_path.read_text()
    embedded = re.search(r'<script type="application/json" id="onnxpress-report-data">(.*?)</script>',
                         html, re.S).group(1)
    assert json.loads(embedded.replace("<\\/", "</"))["models"] == data["models"]


def test_report_has_no_external_url(digits_report):
    html = digits_report[0].read_text()
    assert not EXTERNAL_URL.search(html), EXTERNAL_URL.search(html)
    assert "<link" not in html and "@import" not in html and "<img" not in html


def test_sections_only_for_existing_data(digits_cnn_path):
    html, data = build(before=digits_cnn_path, after=digits_cnn_path)
    assert set(data) >= {"models", "size_by_op"}
    assert not {"passes", "sensitivity", "sparsity", "memory", "latency"} & set(data)
    assert 'id="chart-memory"' not in html and 'id="chart-size-by-op"' in html
    # figures of passes that do not exist yet, or odd values, never break the report
    fake = {"passes": [
        {"name": "quant_auto", "figures": {"sensitivity": {"conv1": 0.02, "fc": {"error": 0.3},
                                                           "bad": "n/a", "nan": float("nan")}}},
        {"name": "prune", "figures": {"per_group": {"g0": "12/16", "g1": "oops"}, "per_layer": 3}},
        {"name": "x", "figures": None}]}
    import onnx

    model = onnx.load(digits_cnn_path)
    data = collect(before=model, after=model, pipeline_result=fake)
    assert data["sensitivity"]["layers"] == ["conv1", "fc"]
    assert data["sparsity"] == {"pass": "prune", "kind": "pruned channels", "layers": ["g0"],
                                "values": [0.25]}
    # a lossy pass ran but nothing measured it against the input: the whole pipeline is
    assert [r["pass"] for r in data["quality"]["rows"]] == ["whole pipeline"]
    assert data["quality"]["rows"][0]["rel_l2"] == 0 and data["quality"]["rows"][0]["min_cosine"] == 1


def _cdp_session(html_path: Path, tmp_path: Path, width: int = 1100, height: int = 900):
    """Open `html_path` in headless Chromium over the DevTools protocol; return what happened."""
    websocket = pytest.importorskip("websocket", reason="websocket-client drives Chromium (dev extra)")
    profile = tmp_path / "chromium-profile"
    proc = subprocess.Popen([CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={profile}",
                             "--remote-debugging-port=0", "about:blank"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        port_file = profile / "DevToolsActivePort"
        deadline = time.time() + 60
        while not (port_file.exists() and len(port_file.read_text().split()) >= 2):
            if proc.poll() is not None or time.time() > deadline:
                pytest.fail("chromium did not open its DevTools port")
            time.sleep(0.1)
        port, path = port_file.read_text().split()[:2]
        ws = websocket.create_connection(f"ws://127.0.0.1:{port}{path}", timeout=60,
                                         suppress_origin=True)
        ids = iter(range(1, 10_000))
        events: list[dict] = []

        def call(method, params=None, session=None):
            msg = {"id": next(ids), "method": method, "params": params or {}}
            if session:
                msg["sessionId"] = session
            ws.send(json.dumps(msg))
            while True:
                reply = json.loads(ws.recv())
                if reply.get("id") == msg["id"]:
                    if "error" in reply:
                        raise AssertionError(f"{method}: {reply['error']}")
                    return reply.get("result", {})
                events.append(reply)

        target = call("Target.createTarget", {"url": "about:blank"})["targetId"]
        sid = call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Page", "Runtime", "Log", "Network"):
            call(f"{domain}.enable", session=sid)
        call("Emulation.setDeviceMetricsOverride",
             {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False}, session=sid)
        call("Page.navigate", {"url": html_path.resolve().as_uri()}, session=sid)
        deadline = time.time() + 60
        while not any(e.get("method") == "Page.loadEventFired" for e in events):
            if time.time() > deadline:
                pytest.fail("the report did not finish loading in 60 s")
            events.append(json.loads(ws.recv()))

        def evaluate(expr):
            return call("Runtime.evaluate", {"expression": expr, "returnByValue": True},
                        session=sid)["result"].get("value")

        dom = evaluate("""JSON.stringify({
            rendered: document.body.dataset.chartsRendered, expected: document.body.dataset.chartsExpected,
            errors: document.body.dataset.errors || "",
            sections: Array.from(document.querySelectorAll('section')).map(s => s.id),
            charts: Array.from(document.querySelectorAll('section.chart')).map(s => ({
                id: s.id, rendered: s.dataset.rendered === 'true',
                bars: s.querySelectorAll('svg path, svg rect, svg use').length,
                box: s.querySelector('svg').getBoundingClientRect().width})),
            text: document.body.innerText.length})""")
        full_height = evaluate("document.documentElement.scrollHeight")
        shot = call("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True,
                                               "clip": {"x": 0, "y": 0, "width": width,
                                                        "height": full_height, "scale": 1}},
                    session=sid)
        ws.close()
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
    return json.loads(dom), base64.b64decode(shot["data"]), events


@pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (scripts/setup_browser.sh installs it)")
def test_report_opens_in_headless_chromium(digits_report, tmp_path):
    html_path, result = digits_report
    dom, png, events = _cdp_session(html_path, tmp_path)

    exceptions = [e["params"]["exceptionDetails"] for e in events if e.get("method") == "Runtime.exceptionThrown"]
    console_errors = [e["params"] for e in events if e.get("method") == "Runtime.consoleAPICalled"
                      and e["params"].get("type") in ("error", "assert")]
    log_errors = [e["params"]["entry"] for e in events if e.get("method") == "Log.entryAdded"
                  and e["params"]["entry"].get("level") == "error"]
    assert not exceptions and not console_errors and not log_errors and not dom["errors"], \
        (exceptions, console_errors, log_errors, dom["errors"])
    requests = [e["params"]["request"]["url"] for e in events if e.get("method") == "Network.requestWillBeSent"]
    assert requests and all(u.startswith(("file:", "data:")) for u in requests), requests

    expected = {"chart-size-by-op", "chart-latency", "chart-memory", "chart-sparsity",
                "chart-sensitivity", "chart-quality"}
    assert expected <= set(dom["sections"]), dom["sections"]
    assert int(dom["rendered"]) == int(dom["expected"]) >= len(expected)
    for chart in dom["charts"]:
        assert chart["rendered"] and chart["bars"] > 3 and chart["box"] > 300, chart

    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 50_000
    width = int.from_bytes(png[16:20], "big")
    height = int.from_bytes(png[20:24], "big")
    assert width == 1100 and height > 1500, (width, height)
    (tmp_path / "report.png").write_bytes(png)
    if os.environ.get("ONNXPRESS_KEEP_SCREENSHOT"):  # for a person to look at
        Path(os.environ["ONNXPRESS_KEEP_SCREENSHOT"]).write_bytes(png)


def test_cli_optimize_writes_report_with_recipe(digits_cnn_path, tmp_path):
    out = tmp_path / "lossless.onnx"
    report = tmp_path / "r.html"
    proc = subprocess.run([sys.executable, "-m", "onnxpress", "optimize", str(digits_cnn_path),
                           "--recipe", "lossless", "-o", str(out), "--report", str(report), "-q"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = json.loads(report.with_suffix(".json").read_text())
    assert [p["name"] for p in data["passes"]] == ["cleanup", "fuse"]
    assert data["extra"]["recipe"] == "lossless"
    assert all(p["verify"]["ok"] for p in data["passes"])  # the recipe asks for verification
    assert not EXTERNAL_URL.search(report.read_text())


def test_compile_report_for_a_tvm_artifact(digits_cnn_path, tmp_path):
    pytest.importorskip("tvm", reason="apache-tvm not installed (the tvm extra)")
    from onnxpress.backends import tvm
    from onnxpress.report import compile_report

    art = tvm.compile(str(digits_cnn_path), target="x86", tune_trials=0, output_dir=tmp_path / "x86",
                      progress=False)
    X = zoo.digits_data().test[0][:1]
    out = compile_report(tmp_path / "compile.html", digits_cnn_path, art, feeds={"input": X}, runs=20)
    data = json.loads(out.with_suffix(".json").read_text())
    assert data["extra"]["target"] == "x86" and data["extra"]["artifact"] == str(tmp_path / "x86")
    assert set(data["latency"]["labels"]) == {"onnxruntime (this host)", "TVM x86"}
    assert all(ms > 0 for ms in data["latency"]["ms"])
    assert not EXTERNAL_URL.search(out.read_text())


def _crnn_with_constant_weights(path: Path) -> None:
    """A CRNN-style text recognizer: dynamic width, weights in Constant nodes (as PaddlePaddle's
    exporter writes them), a MatMul head over the width."""
    import warnings

    import onnx
    import torch
    from onnx import helper

    class CRNN(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.c1, self.b1 = torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.BatchNorm2d(16)
            self.c2, self.b2 = torch.nn.Conv2d(16, 32, 3, padding=1), torch.nn.BatchNorm2d(32)
            self.pool, self.fc = torch.nn.MaxPool2d(2), torch.nn.Linear(32 * 12, 40)

        def forward(self, x):
            x = self.pool(torch.relu(self.b1(self.c1(x))))
            x = self.pool(torch.relu(self.b2(self.c2(x))))
            b, c, h, w = x.shape
            return self.fc(x.permute(0, 3, 1, 2).reshape(b, w, c * h))

    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(CRNN().eval(), torch.randn(1, 3, 48, 160), str(path), input_names=["x"],
                          output_names=["y"], dynamic_axes={"x": {3: "width"}, "y": {1: "steps"}},
                          opset_version=17, dynamo=False)
    m = onnx.load(path)
    consts = [helper.make_node("Constant", [], [t.name], value=t) for t in m.graph.initializer]
    del m.graph.initializer[:]
    nodes = consts + list(m.graph.node)
    del m.graph.node[:]
    m.graph.node.extend(nodes)
    onnx.save(m, path)


def test_report_of_a_dynamic_shape_model_agrees_with_inspect(tmp_path, monkeypatch):
    """Weight bytes, MACs and peak memory in the report of `optimize --shape` are what
    `onnxpress inspect --shape` says of the same files, and compare like with like."""
    import numpy as np

    from onnxpress.cli import main

    monkeypatch.chdir(tmp_path)
    _crnn_with_constant_weights(tmp_path / "crnn.onnx")
    np.savez(tmp_path / "calib.npz",
             x=np.random.default_rng(0).standard_normal((8, 3, 48, 320)).astype(np.float32))
    assert main(["optimize", "crnn.onnx", "-p", "cleanup,fuse,quant_int8:latency_aware=false,reuse", "--shape",
                 "x=1,3,48,320", "--calib", "calib.npz", "-o", "out.onnx", "--report", "rep.html",
                 "--no-latency", "-q"]) == 0
    data = json.loads((tmp_path / "rep.json").read_text())
    models = data["models"]
    # optimize --report measures the lossy pass against the input model on the calibration batch
    (row,) = data["quality"]["rows"]
    assert row["pass"] == "quant_int8" and 0 < row["rel_l2"] < 0.2 and row["min_cosine"] > 0.98
    assert 'id="chart-quality"' in (tmp_path / "rep.html").read_text()
    for key, path in (("before", "crnn.onnx"), ("after", "out.onnx")):
        out = subprocess.run([sys.executable, "-m", "onnxpress", "inspect", path, "--shape",
                              "x=1,3,48,320", "--memory", "--json"], capture_output=True, text=True,
                             check=True)
        seen = json.loads(out.stdout)
        assert models[key]["weight_bytes"] == seen["weight_bytes"] > 0, key
        assert models[key]["macs"] == seen["macs"] > 20_000_000, key
        # peak memory: the arena inspect plans (before) or reads back and verifies (after)
        assert models[key]["peak_memory_bytes"] == seen["memory"]["arena_bytes"] > 0, (key, seen["memory"])
        assert models[key]["peak_lower_bound_bytes"] == seen["memory"]["lower_bound_bytes"], key
    assert "stored in metadata" in seen["memory"]["source"]  # out.onnx carries reuse's plan
    # weights in Constant nodes count: int8 is about a quarter of the float weights (the
    # latency choice is off: on a loaded machine it may keep this small model float)
    assert models["after"]["weight_bytes"] < 0.35 * models["before"]["weight_bytes"]
    # peak memory: both planned at the same bindings (the input held no plan)
    before, after = models["before"]["peak_memory_bytes"], models["after"]["peak_memory_bytes"]
    assert before and after and 0.5 < after / before < 1.5
