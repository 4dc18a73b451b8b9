"""Muon: momentum whose output is orthogonalised (paper eq. 42; Jordan et al. 2024).

    m_{t+1} = β m_t + g_t                       the momentum, a linear associative memory of the gradients (eq. 33)
    u_t     = g_t + β m_{t+1}  (Nesterov)  or  m_{t+1}
    θ_{t+1} = θ_t (1 − lr·λ) − lr · s(NewtonSchulz_k(u_t))

The paper reads Newton–Schulz as the momentum memory's nonlinear output σ (eq. 52) and as an inner optimiser of
‖OᵀO − I‖² (eq. 43). s is the update scale (`scale`): `rms` (default) rescales each update to RMS 0.2, AdamW's
typical step, so that one learning rate serves the orthogonalised matrices and the parameters that AdamW steps
inside the same optimiser: embeddings are best left to AdamW as well (Jordan et al.), which `muon=False` on a
param group does. Parameters with fewer than 2 dimensions always go to AdamW. More than 2 dimensions are
orthogonalised as (shape[0], rest).
"""

from __future__ import annotations

import torch

from ._common import SCALES, ParamwiseOptimizer, adamw_, check_choice, check_range, scale_update
from .newton_schulz import as_matrix, newton_schulz

__all__ = ["Muon"]


class Muon(ParamwiseOptimizer):
    """Muon for matrices, AdamW for the rest, in one torch optimiser.

    Args:
        lr: learning rate of both parts. momentum: β. nesterov: use g + β m. ns_steps: Newton–Schulz iterations.
        weight_decay: decoupled, on the Muon matrices (AdamW groups set their own). scale: rms | spectral | none.
        betas, eps: of the AdamW part. Per param group, `muon`: None (matrices Muon, the rest AdamW), True or False.
    """

    name = "Muon"

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        momentum: float = 0.95,
        nesterov: bool = True,
        ns_steps: int = 5,
        weight_decay: float = 0.0,
        scale: str = "rms",
        betas: tuple[float, float] = (0.9, 0.95),
        eps: float = 1e-8,
    ):
        check_range("Muon", "lr", lr, 0.0)
        check_range("Muon", "momentum", momentum, 0.0, 1.0, open_high=True)
        check_range("Muon", "weight_decay", weight_decay, 0.0)
        check_range("Muon", "ns_steps", ns_steps, 1)
        check_choice("Muon", "scale", scale, SCALES)
        for i, b in enumerate(betas):
            check_range("Muon", f"betas[{i}]", b, 0.0, 1.0, open_high=True)
        defaults = dict(
            lr=lr,
            momentum=momentum,
            nesterov=nesterov,
            ns_steps=ns_steps,
            weight_decay=weight_decay,
            scale=scale,
            betas=tuple(betas),
            eps=eps,
            muon=None,
        )
        super().__init__(params, defaults)

    @staticmethod
    def uses_muon(p: torch.Tensor, group: dict) -> bool:
        return p.dim() >= 2 and group["muon"] is not False

    def _step_param(self, p, grad, state, group) -> None:
        if not self.uses_muon(p, group):
            adamw_(p, grad, state, group["lr"], group["betas"], group["eps"], group["weight_decay"])
            return
        if not state:
            state["momentum"] = torch.zeros_like(p)
        m = state["momentum"].mul_(group["momentum"]).add_(grad)
        u = grad.add(m, alpha=group["momentum"]) if group["nesterov"] else m
        o = scale_update(newton_schulz(as_matrix(u), group["ns_steps"]), group["scale"])
        p.mul_(1 - group["lr"] * group["weight_decay"])
        p.add_(o.view_as(p), alpha=-group["lr"])
