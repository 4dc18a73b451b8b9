"""Synthetic sequence tasks, generated on the fly and deterministic by seed.

    mqar      multi-query associative recall (Arora et al. 2024, "Zoology"): N key/value pairs, then the keys
              again in a random order, each followed by its value. Scored on the values of the second half.
    parity    the parity language (Irie et al. 2023; paper Table 5): a bit string; after every bit the model
              predicts the parity of the bits so far. Scored on every position (or on the last only).

Every batch is (tokens, targets, mask): int64 (b, t), int64 (b, t) and bool (b, t); the model reads tokens and is
scored on targets where mask is true (targets[:, i] is the prediction after tokens[:, : i + 1]).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["mqar", "parity", "TASKS"]


def mqar(batch: int, num_pairs: int, vocab_size: int = 256, generator: torch.Generator | None = None):
    """Keys from [1, vocab/2), values from [vocab/2, vocab); sequence length 4 · num_pairs."""
    half = vocab_size // 2
    if num_pairs >= half - 1:
        raise ValueError(f"num_pairs={num_pairs} needs distinct keys: at most {half - 2} with vocab_size={vocab_size}")
    keys = torch.stack([torch.randperm(half - 1, generator=generator)[:num_pairs] + 1 for _ in range(batch)])
    values = torch.randint(half, vocab_size, (batch, num_pairs), generator=generator)
    order = torch.stack([torch.randperm(num_pairs, generator=generator) for _ in range(batch)])
    qk, qv = keys.gather(1, order), values.gather(1, order)
    first = torch.stack([keys, values], dim=2).reshape(batch, -1)  # k1 v1 k2 v2 ...
    second = torch.stack([qk, qv], dim=2).reshape(batch, -1)  # the keys again, each followed by its value
    tokens = torch.cat([first, second], dim=1)  # (b, 4N)
    targets = torch.roll(tokens, -1, dims=1)
    mask = torch.zeros_like(tokens, dtype=torch.bool)
    mask[:, 2 * num_pairs :: 2] = True  # after each queried key, predict its value
    return tokens, targets, mask


def parity(batch: int, length: int, generator: torch.Generator | None = None, last_only: bool = False):
    """Bits as tokens 1 and 2 (0 is kept free); targets are the running parity as tokens 1 (even) and 2 (odd)."""
    bits = torch.randint(0, 2, (batch, length), generator=generator)
    tokens = bits + 1
    targets = bits.cumsum(1).remainder(2) + 1
    mask = torch.zeros_like(tokens, dtype=torch.bool)
    if last_only:
        mask[:, -1] = True
    else:
        mask[:] = True
    return tokens, targets, mask


TASKS = {"mqar": mqar, "parity": parity}


def accuracy(logits: Tensor, targets: Tensor, mask: Tensor) -> float:
    return (logits.argmax(-1) == targets)[mask].float().mean().item()
