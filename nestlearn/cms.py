"""Continuum Memory System (CMS): a chain of MLP levels, level ℓ updated every C^(ℓ) tokens (paper §7, eqs. 70–73).

    y = MLP^(f_k)( … MLP^(f_1)(x))            eq. 70, sequential variant (eq. 73), fastest level first

Levels are chained with a residual connection each, h_ℓ = h_{ℓ−1} + MLP^(ℓ)(h_{ℓ−1}), and the CMS returns
h_k − h_0, so that for one level it is the Transformer's MLP (`variant="sequential"`, eq. 73). With
`variant="independent"` (eq. 74) every level reads x and the CMS returns the learned weighted sum
Σ_ℓ a_ℓ MLP^(ℓ)(x), a = softmax of one learned logit per level (uniform at first). With `variant="nested"`
(eq. 72) the levels are chained as in the sequential variant, and an in-context level goes back to its initial
state θ_0 whenever the next slower level updates; the state then also counts the stream position.

- An **outer level** (period None, or at least the training context) is a SwiGLU MLP whose weights are ordinary
  parameters carrying their period (`period`, listed by `LanguageModel.levels()`) for the optimizer that honours
  it (eq. 71).
- An **in-context level** (period C < context) is an MLP whose weights live in the per-sequence state: per head,
  the residual MLP memory M(x) = x + W1 σ(W2 x) of eq. 89, read at its input and written with the chunk's summed
  gradients every C tokens (`scan` with `chunk_size=C, read="snapshot"`: eq. 71 with GD). Its learning signal is
  the level's own L2 objective ½‖M(k_t) − v_t‖² with k_t the (normalised) input and v_t = h_t W_v a learned target,
  not the task loss; why: docs/deviations.md. Its initial weights are parameters, meta-learned through every
  write (eq. 73).
"""

from __future__ import annotations

import itertools
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import CMSConfig, retention_gate_bias
from .memory import scan
from .state import MemoryState
from .titans import mlp_memory_parameters

__all__ = ["SwiGLU", "InContextLevel", "TaskLevel", "CMS"]


class SwiGLU(nn.Module):
    """W_down (SiLU(x W_gate) ⊙ x W_up): the Transformer++ MLP."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.up = nn.Linear(dim, 2 * hidden, bias=False)  # gate and up projections, fused
        self.down = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)

    @torch.no_grad()
    def load_mlp(self, gate: Tensor, up: Tensor, down: Tensor) -> None:
        """Start this level from an existing SwiGLU MLP (paper §7.3, ad-hoc level stacking): weights in
        `nn.Linear` layout, gate and up (hidden, dim), down (dim, hidden), as in Llama's gate/up/down_proj."""
        hidden, dim = self.down.in_features, self.down.out_features
        for name, w, want in (("gate", gate, (hidden, dim)), ("up", up, (hidden, dim)), ("down", down, (dim, hidden))):
            if tuple(w.shape) != want:
                raise ValueError(
                    f"{name} has shape {tuple(w.shape)}; this level expects {want} (hidden={hidden}, "
                    f"dim={dim}): build the level with a matching CMSConfig.hidden_mult"
                )
        self.up.weight.copy_(torch.cat([gate, up], dim=0))
        self.down.weight.copy_(down)


