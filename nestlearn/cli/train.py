"""`nestlearn train`: every field of TrainConfig is a flag (nestlearn.train has the loop)."""

from __future__ import annotations

import json
import os

import torch.distributed as dist

from ..options import parser
from ..train import __doc__ as TRAIN_DOC
from ..train import train
from ..train_config import TrainConfig


def main(argv: list[str] | None = None) -> int:
    p = parser("nestlearn train", TRAIN_DOC.split("\n\n")[0])
    TrainConfig.add_arguments(p)
    args = p.parse_args(argv)
    try:
        config = TrainConfig.from_args(args)
    except (ValueError, TypeError, FileNotFoundError) as e:
        p.error(str(e))
    try:
        result = train(config)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(result, indent=2))
    return 0
