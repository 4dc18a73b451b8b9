"""Does Hope learn multi-query associative recall (MQAR) and the parity language? Against a Transformer (issue #3).

    python experiments/synthetic.py                                   # the table in docs/results.md
    python experiments/synthetic.py --task mqar --presets hope --steps 300
    python experiments/synthetic.py --task parity --presets titans --rule dgd --max-lr 2 --lr-init 0.05 --steps 2000

Every model is trained from scratch at `debug` size (2 blocks, width 64) with AdamW (lr 3e-3, no weight decay,
gradient clipping 1.0) on freshly generated batches, then scored on 512 new sequences by exact match of the
argmax prediction at the scored positions (nestlearn/data/synthetic.py):

    mqar     --pairs key/value pairs then the keys again; accuracy on the values of the second half
    parity   running parity of a bit string; trained on length --length (so on every prefix up to it), scored
             in distribution (positions 1..length, Table 5's "Bin0") and on the positions beyond it of strings
             twice as long ("Bin1", length generalisation)

Chance is 1/128 for MQAR and 1/2 for parity. `--max-lr`, `--lr-init` and `--rule` change the token mixers'
memories (in-context CMS levels keep theirs): with DGD and η up to 2 a memory can reflect along a key, which is
what tracking parity takes (docs/deviations.md, "η up to 2").
"""

from __future__ import annotations

import argparse

import torch

from nestlearn import TitansConfig, presets
from nestlearn.data.synthetic import accuracy, mqar, parity
from nestlearn.evals.longctx import memory_arguments, memory_options, train_synthetic
from nestlearn.train_config import parse_periods


def batch_of(task: str, batch: int, args, generator: torch.Generator, length: int | None = None):
    if task == "mqar":
        return mqar(batch, args.pairs, generator=generator, gap=args.gap)
    return parity(batch, length or args.length, generator=generator)


def train(preset: str, task: str, args) -> dict:
    model, fit = train_synthetic(
        preset,
        lambda batch, g: batch_of(task, batch, args, g),
        steps=args.steps,
        batch=args.batch,
        lr=args.lr,
        seed=args.seed,
        **memory_options(args),
        update_periods=args.update_periods,
        desc=f"{preset} {task}",
        quiet=args.quiet,
    )
    g_eval = torch.Generator().manual_seed(10_000 + args.seed)
    with torch.no_grad():
        tokens, targets, mask = batch_of(task, 512, args, g_eval)
        result = {"accuracy": accuracy(model(tokens)[0], targets, mask)}
        if task == "parity":  # length generalisation: positions beyond the training length
            tokens, targets, mask = batch_of(task, 512, args, g_eval, length=2 * args.length)
            mask[:, : args.length] = False
            result["accuracy_longer"] = accuracy(model(tokens)[0], targets, mask)
    return {"preset": preset, "task": task, **fit, **result}


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--task", nargs="+", default=["mqar", "parity"], choices=["mqar", "parity"])
    p.add_argument("--presets", nargs="+", default=["transformer", "hope"], choices=sorted(presets.PRESETS))
    p.add_argument("--steps", type=int, default=400, help="training steps per model and task")
    p.add_argument("--batch", type=int, default=32, help="sequences per step")
    p.add_argument("--lr", type=float, default=3e-3, help="peak AdamW learning rate")
    p.add_argument("--pairs", type=int, default=8, help="MQAR: key/value pairs per sequence")
    p.add_argument("--gap", type=int, default=0, help="MQAR: filler tokens between the pairs and the queries")
    p.add_argument("--length", type=int, default=32, help="parity: training length")
    memory_arguments(p)
    p.add_argument(
        "--update-periods",
        type=parse_periods,
        default=None,
        help="CMS update periods, fastest first, e.g. 16,128,none (the Hope presets'); 'none' alone: one "
        "SwiGLU level, Hope w/o CMS (paper Table 6)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    if args.steps < 1 or args.batch < 1:
        p.error(f"--steps and --batch must be positive; got {args.steps}, {args.batch}")
    if args.max_lr is not None and args.max_lr <= 0:
        p.error(f"--max-lr must be positive; got {args.max_lr}")
    cap = args.max_lr or TitansConfig().max_lr  # the presets' cap (SelfModConfig's is the same)
    if args.lr_init is not None and not 0 < args.lr_init < cap:
        p.error(f"--lr-init must lie strictly between 0 and the cap η_max = {cap}; got {args.lr_init}")

    rows = [train(preset, task, args) for task in args.task for preset in args.presets]
    print("\n| task | preset | params | steps | first loss | final loss | accuracy | accuracy, longer | time (s) |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        longer = f"{r['accuracy_longer']:.3f}" if "accuracy_longer" in r else ""
        print(
            f"| {r['task']} | {r['preset']} | {r['params']:,} | {args.steps} | {r['first_loss']:.3f} | "
            f"{r['final_loss']:.3f} | {r['accuracy']:.3f} | {longer} | {r['seconds']:.0f} |"
        )
    return rows


if __name__ == "__main__":
    main()
