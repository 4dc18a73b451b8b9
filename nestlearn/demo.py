"""Associative recall: write one stream of random key/value pairs into four memories (linear attention, the delta
rule, gated DGD, an MLP memory) and print, as the stream grows, the share of the keys each one recalls.

    python -m nestlearn.demo                  # 4096 pairs, dim 64: 1.5 s on a 2-core CPU, start-up included

Each memory sees the same stream of random unit keys k_i and values v_i, written in increments with the state
carried between calls (`nestlearn.memory.scan`). After each increment, every key written so far is read back with
`nestlearn.memory.read`, and a key counts as recalled when its read-out is closer (cosine) to its own value than to
any other stored value. A memory of fixed size cannot hold more than about `dim` random pairs exactly, so the
interesting part is what each update rule keeps once it is full: the whole stream, the recent pairs, or nothing.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm import tqdm

from .memory import init_state, read, scan

__all__ = ["MemorySpec", "SPECS", "recall_curve", "main"]


@dataclass
class MemorySpec:
    """One memory of the demo: the options of `scan` and constant gates."""

    name: str
    memory: str
    objective: str
    rule: str = "gd"
    lr: float = 1.0
    retention: float = 1.0
    chunk_size: int = 16
    hidden_mult: int = 4


SPECS = [
    MemorySpec("linear attention (linear, dot, gd)", "linear", "dot"),
    MemorySpec("delta rule (linear, l2, gd)", "linear", "l2", lr=0.5),
    MemorySpec("gated DGD (linear, l2, dgd, α=0.999)", "linear", "l2", "dgd", lr=0.5, retention=0.999),
    MemorySpec("MLP memory (mlp, l2, gd)", "mlp", "l2", lr=0.5),
]


def recall_curve(
    spec: MemorySpec, keys: torch.Tensor, values: torch.Tensor, checkpoints: list[int], recent: int, seed: int = 0
) -> list[tuple[int, float, float]]:
    """Write keys/values (1, 1, N, d) up to each checkpoint; return (pairs, recall of all, recall of the last
    `recent`) at each."""
    d = keys.shape[-1]
    state = None
    if spec.memory == "mlp":
        g = torch.Generator().manual_seed(seed)
        state = init_state(1, d, memory="mlp", hidden_mult=spec.hidden_mult, generator=g)
    rows, written = [], 0
    for n in checkpoints:
        k, v = keys[:, :, written:n], values[:, :, written:n]
        gates = torch.full(k.shape[:3], spec.lr), torch.full(k.shape[:3], spec.retention)
        with torch.no_grad():
            _, state = scan(
                k,
                k,
                v,
                *gates,
                memory=spec.memory,
                objective=spec.objective,
                rule=spec.rule,
                chunk_size=spec.chunk_size,
                state=state,
            )
            out = read(keys[:, :, :n], state, memory=spec.memory)  # (1, 1, n, d)
        sims = F.normalize(out, dim=-1) @ values[:, :, :n].transpose(-1, -2)  # (1, 1, n, n) cosine to every value
        hit = (sims.argmax(-1) == torch.arange(n)).float()
        rows.append((n, hit.mean().item(), hit[..., -recent:].mean().item()))
        written = n
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="python -m nestlearn.demo", description=__doc__.split("\n\n")[0], allow_abbrev=False
    )
    p.add_argument("--pairs", type=int, default=4096, help="key/value pairs in the stream (default 4096)")
    p.add_argument("--dim", type=int, default=64, help="key and value width d (default 64)")
    p.add_argument("--recent", type=int, default=64, help="size of the 'recent' window (default 64)")
    p.add_argument("--seed", type=int, default=0, help="seed of the stream and of the MLP's initial weights")
    args = p.parse_args(argv)
    if args.pairs < 1 or args.dim < 1 or args.recent < 1:
        p.error(f"--pairs, --dim and --recent must be positive; got {args.pairs}, {args.dim}, {args.recent}")

    g = torch.Generator().manual_seed(args.seed)
    keys = F.normalize(torch.randn(1, 1, args.pairs, args.dim, generator=g), dim=-1)
    values = F.normalize(torch.randn(1, 1, args.pairs, args.dim, generator=g), dim=-1)
    checkpoints = sorted({min(args.pairs, 2**i) for i in range(6, 32) if 2 ** (i - 1) < args.pairs})

    print(f"Writing {args.pairs} random key/value pairs (d = {args.dim}) into four associative memories;")
    print("recall = share of keys whose read-out is nearest to their own value (chance: 1/pairs)")
    print(f"each cell: recall of all pairs written / of the last {args.recent}\n")
    t0 = time.perf_counter()
    results = {
        spec.name: recall_curve(spec, keys, values, checkpoints, args.recent, args.seed)
        for spec in tqdm(SPECS, desc="memories", leave=False)
    }
    width = max(len(s.name) for s in SPECS)
    print(f"{'pairs written':<{width}}  " + "  ".join(f"{n:>11}" for n in checkpoints))
    for name, rows in results.items():
        print(f"{name:<{width}}  " + "  ".join(f"{a:>5.2f} / {r:.2f}" for _, a, r in rows))
    elapsed = time.perf_counter() - t0
    print(f"\n{len(SPECS)} memories x {args.pairs} writes in {elapsed:.1f} s on {torch.get_num_threads()} CPU threads.")
    print("A memory of fixed size holds about d pairs; past that, the delta-rule memories keep the recent pairs")
    print("while Hebbian linear attention blurs everything. Equations: README.md, docs/notation.md.")


if __name__ == "__main__":
    main()
