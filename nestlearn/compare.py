"""The main job: train several presets at one size on the same data and token budget, then compare them.

    nestlearn compare                                   # hope vs transformer, `mini` size, wiki, ~10 min on 2 cores
    nestlearn compare --presets hope titans hope_attention transformer --size tiny --steps 2000

Each preset is trained by `nestlearn.train` with the same TrainConfig but its preset and out_dir, so the data
order, schedule and budget are identical. Then every final checkpoint is evaluated on the test split, and the
command prints a table (test bits per byte, perplexity, training tokens/s) and writes out_dir/results.json and
out_dir/loss_curves.png.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import time
from pathlib import Path

__all__ = ["compare", "main"]


def compare(presets: list[str], base, out_dir: Path, test_tokens: int = 0) -> list[dict]:
    """Train each preset with `base` (a TrainConfig) and evaluate it on the test split. Returns one row each."""
    from .data.shards import open_shard
    from .train import evaluate, load_checkpoint, prepare_data, train

    rows = []
    for preset in presets:
        config = dataclasses.replace(base, preset=preset, out_dir=str(out_dir / preset))
        t0 = time.perf_counter()
        try:
            result = train(config)
        except FloatingPointError as e:  # one model diverging must not cost the others' results
            rows.append({"preset": preset, "failed": str(e)})
            continue
        minutes = (time.perf_counter() - t0) / 60
        model, tokenizer = load_checkpoint(config.out_dir)
        shard_dir, _ = prepare_data(config, progress=False)
        tokens, meta = open_shard(shard_dir / "test", tokenizer)
        test = evaluate(model, tokens, meta, model.config.seq_len, 16, test_tokens)
        rows.append({"preset": preset, "params": model.num_parameters(), "test_bits_per_byte": test["bits_per_byte"],
                     "test_perplexity": test["perplexity"], "test_tokens": test["tokens"],
                     "validation_bits_per_byte": result["bits_per_byte"],
                     "train_tokens_per_s": result["train_tokens_per_s"], "minutes": minutes})  # fmt: skip
    return rows


def table(rows: list[dict], tokens: int) -> str:
    lines = [f"{'preset':<16}{'params':>10}{'test bpb':>10}{'test ppl':>10}{'train tok/s':>13}{'minutes':>9}"]
    for r in rows:
        if "failed" in r:
            lines.append(f"{r['preset']:<16}failed: {r['failed']}")
            continue
        lines.append(f"{r['preset']:<16}{r['params'] / 1e6:>9.2f}M{r['test_bits_per_byte']:>10.3f}"
                     f"{r['test_perplexity']:>10.2f}{r['train_tokens_per_s']:>13.0f}{r['minutes']:>9.1f}")  # fmt: skip
    lines.append(f"(each trained on the same {tokens:,} tokens; bpb: bits per byte of UTF-8 text, lower is better)")
    return "\n".join(lines)


def plot(out_dir: Path, presets: list[str], path: Path) -> None:
    """Training loss and validation bits per byte against tokens seen, one line per preset."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for preset in presets:
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


def main(argv: list[str] | None = None) -> int:
    from .train import TrainConfig

    p = argparse.ArgumentParser(prog="nestlearn compare", description=__doc__.split("\n\n")[0])
    p.add_argument("--presets", nargs="+", default=["hope", "transformer"], help="(default: hope transformer)")
    p.add_argument("--test-tokens", type=int, default=32768, help="test predictions per model (0: the whole split)")
    defaults = dict(size="mini", data="wiki", steps=48, batch_size=16, seq_len=256, lr=2e-3, warmup_steps=6,
                    eval_every=16, eval_tokens=16384, save_every=0, log_every=2,
                    out_dir=time.strftime("runs/compare/%Y%m%d-%H%M%S"))  # fmt: skip
    TrainConfig.add_arguments(p)
    args = p.parse_args(argv)
    for name, value in defaults.items():  # the main job's budget, unless a flag says otherwise
        if getattr(args, name) is None:
            setattr(args, name, value)
    args.preset = args.presets[0]
    try:
        base = TrainConfig.from_args(args)
    except (ValueError, TypeError, FileNotFoundError) as e:
        p.error(str(e))
    out_dir = Path(base.out_dir)
    rows = compare(args.presets, base, out_dir, args.test_tokens)
    budget = base.steps * base.batch_size * (base.seq_len or 0)
    text = table(rows, budget)
    print(text)
    (out_dir / "results.json").write_text(json.dumps({"config": dataclasses.asdict(base), "rows": rows}, indent=2))
    plot(out_dir, args.presets, out_dir / "loss_curves.png")
    print(f"wrote {out_dir / 'results.json'} and {out_dir / 'loss_curves.png'}")
    return 0
