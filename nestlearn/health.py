"""Is every memory still alive? The dead state of an MLP memory, found at run time and named.

An MLP memory M(x) = x + W1 σ(W2 x) whose two layers are both near zero can never learn again: the gradient of
each layer goes through the other (∇W1 = e σ(W2 k)ᵀ, ∇W2 = (W1ᵀ e ⊙ σ') kᵀ), so writes stop moving it and it
reads as the identity. Retention towards zero (`retain_to="zero"`, the paper's weight decay) takes every memory
there within about 1,000 tokens of a stream (docs/deviations.md); retention towards the meta-learned initial state,
the default, cannot. `eval`, `memorize` and `longctx niah` check the state they end with and warn, naming the
memory, so that no memory silently stops learning.

    b batch, h heads
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from dataclasses import dataclass

from .cms import IN_CONTEXT
from .model import LanguageModel, ModelState
from .sm_titans import SelfModifyingTitans
from .state import MemoryState
from .titans import TitansMixer

__all__ = [
    "DEAD_NORM",
    "DeadMemoryWarning",
    "MemoryHealth",
    "memories",
    "memory_state",
    "memory_health",
    "unhealthy",
    "warn_about",
    "warn_dead",
]

# A layer is "near zero" when the Frobenius norm of one head's matrix is below this. At initialisation the norms are
# √d and √f (N(0, 1/fan_in) entries), 4 and 11 for 16-wide heads: 1e-3 is far below anything a live memory reaches.
DEAD_NORM = 1e-3


class DeadMemoryWarning(UserWarning):
    """A memory has reached the all-zero state from which it cannot learn again."""


@dataclass
class MemoryHealth:
    """One memory of the state: the smallest per-head norm of each layer, and how many (sequence, head) memories
    have both layers below `DEAD_NORM` (a task-loss CMS level has one "head" per sequence: its whole weights)."""

    name: str  # its place in the state, e.g. blocks.0.mixer.memory
    period: int  # its chunk size: tokens between two writes
    norms: dict[str, float]  # {layer: min over sequences and heads of ‖W‖_F}
    dead: int  # (sequence, head) memories in the dead state
    total: int  # (sequence, head) memories
    finite: bool  # no NaN or inf in any weight

    @property
    def alive(self) -> bool:
        return self.dead == 0 and self.finite

    def describe(self) -> str:
        norms = ", ".join(f"min ‖{k}‖ = {v:.2g}" for k, v in self.norms.items())
        if not self.finite:
            return f"{self.name}: weights are NaN or inf"
        return f"{self.name}: {self.dead} of {self.total} (sequence, head) memories dead ({norms})"


def memories(model: LanguageModel) -> dict[str, int]:
    """Every in-context memory of the model by its place in the state, with its chunk size / period."""
    out = {}
    for i, block in enumerate(model.blocks):
        for place in ("mixer", "adapter"):
            mixer = getattr(block, place)
            if isinstance(mixer, TitansMixer):
                out[f"blocks.{i}.{place}.memory"] = mixer.config.chunk_size
            elif isinstance(mixer, SelfModifyingTitans):
                out[f"blocks.{i}.{place}.gen"] = mixer.config.chunk_size
                out[f"blocks.{i}.{place}.memory"] = mixer.config.memory_chunk_size
        for j, level in enumerate(block.cms.levels):
            if isinstance(level, IN_CONTEXT):  # local-objective levels and task-loss levels (SwiGLU fast weights)
                out[f"blocks.{i}.cms.levels.{j}"] = level.period
    return out


def memory_state(state: ModelState, name: str) -> MemoryState:
    """The MemoryState at `name` (a key of `memories`) in a model's state. A task-loss level's fast weights come as a
    MemoryState {"up": (b, 2·hidden, dim), "down": (b, dim, hidden)} viewing the state's tensors."""
    parts = name.split(".")
    layer = state.layers[int(parts[1])]
    if parts[2] in ("mixer", "adapter"):
        return layer[parts[2]][parts[3]]
    cms = layer["cms"]
    level = (cms["levels"] if isinstance(cms, dict) else cms)[int(parts[4])]
    return level if isinstance(level, MemoryState) else MemoryState({"up": level["up"], "down": level["down"]})


def _health(name: str, period: int, state: MemoryState, threshold: float) -> MemoryHealth:
    per_head = {k: w.detach().float().flatten(-2).norm(dim=-1) for k, w in state.weights.items()}  # (b, h) or (h,)
    finite = all(bool(w.isfinite().all()) for w in state.weights.values())
    total = next(iter(per_head.values())).numel()
    # only an MLP has a dead state (a linear memory learns from zero): M(x) = x + W1 σ(W2 x), or a task-loss level's
    # SwiGLU down(silu(gate x) ⊙ up x), whose layers each get their gradient through the other
    if set(per_head) in ({"W1", "W2"}, {"up", "down"}):
        first, second = per_head.values()
        dead = int(((first < threshold) & (second < threshold)).sum())
    else:
        dead = 0
    return MemoryHealth(name, period, {k: float(n.min()) for k, n in per_head.items()}, dead, total, finite)


def memory_health(model: LanguageModel, state: ModelState, threshold: float = DEAD_NORM) -> Iterator[MemoryHealth]:
    """The health of every in-context memory in `state` (a state of `model`)."""
    for name, period in memories(model).items():
        yield _health(name, period, memory_state(state, name), threshold)


def unhealthy(model: LanguageModel, state: ModelState, threshold: float = DEAD_NORM) -> list[MemoryHealth]:
    """The memories of `state` that are dead or not finite."""
    return [m for m in memory_health(model, state, threshold) if not m.alive]


def warn_dead(model: LanguageModel, state: ModelState, where: str, threshold: float = DEAD_NORM) -> list[MemoryHealth]:
    """Warn (DeadMemoryWarning) about every memory of `state` that is dead or not finite, saying `where` (e.g.
    "after 4,096 tokens of the stream"); returns them."""
    bad = unhealthy(model, state, threshold)
    warn_about(bad, where)
    return bad


def warn_about(bad: list[MemoryHealth], where: str) -> None:
    """The DeadMemoryWarning for memories found by `unhealthy` (nothing when there are none)."""
    if bad:
        lines = "\n  ".join(m.describe() for m in bad)
        warnings.warn(
            f"{len(bad)} memories can no longer learn {where}:\n  {lines}\nA memory whose two layers are both near "
            "zero gets no gradient (each layer's goes through the other); with retain_to='zero' retention takes it "
            "there. Use retain_to='init' (the default) or a retention_init closer to 1 (docs/deviations.md).",
            DeadMemoryWarning,
            stacklevel=3,
        )
