"""The paper's models as functions returning a `ModelConfig`; variants derive by changing fields.

    build(presets.transformer("tiny"))        # Transformer++: attention + one SwiGLU level
    build(presets.titans("170m"))             # the Titans memory as the token mixer

Sizes: `debug` (seconds on CPU), `mini` (1.5M parameters: `make demo` trains two in ~6 min on 2 CPU cores),
`tiny` (about 10M parameters, minutes on CPU), and `170m`, `340m`, `760m`, `1.3b` with blocks, width and heads
after Titans Table 5 (vocabulary 32K, the Llama-2 tokenizer's size). Every size but `debug` names a parameter
count, and each preset's CMS hidden width (a multiple of 32; of 8 for task-loss levels) is solved for it, so that
comparisons between architectures are at nearly equal size (Hope at `tiny` and `mini` also has fewer blocks: its
memories alone exceed the budget in full depth; Hope and Hope-Attention give up blocks where their three
full-width CMS levels could not otherwise each be as wide as the model). How nearly, as `tests/test_presets.py`
checks: at `tiny` and above every preset is within 1% of the name and of the others; at `mini` within 2% of 1.5M
and 3% of the others (a step of 32 in the width is 3.3% of the count there); at `debug` the presets are not
matched. Counts: docs/deviations.md §17.
"""

from __future__ import annotations

import math

import torch

from .config import AttentionConfig, CMSConfig, ModelConfig, SelfModConfig, TitansConfig
from .model import LanguageModel

__all__ = ["SIZES", "transformer", "titans", "hope", "hope_attention", "PRESETS", "WITH_SIGNAL", "HOPE_PERIODS"]

# CMS levels of Hope and Hope-Attention, fastest first: two in-context levels written every 16 and 128 tokens
# (the paper's high-frequency FFN has chunk length 16, Fig. 5; its mid and low periods are not given for LMs) and
# one SwiGLU level stepped with the optimizer. docs/deviations.md.
HOPE_PERIODS = (16, 128, None)

# name: (num_layers, dim, num_heads, vocab_size, seq_len, target parameters or None)
SIZES: dict[str, tuple[int, int, int, int, int, float | None]] = {
    "debug": (2, 64, 4, 256, 256, None),
    "mini": (4, 128, 4, 256, 256, 1.5e6),
    "tiny": (6, 384, 6, 256, 512, 10e6),
    "170m": (12, 768, 16, 32000, 4096, 170e6),
    "340m": (24, 1024, 16, 32000, 4096, 340e6),
    "760m": (24, 1536, 16, 32000, 4096, 760e6),
    "1.3b": (18, 2048, 8, 32000, 4096, 1.3e9),
}


def _sized(size: str, name: str, **fields) -> ModelConfig:
    if size not in SIZES:
        raise ValueError(f"size={size!r} is not known; expected one of {list(SIZES)}")
    num_layers, dim, num_heads, vocab, seq_len, target = SIZES[size]
    config = ModelConfig(
        vocab_size=vocab,
        dim=dim,
        num_layers=num_layers,
        num_heads=num_heads,
        seq_len=seq_len,
        name=f"{name}-{size}",
        **fields,
    )
    return _fit_cms_width(config, target) if target else config


def _fit_cms_width(config: ModelConfig, target: float) -> ModelConfig:
    """Solve the CMS hidden width so that the model has `target` parameters: a multiple of 32, or of 16 or 8 where
    a step of 32 is too coarse to come within 0.5% (task-loss CMS levels: every level is a full-width MLP, so a
    step of the width moves the count three times as far). Where even the narrowest CMS is too large (Hope's
    memories at `tiny`), drop blocks until it fits."""

    def count(hidden: int) -> int:
        config.cms.hidden_mult = hidden / config.dim  # rounded up to a multiple of 32: exact for those
        config.cms.hidden_size = None if hidden % 32 == 0 else hidden
        with torch.device("meta"):
            return LanguageModel(config).num_parameters()

    # task-loss levels are full-width MLPs, each one of the model's MLPs: no narrower than the model (a level of
    # width 112 at dim 384 would be a bottleneck, not a memory), and solved to the nearest 8
    task = config.cms.signal == "task" and len(config.cms.update_periods) > 1
    narrowest = 32 * math.ceil(config.dim / 32) if task else 32
    while count(narrowest) > target and config.num_layers > 1:
        config.num_layers -= 1
    for step in (32, 16, 8) if task else (32,):
        base = count(step)
        per_step = count(2 * step) - base
        hidden = step * max(1, round((target - base) / per_step) + 1)
        error = abs(count(hidden) - target)  # the config is left at this width
        if error <= 0.005 * target:
            break
    if error > 0.1 * target:
        raise ValueError(f"{config.name}: cannot reach {target:.3g} parameters by the CMS width and depth")
    return config


def transformer(size: str = "debug") -> ModelConfig:
    """Transformer++ (Llama-style): causal softmax attention with RoPE + one SwiGLU MLP, RMSNorm, tied embeddings.
    In Nested Learning terms: attention (period 1, non-parametric) plus one outer level (paper §7)."""
    return _sized(size, "transformer", mixer="attention", attention=AttentionConfig(), cms=CMSConfig())


def titans(size: str = "debug") -> ModelConfig:
    """Titans (LMM): the neural long-term memory as token mixer (Titans §3) + one SwiGLU MLP."""
    return _sized(size, "titans", mixer="titans", titans=TitansConfig(), cms=CMSConfig())


def hope(size: str = "debug", signal: str = "task") -> ModelConfig:
    """Hope: self-modifying Titans followed by a Continuum Memory System (paper §8.3, eqs. 94–97). `signal`: what
    the in-context CMS levels learn from, the next-token loss (eq. 71, the default) or their own local objective
    (`CMSConfig.signal`); the CMS width is solved for the size either way."""
    cms = CMSConfig(update_periods=HOPE_PERIODS, signal=signal)
    return _sized(size, "hope", mixer="sm_titans", sm_titans=SelfModConfig(), cms=cms)


def hope_attention(size: str = "debug", signal: str = "task") -> ModelConfig:
    """Hope-Attention: softmax attention followed by a Continuum Memory System (paper §8.3); `signal` as in `hope`."""
    cms = CMSConfig(update_periods=HOPE_PERIODS, signal=signal)
    return _sized(size, "hope_attention", mixer="attention", attention=AttentionConfig(), cms=cms)


PRESETS = {"transformer": transformer, "titans": titans, "hope": hope, "hope_attention": hope_attention}
WITH_SIGNAL = ("hope", "hope_attention")  # presets with in-context CMS levels: they take `signal=`
