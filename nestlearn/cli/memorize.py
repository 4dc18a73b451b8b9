"""`nestlearn memorize CHECKPOINT --tokens N --out-dir DIR`: learning after deployment (nestlearn.memorize)."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np

from ..checkpoint import TRAIN_CONFIG_FILE, load_checkpoint, resolve_checkpoint
from ..config import LORA_TARGETS, LoRAConfig
from ..data.batches import gather
from ..data.shards import open_shard
from ..data.tokenizer import load_tokenizer
from ..interrupt import Interrupted, StopRequest
from ..memorize import LEARNER_FILE, LORA_LEVEL, STREAM_FILE, Learner, write_report
from ..optim import OPTIMIZERS
from ..options import (
    add_device,
    add_threads,
    non_negative_float,
    non_negative_int,
    parser,
    positive_float,
    positive_int,
)
from ..runtime import flush_subnormals, resolve_device, set_threads
from ..train import shards_for


def _pairs(items: list[str] | None, flag: str, convert) -> dict:
    out = {}
    for item in items or []:
        key, sep, value = item.rpartition("=")
        try:
            if not sep or not key:
                raise ValueError
            out[key] = convert(value)
        except ValueError:
            raise ValueError(f"{flag} {item!r} must be NAME=VALUE, e.g. {flag} 'blocks.0.cms.levels.2=1e-3'") from None
    return out


def add_lora_to(model, args, source: Path) -> None:
    """--lora-rank: LoRA adapters on the loaded model (nestlearn.lora.add_lora), which its saved config then holds."""
    from ..lora import add_lora

    if model.config.lora is not None:
        raise ValueError(
            f"{source} has LoRA adapters already (rank {model.config.lora.rank}): drop --lora-rank; its factors "
            f"learn as the level '{LORA_LEVEL}' at --lr"
        )
    targets = tuple(t.strip() for t in args.lora_targets.split(",")) if args.lora_targets else LORA_TARGETS
    alpha = args.lora_alpha if args.lora_alpha is not None else 2.0 * args.lora_rank
    add_lora(model, LoRAConfig(rank=args.lora_rank, alpha=alpha, targets=targets))


def main(argv: list[str] | None = None) -> int:
    """`nestlearn memorize CHECKPOINT --data wiki --tokens 65536 --out-dir DIR`: see the module docstring."""

    p = parser(
        "nestlearn memorize",
        "Learning after deployment: a checkpoint "
        "reads a stream of a corpus and keeps learning, in-context memories through the "
        "forward pass and outer levels by the next-token loss every C tokens. Writes the "
        "updated model, its level optimizers and the stream state to --out-dir, and a "
        "report. Ctrl-C (or SIGTERM) stops after the current segment and saves what was learned so far.",
    )
    p.add_argument(
        "checkpoint",
        help="a checkpoint or run folder, or a folder written by an earlier memorize (then "
        "the stream, state and level optimizers continue where it stopped)",
    )
    p.add_argument(
        "--data",
        default=None,
        help="corpus name, a text/JSONL file or folder, a split folder, or a JSON spec (docs/data.md) (default: the "
        "one the model was trained on)",
    )
    p.add_argument(
        "--split", default="validation", choices=["train", "validation", "test"], help="(default: validation)"
    )
    p.add_argument("--data-root", default=None, help="corpus cache (default: $NESTLEARN_DATA or ~/.cache/nestlearn)")
    p.add_argument(
        "--tokens",
        type=positive_int,
        required=True,
        help="tokens to read per stream (predictions), a multiple of --segment",
    )
    p.add_argument(
        "--batch-size",
        type=positive_int,
        default=1,
        help="parallel streams: the split is cut into this many lanes, each read from its start (default: 1)",
    )
    p.add_argument(
        "--offset",
        type=non_negative_int,
        default=None,
        help="position in each lane to start from (default: 0, or where an earlier memorize stopped)",
    )
    p.add_argument(
        "--segment", type=positive_int, default=None, help="tokens per forward pass (default: the model's seq_len)"
    )
    p.add_argument(
        "--held-out",
        type=non_negative_int,
        default=None,
        help="tokens after the stream, in each lane, read before and after (not learned from) to measure what was "
        "learned (default: one segment; 0: none)",
    )
    p.add_argument(
        "--lr", type=non_negative_float, default=None, help="learning rate of every outer level (default: 1e-3)"
    )
    p.add_argument(
        "--base-lr",
        type=non_negative_float,
        default=None,
        help="learning rate of the base level (default: 0, frozen)",
    )
    p.add_argument(
        "--level-lr",
        action="append",
        metavar="NAME=LR",
        help="learning rate of one level (repeatable); 0 freezes it. Level names: see the report, or model.levels()",
    )
    p.add_argument(
        "--period",
        action="append",
        metavar="REGEX=C",
        help="make the base parameters matching REGEX an "
        r"outer level stepped every C tokens (repeatable), e.g. 'cms\.levels\.2\.=512'",
    )
    p.add_argument(
        "--lora-rank",
        type=positive_int,
        default=None,
        help="add LoRA adapters of this rank to the model and learn through their factors (the level "
        f"'{LORA_LEVEL}', stepped every segment at --lr), the base frozen; saved with the model (docs/pretrained.md)",
    )
    p.add_argument(
        "--lora-alpha", type=positive_float, default=None, help="--lora-rank: the scale alpha (default: 2 × rank)"
    )
    p.add_argument(
        "--lora-targets",
        default=None,
        help=f"--lora-rank: comma-separated projections among {','.join(LORA_TARGETS)} (default: all four)",
    )
    p.add_argument("--optimizer", default=None, choices=OPTIMIZERS, help="of the outer levels (default: adamw)")
    p.add_argument(
        "--optimizer-args",
        default=None,
        help="JSON keyword arguments of the optimizer, e.g. '{\"betas\": [0.9, 0.99]}' (default: weight_decay 0)",
    )
    p.add_argument(
        "--out-dir", required=True, help="where to write the model, learner.pt, memorize.json and the report"
    )
    add_device(p)
    add_threads(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    try:
        optimizer_args = json.loads(args.optimizer_args) if args.optimizer_args else None
    except json.JSONDecodeError as e:
        p.error(f"--optimizer-args {args.optimizer_args!r} is not JSON ({e}); write e.g. '{{\"betas\": [0.9, 0.99]}}'")
    for flag in ("lora_alpha", "lora_targets"):
        if getattr(args, flag) is not None and args.lora_rank is None:
            p.error(f"--{flag.replace('_', '-')} does nothing without --lora-rank: give both, or neither")

    device = resolve_device(args.device)
    set_threads(args.threads, device)
    flush_subnormals(device)
    source = Path(args.checkpoint)
    resumed = (source / LEARNER_FILE).is_file()
    options = dict(
        lr=args.lr,
        base_lr=args.base_lr,
        lrs=_pairs(args.level_lr, "--level-lr", float),
        periods=_pairs(args.period, "--period", int),
        optimizer=args.optimizer,
        optimizer_args=optimizer_args,
        segment=args.segment,
    )
    given = sorted(k for k, v in options.items() if v not in (None, {}))
    given += [f for f in ("lora_rank", "lora_alpha", "lora_targets") if getattr(args, f) is not None]
    if resumed:
        if given:
            raise ValueError(
                f"{source} continues an earlier memorize, whose learner options are fixed; drop "
                f"{given} or start from the original checkpoint"
            )
        model, learner, state = Learner.load(source, device)
        tokenizer, stream = load_tokenizer(source), json.loads((source / STREAM_FILE).read_text())
    else:
        model, tokenizer = load_checkpoint(resolve_checkpoint(source), device)
        if args.lora_rank is not None:
            add_lora_to(model, args, source)
            model.to(device)
        learner = Learner(model, **{k: v for k, v in options.items() if v is not None})
        if args.lora_rank is not None:
            learning = sum(p.numel() for p in learner.params)
            print(
                f"nestlearn memorize: LoRA of rank {args.lora_rank} on {model.config.name}: {learning:,} parameters "
                f"learn, {model.num_parameters() - learning:,} frozen",
                file=sys.stderr,
            )
        state, stream = None, {"data": None, "split": args.split, "offset": 0, "history": []}
        train_config = resolve_checkpoint(source) / TRAIN_CONFIG_FILE
        stream["data"] = json.loads(train_config.read_text())["data"] if train_config.is_file() else None
    if args.tokens % learner.segment:
        k = max(1, round(args.tokens / learner.segment))
        p.error(
            f"--tokens {args.tokens} is not a multiple of the segment, {learner.segment} tokens (--segment, by "
            f"default the model's seq_len): use e.g. --tokens {k * learner.segment}"
        )
    data = args.data or stream["data"]
    if data is None:
        raise ValueError(f"{source} does not say which corpus it was trained on: pass --data")
    if resumed and (data, args.split) != (stream["data"], stream["split"]):
        state = None  # another stream: the memorized state belongs to the old one
        print(
            f"nestlearn memorize: {data}/{args.split} is not the stream {source} read ({stream['data']}/"
            f"{stream['split']}); its in-context state is dropped, the weights and level optimizers are kept",
            file=sys.stderr,
        )
    offset = args.offset if args.offset is not None else (stream["offset"] if state is not None else 0)
    split_dir = shards_for(data, tokenizer, args.data_root, (args.split,), progress=not args.no_progress)
    ids, _ = open_shard(split_dir / args.split, tokenizer)
    lane = len(ids) // args.batch_size
    held = learner.segment if args.held_out is None else args.held_out
    if offset + args.tokens + held + 1 > lane:
        raise ValueError(
            f"each of the {args.batch_size} lanes of {data}/{args.split} has {lane} tokens; offset "
            f"{offset} + {args.tokens} + {held} held out + 1 does not fit: use fewer --tokens, --held-out or "
            "--batch-size"
        )
    starts = np.arange(args.batch_size) * lane + offset
    x = gather(ids, starts, args.tokens + 1).to(device)
    held_out = gather(ids, starts + args.tokens, held + 1).to(device) if held else None
    with StopRequest("the current segment") as stop:  # Ctrl-C: keep what was learned, say how to go on
        state, report = learner.memorize(
            x, state, held_out=held_out, progress=not args.no_progress, stop=lambda: stop.requested
        )

    out = Path(args.out_dir)
    learner.save(out, state)
    tokenizer.save(out)
    config_file = (source if resumed else resolve_checkpoint(source)) / TRAIN_CONFIG_FILE
    if config_file.is_file() and config_file.resolve() != (out / TRAIN_CONFIG_FILE).resolve():
        shutil.copyfile(config_file, out / TRAIN_CONFIG_FILE)  # so that `nestlearn eval OUT` knows the corpus
    stream.update(data=data, split=args.split, offset=offset + report.tokens)
    stream["history"].append({"offset": offset, **report.to_dict()})
    (out / STREAM_FILE).write_text(json.dumps(stream, indent=2) + "\n")
    write_report(out, report)
    print(report.table())
    if report.stopped:
        raise Interrupted(
            stop.signum,
            f"stopped by {stop.name} after {report.tokens} of {args.tokens} tokens; saved {out}. Continue with "
            f"`nestlearn memorize {out} --tokens {args.tokens - report.tokens} --out-dir {out}`",
        )
    print(f"\nwrote {out} (continue with: nestlearn memorize {out} --tokens N --out-dir DIR)")
    return 0
