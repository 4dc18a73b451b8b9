"""Helpers shared by the benchmark scripts."""

from __future__ import annotations

import contextlib

import torch


def rss_mb(field: str) -> float:
    """A memory field of /proc/self/status in MiB: VmRSS (resident now) or VmHWM (peak resident)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


class Device:
    """Where a measurement runs: synchronisation, autocast and peak memory for CPU (resident memory) or CUDA."""

    def __init__(self, name: str, precision: str = "fp32"):
        self.device, self.cuda = torch.device(name), name.startswith("cuda")
        self.precision = precision

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def autocast(self):
        bf16 = self.precision == "bf16"
        return torch.autocast(self.device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()

    def memory_mb(self) -> float:
        """Memory in use now (and, by `peak_mb`, at most since `reset`)."""
        return torch.cuda.memory_allocated(self.device) / 2**20 if self.cuda else rss_mb("VmRSS")

    def reset(self) -> None:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)

    def peak_mb(self) -> float:
        return torch.cuda.max_memory_allocated(self.device) / 2**20 if self.cuda else rss_mb("VmHWM")
