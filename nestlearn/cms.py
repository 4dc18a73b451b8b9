"""Continuum Memory System (CMS): a chain of MLP levels, level ℓ updated every C^(ℓ) tokens (paper §7, eqs. 70–73).

    y = MLP^(f_k)( … MLP^(f_1)(x))            eq. 70, sequential variant (eq. 73), fastest level first

Each level is a SwiGLU MLP (Llama-style) with a residual connection inside the chain, so that the CMS output
h_k − h_0 with h_ℓ = h_{ℓ−1} + MLP^(ℓ)(h_{ℓ−1}) reduces, for one level, to the Transformer's MLP. A level whose
period is at least the training context is an **outer level**: its weights are ordinary parameters that carry
their period (`period` attribute, listed by `LanguageModel.levels()`), for the optimizer that honours it (eq. 71).
"""

from __future__ import annotations

import math

import torch.nn.functional as F
from torch import Tensor, nn

from .config import CMSConfig

__all__ = ["SwiGLU", "CMS"]


class SwiGLU(nn.Module):
    """W_down (SiLU(x W_gate) ⊙ x W_up): the Transformer++ MLP."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.up = nn.Linear(dim, 2 * hidden, bias=False)  # gate and up projections, fused
        self.down = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


class CMS(nn.Module):
    """Stateless for outer levels: forward(x, state) returns the state it was given (None)."""

    def __init__(self, dim: int, config: CMSConfig):
        super().__init__()
        self.config = config
        hidden = 32 * math.ceil(config.hidden_mult * dim / 32)
        self.levels = nn.ModuleList(SwiGLU(dim, hidden) for _ in config.update_periods)
        for level, period in zip(self.levels, config.update_periods, strict=True):
            level.period = period  # C^(ℓ), read by LanguageModel.levels()

    def init_state(self, batch_size: int, device=None, dtype=None) -> None:
        return None

    def forward(self, x: Tensor, state: None) -> tuple[Tensor, None]:
        h = x
        for level in self.levels:
            h = h + level(h)
        return h - x, state
