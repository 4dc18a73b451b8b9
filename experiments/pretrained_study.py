"""The continual-learning study on a pretrained SmolLM2-135M: does Nested Learning stop forgetting, or move it?

Every run is one `nestlearn continual --init SMOLLM2` with the study's shared settings and one strategy's own; this
script names them, runs them, and turns their folders into the tables and the picture of docs/results.md.

    python experiments/pretrained_study.py plan                       # every run's command
    python experiments/pretrained_study.py run facts-lora --seed 0    # one run, into runs/study/facts-lora-s0
    python experiments/pretrained_study.py report                     # tables and picture from runs/study/*

Runs fit one CPU core in about 30 minutes (run several at once, one core each: `--threads 1`). The learning rates are
a first choice per strategy, not tuned (the study's protocol asks for a choice on the first task; not yet done).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from nestlearn.cli import main as nestlearn

# what every run of a stream shares: the same tokens per task for every strategy
SHARED = {
    "facts": [
        "--stream", "facts", "--tasks", "3", "--people-per-set", "8", "--steps-per-task", "30", "--batch-size", "4",
        "--seq-len", "128", "--warmup-steps", "5", "--general-tokens", "8192", "--general-qa", "30",
    ],
}  # fmt: skip
# name: (stream, the strategy's own flags)
RUNS = {
    "facts-base-reading": ("facts", ["--strategy", "none", "--few-shot", "4"]),
    "facts-base": ("facts", ["--strategy", "none"]),
    "facts-finetune": ("facts", ["--strategy", "finetune", "--lr", "1e-4"]),
    "facts-lora": ("facts", ["--strategy", "lora", "--lora-rank", "16", "--lr", "1e-3"]),
    "facts-cms-levels": ("facts", ["--strategy", "cms-levels", "--update-periods", "512,none", "--lr", "1e-4"]),
    "facts-adapter": ("facts", ["--strategy", "adapter", "--adapter", "titans", "--lr", "1e-3"]),
    "facts-replay": ("facts", ["--strategy", "replay", "--lr", "1e-4"]),
}


def command(name: str, seed: int, root: Path, init: str) -> list[str]:
    stream, own = RUNS[name]
    out = root / f"{name}-s{seed}"
    return ["continual", "--init", init, *SHARED[stream], *own, "--seed", str(seed), "--out-dir", str(out)]


def _model_dir() -> str:
    from nestlearn.data.weights import model_dir

    return str(model_dir("smollm2-135m"))


def report(root: Path, picture: Path | None) -> str:
    """One Markdown row per run folder under `root`: the strategy, R's average (new knowledge), its gain over the
    untrained model, forgetting and BWT, the change in general ability, trainable parameters and tokens/s."""
    rows = []
    for results in sorted(root.glob("*/results.json")):
        r = json.loads(results.read_text())
        c, m, g = r["config"], r["metrics"], r.get("general") or {}
        before, after = g.get("before") or {}, g.get("after") or {}

        def change(key: str, before=before, after=after) -> float | None:
            return None if before.get(key) is None else after[key] - before[key]

        gain = m["average"] - sum(r["baseline"]) / len(r["baseline"])
        rows.append(
            {
                "run": results.parent.name,
                "strategy": c["strategy"] + (f" (few-shot {c['few_shot']})" if c.get("few_shot") else ""),
                "average": m["average"],
                "gain": gain,
                "forgetting": m["forgetting"],
                "bwt": m["bwt"],
                "bpb_change": change("wiki_bits_per_byte"),
                "squad_f1_change": change("squad_f1"),
                "trainable": r.get("trainable_params"),
                "tokens_per_s": r.get("train_tokens_per_s"),
                "minutes": r["seconds"] / 60,
            }
        )
    if not rows:
        raise SystemExit(f"no */results.json under {root}: run the study first (`plan`, `run NAME`)")

    def f(x, fmt):
        return "n/a" if x is None else format(x, fmt)

    lines = [
        "| run | strategy | exact match | gain | forgetting | BWT | Δ wiki bpb | Δ SQuAD F1 | trained | tok/s | min |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for x in rows:
        lines.append(
            f"| {x['run']} | {x['strategy']} | {x['average']:.3f} | {x['gain']:+.3f} | {f(x['forgetting'], '+.3f')} "
            f"| {f(x['bwt'], '+.3f')} | {f(x['bpb_change'], '+.3f')} | {f(x['squad_f1_change'], '+.3f')} | "
            f"{f(x['trainable'], ',')} | {f(x['tokens_per_s'], '.0f')} | {x['minutes']:.0f} |"
        )
    if picture is not None:
        _plot(rows, picture)
    return "\n".join(lines)


def _plot(rows: list[dict], path: Path) -> None:
    """New-knowledge gain against general-ability loss (wiki bits per byte gained), one point per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.5))
    for x in rows:
        loss = x["bpb_change"] if x["bpb_change"] is not None else 0.0
        ax.scatter(loss, x["gain"])
        ax.annotate(x["strategy"], (loss, x["gain"]), fontsize=8, xytext=(4, 4), textcoords="offset points")
    ax.axhline(0, color="grey", lw=0.5)
    ax.axvline(0, color="grey", lw=0.5)
    ax.set_xlabel("general ability lost: Δ wiki bits per byte (right is worse)")
    ax.set_ylabel("new knowledge gained: Δ exact match")
    ax.set_title("SmolLM2-135M, facts stream")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("action", choices=["plan", "run", "report"])
    p.add_argument("name", nargs="?", choices=list(RUNS), help="run: which run")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--root", type=Path, default=Path("runs/study"), help="where run folders go (default: runs/study)")
    p.add_argument("--init", default=None, help="the pretrained model folder (default: fetch-model's smollm2-135m)")
    p.add_argument("--picture", type=Path, default=None, help="report: also draw gain against general-ability loss")
    args = p.parse_args(argv)
    if args.action == "report":
        print(report(args.root, args.picture))
        return 0
    init = args.init or _model_dir()
    if args.action == "plan":
        for name in RUNS:
            print("nestlearn " + " ".join(command(name, args.seed, args.root, init)))
        return 0
    if args.name is None:
        p.error("run needs the run's name: " + ", ".join(RUNS))
    return nestlearn([*command(args.name, args.seed, args.root, init), "--threads", "1", "--no-progress"])


if __name__ == "__main__":
    sys.exit(main())
