"""One self-contained HTML page from the figures dict: inline CSS, inline SVG charts, a few lines
of inline script (sortable tables), the figures themselves as embedded JSON. Nothing is fetched."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from html import escape
from typing import Any

from onnxpress.report import charts
from onnxpress.units import human_bytes, human_count

CSS = """
:root { --fg:#1d2530; --muted:#5f6b7a; --line:#e3e7ec; --after:#2f6fde; --good:#1f8a4c; --bad:#c23b3b; }
* { box-sizing: border-box; }
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: var(--fg);
       margin: 0; background: #f6f8fa; }
header { background: #16202c; color: #fff; padding: 18px 28px; }
header h1 { margin: 0 0 4px; font-size: 20px; }
header p { margin: 0; color: #b8c2cf; font-size: 12px; }
main { max-width: 1040px; margin: 0 auto; padding: 18px 28px 40px; }
section { background: #fff; border: 1px solid var(--line); border-radius: 8px; padding: 14px 18px;
          margin: 16px 0; }
section h2 { font-size: 16px; margin: 0 0 10px; }
section p.note { color: var(--muted); margin: 4px 0 10px; font-size: 12px; }
.cards { display: grid; grid-template-columns: repeat(auto-fit, minmax(150px, 1fr)); gap: 10px; }
.card { border: 1px solid var(--line); border-radius: 6px; padding: 8px 10px; }
.card .k { color: var(--muted); font-size: 12px; }
.card .v { font-size: 15px; font-weight: 600; }
.card .r { font-size: 12px; }
.good { color: var(--good); } .bad { color: var(--bad); }
table { border-collapse: collapse; width: 100%; font-size: 12.5px; }
th, td { border-bottom: 1px solid var(--line); padding: 4px 8px; text-align: right; vertical-align: top; }
th:first-child, td:first-child, td.l { text-align: left; }
th { cursor: pointer; user-select: none; background: #fafbfc; }
td.figs { text-align: left; color: var(--muted); max-width: 420px; overflow-wrap: anywhere; }
.chart svg { width: 100%; max-width: 860px; height: auto; display: block; }
details { margin-top: 8px; } summary { cursor: pointer; color: var(--muted); }
code { background: #f0f2f4; padding: 1px 4px; border-radius: 3px; }
"""

SCRIPT = """
(function () {
  var errors = [];
  window.addEventListener("error", function (e) { errors.push(String(e.message)); document.body.dataset.errors = errors.join("; "); });
  function sortable(table) {
    var ths = table.querySelectorAll("thead th");
    ths.forEach(function (th, col) {
      th.addEventListener("click", function () {
        var body = table.tBodies[0], rows = Array.prototype.slice.call(body.rows);
        var asc = th.dataset.dir !== "asc"; th.dataset.dir = asc ? "asc" : "desc";
        rows.sort(function (a, b) {
          var x = a.cells[col].dataset.v || a.cells[col].textContent, y = b.cells[col].dataset.v || b.cells[col].textContent;
          var nx = parseFloat(x), ny = parseFloat(y);
          var c = (!isNaN(nx) && !isNaN(ny)) ? nx - ny : x.localeCompare(y);
          return asc ? c : -c;
        });
        rows.forEach(function (r) { body.appendChild(r); });
      });
    });
  }
  document.addEventListener("DOMContentLoaded", function () {
    document.querySelectorAll("table.sortable").forEach(sortable);
    var n = 0;
    document.querySelectorAll("section.chart").forEach(function (s) {
      var svg = s.querySelector("svg");
      if (svg && svg.getBBox().width > 0) { n += 1; s.dataset.rendered = "true"; }
    });
    document.body.dataset.chartsRendered = String(n);
    document.body.dataset.chartsExpected = String(document.querySelectorAll("section.chart").length);
  });
})();
"""


def _bytes(n: Any) -> str:
    return human_bytes(n)

def _count(n: Any) -> str:
    return human_count(n)

def _ratio(b: Any, a: Any) -> str:
    if not isinstance(b, (int, float)) or not isinstance(a, (int, float)) or not b:
        return ""
    r = a / b
    cls = "good" if r < 1 else ("bad" if r > 1 else "")
    return f'<span class="{cls}">×{r:.3g}</span>'


def _cards(models: Mapping[str, Any]) -> str:
    b, a = models["before"], models["after"]
    rows = [("nodes", "nodes", _count), ("parameters", "params", _count), ("file bytes", "bytes", _bytes),
            ("weight bytes", "weight_bytes", _bytes), ("MACs", "macs", _count)]
    if "peak_memory_bytes" in a or "peak_memory_bytes" in b:
        rows.append(("peak memory (arena)", "peak_memory_bytes", _bytes))
    out = ['<div class="cards">']
    for label, key, fmt in rows:
        out.append(
            f'<div class="card" data-key="{key}"><div class="k">{escape(label)}</div>'
            f'<div class="v">{escape(fmt(b.get(key)))} → {escape(fmt(a.get(key)))}</div>'
            f'<div class="r">{_ratio(b.get(key), a.get(key))}'
            + (' <span title="{}">(input planned for comparison)</span>'.format(escape(b["peak_memory_note"]))
               if key == "peak_memory_bytes" and b.get("peak_memory_note") else "")
            + "</div></div>")
    out.append("</div>")
    return "".join(out)


def _fig_text(figs: Mapping[str, Any]) -> str:
    parts = []
    for k, v in figs.items():
        if isinstance(v, (dict, list)):
            text = json.dumps(v, default=str)
            parts.append(f"{k}={text}" if len(text) <= 60 else f"{k}: {len(v)} entries (JSON twin)")
        elif isinstance(v, float):
            parts.append(f"{k}={v:.4g}")
        else:
            parts.append(f"{k}={v}")
    return ", ".join(parts)


def _pass_table(passes: Sequence[Mapping[str, Any]]) -> str:
    head = ["pass", "options", "nodes", "params", "bytes", "time", "max abs err", "figures"]
    out = ['<table class="sortable" id="pass-table"><thead><tr>']
    out += [f"<th>{h}</th>" for h in head]
    out.append("</tr></thead><tbody>")
    for p in passes:
        opts = ", ".join(f"{k}={v}" for k, v in (p.get("options") or {}).items())
        ver = p.get("verify") or {}
        err = ver.get("max_abs")
        out.append(
            "<tr>"
            f'<td class="l"><b>{escape(str(p.get("name")))}</b></td>'
            f'<td class="figs">{escape(opts)}</td>'
            f'<td data-v="{p.get("nodes_after", "")}">{p.get("nodes_before", "–")} → {p.get("nodes_after", "–")}</td>'
            f'<td data-v="{p.get("params_after", "")}">{_count(p.get("params_before"))} → {_count(p.get("params_after"))}</td>'
            f'<td data-v="{p.get("bytes_after", "")}">{_bytes(p.get("bytes_before"))} → {_bytes(p.get("bytes_after"))}</td>'
            f'<td data-v="{p.get("seconds", 0)}">{float(p.get("seconds") or 0):.2f}s</td>'
            f'<td>{"–" if err is None else f"{err:.2g}"}</td>'
            f'<td class="figs">{escape(_fig_text(p.get("figures") or {}))}</td>'
            "</tr>")
    out.append("</tbody></table>")
    return "".join(out)


def _kv_table(rows: Sequence[tuple[str, Any]], headers: tuple[str, str], fmt=str) -> str:
    out = [f'<table class="sortable"><thead><tr><th>{escape(headers[0])}</th><th>{escape(headers[1])}</th>'
           "</tr></thead><tbody>"]
    for k, v in rows:
        out.append(f'<tr><td class="l">{escape(str(k))}</td><td data-v="{v}">{escape(fmt(v))}</td></tr>')
    out.append("</tbody></table>")
    return "".join(out)


def _section(sid: str, title: str, body: str, *, chart: bool = False, note: str = "") -> str:
    cls = "chart" if chart else "plain"
    note_html = f'<p class="note">{escape(note)}</p>' if note else ""
    return f'<section class="{cls}" id="{sid}"><h2>{escape(title)}</h2>{note_html}{body}</section>'


def render(data: Mapping[str, Any]) -> str:
    """The HTML page for a figures dict (figures.collect)."""
    parts: list[str] = []
    models = data["models"]
    parts.append(_section("summary", "Model before → after", _cards(models)))
    passes = data.get("passes") or []
    if passes:
        body = _pass_table(passes)
        if len(passes) > 1:
            body = f'<div class="chart">{charts.pipeline_steps(passes)}</div>' + body
        parts.append(_section("passes", "Passes", body, chart=len(passes) > 1))
    sec = data.get("size_by_op")
    if sec and sec.get("op_types"):
        parts.append(_section("chart-size-by-op", "Weight size by layer type", charts.size_by_op(sec),
                              chart=True, note="weights counted at the layer that uses them "
                              "(through DequantizeLinear, Transpose, Reshape, Cast)"))
    sec = data.get("quality")
    if sec:
        keys = [k for k in ("min_cosine", "rel_l2", "max_abs", "top1_agreement")
                if any(k in r for r in sec["rows"])]
        rows_q = "".join(
            f'<tr><td class="l">{escape(r["pass"])}</td>'
            + "".join(f'<td data-v="{r.get(k, "")}">{"–" if r.get(k) is None else f"{r[k]:.4g}"}</td>'
                      for k in keys) + "</tr>" for r in sec["rows"])
        table = ('<table class="sortable" id="quality-table"><thead><tr><th>after pass</th>'
                 + "".join(f"<th>{k}</th>" for k in keys) + f"</tr></thead><tbody>{rows_q}</tbody></table>")
        body = charts.per_layer_bars([r["pass"] for r in sec["rows"]],
                                     [float(r.get("rel_l2") or 0.0) for r in sec["rows"]],
                                     xlabel="relative L2 error of the outputs vs the input model",
                                     color="#c2703b") + table
        parts.append(_section("chart-quality", "Quality: output error against the input model", body,
                              chart=True, note=f"each lossy pass's model against the model given, on "
                              f"{sec['inputs']}" + ("; per-layer sensitivity below" if data.get("sensitivity") else "")))
    sec = data.get("sensitivity")
    if sec:
        series = sec.get("series") or {sec["key"]: sec["values"]}
        chosen = sec.get("chosen") or []
        head = "".join(f"<th>{escape(str(k))}</th>" for k in series) + ("<th>chosen</th>" if chosen else "")
        rows_html = []
        for i, layer in enumerate(sec["layers"]):
            cells = "".join(
                f'<td data-v="{v[i] if v[i] is not None else ""}">{"–" if v[i] is None else f"{v[i]:.4g}"}</td>'
                for v in series.values())
            if chosen:
                cells += f'<td class="l">{escape(str(chosen[i] or "–"))}</td>'
            rows_html.append(f'<tr><td class="l">{escape(layer)}</td>{cells}</tr>')
        table = (f'<table class="sortable"><thead><tr><th>layer</th>{head}</tr></thead>'
                 f'<tbody>{"".join(rows_html)}</tbody></table>')
        body = charts.sensitivity(sec)
        body += f"<details><summary>all {len(sec['layers'])} layers</summary>{table}</details>"
        parts.append(_section("chart-sensitivity", "Per-layer quantization sensitivity", body, chart=True,
                              note=f"recorded by pass '{sec['pass']}'; the 40 most sensitive layers shown"))
    sec = data.get("sparsity")
    if sec:
        rows = sorted(zip(sec["layers"], sec["values"]), key=lambda p: -p[1])
        body = charts.per_layer_bars(sec["layers"], sec["values"], xlabel=f"% {sec['kind']}",
                                     percent=True, color="#2f9e8f")
        body += f"<details><summary>all {len(rows)} layers</summary>{_kv_table(rows, ('layer', sec['kind']), lambda v: f'{v:.1%}')}</details>"
        parts.append(_section("chart-sparsity", "Sparsity per layer", body, chart=True,
                              note=f"recorded by pass '{sec['pass']}'"))
    sec = data.get("memory")
    if sec:
        note = (f"{len(sec['steps'])} steps, algorithm {sec.get('algorithm')}, peak at node "
                f"{sec.get('peak_node')}")
        parts.append(_section("chart-memory", "Memory timeline", charts.memory_timeline(sec),
                              chart=True, note=note))
    sec = data.get("latency")
    if sec:
        parts.append(_section("chart-latency", "Latency side by side", charts.latency(sec), chart=True,
                              note="median milliseconds per inference; ratios against the first bar"))
    hist_b, hist_a = models["before"].get("op_histogram", {}), models["after"].get("op_histogram", {})
    ops = sorted(set(hist_b) | set(hist_a), key=lambda k: -(hist_a.get(k, 0) + hist_b.get(k, 0)))
    rows = "".join(f'<tr><td class="l">{escape(o)}</td><td>{hist_b.get(o, 0)}</td><td>{hist_a.get(o, 0)}</td></tr>'
                   for o in ops)
    parts.append(_section("operators", "Operators", '<table class="sortable"><thead><tr><th>op</th>'
                          f"<th>before</th><th>after</th></tr></thead><tbody>{rows}</tbody></table>"))
    extra = data.get("extra")
    if extra:
        rows_e = [(k, v if not isinstance(v, (dict, list)) else json.dumps(v, default=str)) for k, v in extra.items()]
        parts.append(_section("extra", "More", _kv_table(rows_e, ("item", "value"))))
    payload = json.dumps(data, default=str).replace("</", "<\\/")
    title = escape(str(data.get("title", "onnxpress report")))
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
        f"<title>{title}</title><style>{CSS}</style></head><body>"
        f"<header><h1>{title}</h1><p>onnxpress {escape(str(data.get('onnxpress_version', '')))} · "
        f"{escape(str(data.get('generated', '')))}</p></header><main>{''.join(parts)}</main>"
        f'<script type="application/json" id="onnxpress-report-data">{payload}</script>'
        f"<script>{SCRIPT}</script></body></html>\n")