class InContextLevel(nn.Module):
    """An MLP whose weights are per-sequence fast state, written every `period` tokens. State: a MemoryState."""

    def __init__(self, dim: int, num_heads: int, period: int, config: CMSConfig):
        super().__init__()
        self.period, self.num_heads, self.head_dim = period, num_heads, dim // num_heads
        self.max_lr, self.checkpoint, self.max_grad_norm = config.max_lr, config.checkpoint, config.max_grad_norm
        self.retain_to = config.retain_to
        d, f = self.head_dim, config.memory_hidden_mult * self.head_dim
        self.value = nn.Linear(dim, dim, bias=False)  # v_t = h_t W_v: what the level learns to store
        self.gates = nn.Linear(dim, 2 * num_heads)  # η_t and α_t per head
        with torch.no_grad():
            self.gates.weight.mul_(0.1)
            self.gates.bias.view(2, num_heads)[1].fill_(retention_gate_bias(config))  # α ≈ 0.98 by default
        self.W1, self.W2 = mlp_memory_parameters(num_heads, d, f)  # M_0, meta-learned (eq. 73)
        self.out = nn.Linear(dim, dim, bias=False)
        self.compile_chunks = False  # torch.compile each chunk's step (LanguageModel.compile_chunks)

    def init_state(self, batch_size: int) -> MemoryState:
        return MemoryState({"W1": self.W1, "W2": self.W2})

    def origin(self) -> dict[str, Tensor] | None:
        """What retention pulls the level towards: M_0 with `retain_to="init"`, zero (None) with "zero"."""
        return {"W1": self.W1, "W2": self.W2} if self.retain_to == "init" else None

    def forward(self, h: Tensor, state: MemoryState) -> tuple[Tensor, MemoryState]:
        b, t, dim = h.shape
        H, d = self.num_heads, self.head_dim
        k = F.normalize(h.view(b, t, H, d).transpose(1, 2), dim=-1)  # (b, H, t, d): read and written here
        v = self.value(h).view(b, t, H, d).transpose(1, 2)
        g = self.gates(h).view(b, t, 2, H).permute(2, 0, 3, 1)  # (2, b, H, t)
        lr, retention = self.max_lr * torch.sigmoid(g[0]), torch.sigmoid(g[1])
        y, state = scan(
            k,
            k,
            v,
            lr,
            retention,
            memory="mlp",
            objective="l2",
            rule="gd",
            chunk_size=self.period,
            read="snapshot",
            state=state,
            check_values=False,
            checkpoint=self.checkpoint,
            max_grad_norm=self.max_grad_norm,
            compile=self.compile_chunks,
            origin=self.origin(),
        )
        y = (y - k).transpose(1, 2).reshape(b, t, dim)  # the MLP part of M(k) = k + W1 σ(W2 k)
        return self.out(y), state


class TaskLevel(nn.Module):
    """An in-context level learned by the task loss (eq. 71): a SwiGLU MLP of the outer levels' form whose weights
    θ = (W_up, W_down) are per-sequence fast state. Its forward only reads θ; the steps θ ← θ − η Σ_t ∇_θ ℓ_NTP are
    taken by the model, which alone sees the loss (`LanguageModel`, chunk by chunk). θ_0 are parameters in
    `nn.Linear` layout, meta-learned through the steps (eq. 73), and can be seeded from a pretrained MLP (§7.3).

    State: {"up": (b, 2·hidden, dim), "down": (b, dim, hidden)} and, for a level slower than the model's chunk, the
    gradient summed so far over its period, {"sum_up", "sum_down"} (zeros at the start of a period)."""

    def __init__(self, dim: int, hidden: int, period: int, config: CMSConfig):
        super().__init__()
        self.period, self.lr = period, config.task_lr
        self.up = nn.Parameter(torch.empty(2 * hidden, dim))  # gate and up, fused as in SwiGLU
        self.down = nn.Parameter(torch.empty(dim, hidden))
        nn.init.normal_(self.up, std=0.02)
        nn.init.normal_(self.down, std=0.02)
        self.learns = True  # False: the block reads θ_0 unchanged (CMSConfig.task_blocks)
        self.reset: int | None = None  # variant "nested": back to θ_0 every `reset` tokens (set by CMS)

    def init_state(self, batch_size: int) -> dict:
        b = batch_size
        state = {"up": self.up.expand(b, *self.up.shape), "down": self.down.expand(b, *self.down.shape)}
        state["sum_up"], state["sum_down"] = torch.zeros_like(state["up"]), torch.zeros_like(state["down"])
        return state

    def forward(self, h: Tensor, state: dict) -> tuple[Tensor, dict]:
        gate, up = torch.bmm(h, state["up"].transpose(1, 2)).chunk(2, dim=-1)  # (b, t, hidden) each
        return torch.bmm(F.silu(gate) * up, state["down"].transpose(1, 2)), state  # (b, t, dim)

    @torch.no_grad()
    def load_mlp(self, gate: Tensor, up: Tensor, down: Tensor) -> None:
        """θ_0 from an existing SwiGLU MLP (§7.3), in `nn.Linear` layout as `SwiGLU.load_mlp`."""
        hidden, dim = self.down.shape[1], self.down.shape[0]
        for name, w, want in (("gate", gate, (hidden, dim)), ("up", up, (hidden, dim)), ("down", down, (dim, hidden))):
            if tuple(w.shape) != want:
                raise ValueError(f"{name} has shape {tuple(w.shape)}; this level expects {want}")
        self.up.copy_(torch.cat([gate, up], dim=0))
        self.down.copy_(down)


