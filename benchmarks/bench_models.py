"""Training and decoding speed and memory of the presets at the same size (issue #3, §5).

    python benchmarks/bench_models.py                          # the table in docs/benchmarks.md (~20 min, 2 cores)
    python benchmarks/bench_models.py --presets transformer hope --lengths 512 --size debug
    python benchmarks/bench_models.py --skip-decode --lengths 2048 --flops   # + matrix-product FLOPs per token
    python benchmarks/bench_models.py --device cuda --precision bf16 --size 170m --batch 8   # on a GPU
    python benchmarks/bench_models.py --presets transformer hope --set sm_titans.chunk_size=64   # a variant

Training: one forward + backward of the LM loss on a batch of --batch sequences of T tokens, in a fresh process
per measurement, so that its peak resident memory (VmHWM) belongs to it alone; we report the peak minus the
resident memory before the first step. Time: the first step is untimed (it faults in the memory every later
step reuses, 1.3-1.6x slower than the rest for Hope), then the faster of two timed steps for T <= 2048, else one,
each step in a function so that nothing of its graph outlives it (see `step` below). Decoding: prefill
--context tokens without gradients, then time --decode single-token steps, and report the size of the state
(KV caches, memories) before and after. Each process runs under an address-space limit (--mem-limit-gb), so that
a measurement that does not fit fails with an allocation error instead of bringing the machine down.

On a GPU (--device cuda) every timed step ends with a synchronisation, and peak memory is the allocator's peak
(torch.cuda.max_memory_allocated) minus what was allocated before the first step; no address-space limit then.
--precision bf16 runs the forward under bfloat16 autocast, as `nestlearn train` does on a GPU by default (the
memories' recurrences stay float32, docs/training.md).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import resource
import subprocess
import sys
import time

import torch
from common import Device


def state_mb(state) -> float:
    from nestlearn.model import tree_map

    sizes = []
    tree_map(lambda x: sizes.append(x.numel() * x.element_size()), state.layers)
    return sum(sizes) / 2**20


def apply_settings(config, settings: list[str]):
    """Each "sub.field=value" or "field=value" (value as JSON, else a string) set on the config through
    dataclasses.replace, all of one sub-config at once, so that it checks them together (sm_titans.chunk_size=64
    with sm_titans.memory_chunk_size=64). Every preset has every sub-config (attention, titans, sm_titans, cms)."""
    groups: dict[str | None, dict] = {}
    for item in settings:
        path, sep, raw = item.partition("=")
        names = path.split(".")
        if not sep or len(names) > 2:
            raise ValueError(f"{item!r}: expected FIELD=VALUE or SUB.FIELD=VALUE, e.g. sm_titans.chunk_size=64")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        sub, field = (None, names[0]) if len(names) == 1 else names
        groups.setdefault(sub, {})[field] = tuple(value) if isinstance(value, list) else value
    for sub, changes in groups.items():
        if sub is None:
            config = dataclasses.replace(config, **changes)
        elif not dataclasses.is_dataclass(getattr(config, sub, None)):
            raise ValueError(f"{sub!r} is not a sub-config; expected one of attention, titans, sm_titans, cms")
        else:
            config = dataclasses.replace(config, **{sub: dataclasses.replace(getattr(config, sub), **changes)})
    return config


def check_settings(parser: argparse.ArgumentParser, names: list[str], size: str, settings: list[str]) -> None:
    """Refuse a bad --set before any measurement: apply it to every preset's config at `size` (which validates it)."""
    from nestlearn import presets

    try:
        for name in names:
            apply_settings(presets.PRESETS[name](size), settings)
    except (ValueError, TypeError) as e:
        parser.error(f"--set: {e}")


