"""Per-sequence state of an associative memory: fast weights, momentum and the position inside a chunk.

State is explicit: every call takes it in and returns it, nothing is kept on a module (docs/deviations.md).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from torch import Tensor

__all__ = ["MemoryState", "tree_map"]


@dataclass
class MemoryState:
    """The fast weights of a batch of per-head memories, their momentum, and where the current chunk stands.

    Attributes:
        weights: M_t. {"W": (b, h, o, d)} for a linear memory; {"W1": (b, h, d, f), "W2": (b, h, f, d)} for an
            MLP. An initial state may drop the batch axis, (h, out, in), to be shared by every sequence: that is
            how a model meta-learns it.
        momentum: S_t with the same keys and shapes, or None when the memory has no momentum.
        snapshot: the weights the current chunk started from, where its gradients are taken (eq. 90). Only set
            while a chunk is part-way through (offset > 0), so that a stream cut anywhere continues exactly.
        offset: tokens of the current chunk already written, in [0, chunk_size).
    """

    weights: dict[str, Tensor]
    momentum: dict[str, Tensor] | None = None
    snapshot: dict[str, Tensor] | None = None
    offset: int = field(default=0)

    def map(self, fn: Callable[[Tensor], Tensor]) -> MemoryState:
        """A new state with `fn` applied to every tensor."""

        def each(group: dict[str, Tensor] | None) -> dict[str, Tensor] | None:
            return None if group is None else {name: fn(x) for name, x in group.items()}

        return MemoryState(each(self.weights), each(self.momentum), each(self.snapshot), self.offset)

    def detach(self) -> MemoryState:
        """Cut the autograd graph, e.g. between training segments (truncated backprop)."""
        return self.map(Tensor.detach)

    def to(self, *args, **kwargs) -> MemoryState:
        """`Tensor.to` on every tensor: `state.to("cuda")`, `state.to(torch.float64)`, `state.to(q)`."""
        return self.map(lambda x: x.to(*args, **kwargs))


def tree_map(fn, x: object) -> object:
    """Apply fn to every tensor of a nested state (dicts, lists, tuples, MemoryState)."""
    if isinstance(x, Tensor):
        return fn(x)
    if isinstance(x, MemoryState):
        return x.map(fn)
    if isinstance(x, dict):
        return {k: tree_map(fn, v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(tree_map(fn, v) for v in x)
    return x
