"""`nestlearn compare`: train several presets on the same data and budget, then compare them."""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

from .. import presets
from ..evals.compare import __doc__ as COMPARE_DOC
from ..evals.compare import compare, parse_lrs, plot, runs_of, table
from ..interrupt import Interrupted
from ..options import non_negative_int, parser
from ..train_config import TrainConfig


def main(argv: list[str] | None = None) -> int:

    p = parser("nestlearn compare", COMPARE_DOC.split("\n\n")[0])
    p.add_argument(
        "--presets",
        nargs="+",
        default=["hope", "transformer"],
        choices=list(presets.PRESETS),
        help="the models to compare (default: hope transformer)",
    )
    p.add_argument(
        "--test-tokens",
        type=non_negative_int,
        default=32768,
        help="test predictions per model (0: the whole split) (default: 32768)",
    )
    p.add_argument(
        "--optimizers",
        nargs="+",
        default=None,
        help="train each preset with each of these optimizers "
        "(default: --optimizer alone); runs are then named preset-optimizer",
    )
    p.add_argument(
        "--lrs",
        nargs="+",
        default=[],
        metavar="OPTIMIZER=LR",
        help="a peak learning rate per optimizer, e.g. deep_momentum=0.05 (the others use --lr)",
    )
    defaults = dict(
        size="mini",
        data="wiki",
        steps=48,
        batch_size=16,
        seq_len=256,
        lr=2e-3,
        warmup_steps=6,
        eval_every=16,
        eval_tokens=16384,
        save_every=0,
        log_every=2,
        out_dir="runs/compare/<date-time>",
    )
    # --preset would be silently overridden by --presets: compare has only the latter
    TrainConfig.add_arguments(p, exclude=("preset",), defaults=defaults)
    args = p.parse_args(argv)
    defaults["out_dir"] = time.strftime("runs/compare/%Y%m%d-%H%M%S")
    for name, value in defaults.items():  # the main job's budget, unless a flag says otherwise
        if getattr(args, name) is None:
            setattr(args, name, value)
    args.preset = args.presets[0]
    try:
        base = TrainConfig.from_args(args)
        lrs = parse_lrs(args.lrs, args.optimizers or [base.optimizer])
        for name in args.optimizers or []:  # each optimizer's arguments are checked before anything trains
            dataclasses.replace(base, optimizer=name, lr=lrs.get(name, base.lr))
    except (ValueError, TypeError, FileNotFoundError) as e:
        p.error(str(e))
    out_dir = Path(base.out_dir)
    try:
        rows = compare(args.presets, base, out_dir, args.test_tokens, args.optimizers, lrs)
    except Interrupted as e:
        raise Interrupted(
            e.signum,
            f"{e}. To finish the comparison, rerun the same `nestlearn compare` with --out-dir {out_dir}: the "
            "finished runs are not trained again, the interrupted one resumes",
        ) from e
    budget = base.steps * base.batch_size * (base.seq_len or 0)
    text = table(rows, budget)
    print(text)
    config = {k: v for k, v in dataclasses.asdict(base).items() if k != "preset"}  # each row names its own
    results = {"presets": args.presets, "optimizers": args.optimizers, "config": config, "rows": rows}
    (out_dir / "results.json").write_text(json.dumps(results, indent=2))
    plot(out_dir, [name for name, _, _ in runs_of(args.presets, args.optimizers)], out_dir / "loss_curves.png")
    print(f"wrote {out_dir / 'results.json'} and {out_dir / 'loss_curves.png'}")
    return 0
