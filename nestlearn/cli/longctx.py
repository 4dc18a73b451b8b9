"""`nestlearn longctx {niah,formal,mqar,babi}`: the long-context suite (nestlearn.evals.longctx)."""

from __future__ import annotations

import argparse
import functools

import torch

from .. import options, presets
from ..data.synthetic import BABI_TASKS, FORMAL_LANGUAGES
from ..evals.longctx import __doc__ as LONGCTX_DOC
from ..evals.longctx import memory_arguments, run_babi, run_formal, run_mqar, run_niah
from ..evals.niah import KINDS
from ..runtime import set_threads


def _training_args(p: argparse.ArgumentParser, name: str) -> None:
    p.add_argument(
        "--presets",
        nargs="+",
        default=["transformer", "hope"],
        choices=sorted(presets.PRESETS),
        help="models to train from scratch at debug size (default: transformer hope)",
    )
    p.add_argument("--steps", type=int, default=400, help="training steps per model and task (default: 400)")
    p.add_argument("--batch", type=int, default=32, help="sequences per step (default: 32)")
    p.add_argument("--lr", type=float, default=3e-3, help="peak AdamW learning rate (default: 3e-3)")
    memory_arguments(p)
    p.add_argument("--eval-samples", type=int, default=512, help="new sequences scored per setting (default: 512)")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights, training and test data (default: 0)")
    options.add_device(p, default="cpu")
    options.add_threads(p)
    p.add_argument("--out-dir", default=f"runs/longctx-{name}", help=f"(default: runs/longctx-{name})")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def main(argv: list[str] | None = None) -> int:

    parser = options.parser(
        "nestlearn longctx",
        LONGCTX_DOC.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n\n".join(LONGCTX_DOC.split("\n\n")[1:]),
    )
    # every suite refuses abbreviated options too
    strict = functools.partial(argparse.ArgumentParser, allow_abbrev=False)
    sub = parser.add_subparsers(dest="suite", required=True, metavar="{niah,formal,mqar,babi}", parser_class=strict)

    p = sub.add_parser("niah", help="RULER-style needle in a haystack on a checkpoint: heatmaps over length × depth")
    p.add_argument("checkpoint", help="a checkpoint folder, or a run folder (its newest checkpoint)")
    p.add_argument("--kinds", nargs="+", default=list(KINDS), choices=list(KINDS), help="(default: all six)")
    p.add_argument(
        "--lengths",
        nargs="+",
        type=int,
        default=[1024, 2048, 4096],
        help="context lengths in the checkpoint's tokens: prompt + answer budget (default: 1024 2048 4096)",
    )
    p.add_argument(
        "--depths",
        nargs="+",
        type=float,
        default=[0.0, 0.25, 0.5, 0.75, 1.0],
        help="needle depths, fractions of the haystack (default: 0 0.25 0.5 0.75 1)",
    )
    p.add_argument("--samples", type=int, default=4, help="samples per kind, length and depth (default: 4)")
    p.add_argument("--haystack", default="wiki", help="corpus name or folder of the haystack text (default: wiki)")
    p.add_argument("--split", default="test", choices=["train", "validation", "test"], help="(default: test)")
    p.add_argument("--data-root", default=None, help="corpus cache (default: $NESTLEARN_DATA or ~/.cache/nestlearn)")
    p.add_argument(
        "--max-new-tokens",
        type=int,
        default=None,
        help="generation budget (default: the answer's tokens + 8, per sample)",
    )
    p.add_argument(
        "--gain",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also score each sample by likelihood: the bits of the answer the model takes from the needle "
        "(docs/longctx.md; two more forward passes per sample) (default: on)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of keys, values, haystack start (default: 0)")
    p.add_argument(
        "--window",
        type=options.positive_int,
        default=None,
        help="sliding-window attention of this many tokens for the evaluation (what a window loses, and a memory "
        "adapter recovers; docs/longctx.md) (default: the checkpoint's own attention)",
    )
    options.add_device(p)
    options.add_threads(p)
    p.add_argument("--out-dir", default="runs/longctx-niah", help="(default: runs/longctx-niah)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")

    p = sub.add_parser("formal", help="formal languages of paper Table 5, trained short and tested longer")
    p.add_argument(
        "--languages",
        nargs="+",
        default=list(FORMAL_LANGUAGES),
        choices=list(FORMAL_LANGUAGES),
        help="(default: all six)",
    )
    p.add_argument(
        "--train-length",
        type=int,
        default=40,
        help="train on lengths 1..L; Bin0 tests 1..L, Bin1 L+1..2L (default: 40)",
    )
    _training_args(p, "formal")

    p = sub.add_parser("mqar", help="multi-query associative recall, trained at one number of pairs, tested at more")
    p.add_argument("--pairs", type=int, default=8, help="key/value pairs per training sequence (default: 8)")
    p.add_argument("--test-pairs", nargs="+", type=int, default=None, help="(default: --pairs and twice that)")
    p.add_argument(
        "--gap",
        type=int,
        default=0,
        help="filler tokens between the pairs and the queries: how long the pairs must be held (default: 0)",
    )
    _training_args(p, "mqar")

    p = sub.add_parser("babi", help="bAbI-style fact tracking as bytes, trained on short stories, tested on longer")
    p.add_argument("--tasks", nargs="+", default=list(BABI_TASKS), choices=list(BABI_TASKS), help="(default: both)")
    p.add_argument("--facts", type=int, default=8, help="moves per training story (default: 8)")
    p.add_argument("--test-facts", nargs="+", type=int, default=None, help="(default: --facts and twice that)")
    p.add_argument("--people", type=int, default=4, help="people in a 'latest' story (default: 4)")
    _training_args(p, "babi")

    args = parser.parse_args(argv)
    set_threads(args.threads)
    if args.suite == "niah":
        if min(args.lengths) < 1 or args.samples < 1 or (args.max_new_tokens is not None and args.max_new_tokens < 1):
            parser.error("--lengths, --samples and --max-new-tokens must be positive")
        if not all(0.0 <= d <= 1.0 for d in args.depths):
            parser.error(f"--depths must lie in [0, 1] (fractions of the haystack); got {args.depths}")
        run_niah(args)
        return 0
    if min(args.steps, args.batch, args.eval_samples) < 1:
        parser.error(
            f"--steps, --batch and --eval-samples must be positive; got {args.steps}, {args.batch}, {args.eval_samples}"
        )
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.suite == "formal":
        if args.train_length < 4:
            parser.error(f"--train-length={args.train_length} must be >= 4, so that (abab)* has a string to train on")
        run_formal(args)
    elif args.suite == "mqar":
        run_mqar(args)
    else:
        run_babi(args)
    return 0
