"""Where one block's time goes: a preset's token mixer (or CMS, or whole block) alone, forward and backward, timed
and with its operator calls counted (issue #3, §5; the figures are in docs/benchmarks.md).

    python benchmarks/bench_block.py                                   # Hope's and the Transformer's mixers
    python benchmarks/bench_block.py --presets hope --head-width 8 64  # the same heads, little arithmetic at 8
    python benchmarks/bench_block.py --presets hope --part cms --compile

Defaults: size tiny, T = 2048, one block.

Time: one untimed pass, then the best of --repeats passes of forward, then backward of the mean of the squared
output, for a random (1, T, dim) input and a fresh state; the input and the part's parameters take gradients, as in
training. Operator calls (eager only): one more pass under a `TorchDispatchMode` that counts every ATen call (views
included) and does nothing else, so that per-operator cost can be told from arithmetic: run the same part with a small
--head-width (dim = head width × heads, the rest as the preset), where the products cost almost nothing.
"""

from __future__ import annotations

import argparse
import platform
import time

import torch
from bench_models import apply_settings, check_settings
from torch.utils._python_dispatch import TorchDispatchMode

PARTS = ("mixer", "cms", "block")


class CountOps(TorchDispatchMode):
    """Counts the ATen operator calls made under it."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls += 1
        return func(*args, **(kwargs or {}))


def measure(
    preset: str, size: str, part: str, T: int, head_width: int | None, settings: list[str], compile_: bool, repeats: int
) -> dict:
    from nestlearn import build, presets

    config = apply_settings(presets.PRESETS[preset](size), settings)
    config.num_layers, config.seq_len = 1, max(config.seq_len, T)
    if head_width is not None:
        config.dim = head_width * config.num_heads
    model = build(config)
    if compile_:
        model.compile_chunks()
    block = model.blocks[0]
    module = {"mixer": block.mixer, "cms": block.cms, "block": block}[part]
    x = torch.randn(1, T, config.dim, generator=torch.Generator().manual_seed(0), requires_grad=True)

    def init_state():
        state = block.init_state(1, x.device, x.dtype)
        return state if part == "block" else state[part]

    def forward():
        y, _ = module(x, init_state())
        return y

    forward().square().mean().backward()  # untimed: faults in memory, compiles with --compile
    best = None
    for _ in range(repeats):
        t0 = time.perf_counter()
        y = forward()
        t1 = time.perf_counter()
        y.square().mean().backward()
        t2 = time.perf_counter()
        del y  # nothing of this pass's graph outlives it
        if best is None or t2 - t0 < sum(best):
            best = (t1 - t0, t2 - t1)
    ops = None
    if not compile_:  # the counts describe eager execution; compiled graphs fuse calls, so none are taken there
        with CountOps() as fwd_ops:
            y = forward()
        with CountOps() as bwd_ops:
            y.square().mean().backward()
        ops = (fwd_ops.calls, bwd_ops.calls)
    return {
        "preset": preset,
        "part": part,
        "T": T,
        "head_width": config.dim // config.num_heads,
        "forward_s": best[0],
        "backward_s": best[1],
        "ops": ops,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", nargs="+", default=["transformer", "hope"])
    p.add_argument("--size", default="tiny")
    p.add_argument("--part", default="mixer", choices=PARTS, help="what to run (default: mixer)")
    p.add_argument("--lengths", type=int, nargs="+", default=[2048], help="T, tokens per pass (default: 2048)")
    p.add_argument(
        "--head-width",
        type=int,
        nargs="+",
        default=[None],
        metavar="W",
        help="dim = W × heads instead of the size's dim (default: the size's)",
    )
    p.add_argument("--set", nargs="+", default=[], metavar="SUB.FIELD=VALUE", help="as in bench_models.py")
    p.add_argument("--compile", action="store_true", help="model.compile_chunks(), as `train --compile`")
    p.add_argument("--repeats", type=int, default=3, help="timed passes; the best is reported (default: 3)")
    args = p.parse_args()
    for name, values in (("--lengths", args.lengths), ("--head-width", [w for w in args.head_width if w is not None])):
        if any(v < 1 for v in values):
            p.error(f"{name} {values}: every value must be a positive int")
    if args.repeats < 1:
        p.error(f"--repeats {args.repeats}: must be at least 1")
    from nestlearn import presets

    unknown = [name for name in args.presets if name not in presets.PRESETS]
    if unknown:
        p.error(f"--presets {unknown}: not known; expected some of {list(presets.PRESETS)}")
    check_settings(p, args.presets, args.size, args.set)
    torch.set_flush_denormal(True)  # as `nestlearn train` does
    print(
        f"# {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch "
        f"{torch.__version__}, size {args.size}, part {args.part}"
        + (", compiled" if args.compile else "")
        + (f", set {' '.join(args.set)}" if args.set else "")
    )
    print("| preset | T | head width | forward (s) | backward (s) | operator calls forward | backward |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for preset in args.presets:
        for T in args.lengths:
            for width in args.head_width:
                r = measure(preset, args.size, args.part, T, width, args.set, args.compile, args.repeats)
                calls = "n/a | n/a" if r["ops"] is None else f"{r['ops'][0]:,} | {r['ops'][1]:,}"
                print(
                    f"| {preset} | {T} | {r['head_width']} | {r['forward_s']:.3f} | {r['backward_s']:.3f} | {calls} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
