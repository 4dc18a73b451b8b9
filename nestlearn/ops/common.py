"""Pieces shared by every implementation of the associative memory: the memory architectures (eq. 89),
the inner objectives and the activations.

    b batch, h heads, t time, d feature (key/query), o output (value), f hidden width of the MLP memory

Weights are stored as (b, h, out, in) matrices and applied to row vectors: y = x Wᵀ, the paper's M k.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "ACTIVATIONS",
    "MEMORIES",
    "OBJECTIVES",
    "RULES",
    "READS",
    "apply_memory",
    "apply_weight",
    "backprop_activation",
    "inner_loss",
    "activation",
    "autocast_enabled",
    "autocast_off",
]

MEMORIES = ("linear", "mlp")
OBJECTIVES = ("l2", "dot")
RULES = ("gd", "dgd")
READS = ("dual", "snapshot")

# The weight of each architecture whose input is the key, so that DGD's (αI − η k kᵀ) can act on it (eq. 88).
KEY_SIDE = {"linear": "W", "mlp": "W2"}


def _gelu_grad(z: Tensor) -> Tensor:
    # d/dz [z Φ(z)] = Φ(z) + z φ(z), for the exact (erf) GELU
    cdf = 0.5 * (1.0 + torch.erf(z / math.sqrt(2.0)))
    pdf = torch.exp(-0.5 * z * z) / math.sqrt(2.0 * math.pi)
    return cdf + z * pdf


def _silu_grad(z: Tensor) -> Tensor:
    s = torch.sigmoid(z)
    return s * (1.0 + z * (1.0 - s))


# name -> (σ, σ'). The chunked path needs σ' explicitly; the reference path differentiates σ by autograd,
# so a wrong σ' here is caught by the equivalence tests.
ACTIVATIONS: dict[str, tuple[Callable[[Tensor], Tensor], Callable[[Tensor], Tensor]]] = {
    "gelu": (F.gelu, _gelu_grad),
    "silu": (F.silu, _silu_grad),
    "tanh": (torch.tanh, lambda z: 1.0 - torch.tanh(z) ** 2),
    "relu": (F.relu, lambda z: (z > 0).to(z.dtype)),
    "identity": (lambda z: z, torch.ones_like),
}


def activation(name: str) -> tuple[Callable[[Tensor], Tensor], Callable[[Tensor], Tensor]]:
    if name not in ACTIVATIONS:
        raise ValueError(f"activation={name!r} is not known; expected one of {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]


# g ⊙ σ'(z) in one kernel where PyTorch has one that is differentiable again (gelu's double backward is built in;
# silu's is not), so that the outer gradient through the chunked path's hand-written inner gradient stays exact
_FUSED_BACKPROP: dict[str, Callable[[Tensor, Tensor], Tensor]] = {"gelu": torch.ops.aten.gelu_backward}


def backprop_activation(name: str, g: Tensor, z: Tensor) -> Tensor:
    """g ⊙ σ'(z): an error g backpropagated through σ at its input z (one kernel instead of about eight for gelu)."""
    fused = _FUSED_BACKPROP.get(name)
    return fused(g, z) if fused is not None else g * activation(name)[1](z)


def apply_weight(x: Tensor, W: Tensor) -> Tensor:
    """x Wᵀ for x (..., n, in) and weights W (..., out, in), computed as (W xᵀ)ᵀ: the same numbers, but autograd's
    gradient for W is then a contiguous (out, in) matrix like W. Written as x @ Wᵀ it comes out transposed, and
    every weight-sized operation on it (accumulating, scaling, the next chunk's step) runs strided, several times
    slower on CPU (docs/benchmarks.md)."""
    return (W @ x.transpose(-1, -2)).transpose(-1, -2)


def apply_memory(weights: dict[str, Tensor], x: Tensor, memory: str, act: str) -> Tensor:
    """M(x) for a batch of per-head memories.

    Args:
        weights: {"W": (b, h, o, d)} for `linear`; {"W1": (b, h, d, f), "W2": (b, h, f, d)} for `mlp`.
        x: (b, h, n, d), n inputs per memory.

    Returns:
        (b, h, n, o). `linear`: x Wᵀ. `mlp`: x + σ(x W2ᵀ) W1ᵀ, the residual 2-layer MLP of eq. 89.
    """
    if memory == "linear":
        return apply_weight(x, weights["W"])
    sigma, _ = activation(act)
    return x + apply_weight(sigma(apply_weight(x, weights["W2"])), weights["W1"])


def inner_loss(weights: dict[str, Tensor], k: Tensor, v: Tensor, memory: str, objective: str, act: str) -> Tensor:
    """The inner objective ℓ(M; k, v) per memory and input, (b, h, n).

    `l2`: ½‖M(k) − v‖² (Titans eq. 12, paper eq. 93); `dot`: −⟨M(k), v⟩ (paper eqs. 14–18, 92).
    """
    pred = apply_memory(weights, k, memory, act)  # (b, h, n, o)
    if objective == "l2":
        return 0.5 * (pred - v).pow(2).sum(-1)
    return -(pred * v).sum(-1)


def autocast_enabled(device_type: str) -> bool:
    """torch.is_autocast_enabled for a device type, False for those autocast does not know (meta)."""
    try:
        return torch.is_autocast_enabled(device_type)
    except RuntimeError:
        return False


def autocast_off(device_type: str):
    """A context with autocast off on this device type (nothing for those autocast does not know, such as meta)."""
    try:
        return torch.autocast(device_type, enabled=False)
    except RuntimeError:
        return contextlib.nullcontext()
