"""Token-by-token reference of the associative memory: the ground truth every fast path is tested against.

It reads like the equations and is kept forever. The inner gradient ∇ℓ is taken by autograd (torch.func.grad),
not by hand, so the chunked path's hand-derived gradients are checked against an independent computation.

    token t, chunk of C tokens, t0 = C·⌊t/C⌋ the first token of t's chunk (0-based)
    g_t   = ∇_M ℓ(M_{t0−1}; k_t, v_t)                         gradient at the chunk's starting weights (eq. 90,
                                                               Titans eqs. 16–18); C = 1 gives M_{t−1}
    S_t   = β_t S_{t−1} − η_t g_t                               momentum (Titans eqs. 10, 14), optional
    U_t   = S_t with momentum, else −η_t g_t
    gd:   M_t = α_t M_{t−1} + U_t                               (eq. 5 / Titans eq. 13 with retention α_t)
    dgd:  M_t = M_{t−1}(α_t I − η_t k_t k_tᵀ) + U_t             (eq. 88) on the key-side weight; α_t on the rest
    origin O (optional): the same recurrence on the deviation M − O, so retention pulls towards O, not zero:
          gd:  M_t = O + α_t (M_{t−1} − O) + U_t       dgd:  M_t = O + (M_{t−1} − O)(α_t I − η_t k_t k_tᵀ) + U_t
    dual:     y_t = M_t(q_t)        snapshot:  y_t = M_{t0−1}(q_t)   (eq. 90 as printed)
    max_grad_norm c (optional): g_t ← g_t · min(1, c / ‖g_t‖), ‖·‖ over every layer of the memory
    self_target (optional): the value is v̂_t = M_{t0−1}(v_t), the memory's own read at v_t (eq. 87)

Symbols: docs/notation.md.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.func import grad

from ..state import MemoryState
from .common import KEY_SIDE, apply_memory, inner_loss

__all__ = ["naive_scan"]


def naive_scan(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    lr: Tensor,
    retention: Tensor,
    momentum: Tensor | None,
    state: MemoryState,
    *,
    memory: str,
    objective: str,
    rule: str,
    chunk_size: int,
    read: str,
    activation: str,
    max_grad_norm: float | None = None,
    self_target: bool = False,
    origin: dict[str, Tensor] | None = None,
) -> tuple[Tensor, MemoryState]:
    """Inputs already validated and batched: q, k (b, h, t, d), v (b, h, t, o), gates (b, h, t), state and origin
    tensors (b, h, out, in). Returns y (b, h, t, o) and the final state."""

    def loss(w: dict[str, Tensor], k_t: Tensor, v_t: Tensor) -> Tensor:
        # summed over (b, h): each memory's gradient only sees its own term
        return inner_loss(w, k_t, v_t, memory, objective, activation).sum()

    weights, S = state.weights, state.momentum
    snapshot = state.snapshot if state.offset else weights  # M_{t0−1}: the weights this chunk's gradients use
    ys = []
    for t in range(q.shape[2]):
        if (state.offset + t) % chunk_size == 0:
            snapshot = weights
        q_t, k_t, v_t = q[:, :, t : t + 1], k[:, :, t : t + 1], v[:, :, t : t + 1]  # (b, h, 1, ·)
        eta = lr[:, :, t, None, None]  # (b, h, 1, 1)
        alpha = retention[:, :, t, None, None]
        if self_target:  # eq. 87: the memory generates its own target, at the weights the gradient is taken at
            v_t = apply_memory(snapshot, v_t, memory, activation)
        g = grad(loss)(snapshot, k_t, v_t)  # {name: (b, h, out, in)}
        if max_grad_norm is not None:  # clip this token's whole gradient (every layer) to norm max_grad_norm
            sq = sum((x * x).sum((-2, -1), keepdim=True) for x in g.values())  # (b, h, 1, 1)
            scale = max_grad_norm * torch.rsqrt(sq.clamp(min=max_grad_norm**2))
            g = {name: scale * x for name, x in g.items()}
        if S is not None:
            beta = momentum[:, :, t, None, None]
            S = {name: beta * S[name] - eta * g[name] for name in weights}
            U = S
        else:
            U = {name: -eta * g[name] for name in weights}
        new = {}
        for name, M in weights.items():
            O = 0.0 if origin is None else origin[name]
            if rule == "dgd" and name == KEY_SIDE[memory]:
                eye = torch.eye(M.shape[-1], dtype=M.dtype, device=M.device)
                A = alpha * eye - eta * (k_t.transpose(-1, -2) @ k_t)  # α_t I − η_t k_t k_tᵀ, (b, h, d, d)
                new[name] = O + (M - O) @ A + U[name]
            else:
                new[name] = O + alpha * (M - O) + U[name]
        weights = new
        ys.append(apply_memory(weights if read == "dual" else snapshot, q_t, memory, activation))
    offset = (state.offset + q.shape[2]) % chunk_size
    return torch.cat(ys, dim=2), MemoryState(weights, S, snapshot if offset else None, offset)