IN_CONTEXT = (InContextLevel, TaskLevel)  # levels whose weights live in the per-sequence state


class CMS(nn.Module):
    """State: one entry per level, a MemoryState for in-context levels and None for outer levels."""

    def __init__(self, dim: int, num_heads: int, seq_len: int, config: CMSConfig):
        """`seq_len` decides which levels are outer only for a config without `outer_from` (ModelConfig fills it)."""
        super().__init__()
        self.config = config
        hidden = config.hidden_size or 32 * math.ceil(config.hidden_mult * dim / 32)
        levels = []
        for period in config.update_periods:
            if period is not None and period < (config.outer_from or seq_len):
                if config.signal == "task":
                    levels.append(TaskLevel(dim, hidden, period, config))
                else:
                    levels.append(InContextLevel(dim, num_heads, period, config))
            else:
                level = SwiGLU(dim, hidden)
                level.period = period  # C^(ℓ), read by LanguageModel.levels()
                levels.append(level)
        self.levels = nn.ModuleList(levels)
        # nested (eq. 72): an in-context level returns to its initial state whenever the next slower level updates,
        # every `reset` tokens of the stream (None: the next level is stepped by the optimizer, not in context)
        # A task-loss level's resets are taken by the model, which steps it (task_cms); only local levels reset here.
        periods = list(config.update_periods)
        self.resets = [
            next((q for q in periods[i + 1 :] if q is not None), None) if isinstance(lv, IN_CONTEXT) else None
            for i, lv in enumerate(levels)
        ]
        for level, reset in zip(levels, self.resets, strict=True):
            if isinstance(level, TaskLevel):
                level.reset = reset if config.variant == "nested" else None
        if config.variant == "independent":
            self.agg_logits = nn.Parameter(torch.zeros(len(levels)))  # Agg of eq. 74: a learned weighted sum

    def init_state(self, batch_size: int) -> list | dict:
        levels = [lv.init_state(batch_size) if isinstance(lv, IN_CONTEXT) else None for lv in self.levels]
        # nested local levels: the stream position too, because resets follow the global grid of the slower periods
        # (task-loss levels are reset by the model, which keeps the position in its own state)
        return {"levels": levels, "position": 0} if self._keeps_position else levels

    @property
    def _keeps_position(self) -> bool:
        return self.config.variant == "nested" and self.config.signal == "local"

    def forward(self, x: Tensor, state: list | dict) -> tuple[Tensor, list | dict]:
        nested = self._keeps_position
        chained = self.config.variant in ("sequential", "nested")
        states, position = (state["levels"], state["position"]) if nested else (state, 0)
        h, outs, new_state = x, [], []
        for level, level_state, reset in zip(self.levels, states, self.resets, strict=True):
            inp = h if chained else x
            if not isinstance(level, IN_CONTEXT):
                y = level(inp)
            elif nested and reset is not None:
                y, level_state = self._nested(level, inp, level_state, position, reset)
            else:
                y, level_state = level(inp, level_state)
            h = h + y
            outs.append(y)
            new_state.append(level_state)
        if nested:
            return h - x, {"levels": new_state, "position": position + x.shape[1]}
        if chained:
            return h - x, new_state
        a = self.agg_logits.softmax(0)  # (levels,)
        return sum(a[i] * y for i, y in enumerate(outs)), new_state

    @staticmethod
    def _nested(level: InContextLevel, h: Tensor, state: MemoryState, position: int, reset: int):
        """Run `level` over h, which starts at stream `position`, going back to the level's initial state at every
        multiple of `reset` (a multiple of the level's period, so resets fall on chunk boundaries)."""
        t = h.shape[1]
        first = (reset - position % reset) % reset
        bounds = [0, *range(first, t, reset), t]
        ys = []
        for lo, hi in itertools.pairwise(bounds):
            if hi == lo:
                continue
            if (position + lo) % reset == 0 and position + lo > 0:
                state = level.init_state(h.shape[0])  # θ_0 again: the slower level has just updated
            y, state = level(h[:, lo:hi], state)
            ys.append(y)
        return torch.cat(ys, dim=1) if ys else h.new_zeros(h.shape), state
