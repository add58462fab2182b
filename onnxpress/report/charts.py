"""Charts of the report, drawn with matplotlib as inline SVG (no script, no network, no fonts).

Each function takes a section of the figures dict (figures.py) and returns an `<svg>` string
ready to be placed in HTML. Long per-layer series are cut to the `top` largest values; the full
series stays in the JSON twin and in the report's tables.
"""

from __future__ import annotations

import io
import re
from collections.abc import Mapping, Sequence
from typing import Any

from onnxpress.errors import MissingExtraError
from onnxpress.units import human_bytes

BEFORE, AFTER = "#9aa5b1", "#2f6fde"
ACCENT, WARN = "#e8833a", "#c23b3b"


def _mpl():
    try:
        import matplotlib
    except ImportError:
        raise MissingExtraError("the HTML report draws its charts with matplotlib: "
                                "pip install 'onnxpress[report]'") from None
    from matplotlib.figure import Figure

    return matplotlib, Figure


def _fmt_bytes(n: float) -> str:
    return human_bytes(n, 1)

def _short(name: str, width: int = 34) -> str:
    return name if len(name) <= width else "…" + name[-(width - 1):]


def _to_svg(fig: Any) -> str:
    matplotlib, _ = _mpl()
    buf = io.StringIO()
    with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": "onnxpress"}):
        fig.savefig(buf, format="svg", bbox_inches="tight",
                    metadata={"Creator": None, "Date": None, "Format": None, "Type": None})
    text = buf.getvalue()
    # Inline SVG in HTML needs neither the XML prolog, the DOCTYPE nor namespace declarations
    # (the HTML parser knows svg and xlink), and they are the only URLs matplotlib writes.
    text = text[text.index("<svg"):]
    text = re.sub(r'\s+xmlns(:\w+)?="[^"]*"', "", text)
    text = re.sub(r"<metadata>.*?</metadata>", "", text, flags=re.S)
    return text.replace("<svg ", '<svg role="img" ', 1)


def _figure(width: float, height: float):
    _, Figure = _mpl()
    fig = Figure(figsize=(width, height), dpi=96)
    fig.set_facecolor("white")
    return fig


def _style(ax: Any) -> None:
    ax.spines[["top", "right"]].set_visible(False)
    ax.grid(axis="x", color="#e5e8eb", linewidth=0.8)
    ax.set_axisbelow(True)


def size_by_op(section: Mapping[str, Any], top: int = 15) -> str:
    ops = list(section["op_types"])[:top]
    b = [v / 1024 for v in section["before"][:top]]
    a = [v / 1024 for v in section["after"][:top]]
    fig = _figure(7.5, 0.45 * len(ops) + 1.2)
    ax = fig.subplots()
    y = list(range(len(ops)))
    ax.barh([i + 0.2 for i in y], b, height=0.4, color=BEFORE, label="before")
    ax.barh([i - 0.2 for i in y], a, height=0.4, color=AFTER, label="after")
    ax.set_yticks(y, ops)
    ax.invert_yaxis()
    ax.set_xlabel("weight KiB")
    for i, (vb, va) in enumerate(zip(section["before"][:top], section["after"][:top])):
        ax.text(max(b[i], a[i]), i, "  " + _fmt_bytes(vb) + " → " + _fmt_bytes(va),
                va="center", fontsize=8, color="#333")
    ax.margins(x=0.35)
    ax.legend(loc="lower right", frameon=False)
    _style(ax)
    return _to_svg(fig)


