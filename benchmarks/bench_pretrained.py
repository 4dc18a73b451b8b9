"""A pretrained model in nestlearn against transformers' own: SmolLM2-135M, speed and memory (issue #22, §6).

    python benchmarks/bench_pretrained.py                      # the table in docs/benchmarks.md (~10 min, 2 cores)
    python benchmarks/bench_pretrained.py --lengths 512 --repeats 9 --workloads forward train
    python benchmarks/bench_pretrained.py --skip                # sm_titans at T = 2048 too (about 24 GiB)
    python benchmarks/bench_pretrained.py --model path/to/llama_folder --adapter-blocks 2 --json runs/other.json

The same Hugging Face Llama folder (default: SmolLM2-135M, `nestlearn fetch-model smollm2-135m`) runs as
transformers' `LlamaForCausalLM` (float32, attn_implementation="sdpa") and as `nestlearn.load(folder)`, on the same
random tokens, batch 1, T tokens per step. Workloads (--workloads):
- forward: logits without gradients;
- train: forward + backward of the next-token cross-entropy (computed the same way for both, from the logits), every
  parameter trainable, no optimizer step;
- frozen: every parameter frozen and the gradient taken with respect to the input of the first of the last
  --adapter-blocks blocks (a forward pre-hook makes it a leaf): the forward and the part of the backward that a
  memory adapter on a frozen base needs, without the adapter;
- titans, sm_titans (nestlearn only): `dataclasses.replace(config, adapter=..., adapter_blocks=k)`, built, started
  from the folder by `pretrained.initialise`, base frozen by `pretrained.freeze(model, "base")`; forward + backward
  + an AdamW step over the trainable parameters. Their reference is the `frozen` rows, with which they take turns.

Each (workload, implementation, T) runs in its own process, which loads its model, says so and then runs one step
per request from this script: one untimed warm-up step each, then --repeats timed steps, the implementations of a
workload taking turns (ABBA order), so that a change in the machine's load hits all of them; the median is reported
(the mean of two for the default T = 2048).
Memory: the process's peak resident memory (VmHWM) reset (/proc/self/clear_refs) after the model is loaded, its
weights read once (transformers maps them from the safetensors file, so that they become resident only when first
used) and the tokens made, then read after its last step, minus its resident memory at the reset: the activations,
gradients and optimizer state of the steps, without the weights and without the loading's own peak. Each process
runs under an address-space limit (--mem-limit-gb). Subnormal floats are flushed to zero in both, as `nestlearn
train` does. The load average before and after each workload (which counts this run's own two threads) and the
cores that other processes kept busy during its steps (/proc/stat less this run's processes) are printed and saved
with the results (--json).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from common import rss_mb

IMPLS = ("transformers", "nestlearn")
WORKLOADS = ("forward", "train", "frozen", "titans", "sm_titans")
ADAPTERS = ("titans", "sm_titans")
LABELS = {
    "forward": "forward, no grad",
    "train": "forward + backward, all trainable",
    "frozen": "frozen, backward through the last {k} blocks",
    "titans": "frozen base + titans adapter ({k} blocks), AdamW",
    "sm_titans": "frozen base + sm_titans adapter ({k} blocks), AdamW",
}


def load_model(impl: str, workload: str, folder: str, adapter_blocks: int):
    """The model, its blocks (for the frozen workload's hook) and a function from tokens (1, T) to logits."""
    if impl == "transformers":
        import transformers

        model = transformers.LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="sdpa")
        return model, model.model.layers, lambda x: model(x, use_cache=False).logits
    import nestlearn
    from nestlearn import pretrained

    model = nestlearn.load(folder)
    if workload in ADAPTERS:
        config = dataclasses.replace(model.config, adapter=workload, adapter_blocks=adapter_blocks)
        model = pretrained.initialise(nestlearn.build(config), model)
        pretrained.freeze(model, "base")
    return model, model.blocks, lambda x: model(x)[0]