def train_one(
    preset: str,
    size: str,
    T: int,
    batch: int,
    checkpoint: bool = False,
    compile: bool = False,
    flops: bool = False,
    dev: Device | None = None,
    settings: list[str] = (),
) -> dict:
    from nestlearn import build, presets

    dev = dev or Device("cpu", "fp32")

    torch.manual_seed(0)
    config = apply_settings(presets.PRESETS[preset](size), list(settings))
    for sub in (config.titans, config.sm_titans, config.cms):
        if sub is not None:
            sub.checkpoint = checkpoint
    model = build(config).to(dev.device)
    x = torch.randint(0, model.config.vocab_size, (batch, T + 1), device=dev.device)

    def step() -> float:
        # A function, so that the loss and the final state (and through them the graph's leftovers) are gone before
        # the next step: kept alive, they fragment the heap and Hope's next step ran 1.3x slower (docs/benchmarks.md)
        dev.sync()
        t0 = time.perf_counter()
        with dev.autocast():
            loss, _ = model.loss(x)
        loss.backward()
        model.zero_grad(set_to_none=True)
        dev.sync()
        return time.perf_counter() - t0

    if compile:  # as `nestlearn train --compile`: the memories' chunk steps, or the whole attention-only model
        if model.has_memories():
            model.compile_chunks()
        else:
            model.compile()  # nn.Module.compile: the forward, in place
    dev.reset()
    base = dev.memory_mb()
    first = step()  # untimed: compiles (with --compile) and faults in the memory the later steps reuse
    peak = dev.peak_mb() - base  # the compiling step's peak is the compiler's, hence not reported then
    times = [step() for _ in range(2 if T <= 2048 else 1)]
    extra = {}
    if flops:  # matrix products only, in one more (untimed) step
        from torch.utils.flop_counter import FlopCounterMode, baddbmm_flop, register_flop_formula

        # the memories' end-of-chunk update is an in-place baddbmm_, which the counter does not know by itself
        register_flop_formula(torch.ops.aten.baddbmm_, get_raw=True)(baddbmm_flop)
        with FlopCounterMode(display=False) as counter:
            step()
        extra["mflop_per_token"] = counter.get_total_flops() / (batch * T) / 1e6
    return {
        "kind": "train",
        "preset": preset,
        "T": T,
        "seconds": min(times),
        "tokens_per_s": batch * T / min(times),
        "peak_mb": peak,
        "params": model.num_parameters(),
        "first_s": first,
        "settings": list(settings),
        "compile_s": max(0.0, first - min(times)) if compile else 0.0,
        **extra,
    }


