"""Speed and peak memory of `nestlearn.memory.scan`: chunked vs the token-by-token reference, forward + backward.

    python benchmarks/bench_memory.py                      # the table in docs/benchmarks.md, about 5 min on 2 cores
    python benchmarks/bench_memory.py --lengths 512 2048 --reference-lengths 512 --device cuda

Setting of issue #2: batch 4, heads 4, dim 64, MLP memory (hidden 256, GELU), chunk size 16, l2 objective, unit keys,
η in [0, 0.1], α in [0.99, 1], β in [0.9, 1]. Each measurement runs in a fresh process, so that its peak resident
memory (VmHWM) belongs to it alone: we report the peak minus the resident memory just before the call, i.e. what
the forward and backward pass themselves hold. Times are the median of --repeats runs after one warm-up run
(the reference runs once: it is slow). Subnormal floats are flushed to zero (torch.set_flush_denormal), as decayed
fast weights otherwise fall into the slow subnormal range on x86 CPUs; both implementations get the same setting.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F
from common import Device

RULES = {"gd": dict(rule="gd", momentum=False), "dgd+momentum": dict(rule="dgd", momentum=True)}


def measure_one(impl: str, T: int, rule: str, device: str, repeats: int) -> dict:
    from nestlearn.memory import init_state, scan

    torch.set_flush_denormal(True)
    torch.manual_seed(0)
    b, h, d = 4, 4, 64
    opts = RULES[rule]

    def inputs():
        q = torch.randn(b, h, T, d, device=device)
        k = F.normalize(torch.randn(b, h, T, d, device=device), dim=-1)
        v = torch.randn(b, h, T, d, device=device)
        lr = 0.1 * torch.rand(b, h, T, device=device)
        ret = 0.99 + 0.01 * torch.rand(b, h, T, device=device)
        mom = 0.9 + 0.1 * torch.rand(b, h, T, device=device) if opts["momentum"] else None
        state = init_state(h, d, memory="mlp", hidden_mult=4, momentum=opts["momentum"], device=device)
        xs = [q, k, v, lr, ret] + ([mom] if mom is not None else []) + list(state.weights.values())
        for x in xs:
            x.requires_grad_(True)
        return (q, k, v, lr, ret, mom), state

    def step(args, state):
        y, s = scan(*args, memory="mlp", objective="l2", rule=opts["rule"], chunk_size=16, state=state, impl=impl)
        loss = y.square().mean() + sum(w.square().mean() for w in s.weights.values())
        loss.backward()

    dev = Device(device)
    args, state = inputs()
    times = []
    runs = repeats + 1 if impl == "chunked" else 1
    dev.reset()
    base = dev.memory_mb()
    for _ in range(runs):
        dev.sync()
        t0 = time.perf_counter()
        step(args, state)
        dev.sync()
        times.append(time.perf_counter() - t0)
        for x in list(args) + list(state.weights.values()):
            if x is not None:
                x.grad = None
    if impl == "chunked":
        times = times[1:]  # the first run warms up allocators and kernels
    peak = dev.peak_mb()
    return {"impl": impl, "T": T, "rule": rule, "seconds": statistics.median(times), "peak_mb": peak - base}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[512, 1024, 2048, 8192], help="lengths for chunked")
    p.add_argument(
        "--reference-lengths",
        type=int,
        nargs="+",
        default=None,
        help="lengths for the reference (default: 2048 for gd; 1024 for dgd+momentum, whose reference needs more "
        "than 24 GiB at 2048)",
    )
    p.add_argument("--rules", nargs="+", default=list(RULES), choices=list(RULES), help="update rules to measure")
    p.add_argument("--repeats", type=int, default=3, help="timed runs of the chunked path (median reported)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--one", nargs=3, metavar=("IMPL", "T", "RULE"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        impl, T, rule = args.one
        print(json.dumps(measure_one(impl, int(T), rule, args.device, args.repeats)))
        return

    machine = platform.processor() or platform.machine()
    print(f"# {machine}, {torch.get_num_threads()} threads, torch {torch.__version__}, device {args.device}")
    rows = []
    for rule in args.rules:
        ref_lengths = args.reference_lengths or ([2048] if rule == "gd" else [1024])
        jobs = [("chunked", T) for T in args.lengths] + [("reference", T) for T in ref_lengths]
        for impl, T in jobs:
            cmd = [
                sys.executable,
                __file__,
                "--one",
                impl,
                str(T),
                rule,
                "--device",
                args.device,
                "--repeats",
                str(args.repeats),
            ]
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode != 0:  # e.g. killed for memory: say so and go on with the other measurements
                print(f"  {rule:13s} {impl:9s} T={T:5d}  FAILED (exit {done.returncode}): {done.stderr[-300:]}")
                continue
            row = json.loads(done.stdout.strip().splitlines()[-1])
            rows.append(row)
            secs, peak = row["seconds"], row["peak_mb"]
            print(f"  {rule:13s} {impl:9s} T={T:5d}  {secs:8.3f} s  peak {peak:8.1f} MiB", flush=True)

    print("\n| rule | impl | T | fwd+bwd (s) | tokens/s | peak extra memory (MiB) |")
    print("| --- | --- | ---: | ---: | ---: | ---: |")
    for r in rows:
        tps = 4 * r["T"] / r["seconds"]
        print(f"| {r['rule']} | {r['impl']} | {r['T']} | {r['seconds']:.3f} | {tps:,.0f} | {r['peak_mb']:.0f} |")
    for rule in args.rules:
        by = {(r["impl"], r["T"]): r for r in rows if r["rule"] == rule}
        for T in sorted({r["T"] for r in rows if r["rule"] == rule and r["impl"] == "reference"}):
            if ("chunked", T) in by and ("reference", T) in by:
                speedup = by[("reference", T)]["seconds"] / by[("chunked", T)]["seconds"]
                print(f"\n{rule}: chunked is {speedup:.1f}x faster than the reference at T = {T}")
        if ("chunked", 2048) in by and ("chunked", 8192) in by:
            ratio = by[("chunked", 8192)]["peak_mb"] / by[("chunked", 2048)]["peak_mb"]
            print(f"{rule}: peak memory at T = 8192 is {ratio:.2f}x that at T = 2048 (linear growth: 4x)")


if __name__ == "__main__":
    main()