def worker(impl: str, workload: str, T: int, folder: str, adapter_blocks: int) -> None:
    """One process's measurement, driven through stdin: "step" runs a step and answers its time, "done" answers the
    peak memory and ends. Answers are lines starting with "@ " on stdout (anything else there is a library's)."""

    def answer(**fields) -> None:
        print("@ " + json.dumps(fields), flush=True)

    torch.set_flush_denormal(True)
    model, blocks, logits_of = load_model(impl, workload, folder, adapter_blocks)
    vocab = model.config.vocab_size
    x = torch.randint(0, vocab, (1, T + 1), generator=torch.Generator().manual_seed(0))
    opt = None
    if workload in ("forward", "frozen"):
        model.requires_grad_(False)
    if workload == "frozen":
        first = len(blocks) - adapter_blocks
        # the input of block `first` becomes a leaf that takes a gradient: the backward runs from the loss to there
        blocks[first].register_forward_pre_hook(lambda _, args: (args[0].detach().requires_grad_(), *args[1:]))
    if workload in ADAPTERS:
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    model.train(workload != "forward")

    def step() -> float:
        # a function, so that nothing of one step's graph outlives it (see bench_models.py)
        t0 = time.perf_counter()
        if workload == "forward":
            with torch.no_grad():
                logits_of(x[:, :-1])
        else:
            logits = logits_of(x[:, :-1])
            loss = F.cross_entropy(logits.reshape(-1, vocab), x[:, 1:].reshape(-1))
            loss.backward()
            if opt is not None:
                opt.step()
                opt.zero_grad(set_to_none=True)
            else:
                model.zero_grad(set_to_none=True)
        return time.perf_counter() - t0

    with torch.no_grad():  # transformers maps the weights from the file: make them resident before the reset
        for t in (*model.parameters(), *model.buffers()):
            t.sum()
    reset = True
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # the peak resident memory starts again from the resident memory now
    except OSError:
        reset = False  # an older or restricted kernel: the peak then includes the loading's own
    base = rss_mb("VmRSS")
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    answer(loaded=True, base_mb=base, params=sum(p.numel() for p in model.parameters()), trainable=trainable)
    for line in sys.stdin:
        if line.strip() == "step":
            answer(seconds=step())
        else:
            break
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # the whole process's, loading included
    answer(peak_mb=rss_mb("VmHWM") - base, peak_reset=reset, ru_maxrss_mb=maxrss)


class Worker:
    """A worker process, seen from this script."""

    def __init__(self, impl: str, workload: str, T: int, args: argparse.Namespace):
        self.impl, self.workload, self.T = impl, workload, T
        self.stderr = tempfile.TemporaryFile(mode="w+")
        cmd = [sys.executable, __file__, "--worker", impl, workload, str(T), "--model", str(args.model)]
        cmd += ["--adapter-blocks", str(args.adapter_blocks), "--mem-limit-gb", str(args.mem_limit_gb)]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.stderr, text=True)
        self.times: list[float] = []
        self.info: dict = {}
        self.failed: str | None = None

    def read(self) -> dict:
        for line in self.proc.stdout:
            if line.startswith("@ "):
                return json.loads(line[2:])
        self.proc.wait()
        self.stderr.seek(0)
        lines = self.stderr.read().strip().splitlines()
        raise RuntimeError(lines[-1][:160] if lines else f"exit {self.proc.returncode}")

    def ask(self, request: str) -> dict:
        if self.failed:
            return {}
        try:
            if request != "wait":
                self.proc.stdin.write(request + "\n")
                self.proc.stdin.flush()
            return self.read()
        except (RuntimeError, BrokenPipeError, OSError) as e:
            self.failed = str(e) or type(e).__name__
            return {}

    def close(self) -> None:
        self.info.update(self.ask("done"))
        if self.proc.poll() is None:
            self.proc.stdin.close()
            self.proc.wait(timeout=60)
        self.stderr.close()

    def row(self) -> dict:
        row = {"workload": self.workload, "impl": self.impl, "T": self.T}
        if self.failed:
            return {**row, "failed": self.failed}
        median = statistics.median(self.times[1:])
        return {
            **row,
            "seconds": median,
            "tokens_per_s": self.T / median,
            "warmup_s": self.times[0],
            "times_s": self.times[1:],
            **self.info,
        }


def cpu_jiffies(pids: list[int]) -> tuple[int, int]:
    """(busy, own): the machine's busy CPU time (all cores, /proc/stat, idle and iowait left out) and that of the
    processes `pids` (utime + stime), both in clock ticks."""
    with open("/proc/stat") as f:
        ticks = [int(v) for v in f.readline().split()[1:]]
    busy = sum(ticks) - ticks[3] - ticks[4]
    own = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            own += int(fields[11]) + int(fields[12])
        except (OSError, IndexError, ValueError):
            pass
    return busy, own


