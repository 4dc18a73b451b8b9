"""Pieces shared by the optimizers: argument checks, the AdamW step for parameters that are not matrices, and the
scale of an orthogonalised update."""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.optim import Optimizer

SCALES = ("rms", "spectral", "none")
RMS_TARGET = 0.2  # AdamW's typical update RMS (Liu et al. 2025, "Muon is scalable"): one lr serves both


def check_range(owner: str, name: str, value, low: float, high: float | None = None, *, open_high: bool = False):
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value >= low
    if ok and high is not None:
        ok = value < high if open_high else value <= high
    if not ok:
        rng = f">= {low}" if high is None else f"in [{low}, {high}{')' if open_high else ']'}"
        raise ValueError(f"{owner}: {name}={value!r} must be a number {rng}")


def check_choice(owner: str, name: str, value, allowed) -> None:
    if not callable(value) and value not in allowed:
        raise ValueError(f"{owner}: {name}={value!r} is not known; expected one of {list(allowed)} or a callable")


def adamw_(p: Tensor, grad: Tensor, state: dict, lr: float, betas: tuple[float, float], eps: float, wd: float) -> None:
    """One torch.optim.AdamW step (decoupled weight decay, bias correction), in place; the same arithmetic, so
    the vector parameters of Muon and M3 move exactly as they would under AdamW."""
    if not state:
        state["step"] = 0
        state["exp_avg"] = torch.zeros_like(p)
        state["exp_avg_sq"] = torch.zeros_like(p)
    state["step"] += 1
    b1, b2 = betas
    p.mul_(1 - lr * wd)
    state["exp_avg"].lerp_(grad, 1 - b1)
    state["exp_avg_sq"].mul_(b2).addcmul_(grad, grad, value=1 - b2)
    bc1, bc2 = 1 - b1 ** state["step"], 1 - b2 ** state["step"]
    denom = (state["exp_avg_sq"].sqrt() / math.sqrt(bc2)).add_(eps)
    p.addcdiv_(state["exp_avg"], denom, value=-lr / bc1)


def scale_update(u: Tensor, scale: str, eps: float = 1e-12) -> Tensor:
    """`rms`: rescale u (m, n) to RMS 0.2, AdamW's typical update size, so one learning rate serves the matrices
    and the AdamW-stepped vectors; `spectral`: Muon's √max(1, m/n) (Jordan et al. 2024); `none`: as is."""
    if scale == "rms":
        return u * (RMS_TARGET / (u.float().pow(2).mean().sqrt() + eps)).to(u.dtype)
    if scale == "spectral":
        return u * max(1.0, u.shape[0] / u.shape[1]) ** 0.5
    return u


class ParamwiseOptimizer(Optimizer):
    """The torch.optim step shared by nestlearn's optimizers: run the closure, refuse a negative learning rate
    (a schedule may set one after construction), then `_step_param` for every parameter that has a gradient."""

    name = "optimizer"

    def _step_param(self, p: Tensor, grad: Tensor, state: dict, group: dict) -> None:
        raise NotImplementedError

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            check_range(self.name, "lr", group["lr"], 0.0)
            for p in group["params"]:
                if p.grad is not None:
                    self._step_param(p, p.grad, self.state[p], group)
        return loss