@torch.no_grad()
def decode_one(
    preset: str, size: str, context: int, steps: int, dev: Device | None = None, settings: list[str] = ()
) -> dict:
    from nestlearn import build, presets

    dev = dev or Device("cpu", "fp32")
    torch.manual_seed(0)
    model = build(apply_settings(presets.PRESETS[preset](size), list(settings))).to(dev.device).eval()
    x = torch.randint(0, model.config.vocab_size, (1, context), device=dev.device)
    dev.reset()
    base = dev.memory_mb()
    with dev.autocast():
        _, state = model(x)
    before = state_mb(state)
    tok = x[:, -1:]
    dev.sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        with dev.autocast():
            logits, state = model(tok, state)
        tok = logits[:, -1:].argmax(-1)
    dev.sync()
    seconds = time.perf_counter() - t0
    peak = dev.peak_mb() - base
    return {
        "kind": "decode",
        "preset": preset,
        "T": context,
        "tokens_per_s": steps / seconds,
        "state_mb_before": before,
        "state_mb_after": state_mb(state),
        "peak_mb": peak,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--presets", nargs="+", default=["transformer", "titans", "hope_attention", "hope"])
    p.add_argument("--size", default="tiny")
    p.add_argument(
        "--lengths",
        type=int,
        nargs="*",
        default=[512, 2048, 8192],
        help="training lengths T; none (`--lengths` alone): decoding only",
    )
    p.add_argument("--batch", type=int, default=1, help="sequences per training step")
    p.add_argument("--context", type=int, default=8192, help="decoding: tokens of context before timing")
    p.add_argument("--decode", type=int, default=32, help="decoding: timed single-token steps")
    p.add_argument("--mem-limit-gb", type=float, default=20.0, help="address-space limit of each measurement")
    p.add_argument("--checkpoint", action="store_true", help="training: recompute the memories' chunks in backward")
    p.add_argument("--compile", action="store_true", help="training: as `train --compile`, first step untimed")
    p.add_argument("--skip-decode", action="store_true", help="measure training only")
    p.add_argument("--flops", action="store_true", help="training: also count matrix-product FLOPs per token")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: cpu)")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"], help="bf16: autocast (default: fp32)")
    p.add_argument(
        "--set",
        nargs="+",
        default=[],
        metavar="SUB.FIELD=VALUE",
        help="change a config field of every preset, e.g. sm_titans.chunk_size=64 (nestlearn/config.py "
        "lists the fields, docs/deviations.md the choices behind them)",
    )
    p.add_argument("--one", nargs=3, metavar=("KIND", "PRESET", "T"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error(f"--device {args.device} but torch sees no GPU (torch {torch.__version__}); use --device cpu")
    if args.set and not args.one:
        check_settings(p, args.presets, args.size, args.set)
    if args.one:
        dev = Device(args.device, args.precision)
        if not dev.cuda:  # CUDA reserves far more address space than it uses: no limit there
            limit = int(args.mem_limit_gb * 2**30)
            resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
            torch.set_flush_denormal(True)
        kind, preset, T = args.one
        if kind == "train":
            row = train_one(
                preset, args.size, int(T), args.batch, args.checkpoint, args.compile, args.flops, dev, args.set
            )
        else:
            row = decode_one(preset, args.size, int(T), args.decode, dev, args.set)
        print(json.dumps(row))
        return

    if args.device.startswith("cuda"):
        machine = f"{torch.cuda.get_device_name(torch.device(args.device))}"
    else:
        machine = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    print(
        f"# {machine}, torch {torch.__version__}, size {args.size}, batch {args.batch}, {args.precision}"
        f"{', memory checkpointing' if args.checkpoint else ''}{', compiled' if args.compile else ''}"
        f"{', set ' + ' '.join(args.set) if args.set else ''}"
    )
    jobs = [("train", pr, T) for T in args.lengths for pr in args.presets]
    jobs += [] if args.skip_decode else [("decode", pr, args.context) for pr in args.presets]
    rows = []
    for kind, preset, T in jobs:
        cmd = [
            sys.executable,
            __file__,
            "--one",
            kind,
            preset,
            str(T),
            "--size",
            args.size,
            "--batch",
            str(args.batch),
            "--decode",
            str(args.decode),
            "--mem-limit-gb",
            str(args.mem_limit_gb),
            "--device",
            args.device,
            "--precision",
            args.precision,
        ]
        cmd += ["--checkpoint"] if args.checkpoint else []
        cmd += ["--compile"] if args.compile else []
        cmd += ["--flops"] if args.flops else []
        cmd += ["--set", *args.set] if args.set else []
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            err = done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit {done.returncode}"
            print(f"  {kind:6s} {preset:15s} T={T:5d}  FAILED: {err[:160]}", flush=True)
            rows.append({"kind": kind, "preset": preset, "T": T, "failed": err[:160]})
            continue
        row = json.loads(done.stdout.strip().splitlines()[-1])
        rows.append(row)
        extra = f"  first step {row['first_s']:.1f} s" if "first_s" in row else ""
        extra += f"  compile {row['compile_s']:.0f} s" if row.get("compile_s") else ""
        extra += f"  set {' '.join(row['settings'])}" if row.get("settings") else ""
        extra += f"  {row['mflop_per_token']:.1f} MFLOP/token" if "mflop_per_token" in row else ""
        print(
            f"  {kind:6s} {preset:15s} T={T:5d}  {row['tokens_per_s']:9.1f} tok/s  peak {row['peak_mb']:8.0f} MiB"
            f"{extra}",
            flush=True,
        )

    flop_cols = " MFLOP/token | GFLOP/s |" if args.flops else ""
    print(f"\n| preset | T | train tokens/s | vs transformer | peak extra memory (MiB) |{flop_cols}")
    print("| --- | ---: | ---: | ---: | ---: |" + (" ---: | ---: |" if args.flops else ""))
    ref = {r["T"]: r for r in rows if r["kind"] == "train" and r["preset"] == "transformer" and "failed" not in r}
    for r in rows:
        if r["kind"] != "train":
            continue
        if "failed" in r:
            print(f"| {r['preset']} | {r['T']} | failed: {r['failed']} | | |")
            continue
        rel = f"{r['tokens_per_s'] / ref[r['T']]['tokens_per_s']:.2f}x" if r["T"] in ref else "n/a"
        flops = ""
        if "mflop_per_token" in r:
            flops = f" {r['mflop_per_token']:.1f} | {r['mflop_per_token'] * r['tokens_per_s'] / 1e3:.1f} |"
        print(f"| {r['preset']} | {r['T']} | {r['tokens_per_s']:,.0f} | {rel} | {r['peak_mb']:,.0f} |{flops}")
    print(
        f"\n| preset | decode tokens/s at {args.context} context | state (MiB) after {args.context} | "
        f"after {args.decode} more tokens | peak extra memory (MiB) |"
    )
    print("| --- | ---: | ---: | ---: | ---: |")
    for r in rows:
        if r["kind"] == "decode" and "failed" not in r:
            print(
                f"| {r['preset']} | {r['tokens_per_s']:.1f} | {r['state_mb_before']:.2f} | {r['state_mb_after']:.2f} "
                f"| {r['peak_mb']:,.0f} |"
            )
        elif r["kind"] == "decode":
            print(f"| {r['preset']} | failed: {r['failed']} | | | |")


if __name__ == "__main__":
    main()