def measure(pairs: list[tuple[str, str]], T: int, repeats: int, args: argparse.Namespace) -> list[dict]:
    """One worker per (implementation, workload) at length T: loaded at once, then warm-up and timed steps by turns,
    ABBA. Also how many cores other processes kept busy meanwhile (the load average counts this run's own)."""
    workers = [Worker(impl, workload, T, args) for impl, workload in pairs]
    load = os.getloadavg()[0]
    for w in workers:
        w.info.update(w.ask("wait"))  # the "loaded" answer
    pids = [os.getpid(), *(w.proc.pid for w in workers)]
    busy0, own0, t0 = *cpu_jiffies(pids), time.perf_counter()
    for r in range(1 + repeats):
        for w in workers if r % 2 == 0 else workers[::-1]:
            w.times.extend(w.ask("step").values())
    busy1, own1 = cpu_jiffies(pids)
    others = max(0.0, (busy1 - busy0 - own1 + own0) / os.sysconf("SC_CLK_TCK") / (time.perf_counter() - t0))
    for w in workers:
        w.close()
    rows = [{**w.row(), "load_before": load, "load_after": os.getloadavg()[0], "others_cores": others} for w in workers]
    for r in rows:
        what = f"  {r['workload']:9s} {r['impl']:12s} T={T:5d}"
        if "failed" in r:
            print(f"{what}  FAILED: {r['failed']}", flush=True)
        else:
            times = " ".join(f"{t:.2f}" for t in r["times_s"])
            print(
                f"{what}  {r['tokens_per_s']:8.1f} tok/s  peak {r['peak_mb']:7.0f} MiB  warm-up {r['warmup_s']:.2f} s"
                f"  steps {times} s  load {r['load_before']:.2f}->{r['load_after']:.2f}, others "
                f"{r['others_cores']:.2f} cores",
                flush=True,
            )
    return rows


