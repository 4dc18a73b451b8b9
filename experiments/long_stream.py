"""Long streams: does the loss keep falling with more context (paper Fig. 10), and are the memories alive at the end?

    python experiments/long_stream.py runs/titans-init runs/titans-zero --data shakespeare --length 8192
    python experiments/long_stream.py fresh:titans fresh:titans:zero fresh:hope:zero --data random --length 4096
    python experiments/long_stream.py runs/a/hope runs/b/hope --labels local task --plot by_position.png

Each checkpoint reads `--streams` streams of `--length` tokens from the start of documents at least that long of
`--data`'s `--split`, in calls of `--call` tokens with the state carried (as a deployed model reads a long input),
and reports the mean next-token loss (bits per token) over position buckets [0, 64), [64, 128), ... doubling up to
the length, plus the health of every memory at the end of each call (nestlearn.health: the smallest per-head norm
of each layer and whether it is dead). Results go to --out as JSON and as a Markdown table on stdout.

A checkpoint may also be `fresh:PRESET[:RETAIN_TO]`, the preset at `debug` size as built (seed 0, byte tokens),
with its memories' retention towards `init` (the default) or `zero`; `--data random` reads uniformly random byte
tokens (seeded) instead of a corpus.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

from nestlearn import build, presets
from nestlearn.checkpoint import load_checkpoint, resolve_checkpoint
from nestlearn.data.corpora import load_split
from nestlearn.data.tokenizer import ByteTokenizer
from nestlearn.health import DeadMemoryWarning, memory_health
from nestlearn.runtime import flush_subnormals


def buckets(length: int) -> list[tuple[int, int]]:
    edges, hi = [0], 64
    while hi < length:
        edges.append(hi)
        hi *= 2
    edges.append(length)
    return list(zip(edges[:-1], edges[1:], strict=True))


def load(path: str):
    """A checkpoint, or `fresh:PRESET[:RETAIN_TO]`: the preset at debug size as built."""
    if not path.startswith("fresh:"):
        return load_checkpoint(resolve_checkpoint(path), "cpu")
    _, preset, *rest = path.split(":")
    torch.manual_seed(0)
    config = presets.PRESETS[preset]("debug")
    config.vocab_size = ByteTokenizer().vocab_size
    for name in ("titans", "sm_titans", "cms"):
        setattr(config, name, dataclasses.replace(getattr(config, name), retain_to=rest[0] if rest else "init"))
    return build(config), ByteTokenizer()


@torch.no_grad()
def measure(path: str, docs: list[str] | None, args) -> dict:
    model, tokenizer = load(path)
    model.eval()
    if docs is None:  # uniformly random bytes
        g = torch.Generator().manual_seed(0)
        x = torch.randint(0, 256, (args.streams, args.length + 1), generator=g)
    else:
        streams = [tokenizer.encode(d)[: args.length + 1] for d in docs]
        streams = [s for s in streams if len(s) == args.length + 1][: args.streams]
        if len(streams) < args.streams:
            raise SystemExit(
                f"only {len(streams)} documents of {args.data} have {args.length + 1} tokens; lower --length"
            )
        x = torch.tensor(streams)  # (streams, length + 1)
    nll = torch.zeros(args.length)
    state, health = None, []
    for lo in range(0, args.length, args.call):
        if args.reset and lo % args.reset == 0:
            state = None  # a fresh state, as in training on windows of --reset tokens
        logits, state = model(x[:, lo : lo + args.call], state)
        hi = lo + logits.shape[1]
        targets = x[:, lo + 1 : hi + 1]
        nll[lo:hi] = F.cross_entropy(logits.float().transpose(1, 2), targets, reduction="none").mean(0)
        memories = [
            {"name": m.name, "norms": m.norms, "dead": m.dead, "total": m.total} for m in memory_health(model, state)
        ]
        health.append({"tokens": hi, "memories": memories})
    bits = nll / math.log(2)
    table = {f"{lo}-{hi}": bits[lo:hi].mean().item() for lo, hi in buckets(args.length)}
    return {
        "checkpoint": path,
        "model": model.config.name,
        "trained_seq_len": model.config.seq_len,
        "bits_per_token": table,
        "health": health,
    }


def plot(rows: list[dict], title: str, path: str) -> None:
    """Bits per token of each position bucket against the bucket's end (log scale), one line per checkpoint."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for r in rows:
        ends = [int(k.split("-")[1]) for k in r["bits_per_token"]]
        ax.plot(ends, list(r["bits_per_token"].values()), marker="o", label=r["label"])
    ax.set_xscale("log", base=2)
    ax.set_xlabel("position in the stream (end of bucket, tokens)")
    ax.set_ylabel("bits per token")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoints", nargs="+", help="checkpoint or run folders")
    p.add_argument(
        "--data",
        default="shakespeare",
        help="corpus with long documents, or 'random' for random bytes (default: shakespeare)",
    )
    p.add_argument("--split", default="test", choices=["train", "validation", "test"])
    p.add_argument("--data-root", default=None)
    p.add_argument("--length", type=int, default=8192, help="tokens per stream (default: 8192)")
    p.add_argument("--call", type=int, default=512, help="tokens per forward call, state carried (default: 512)")
    p.add_argument("--streams", type=int, default=2, help="streams (documents) per checkpoint (default: 2)")
    p.add_argument(
        "--reset",
        type=int,
        default=0,
        help="start from a fresh state every N tokens, a multiple of --call: the baseline of windows "
        "read independently, as in training (default 0: never, the state is carried)",
    )
    p.add_argument("--out", default=None, help="write the results as JSON here")
    p.add_argument("--labels", nargs="+", default=None, help="a name per checkpoint for the table and the plot")
    p.add_argument("--plot", default=None, help="draw bits per token against position into this PNG")
    args = p.parse_args(argv)
    if args.labels is not None and len(args.labels) != len(args.checkpoints):
        p.error(f"--labels: {len(args.labels)} given for {len(args.checkpoints)} checkpoints; give one per checkpoint")
    for name in ("length", "call", "streams"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be positive; got {getattr(args, name)}")
    if args.reset < 0 or args.reset % args.call:
        p.error(f"--reset must be 0 or a positive multiple of --call={args.call}; got {args.reset}")
    flush_subnormals(torch.device("cpu"))  # as eval, memorize and longctx run
    docs = None if args.data == "random" else load_split(args.data, args.split, args.data_root)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeadMemoryWarning)  # reported in the table instead
        rows = [measure(c, docs, args) for c in args.checkpoints]
    cols = list(rows[0]["bits_per_token"])
    reset = f", a fresh state every {args.reset} tokens" if args.reset else ", the state carried"
    print(
        f"\nbits per token by position, {args.streams} streams of {args.length} tokens of {args.data}/{args.split}, "
        f"calls of {args.call}{reset}\n"
    )
    print("| checkpoint | " + " | ".join(cols) + " | dead memories at the end |")
    print("| --- |" + " ---: |" * len(cols) + " --- |")
    for r, label in zip(rows, args.labels or [Path(c).name for c in args.checkpoints], strict=True):
        r["label"] = label
        last = r["health"][-1]["memories"]
        dead = ", ".join(f"{m['name']} ({m['dead']}/{m['total']})" for m in last if m["dead"]) or "none"
        cells = " | ".join(f"{v:.3f}" for v in r["bits_per_token"].values())
        print(f"| {label} | {cells} | {dead} |")
    if args.plot:
        plot(rows, f"{args.data}/{args.split}, {args.streams} streams, calls of {args.call}{reset}", args.plot)
        print(f"wrote {args.plot}")
    if args.out:
        Path(args.out).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2) + "\n")
    return rows


if __name__ == "__main__":
    main()
