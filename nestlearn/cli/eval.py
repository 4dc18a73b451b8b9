"""`nestlearn eval CHECKPOINT`: loss, perplexity, bits per byte and tokens/s of a checkpoint on a split."""

from __future__ import annotations

import json
from pathlib import Path

from ..checkpoint import TRAIN_CONFIG_FILE, load_checkpoint, resolve_checkpoint
from ..data.shards import open_shard
from ..evaluate import evaluate
from ..options import add_device, add_threads, non_negative_int, parser, positive_int
from ..runtime import flush_subnormals, resolve_device, set_threads
from ..train import shards_for
from ..train_config import TrainConfig


def main(argv: list[str]) -> int:
    p = parser("nestlearn eval", "Loss, perplexity, bits per byte and tokens/s of a checkpoint on a split of a corpus.")
    p.add_argument("checkpoint", help="a checkpoint folder, or a run folder (its newest checkpoint)")
    p.add_argument(
        "--data",
        default=None,
        help="corpus name, a text/JSONL file or folder, a split folder, or a JSON spec (docs/data.md) (default: the "
        "one the model was trained on)",
    )
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
    device = resolve_device(args.device)
    set_threads(args.threads, device)
    flush_subnormals(device)
    path = resolve_checkpoint(args.checkpoint)
    model, tokenizer = load_checkpoint(path, device)
    data = args.data or _trained_on(path)
    split_dir = shards_for(data, tokenizer, args.data_root, (args.split,), progress=not args.no_progress)

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

    config_file = path / TRAIN_CONFIG_FILE
    if not config_file.is_file():
        raise SystemExit(f"nestlearn: {path} does not say what it was trained on ({TRAIN_CONFIG_FILE}); pass --data")
    return TrainConfig.from_file(config_file).data
