"""Evaluation on a token shard: loss, perplexity and bits per byte over windows read from a fresh state."""

from __future__ import annotations

import math
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .data.batches import gather
from .data.shards import ShardMeta
from .health import MemoryHealth, unhealthy, warn_about
from .model import LanguageModel
from .runtime import autocast

__all__ = ["evaluate"]


@torch.no_grad()
def evaluate(
    model: nn.Module,
    tokens: np.ndarray,
    meta: ShardMeta,
    seq_len: int,
    batch_size: int = 8,
    max_tokens: int = 0,
    device: torch.device | str = "cpu",
    precision: str = "fp32",
    progress: bool = False,
) -> dict:
    """Loss, perplexity and bits per byte on consecutive non-overlapping windows of seq_len + 1 tokens, each read
    from a fresh state, from the start of the split (the first max_tokens predictions; 0: the whole split).

    Bits per byte = Σ NLL / (ln 2 · bytes), with bytes the split's UTF-8 bytes times the fraction of its tokens
    that were predicted: comparable across tokenizers (eos separators add loss but no bytes)."""
    from tqdm import tqdm

    device = torch.device(device)
    n = (len(tokens) - 1) // seq_len
    if max_tokens:
        n = min(n, max(1, max_tokens // seq_len))
    if n < 1:
        raise ValueError(
            f"the split has {len(tokens)} tokens and one window needs {seq_len + 1} ({seq_len + 1 - len(tokens)} "
            "short): give more text in this split (for your own data, its fraction; docs/data.md) or a smaller "
            "--seq-len"
        )
    total, count, bad, t0 = 0.0, 0, 0, time.perf_counter()
    lm = getattr(model, "module", model)  # under DDP, the LanguageModel inside
    dead: list[MemoryHealth] = []
    was_training = model.training
    model.eval()
    for lo in tqdm(range(0, n, batch_size), desc="eval", unit="batch", disable=not progress, leave=False):
        starts = np.arange(lo, min(n, lo + batch_size)) * seq_len
        x = gather(tokens, starts, seq_len + 1).to(device)
        with autocast(device, precision):
            logits, state = model(x[:, :-1])
        if not dead and isinstance(lm, LanguageModel):  # a window long enough to kill a memory kills it in every batch
            dead = unhealthy(lm, state)
            warn_about(dead, f"at the end of a {seq_len}-token eval window")
        nll = F.cross_entropy(logits.float().transpose(1, 2), x[:, 1:], reduction="none").sum(1)  # (windows,)
        bad += int((~torch.isfinite(nll)).sum())
        total += nll.sum().item()
        count += x[:, 1:].numel()
    seconds = time.perf_counter() - t0
    model.train(was_training)
    loss = total / count
    bytes_covered = meta.num_bytes * count / max(1, meta.num_tokens - 1)
    bpb = total / (math.log(2) * bytes_covered)
    # non-finite windows are counted, not dropped: a model whose memories diverge on some input must show it
    return {
        "loss": loss,
        "perplexity": math.exp(min(loss, 700)),
        "bits_per_byte": bpb,
        "tokens": count,
        "tokens_per_s": count / seconds,
        "nonfinite_windows": bad,
        "windows": n,
        "dead_memories": [m.name for m in dead],
    }
