"""Every runnable snippet in docs/*.md is executed.

Convention (docs pages opt in; the ecosystem pages recipes, report, tensorflow, custom_pass and
deploy do):

- A page opts in with the line `<!-- onnxpress: run-snippets -->`. Pages without it are not run
  (each capability opts its page in once its snippets are runnable).
- In an opted-in page, every ```python block runs, in page order, with a fresh temporary directory
  as working directory (files persist across blocks) and ONNXPRESS_CACHE shared with the test
  session (zoo models are built once). Consecutive Python blocks share one process, so later
  blocks see earlier names; a shell block between them starts a new process after it.
- ```bash / ```sh / ```console blocks run too: each line that starts with `onnxpress ` (or
  `$ onnxpress `) runs as `python -m onnxpress ...` in the same directory, after the Python blocks
  above it; other lines (pip, apt-get, make) are not run.
- A block whose first line is `# notest` is never run (say why on that line).
- A block whose first line is `# requires: tensorflow, tvm` runs only when those modules import;
  otherwise the page stops there and the test is skipped with that reason. Put such blocks last.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parent.parent / "docs"
MARKER = "<!-- onnxpress: run-snippets -->"
FENCE = re.compile(r"^```(\w+)[^\n]*\n(.*?)^```\s*$", re.S | re.M)

RUNNER = r"""
import json, sys, traceback
blocks = json.load(open(sys.argv[1]))
ns = {"__name__": "__docs__"}
for i, (line, code) in enumerate(blocks):
    try:
        exec(compile(code, f"{sys.argv[2]}:{line}", "exec"), ns)
    except SystemExit:
        raise
    except BaseException:
        traceback.print_exc()
        print(f"DOCS SNIPPET FAILED: {sys.argv[2]} block starting at line {line}", file=sys.stderr)
        sys.exit(1)
"""


def _pages() -> list[Path]:
    return sorted(p for p in DOCS.glob("*.md") if MARKER in p.read_text(encoding="utf-8"))


def snippets(page: Path) -> list[tuple[str, int, str]]:
    """(language, first line number, code) of every fenced block of a page."""
    text = page.read_text(encoding="utf-8")
    out = []
    for m in FENCE.finditer(text):
        line = text.count("\n", 0, m.start()) + 2
        out.append((m.group(1).lower(), line, m.group(2)))
    return out


def _missing(first_line: str) -> list[str]:
    mods = [m.strip() for m in first_line.split(":", 1)[1].split(",") if m.strip()]
    return [m for m in mods if importlib.util.find_spec(m) is None]


def _run_python(blocks, page, cwd, env):
    if not blocks:
        return
    spec = cwd / f".{page.stem}.blocks.json"
    spec.write_text(json.dumps(blocks))
    runner = cwd / ".docs_runner.py"
    runner.write_text(RUNNER)
    proc = subprocess.run([sys.executable, str(runner), str(spec), f"docs/{page.name}"], cwd=cwd,
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]


def _run_shell(code, line, page, cwd, env):
    for raw in code.splitlines():
        cmd = raw.strip()
        if cmd.startswith("$ "):
            cmd = cmd[2:]
        if not cmd.startswith("onnxpress "):
            continue
        cmd = cmd.split(" #", 1)[0]
        args = shlex.split(cmd)[1:]
        proc = subprocess.run([sys.executable, "-m", "onnxpress", *args], cwd=cwd, env=env,
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, (f"docs/{page.name}:{line}: `{cmd}` exited {proc.returncode}\n"
                                      + proc.stdout[-2000:] + proc.stderr[-4000:])


@pytest.mark.parametrize("page", _pages(), ids=lambda p: p.name)
def test_docs_snippets_run(page, tmp_path, digits_cnn_path):
    from onnxpress import zoo

    env = dict(os.environ)
    env["ONNXPRESS_CACHE"] = str(zoo.cache_dir().resolve())
    root = str(DOCS.parent)
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    pending: list[tuple[int, str]] = []
    ran = 0
    for lang, line, code in snippets(page):
        first = code.lstrip().splitlines()[0].strip() if code.strip() else ""
        if first.startswith("# notest"):
            continue
        if first.startswith("# requires:"):
            missing = _missing(first)
            if missing:
                _run_python(pending, page, tmp_path, env)
                pytest.skip(f"docs/{page.name}:{line} needs {', '.join(missing)} (not installed); "
                            f"{ran} blocks before it ran")
        if lang == "python":
            pending.append((line, code))
            ran += 1
        elif lang in ("bash", "sh", "console", "shell"):
            _run_python(pending, page, tmp_path, env)
            pending = []
            if any(ln.strip().lstrip("$ ").startswith("onnxpress ") for ln in code.splitlines()):
                _run_shell(code, line, page, tmp_path, env)
                ran += 1
    _run_python(pending, page, tmp_path, env)
    assert ran, f"docs/{page.name} opts in to running snippets but has none to run"


def test_own_pages_opt_in():
    """The ecosystem pages must keep their snippets runnable."""
    names = {p.name for p in _pages()}
    assert {"recipes.md", "report.md", "tensorflow.md", "custom_pass.md", "deploy.md"} <= names, names
