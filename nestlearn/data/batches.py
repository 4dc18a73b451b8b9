"""Training and evaluation windows from a token shard: which positions a step reads, and the batch they make."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

__all__ = ["window_starts", "lane_starts", "gather"]


def window_starts(seed: int, step: int, batch_size: int, num_tokens: int, length: int) -> np.ndarray:
    """Start positions of step `step`'s `batch_size` random windows of `length` tokens: a pure function."""
    if num_tokens <= length:
        raise ValueError(
            f"the train split has {num_tokens} tokens and windows of {length} need at least {length + 1} "
            f"({length + 1 - num_tokens} short): give more text (for your own data, a larger train fraction; "
            "docs/data.md) or a smaller --seq-len"
        )
    return np.random.default_rng([seed, step]).integers(0, num_tokens - length, size=batch_size)


def lane_starts(step: int, batch_size: int, num_tokens: int, seq_len: int) -> tuple[np.ndarray, bool]:
    """carry_state: row j reads segment (step mod n) of its own stretch [j L, (j+1) L) of the stream. Returns the
    start positions and whether this step begins the stretches again (the state must be reset)."""
    lane = num_tokens // batch_size
    segments = (lane - 1) // seq_len
    if segments < 1:
        raise ValueError(
            f"the train split has {num_tokens} tokens and --carry-state needs {batch_size * (seq_len + 1)} "
            f"({batch_size} rows of a {seq_len + 1}-token segment each): give more text (docs/data.md) or a smaller "
            "--batch-size or --seq-len"
        )
    seg = step % segments
    return np.arange(batch_size) * lane + seg * seq_len, seg == 0


def gather(tokens: np.ndarray, starts: np.ndarray, length: int) -> Tensor:
    """The windows tokens[s : s + length] for every start s, as an int64 (len(starts), length) tensor."""
    return torch.from_numpy(np.stack([np.asarray(tokens[s : s + length], dtype=np.int64) for s in starts]))
