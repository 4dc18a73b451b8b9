"""Can a memory take over from attention? SmolLM2-135M with its attention cut to a 256-token sliding window, alone
and with a memory adapter trained on the frozen base, on needle in a haystack from 512 to 4,096 tokens (the
long-context part of the SmolLM2 study, docs/results.md).

    python experiments/window_memory.py plan              # every step's command, in order, and which are done
    python experiments/window_memory.py run [STEP ...]    # the steps not done yet (default: all), in order
    python experiments/window_memory.py report            # the table, from the step folders

Steps, one folder each under --root (runs/study/longctx):

    full              the base with full attention: the upper bound            nestlearn longctx niah MODEL
    window            the base behind the window: what the window loses        ... --window 256
    titans-train      a Titans memory beside attention in the last 6 blocks, the base frozen, trained behind the
                      window on wiki in 1,024-token windows (so the memory must carry what attention no longer sees)
    titans            that checkpoint scored (it keeps its window)
    sm_titans-train   the same with self-modifying Titans
    sm_titans

Every score is the passkey needle (RULER's niah_single_1) at 3 depths × 2 samples per length, with the retrieval
gain: the bits of the answer the model takes from the needle (docs/longctx.md). A trained step resumes from its
last checkpoint, and a scored step with results.json is done: the same command continues an interrupted run. Each
step runs on one core (`--threads 1`), so two invocations with different steps can share 2 cores.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from nestlearn.cli import main as nestlearn
from nestlearn.data.weights import model_dir

WINDOW = "256"
LENGTHS = ["512", "1024", "2048", "4096"]
NIAH = ["longctx", "niah", "--kinds", "passkey", "--lengths", *LENGTHS, "--depths", "0.25", "0.5", "0.75"]
NIAH += ["--samples", "2"]
TRAIN_STEPS = 48  # 49,152 tokens of wiki: about 30 minutes on one core (an estimate; the report says)
TRAIN = [
    "train", "--preset", "transformer", "--adapter-blocks", "6", "--window", WINDOW, "--freeze", "base",
    "--data", "wiki", "--seq-len", "1024", "--batch-size", "1", "--steps", str(TRAIN_STEPS), "--warmup-steps", "5",
    "--lr", "1e-3", "--eval-every", "0", "--eval-tokens", "8192",
]  # fmt: skip
STEPS = ("full", "window", "titans-train", "titans", "sm_titans-train", "sm_titans")


def command(step: str, root: Path, model: str) -> list[str]:
    """The nestlearn command of `step`, writing into root/step."""
    out = ["--out-dir", str(root / step)]
    if step == "full":
        return [*NIAH[:2], model, *NIAH[2:], *out]
    if step == "window":
        return [*NIAH[:2], model, *NIAH[2:], "--window", WINDOW, *out]
    if step.endswith("-train"):
        return [TRAIN[0], "--init", model, *TRAIN[1:], "--adapter", step.removesuffix("-train"), *out]
    if step in STEPS:  # a trained adapter, scored behind the window its checkpoint keeps
        return [*NIAH[:2], str(root / f"{step}-train"), *NIAH[2:], *out]
    raise ValueError(f"{step!r} is not a step; the steps are {', '.join(STEPS)}")


def done(step: str, root: Path) -> bool:
    if step.endswith("-train"):
        return (root / step / "checkpoints" / f"step-{TRAIN_STEPS:08d}").is_dir()
    return (root / step / "results.json").is_file()


def run(steps: list[str], root: Path, model: str) -> int:
    for step in steps:
        if done(step, root):
            print(f"window_memory: {root / step} is done: skipped", file=sys.stderr)
            continue
        if not step.endswith("-train") and step not in ("full", "window") and not done(f"{step}-train", root):
            print(
                f"window_memory: {step} scores {root / f'{step}-train'}, not trained yet: run that first",
                file=sys.stderr,
            )
            return 1
        argv = command(step, root, model)
        print("window_memory: nestlearn " + " ".join(argv), file=sys.stderr)
        code = nestlearn([*argv, "--threads", "1", "--no-progress"])
        if code:
            print(f"window_memory: {step} stopped (exit {code}); the same command resumes it", file=sys.stderr)
            return code
    return 0


def report(root: Path) -> str:
    """A row per scored step: the passkey score and the retrieval gain (recall %, mean gain in bits) per length."""
    rows = []
    for step in STEPS:
        path = root / step / "results.json"
        if step.endswith("-train") or not path.is_file():
            continue
        r = json.loads(path.read_text())
        g = r["kinds"]["passkey"]
        trained = ""
        metrics = root / f"{step}-train" / "metrics.jsonl"
        if metrics.is_file():  # the adapter's training: its first and last loss, its speed
            lines = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
            train = [x for x in lines if x["kind"] == "train"]
            valid = [x for x in lines if x["kind"] == "validation"]
            trained = (
                f"{train[-1]['step']} steps, loss {train[0]['loss']:.2f} → {train[-1]['loss']:.2f}, "
                f"{train[-1]['tokens_per_s']:.0f} tok/s"
                + (f", validation {valid[-1]['bits_per_byte']:.3f} bpb" if valid else "")
            )
        cells = [
            f"{s:.0f} / {rc:.1f} ({b:+.2f})"
            for s, rc, b in zip(g["score_by_length"], g["recall_by_length"], g["gain_by_length"], strict=True)
        ]
        rows.append(f"| {step} | {r['window'] or 'full'} | {' | '.join(cells)} | {trained} |")
    if not rows:
        raise SystemExit(f"no step of {', '.join(STEPS)} has results.json under {root}: `run` first")
    head = "| step | attention | " + " | ".join(LENGTHS) + " | adapter's training |"
    return "\n".join([head, "| --- | --- |" + " ---: |" * len(LENGTHS) + " --- |", *rows])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("action", choices=["plan", "run", "report"])
    p.add_argument("steps", nargs="*", metavar="STEP", help=f"run: these steps (default: all: {', '.join(STEPS)})")
    p.add_argument("--root", type=Path, default=Path("runs/study/longctx"))
    p.add_argument("--init", default=None, help="the pretrained model folder (default: fetch-model's smollm2-135m)")
    args = p.parse_args(argv)
    unknown = [s for s in args.steps if s not in STEPS]
    if unknown or (args.steps and args.action != "run"):
        p.error(f"steps {unknown or args.steps}: `run` takes steps among {', '.join(STEPS)}")
    if args.action == "report":
        print(report(args.root))
        return 0
    if args.init is None:
        args.init = str(model_dir("smollm2-135m"))
    if args.action == "plan":
        for step in STEPS:
            print(
                "nestlearn "
                + " ".join(command(step, args.root, args.init))
                + ("   # done" if done(step, args.root) else "")
            )
        return 0
    return run(args.steps or list(STEPS), args.root, args.init)


if __name__ == "__main__":
    sys.exit(main())
