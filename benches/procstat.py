"""What both benchmark runners measure about their own process (each runs under its
own interpreter: this file is imported from the benches directory by both)."""

from __future__ import annotations


def peak_rss_mib() -> float:
    """This process's peak resident size. VmHWM is its own high-water mark, where
    getrusage's ru_maxrss would start from the parent's size at fork."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")
