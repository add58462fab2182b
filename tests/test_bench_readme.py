"""Every benchmark figure in README.md is rendered from the committed bench/results JSON: the test
fails when a result changes and the README was not regenerated (`python -m bench.readme`), or when
a figure is written by hand where a generated block belongs."""

from __future__ import annotations

import json
import re
from pathlib import Path

from bench import readme

ROOT = Path(__file__).resolve().parent.parent


def test_readme_benchmark_blocks_match_the_committed_results():
    """README.md and docs/*.md: every block up to date, every renderer used somewhere."""
    blocks = []
    for path in readme.files():
        text = path.read_text()
        blocks += re.findall(r"<!-- bench:([\w-]+) -->", text)
        _, changed = readme.update(text)
        assert not changed, f"{path.name} blocks out of date with bench/results: {changed}; run `python -m bench.readme`"
    assert set(blocks) == set(readme.BLOCKS), "every renderer has its block and vice versa"
    assert (ROOT / "docs" / "tvm.md") in readme.files() and "cuda" in blocks


def test_benchmark_section_has_no_hand_written_figures():
    """Outside the generated blocks the Benchmarks section names no speed-up, size ratio or
    accuracy: those come from the results, with the machine that measured them."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Benchmarks"):text.index("## Layout")]
    prose = readme.BLOCK.sub("", section)
    assert not re.findall(r"\b\d+(?:\.\d+)?x\b|\b0\.\d{2,}\b|\b\d+(?:\.\d+)? ms\b", prose), prose


# A measured figure in prose: a ratio (1.24x), a time (19.6 ms, 24 s), a share (39 %) or a
# decimal such as an accuracy or a cosine (0.9911). Byte sizes in prose are cache sizes and
# limits, and `code`, fenced snippets (asserted by test_docs) and generated blocks are left out.
_FIGURE = re.compile(r"(?<![\w.\-])(\d+(?:,\d{3})*(?:\.\d+)?)(?:(x)|\s?(ms|s|%))(?![\w])"
                     r"|(?<![\w.\-])(0\.\d{2,})(?![\w.])")


def _committed_numbers() -> set[float]:
    out: set[float] = set()

    def walk(obj):
        if isinstance(obj, bool):
            return
        if isinstance(obj, (int, float)):
            out.add(float(obj))
        elif isinstance(obj, str):
            out.update(float(m) for m in re.findall(r"\d+(?:\.\d+)?", obj))
        elif isinstance(obj, dict):
            walk(list(obj.values()))
        elif isinstance(obj, list):
            for v in obj:
                walk(v)

    for path in sorted(readme.RESULTS.glob("*.json")):
        walk(json.loads(path.read_text()))
    return out


def _in_results(token: str, unit: str | None, committed: set[float]) -> bool:
    value = float(token.replace(",", ""))
    digits = len(token.split(".")[1]) if "." in token else 0
    scales = {"ms": (1, 1e3), "s": (1, 1e-3), "%": (1, 100)}.get(unit or "", (1,))
    return any(round(x * k, digits) == round(value, digits) for x in committed for k in scales)


def test_every_figure_in_the_docs_prose_is_a_committed_result():
    """README.md and docs/*.md: a figure outside the generated blocks must be one of the numbers
    in bench/results/*.json at the precision it is written with; a measurement that no committed
    result holds fails here (rephrase it, or render it from the results)."""
    committed = _committed_numbers()
    missing = []
    for path in readme.files():
        text = readme.BLOCK.sub("", path.read_text())
        text = re.sub(r"```.*?```", lambda m: "\n" * m.group(0).count("\n"), text, flags=re.S)
        text = re.sub(r"`[^`\n]*`", "", text)
        for n, line in enumerate(text.splitlines(), 1):
            for m in _FIGURE.finditer(line):
                token, unit = m.group(1) or m.group(4), m.group(2) or m.group(3)
                if not _in_results(token, unit, committed):
                    missing.append(f"{path.name}:{n}: {m.group(0)}")
    assert not missing, "figures not in bench/results:\n" + "\n".join(missing)


def test_a_local_bench_run_does_not_replace_figures_measured_elsewhere(tmp_path, monkeypatch):
    """bench_cuda without a GPU and bench_remote_cpu run locally name a file of their own
    (result_name): a lone clone's `python -m bench --quick` overwrote the H200 and Xeon runs with
    'not run' rows, then failed re-rendering the docs from them."""
    import types

    import bench.__main__ as harness

    (tmp_path / "cuda.json").write_text(json.dumps({"title": "CUDA artifacts on a GPU", "rows": []}))
    fake = types.SimpleNamespace(run=lambda quick: {"title": "built, not run: no GPU here", "rows": [],
                                                    "result_name": "cuda_build"})
    monkeypatch.setattr(harness, "importlib", types.SimpleNamespace(import_module=lambda name: fake))
    assert harness.main(["--only", "cuda", "--quick", "--out", str(tmp_path)]) == 0
    assert json.loads((tmp_path / "cuda.json").read_text())["title"] == "CUDA artifacts on a GPU"
    local = json.loads((tmp_path / "cuda_build.json").read_text())
    assert local["title"] == "built, not run: no GPU here" and "result_name" not in local


def test_a_tuned_build_that_kept_the_defaults_reports_the_untuned_figure():
    """The same kernels timed twice differ by noise: a tuned build whose end-to-end check kept
    the default kernels is reported at the untuned figure, with its own timing kept beside it."""
    from bench.bench_tvm import _tuned_figures

    kept = _tuned_figures(32.705, 31.466, 27.117, "default")
    assert kept["tuned_vs_ort"] == round(31.466 / 27.117, 2) and kept["tuned_artifact_timed_ms"] == 32.705
    won = _tuned_figures(25.0, 31.466, 27.117, "tuned")
    assert won == {"tvm_tuned_ms": 25.0, "tuned_vs_ort": round(25.0 / 27.117, 2)}


def test_a_qdq_build_as_close_to_fp32_as_the_reference_passes():
    """A QDQ build that differs from onnxruntime's QDQ reference by requantized rounding passes
    when it is no further from the fp32 outputs than the reference; a worse one fails."""
    import numpy as np

    from bench.bench_tvm import _fidelity_to_fp32

    rng = np.random.default_rng(0)
    fp32 = {"y": rng.standard_normal((1, 384)).astype(np.float32)}
    ref = {"y": fp32["y"] + 0.05 * rng.standard_normal((1, 384)).astype(np.float32)}
    same = {"y": fp32["y"] + 0.05 * rng.standard_normal((1, 384)).astype(np.float32)}
    worse = {"y": fp32["y"] + 0.2 * rng.standard_normal((1, 384)).astype(np.float32)}
    assert _fidelity_to_fp32(fp32, ref, ref)["as_close_to_fp32_as_reference"]
    assert not _fidelity_to_fp32(fp32, ref, worse)["as_close_to_fp32_as_reference"]
    f = _fidelity_to_fp32(fp32, ref, same)
    assert abs(f["tvm_cos_to_fp32"] - f["reference_cos_to_fp32"]) < 0.01
