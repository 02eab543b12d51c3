"""What the benchmark runners measure about a process (each runner runs under its own
interpreter: this file is imported from the benches directory by all of them)."""

from __future__ import annotations


def peak_rss_mib(pid: int | str = "self") -> float:
    """A process's peak resident size (this one's by default). VmHWM is its own
    high-water mark, where getrusage's ru_maxrss would start from the parent's size
    at fork."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")
