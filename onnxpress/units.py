"""Human-readable sizes and counts, shared by the CLI, reports and pass tables."""

from __future__ import annotations

from typing import Any


def human_bytes(n: Any, digits: int = 2, *, compact: bool = False) -> str:
    """1536 -> '1.50 KiB' ('1.5K' when compact); non-numbers -> '–'."""
    if not isinstance(n, (int, float)):
        return "–"
    units = ("B", "K", "M", "G") if compact else ("B", "KiB", "MiB", "GiB")
    sep = "" if compact else " "
    for unit in units:
        if abs(n) < 1024 or unit == units[-1]:
            return f"{n:.0f}{sep}{unit}" if unit == "B" else f"{n:.{digits}f}{sep}{unit}"
        n /= 1024
    return str(n)


def human_count(n: Any) -> str:
    """38282 -> '38.28k', 1.8e9 -> '1.80G'; non-numbers -> '–'."""
    if not isinstance(n, (int, float)):
        return "–"
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return f"{n:.0f}"
