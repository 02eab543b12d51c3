"""Human-readable sizes, for the CLI and `/health`."""

from __future__ import annotations


def format_bytes(n: float, *, binary: bool = True) -> str:
    """``1536`` -> ``1.5 KiB`` (binary) or ``1.5 KB`` (decimal, as `/health` reports)."""
    step, units = (1024, ("B", "KiB", "MiB", "GiB")) if binary else (1000, ("B", "KB", "MB", "GB"))
    for unit in units:
        if n < step or unit == units[-1]:
            return f"{int(n)} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= step
    raise AssertionError("unreachable")
