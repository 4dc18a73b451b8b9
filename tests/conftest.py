"""Shared fixtures: seeded, CPU-only, small inputs for the associative memory."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from nestlearn.memory import MemoryState, init_state


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def make_inputs(
    memory: str,
    momentum: bool,
    *,
    dtype: torch.dtype = torch.float64,
    b: int = 2,
    h: int = 2,
    T: int = 11,
    d: int = 4,
    hidden: int = 6,
    seed: int = 0,
    requires_grad: bool = False,
) -> dict:
    """q, k, v, gates and a non-trivial initial state (random weights and momentum, unbatched as a model's)."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0):
        return torch.randn(*shape, generator=g, dtype=dtype) * scale

    def rand(*shape, lo=0.0, hi=1.0):
        return lo + (hi - lo) * torch.rand(*shape, generator=g, dtype=dtype)

    inputs = {
        "q": randn(b, h, T, d),
        "k": F.normalize(randn(b, h, T, d), dim=-1),  # unit keys, as in Hope (eq. 57 needs ‖k‖ = 1)
        "v": randn(b, h, T, d),
        "lr": rand(b, h, T, hi=0.5),
        "retention": rand(b, h, T, lo=0.5),
        "momentum": rand(b, h, T) if momentum else None,
    }
    if memory == "linear":
        state = MemoryState({"W": randn(h, d, d, scale=0.3)})
    else:
        state = init_state(h, d, memory="mlp", hidden=hidden, generator=g, dtype=dtype)
    if momentum:
        state.momentum = {n: randn(*w.shape, scale=0.1) for n, w in state.weights.items()}
    inputs["state"] = state
    if requires_grad:
        for x in tensors_of(inputs):
            x.requires_grad_(True)
    return inputs


def tensors_of(inputs: dict) -> list[torch.Tensor]:
    """Every tensor argument of scan, the initial state's included, in a fixed order."""
    out = [inputs[n] for n in ("q", "k", "v", "lr", "retention", "momentum") if inputs[n] is not None]
    state: MemoryState = inputs["state"]
    for group in (state.weights, state.momentum, state.snapshot):
        if group:
            out += [group[n] for n in sorted(group)]
    return out


def state_tensors(state: MemoryState) -> dict[str, torch.Tensor]:
    out = {}
    for gname in ("weights", "momentum", "snapshot"):
        group = getattr(state, gname)
        for n in sorted(group or {}):
            out[f"{gname}.{n}"] = group[n]
    return out