def tables(rows: list[dict], k: int) -> str:
    ok = {(r["workload"], r["impl"], r["T"]): r for r in rows if "failed" not in r}
    failed = {(r["workload"], r["impl"], r["T"]): r["failed"] for r in rows if "failed" in r}

    def cell(key, fmt: str) -> str:
        if key in failed:
            return f"failed: {failed[key]}"
        return fmt.format(**ok[key]) if key in ok else ""

    lines = [
        "| workload | T | transformers tokens/s | nestlearn tokens/s | nestlearn / transformers | transformers peak "
        "extra memory (MiB) | nestlearn peak extra memory (MiB) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    seen = sorted({(r["workload"], r["T"]) for r in rows}, key=lambda wt: (WORKLOADS.index(wt[0]), wt[1]))
    for workload, T in seen:
        if workload in ADAPTERS:
            continue
        hf, nl = (workload, "transformers", T), (workload, "nestlearn", T)
        ratio = f"{ok[nl]['tokens_per_s'] / ok[hf]['tokens_per_s']:.2f}x" if hf in ok and nl in ok else ""
        lines.append(
            f"| {LABELS[workload].format(k=k)} | {T} | {cell(hf, '{tokens_per_s:,.0f}')} | "
            f"{cell(nl, '{tokens_per_s:,.0f}')} | {ratio} | {cell(hf, '{peak_mb:,.0f}')} | "
            f"{cell(nl, '{peak_mb:,.0f}')} |"
        )
    adapters = [(w, T) for w, T in seen if w in ADAPTERS]
    if adapters:
        lines += [
            "",
            "| nestlearn workload | T | trainable parameters | tokens/s | vs nestlearn frozen | vs transformers frozen "
            "| peak extra memory (MiB) |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for workload, T in adapters:
            key = (workload, "nestlearn", T)
            rel = []
            for impl in IMPLS[::-1]:
                ref = ("frozen", impl, T)
                good = key in ok and ref in ok
                rel.append(f"{ok[key]['tokens_per_s'] / ok[ref]['tokens_per_s']:.2f}x" if good else "")
            lines.append(
                f"| {LABELS[workload].format(k=k)} | {T} | {cell(key, '{trainable:,}')} | "
                f"{cell(key, '{tokens_per_s:,.0f}')} | {rel[0]} | {rel[1]} | {cell(key, '{peak_mb:,.0f}')} |"
            )
    return "\n".join(lines)


def default_model() -> str | None:
    from nestlearn.data.weights import model_dir

    try:
        return str(model_dir("smollm2-135m"))
    except Exception:  # not fetched: main says how
        return None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="a Hugging Face Llama folder (default: the fetched SmolLM2-135M)")
    p.add_argument("--lengths", type=int, nargs="+", default=[512, 2048], help="T, tokens per step (default: 512 2048)")
    p.add_argument(
        "--workloads", nargs="+", default=list(WORKLOADS), choices=WORKLOADS, help="what to run (default: all)"
    )
    p.add_argument(
        "--repeats",
        type=int,
        nargs="+",
        help="timed steps after the warm-up, one value for every length or one per length (default: 3 below T = "
        "2048, else 2)",
    )
    p.add_argument(
        "--skip",
        nargs="*",
        default=["sm_titans:2048"],
        metavar="WORKLOAD:T",
        help="measurements left out; `--skip` alone: none (default: sm_titans:2048, which needs about 4x its 5.9 GiB "
        "at T = 512, more than a 24 GiB machine has)",
    )
    p.add_argument("--adapter-blocks", type=int, default=6, help="blocks with a memory adapter, the last (default: 6)")
    p.add_argument("--mem-limit-gb", type=float, default=16.0, help="address-space limit of each process")
    p.add_argument("--json", default="runs/bench_pretrained.json", help="where the results go (default: %(default)s)")
    p.add_argument("--worker", nargs=3, metavar=("IMPL", "WORKLOAD", "T"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        limit = int(args.mem_limit_gb * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        impl, workload, T = args.worker
        worker(impl, workload, int(T), args.model, args.adapter_blocks)
        return

    if any(T < 2 for T in args.lengths):
        p.error(f"--lengths {args.lengths}: every value must be at least 2")
    args.repeats = args.repeats or [3 if T < 2048 else 2 for T in args.lengths]
    if len(args.repeats) not in (1, len(args.lengths)) or any(r < 1 for r in args.repeats):
        p.error(f"--repeats {args.repeats}: one positive int, or one per length ({len(args.lengths)})")
    try:
        import transformers
    except ImportError:
        p.error("transformers is not installed: pip install 'nestlearn[hf]'")
    from nestlearn import hf

    args.model = args.model or default_model()
    if args.model is None:
        p.error("SmolLM2-135M is not fetched: run `nestlearn fetch-model smollm2-135m`, or give --model DIR")
    if not hf.is_hf_folder(args.model):
        p.error(f"--model {args.model}: not a Hugging Face model folder (no config.json)")
    layers = hf.read_hf_config(args.model).get("num_hidden_layers", 0)
    if not 1 <= args.adapter_blocks <= layers:
        p.error(f"--adapter-blocks {args.adapter_blocks}: must lie in [1, {layers}], the model's layers")
    skip = set()
    for item in args.skip:
        workload, _, T = item.partition(":")
        if workload not in WORKLOADS or not T.isdigit():
            p.error(f"--skip {item}: expected WORKLOAD:T, WORKLOAD one of {list(WORKLOADS)}")
        skip.add((workload, int(T)))
    per_length = args.repeats * len(args.lengths) if len(args.repeats) == 1 else args.repeats
    repeats = dict(zip(args.lengths, per_length, strict=True))

    machine = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    header = (
        f"# {machine}, torch {torch.__version__}, transformers {transformers.__version__}, {Path(args.model).name}, "
        f"batch 1, float32"
    )
    print(header, flush=True)
    rows = []

    def save(rows: list[dict]) -> None:  # after every workload, so that an interrupted run keeps what it measured
        if args.json:
            path = Path(args.json)
            path.parent.mkdir(parents=True, exist_ok=True)
            saved = {"machine": header[2:], "model": str(args.model), "lengths": args.lengths, "repeats": repeats}
            saved |= {"adapter_blocks": args.adapter_blocks, "skipped": sorted(f"{w}:{T}" for w, T in skip)}
            path.write_text(json.dumps({**saved, "rows": rows}, indent=1))

    for T in args.lengths:
        workloads = [w for w in args.workloads if (w, T) not in skip]
        adapters = [("nestlearn", a) for a in workloads if a in ADAPTERS]
        for workload in workloads:
            if workload not in ADAPTERS:
                pairs = [(impl, workload) for impl in IMPLS]
                # the adapters take turns with their reference, the frozen base
                rows += measure(pairs + (adapters if workload == "frozen" else []), T, repeats[T], args)
                save(rows)
        if adapters and "frozen" not in workloads:
            rows += measure(adapters, T, repeats[T], args)
            save(rows)
    print("\n" + tables(rows, args.adapter_blocks))
    if args.json:
        print(f"\nresults: {args.json}")


if __name__ == "__main__":
    main()
