"""Every benchmark figure in README.md is rendered from the committed bench/results JSON: the test
fails when a result changes and the README was not regenerated (`python -m bench.readme`), or when
a figure is written by hand where a generated block belongs."""

from __future__ import annotations

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
