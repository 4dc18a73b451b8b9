"""Helpers shared by the benchmark scripts."""

from __future__ import annotations


def rss_mb(field: str) -> float:
    """A memory field of /proc/self/status in MiB: VmRSS (resident now) or VmHWM (peak resident)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")
