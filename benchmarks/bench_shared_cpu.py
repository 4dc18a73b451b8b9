"""What another busy process does to a training step, and what --threads does about it (docs/training.md,
"Sharing the CPU").

    python benchmarks/bench_shared_cpu.py                      # hope and transformer at debug size, T = 256
    python benchmarks/bench_shared_cpu.py --presets hope --size mini --batch 16

Three settings, each timed over --steps optimizer steps after one untimed step: alone with torch's default
threads; beside one busy process (a Python loop spinning on one core) with the default threads; beside it with
`torch.set_num_threads(cores - 1)`. Run it on an otherwise idle machine: the first row is the reference.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from nestlearn import build, presets


def seconds_per_step(preset: str, size: str, batch: int, seq_len: int, steps: int) -> float:
    torch.manual_seed(0)
    model = build(presets.PRESETS[preset](size))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randint(0, model.config.vocab_size, (batch, seq_len + 1))
    times = []
    for _ in range(steps + 1):
        t0 = time.perf_counter()
        logits, _ = model(x[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t0)
    return sum(times[1:]) / steps


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--presets", nargs="+", default=["hope", "transformer"])
    p.add_argument("--size", default="debug")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--steps", type=int, default=5)
    args = p.parse_args(argv)
    torch.set_flush_denormal(True)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    default = torch.get_num_threads()
    print(
        f"# {cores} cores, torch {torch.__version__}, {default} threads by default, {args.size}, "
        f"batch {args.batch} x {args.seq_len}"
    )
    print("| preset | alone | beside a busy process | beside it, --threads " + f"{max(1, cores - 1)} |")
    print("| --- | ---: | ---: | ---: |")
    for preset in args.presets:
        torch.set_num_threads(default)
        alone = seconds_per_step(preset, args.size, args.batch, args.seq_len, args.steps)
        busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
        try:
            time.sleep(1)
            shared = seconds_per_step(preset, args.size, args.batch, args.seq_len, args.steps)
            torch.set_num_threads(max(1, cores - 1))
            fewer = seconds_per_step(preset, args.size, args.batch, args.seq_len, args.steps)
        finally:
            busy.kill()
            busy.wait()
        print(
            f"| {preset} | {alone:.3f} s | {shared:.3f} s ({shared / alone:.1f}x) | {fewer:.3f} s "
            f"({fewer / alone:.1f}x) |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