def per_layer_bars(layers: Sequence[str], values: Sequence[float], *, xlabel: str, top: int = 40,
                   color: str = ACCENT, percent: bool = False) -> str:
    pairs = sorted(zip(layers, values), key=lambda p: -p[1])[:top]
    fig = _figure(7.5, 0.28 * len(pairs) + 1.2)
    ax = fig.subplots()
    names = [_short(n) for n, _ in pairs]
    vals = [v * 100 if percent else v for _, v in pairs]
    ax.barh(range(len(pairs)), vals, height=0.7, color=color)
    ax.set_yticks(range(len(pairs)), names, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel(xlabel)
    if percent:
        ax.set_xlim(0, 100)
    _style(ax)
    return _to_svg(fig)


def sensitivity(section: Mapping[str, Any], top: int = 40) -> str:
    """Per-layer sensitivity: one bar per precision measured (int8, int4...), most sensitive first."""
    series = section.get("series") or {section.get("key", "value"): section["values"]}
    main = list(section["values"])
    order = sorted(range(len(main)), key=lambda i: -main[i])[:top]
    names = [_short(section["layers"][i]) for i in order]
    k = len(series)
    height = 0.8 / k
    palette = [ACCENT, AFTER, "#2f9e8f", BEFORE]
    fig = _figure(7.5, (0.22 + 0.1 * k) * len(order) + 1.3)
    ax = fig.subplots()
    for j, (label, values) in enumerate(series.items()):
        ys = [i + (j - (k - 1) / 2) * height for i in range(len(order))]
        xs = [values[i] if values[i] is not None else 0.0 for i in order]
        ax.barh(ys, xs, height=height, color=palette[j % len(palette)], label=str(label))
    ax.set_yticks(range(len(order)), names, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel(f"{section.get('key', 'sensitivity')} (higher: more sensitive)")
    if k > 1:
        ax.legend(loc="lower right", frameon=False, fontsize=8)
    _style(ax)
    return _to_svg(fig)


def memory_timeline(section: Mapping[str, Any]) -> str:
    steps, live = section["steps"], [v / 1024 for v in section["live_bytes"]]
    fig = _figure(7.5, 3.2)
    ax = fig.subplots()
    ax.fill_between(steps, live, step="mid", color=AFTER, alpha=0.25, linewidth=0)
    ax.step(steps, live, where="mid", color=AFTER, linewidth=1.2, label="live activations")
    if section.get("arena_bytes"):
        ax.axhline(section["arena_bytes"] / 1024, color=ACCENT, linewidth=1.4,
                   label=f"arena {_fmt_bytes(section['arena_bytes'])}")
    if section.get("lower_bound_bytes"):
        ax.axhline(section["lower_bound_bytes"] / 1024, color=WARN, linestyle="--", linewidth=1,
                   label=f"lower bound {_fmt_bytes(section['lower_bound_bytes'])}")
    top = max(live + [section.get("arena_bytes", 0) / 1024,
                      section.get("lower_bound_bytes", 0) / 1024]) * 1.15 or 1.0
    if section.get("naive_bytes"):
        naive = section["naive_bytes"] / 1024
        label = f"no reuse {_fmt_bytes(section['naive_bytes'])}"
        if naive <= 2 * top:
            ax.axhline(naive, color=BEFORE, linestyle=":", linewidth=1, label=label)
            top = max(top, naive * 1.1)
        else:
            # drawn to scale, the no-reuse total would flatten the live curve to the axis
            ax.plot([], [], color=BEFORE, linestyle=":", label=f"{label} (off the scale)")
    ax.set_xlabel("step (node in execution order)")
    ax.set_ylabel("KiB")
    ax.set_ylim(0, top)
    ax.legend(loc="upper right", frameon=False, fontsize=8)
    ax.spines[["top", "right"]].set_visible(False)
    return _to_svg(fig)


def latency(section: Mapping[str, Any]) -> str:
    labels, ms = list(section["labels"]), list(section["ms"])
    fig = _figure(7.5, 0.5 * len(labels) + 1.2)
    ax = fig.subplots()
    base = ms[0]
    colors = [BEFORE if i == 0 else AFTER for i in range(len(ms))]
    ax.barh(range(len(ms)), ms, height=0.6, color=colors)
    ax.set_yticks(range(len(ms)), [_short(x, 40) for x in labels])
    ax.invert_yaxis()
    for i, v in enumerate(ms):
        ax.text(v, i, f"  {v:.3g} ms" + (f"  ({base / v:.2f}x)" if i and v else ""),
                va="center", fontsize=8)
    ax.margins(x=0.3)
    ax.set_xlabel("milliseconds per inference (lower is better)")
    _style(ax)
    return _to_svg(fig)


def pipeline_steps(passes: Sequence[Mapping[str, Any]]) -> str:
    """Weight bytes and node count after each pass (where the size went)."""
    names = ["input"] + [str(p.get("name")) for p in passes]
    size = [passes[0].get("bytes_before", 0) / 1024] + [p.get("bytes_after", 0) / 1024 for p in passes]
    nodes = [passes[0].get("nodes_before", 0)] + [p.get("nodes_after", 0) for p in passes]
    fig = _figure(7.5, 3.0)
    ax = fig.subplots()
    ax.plot(range(len(names)), size, marker="o", color=AFTER, label="model KiB")
    ax.set_ylabel("model KiB", color=AFTER)
    ax.set_ylim(bottom=0)
    ax2 = ax.twinx()
    ax2.plot(range(len(names)), nodes, marker="s", color=ACCENT, label="nodes")
    ax2.set_ylabel("nodes", color=ACCENT)
    ax2.set_ylim(bottom=0)
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
    ax.spines[["top"]].set_visible(False)
    ax2.spines[["top"]].set_visible(False)
    return _to_svg(fig)


__all__ = ["size_by_op", "per_layer_bars", "sensitivity", "memory_timeline", "latency", "pipeline_steps"]
