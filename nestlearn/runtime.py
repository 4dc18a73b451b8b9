"""Where and how a model runs: the device, the precision, subnormal floats, and the process group under torchrun."""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = ["Dist", "setup_distributed", "flush_subnormals", "resolve_device", "autocast"]


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_distributed(device: str) -> Dist:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1); gloo on CPU, nccl on GPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Dist()
    if not dist.is_initialized():
        gpu = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
        dist.init_process_group("nccl" if gpu else "gloo")
    return Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def flush_subnormals(device: torch.device) -> None:
    """On CPU, treat subnormal floats as zero. Momentum and retention decay fast weights geometrically, into the
    subnormal range within a few hundred tokens, where x86 arithmetic is many times slower (docs/benchmarks.md);
    values that small change nothing, so the whole process flushes them."""
    if device.type == "cpu":
        torch.set_flush_denormal(True)


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "auto":
        return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={name!r} but no GPU is visible to torch; use --device cpu or auto")
    return device


def autocast(device: torch.device, precision: str):
    """bfloat16 autocast for `bf16`, and for `auto` on a GPU; nothing otherwise."""
    bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    return torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
