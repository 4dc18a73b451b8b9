"""Where and how a model runs: the device, the precision, subnormal floats, and the process group under torchrun."""

from __future__ import annotations

import contextlib
import os
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = [
    "Dist",
    "setup_distributed",
    "flush_subnormals",
    "resolve_device",
    "check_device",
    "autocast",
    "set_threads",
    "SharedCPUWarning",
]


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


def check_device(name: str) -> None:
    """`name` is auto or anything torch.device accepts (cpu, cuda, cuda:1, mps); else a ValueError naming the
    choices, so that a bad device is refused where it is given, not deep in torch."""
    if name == "auto":
        return
    try:
        torch.device(name)
    except RuntimeError:
        raise ValueError(f"{name!r} is not a device: use auto, cpu, cuda or cuda:N") from None


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "auto":
        return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    try:
        check_device(name)
    except ValueError as e:
        raise ValueError(f"device={e}") from None
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={name!r} but no GPU is visible to torch; use --device cpu or auto")
    return device


def model_device(model: torch.nn.Module) -> torch.device:
    """Where `model`'s parameters are (the CPU for a model without any, e.g. a test's stand-in): inputs go there."""
    return next((p.device for p in model.parameters()), torch.device("cpu"))


def autocast(device: torch.device, precision: str):
    """bfloat16 autocast for `bf16`, and for `auto` on a GPU; nothing otherwise."""
    bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    return torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()


class SharedCPUWarning(UserWarning):
    """Other processes are using the CPU that torch's threads are about to compete for."""


def set_threads(threads: int | None, device: torch.device | None = None) -> int:
    """Use `threads` CPU threads (None: torch's choice, one per core) and warn when the machine looks shared.

    torch's CPU kernels split every operation over all their threads and wait for the slowest; a thread that loses
    its core to another process holds up the others, and the memories' many small operations suffer most (Hope ran
    10.8x slower per step beside one busy process on 2 cores, 1.2x with one thread; docs/training.md, "Sharing the
    CPU"). Returns the thread count."""
    if threads is not None:
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
            raise ValueError(f"threads={threads!r} must be a positive number of CPU threads")
        torch.set_num_threads(threads)
    n = torch.get_num_threads()
    if device is None or device.type == "cpu":
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        busy = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
        spare = max(1, round(cores - busy))
        if n > 1 and busy >= 1.0 and spare < n:  # a core's worth of other work; one thread waits on no other
            warnings.warn(
                f"the machine's load is {busy:.1f} on {cores} cores: other processes are using the CPU, and "
                f"torch's {n} threads will wait on each other (a Hope step took 10.8x as long this way). Pass "
                f"--threads {spare}, or run alone (docs/training.md, 'Sharing the CPU')",
                SharedCPUWarning,
                stacklevel=2,
            )
    return n
