"""The main job: train several presets at one size on the same data and token budget, then compare them.

    nestlearn compare                                   # hope vs transformer, `mini` size, wiki, ~4 min on 2 cores
    nestlearn compare --presets hope titans hope_attention transformer --size tiny --steps 2000
    nestlearn compare --presets transformer --optimizers adamw muon m3 --lrs m3=3e-3

Each preset (and, with --optimizers, each optimizer) is trained by `nestlearn.train` with the same TrainConfig
but its preset, optimizer and out_dir, so the data order, schedule and budget are identical. Then every final
checkpoint is evaluated on the test split, and the command prints a table (test bits per byte, perplexity,
training tokens/s, seconds per step) and writes out_dir/results.json and out_dir/loss_curves.png.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path

__all__ = ["compare", "runs_of", "parse_lrs", "table", "plot"]


def runs_of(presets: list[str], optimizers: list[str] | None = None) -> list[tuple[str, str | None, str]]:
    """(run name, preset, optimizer): the name is the preset, or preset-optimizer when several are compared."""
    if not optimizers:
        return [(p, p, None) for p in presets]
    several = len(optimizers) > 1
    return [(f"{p}-{o}" if several else p, p, o) for p in presets for o in optimizers]


def compare(
    presets: list[str],
    base,
    out_dir: Path,
    test_tokens: int = 0,
    optimizers: list[str] | None = None,
    lrs: dict[str, float] | None = None,
) -> list[dict]:
    """Train each preset (× optimizer) with `base` (a TrainConfig) and evaluate it on the test split.
    `lrs` gives an optimizer its own peak learning rate. Returns one row per run."""
    from ..checkpoint import load_checkpoint
    from ..data.shards import open_shard
    from ..evaluate import evaluate
    from ..train import prepare_data, train

    rows = []
    for name, preset, optimizer in runs_of(presets, optimizers):
        optimizer = optimizer or base.optimizer
        lr = (lrs or {}).get(optimizer, base.lr)
        config = dataclasses.replace(base, preset=preset, optimizer=optimizer, lr=lr, out_dir=str(out_dir / name))
        t0 = time.perf_counter()
        try:
            result = train(config)
        except FloatingPointError as e:  # one model diverging must not cost the others' results
            rows.append({"preset": name, "optimizer": optimizer, "lr": lr, "failed": str(e)})
            continue
        minutes = (time.perf_counter() - t0) / 60
        if result.get("finished"):  # trained by an earlier call: its speed from its own log
            result["train_tokens_per_s"], minutes = _logged_speed(Path(config.out_dir))
        model, tokenizer = load_checkpoint(config.out_dir)
        shard_dir, _ = prepare_data(config, progress=False)
        tokens, meta = open_shard(shard_dir / "test", tokenizer)
        test = evaluate(model, tokens, meta, model.config.seq_len, 16, test_tokens)
        step_tokens = config.batch_size * model.config.seq_len
        rows.append(
            {
                "preset": name,
                "optimizer": optimizer,
                "lr": lr,
                "params": model.num_parameters(),
                "test_bits_per_byte": test["bits_per_byte"],
                "test_perplexity": test["perplexity"],
                "test_tokens": test["tokens"],
                "validation_bits_per_byte": result["bits_per_byte"],
                "train_tokens_per_s": result["train_tokens_per_s"],
                "seconds_per_step": step_tokens / result["train_tokens_per_s"],
                "minutes": minutes,
            }
        )
    return rows


def _logged_speed(run: Path) -> tuple[float, float]:
    """Training tokens/s and minutes of a finished run, from the windows its metrics.jsonl logged."""
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
    train = [x for x in lines if x["kind"] == "train"]
    previous = [{"tokens": 0}, *train[:-1]]
    seconds = sum((b["tokens"] - a["tokens"]) / b["tokens_per_s"] for a, b in zip(previous, train, strict=True))
    return train[-1]["tokens"] / seconds, seconds / 60


def table(rows: list[dict], tokens: int) -> str:
    w = max([16] + [len(r["preset"]) + 2 for r in rows])
    lines = [
        f"{'run':<{w}}{'params':>10}{'test bpb':>10}{'test ppl':>10}{'train tok/s':>13}{'s/step':>8}{'minutes':>9}"
    ]
    for r in rows:
        if "failed" in r:
            lines.append(f"{r['preset']:<{w}}failed: {r['failed']}")
            continue
        lines.append(
            f"{r['preset']:<{w}}{r['params'] / 1e6:>9.2f}M{r['test_bits_per_byte']:>10.3f}"
            f"{r['test_perplexity']:>10.2f}{r['train_tokens_per_s']:>13.0f}{r['seconds_per_step']:>8.2f}"
            f"{r['minutes']:>9.1f}"
        )
    lines.append(f"(each trained on the same {tokens:,} tokens; bpb: bits per byte of UTF-8 text, lower is better)")
    return "\n".join(lines)


def plot(out_dir: Path, presets: list[str], path: Path) -> None:
    """Training loss and validation bits per byte against tokens seen, one line per run (`presets`: run names)."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for preset in presets:
        if not (out_dir / preset / "metrics.jsonl").exists():  # a run that failed before its first log
            continue
        lines = [json.loads(x) for x in (out_dir / preset / "metrics.jsonl").read_text().splitlines()]
        train = [x for x in lines if x["kind"] == "train"]
        ax1.plot([x["tokens"] for x in train], [x["loss"] / math.log(2) for x in train], label=preset)
        val = [x for x in lines if x["kind"] == "validation"]
        per_step = train[-1]["tokens"] / train[-1]["step"] if train else 0
        ax2.plot([x["step"] * per_step for x in val], [x["bits_per_byte"] for x in val], marker="o", label=preset)
    ax1.set(xlabel="training tokens", ylabel="training loss (bits per token)", title="training")
    ax2.set(xlabel="training tokens", ylabel="bits per byte", title="validation")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_lrs(items: list[str], optimizers: list[str]) -> dict[str, float]:
    lrs = {}
    for item in items:
        name, _, value = item.partition("=")
        if name not in optimizers:
            raise ValueError(f"--lrs {item!r}: {name!r} is not one of the optimizers compared, {optimizers}")
        try:
            lrs[name] = float(value)
        except ValueError:
            raise ValueError(f"--lrs {item!r}: write OPTIMIZER=LR, e.g. {name}=3e-3") from None
        if not lrs[name] >= 0:
            raise ValueError(f"--lrs {item!r}: the learning rate must be >= 0")
    return lrs
