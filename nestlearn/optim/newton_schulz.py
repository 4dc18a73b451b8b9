"""Orthogonalisation of an update matrix: the Newton–Schulz iteration of Muon (paper eq. 42–44), and its slow
reference, the polar factor U Vᵀ from an SVD.

Paper §4 reads Newton–Schulz as an inner optimiser: a few gradient steps on ‖OᵀO − I‖²_F from O₀ = g (eq. 43),
whose one-step form is the cubic iteration of eq. 44. We use the quintic iteration of Muon (Jordan et al. 2024),
whose coefficients (3.4445, −4.7750, 2.0315) are tuned to push every singular value into about [0.7, 1.2] in five
steps: it converges faster than the cubic one and is what Muon and M3 are run with in practice.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["newton_schulz", "polar", "as_matrix"]

QUINTIC = (3.4445, -4.7750, 2.0315)


def as_matrix(x: Tensor) -> Tensor:
    """The matrix view of a parameter's update: 2-D as is; more dimensions flatten into the columns
    (a convolution (c_out, c_in, w) becomes (c_out, c_in·w), the usual choice for Muon)."""
    if x.dim() < 2:
        raise ValueError(f"a tensor of shape {tuple(x.shape)} has no matrix view; orthogonalise only 2-D or more")
    return x if x.dim() == 2 else x.reshape(x.shape[0], -1)


def newton_schulz(g: Tensor, steps: int = 5, eps: float = 1e-7) -> Tensor:
    """≈ U Vᵀ for g = U S Vᵀ, (m, n) -> (m, n), by `steps` quintic Newton–Schulz iterations (in float32 or wider).

    g is first scaled to unit Frobenius norm, so every singular value starts in (0, 1] and the result does not
    depend on g's scale. A zero g gives zero.
    """
    if steps < 1:
        raise ValueError(f"steps={steps} must be >= 1")
    a, b, c = QUINTIC
    x = g.to(torch.promote_types(g.dtype, torch.float32))  # float32 at least: bf16 loses the small singular values
    wide = x.shape[-2] <= x.shape[-1]
    if not wide:  # iterate on the wide side: X Xᵀ is then the smaller Gram matrix
        x = x.mT
    x = x / (x.norm(dim=(-2, -1), keepdim=True) + eps)
    for _ in range(steps):
        gram = x @ x.mT  # (m, m)
        x = a * x + (b * gram + c * gram @ gram) @ x
    return (x if wide else x.mT).to(g.dtype)


def polar(g: Tensor) -> Tensor:
    """The exact orthogonal polar factor U Vᵀ of g (SVD): the slow reference for newton_schulz."""
    u, _, vh = torch.linalg.svd(g.double(), full_matrices=False)
    return (u @ vh).to(g.dtype)
